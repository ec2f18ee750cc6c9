"""Model and training configuration: plain dataclasses, validated on construction.

Every error names the field and the bad value in one line, because these objects are
built from command lines on clusters where a stack trace from deep inside a rank is the
worst possible way to learn that `n_embd` was mistyped.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields

ATTN_BACKENDS = ("auto", "flash", "sdpa")
INIT_FROM = ("auto", "scratch", "resume")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the field."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """Architecture. `use_ngpt` switches nGPT (hypersphere) vs pre-norm GPT; `num_maps`
    is M, the number of attention maps per head (M = 1 is ordinary attention)."""

    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    block_size: int = 1024
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    num_maps: int = 1
    use_ngpt: bool = True
    mlp_ratio: int = 4
    mlp_hidden: int = 0  # SwiGLU hidden width; 0: mlp_ratio * n_embd (parameter-matched presets set it)
    rope_base: float = 10000.0
    attn_backend: str = "auto"  # auto: flash-attn on CUDA bf16/fp16 when importable, else SDPA

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "num_maps", "mlp_ratio"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"{name} ({value}) must be a positive integer")
        _check(isinstance(self.mlp_hidden, int) and self.mlp_hidden >= 0,
               f"mlp_hidden ({self.mlp_hidden}) must be an integer >= 0 (0: mlp_ratio * n_embd)")
        _check(self.n_embd % self.n_head == 0,
               f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        _check(self.head_dim % 2 == 0, f"head size n_embd/n_head ({self.head_dim}) must be even for RoPE")
        _check(self.rope_base > 1, f"rope_base ({self.rope_base}) must be > 1")
        _check(self.attn_backend in ATTN_BACKENDS,
               f"attn_backend ({self.attn_backend!r}) must be one of {', '.join(ATTN_BACKENDS)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU hidden width: mlp_hidden when set, else mlp_ratio * n_embd."""
        return self.mlp_hidden or self.mlp_ratio * self.n_embd


@dataclass
class TrainConfig:
    """Optimisation, data and run control. Field names follow the original nanoGPT/nGPT
    launcher so its command lines work unchanged.

    `gradient_accumulation_steps` is the TOTAL over data-parallel ranks (nanoGPT's
    convention): each rank accumulates gradient_accumulation_steps / dp_size micro
    batches, so the global batch, batch_size * gradient_accumulation_steps sequences,
    does not change with the number of GPUs.
    """

    learning_rate: float = 30e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_iters: int = 0
    max_iters: int = 10000
    lr_decay_iters: int = 10000
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    batch_size: int = 8  # micro batch per rank
    gradient_accumulation_steps: int = 64
    eval_interval: int = 1000
    eval_iters: int = 200
    log_interval: int = 10
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    max_iters_per_launch: int = 0  # 0: no limit
    time_limit_seconds: float = 0.0  # 0: no limit; else save and exit cleanly before it
    init_from: str = "auto"  # auto: resume when out_dir holds a checkpoint, else scratch
    seed: int = 1337
    data_dir: str = "data/tinyshakespeare"
    out_dir: str = "out"
    ds_config: str = ""  # path; "" picks ds_configs/zero{zero_stage}.json
    zero_stage: int = 1
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    compile: bool = False
    tp: int = 1
    renorm: str = "collective"  # collective: one all-reduce of row norms; naive: gather whole matrices
    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI or a local store in out_dir
    experiment: str = "letngpt"
    parent_run_id: str = ""  # MLflow parent run (sweeps and comparisons group their runs under one)
    track_interval: int = 50  # how often ensemble coefficients / alphas are logged
    peak_tflops: float = 0.0  # 0: look up the GPU; for MFU

    def __post_init__(self) -> None:
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "time_limit_seconds",
                     "peak_tflops"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"{name} ({value}) must be a finite number >= 0")
        _check(self.learning_rate > 0, f"learning_rate ({self.learning_rate}) must be > 0")
        _check(self.min_lr <= self.learning_rate,
               f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "log_interval", "checkpoint_interval", "keep_checkpoints", "tp", "track_interval"):
            value = getattr(self, name)
            _check(value > 0, f"{name} ({value}) must be > 0")
        for name in ("warmup_iters", "max_iters", "lr_decay_iters", "max_iters_per_launch", "seed"):
            value = getattr(self, name)
            _check(value >= 0, f"{name} ({value}) must be >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"{name} ({value}) must be in [0, 1)")
        _check(self.init_from in INIT_FROM, f"init_from ({self.init_from!r}) must be one of {INIT_FROM}")
        _check(self.zero_stage in (0, 1, 2, 3), f"zero_stage ({self.zero_stage}) must be 0, 1, 2 or 3")
        _check(self.renorm in ("collective", "naive"), f"renorm ({self.renorm!r}) must be collective or naive")
        _check(self.dtype in DTYPES, f"dtype ({self.dtype!r}) must be one of {', '.join(DTYPES)}")


@dataclass
class RunConfig:
    """A named preset: the model and its training recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "custom"

    def to_dict(self) -> dict:
        return {"name": self.name, "model": dataclasses.asdict(self.model),
                "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(model=ModelConfig(**d["model"]), train=TrainConfig(**d["train"]), name=d.get("name", "custom"))


# --- command-line overrides -------------------------------------------------------------

# Spellings used by the original launchers that differ from our field names.
ALIASES = {"use_ngpt": "use_ngpt", "use_n_gpt": "use_ngpt", "usengpt": "use_ngpt"}


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def parse_value(key: str, raw: str, typ: type) -> object:
    """Parse one `--key=value` string into the field's type, or raise a one-line ConfigError."""
    text = raw.strip().strip("'\"")
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if typ is float:
            return float(text)
        return text
    except ValueError:
        raise ConfigError(f"--{key}: cannot parse {raw!r} as {typ.__name__}") from None


def canonical_key(key: str) -> str:
    key = key.strip().lstrip("-").replace("-", "_")
    return ALIASES.get(key.lower(), key)


def apply_overrides(run: RunConfig, overrides: dict[str, str]) -> RunConfig:
    """Return a new RunConfig with `--key=value` strings applied to whichever of the model
    or train config owns the key; unknown keys raise ConfigError."""
    model_types, train_types = _field_types(ModelConfig), _field_types(TrainConfig)
    model_kw = dataclasses.asdict(run.model)
    train_kw = dataclasses.asdict(run.train)
    for raw_key, raw_value in overrides.items():
        key = canonical_key(raw_key)
        if key in model_types:
            model_kw[key] = parse_value(raw_key, raw_value, model_types[key])
        elif key in train_types:
            train_kw[key] = parse_value(raw_key, raw_value, train_types[key])
        else:
            raise ConfigError(f"unknown option --{raw_key}")
    return RunConfig(model=ModelConfig(**model_kw), train=TrainConfig(**train_kw), name=run.name)
