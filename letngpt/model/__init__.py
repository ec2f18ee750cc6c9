"""The network and nothing else: LETnGPT (nGPT or GPT blocks with Linear Ensemble Attention, model.py), its
attention kernels (kernels.py) and its FLOPs per token (flops.py).

May import letngpt.config only: the model knows nothing of parallelism, DeepSpeed, data or tracking.
"""

from letngpt.model.model import LETnGPT, ScaledVector, at_least_fp32, build_model, normalize_weights_, unit

__all__ = ["LETnGPT", "ScaledVector", "at_least_fp32", "build_model", "normalize_weights_", "unit"]
