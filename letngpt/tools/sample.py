"""Generate text from a checkpoint.

    python -m letngpt.tools.sample --ckpt out/tiny_LETNGPT --prompt "ROMEO:" --max_new_tokens 100

`--ckpt` is a run's out_dir (its newest checkpoint that verifies against its manifest is used)
or a checkpoint folder (which must verify).
Weights are read on one process without DeepSpeed: ZeRO 0 checkpoints hold the full
model; ZeRO 1-3 ones are consolidated with DeepSpeed's zero_to_fp32 reader.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from letngpt.config import RunConfig
from letngpt.data import DataError
from letngpt.errors import CheckpointError
from letngpt.model import LETnGPT, build_model
from letngpt.train import checkpoint


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints root, tag) for an out_dir, a checkpoints folder or a step_* folder. The
    checkpoint is verified against its manifest as resume does: a folder named explicitly must
    verify; under an out_dir the newest one that verifies is taken, each one passed over named on
    stderr. Nothing is moved: a run may be training there."""
    path = Path(path)
    if (path / checkpoint.STATE_FILE).is_file() or path.name.startswith("step_"):
        reason = checkpoint.verify(path)
        if reason:
            raise CheckpointError(f"checkpoint {path} does not verify: {reason}")
        return path.parent, path.name
    root = checkpoint.checkpoint_dir(path) if checkpoint.checkpoint_dir(path).is_dir() else path
    tag, skipped = checkpoint.newest_verified(root)  # warns about each one it skips
    if tag is None:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise CheckpointError(f"no checkpoint under {path} verifies{detail}")
    return root, tag


def load_model(path: str | Path, device: str = "cpu") -> tuple[LETnGPT, dict]:
    root, tag = resolve_checkpoint(path)
    folder = root / tag
    state = json.loads((folder / checkpoint.STATE_FILE).read_text())
    run = RunConfig.from_dict(state["config"])
    if (folder / "mp_rank_01_model_states.pt").exists():
        raise FileNotFoundError(f"{folder} was saved with tensor parallelism (tp={run.train.tp}); "
                                "sampling reads tp=1 checkpoints only for now")
    model = build_model(run.model)
    if any(folder.glob("*optim_states.pt")) and run.train.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        weights = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model.load_state_dict(weights)
    return model.to(device).eval(), state


@torch.no_grad()
def generate(model: LETnGPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Autoregressive sampling (no KV cache: clarity over speed for a checkpoint probe)."""
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.block_size:]
        logits, _ = model(context)
        logits = logits[:, -1, :].float()
        if temperature <= 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def get_tokenizer(name: str, data_dir: str | None):
    """`auto`: the dataset's meta.json decides (a char dataset carries its vocabulary, BPE ones name their
    tiktoken encoding); gpt2 when there is no readable meta.json. `char` needs the meta.json."""
    from letngpt.data.tokenizer import CharTokenizer, get_encoding

    meta_path = Path(data_dir) / "meta.json" if data_dir else None
    meta = json.loads(meta_path.read_text()) if meta_path and meta_path.is_file() else None
    if name == "char" or (name == "auto" and meta and meta.get("tokenizer") == "char"):
        if meta is None:
            raise DataError(f"--tokenizer char needs the dataset's meta.json ({meta_path} not found); pass --data_dir")
        return CharTokenizer.from_meta(meta)
    if name == "auto":
        name = (meta or {}).get("tokenizer_requested") or "gpt2"
    return get_encoding(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="run out_dir or checkpoint folder")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer", default="auto",
                   help="auto: the run's dataset meta.json (char vocabulary or tiktoken name), else gpt2")
    p.add_argument("--data_dir", default=None, help="dataset whose meta.json names the tokenizer (default: the run's)")
    p.add_argument("--print_token_count", action="store_true", help="end with 'generated N tokens'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="warning: %(message)s")
    try:
        model, state = load_model(args.ckpt, args.device)
        enc = get_tokenizer(args.tokenizer, args.data_dir or state["config"]["train"].get("data_dir"))
        ids = enc.encode_ordinary(args.prompt) if hasattr(enc, "encode_ordinary") else enc.encode(args.prompt)
    except (FileNotFoundError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = ids or ([enc.eot_token] if enc.eot_token is not None else [0])
    idx = torch.tensor([ids], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, gen)
    new = [t for t in out[0, len(ids):].tolist() if t < enc.n_vocab]
    print(args.prompt + enc.decode(new))
    if args.print_token_count:
        print(f"generated {out.shape[1] - len(ids)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
