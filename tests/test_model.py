"""Model correctness: causality, RoPE, sphere constraints, attention equivalences, sizes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import letngpt
from letngpt.config import ModelConfig
from letngpt.model.model import LinearEnsembleAttention, apply_rope, rope_tables, unit

VARIANTS = {  # name -> (use_ngpt, num_maps)
    "GPT": (False, 1), "nGPT": (True, 1), "LETNGPT": (True, 3), "LETNGPT_maps5": (True, 5),
    "LETTransformer": (False, 3),
}


def small_cfg(use_ngpt: bool, num_maps: int, **kw) -> ModelConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64,
                num_maps=num_maps, use_ngpt=use_ngpt)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal(variant):
    torch.manual_seed(0)
    model = letngpt.build_model(small_cfg(*VARIANTS[variant])).double()
    idx = torch.randint(0, 97, (2, 32))
    logits, _ = model(idx)
    for t in (0, 10, 30):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 97, changed[:, t + 1:].shape)
        logits2, _ = model(changed)
        assert torch.equal(logits[:, : t + 1], logits2[:, : t + 1]) or \
            (logits[:, : t + 1] - logits2[:, : t + 1]).abs().max() < 1e-12
        assert (logits[:, t + 1:] - logits2[:, t + 1:]).abs().max() > 1e-6  # later tokens did change


def test_rope_is_a_rotation():
    torch.manual_seed(0)
    hd, T = 32, 50
    cos, sin = rope_tables(T, hd, 10000.0, torch.device("cpu"))
    x = torch.randn(3, T, 4, hd, dtype=torch.float64)
    rotated = apply_rope(x, cos.double(), sin.double())
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    # q at position i and k at position j: the score depends on i - j only.
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    qs = apply_rope(q.expand(1, T, 1, hd), cos.double(), sin.double())[0, :, 0]
    ks = apply_rope(k.expand(1, T, 1, hd), cos.double(), sin.double())[0, :, 0]
    for delta in (0, 3, 17):
        scores = torch.stack([qs[i] @ ks[i - delta] for i in range(delta, T)])
        assert scores.std() < 1e-5, delta  # the angle tables are fp32
    assert abs(float(qs[5] @ ks[5] - qs[5] @ ks[2])) > 1e-6  # and it does depend on i - j


def first_layer_scores(model: torch.nn.Module, idx: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Pre-softmax scores scale * q_i . k_j of the first attention call, [B, heads*maps, T, T]."""
    import letngpt.model.model as model_module

    calls = []
    real_attend = model_module.attend

    def recording_attend(q, k, v, *, scale, backend="auto"):
        calls.append((q.detach().clone(), k.detach().clone(), scale))
        return real_attend(q, k, v, scale=scale, backend=backend)

    monkeypatch.setattr(model_module, "attend", recording_attend)
    model(idx)
    q, k, scale = calls[0]
    return scale * torch.einsum("bihd,bjhd->bhij", q, k)


@pytest.mark.parametrize("variant", ["nGPT", "LETNGPT"])
def test_scores_depend_on_relative_position_only(variant, monkeypatch):
    """With a non-uniform s_qk, score(i, i - d) must not depend on i (RoPE rotates last).

    Every position holds the same token, so the first layer's q and k differ between
    positions only by RoPE; any dependence on i beyond fp32 angle rounding is a bug.
    """
    torch.manual_seed(0)
    T = 64
    model = letngpt.build_model(small_cfg(*VARIANTS[variant], block_size=T)).double()
    with torch.no_grad():
        for block in model.blocks:  # effective s_qk uniform in [0.5, 1.5], per dimension
            s_qk = block.attn.s_qk
            s_qk.weight.copy_(torch.rand_like(s_qk.weight).add(0.5) / s_qk.multiplier)
    idx = torch.full((1, T), 7)
    scores = first_layer_scores(model, idx, monkeypatch)[0]
    assert scores.shape[-1] == T
    for d in range(T - 1):
        diagonal = torch.diagonal(scores, offset=-d, dim1=-2, dim2=-1)  # score(i, i - d) over i
        spread = (diagonal.max(-1).values - diagonal.min(-1).values).max()
        assert spread < 1e-5, (d, float(spread))
    assert (scores[:, 10, 10] - scores[:, 10, 5]).abs().max() > 1e-3  # and it does depend on d


