"""Under torchrun with N ranks: TP=N vs TP=1 for every variant, from the same weights.
EVERY rank writes its worst logits / loss / gradient differences to argv[1] + ".rank<R>": the
replicated parameters (alphas, ensemble weights, norm gains) live and get their gradients on every
rank, so each rank's copy is compared, not only rank 0's."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from letngpt.config import ModelConfig
from letngpt.model import build_model
from letngpt.parallel.distributed import init_distributed, shutdown
from letngpt.parallel.tensor_parallel import initialize_tp, parallelize_tp

VARIANTS = {"GPT": (False, 1), "nGPT": (True, 1), "LETNGPT": (True, 3), "LETNGPT_maps5": (True, 5),
            "LETTransformer": (False, 3)}


def gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The whole of a tensor split over the TP group along `dim` (the TP=1 tensor it stands for)."""
    from megatron.core.parallel_state import get_tensor_model_parallel_group, get_tensor_model_parallel_world_size

    parts = [torch.empty_like(t) for _ in range(get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, t.detach().contiguous(), group=get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def gather_tp_param(p: torch.Tensor) -> torch.Tensor:
    """A parameter (or its gradient, marked alike) whole: gathered where TP shards it, as is where it is replicated."""
    if not getattr(p, "tensor_model_parallel", False):
        return p.detach()
    return gather_tp(p, getattr(p, "partition_dim", 0))


def main() -> None:
    init_distributed("cpu")
    tp = dist.get_world_size()
    initialize_tp(tp)
    report = {}
    for name, (use_ngpt, maps) in VARIANTS.items():
        cfg = ModelConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=64, num_maps=maps,
                          use_ngpt=use_ngpt)
        torch.manual_seed(0)
        full = build_model(cfg)
        sharded = parallelize_tp(copy.deepcopy(full), tp)
        idx = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
        tgt = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
        ref_logits, ref_loss = full(idx, tgt)
        ref_loss.backward()
        logits, loss = sharded(idx, tgt)
        loss.backward()
        report[name] = {
            "logits": float((gather_tp(logits, -1) - ref_logits).abs().max()),
            "loss": abs(float(loss) - float(ref_loss)),
            **compare_params(sharded, dict(full.named_parameters())),
            "local_q_rows": sharded.blocks[0].attn.query.weight.shape[0],
        }
    rank = dist.get_rank()
    Path(f"{sys.argv[1]}.rank{rank}").write_text(json.dumps({"tp": tp, "rank": rank, "report": report}))
    shutdown()


def compare_params(sharded: torch.nn.Module, ref_params: dict) -> dict:
    """Worst weight / gradient differences against TP=1, for sharded parameters (gathered) and,
    separately, for this rank's own copies of the replicated ones."""
    out = {"grad": 0.0, "weights": 0.0, "replicated_grad": 0.0, "replicated_weights": 0.0, "replicated": 0}
    for pname, p in sharded.named_parameters():
        ref = ref_params[pname]
        g = p.grad
        g.tensor_model_parallel = getattr(p, "tensor_model_parallel", False)
        g.partition_dim = getattr(p, "partition_dim", 0)
        weight_err = float((gather_tp_param(p) - ref).abs().max())
        grad_err = float((gather_tp_param(g) - ref.grad).abs().max())
        out["weights"], out["grad"] = max(out["weights"], weight_err), max(out["grad"], grad_err)
        if not getattr(p, "tensor_model_parallel", False):
            out["replicated"] += 1
            out["replicated_weights"] = max(out["replicated_weights"], float((p.detach() - ref).abs().max()))
            out["replicated_grad"] = max(out["replicated_grad"], float((p.grad - ref.grad).abs().max()))
    return out


if __name__ == "__main__":
    main()
