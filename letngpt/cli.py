"""train.py's command line: `--config NAME` plus nanoGPT-style `--key=value` overrides.

Every flag of the original nGPT / LET-nGPT launchers parses unchanged (including
`--compile=False` and `--use_nGPT=1`); anything unknown or unparsable is a one-line error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .config import ConfigError, RunConfig, apply_overrides
from .presets import DEFAULT_PRESET, get_config, list_configs

USAGE = f"""usage: train.py [--config NAME] [--key=value ...] | --list-configs

Runs a training job. Without arguments: a tiny LET-nGPT on Tiny Shakespeare.
  --config NAME     a preset (see --list-configs); default {DEFAULT_PRESET}
  --key=value       override any ModelConfig / TrainConfig field, e.g. --max_iters=200
                    --n_layer=4 --zero_stage=2 --out_dir=out/x --init_from=resume
  --list-configs    print the preset names, one a line
See README.md for every field."""


@dataclass
class Command:
    action: str  # "train" | "list" | "help"
    run: RunConfig | None = None
    overrides: dict[str, str] = field(default_factory=dict)


def split_args(argv: list[str]) -> tuple[str | None, dict[str, str], str]:
    """Return (preset name, overrides, action) from raw arguments."""
    preset, overrides, action = None, {}, "train"
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            return preset, overrides, "help"
        if arg in ("--list-configs", "--list_configs"):
            action = "list"
            i += 1
            continue
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"  # a bare flag: --compile
        if not key:
            raise ConfigError(f"malformed option {arg!r}")
        if key == "config":
            preset = value.strip("'\"")
        else:
            overrides[key] = value
        i += 1
    return preset, overrides, action


def parse(argv: list[str]) -> Command:
    preset, overrides, action = split_args(argv)
    if action != "train":
        return Command(action)
    run = get_config(preset or DEFAULT_PRESET)
    run = apply_overrides(run, overrides)
    if "out_dir" not in {k.strip("-") for k in overrides}:
        run.train.out_dir = f"out/{run.name}"
    return Command("train", run, overrides)


def print_configs() -> None:
    print("\n".join(list_configs()))


def main(argv: list[str] | None = None) -> int:
    """The training entry point behind `python train.py`, `python -m letngpt` and `letngpt-train`.

    Bad configuration and bad data end in one line on stderr and exit code 2, never a traceback.
    The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same,
    so it is dropped here.
    """
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]
    try:
        command = parse(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if command.action == "list":
        print_configs()
        return 0
    if command.action == "help":
        print(USAGE)
        return 0
    from .data import DataError
    from .distributed import shutdown
    from .errors import RunError
    from .trainer import train

    try:
        train(command.run)
    except (ConfigError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: aborted by a second Ctrl-C; no checkpoint written for the unfinished step", file=sys.stderr)
        return 130
    shutdown()
    return 0
