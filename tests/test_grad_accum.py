"""Gradient accumulation precision in bf16: the shipped ZeRO recipes sum micro gradients in fp32.

The multi-stage check runs one CPU process (tests/workers/grad_accum_worker.py); the ZeRO 0 rule
is checked on the config alone.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import check_ok, run_train

from letngpt.config import ConfigError, RunConfig, TrainConfig
from letngpt.parallel.layout import build_layout
from letngpt.train.engine import build_ds_config


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("grad_accum") / "report.json"
    check_ok(run_train([str(out), "1,2,3"], script="tests/workers/grad_accum_worker.py", timeout=300))
    return {r["stage"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_in_fp32(accumulated, stage):
    """32 bf16 micro gradients: the accumulated gradient is their exact sum up to one bf16 rounding
    of the FINAL value (plus fp32 summation noise), not one rounding per micro step."""
    r = accumulated[stage]
    assert r["data_types"] == {"grad_accum_dtype": "fp32"}
    assert r["grad_norm"] > 1e-3  # real gradients
    assert r["worst"] <= 1.0, r
    assert r["worst_bf16_sum"] > 10.0, r  # a bf16 running sum would fail the same bound by far
    expected = {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}
    assert r["optimizer"] == expected[stage]


def dp_layout(train: TrainConfig, dp: int):
    return build_layout(RunConfig(train=train), world=dp, rank=0)


def test_zero0_in_bf16_refuses_to_accumulate():
    """DeepSpeed has no fp32 accumulation at ZeRO 0 in bf16: one micro batch per rank is exact and
    allowed; more are refused with a pointer to ZeRO 1."""
    train = TrainConfig(zero_stage=0, batch_size=2, gradient_accumulation_steps=2, device="cpu")
    cfg = build_ds_config(train, dp_layout(train, 2), torch.bfloat16)  # one micro batch per rank
    assert cfg["gradient_accumulation_steps"] == 1 and "grad_accum_dtype" not in cfg.get("data_types", {})
    with pytest.raises(ConfigError, match="zero_stage=1"):
        build_ds_config(train, dp_layout(train, 1), torch.bfloat16)
    with pytest.raises(ConfigError, match="zero_stage=1"):
        build_ds_config(train, dp_layout(train, 1), torch.float16)
    fp32 = build_ds_config(train, dp_layout(train, 1), torch.float32)
    assert fp32["gradient_accumulation_steps"] == 2  # fp32 is fine


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_recipes_accumulate_in_fp32(stage):
    train = TrainConfig(zero_stage=stage, batch_size=2, gradient_accumulation_steps=8, device="cpu")
    for dtype in (torch.bfloat16, torch.float32):
        assert build_ds_config(train, dp_layout(train, 1), dtype)["data_types"] == {"grad_accum_dtype": "fp32"}
