"""Capacity planner: memory per GPU, communication and time per step before burning an allocation.

    python -m letngpt.tools.plan --config LETNGPT_4kctx_10k_lr30e-4 --nodes 4 --gpus_per_node 8 --tp 2 \\
        --zero_stage 1 [--gpu H100-80GB] [--activation_checkpointing] [--mfu 0.4]

Where each figure comes from (all printed beside the result):
- model states: DeepSpeed's own `estimate_zero2_model_states_mem_needs` / `estimate_zero3_...` give
  the per-GPU total at ZeRO 2 / 3 (bf16, no offload; their 2 + 18/N bytes per parameter); the split
  into parameters / gradients / optimizer follows the same accounting, which also covers ZeRO 0 / 1,
  for which DeepSpeed has no estimator. N is the data-parallel size: ZeRO partitions over it only.
- activations: MEASURED, not modelled: one forward of this very model at a short context on CPU
  with autograd's saved-tensor hooks counting what backward keeps, per token, per block and for the
  embedding/head/loss; then scaled to the micro batch. Under TP, what the attention / MLP keep is
  divided by tp except their (replicated) inputs; the sphere steps and norms are replicated.
- FLOPs: letngpt.model.flops (PaLM convention, causal attention counted as half; +1 forward per step with
  activation checkpointing).
- communication: payloads of the TP all-reduces (megatron: 2 per block forward, 5 backward, embedding
  and head), ZeRO's collectives and the renormalisation's one all-reduce; wire bytes per GPU use ring
  algorithms (all-reduce 2(n-1)/n, reduce-scatter and all-gather (n-1)/n of the payload).
- time: compute = FLOPs / (peak x MFU); communication at the stated bandwidths, not overlapped.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from letngpt.config import ConfigError, ModelConfig, RunConfig
from letngpt.model.flops import PEAK_TFLOPS, flops_per_token
from letngpt.parallel.layout import ParallelLayout, data_parallel_size, layout_numbers

GiB = 1024**3
# name -> (memory GiB, key into letngpt.model.flops.PEAK_TFLOPS: dense bf16)
GPUS = {"H100-80GB": (80, "H100"), "H200-141GB": (141, "H200"), "A100-80GB": (80, "A100"),
        "A100-40GB": (40, "A100"), "B200-192GB": (192, "B200"), "L40S-48GB": (48, "L40S")}


class PlanError(ConfigError):
    """A combination that cannot run (or does not fit); one line, exit code 2."""


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    tp: int
    zero_stage: int
    gpu: str = "H100-80GB"
    mfu: float = 0.40
    intra_gbs: float = 450.0  # NVLink 4 (H100 SXM), GB/s per GPU per direction
    inter_gbs: float = 50.0  # one 400 Gb/s InfiniBand NIC per GPU
    overhead_gib: float = 3.0  # CUDA context, NCCL buffers, allocator slack
    activation_checkpointing: bool = False
    mfu_source: str = "assumed; bench/gpu_check.sh measures it: --mfu or --mfu_from"

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return data_parallel_size(self.world, self.tp)


def check(run: RunConfig, c: Cluster) -> ParallelLayout:
    """Every combination that cannot run, in one line: the cluster's own limits here, the layout's rules
    (letngpt.parallel.layout, the trainer's) for this cluster's world and nodes. Returns the layout's
    numbers (dp, micro batches per DP rank) for that cluster."""
    if c.gpu not in GPUS:
        raise PlanError(f"unknown --gpu {c.gpu!r}; one of {', '.join(GPUS)}")
    if min(c.nodes, c.gpus_per_node, c.tp) < 1 or not 0 < c.mfu <= 1:
        raise PlanError("--nodes, --gpus_per_node and --tp must be >= 1 and --mfu in (0, 1]")
    if c.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"--zero_stage ({c.zero_stage}) must be 0, 1, 2 or 3")
    try:
        return layout_numbers(run, c.world, tp=c.tp, gpus_per_node=c.gpus_per_node)
    except ConfigError as e:
        raise PlanError(str(e)) from None


def local_params(cfg: ModelConfig, tp: int) -> int:
    """Parameters on one TP rank, from the TP layout's own table (letngpt.parallel.tensor_parallel.TP_PLAN):
    a split parameter contributes 1/tp, a replicated one all of it."""
    import torch

    from letngpt.model import build_model
    from letngpt.parallel.tensor_parallel import tp_split_dim

    with torch.device("meta"):
        model = build_model(cfg)
    return sum(p.numel() if tp_split_dim(n) is None else p.numel() // tp for n, p in model.named_parameters())


def model_states(params: int, largest: int, dp: int, stage: int, weight_bytes: int = 2) -> dict:
    """Bytes per GPU with DeepSpeed's mixed-precision accounting: weights (`weight_bytes`: 2 in bf16),
    gradients in the same precision plus a 4-byte fp32 gradient buffer (bf16 only), and the
    optimizer's fp32 master copy (4) and Adam moments (8). ZeRO 1 partitions the fp32 master and
    moments over the N data-parallel ranks, ZeRO 2 the gradients too, ZeRO 3 the weights too (plus the
    largest layer gathered whole while it runs). The fp32 gradient buffer is whole on every rank
    below ZeRO 2 (measured: DeepSpeed's BF16_Optimizer, which ZeRO 1 in bf16 runs, allocates it
    like the flat bf16 weights; tests/test_plan.py). At ZeRO 2 / 3 in bf16 the total is DeepSpeed's
    own estimator's."""
    w, g, o = (dp if stage >= s else 1 for s in (3, 2, 1))
    fp32_grad = 4 if weight_bytes == 2 else 0
    out = {"parameters": weight_bytes * params // w,
           "gradients": (weight_bytes + fp32_grad) * params // g,
           "optimizer": 12 * params // o,
           "gathered": 2 * weight_bytes * largest if stage == 3 else 0}
    out["total"] = out["sum_of_parts"] = sum(out.values())
    out["source"] = "letngpt.tools.plan (DeepSpeed has no estimator for ZeRO 0/1)"
    if weight_bytes == 2 and stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, out["total"] = estimate_zero2_model_states_mem_needs(params, dp, 1, cpu_offload=False)
        out["source"] = "deepspeed estimate_zero2_model_states_mem_needs(cpu_offload=False)"
    elif weight_bytes == 2 and stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, out["total"], _ = estimate_zero3_model_states_mem_needs(params, largest, dp, 1, cpu_offload=False,
                                                                cpu_offload_params=False)
        out["source"] = "deepspeed estimate_zero3_model_states_mem_needs(cpu_offload=False)"
    return out


def _tag_regions(model) -> tuple[list, list]:
    """Forward hooks marking when an attention or MLP module runs, and its input (which megatron's
    column-parallel layers keep whole on every TP rank)."""
    region: list = []
    handles = []
    for block in model.blocks:
        for mod in (block.attn, block.mlp):
            handles.append(mod.register_forward_pre_hook(lambda m, args: region.append(args[0])))
            handles.append(mod.register_forward_hook(lambda m, args, out: region.pop()))
    return region, handles


def saved_bytes(cfg: ModelConfig, tokens: int = 32) -> dict:
    """What autograd keeps for backward after one bf16 forward of `cfg`'s model at `tokens` tokens,
    split into bytes that a TP split divides (inside attention / MLP, vocabulary-wide) and bytes it
    replicates. Counted once per storage; parameters excluded."""
    import torch

    from letngpt.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    region, handles = _tag_regions(model)
    seen: dict[int, tuple[int, bool]] = {}
    alive: list[torch.Tensor] = []  # storages are told apart by address: none may be freed and reused meanwhile

    def pack(t: torch.Tensor) -> torch.Tensor:
        alive.append(t)
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            inside = bool(region) and ptr != region[-1].untyped_storage().data_ptr()
            seen[ptr] = (t.untyped_storage().nbytes(), inside or (t.dim() > 0 and t.shape[-1] == cfg.vocab_size))
        return t

    idx = torch.zeros((1, tokens), dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        alive.append(model(idx, idx)[1])
    for h in handles:
        h.remove()
    return {"split": sum(n for n, s in seen.values() if s), "whole": sum(n for n, s in seen.values() if not s)}


_MEASURED: dict[str, dict] = {}


def activation_bytes_per_token(cfg: ModelConfig, tokens: int = 32) -> dict:
    """Cached per architecture (a table of many clusters measures each model once)."""
    key = f"{cfg!r}/{tokens}"
    if key not in _MEASURED:
        _MEASURED[key] = _measure_per_token(cfg, tokens)
    return _MEASURED[key]


def _measure_per_token(cfg: ModelConfig, tokens: int) -> dict:
    """Per token: one block's saved bytes (split / whole under TP) and the rest's (embedding, head, loss),
    from models of 1 and 2 blocks (the block from a small vocabulary, the rest at the real one)."""
    import dataclasses

    small = dataclasses.replace(cfg, vocab_size=256, block_size=tokens)
    one, two = saved_bytes(dataclasses.replace(small, n_layer=1), tokens), saved_bytes(
        dataclasses.replace(small, n_layer=2), tokens)
    full1 = saved_bytes(dataclasses.replace(cfg, n_layer=1, block_size=tokens), tokens)
    block = {k: (two[k] - one[k]) / tokens for k in one}
    rest = {k: full1[k] / tokens - block[k] for k in one}
    return {"block": block, "rest": rest, "probe_tokens": tokens}


def activations(run: RunConfig, c: Cluster) -> dict:
    """Bytes per GPU for one micro batch (the peak: backward starts after the whole forward)."""
    per = activation_bytes_per_token(run.model)
    tokens = run.train.batch_size * run.model.block_size
    block = tokens * (per["block"]["whole"] + per["block"]["split"] / c.tp)
    rest = tokens * (per["rest"]["whole"] + per["rest"]["split"] / c.tp)
    layers = run.model.n_layer
    if c.activation_checkpointing:  # each block keeps its input; one block is live again in backward
        kept = layers * tokens * run.model.n_embd * 2 + block
    else:
        kept = layers * block
    return {"total": int(kept + rest), "per_block": int(block), "head_and_loss": int(rest),
            "per_token_block_bytes": per["block"], "probe_tokens": per["probe_tokens"]}


def renorm_rows(cfg: ModelConfig, tp: int) -> int:
    """Norms all-reduced by letngpt.renorm.collective per step: one per normalised row / column of
    every nGPT matrix on this TP rank (the embedding axis is never split, the other one is)."""
    import torch

    from letngpt.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    params = dict(model.named_parameters())
    return sum(params[name].shape[1 - dim] // tp for name, dim in model.unit_norm_axes().items())


# DeepSpeed ZeRO 3 defaults (zero_optimization.param_persistence_threshold / max_reuse_distance, elements)
PERSISTENCE_THRESHOLD, MAX_REUSE_DISTANCE = 100_000, 1_000_000_000


def zero_collectives(stage: int, micro: int, params: int, persistent: int, wb: int) -> dict:
    """Payload bytes of one optimizer step's ZeRO collectives, as DeepSpeed issues them (counted on CPU
    ranks in tests/test_plan.py): ZeRO 0 and 1 all-reduce the gradients once per step, ZeRO 2 once per
    micro batch; ZeRO 1 and 2 then all-gather the updated weights. ZeRO 3 gathers each weight above the
    persistence threshold once per micro batch (twice when the model exceeds max_reuse_distance, so
    that backward must gather again), reduce-scatters the gradients per micro batch, and gathers the
    small persistent weights once after the step. Returns payload and ring wire factors' sum."""
    grads = wb * params
    if stage in (0, 1, 2):
        reduces = micro if stage == 2 else 1
        gather = grads if stage else 0
        return {"collective": f"all-reduce of gradients x{reduces}" + (", all-gather of weights x1" if stage else ""),
                "payload": reduces * grads + gather, "allreduce_payload": reduces * grads}
    per_micro = 2 if params > MAX_REUSE_DISTANCE else 1
    gathers = micro * per_micro * wb * (params - persistent) + wb * persistent
    return {"collective": f"all-gather of weights x{micro * per_micro} (persistent ones x1), "
                          f"reduce-scatter of gradients x{micro}",
            "payload": gathers + micro * grads, "allreduce_payload": 0}


def communication(run: RunConfig, c: Cluster, layout: ParallelLayout, params: int, persistent: int,
                  wb: int = 2) -> dict:
    """Payload bytes per GPU per optimizer step, and wire bytes per GPU (ring algorithms) with the link used."""
    m, train_cfg = run.model, run.train
    micro = layout.accum
    act = train_cfg.batch_size * m.block_size * m.n_embd * wb  # one [B, T, d] activation
    tp = {"payload": 0, "wire": 0.0}
    if c.tp > 1:  # per micro batch: blocks 2 forward (+2 recomputed) + 5 backward, embedding, head, loss
        per_block = 2 + 5 + (2 if c.activation_checkpointing else 0)
        payload = micro * ((per_block * m.n_layer + 2) * act + 3 * train_cfg.batch_size * m.block_size * 4)
        tp = {"payload": payload, "wire": payload * 2 * (c.tp - 1) / c.tp, "collective": "all-reduce",
              "link": "intra-node"}
    n = layout.dp_size
    ring = (n - 1) / n
    zero = zero_collectives(c.zero_stage, micro, params, persistent, wb) if n > 1 else {
        "collective": "none (dp 1)", "payload": 0, "allreduce_payload": 0}
    zero["wire"] = ring * (zero["payload"] + zero.pop("allreduce_payload"))  # all-reduce: twice the ring traffic
    zero["link"] = "inter-node" if c.nodes > 1 and n > 1 else "intra-node"
    rows = renorm_rows(m, c.tp) if m.use_ngpt and c.zero_stage >= 1 and n > 1 else 0
    renorm = {"collective": "one all-reduce of fp32 row norms", "payload": 4 * rows, "wire": 2 * ring * 4 * rows,
              "link": zero["link"]}
    return {"tp": tp, "zero": zero, "renorm": renorm}


def seconds(nbytes: float, link: str, c: Cluster) -> float:
    return nbytes / ((c.inter_gbs if link == "inter-node" else c.intra_gbs) * 1e9)


def capacity(run: RunConfig, c: Cluster) -> dict:
    """Every figure of the plan as a dict (the CLI prints it; tests and the README table read it)."""
    import torch

    from letngpt.model import build_model

    layout = check(run, c)
    m, train_cfg = run.model, run.train
    params = local_params(m, c.tp)
    with torch.device("meta"):
        sizes = [p.numel() // c.tp for p in build_model(m).parameters()]
    largest, persistent = max(sizes), sum(n for n in sizes if n <= PERSISTENCE_THRESHOLD)
    states = model_states(params, largest, layout.dp_size, c.zero_stage)
    acts = activations(run, c)
    need = states["total"] + acts["total"] + c.overhead_gib * GiB
    capacity = GPUS[c.gpu][0] * GiB
    tokens = train_cfg.batch_size * m.block_size * train_cfg.gradient_accumulation_steps
    recompute = 4 / 3 if c.activation_checkpointing else 1.0  # one more forward per step
    flops = flops_per_token(m) * tokens * recompute
    peak = PEAK_TFLOPS[GPUS[c.gpu][1]] * 1e12
    compute_s = flops / c.world / (peak * c.mfu)
    comm = communication(run, c, layout, params, persistent)
    comm_s = {k: seconds(v["wire"], v.get("link", "intra-node"), c) for k, v in comm.items()}
    step_s = compute_s + sum(comm_s.values())
    return {"run": run.name, "cluster": c.__dict__ | {"world": c.world, "dp": c.dp},
            "params_per_gpu": params, "model_states": states, "activations": acts,
            "memory_needed": int(need), "memory_capacity": capacity, "fits": need <= capacity,
            "flops_per_step": flops, "compute_s": compute_s, "comm": comm, "comm_s": comm_s, "step_s": step_s,
            "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
            "hours_to_max_iters": step_s * train_cfg.max_iters / 3600, "max_iters": train_cfg.max_iters,
            "peak_tflops": peak / 1e12}


def _gb(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def format_capacity(p: dict) -> str:
    """The plan as lines of `quantity: value   [assumption / source]`."""
    c, st, act, comm = p["cluster"], p["model_states"], p["activations"], p["comm"]
    per_block = act["per_token_block_bytes"]["split"] + act["per_token_block_bytes"]["whole"]
    lines = [
        f"plan for {p['run']} on {c['nodes']} node(s) x {c['gpus_per_node']} {c['gpu']} = {c['world']} GPUs: "
        f"tp {c['tp']} x dp {c['dp']}, ZeRO {c['zero_stage']}, activation checkpointing "
        f"{'on' if c['activation_checkpointing'] else 'off'} (ESTIMATES)",
        "memory per GPU:",
        f"  parameters          {_gb(st['parameters']):>14}   [{p['params_per_gpu']:,} params on this TP rank, bf16]",
        f"  gradients           {_gb(st['gradients']):>14}   [bf16 + fp32 partition]",
        f"  optimizer states    {_gb(st['optimizer']):>14}   [fp32 master + Adam m, v; ZeRO partitions over dp]",
    ]
    if st["gathered"]:
        lines.append(f"  gathered layer      {_gb(st['gathered']):>14}   [ZeRO 3: largest layer whole]")
    lines += [
        f"  model states total  {_gb(st['total']):>14}   [{st['source']}]",
        f"  activations         {_gb(act['total']):>14}   [one micro batch; measured {per_block:,.0f} B/token/block"
        f" on CPU at {act['probe_tokens']} tokens, bf16]",
        f"  overhead            {_gb(c['overhead_gib'] * GiB):>14}   [assumed: CUDA context, NCCL, allocator]",
        f"  needed / capacity   {_gb(p['memory_needed'])} / {_gb(p['memory_capacity'])}: "
        f"{'fits' if p['fits'] else 'DOES NOT FIT'}",
        "per optimizer step:",
        f"  FLOPs               {p['flops_per_step']:.3e}   [letngpt.model.flops, {p['tokens_per_step']:,} tokens"
        f"{', +1 forward (recompute)' if c['activation_checkpointing'] else ''}]",
    ]
    for key, name in (("tp", "TP all-reduces"), ("zero", "ZeRO collectives"), ("renorm", "renorm all-reduce")):
        v = comm[key]
        detail = f"{v.get('collective', 'none (tp 1)')}, {v.get('link', '-')}"
        lines.append(f"  {name:<19} {v['payload'] / 1e9:>10.3f} GB payload, {v['wire'] / 1e9:.3f} GB on the wire "
                     f"per GPU, {p['comm_s'][key] * 1e3:.1f} ms   [{detail}]")
    lines += [
        f"  compute             {p['compute_s']:.3f} s   [peak {p['peak_tflops']:.0f} TFLOP/s x MFU {c['mfu']:.0%} "
        f"({c['mfu_source']})]",
        f"  step time           {p['step_s']:.3f} s   [compute + communication, no overlap assumed; links: "
        f"intra-node {c['intra_gbs']:.0f} GB/s (NVLink), inter-node {c['inter_gbs']:.0f} GB/s per GPU (400 Gb/s IB)]",
        f"  tokens/s            {p['tokens_per_s']:,.0f}",
        f"  time to {p['max_iters']:,} steps {p['hours_to_max_iters']:.1f} h",
    ]
    return "\n".join(lines)


TABLE_PRESETS = ("LETNGPT_1kctx_10k_lr30e-4", "LETNGPT_4kctx_10k_lr30e-4")


def table(gpu: str = "H100-80GB", zero_stage: int = 1) -> str:
    """README's table: the LET-nGPT 1k and 4k presets on 1, 4 and 16 nodes of 8 GPUs at TP 1 and 2."""
    import dataclasses

    from letngpt.presets import get_config

    head = "| preset | nodes x GPUs | TP x DP | model states GiB | activations GiB | fits 80 GiB | step s | " \
           "tokens/s | h to 10k |"
    rows = [head, "|" + "---|" * 9]
    for name in TABLE_PRESETS:
        for nodes in (1, 4, 16):
            for tp in (1, 2):
                c = Cluster(nodes, 8, tp, zero_stage, gpu)
                label = f"| {name} | {nodes} x 8 | {tp} x {c.dp} |"
                try:
                    p = capacity(get_config(name), c)
                except ConfigError as e:
                    rows.append(f"{label} {e} ||||||")
                    continue
                if not p["fits"]:  # the remedy the planner suggests first
                    p = capacity(get_config(name), dataclasses.replace(c, activation_checkpointing=True))
                ckpt = " (ckpt)" if p["cluster"]["activation_checkpointing"] else ""
                rows.append(f"{label} {p['model_states']['total'] / GiB:.1f} | {p['activations']['total'] / GiB:.1f}"
                            f"{ckpt} | {'yes' if p['fits'] else 'no'} | {p['step_s']:.2f} | {p['tokens_per_s']:,.0f} | "
                            f"{p['hours_to_max_iters']:.1f} |")
    return "\n".join(rows)


def measured_mfu(summary_path: str, preset: str) -> float:
    """The eager MFU bench/gpu_check.sh measured for `preset` (its summary.json), or a one-line error."""
    import json
    from pathlib import Path

    try:
        presets = json.loads(Path(summary_path).read_text())["presets"]
    except (OSError, ValueError, KeyError) as e:
        raise PlanError(f"--mfu_from {summary_path}: not a gpu_check summary.json ({e})") from None
    mfu = presets.get(preset, {}).get("mfu")
    if not mfu:
        raise PlanError(f"--mfu_from {summary_path}: no measured MFU for {preset} (measured: "
                        f"{', '.join(n for n, r in presets.items() if r.get('mfu')) or 'none'})")
    return float(mfu)


def parse_args(argv: list[str]) -> tuple[RunConfig, Cluster]:
    from letngpt.presets import get_config

    ap = argparse.ArgumentParser(prog="python -m letngpt.tools.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a preset (python train.py --list-configs)")
    for name, default in (("nodes", 1), ("gpus_per_node", 8), ("tp", 1), ("zero_stage", 1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--gpu", default="H100-80GB", help=f"one of {', '.join(GPUS)}")
    ap.add_argument("--activation_checkpointing", action="store_true")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation (bench/gpu_check.sh measures it)")
    ap.add_argument("--mfu_from", default="", help="bench/gpu_check.sh's summary.json: use the MFU it measured "
                    "for --config (overrides --mfu)")
    ap.add_argument("--intra_gbs", type=float, default=450.0, help="GB/s per GPU within a node (NVLink 4)")
    ap.add_argument("--inter_gbs", type=float, default=50.0, help="GB/s per GPU between nodes (400 Gb/s IB)")
    ap.add_argument("--overhead_gib", type=float, default=3.0)
    ap.add_argument("--batch_size", type=int, default=0, help="micro batch (0: the preset's)")
    ap.add_argument("--gradient_accumulation_steps", type=int, default=0, help="global total (0: the preset's)")
    a = ap.parse_args(argv)
    run = get_config(a.config)
    source = Cluster.mfu_source
    if a.mfu_from:
        a.mfu, source = measured_mfu(a.mfu_from, a.config), f"measured, {a.mfu_from}"
    run.train.batch_size = a.batch_size or run.train.batch_size
    run.train.gradient_accumulation_steps = a.gradient_accumulation_steps or run.train.gradient_accumulation_steps
    return run, Cluster(a.nodes, a.gpus_per_node, a.tp, a.zero_stage, a.gpu, a.mfu, a.intra_gbs, a.inter_gbs,
                        a.overhead_gib, a.activation_checkpointing, source)


def main(argv: list[str] | None = None) -> int:
    """Print the plan; exit 2 with one line for a combination that cannot run or does not fit."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--table"]:  # README's table, with the defaults' assumptions
        print(table())
        return 0
    try:
        run, cluster = parse_args(argv)
        p = capacity(run, cluster)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_capacity(p))
    if not p["fits"]:
        print(f"error: does not fit: needs {_gb(p['memory_needed'])} of {_gb(p['memory_capacity'])} per GPU; try "
              "--activation_checkpointing, a higher --zero_stage or --tp", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
