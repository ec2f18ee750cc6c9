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

import torch.nn as nn


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Compile every block of a LETnGPT (or its TP-sharded form) in place."""
    for block in model.blocks:
        block.compile(backend=backend)


def blocks_compiled(model: nn.Module) -> bool:
    """Whether compile_blocks ran on `model` (nn.Module.compile leaves a compiled call behind)."""
    return all(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)
