"""A stand-in for `$PYTHON -m torch.distributed.run ...`, what slurm/launch.sh's node stage runs.

STUB_TORCHRUN=new: the pinned torch's own torchrun argument parser. STUB_TORCHRUN=old: the options of
torch 2.6's torchrun (the default NGC base image's) that the launcher uses, none of the late ones.
Either way it parses like torchrun (`--help`; "unrecognized arguments" and exit 2 for an option it
lacks) and, instead of launching anything, writes what it parsed to $STUB_TORCHRUN_OUT as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def old_parser() -> argparse.ArgumentParser:
    """torch 2.6's torchrun, as far as slurm/launch.sh is concerned (no --signals_to_handle, no
    --shutdown_timeout): both spellings of every option, as torchrun accepts."""
    p = argparse.ArgumentParser(prog="torchrun")
    for name in ("nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf",
                 "max_restarts", "monitor_interval", "log_dir", "node_rank", "master_addr", "master_port"):
        p.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name)
    p.add_argument("--standalone", action="store_true")
    p.add_argument("training_script")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return p


def main() -> int:
    if sys.argv[1:3] != ["-m", "torch.distributed.run"]:
        print(f"stub_torchrun: expected '-m torch.distributed.run', got {sys.argv[1:3]}", file=sys.stderr)
        return 3
    if os.environ["STUB_TORCHRUN"] == "new":
        from torch.distributed.run import get_args_parser

        parser = get_args_parser()
    else:
        parser = old_parser()
    argv = sys.argv[3:]
    args = parser.parse_args(argv)
    script_at = argv.index(args.training_script)
    with open(os.environ["STUB_TORCHRUN_OUT"], "w") as f:
        json.dump({"options": argv[:script_at], "script": args.training_script,
                   "script_args": args.training_script_args}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
