"""The convergence comparison: its arithmetic on synthetic curves, the report files, and a real smoke run."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, check_ok, subprocess_env

from letngpt.compare import main as compare_main
from letngpt.report import (
    NOT_REACHED,
    Result,
    build_table,
    markdown_table,
    pick_baseline,
    select_best,
    step_ratio,
    steps_to_target,
    training_time_at,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMOKE_FLAGS = ["--vocab_size=256", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=2",
               "--gradient_accumulation_steps=1"]
PRESETS = ["tiny_GPT", "tiny_nGPT", "tiny_LETNGPT", "tiny_LETTransformer"]


# --- steps to target ---------------------------------------------------------------------------------------


def test_crossing_exactly_at_an_eval_point():
    assert steps_to_target([0, 10, 20, 30], [5.0, 4.0, 3.0, 2.0], 3.0) == 20.0


def test_crossing_between_eval_points_is_interpolated():
    # 4.0 at step 10, 2.0 at step 20: 3.5 is a quarter of the way down.
    assert steps_to_target([0, 10, 20], [5.0, 4.0, 2.0], 3.5) == pytest.approx(12.5)
    # Uneven eval spacing: from (10, 4.0) to (40, 1.0), 3.0 is a third of the way.
    assert steps_to_target([0, 10, 40], [5.0, 4.0, 1.0], 3.0) == pytest.approx(20.0)


def test_never_reached():
    assert steps_to_target([0, 10, 20], [5.0, 4.0, 3.5], 3.0) is None
    assert steps_to_target([], [], 3.0) is None


def test_reached_at_step_zero():
    assert steps_to_target([0, 10], [2.0, 1.0], 3.0) == 0.0


def test_first_crossing_wins_on_a_noisy_curve():
    # Reaches 3.0 between 10 and 20, goes back up, then down again: the first crossing counts.
    assert steps_to_target([0, 10, 20, 30, 40], [5.0, 4.0, 2.0, 3.5, 1.0], 3.0) == pytest.approx(15.0)


def test_nan_points_are_not_a_crossing():
    assert steps_to_target([0, 10, 20], [5.0, math.nan, 2.0], 3.0) == 20.0


def test_ratio():
    assert step_ratio(100, 25) == 4.0  # four times fewer steps than the baseline
    assert step_ratio(100, 200) == 0.5
    assert step_ratio(100, None) is None and step_ratio(None, 10) is None
    assert step_ratio(100, 0) == math.inf and step_ratio(0, 0) == 1.0


def test_training_time_from_logged_step_times():
    every_step = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert training_time_at(every_step, [0, 2, 4]) == [0.0, 3.0, 10.0]
    # Logged every 2 steps: each logged time stands for the steps since the previous log.
    assert training_time_at([(2, 1.0), (4, 2.0)], [0, 2, 3, 4]) == [0.0, 2.0, 4.0, 6.0]
    assert all(math.isnan(t) for t in training_time_at([], [0, 1]))


def test_pick_baseline():
    assert pick_baseline(PRESETS) == "tiny_GPT"
    assert pick_baseline(["LETNGPT_1kctx_10k_lr30e-4", "GPT_1kctx_10k_lr30e-4"]) == "GPT_1kctx_10k_lr30e-4"
    assert pick_baseline(["tiny_nGPT", "tiny_LETNGPT"]) is None


# --- the table ---------------------------------------------------------------------------------------------


def curve(preset: str, lr: float, losses: list[float], interval: int = 10, step_time: float = 0.5) -> Result:
    steps = [float(i * interval) for i in range(len(losses))]
    return Result(preset=preset, lr=lr, steps=steps, losses=losses, times=[s * step_time for s in steps],
                  tokens_per_s=1000.0 / step_time, wall_time_s=steps[-1] * step_time + 1.0, run_id=f"id-{preset}")


def synthetic_results() -> list[Result]:
    return [
        curve("tiny_GPT", 1e-3, [6.0, 5.0, 4.5, 4.0]),  # target 4.0 at step 30
        curve("tiny_GPT", 3e-3, [6.0, 5.5, 5.0, 4.8]),  # worse lr: not selected
        curve("tiny_nGPT", 3e-3, [6.0, 4.5, 3.5, 3.0], step_time=0.6),  # 4.0 halfway between 10 and 20
        curve("tiny_LETNGPT", 3e-3, [6.0, 4.0, 3.0, 2.5], step_time=0.8),  # exactly at step 10
        curve("tiny_LETTransformer", 1e-3, [6.0, 5.5, 5.0, 4.6]),  # never reaches 4.0
    ]


def test_select_best_by_final_val_loss():
    failed = Result(preset="tiny_LETNGPT", lr=1e-2, error="exit code 1\nboom")
    best = select_best([*synthetic_results(), failed])
    assert [(r.preset, r.lr) for r in best] == [("tiny_GPT", 1e-3), ("tiny_nGPT", 3e-3), ("tiny_LETNGPT", 3e-3),
                                                ("tiny_LETTransformer", 1e-3)]
    assert select_best([failed])[0] is failed


def test_build_table():
    rows, target = build_table(select_best(synthetic_results()), "tiny_GPT")
    assert target == 4.0
    by = {r["preset"]: r for r in rows}
    assert by["tiny_GPT"]["steps_to_target"] == 30.0 and by["tiny_GPT"]["step_ratio_vs_baseline"] == 1.0
    assert by["tiny_nGPT"]["steps_to_target"] == pytest.approx(15.0)
    assert by["tiny_nGPT"]["step_ratio_vs_baseline"] == pytest.approx(2.0)
    assert by["tiny_nGPT"]["time_to_target_s"] == pytest.approx(15.0 * 0.6)
    assert by["tiny_LETNGPT"]["steps_to_target"] == 10.0 and by["tiny_LETNGPT"]["step_ratio_vs_baseline"] == 3.0
    assert by["tiny_LETTransformer"]["steps_to_target"] is None and not by["tiny_LETTransformer"]["reached"]
    assert by["tiny_LETTransformer"]["step_ratio_vs_baseline"] is None
    table = markdown_table(rows)
    assert NOT_REACHED in table and "| tiny_nGPT | 0.003 | 3.0000 | 15.0 | 2.00 |" in table


def test_table_without_a_successful_baseline():
    results = [Result(preset="tiny_GPT", lr=1e-3, error="exit code 1"), curve("tiny_nGPT", 3e-3, [6.0, 5.0])]
    rows, target = build_table(select_best(results), "tiny_GPT")
    assert target is None and rows[0]["failed"] and rows[1]["steps_to_target"] is None
    table = markdown_table(rows)
    assert "| tiny_GPT | 0.001 | failed |" in table and "| tiny_nGPT | 0.003 | 5.0000 | n/a | n/a |" in table
    assert NOT_REACHED not in table


def test_report_files_are_readable(tmp_path):
    import matplotlib.image

    results = [*synthetic_results(), Result(preset="tiny_LETNGPT", lr=1e-2, error="exit code 1\nboom")]
    report = write_report(results, tmp_path, "tiny_GPT", header="# Synthetic", title="synthetic curves")
    png = tmp_path / "val_loss.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 2 * image.shape[0] * 0.9  # two panels side by side
    assert image[..., :3].std() > 0.05  # not a blank canvas
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["preset"] for r in rows] == ["tiny_GPT", "tiny_nGPT", "tiny_LETNGPT", "tiny_LETTransformer"]
    assert float(rows[1]["steps_to_target"]) == pytest.approx(15.0)
    assert float(rows[2]["step_ratio_vs_baseline"]) == pytest.approx(3.0)
    assert rows[3]["steps_to_target"] == NOT_REACHED and rows[3]["step_ratio_vs_baseline"] == ""
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Synthetic") and report["table"] in md and "boom" in md
    table_lines = [line for line in md.splitlines() if line.startswith("| tiny_")]
    assert len(table_lines) == 4 and all(line.count("|") == 9 for line in table_lines)
    with open(tmp_path / "sweep.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6


# --- the command line --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--presets", "tiny_GPT,no_such_preset"], "unknown config"),
    (["--lrs", "1e-3,fast"], "--lrs"),
    (["--", "--max_iters=5"], "max_iters"),
    (["--", "--no_such_flag=1"], "unknown option"),
    (["--baseline", "tiny_nGPT", "--presets", "tiny_GPT"], "--baseline"),
])
def test_bad_arguments_stop_before_training(argv, message, tmp_path, capsys):
    assert compare_main(["--data_dir", str(tmp_path), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- the real tool, end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_comparison(byte_data, tmp_path):
    out = tmp_path / "compare"
    cmd = [sys.executable, "-m", "letngpt.compare", "--data_dir", str(byte_data), "--max_iters", "6",
           "--eval_interval", "3", "--eval_iters", "1", "--out", str(out), "--", *SMOKE_FLAGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    check_ok(proc)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| tiny_LETTransformer |")  # the table comes last

    assert matplotlib_png_ok(out / "val_loss.png")
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["preset"] for r in rows] == PRESETS
    assert rows[0]["steps_to_target"] == "6.0" and rows[0]["step_ratio_vs_baseline"] == "1.0"
    assert all(math.isfinite(float(r["final_val_loss"])) and float(r["tokens_per_s"]) > 0 for r in rows)

    details = json.loads((out / "results.json").read_text())
    for run in details["runs"]:
        assert run["steps"] == [0.0, 3.0, 6.0] and run["error"] is None  # the val curve, read from MLflow

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("letngpt-compare")
    parent = client.get_run(details["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["baseline"] == "tiny_GPT"
    assert parent.data.metrics["tiny_GPT/step_ratio_vs_baseline"] == 1.0
    assert {"val_loss.png", "results.csv", "results.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["preset"] for c in children) == sorted(PRESETS)
    assert all(c.info.status == "FINISHED" for c in children)


def matplotlib_png_ok(path: Path) -> bool:
    import matplotlib.image

    return path.read_bytes()[:8] == PNG_SIGNATURE and matplotlib.image.imread(path).shape[0] > 300


# Stands in for train.py: tiny_nGPT crashes; any other preset "trains" instantly, writing what the trainer
# writes but logging nothing to MLflow, so the comparison falls back to the val losses in the log.
FAKE_TRAINER = """
import json, sys
from pathlib import Path
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
if args["config"] == "tiny_nGPT":
    sys.exit("simulated crash in " + args["config"])
