"""--compile: regional torch.compile of the transformer blocks.

Each block is compiled on its own (`block.compile()`), not the whole model: the blocks are identical
code with different weights, and torch.compile treats module parameters as graph inputs, so ONE
compiled graph serves all n_layer blocks and compilation costs one block's time instead of the whole
unrolled stack's (6 layers on CPU: 49 s instead of 159 s; it matters on clusters, where every relaunch
compiles again). Inside a block are exactly the chains inductor fuses: nGPT's unit(), sphere_step and
scale vectors, RoPE, the ensemble mix. The embedding, head and loss stay eager (a lookup, one matmul
and the loss kernel: little to fuse). DeepSpeed's wrappers, ZeRO's hooks and the renormalisation of
the fp32 masters stay outside the compiled code, which reads the parameters afresh on every call.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every block of a LETnGPT (or its TP-sharded form) in place."""
    from torch._dynamo import utils as dynamo_utils

    # dynamo keeps the last 64 compilations' records; compile_counts reads them, so keep them all
    getattr(dynamo_utils, "set_compilation_metrics_limit", lambda n: None)(4096)
    for block in model.blocks:
        block.compile(backend=backend)


def blocks_compiled(model: nn.Module) -> bool:
    """Whether compile_blocks ran on `model` (nn.Module.compile leaves a compiled call behind)."""
    return all(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)


def compile_counts() -> dict:
    """What dynamo did in this process so far: graphs compiled, recompilations (a frame compiled again
    because a guard failed: a new shape, type, or grad mode) and graph breaks, with their reasons.

    For logs, the bench and the tests; TORCH_LOGS=recompiles,graph_breaks shows the same with source lines."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    recompiles = [m for m in get_compilation_metrics() if getattr(m, "recompile_reason", None)]
    return {"graphs": int(counters["stats"]["unique_graphs"]), "recompiles": len(recompiles),
            "recompile_reasons": [f"{m.co_name} ({m.co_filename}:{m.co_firstlineno}): {m.recompile_reason}"[:300]
                                  for m in recompiles],
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "graph_break_reasons": dict(counters["graph_break"])}


def compile_notice(n_layer: int, device: torch.device, zero_stage: int = 1) -> str:
    """The line a --compile run logs at start, so that a slow first step is expected, not a mystery."""
    codegen = "Triton kernels" if device.type == "cuda" else "C++ kernels"
    line = (f"--compile: each of the {n_layer} blocks runs torch.compile'd (inductor, {codegen}; one graph serves "
            "every block); the first step includes the compilation (tens of seconds to minutes), and so does the "
            "first evaluation (no_grad is compiled once more)")
    if zero_stage == 3:
        # Measured (tests/test_speed.py): 2 layers, 5 steps: 33 recompilations, 39 graph breaks, losses as eager.
        line += ("; at ZeRO 3 DeepSpeed's parameter-gathering hooks (torch.compiler.disable'd by DeepSpeed) break "
                 "every block's graph at each submodule and recompile it, so little is fused and blocks past "
                 "dynamo's recompile limit run eagerly: prefer --zero_stage=1 or 2 with --compile")
    return line
