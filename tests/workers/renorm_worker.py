"""torchrun worker for tests/test_renorm.py: collective vs naive renormalisation, per ZeRO case.

For each case (e.g. `z2`, `z3:bf16`, `z3:persist=2000`) it builds the trainer's DeepSpeed engine for a
tiny nGPT (tests/workers/production.py: build_layout, build_model_engine) and, after each of a few
optimizer steps on random data (the trainer's train_step):
  1. snapshots the full fp32 masters (the state both methods start from),
  2. runs collective_renormalize_ under a byte counter, gathers full masters + compute weights,
  3. restores the masters, runs the naive letngpt.renorm method, gathers again,
and records the worst differences, unit-norm deviations and byte counts. It also records how
this rank's partitions cut the normalised matrices, and that the axis check fires.
Writes <out>/rank<R>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from production import build

from letngpt.config import ModelConfig, TrainConfig
from letngpt.model import unit
from letngpt.parallel.comm_counter import CommCounter
from letngpt.parallel.distributed import DistInfo, init_distributed, shutdown
from letngpt.renorm.collective import collective_renormalize_, full_fp32_masters
from letngpt.renorm.naive import renormalize_engine_weights_
from letngpt.train.engine import DS_CONFIG_DIR
from letngpt.train.trainer import train_step

# 3 layers, 131 tokens, n_embd 32: ZeRO 1/2 partitions at DP=4 cut normalised rows mid-row (and a
# dim-0 matrix mid-memory-row), ZeRO 3 cuts wte's rows mid-row at DP=2 (131 * 32 / 2 = 65.5 rows).
# (At DP=2, ZeRO 1/2 can only cut at a row boundary: every matrix of this model family has an even
# number of n_embd-long rows, so half the flat group is a whole number of rows.)
MODEL = ModelConfig(vocab_size=131, block_size=16, n_layer=3, n_head=2, n_embd=32, num_maps=3, use_ngpt=True)
TP_MODEL = ModelConfig(vocab_size=130, block_size=16, n_layer=2, n_head=2, n_embd=32, num_maps=3, use_ngpt=True)


def full_master_views(engine) -> dict:
    """ZeRO 0 with DeepSpeed's fp16/bf16 optimizer: id(param) -> its full fp32 master."""
    mixed = engine.bfloat16_enabled() or engine.fp16_enabled()
    return full_fp32_masters(engine.optimizer) if engine.zero_optimization_stage() == 0 and mixed else {}


def masters_and_compute(engine, params: dict) -> tuple[dict, dict]:
    """Full fp32 masters and full compute weights of every normalised matrix (gathered where split)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    views, masters, compute = full_master_views(engine), {}, {}
    for name, p in params.items():
        master = views[id(p)] if id(p) in views else safe_get_full_fp32_param(p)
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                compute[name] = p.detach().float().clone()
        else:
            compute[name] = p.detach().float().clone()
        masters[name] = compute[name] if master is None else master.float().clone()
    return masters, compute


@torch.no_grad()
def restore_masters(engine, params: dict, masters: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    views = full_master_views(engine)
    for name, p in params.items():
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, masters[name])
        elif id(p) in views:
            views[id(p)].copy_(masters[name])
        else:  # ZeRO 0 in fp32: the weight is the master
            p.copy_(masters[name])


def partition_cuts(engine, params: dict, dims: dict) -> list[dict]:
    """Which elements [start, start + numel) of each normalised matrix this rank's fp32 partition holds."""
    out = []
    for name, p in params.items():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if hasattr(p, "ds_id"):
            size = p.partition_numel()
            start = dist.get_rank(group=p.ds_process_group) * size
            numel = max(0, min(size, p.ds_numel - start))
        elif getattr(p, "_hp_mapping", None) is not None:
            start, numel = p._hp_mapping.lp_fragment_address.start, p._hp_mapping.lp_fragment_address.numel
        else:
            continue
        total = shape[0] * shape[1]
        split = 0 < numel < total
        mid_row = split and bool(start % shape[1] or (start + numel < total and (start + numel) % shape[1]))
        out.append({"name": name, "dim": dims[name], "shape": shape, "start": start, "numel": numel,
                    "split": split, "mid_row": mid_row})
    return out


def axis_check_fires(engine, params: dict, dp_group) -> dict:
    """The n_embd / TP assumption must raise before any communication."""
    fired = {}
    module = engine.module
    module.unit_norm_axes = lambda: {"blocks.0.mlp.fc_u.weight": 0}  # fc_u is (4 n_embd, n_embd)
    try:
        collective_renormalize_(engine, dp_group)
        fired["wrong_axis"] = False
    except ValueError:
        fired["wrong_axis"] = True
    finally:
        del module.unit_norm_axes
    p = params["blocks.0.attn.query.weight"]
    p.tensor_model_parallel, p.partition_dim = True, 1  # pretend TP shards its normalised axis
    try:
        collective_renormalize_(engine, dp_group)
        fired["tp_sharded_axis"] = False
    except ValueError:
        fired["tp_sharded_axis"] = True
    finally:
        del p.tensor_model_parallel, p.partition_dim
    return fired


