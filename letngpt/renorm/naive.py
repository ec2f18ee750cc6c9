"""Renormalising nGPT weights where DeepSpeed actually keeps them.

Under ZeRO the optimizer updates fp32 master copies (flat partitions spread over the
data-parallel ranks) and copies them into the model's weights at the NEXT step, so
normalising only `model.parameters()` is silently undone (DeepSpeed issue 2424). This is
the simple method: gather each full fp32 master tensor, normalise it, write back this
rank's fragment of the master AND the compute weight. Its cost is one gather per matrix;
the trainer uses letngpt.renorm.collective (a single all-reduce of row norms) and keeps this
one (`--renorm=naive`) as the reference the tests compare against.

Limit: at ZeRO 0 with bf16/fp16 DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters that
safe_get_full_fp32_param cannot see, so this method normalises only the compute weights
there; the collective method handles that case.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from letngpt.model import at_least_fp32, normalize_weights_, unit


def _zero3_params_context(params: list[nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@torch.no_grad()
def renormalize_engine_weights_(engine) -> None:
    """Project every nGPT matrix onto the sphere after an applied optimizer step, at any
    ZeRO stage. Collective under ZeRO: every rank must call it, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    model = engine.module
    axes = model.unit_norm_axes()
    if not axes:
        return
    params = dict(model.named_parameters())
    zero_stage = engine.zero_optimization_stage()
    if zero_stage == 0 and not engine.bfloat16_enabled() and not engine.fp16_enabled():
        normalize_weights_(model)  # no master copy: the weights are what the optimizer updates
        return
    for name, dim in axes.items():
        p = params[name]
        master = safe_get_full_fp32_param(p)
        if master is None:  # not managed by a ZeRO/mixed-precision optimizer
            p.copy_(unit(at_least_fp32(p), dim=dim).to(p.dtype))
            continue
        normed = unit(master.float(), dim=dim)
        safe_set_full_fp32_param(p, normed)
        if hasattr(p, "ds_id"):  # ZeRO-3: the compute weight is partitioned too
            with _zero3_params_context([p]):  # every rank holds `normed`; the modifier's copy is kept
                p.data.copy_(normed.to(p.dtype))
        else:
            p.data.copy_(normed.to(p.dtype))
