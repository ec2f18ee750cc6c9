"""train.py's command line with a disk that fills up: every torch.save into checkpoint step FAIL_STEP
writes part of its file and then fails as torch does on a full disk (RuntimeError from its zip
writer). Usage: disk_full.py FAIL_STEP TRAIN_ARGS..."""

from __future__ import annotations

import sys

import torch

from letngpt.cli import main
from letngpt.train.checkpoint import tag_for

_real_save = torch.save


def main_with_full_disk(fail_step: int, argv: list[str]) -> int:
    tag = tag_for(fail_step)

    def save(obj, f, *args, **kwargs):
        if tag in str(f):
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04" + b"\0" * 4096)  # what a full disk lets through: a torn zip
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return _real_save(obj, f, *args, **kwargs)

    torch.save = save
    return main(argv)


if __name__ == "__main__":
    sys.exit(main_with_full_disk(int(sys.argv[1]), sys.argv[2:]))
