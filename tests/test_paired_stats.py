"""The sweep report's paired statistics (letngpt.compare.sweep): per-seed differences against the baseline, their
95% t-interval, the learning-rate pick's margin against the seed noise, and the committed reports that
carry them. Every reference value is worked out by hand from the formulas in the test."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics

import pytest
from helpers import ROOT

from letngpt.compare.curves import Result
from letngpt.compare.sweep import Group, lr_margin, paired_difference, paired_words, t_quantile


def run(preset: str, lr: float, seed: int, final: float, steps: int = 30) -> Result:
    return Result(preset=preset, lr=lr, seed=seed, budget=steps, steps=[0.0, float(steps)], losses=[6.0, final],
                  times=[0.0, 1.0], wall_time_s=1.0)


def group(preset: str, lr: float, finals: dict[int, float]) -> Group:
    return Group(preset, lr, 30, [run(preset, lr, s, f) for s, f in finals.items()])


def test_t_quantile_matches_the_closed_forms():
    # dof 1 is Cauchy: F(t) = 1/2 + atan(t)/pi, so t = tan(0.475 pi); dof 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    # so t / sqrt(2 + t^2) = 0.95, t^2 = 2 * 0.9025 / 0.0975.
    assert t_quantile(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    assert t_quantile(2) == pytest.approx(math.sqrt(2 * 0.9025 / 0.0975), rel=1e-9)
    assert t_quantile(4) == pytest.approx(2.776445105, rel=1e-6)  # the printed table value
    assert t_quantile(2, level=0.9) == pytest.approx(math.sqrt(2 * 0.81 / 0.19), rel=1e-9)  # t/sqrt(2+t^2) = 0.9


def test_paired_difference_by_hand_interval_containing_zero():
    base = group("GPT", 1e-3, {1: 4.0, 2: 4.1, 3: 4.2})
    variant = group("nGPT", 3e-3, {1: 3.9, 2: 4.1, 3: 4.0})
    # differences -0.1, 0.0, -0.2: mean -0.1; sample std sqrt((0 + 0.01 + 0.01) / 2) = 0.1;
    # half-width t(0.975, 2) * 0.1 / sqrt(3) with t(0.975, 2) = sqrt(18.5128...) = 4.3026527...
    half = math.sqrt(2 * 0.9025 / 0.0975) * 0.1 / math.sqrt(3)
    p = paired_difference(variant, base)
    assert p["paired_seeds"] == 3
    assert p["paired_diff_mean"] == pytest.approx(-0.1, abs=1e-12)
    assert p["paired_diff_std"] == pytest.approx(0.1, abs=1e-12)
    assert p["paired_ci95_low"] == pytest.approx(-0.1 - half, abs=1e-12)
    assert p["paired_ci95_high"] == pytest.approx(-0.1 + half, abs=1e-12)
    assert p["paired_ci95_high"] == pytest.approx(0.14841, abs=1e-5)  # 4.30265 * 0.057735 - 0.1
    assert "contains 0" in paired_words("nGPT", "GPT", p)


def test_paired_difference_by_hand_interval_excluding_zero():
    base = group("GPT", 1e-3, {1: 4.0, 2: 4.1, 3: 4.2})
    variant = group("LET", 1e-2, {1: 4.3, 2: 4.3, 3: 4.45})
    # differences 0.30, 0.20, 0.25: mean 0.25, std sqrt((0.0025 + 0.0025 + 0) / 2) = 0.05
    half = math.sqrt(2 * 0.9025 / 0.0975) * 0.05 / math.sqrt(3)
    p = paired_difference(variant, base)
    assert (p["paired_diff_mean"], p["paired_diff_std"]) == (pytest.approx(0.25), pytest.approx(0.05))
    assert (p["paired_ci95_low"], p["paired_ci95_high"]) == (pytest.approx(0.25 - half), pytest.approx(0.25 + half))
    words = paired_words("LET", "GPT", p)
    assert "contains 0" not in words and "LET is higher than GPT" in words


def test_paired_difference_uses_only_the_seeds_both_finished():
    base = group("GPT", 1e-3, {1: 4.0, 2: 4.1, 3: 4.2})
    base.runs[2].error = "diverged"  # seed 3 of the baseline failed
    variant = group("nGPT", 3e-3, {1: 3.8, 2: 4.0, 3: 3.0, 4: 1.0})  # seed 4: the baseline never ran it
    p = paired_difference(variant, base)
    # differences -0.2 and -0.1 only: mean -0.15, std sqrt(2 * 0.05^2 / 1) = 0.0707..., t(0.975, 1) = 12.706...
    assert p["paired_seeds"] == 2 and p["paired_diff_mean"] == pytest.approx(-0.15)
    assert p["paired_diff_std"] == pytest.approx(math.sqrt(0.005))
    half = math.tan(0.475 * math.pi) * math.sqrt(0.005) / math.sqrt(2)
    assert p["paired_ci95_low"] == pytest.approx(-0.15 - half)
    one = paired_difference(group("nGPT", 3e-3, {1: 3.8}), base)
    assert one["paired_diff_mean"] == pytest.approx(-0.2) and one["paired_diff_std"] is None
    assert one["paired_ci95_low"] is None and "no interval" in paired_words("nGPT", "GPT", one)


def test_lr_pick_within_the_seed_noise_suggests_more_grid_seeds():
    # Grid on seed 1 only: 1e-3 -> 4.00 (best), 3e-3 -> 4.03, 1e-2 -> 4.50; the best then on seeds 2, 3.
    groups = [group("GPT", 1e-3, {1: 4.0, 2: 4.1, 3: 4.2}), group("GPT", 3e-3, {1: 4.03}),
              group("GPT", 1e-2, {1: 4.5})]
    m = lr_margin(groups, "GPT", 30, 1e-3)
    # margin 4.03 - 4.00; noise: std(4.0, 4.1, 4.2) = 0.1, times sqrt(2 / 1)
    assert m["lr_runner_up"] == 3e-3 and m["lr_grid_seeds"] == 1
    assert m["lr_margin"] == pytest.approx(0.03) and m["lr_seed_noise"] == pytest.approx(0.1 * math.sqrt(2))
    assert "--grid_seeds > 1" in m["lr_margin_note"]
    groups[1] = group("GPT", 3e-3, {1: 4.2})  # margin 0.2 > 0.1414: a resolved pick, no note
    assert lr_margin(groups, "GPT", 30, 1e-3)["lr_margin_note"] == ""


def test_lr_margin_over_two_grid_seeds():
    # Grid on seeds 1, 2: means 1e-3 -> 4.05, 3e-3 -> 4.10 (runner-up), 1e-2 -> 4.40; best on seeds 1-3.
    groups = [group("GPT", 1e-3, {1: 4.0, 2: 4.1, 3: 4.3}), group("GPT", 3e-3, {1: 4.05, 2: 4.15}),
              group("GPT", 1e-2, {1: 4.4, 2: 4.4})]
    m = lr_margin(groups, "GPT", 30, 1e-3)
    noise = statistics.stdev([4.0, 4.1, 4.3]) * math.sqrt(2 / 2)  # sqrt(0.07 / 3) = 0.1528 (mean 4.1333)
    assert m["lr_grid_seeds"] == 2 and m["lr_margin"] == pytest.approx(0.05)
    assert m["lr_seed_noise"] == pytest.approx(noise) and noise == pytest.approx(math.sqrt(0.07 / 3))
    assert "--grid_seeds > 2" in m["lr_margin_note"]
    assert lr_margin(groups[:1], "GPT", 30, 1e-3)["lr_margin"] is None  # a one-point grid has no runner-up


@pytest.mark.parametrize("sweep", ["char_tinyshakespeare", "bpe_tinyshakespeare"])
def test_committed_reports_carry_the_paired_statistics(sweep, tmp_path):
    """docs/sweeps' reports are what the report code writes from their own results.json today, and
    their paired columns agree with a hand computation from runs.csv (final val, best lr, full budget)."""
    from letngpt.compare.report import rebuild

    committed = ROOT / "docs/sweeps" / sweep
    shutil.copytree(committed, tmp_path / sweep)
    rebuild(tmp_path / sweep)
    for name in ("results.md", "results.csv", "grid.csv", "runs.csv"):
        assert (tmp_path / sweep / name).read_text() == (committed / name).read_text(), name
    md = (committed / "results.md").read_text()
    assert "## Paired differences against the baseline" in md and "95% t-interval" in md
    rows = {r["preset"]: r for r in csv.DictReader((committed / "results.csv").open())}
    runs = list(csv.DictReader((committed / "runs.csv").open()))
    full = max(int(r["steps"]) for r in runs)
    final = {(r["preset"], float(r["lr"]), int(r["seed"])): float(r["final_val_loss"]) for r in runs
             if int(r["steps"]) == full}
    base = next(p for p in rows if p.endswith("_GPT"))
    details = json.loads((committed / "results.json").read_text())
    for row in details["rows"]:  # what compare writes: the same row keys, `paired_*` included
        assert row["preset"] == base or float(rows[row["preset"]]["paired_diff_mean"]) == row["paired_diff_mean"]
        assert row["preset"] == base or "paired_note" in row
    for preset, row in rows.items():
        if preset == base:
            assert row["paired_diff_mean"] == ""
            continue
        lr, base_lr = float(row["lr"]), float(rows[base]["lr"])
        diffs = [final[(preset, lr, s)] - final[(base, base_lr, s)] for s in (1337, 1338, 1339)]
        mean = sum(diffs) / 3
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
        half = math.sqrt(2 * 0.9025 / 0.0975) * std / math.sqrt(3)  # t(0.975, 2), closed form
        assert float(row["paired_diff_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(row["paired_diff_std"]) == pytest.approx(std, abs=1e-12)
        assert float(row["paired_ci95_low"]) == pytest.approx(mean - half, abs=1e-12)
        assert float(row["paired_ci95_high"]) == pytest.approx(mean + half, abs=1e-12)
        line = next(x for x in md.splitlines() if x.startswith(f"- {preset} - {base}: "))
        assert ("contains 0" in line) == (mean - half <= 0 <= mean + half), line


def test_paired_against_another_preset_at_every_budget(capsys):
    """`python -m letngpt.compare.report FOLDER --against nGPT`: LET-nGPT minus nGPT per seed, at each budget."""
    from letngpt.compare.report import main

    main([str(ROOT / "docs/sweeps/char_tinyshakespeare"), "--against", "nGPT"])
    lines = capsys.readouterr().out.splitlines()
    runs = list(csv.DictReader((ROOT / "docs/sweeps/char_tinyshakespeare/runs.csv").open()))
    final = {(r["preset"], float(r["lr"]), int(r["steps"]), int(r["seed"])): float(r["final_val_loss"]) for r in runs}
    diffs = [final[("char_LETNGPT", 1e-2, 250, s)] - final[("char_nGPT", 3e-3, 250, s)] for s in (1337, 1338, 1339)]
    line = next(x for x in lines if x.startswith("250 steps: char_LETNGPT - char_nGPT: "))
    assert f"{sum(diffs) / 3:+.4f}" in line and len(lines) == 4 * 4  # 4 presets x 4 budgets


CHAR_SWEEP = str(ROOT / "docs/sweeps/char_tinyshakespeare")


@pytest.mark.parametrize("argv, message", [([CHAR_SWEEP, "--against", "no_such"], "no such preset"),
                                           (["/nonexistent", "--against", "nGPT"], "no results.json")])
def test_sweep_report_bad_input_is_one_line_exit_2(argv, message, capsys):
    from letngpt.compare.report import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_the_flops_footnote_says_how_the_sweep_counted_attention():
    """New sweeps count causal attention as half (letngpt.model.flops) and say so; the committed reports, made before,
    record no convention and keep their full-context wording; a mix is named as such."""
    from letngpt.compare.report import notes

    new, old = {"attention_flops": "causal_half"}, {}
    assert "every map counted, causal attention as half)" in notes({"a": new, "b": new})
    assert "every map counted)" in notes({"a": old})
    assert "mixed conventions" in notes({"a": new, "b": old})
