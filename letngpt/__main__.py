"""`python -m letngpt ...` is `python train.py ...` for an installed package (no checkout needed)."""

import sys

from letngpt.cli import main

sys.exit(main())