@pytest.mark.parametrize("variant", ["nGPT", "LETNGPT"])
def test_normalized_weights_and_hidden_states(variant):
    torch.manual_seed(0)
    model = letngpt.build_model(small_cfg(*VARIANTS[variant]))
    with torch.no_grad():  # knock everything off the sphere, then project back
        for p in model.parameters():
            p.mul_(1.7)
    letngpt.normalize_weights_(model)
    params = dict(model.named_parameters())
    axes = model.unit_norm_axes()
    assert len(axes) == 2 + 7 * 2
    for name, dim in axes.items():
        norms = params[name].norm(dim=dim)
        assert (norms - 1).abs().max() < 1e-6, name
    states = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, inp, out: states.append(out))
    model(torch.randint(0, 97, (2, 32)))
    assert len(states) == 2
    for h in states:
        assert (h.norm(dim=-1) - 1).abs().max() < 1e-5


def test_gpt_has_nothing_to_normalize():
    model = letngpt.build_model(small_cfg(False, 3))
    assert model.unit_norm_axes() == {}


# Which matrices read the embedding space (input projections, lm_head) and which write into it (output
# projections): the model's roles, written down here without the model's unit_norm_axes() table.
READERS = ("attn.query", "attn.key", "attn.value", "mlp.fc_u", "mlp.fc_v")
WRITERS = ("attn.proj", "mlp.proj")


def embedding_space_violations(model, tol: float = 1e-5) -> list[str]:
    """Probe every matrix as a black box with basis vectors and unit inputs.

    A writer maps each basis vector e_i to a vector of the embedding space: it must have unit norm.
    A reader's output unit j is row_j . x: for unit x it is at most 1, and over the basis vectors its
    responses (row_j . e_i)_i have norm |row_j| = 1, the value it reaches on its own direction.
    """
    d = model.config.n_embd
    bad = []
    tokens = torch.arange(model.config.vocab_size)
    if ((model.wte(tokens).norm(dim=-1) - 1).abs() > tol).any():
        bad.append("wte")
    modules = {"lm_head": model.lm_head}
    for i, block in enumerate(model.blocks):
        modules.update({f"blocks.{i}.{n}": block.get_submodule(n) for n in READERS + WRITERS})
    gen = torch.Generator().manual_seed(3)
    for name, module in modules.items():
        basis = torch.eye(module.in_features, dtype=module.weight.dtype)
        out = module(basis)  # row i: the module's output for e_i
        if name.endswith(WRITERS):
            ok = ((out.norm(dim=1) - 1).abs() <= tol).all()
        else:
            assert module.in_features == d
            unit_inputs = F.normalize(torch.randn(256, d, generator=gen, dtype=out.dtype), dim=-1)
            ok = ((out.norm(dim=0) - 1).abs() <= tol).all() and (module(unit_inputs).abs() <= 1 + tol).all()
        if not ok:
            bad.append(name)
    return bad


@pytest.mark.parametrize("num_maps", [1, 3])
def test_every_matrix_keeps_the_embedding_space_on_the_sphere(num_maps):
    """Square matrices (q, k, v, attn.proj: 64 x 64 here) cannot tell dim 0 from dim 1 by shape, so
    the check is semantic; and it fails when the writers are normalised along the wrong axis."""
    torch.manual_seed(0)
    model = letngpt.build_model(small_cfg(True, num_maps)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.7)
    letngpt.normalize_weights_(model)
    assert embedding_space_violations(model) == []
    with torch.no_grad():  # swap the axis of the (square) attention output projections
        for block in model.blocks:
            block.attn.proj.weight.copy_(unit(torch.randn_like(block.attn.proj.weight), dim=1))
    assert embedding_space_violations(model) == ["blocks.0.attn.proj", "blocks.1.attn.proj"]


def rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE on [B, T, hd], from the formula: position t turns the pair (x_i, x_{i+hd/2}) by
    t * base^(-2i/hd). cos and sin are taken in fp32, as the model documents for its tables."""
    T, hd = x.shape[1], x.shape[2]
    inv_freq = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def naive_attention(attn: LinearEnsembleAttention, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Per-head, per-map loop with an explicit mask, from the formulas with this test's own constants:
    nGPT: q = rope(s_qk * q / |q|), the same for k, s_qk = stored * sqrt(d) (stored at init: 1/sqrt(d)),
    softmax temperature sqrt(hd); GPT: softmax scale 1/sqrt(hd). M > 1: w_m = tanh(r_m), then an RMS
    norm over the head dimension (eps 1e-6) with its gain."""
    B, T, d = x.shape
    n_head, m, hd = cfg.n_head, cfg.num_maps, d // cfg.n_head
    q = (x @ attn.query.weight.T).view(B, T, n_head, m, hd)
    k = (x @ attn.key.weight.T).view(B, T, n_head, m, hd)
    v = (x @ attn.value.weight.T).view(B, T, n_head, hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(n_head):
        mixed = 0
        for j in range(m):
            qj, kj = q[:, :, h, j], k[:, :, h, j]
            if cfg.use_ngpt:
                s = (attn.s_qk.weight * math.sqrt(d)).view(n_head, m, hd)[h, j]
                qj, kj = s * qj / qj.norm(dim=-1, keepdim=True), s * kj / kj.norm(dim=-1, keepdim=True)
            scores = (rotate(qj) @ rotate(kj).transpose(1, 2)) * (math.sqrt(hd) if cfg.use_ngpt else 1 / math.sqrt(hd))
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            weight = torch.tanh(attn.ensemble_logits[j]) if m > 1 else 1.0
            mixed = mixed + weight * (probs @ v[:, :, h])
        if m > 1:
            mixed = mixed * torch.rsqrt(mixed.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.head_norm.weight
        heads.append(mixed)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T


@pytest.mark.parametrize("use_ngpt", [True, False])
@pytest.mark.parametrize("num_maps", [1, 2, 3, 5])
def test_fused_attention_equals_per_map_loop(use_ngpt, num_maps):
    torch.manual_seed(0)
    cfg = small_cfg(use_ngpt, num_maps, n_embd=64, n_head=4)
    attn = LinearEnsembleAttention(cfg).double()
    with torch.no_grad():
        if use_ngpt:
            attn.s_qk.weight.uniform_(0.05, 0.3)  # non-trivial per-dimension scales
        if num_maps > 1:
            attn.ensemble_logits.normal_()
            attn.head_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 24, 64, dtype=torch.float64)
    cos, sin = rope_tables(24, cfg.head_dim, cfg.rope_base, x.device)
    fused = attn(x, cos, sin)
    ref = naive_attention(attn, x, cfg)
    assert (fused - ref).abs().max() < 1e-10


def test_one_map_is_plain_attention():
    torch.manual_seed(0)
    cfg = small_cfg(False, 1, n_embd=64, n_head=4)
    attn = LinearEnsembleAttention(cfg)
    assert not hasattr(attn, "ensemble_logits") and not hasattr(attn, "head_norm")
    x = torch.randn(2, 16, 64)
    cos, sin = rope_tables(16, 16, 10000.0, x.device)
    q = apply_rope((x @ attn.query.weight.T).view(2, 16, 4, 16), cos, sin).transpose(1, 2)
    k = apply_rope((x @ attn.key.weight.T).view(2, 16, 4, 16), cos, sin).transpose(1, 2)
    v = (x @ attn.value.weight.T).view(2, 16, 4, 16).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), float("-inf"))
    plain = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 64) @ attn.proj.weight.T
    assert (attn(x, cos, sin) - plain).abs().max() < 1e-5


