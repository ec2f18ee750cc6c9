"""The parallel layout: where this rank sits in the tensor-parallel x data-parallel grid.

Built and validated once, before anything else (torchtitan's ParallelDims plays this part):
every divisibility rule is checked here, megatron-core's process groups are created here, and
the engine, the data loader, the metrics and the renormalisation all read their ranks and
sizes from the one object. TP ranks are adjacent (as within a node); ranks `tp` apart form a
data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass

from letngpt.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ParallelLayout:
    world: int
    rank: int
    tp: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    mpu: object | None  # DeepSpeed's view of megatron-core's groups; None without TP

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_layout(run: RunConfig, world: int) -> None:
    """Every rule a layout must satisfy, as one-line ConfigErrors (no process group needed)."""
    from letngpt.parallel.tensor_parallel import check_tp_layout

    t = run.train
    if world % t.tp:
        raise ConfigError(f"tp ({t.tp}) must divide the number of processes ({world})")
    check_tp_layout(run.model, t.tp)
    dp = world // t.tp
    if t.gradient_accumulation_steps % dp:
        raise ConfigError(f"gradient_accumulation_steps ({t.gradient_accumulation_steps}) must be divisible "
                          f"by the data-parallel size ({dp})")


def build_layout(run: RunConfig, world: int, rank: int) -> ParallelLayout:
    """Validate, then create megatron-core's TP x DP groups when tp > 1 (collective)."""
    check_layout(run, world)
    tp = run.train.tp
    if tp == 1:
        return ParallelLayout(world=world, rank=rank, tp=1, tp_rank=0, dp_size=world, dp_rank=rank, mpu=None)
    from letngpt.parallel.tensor_parallel import MegatronMPU, initialize_tp

    initialize_tp(tp)
    mpu = MegatronMPU()
    return ParallelLayout(world=world, rank=rank, tp=tp, tp_rank=mpu.get_model_parallel_rank(),
                          dp_size=mpu.get_data_parallel_world_size(), dp_rank=mpu.get_data_parallel_rank(), mpu=mpu)
