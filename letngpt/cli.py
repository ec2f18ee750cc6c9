"""train.py's command line: `--config NAME|FILE` plus nanoGPT-style `--key=value` overrides.

Every flag of the original nGPT / LET-nGPT launchers parses unchanged (including
`--compile=False` and `--use_nGPT=1`); anything unknown or unparsable is a one-line error.
`--help` is generated from the config dataclasses: each field's type, value and the comment
written beside it in letngpt/config.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from letngpt.config import (
    CONFIG_SUFFIXES,
    ConfigError,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    field_docs,
    load_config_file,
)
from letngpt.presets import DEFAULT_PRESET, get_config, list_configs

USAGE = f"""usage: train.py [--config NAME|FILE] [--key=value ...] | --list-configs | --help

Runs a training job. Without arguments: a tiny LET-nGPT on Tiny Shakespeare.
  --config NAME     a preset (see --list-configs); default {DEFAULT_PRESET}
  --config FILE     a JSON or YAML file in run_config.json's schema ({{name, model: {{}}, train: {{}}}});
                    every run writes out_dir/run_config.json, so `--config out/x/run_config.json`
                    replays it (into its own out_dir unless --out_dir says otherwise)
  --key=value       override any field below (also `--key value`; bare `--flag` means true)
  --list-configs    print the preset names, one a line
When only --max_iters is given, the cosine decay (lr_decay_iters) follows it."""


def help_text(run: RunConfig) -> str:
    """USAGE plus every field: type, the value this command would use, and its meaning."""
    lines = [USAGE, f"\nFields (values shown are those of {run.name}; `--config X --help` shows X's):"]
    for title, cls, values in (("model", ModelConfig, run.model), ("training", TrainConfig, run.train)):
        lines.append(f"\n{title} ({cls.__name__}):")
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f"  --{f.name} {hints[f.name].__name__.upper()}"
            lines.append(f"{flag:<34}= {getattr(values, f.name)!r:<22} {docs.get(f.name, '')}")
    return "\n".join(lines)


@dataclass
class Command:
    action: str  # "train" | "list" | "help"
    run: RunConfig | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # decisions the first log lines should state


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


def is_config_file(name: str) -> bool:
    return name.endswith(CONFIG_SUFFIXES) or os.sep in name or Path(name).is_file()


def base_config(name: str | None) -> tuple[RunConfig, bool]:
    """(the preset or file's config, whether it came from a file)."""
    name = name or DEFAULT_PRESET
    if is_config_file(name):
        return load_config_file(name), True
    return get_config(name), False


def parse(argv: list[str]) -> Command:
    preset, overrides, action = split_args(argv)
    if action == "list":
        return Command(action)
    run, from_file = base_config(preset)
    if action == "help":
        return Command(action, run)
    run = apply_overrides(run, overrides)
    given = {k.strip("-").replace("-", "_") for k in overrides}
    notes = []
    if "out_dir" not in given and not (from_file and run.train.out_dir != TrainConfig.out_dir):
        run.train.out_dir = f"out/{run.name}"
    if "max_iters" in given and "lr_decay_iters" not in given and run.train.lr_decay_iters != run.train.max_iters:
        notes.append(f"lr_decay_iters follows --max_iters: {run.train.lr_decay_iters} -> {run.train.max_iters} "
                     f"(give --lr_decay_iters to decay over another span)")
        run.train = dataclasses.replace(run.train, lr_decay_iters=run.train.max_iters)
    return Command("train", run, overrides, notes)


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
        print(help_text(command.run))
        return 0
    from letngpt.data import DataError
    from letngpt.errors import RunError
    from letngpt.parallel.distributed import shutdown
    from letngpt.train.trainer import train

    if os.environ.get("RANK", "0") == "0":
        for note in command.notes:
            print(f"note: {note}", flush=True)
    try:
        train(command.run)
    except (ConfigError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: aborted by a second Ctrl-C; no checkpoint written for the unfinished step", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk outside a checkpoint save (metrics, summary): one line too
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from letngpt.fsutil import free_space

        out_dir = Path(command.run.train.out_dir).resolve()
        print(f"error: {e.strerror} while writing under {out_dir} ({free_space(out_dir)} free there); free space "
              "and launch again: the run resumes from its last checkpoint", file=sys.stderr)
        return 2
    shutdown()
    return 0