def test_ensemble_weights_start_signed_and_alternating():
    attn = LinearEnsembleAttention(small_cfg(True, 4))
    w = attn.ensemble_weights().detach()
    assert w[0] > 0 and w[1] < 0 and w[2] > 0 and w[3] < 0 and w.sum() > 0


@pytest.mark.parametrize("use_ngpt", [True, False])
def test_ensemble_mix_has_no_inert_scale(use_ngpt):
    """The head norm removes any overall factor on w, so w = tanh(r) and nothing else may learn
    a scale there; what model_stats logs is exactly tanh(r_m) per layer."""
    from letngpt.train.metrics import model_stats

    torch.manual_seed(0)
    model = letngpt.build_model(small_cfg(use_ngpt, 3))
    attn_params = {n for n, _ in model.blocks[0].attn.named_parameters()}
    mixing = {n for n in attn_params if not n.startswith(("query", "key", "value", "proj", "s_qk"))}
    assert mixing == {"ensemble_logits", "head_norm.weight"}
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.attn.ensemble_logits.copy_(torch.tensor([0.3, -1.2, 2.0]) * (i + 1))
    stats = model_stats(SimpleNamespace(module=model))
    for i in range(2):
        for m, r in enumerate([0.3, -1.2, 2.0]):
            assert abs(stats[f"ensemble/layer{i}/w{m}"] - math.tanh(r * (i + 1))) < 1e-6


def test_old_state_dict_with_ensemble_scale_loads():
    """A state dict from before the scale was removed loads strictly (the key is dropped) and
    reproduces the model it came from."""
    torch.manual_seed(0)
    model = letngpt.build_model(small_cfg(True, 3)).double()
    old = model.state_dict()
    for i in range(len(model.blocks)):
        old[f"blocks.{i}.attn.ensemble_scale"] = torch.full((1,), 3.0, dtype=torch.float64)
    torch.manual_seed(1)
    fresh = letngpt.build_model(small_cfg(True, 3)).double()
    fresh.load_state_dict(old)
    idx = torch.randint(0, 97, (2, 32))
    assert (fresh(idx)[0] - model(idx)[0]).abs().max() < 1e-12


def expected_param_count(c: ModelConfig) -> int:
    d, L, V, M, hidden = c.n_embd, c.n_layer, c.vocab_size, c.num_maps, c.hidden_dim
    per_layer = (2 * M + 2) * d * d + 3 * d * hidden
    if c.use_ngpt:
        per_layer += M * d + 2 * hidden + 2 * d  # s_qk, s_u and s_v, the two alphas
    else:
        per_layer += 2 * d  # two RMSNorm gains
    if M > 1:
        per_layer += M + c.head_dim  # r_m, head-norm gain
    return L * per_layer + 2 * V * d + (V if c.use_ngpt else d)  # + s_z or the final norm


@pytest.mark.parametrize("name", letngpt.list_configs())
def test_presets_build_on_meta_with_closed_form_size(name):
    cfg = letngpt.get_config(name).model
    with torch.device("meta"):
        model = letngpt.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_param_count(cfg)


