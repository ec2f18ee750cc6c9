"""Counting what a rank sends: the payload of every collective issued inside a `with` block.

The renormalisation benchmark and the capacity planner's tests compare their byte counts with
this one, so it lives in the package (tests and bench/ import it from here). It wraps
torch.distributed's collectives and the two DeepSpeed caches (its all-gather / reduce-scatter
functions) for the duration of the block, and counts only calls over groups of more than one
rank.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch.distributed as dist

# collective name -> the argument holding its full payload
_PAYLOAD_ARG = {
    "all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor", "all_reduce_coalesced": "tensors",
    "all_gather": "tensor_list", "all_gather_into_tensor": "output_tensor", "_all_gather_base": "output_tensor",
    "reduce_scatter": "input_list", "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input",
    "all_to_all_single": "input",
}


class CommCounter:
    """Within `with CommCounter() as c:`, c.bytes is the payload of every collective this rank
    issues over a group of more than one rank, and c.calls lists (name, bytes) per call."""

    def __init__(self) -> None:
        self.bytes, self.calls, self._undo, self._depth = 0, [], [], 0

    def _wrap(self, name: str, fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            outer = self._depth == 0
            self._depth += 1
            try:
                if outer:
                    bound = sig.bind_partial(*args, **kwargs).arguments
                    if dist.get_world_size(bound.get("group")) > 1:
                        payload = bound[_PAYLOAD_ARG[name]]
                        tensors = payload if isinstance(payload, (list, tuple)) else [payload]
                        n = sum(t.numel() * t.element_size() for t in tensors)
                        self.bytes += n
                        self.calls.append((name, n))
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def _patch(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is not None:
            setattr(owner, attr, self._wrap(name, fn))
            self._undo.append((owner, attr, fn))

    def __enter__(self) -> CommCounter:
        for name in _PAYLOAD_ARG:
            for owner in (dist, dist.distributed_c10d):
                self._patch(owner, name, name)
        cdb = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)  # DeepSpeed caches these two
        if cdb is not None:
            self._patch(cdb, "all_gather_function", "all_gather_into_tensor")
            self._patch(cdb, "reduce_scatter_function", "reduce_scatter_tensor")
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self._undo):
            setattr(owner, attr, fn)
        self._undo.clear()
