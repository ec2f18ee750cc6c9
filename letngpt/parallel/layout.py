"""The parallel layout: where this rank sits in the tensor-parallel x data-parallel grid.

The one owner of the layout's rules and derived numbers (torchtitan's ParallelDims plays this part):
tp divides the world (and a node, for the planner), the model's split dimensions divide by tp, dp =
world / tp, each DP rank's share of the accumulation, the DP group that ZeRO and the renormalisation
reduce over, and `shard(model)`, which applies tensor parallelism. The trainer and the engine read these
from one object built at start-up; the planner (letngpt.tools.plan) checks a hypothetical cluster with
the same `check_layout`. TP ranks are adjacent (as within a node); ranks `tp` apart form a DP group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.distributed as dist
import torch.nn as nn

from letngpt.config import ConfigError, ModelConfig, RunConfig


@dataclass(frozen=True)
class ParallelLayout:
    world: int
    rank: int
    tp: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    accum: int  # micro batches per optimizer step on each DP rank (gradient_accumulation_steps / dp_size)
    mpu: object | None  # DeepSpeed's view of megatron-core's groups; None without TP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self):
        """The process group over which ZeRO partitions and the renormalisation all-reduces: the
        data-parallel subgroup under TP, the whole world otherwise (None before any process group)."""
        return self.mpu.get_data_parallel_group() if self.mpu is not None else dist.group.WORLD

    def shard(self, model: nn.Module) -> nn.Module:
        """This rank's TP shard of a full model (the model itself when tp is 1)."""
        if self.tp == 1:
            return model
        from letngpt.parallel.tensor_parallel import parallelize_tp

        return parallelize_tp(model, self.tp)


def check_model_split(cfg: ModelConfig, tp: int) -> None:
    """Heads, vocabulary and MLP width are split evenly over the TP ranks, or not at all."""
    for name, value in (("n_head", cfg.n_head), ("vocab_size", cfg.vocab_size), ("mlp hidden size", cfg.hidden_dim)):
        if value % tp:
            raise ConfigError(f"{name} ({value}) must be divisible by tp ({tp})")


def data_parallel_size(world: int, tp: int) -> int:
    """dp = world / tp: the ranks that hold the same TP shard and split the batch."""
    return world // tp


def check_layout(run: RunConfig, world: int, *, tp: int | None = None, gpus_per_node: int | None = None) -> int:
    """Every rule a layout must satisfy, as one-line ConfigErrors (no process group needed); returns
    the data-parallel size. `tp` defaults to the run's; `gpus_per_node` (the planner's) keeps a TP
    group inside a node."""
    tp = run.train.tp if tp is None else tp
    if tp < 1 or world % tp:
        raise ConfigError(f"tp ({tp}) must divide the number of processes ({world})")
    if gpus_per_node is not None and gpus_per_node % tp:
        raise ConfigError(f"tp ({tp}) must divide gpus_per_node ({gpus_per_node}): a TP group stays on NVLink")
    check_model_split(run.model, tp)
    dp = data_parallel_size(world, tp)
    accum = run.train.gradient_accumulation_steps
    if accum % dp:
        raise ConfigError(f"gradient_accumulation_steps ({accum}) must be divisible by the data-parallel size "
                          f"({dp} = {world} processes / tp {tp})")
    return dp


def layout_numbers(run: RunConfig, world: int, *, tp: int | None = None,
                   gpus_per_node: int | None = None) -> ParallelLayout:
    """Rank 0's layout in a world of `world` processes, checked, without process groups (mpu None): the
    derived numbers, for build_layout and for the planner's hypothetical cluster."""
    tp = run.train.tp if tp is None else tp
    dp = check_layout(run, world, tp=tp, gpus_per_node=gpus_per_node)
    return ParallelLayout(world=world, rank=0, tp=tp, tp_rank=0, dp_size=dp, dp_rank=0,
                          accum=run.train.gradient_accumulation_steps // dp, mpu=None)


def build_layout(run: RunConfig, world: int, rank: int) -> ParallelLayout:
    """Validate, then create megatron-core's TP x DP groups when tp > 1 (collective)."""
    numbers = layout_numbers(run, world)
    if numbers.tp == 1:
        return replace(numbers, rank=rank, dp_rank=rank)
    from letngpt.parallel.tensor_parallel import MegatronMPU, initialize_tp

    initialize_tp(numbers.tp)
    mpu = MegatronMPU()
    assert mpu.get_data_parallel_world_size() == numbers.dp_size  # megatron's groups follow the same rule
    return replace(numbers, rank=rank, tp_rank=mpu.get_model_parallel_rank(), dp_rank=mpu.get_data_parallel_rank(),
                   mpu=mpu)
