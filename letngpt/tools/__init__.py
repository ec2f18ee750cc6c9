"""Tools around training runs: the capacity planner (plan.py, `python -m letngpt.tools.plan`) and sampling
from a checkpoint (sample.py, `python -m letngpt.tools.sample`).

May import letngpt's config, presets, errors, data, model, parallel and train.checkpoint; never compare.
"""
