"""Model and training configuration: plain dataclasses, validated on construction.

Every error names the field and the bad value in one line, because these objects are
built from command lines on clusters where a stack trace from deep inside a rank is the
worst possible way to learn that `n_embd` was mistyped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

ATTN_BACKENDS = ("auto", "flash", "sdpa")
INIT_FROM = ("auto", "scratch", "resume")
DTYPES = ("auto", "float32", "bfloat16", "float16")
HEAD_NORM_RULES = ("difft",)  # named initial gains of the ensemble head norm (ModelConfig.head_norm_gain)


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
    block_size: int = 1024  # context length in tokens
    n_layer: int = 24  # transformer blocks
    n_head: int = 16  # attention heads per layer
    n_embd: int = 1024  # model width d (head size = n_embd / n_head)
    num_maps: int = 1  # M: attention maps per head (1: plain attention; >1: Linear Ensemble Attention)
    use_ngpt: bool = True  # true: nGPT on the hypersphere; false: pre-norm GPT
    mlp_ratio: int = 4  # SwiGLU hidden width = mlp_ratio * n_embd (unless mlp_hidden is set)
    mlp_hidden: int = 0  # SwiGLU hidden width; 0: mlp_ratio * n_embd (parameter-matched presets set it)
    rope_base: float = 10000.0  # RoPE base frequency
    attn_backend: str = "auto"  # auto: flash-attn on CUDA bf16/fp16 when importable, else SDPA
    head_norm_init: str = "0.1"  # LET-Transformer's head-norm gain at init: a number or difft (LET-nGPT: always 1)

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
        if self.head_norm_init not in HEAD_NORM_RULES:
            try:
                gain = float(self.head_norm_init)
            except ValueError:
                gain = math.nan
            _check(math.isfinite(gain) and gain > 0, f"head_norm_init ({self.head_norm_init!r}) must be a number > 0 "
                                                     f"or one of {', '.join(HEAD_NORM_RULES)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def head_norm_gain(self, layer: int) -> float:
        """Initial gain of layer `layer`'s (0-based) ensemble head norm in the pre-norm GPT variant.

        The norm puts every head's output at RMS `gain` whatever its inputs, while a plain head's output
        starts near RMS 0.3-0.6 (an average of value rows over the context), so the gain sets how loud
        ensemble heads start. The default, 0.1, is the best of issue 25's gain x lr sweep on GPT-2 tokens
        (char_LETTransformer takes the char-level best, 0.3; README "Results"); gain 1 (the init before
        it) cost 0.38 of val loss on BPE Tiny Shakespeare. `difft` is
        the Differential Transformer's depth schedule 1 - lambda_init(l), lambda_init(l) = 0.8 -
        0.6 exp(-0.3 l) (0.8 down to 0.44 over 4 layers). nGPT ignores the setting: there the block output
        is normalised after the projection, so a gain shared by a layer's heads cancels at init, and a
        small gain would only change how fast Adam moves it relative to its size.
        """
        if self.use_ngpt:
            return 1.0
        if self.head_norm_init == "difft":
            return 1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer))
        return float(self.head_norm_init)

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

    learning_rate: float = 30e-4  # peak learning rate
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    weight_decay: float = 0.0  # AdamW decay on matrices only (nGPT: 0)
    warmup_iters: int = 0  # linear warmup steps (nGPT: 0)
    max_iters: int = 10000  # optimizer steps in the whole run
    lr_decay_iters: int = 10000  # cosine decay length; follows --max_iters when only that is given
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    batch_size: int = 8  # micro batch per rank
    gradient_accumulation_steps: int = 64  # TOTAL micro batches per step over all DP ranks (each does total / dp)
    eval_interval: int = 1000  # evaluate every N steps (and at the end)
    eval_iters: int = 200  # validation batches per evaluation (a fixed set, the same at any layout)
    log_interval: int = 10  # log a line every N steps
    checkpoint_interval: int = 1000  # save every N steps (and at the end or a clean stop)
    keep_checkpoints: int = 3  # keep the newest K complete checkpoints
    max_iters_per_launch: int = 0  # 0: no limit
    time_limit_seconds: float = 0.0  # 0: no limit; else save and exit cleanly before it
    init_from: str = "auto"  # auto: resume when out_dir holds a checkpoint, else scratch
    seed: int = 1337  # initial weights and data order
    data_dir: str = "data/tinyshakespeare"  # a prepared folder: train.bin, val.bin, meta.json
    out_dir: str = "out"  # checkpoints, metrics.jsonl, summary.json, the local MLflow store (default out/<preset>)
    ds_config: str = ""  # path; "" picks ds_configs/zero{zero_stage}.json
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto: cuda when present, else cpu
    compile: bool = False  # torch.compile each block inside the DeepSpeed engine (letngpt.train.compile)
    activation_checkpointing: bool = False  # recompute each block in backward: activation memory ~ one block
    tp: int = 1  # tensor-parallel size (data-parallel size = world / tp)
    renorm: str = "collective"  # collective: one all-reduce of row norms; naive: gather whole matrices
    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI or a local store in out_dir
    experiment: str = "letngpt"  # MLflow experiment name
    parent_run_id: str = ""  # MLflow parent run (sweeps and comparisons group their runs under one)
    track_interval: int = 50  # how often ensemble coefficients / alphas are logged
    peak_tflops: float = 0.0  # 0: look up the GPU; for MFU
    max_nonfinite_steps: int = 3  # consecutive skipped steps (NaN/Inf loss or gradient) before the run stops

    def __post_init__(self) -> None:
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "time_limit_seconds",
                     "peak_tflops"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"{name} ({value}) must be a finite number >= 0")
        _check(self.learning_rate > 0, f"learning_rate ({self.learning_rate}) must be > 0")
        _check(self.min_lr <= self.learning_rate,
               f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "log_interval", "checkpoint_interval", "keep_checkpoints", "tp", "track_interval",
                     "max_nonfinite_steps"):
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


# --- config files and the field table behind --help ---------------------------------------

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the class source: the one-line meaning `--help` prints.
    The comment beside the field is the only place a meaning is written down."""
    import inspect
    import io
    import tokenize

    comments: dict[int, str] = {}
    names: dict[int, str] = {}
    source = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in names:
            names[tok.start[0]] = tok.string
    wanted = {f.name for f in fields(cls)}
    return {name: comments.get(line, "") for line, name in names.items() if name in wanted}