def test_ngpt_1k_size_matches_issue_formula():
    """The built 1k nGPT (on meta) against the count written out by hand: 16 d x d matrices per layer
    (q, k, v, o and 3 x 4d MLP), untied embedding and lm_head, and the scaling vectors."""
    with torch.device("meta"):
        model = letngpt.build_model(letngpt.get_config("nGPT_1kctx_10k_lr30e-4").model)
    d, vocab = 1024, 50304
    vectors = 24 * (d + 2 * 4 * d + 2 * d) + vocab  # per layer s_qk, s_u and s_v, two alphas; s_z
    assert sum(p.numel() for p in model.parameters()) == 24 * 16 * d * d + 2 * vocab * d + vectors


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_model_overfits_one_batch(variant):
    torch.manual_seed(0)
    use_ngpt, m = VARIANTS[variant]
    model = letngpt.build_model(small_cfg(use_ngpt, m, n_layer=2, n_embd=64, block_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3 if use_ngpt else 1e-3, weight_decay=0.0)
    idx = torch.randint(0, 97, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    first = None
    for _ in range(200):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        letngpt.normalize_weights_(model)
    assert first > 4.0  # about ln(97) = 4.57 at init
    assert loss.item() < 0.25 * first, (first, loss.item())


def test_flops_per_token_hand_count():
    c = ModelConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=4, num_maps=3)
    # per layer: q,k 3*16 each, v 16, o 16, mlp 3*4*16 -> 128 + 192 = 320; lm_head 400.
    matmul = 2 * 320 + 400
    # layers * (qk + pv) * 2 FLOPs per multiply-add * (t/2 keys on average, causal) * d * maps
    attention = 2 * 2 * 2 * (8 / 2) * 4 * 3
    assert letngpt.flops_per_token(c) == 3 * (2 * matmul + attention)


def test_unit_handles_zero_vectors():
    out = unit(torch.zeros(3, 4))
    assert torch.isfinite(out).all()


def test_head_dim_with_three_maps_and_eight_heads():
    """The 1k LET-nGPT's attention as built: 8 heads of 128 with 3 query/key maps each, one value per
    head, and per-head mixing weights and norm."""
    with torch.device("meta"):
        model = letngpt.build_model(letngpt.get_config("LETNGPT_1kctx_10k_lr30e-4").model)
    attn = model.blocks[0].attn
    assert (attn.head_dim, attn.num_maps) == (128, 3)
    assert attn.query.weight.shape == attn.key.weight.shape == (8 * 3 * 128, 1024)
    assert attn.value.weight.shape == attn.proj.weight.shape == (1024, 1024)
    assert attn.ensemble_logits.shape == (3,) and attn.head_norm.weight.shape == (128,)
    assert attn.s_qk.weight.shape == (8 * 3 * 128,)


def test_attention_choice_says_which_kernel_and_why(monkeypatch):
    """Rank 0's first line (issue 22): flash-attn where it can run, else SDPA and every reason it cannot;
    attn_backend=flash where it cannot run is a one-line ConfigError at start."""
    from letngpt.config import ConfigError
    from letngpt.model import kernels

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(kernels, "flash_attn_version", lambda: None)
    line = kernels.attention_choice("auto", cpu, torch.float32)
    assert line.startswith("attention: PyTorch SDPA, not flash-attn (flash-attn is not installed; the device is cpu, "
                           "not CUDA; the dtype is float32, not bf16/fp16)")
    assert "(attn_backend=sdpa)" in kernels.attention_choice("sdpa", cuda, torch.bfloat16)
    with pytest.raises(ConfigError, match=r"^attn_backend=flash cannot run: flash-attn is not installed; use"):
        kernels.attention_choice("flash", cuda, torch.bfloat16)
    monkeypatch.setattr(kernels, "flash_attn_version", lambda: "2.6.3")
    assert kernels.attention_choice("auto", cuda, torch.bfloat16) == (
        "attention: flash-attn 2.6.3 (attn_backend=auto; installed, CUDA, torch.bfloat16)")
    assert "2.6.3 < 2.7 breaks the compiled graph" in kernels.attention_choice("auto", cuda, torch.bfloat16, True)
    monkeypatch.setattr(kernels, "flash_attn_version", lambda: "2.8.0.post2")
    assert "WARNING" not in kernels.attention_choice("flash", cuda, torch.float16, True)
    assert "the dtype is float32" in kernels.attention_choice("auto", cuda, torch.float32)