out = Path(args["out_dir"])
rows = [{"step": s, "kind": "val", "val/loss": loss} for s, loss in ((0, 5.0), (2, 4.0), (4, 3.0))]
rows += [{"step": s, "kind": "train", "step_time_s": 0.5, "tokens_per_s": 100.0} for s in range(1, 5)]
(out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
(out / "summary.json").write_text(json.dumps({"tracking_run_id": None, "wall_time_s": 3.0, "tokens_per_s": 1.0}))
"""


def test_a_failing_variant_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    from letngpt import compare

    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINER)
    monkeypatch.setattr(compare, "TRAIN_PY", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data, out = tmp_path / "data", tmp_path / "compare"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    code = compare.main(["--data_dir", str(data), "--presets", "tiny_nGPT,tiny_GPT,tiny_LETNGPT", "--max_iters", "4",
                         "--eval_interval", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "simulated crash in tiny_nGPT" in captured.err and "1 run(s) failed" in captured.out
    md = (out / "results.md").read_text()
    assert "tiny_nGPT lr 0.003 failed" in md and "simulated crash" in md
    with open(out / "results.csv", newline="") as f:
        rows = {r["preset"]: r for r in csv.DictReader(f)}
    assert rows["tiny_nGPT"]["final_val_loss"] == "failed"
    assert float(rows["tiny_GPT"]["final_val_loss"]) == 3.0 and rows["tiny_GPT"]["steps_to_target"] == "4.0"
    assert float(rows["tiny_LETNGPT"]["time_to_target_s"]) == 2.0  # 4 steps of 0.5 s
    assert captured.out.rstrip().splitlines()[-1].startswith("| tiny_LETNGPT |")

    from mlflow import MlflowClient

    parent_id = json.loads((out / "results.json").read_text())["parent_run_id"]
    assert MlflowClient(f"sqlite:///{out}/mlflow.db").get_run(parent_id).info.status == "FAILED"
