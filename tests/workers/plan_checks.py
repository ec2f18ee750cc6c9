"""Under torchrun with 2 ranks: what DeepSpeed really allocates and sends, for letngpt.tools.plan to be
checked against. For ZeRO 1, 2, 3 (fp32, CPU, data parallel over both ranks): the bytes of this
rank's parameters (ZeRO 3: its partition), of the optimizer's fp32 master partition and of Adam's
moments after one step; the payload of the collectives of one step (the trainer's train_step: forward +
backward + engine.step per micro batch, counted by letngpt.parallel.comm_counter.CommCounter) and,
apart, of its last stage, the renormalisation. Engines and layouts are the trainer's
(tests/workers/production.py). Then, at TP=2, each rank's parameter count. Writes the JSON report
given as argv[1] (rank 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from production import build

from letngpt.config import ModelConfig, RunConfig, TrainConfig
from letngpt.model import build_model
from letngpt.parallel.comm_counter import CommCounter
from letngpt.parallel.distributed import DistInfo, init_distributed, shutdown
from letngpt.parallel.layout import build_layout
from letngpt.train.trainer import train_step

# n_embd 256: some matrices exceed ZeRO 3's persistence threshold (1e5 elements), some do not.
CFG = dict(vocab_size=512, block_size=32, n_layer=2, n_head=4, n_embd=256, num_maps=3, use_ngpt=True)
ACCUM = 4  # 2 micro batches per rank: per-micro-batch collectives show as such


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def master_partitions(opt) -> list[torch.Tensor]:
    """DeepSpeed's fp32 master partitions (the ZeRO 1/2 and ZeRO 3 optimizers name them differently)."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    raise AttributeError(f"no fp32 partitions on {type(opt).__name__}")


def micro_batch(_micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(CFG["vocab_size"], (2, CFG["block_size"] + 1), generator=torch.Generator().manual_seed(0))
    return x[:, :-1], x[:, 1:]


def measure(stage: int, info: DistInfo) -> dict:
    train = TrainConfig(zero_stage=stage, batch_size=2, gradient_accumulation_steps=ACCUM, learning_rate=1e-3,
                        dtype="float32", device="cpu", seed=0)
    built = build(ModelConfig(**CFG), train, info)
    engine = built.engine
    for n in (1, 2):  # count the second optimizer step: ZeRO 3 settles its persistent parameters in the first
        renorm_comm = CommCounter()

        def renormalize(engine, counter=renorm_comm) -> None:  # train_step's last stage, counted on its own
            with counter:
                built.renorm(engine)

        with CommCounter() as step_comm:  # (besides ZeRO's: the non-finite guard's one-float all-reduce)
            train_step(engine, built.optimizer, built.guard, renormalize, micro_batch, built.layout.accum, step=n,
                       logging_step=False)
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    opt = engine.optimizer
    moments = [v for state in opt.optimizer.state.values() for k, v in state.items() if k.startswith("exp_avg")]
    return {"param_bytes": tensor_bytes(params), "master_bytes": tensor_bytes(master_partitions(opt)),
            "moment_bytes": tensor_bytes(moments), "step_comm_bytes": step_comm.bytes - renorm_comm.bytes,
            "step_comm_calls": sorted({name for name, _ in step_comm.calls}), "renorm_bytes": renorm_comm.bytes}


def measure_bf16_stage1(info: DistInfo) -> dict:
    """bf16 at ZeRO 1 (DeepSpeed's BF16_Optimizer, gradients accumulated in fp32): the bytes of the
    fp32 gradient buffer and of the fp32 master partition on this rank after one step."""
    train = TrainConfig(zero_stage=1, batch_size=2, gradient_accumulation_steps=ACCUM, learning_rate=1e-3,
                        dtype="bfloat16", device="cpu", seed=0)
    built = build(ModelConfig(**CFG), train, info)
    engine = built.engine
    train_step(engine, built.optimizer, built.guard, built.renorm, micro_batch, built.layout.accum, step=1,
               logging_step=False)
    opt = engine.optimizer
    return {"optimizer": type(opt).__name__, "fp32_grad_bytes": tensor_bytes(opt.fp32_groups_gradients_flat),
            "master_bytes": tensor_bytes(master_partitions(opt)),
            "param_bytes": tensor_bytes(engine.module.parameters())}


def tp_local_params(info: DistInfo) -> int:
    """This rank's TP=2 shard of the model, cut by the layout; no engine (the count is the module's)."""
    run = RunConfig(model=ModelConfig(**CFG), train=TrainConfig(tp=2, gradient_accumulation_steps=ACCUM))
    layout = build_layout(run, info.world_size, info.rank)
    return sum(p.numel() for p in layout.shard(build_model(run.model)).parameters())


def main() -> None:
    info = init_distributed("cpu")
    torch.set_num_threads(1)
    report = {"config": CFG, "accum": ACCUM, "batch_size": 2, "world": dist.get_world_size(),
              "stages": {s: measure(s, info) for s in (1, 2, 3)}, "bf16_stage1": measure_bf16_stage1(info),
              "tp2_local_params": tp_local_params(info)}
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
