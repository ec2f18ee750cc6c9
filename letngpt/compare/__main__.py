"""`python -m letngpt.compare`: the comparison runner (runner.py)."""

import sys

from letngpt.compare.runner import main

sys.exit(main())
