"""The comparison: tuned, multi-seed, budget-based sweeps of presets (runner.py, `python -m letngpt.compare`),
run locally or on SLURM (slurm.py) with a cost plan first (cost.py); the arithmetic (sweep.py, curves.py) and
the report files (report.py). Training runs are subprocesses: nothing here imports the trainer.

May import letngpt's config, presets, cli, errors, fsutil, data, model (costs), train.metrics and
train.tracking (records), and tools.plan (costs).
"""
