"""Peak memory of ONE variant in a fresh process: `python -m bench.memprobe '<json request>'`.

Called by bench.memory.memory_in_subprocess; prints one JSON line (bench.memory.probe_memory).
The request: {"config": ModelConfig fields, "batch_size", "device", "dtype", "steps", "threads",
"checkpointing"}.
"""

from __future__ import annotations

import json
import sys

import torch

from bench.env import resolve_dtype, setup_threads
from bench.memory import probe_memory
from letngpt.config import ModelConfig


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    req = json.loads(argv[0])
    device = torch.device(req["device"])
    setup_threads(req.get("threads") or 0, device)
    result = probe_memory(ModelConfig(**req["config"]), req["batch_size"], device, resolve_dtype(req["dtype"], device),
                          steps=req.get("steps", 2), checkpointing=req.get("checkpointing", False))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
