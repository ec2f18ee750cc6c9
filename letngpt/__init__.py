"""letngpt: distributed pretraining of LET-nGPT, nGPT and GPT on DeepSpeed."""

from letngpt.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from letngpt.model import LETnGPT, build_model, normalize_weights_
from letngpt.model.flops import flops_per_token
from letngpt.presets import get_config, list_configs

__all__ = [
    "ConfigError", "ModelConfig", "RunConfig", "TrainConfig", "LETnGPT", "build_model",
    "normalize_weights_", "get_config", "list_configs", "flops_per_token",
]
