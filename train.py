"""Entry point: `python train.py`, `torchrun ... train.py`, `deepspeed train.py` or sbatch.

    python train.py                                   # tiny LET-nGPT on Tiny Shakespeare
    python train.py --config LETNGPT_1kctx_10k_lr30e-4 --data_dir=data/openwebtext
    python train.py --list-configs

An installed package offers the same as `python -m letngpt` and the `letngpt-train` command.
"""

import sys

from letngpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
