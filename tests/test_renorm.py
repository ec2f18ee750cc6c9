"""Collective renormalisation (letngpt.renorm.collective) against the naive gather-normalise-scatter
method (letngpt.renorm), on real DeepSpeed engines at ZeRO 0-3 with 2 and 4 CPU ranks (gloo).

The multi-rank checks run in two torchrun launches (tests/workers/renorm_worker.py, one per DP
size) shared by the tests below; the fragment arithmetic and the axis check are tested in-process.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import check_ok, run_train

from letngpt.model import unit
from letngpt.renorm.collective import _add_square_sums_, _divide_, _Target, check_normalized_axis

WORKER = "tests/workers/renorm_worker.py"
# case = ZeRO stage[:options]; bf16 = bf16 weights (fp32 masters; the shipped recipes accumulate gradients
# in fp32 at ZeRO 1-3), persist=N = ZeRO-3 persistence threshold, tp=N = megatron tensor parallelism,
# axis_check = see below.
DP2_CASES = ["z0", "z1", "z2:axis_check", "z3:axis_check", "z0:bf16", "z1:bf16", "z2:bf16",
             "z3:bf16:persist=2000"]
# TP 2 x DP 2 last: DeepSpeed keeps an engine's mpu globally. The DP group is then a subgroup.
DP4_CASES = ["z2", "z3:persist=2000", "z1:tp=2", "z3:tp=2"]
FP32_TOL = 1e-6  # collective vs naive, full fp32 masters and compute weights
SPHERE_TOL = 1e-5
# bf16 compute weights: ZeRO 1/2 (and the BF16_Optimizer) rescale their bf16 copy instead of re-casting the
# master, which lands one rounding step away from the cast master: observed at most 2^-8 = 3.9e-3 (one bf16
# ulp for entries in [0.5, 1), two in [0.25, 0.5)). 8e-3 is about twice that, as an absolute bound: two
# ulps only for entries in [0.5, 1), four in [0.25, 0.5), and so on for smaller ones.
BF16_TOL = 8e-3


def run_cases(tmp_path_factory, nproc: int, cases: list[str]) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp(f"renorm_dp{nproc}")
    check_ok(run_train([f"--out={out}", f"--cases={','.join(cases)}", "--steps=2"], nproc=nproc, script=WORKER,
                       timeout=240))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert all(r["world_size"] == nproc for r in ranks)
    return {case: [r["results"][i] for r in ranks] for i, case in enumerate(cases)}


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    return run_cases(tmp_path_factory, 2, DP2_CASES)


@pytest.fixture(scope="module")
def dp4(tmp_path_factory):
    return run_cases(tmp_path_factory, 4, DP4_CASES)


def steps(per_rank: list[dict]) -> list[dict]:
    return [s for r in per_rank for s in r["steps"]]


def check_against_naive(per_rank: list[dict], stage: int, bf16: bool) -> None:
    for s in steps(per_rank):
        assert s["master_changed"] > 1e-3  # the optimizer did move the weights off the sphere
        assert s["master_off_sphere"] < SPHERE_TOL
        assert s["master_vs_exact"] < FP32_TOL
        # Bytes: one all-reduce of 4 bytes per normalised row/column, and nothing else went over the wire.
        assert s["returned_bytes"] == s["measured_bytes"] == (per_rank[0]["expected_bytes"] if stage else 0)
        assert all(name == "all_reduce" for name, _ in s["calls"]) and len(s["calls"]) == (1 if stage else 0)
        if stage == 0 and bf16:
            # The naive method cannot see DeepSpeed's fp16/bf16 optimizer's masters at ZeRO 0 (no
            # _hp_mapping): it only normalises the bf16 weights. Compare with the exact projection.
            assert s["compute_vs_exact"] < BF16_TOL
        else:
            assert s["master_vs_naive"] < FP32_TOL
            assert s["compute_vs_naive"] < (BF16_TOL if bf16 else FP32_TOL)
        if bf16:
            assert s["compute_off_sphere"] < 1e-2
        else:
            assert s["compute_off_sphere"] < SPHERE_TOL
            assert s["master_vs_compute"] <= 1e-7  # lp == master before the call, so after it too


@pytest.mark.slow
@pytest.mark.parametrize("case", DP2_CASES)
def test_collective_matches_naive_dp2(dp2, case):
    check_against_naive(dp2[case], stage=int(case[1]), bf16="bf16" in case)


@pytest.mark.slow
@pytest.mark.parametrize("case", DP4_CASES)
def test_collective_matches_naive_dp4(dp4, case):
    check_against_naive(dp4[case], stage=int(case[1]), bf16="bf16" in case)


@pytest.mark.slow
def test_every_deepspeed_optimizer_is_covered(dp2):
    optimizers = {case: dp2[case][0]["optimizer"] for case in DP2_CASES}
    assert optimizers["z0"] == "AdamW"  # plain torch optimizer on the weights
    assert optimizers["z0:bf16"] == "FP16_UnfusedOptimizer"  # full fp32 masters on every rank
    assert optimizers["z1:bf16"] == "BF16_Optimizer"  # fp32 accumulation at ZeRO 1; partitioned, _hp_mapping
    assert optimizers["z2:bf16"] == optimizers["z1"] == "DeepSpeedZeroOptimizer"
    assert optimizers["z3:axis_check"] == "DeepSpeedZeroOptimizer_Stage3"


@pytest.mark.slow
def test_partitions_cut_rows_mid_row(dp2, dp4):
    """The interesting path is exercised: rows (and columns) split across ranks, mid-row."""
    def cuts(per_rank):
        return [c for r in per_rank for c in r["cuts"]]

    # ZeRO 1/2, DP 4: a normalised row split mid-row (dim 1) and a column-normalised matrix split (dim 0).
    z2 = cuts(dp4["z2"])
    assert any(c["mid_row"] and c["dim"] == 1 for c in z2)
    assert any(c["split"] and c["dim"] == 0 for c in z2)
    # ZeRO 1/2, DP 2: a matrix split across ranks (at a row boundary: see the worker's note).
    assert any(c["split"] for c in cuts(dp2["z1"]))
    # ZeRO 3: every matrix is split; wte's 131 rows are cut mid-row.
    z3 = cuts(dp2["z3:axis_check"])
    assert any(c["mid_row"] and c["name"] == "wte.weight" for c in z3)
    assert all(c["split"] for c in z3)
    # ZeRO 3 with both kinds of parameter: gathered ("persistent") and partitioned only.
    persistent = dp4["z3:persist=2000"][0]["persistent"]
    assert 0 < len(persistent) < len(dp4["z3:persist=2000"][0]["cuts"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z2:axis_check", "z3:axis_check"])
def test_axis_assumption_is_checked_on_engines(dp2, case):
    for r in dp2[case]:
        assert r["axis_check"] == {"wrong_axis": True, "tp_sharded_axis": True}


def test_axis_check_raises():
    check_normalized_axis("w", (100, 64), 1, 64)
    check_normalized_axis("w", (64, 100), 0, 64, tp_dim=1)  # TP may shard the other axis
    with pytest.raises(ValueError, match="extra all-reduce over the TP group"):
        check_normalized_axis("w", (100, 64), 0, 64)
    with pytest.raises(ValueError, match="sharded by tensor parallelism"):
        check_normalized_axis("w", (100, 64), 1, 64, tp_dim=1)
    with pytest.raises(ValueError):
        check_normalized_axis("w", (64,), 0, 64)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (1, 9), (9, 1)])
def test_fragment_arithmetic_matches_unit(shape, dim):
    """Cut a flat matrix into fragments at every kind of position (mid-row, row boundary, tiny,
    empty); per-fragment partial sums, summed, then per-fragment division must equal unit()."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    numel = w.numel()
    t = _Target("w", torch.nn.Parameter(w), dim, shape, slice(0, shape[1 - dim]))
    for trial in range(20):
        k = int(torch.randint(1, 5, (1,), generator=gen))
        bounds = sorted({0, numel, *torch.randint(0, numel + 1, (k,), generator=gen).tolist()})
        if trial == 0:
            bounds = [0, 1, numel - 1, numel]  # one-element fragments at both ends
        frags = [(a, w.flatten()[a:b].clone()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        sums = torch.zeros(shape[1 - dim])
        for start, frag in frags:
            _add_square_sums_(sums, frag, start, t)
        norms = sums.sqrt().clamp_min(1e-12)
        torch.testing.assert_close(norms, w.norm(dim=dim), rtol=1e-6, atol=1e-7)
        for start, frag in frags:
            _divide_(frag, start, t, norms)
        torch.testing.assert_close(torch.cat([f for _, f in frags]).view(shape), unit(w, dim=dim),
                                   rtol=1e-6, atol=1e-7)


def _ops(fn) -> int:
    from bench.renorm import count_ops

    return count_ops(fn)["host_ops"]


@pytest.mark.parametrize("num_maps", [1, 3])
def test_grouped_renorm_launches_scale_with_shapes_not_matrices(num_maps):
    """The local pass (ZeRO 0 in fp32: whole weights) normalises every matrix as unit() does, with as
    many ops for 6 layers as for 2: one stacked pass per shape, not one per matrix (issue 22)."""
    from letngpt.config import ModelConfig
    from letngpt.model import build_model
    from letngpt.renorm.collective import _renorm_weights, _targets

    counts = []
    for n_layer in (2, 6):
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=96, block_size=8, n_layer=n_layer, n_head=2, n_embd=16,
                                        num_maps=num_maps, use_ngpt=True))
        axes, params = model.unit_norm_axes(), dict(model.named_parameters())
        with torch.no_grad():
            for p in params.values():
                p.mul_(torch.rand_like(p) + 0.5)  # off the sphere, row by row
        expected = {n: params[n].detach() / params[n].detach().norm(dim=d, keepdim=True) for n, d in axes.items()}
        targets = _targets(model)
        with torch.no_grad():
            counts.append(_ops(lambda: _renorm_weights(targets)))  # noqa: B023 (called at once)
        for name in axes:
            torch.testing.assert_close(params[name].detach(), expected[name], rtol=0, atol=1e-6)
    assert counts[0] == counts[1], counts


def test_op_count_leaves_out_views_and_nested_ops():
    """bench.renorm's instrument: ops that compute, once each (a view or a no-op .to() launches nothing)."""
    x = torch.zeros(4, 6)

    def work():
        v = x.view(24).narrow(0, 0, 12).view(3, 4).to(torch.float32)  # views and a no-op .to(): 0
        v.add_(1)  # 1
        torch.linalg.vector_norm(x, dim=1)  # 1 (its internal ops are not counted again)
        x.to(torch.float64)  # a real conversion: 1

    assert _ops(work) == 3
    assert float(x.sum()) == 12
