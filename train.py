"""Entry point: `python train.py`, `torchrun ... train.py`, `deepspeed train.py` or sbatch.

    python train.py                                   # tiny LET-nGPT on Tiny Shakespeare
    python train.py --config LETNGPT_1kctx_10k_lr30e-4 --data_dir=data/openwebtext
    python train.py --list-configs
"""

from __future__ import annotations

import sys

from letngpt.cli import USAGE, parse, print_configs
from letngpt.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command = parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if command.action == "list":
        print_configs()
        return 0
    if command.action == "help":
        print(USAGE)
        return 0
    from letngpt.data import DataError
    from letngpt.distributed import shutdown
    from letngpt.trainer import train

    try:
        train(command.run)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shutdown()
    return 0


if __name__ == "__main__":
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(args))