def run_case(case: str, steps: int, info: DistInfo, tmp: Path) -> dict:
    t0 = time.perf_counter()
    stage, *opts = case.split(":")
    opts = dict(o.split("=") if "=" in o else (o, "1") for o in opts)
    ds_config = ""
    if "persist" in opts:  # ZeRO 3 keeps params under this many elements gathered ("persistent")
        cfg = json.loads((DS_CONFIG_DIR / f"zero{stage[1:]}.json").read_text())
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = int(opts["persist"])
        ds_config = str(tmp / f"{case.replace(':', '_')}_rank{dist.get_rank()}.json")
        Path(ds_config).write_text(json.dumps(cfg))
    tp = int(opts.get("tp", 1))  # megatron TP x DP; must be the last cases (DeepSpeed keeps the mpu globally)
    train = TrainConfig(zero_stage=int(stage[1:]), batch_size=2, gradient_accumulation_steps=info.world_size // tp,
                        learning_rate=2e-2, weight_decay=0.1, grad_clip=1.0, device="cpu",
                        dtype="bfloat16" if "bf16" in opts else "float32", ds_config=ds_config, tp=tp, seed=1234)
    built = build(TP_MODEL if tp > 1 else MODEL, train, info)
    engine, dp_rank = built.engine, built.layout.dp_rank
    dims = engine.module.unit_norm_axes()
    named = dict(engine.module.named_parameters())
    params = {name: named[name] for name in dims}
    expected_bytes = 4 * sum(tuple(getattr(p, "ds_shape", p.shape))[1 - dims[n]] for n, p in params.items())
    gen = torch.Generator().manual_seed(100 + dp_rank)  # TP ranks of a group see the same batch
    result = {"case": case, "optimizer": type(engine.optimizer).__name__, "expected_bytes": expected_bytes,
              "cuts": partition_cuts(engine, params, dims), "steps": []}
    for n in range(1, steps + 1):
        x = torch.randint(engine.module.config.vocab_size, (train.batch_size, MODEL.block_size + 1), generator=gen)
        # train_step with an empty renormalisation stage: both methods run below, by hand, from one snapshot
        loss, _, applied = train_step(engine, built.optimizer, built.guard, lambda _engine: None,
                                      lambda _m, x=x: (x[:, :-1], x[:, 1:]), built.layout.accum, step=n,
                                      logging_step=False)
        assert applied
        before, _ = masters_and_compute(engine, params)
        with CommCounter() as counter:
            returned = collective_renormalize_(engine, built.layout.dp_group)
        coll_m, coll_c = masters_and_compute(engine, params)
        restore_masters(engine, params, before)
        renormalize_engine_weights_(engine)
        ref_m, ref_c = masters_and_compute(engine, params)
        exact = {n: unit(before[n], dim=dims[n]) for n in params}  # what both methods should give
        exact_c = {n: exact[n].to(p.dtype).float() for n, p in params.items()}

        def worst(a: dict, b: dict) -> float:
            return max(float((a[n] - b[n]).abs().max()) for n in params)

        def off_sphere(w: dict) -> float:
            return max(float((w[n].norm(dim=dims[n]) - 1).abs().max()) for n in params)

        result["steps"].append({
            "loss": float(loss), "returned_bytes": returned, "measured_bytes": counter.bytes, "calls": counter.calls,
            "master_vs_naive": worst(coll_m, ref_m), "compute_vs_naive": worst(coll_c, ref_c),
            "master_vs_compute": worst(coll_m, coll_c),
            "master_vs_exact": worst(coll_m, exact), "compute_vs_exact": worst(coll_c, exact_c),
            "naive_master_vs_exact": worst(ref_m, exact), "master_changed": worst(coll_m, before),
            "master_off_sphere": off_sphere(coll_m), "compute_off_sphere": off_sphere(coll_c),
            "naive_master_off_sphere": off_sphere(ref_m)})
    # ZeRO 3 keeps "persistent" (small) params gathered: their full copy is refreshed too
    result["persistent"] = [n for n, p in params.items() if getattr(p, "ds_persist", False)]
    result["seconds"] = time.perf_counter() - t0
    if "axis_check" in opts:
        result["axis_check"] = axis_check_fires(engine, params, built.layout.dp_group)
    del engine
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", required=True, help="comma separated, e.g. z0,z1,z2:axis_check,z3:bf16")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_case(case, args.steps, info, out) for case in args.cases.split(",")]
    (out / f"rank{info.rank}.json").write_text(json.dumps({"world_size": info.world_size, "results": results}))
    shutdown()


if __name__ == "__main__":
    main()
