"""Under torchrun with 2 ranks: what DeepSpeed really allocates and sends, for letngpt.tools.plan to be
checked against. For ZeRO 1, 2, 3 (fp32, CPU, data parallel over both ranks): the bytes of this
rank's parameters (ZeRO 3: its partition), of the optimizer's fp32 master partition and of Adam's
moments after one step; the payload of the collectives of one step (forward + backward +
engine.step, counted by letngpt.parallel.comm_counter.CommCounter) and of collective_renormalize_. Then, at TP=2,
each rank's parameter count. Writes the JSON report given as argv[1] (rank 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from letngpt.config import ModelConfig, RunConfig, TrainConfig
from letngpt.model import build_model
from letngpt.parallel.comm_counter import CommCounter
from letngpt.parallel.distributed import init_distributed, shutdown
from letngpt.parallel.layout import build_layout
from letngpt.renorm.collective import collective_renormalize_
from letngpt.train.engine import build_engine

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


def measure(stage: int) -> dict:
    torch.manual_seed(0)
    train = TrainConfig(zero_stage=stage, batch_size=2, gradient_accumulation_steps=ACCUM, learning_rate=1e-3,
                        dtype="float32", device="cpu")
    layout = build_layout(RunConfig(model=ModelConfig(**CFG), train=train), dist.get_world_size(), dist.get_rank())
    engine, _, _ = build_engine(build_model(ModelConfig(**CFG)), train, layout, torch.float32)
    x = torch.randint(CFG["vocab_size"], (2, CFG["block_size"] + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # count the second optimizer step: ZeRO 3 settles its persistent parameters in the first
        with CommCounter() as step_comm:
            for _ in range(ACCUM // dist.get_world_size()):
                _, loss = engine(x[:, :-1], x[:, 1:])
                engine.backward(loss)
                engine.step()
        with CommCounter() as renorm_comm:
            collective_renormalize_(engine, layout.dp_group)
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    opt = engine.optimizer
    moments = [v for state in opt.optimizer.state.values() for k, v in state.items() if k.startswith("exp_avg")]
    return {"param_bytes": tensor_bytes(params), "master_bytes": tensor_bytes(master_partitions(opt)),
            "moment_bytes": tensor_bytes(moments), "step_comm_bytes": step_comm.bytes,
            "step_comm_calls": sorted({name for name, _ in step_comm.calls}), "renorm_bytes": renorm_comm.bytes}


def measure_bf16_stage1() -> dict:
    """bf16 at ZeRO 1 (DeepSpeed's BF16_Optimizer, gradients accumulated in fp32): the bytes of the
    fp32 gradient buffer and of the fp32 master partition on this rank after one step."""
    torch.manual_seed(0)
    train = TrainConfig(zero_stage=1, batch_size=2, gradient_accumulation_steps=ACCUM, learning_rate=1e-3,
                        dtype="bfloat16", device="cpu")
    layout = build_layout(RunConfig(model=ModelConfig(**CFG), train=train), dist.get_world_size(), dist.get_rank())
    engine, _, _ = build_engine(build_model(ModelConfig(**CFG)), train, layout, torch.bfloat16)
    x = torch.randint(CFG["vocab_size"], (2, CFG["block_size"] + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(ACCUM // dist.get_world_size()):
        _, loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
    opt = engine.optimizer
    return {"optimizer": type(opt).__name__, "fp32_grad_bytes": tensor_bytes(opt.fp32_groups_gradients_flat),
            "master_bytes": tensor_bytes(master_partitions(opt)),
            "param_bytes": tensor_bytes(engine.module.parameters())}


def tp_local_params() -> int:
    from letngpt.parallel.tensor_parallel import initialize_tp, parallelize_tp

    initialize_tp(2)
    torch.manual_seed(0)
    return sum(p.numel() for p in parallelize_tp(build_model(ModelConfig(**CFG)), 2).parameters())


def main() -> None:
    init_distributed("cpu")
    torch.set_num_threads(1)
    report = {"config": CFG, "accum": ACCUM, "batch_size": 2, "world": dist.get_world_size(),
              "stages": {s: measure(s) for s in (1, 2, 3)}, "bf16_stage1": measure_bf16_stage1(),
              "tp2_local_params": tp_local_params()}
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
