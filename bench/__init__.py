"""Performance instruments for letngpt: throughput, MFU, memory and attention-kernel benchmarks.

The measuring functions live in one module per purpose: `sizes` (what is compared), `env`
(device, dtype, threads), `steps` (a training step timed by phase; variants side by side),
`memory` (each variant alone in a fresh process), `attention` (fused vs per-map, flash vs SDPA)
and `output` (tables, JSON). `python -m bench.throughput`, `python -m bench.gpu_check` (driven by
`bench/gpu_check.sh`) and `torchrun ... -m bench.renorm` are the command-line front ends. See
bench/README.md.
"""
