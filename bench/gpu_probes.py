"""Checks gpu_check runs inside its stages, on the GPU it meets: which SDPA kernel PyTorch picks, and
the non-finite guard skipping a bf16 step there (DeepSpeed's BF16_Optimizer at ZeRO 1)."""

from __future__ import annotations

import torch

from letngpt.config import ModelConfig
from letngpt.model.kernels import attend

# ATen ops behind F.scaled_dot_product_attention, one per kernel (forward; CPU's flash is *_for_cpu).
SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
            "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math"}


def sdpa_kernels(cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The SDPA kernels one attention forward+backward of `cfg`'s shape ran (profiler op names): PyTorch picks
    per call from shape, dtype and GPU, so only a run tells. Empty: none recognised (a newer PyTorch's names)."""
    heads = cfg.n_head * cfg.num_maps
    q, k, v = (torch.randn(batch, cfg.block_size, heads, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        attend(q, k, v, scale=cfg.head_dim ** -0.5, backend="sdpa").float().sum().backward()
    names = {e.key for e in prof.key_averages()}
    return sorted(kind for kind, op in SDPA_OPS.items() if any(op in n for n in names))


def _masters_and_adam_steps(engine) -> tuple[dict[str, torch.Tensor], list[float]]:
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        masters[name] = (p if full is None else full).detach().float().clone()
    return masters, sorted(float(s["step"]) for s in engine.client_optimizer.state.values() if "step" in s)


def nonfinite_skip(runner) -> dict:
    """One step with a NaN loss on a built bench.steps.StepRunner, then one clean step: the guard must skip
    the first (fp32 masters and Adam's step counts unchanged) and the second must train."""
    model = runner.model
    masters0, adam0 = _masters_and_adam_steps(runner.engine)
    own = model.__dict__.get("loss")  # TP sets an instance loss; otherwise the class's method
    model.loss = lambda logits, targets, real=model.loss: real(logits, targets) * float("nan")
    try:
        runner.step()
    finally:
        if own is None:
            del model.loss
        else:
            model.loss = own
    masters1, adam1 = _masters_and_adam_steps(runner.engine)
    skipped = not runner.last_applied
    runner.step()
    masters2, _ = _masters_and_adam_steps(runner.engine)

    def change(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    res = {"skipped": skipped, "masters_change_on_nan": change(masters0, masters1),
           "adam_steps_unchanged": adam0 == adam1, "next_step_applied": bool(runner.last_applied),
           "masters_change_after": change(masters1, masters2), "next_loss": runner.last_loss(),
           "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
           "zero_stage": runner.engine.zero_optimization_stage()}
    res["ok"] = bool(skipped and res["masters_change_on_nan"] == 0.0 and res["adam_steps_unchanged"]
                     and res["next_step_applied"] and res["masters_change_after"] > 0
                     and torch.isfinite(torch.tensor(res["next_loss"])))
    return res
