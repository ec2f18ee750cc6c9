"""One training run: the loop and step (trainer.py), the DeepSpeed engine (engine.py), checkpoints, the
non-finite guard, metrics, the lr schedule, the out_dir lock, MLflow tracking and torch.compile.

May import letngpt's config, errors, fsutil, data, model, parallel and renorm; never compare or tools.
"""
