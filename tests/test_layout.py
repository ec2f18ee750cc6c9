"""The parallel layout is validated once, with one-line errors, before any process group exists."""

from __future__ import annotations

import pytest
import torch

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
                                             r"data-parallel size \(2 = 2 processes / tp 1\)"),
    (["--tp=2", "--gradient_accumulation_steps=3"], 4, r"data-parallel size \(2 = 4 processes / tp 2\)"),
])
def test_bad_layouts_are_one_line_errors(flags, world, needle):
    with pytest.raises(ConfigError, match=needle):
        check_layout(run_with(*flags), world)


def test_data_parallel_layout_without_tp():
    layout = build_layout(run_with("--gradient_accumulation_steps=8"), world=4, rank=3)
    assert (layout.tp, layout.tp_rank, layout.dp_size, layout.dp_rank, layout.mpu) == (1, 0, 4, 3, None)
    assert layout.accum == 2  # the global total, shared by the DP ranks
    assert not layout.is_main and build_layout(run_with(), world=1, rank=0).is_main
    model = torch.nn.Linear(2, 2)
    assert layout.shard(model) is model  # no TP: the model itself


def test_the_planner_checks_a_cluster_with_the_layouts_rules():
    """One rule book: the planner refuses what build_layout refuses, in the layout's words."""
    from letngpt.tools.plan import Cluster, PlanError, check

    run = run_with("--gradient_accumulation_steps=3")
    with pytest.raises(ConfigError) as trainer_error:
        check_layout(run, 2)
    with pytest.raises(PlanError) as planner_error:
        check(run, Cluster(nodes=1, gpus_per_node=2, tp=1, zero_stage=1))
    assert str(planner_error.value) == str(trainer_error.value)
    with pytest.raises(PlanError, match=r"tp \(2\) must divide gpus_per_node \(3\)"):
        check(run_with("--gradient_accumulation_steps=6"), Cluster(nodes=2, gpus_per_node=3, tp=2, zero_stage=1))
