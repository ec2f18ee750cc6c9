"""Performance instruments for letngpt: throughput, MFU, memory and attention-kernel benchmarks.

`bench.common` holds the measuring functions; `bench/throughput.py` and `bench/gpu_check.py`
(driven by `bench/gpu_check.sh`) are the command-line front ends. See bench/README.md.
"""