def _coerce(where: str, key: str, value: object, typ: type) -> object:
    """A value read from JSON/YAML into the field's type (YAML reads 3e-4 as a string)."""
    if isinstance(value, str) and typ is not str:
        return parse_value(key, value, typ)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"  # head_norm_init: 0.1 in a YAML/JSON file means the number
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (typ is bool) or not isinstance(value, typ):
        raise ConfigError(f"{where}: {key} must be {typ.__name__}, got {value!r}")
    return value


def _section(where: str, data: dict, cls: type, section: str) -> dict:
    types = _field_types(cls)
    values = data.get(section) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {section} must be a mapping of field: value")
    out = {}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"unknown option --{key} (in {where}, {section})")
        out[key] = _coerce(where, key, value, types[key])
    return out


def load_config_file(path: str | Path) -> RunConfig:
    """A run config from JSON or YAML in run_config.json's schema: {name, model: {...}, train: {...}}.
    Fields left out take the dataclass defaults; unknown keys are errors, as unknown flags are."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file (and not a preset name; see --list-configs)")
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same one-line error
        raise ConfigError(f"--config {path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must hold a mapping with model and train sections")
    unknown = set(data) - {"name", "model", "train"}
    if unknown:
        raise ConfigError(f"--config {path}: unknown key {sorted(unknown)[0]!r} (expected name, model, train)")
    model = ModelConfig(**_section(str(path), data, ModelConfig, "model"))
    train = TrainConfig(**_section(str(path), data, TrainConfig, "train"))
    return RunConfig(model=model, train=train, name=str(data.get("name") or path.stem))
