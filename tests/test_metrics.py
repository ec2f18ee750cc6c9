"""Throughput and MFU: means over windows rather than one step, and the peak table."""

from __future__ import annotations

import json

import pytest
from helpers import TINY, check_ok, read_metrics, run_train

import letngpt
from letngpt.model.flops import PEAK_TFLOPS, peak_tflops
from letngpt.train.metrics import Throughput

# Device name as torch.cuda.get_device_name reports it -> dense bf16 peak, written from NVIDIA's
# datasheets / whitepapers (dense figure, or half the 2:4-sparse one), not from letngpt's table.
VENDOR_DENSE_BF16 = {
    "NVIDIA H100 80GB HBM3": 989.4,  # H100 SXM5: 1979 sparse
    "NVIDIA H100 PCIe": 756.5,  # 1513 sparse
    "NVIDIA H100 NVL": 835.5,  # 1671 sparse
    "NVIDIA H200": 989.4,  # SXM: 1979 sparse
    "NVIDIA H200 NVL": 835.5,  # 1671 sparse
    "NVIDIA GH200 480GB": 989.4,  # 1979 sparse
    "NVIDIA B200": 2250.0,  # 4.5 PFLOPS sparse
    "NVIDIA A100-SXM4-80GB": 312.0,  # 624 sparse, SXM and PCIe alike
    "NVIDIA A10": 125.0,  # 250 sparse
    "NVIDIA L40S": 362.05,  # 733 sparse
    "NVIDIA L40": 181.05,  # 362.1 sparse
    "NVIDIA L4": 121.0,  # 242 sparse
    "NVIDIA GeForce RTX 4090": 165.2,  # fp32 accumulate, 330.4 sparse
}
TABLE_KEY = {"NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA GH200 480GB": "GH200",
             "NVIDIA B200": "B200", "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA A10": "A10", "NVIDIA L40S": "L40S",
             "NVIDIA L40": "L40", "NVIDIA L4": "L4", "NVIDIA GeForce RTX 4090": "RTX 4090"}


@pytest.mark.parametrize("device_name", list(VENDOR_DENSE_BF16))
def test_peak_is_the_vendor_dense_bf16_figure(device_name):
    assert peak_tflops(device_name) == VENDOR_DENSE_BF16[device_name]


def test_every_table_entry_is_checked():
    assert sorted(TABLE_KEY.values()) == sorted(PEAK_TFLOPS)


@pytest.mark.parametrize("device_name", ["NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3"])
def test_variants_of_a_name_match(device_name):
    assert peak_tflops(device_name) == (312.0 if "A100" in device_name else 989.4)


@pytest.mark.parametrize("device_name", ["NVIDIA A10G", "Tesla V100-SXM2-32GB", "NVIDIA H20", "NVIDIA H800",
                                         "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA A100-SXM4-40GB MIG 3g.20gb",
                                         "cpu"])
def test_unknown_or_unpublished_devices_have_no_peak(device_name):
    assert peak_tflops(device_name) is None  # "A10" must not match "A10G"; a MIG slice is not the GPU


def test_unknown_gpu_says_so_once_and_reports_no_mfu(monkeypatch, caplog):
    """An unlisted GPU gets no MFU (not one against a wrong peak) and one line saying what to pass."""
    import torch

    from letngpt.train import metrics

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H800")
    monkeypatch.setattr(metrics, "_UNKNOWN_PEAKS", set())
    cfg, cuda = letngpt.ModelConfig(), torch.device("cuda", 0)
    with caplog.at_level("WARNING", logger="letngpt"):
        assert metrics.mfu(cfg, 1e4, 1, cuda) is None
        assert metrics.mfu(cfg, 1e4, 1, cuda) is None
    assert [r.getMessage() for r in caplog.records] == ["MFU: unknown peak for NVIDIA H800; pass --peak_tflops"]
    assert metrics.mfu(cfg, 1e4, 2, cuda, peak_override=100.0) == pytest.approx(
        letngpt.flops_per_token(cfg) * 1e4 / (100e12 * 2))


def test_throughput_is_a_mean_over_the_window_and_skips_warmup():
    tp = Throughput(tokens_per_step=100, warmup=3)
    for t in (1.0, 2.0, 3.0):
        tp.add(t)
    assert tp.overall() is None  # only warm-up steps so far
    assert tp.window() == (100 * 3 / 6.0, 2.0)  # total tokens / total time, not the last step's 100/3
    for t in (0.5, 1.5):
        tp.add(t)
    assert tp.window() == (100.0, 1.0)  # the window started afresh
    assert tp.overall() == 100 * 2 / 2.0  # steps 4 and 5 only


def test_trainer_logs_window_means_and_summarises_after_warmup(byte_data, tmp_path):
    """With scripted step times 0.1 k s, log_interval 3: every log line is its window's mean, and
    the summary's tokens/s and MFU average steps 4.. only."""
    args = [*TINY, f"--data_dir={byte_data}", f"--out_dir={tmp_path}", "--max_iters=9", "--log_interval=3",
            "--zero_stage=0", "--peak_tflops=0.001"]
    check_ok(run_train(args, script="tests/workers/train_scripted_times.py"))
    scripted = json.loads((tmp_path / "scripted.json").read_text())
    times, summary = scripted["step_times"], scripted["summary"]
    assert len(times) == 9
    tokens_per_step = 4 * 64 * 2  # batch_size * block_size * gradient_accumulation_steps
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [3, 6, 9]
    for r in rows:
        window = times[r["step"] - 3:r["step"]]
        assert r["step_time_s"] == pytest.approx(sum(window) / 3, rel=1e-12)
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step * 3 / sum(window), rel=1e-12)
    steady = tokens_per_step * 6 / sum(times[3:])
    assert summary["tokens_per_s"] == pytest.approx(steady, rel=1e-12)
    cfg = letngpt.get_config("tiny_LETNGPT").model
    cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size = 256, 2, 2, 64, 64
    assert summary["mfu"] == pytest.approx(letngpt.flops_per_token(cfg) * steady / 1e9, rel=1e-12)
    assert rows[-1]["mfu"] == pytest.approx(letngpt.flops_per_token(cfg) * rows[-1]["tokens_per_s"] / 1e9, rel=1e-12)


def test_resume_drops_the_records_it_writes_again(tmp_path):
    """metrics.jsonl after a kill -9: records up to step 7 (the last line torn), last checkpoint at 5.
    Resuming at 5 keeps train/model records up to 5 and val records before 5 (val at 5 is evaluated
    again before step 6), and no torn line."""
    from letngpt.train.metrics import drop_redone_records

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "kind": "train", "train/loss": 1.0} for s in range(1, 8)]
    rows += [{"step": s, "kind": "val", "val/loss": 2.0} for s in (0, 5)] + [{"step": 5, "kind": "model", "w": 0.1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "ki')
    assert drop_redone_records(path, 5) == 4  # train 6 and 7, val 5, the torn line
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in kept] == [("train", s) for s in range(1, 6)] + [("val", 0), ("model", 5)]
    assert drop_redone_records(path, 5) == 0 and drop_redone_records(tmp_path / "none.jsonl", 5) == 0
