"""The parallel layout is validated once, with one-line errors, before any process group exists."""

from __future__ import annotations

import pytest

from letngpt.cli import parse
from letngpt.config import ConfigError
from letngpt.parallel.layout import build_layout, check_layout


def run_with(*flags: str):
    return parse(["--config", "tiny_GPT", *flags]).run


@pytest.mark.parametrize("flags, world, needle", [
    (["--tp=2"], 3, r"tp \(2\) must divide the number of processes \(3\)"),
    (["--tp=3", "--n_head=4", "--n_embd=96"], 3, r"n_head \(4\) must be divisible by tp \(3\)"),
    (["--tp=2", "--vocab_size=255"], 2, r"vocab_size \(255\) must be divisible by tp \(2\)"),
    (["--gradient_accumulation_steps=3"], 2, r"gradient_accumulation_steps \(3\) must be divisible by the "
                                             r"data-parallel size \(2\)"),
    (["--tp=2", "--gradient_accumulation_steps=3"], 4, r"data-parallel size \(2\)"),
])
def test_bad_layouts_are_one_line_errors(flags, world, needle):
    with pytest.raises(ConfigError, match=needle):
        check_layout(run_with(*flags), world)


def test_data_parallel_layout_without_tp():
    layout = build_layout(run_with("--gradient_accumulation_steps=4"), world=4, rank=3)
    assert (layout.tp, layout.tp_rank, layout.dp_size, layout.dp_rank, layout.mpu) == (1, 0, 4, 3, None)
    assert not layout.is_main and build_layout(run_with(), world=1, rank=0).is_main
