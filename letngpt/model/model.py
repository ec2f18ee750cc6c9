"""LET-nGPT: the normalized Transformer (nGPT) with Linear Ensemble Attention, in one file.

Switches:
  use_ngpt=1  nGPT (Loshchilov et al., arXiv 2410.01131), as NVIDIA's reference code: hidden
              states and the embedding-axis rows of every matrix live on the unit sphere,
              residual updates are h <- norm(h + |alpha| * (norm(block(h)) - h)). One
              deliberate deviation: RoPE rotates q and k after the s_qk scaling, not before,
              so attention scores stay relative (see LinearEnsembleAttention.forward).
  use_ngpt=0  a pre-norm GPT (RMSNorm) with the same SwiGLU MLP and RoPE, the fair baseline.
  num_maps=M  each head has M query/key projections sharing one value projection, and
              mixes its M softmax maps with learned signed weights (Linear Ensemble
              Attention, a generalisation of the Differential Transformer). M = 1 is plain
              attention: no mixing weights, no head norm.

The model knows nothing of parallelism. Reshapes infer the number of heads from tensor
shapes so that a tensor-parallel wrapper (letngpt/parallel) can hand it a shard of heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from letngpt.config import ModelConfig
from letngpt.model.kernels import attend


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def unit(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise along `dim` (the paper's norm(.)); the norm is taken in fp32 or better.

    The norm accumulates in fp32 inside the kernel (`dtype=`) rather than on an fp32 copy of x:
    autograd would keep such a copy for backward, twice the bytes of every bf16 activation nGPT
    normalises (8 per block). This way backward keeps only x itself and the [..., 1] norm."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype).clamp_min(eps)
    return x / norm.to(x.dtype)


class ScaledVector(nn.Module):
    """nGPT's reparametrised per-dimension scale: stores `scale`, acts as `init`.

    The stored value starts at `scale` and the effective value is stored * init/scale.
    With a small `scale` the optimizer's step on the effective value is amplified by
    init/scale, which is how nGPT gives these vectors a learning rate of their own
    while one global Adam learning rate drives everything.
    """

    def __init__(self, size: int, init: float, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), scale))
        self.multiplier = init / scale
        self.init_value, self.init_scale = init, scale

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init_scale)

    def forward(self) -> torch.Tensor:
        return self.weight * self.multiplier


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension: per token, never across time."""

    def __init__(self, dim: int, eps: float = 1e-6, gain: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), gain))
        self.eps, self.init_gain = eps, gain

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = at_least_fp32(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos/sin of the rotation angles t * base^(-2i/d), each [seq_len, head_dim/2], fp32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair of a [B, T, heads, d] tensor by its position's angle.

    A rotation in d/2 orthogonal planes: norms are preserved exactly, and
    rope(q, i) . rope(k, j) depends on i - j only (the prototype's version was neither).
    """
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class LinearEnsembleAttention(nn.Module):
    """Multi-head attention where head h mixes M maps: sum_m w_m softmax(q_hm k_hm^T) v_h.

    Q and K weights are laid out [head, map, head_dim] along their output rows, so a split
    by heads keeps all M maps of a head together. All M*H maps run in ONE attention call
    (v repeated per map); the signed mix happens after softmax(.)v, which is the same sum
    by linearity.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        d, h, m, hd = cfg.n_embd, cfg.n_head, cfg.num_maps, cfg.head_dim
        self.num_maps, self.head_dim, self.use_ngpt, self.backend = m, hd, cfg.use_ngpt, cfg.attn_backend
        self.query = nn.Linear(d, h * m * hd, bias=False)
        self.key = nn.Linear(d, h * m * hd, bias=False)
        self.value = nn.Linear(d, h * hd, bias=False)
        self.proj = nn.Linear(h * hd, d, bias=False)
        # nGPT puts q.k on a cosine scale, so softmax needs a temperature of sqrt(hd), not 1/sqrt(hd).
        self.softmax_scale = math.sqrt(hd) if cfg.use_ngpt else 1.0 / math.sqrt(hd)
        if cfg.use_ngpt:
            self.s_qk = ScaledVector(h * m * hd, init=1.0, scale=1.0 / math.sqrt(d))
        if m > 1:
            # w_m = tanh(r_m). Alternating signs start every head "differential" (the
            # Diff Transformer's A1 - lambda*A2), so maps can cancel common-mode attention
            # noise from step 0; the first map is larger (tanh 1.0 = 0.76 vs 0.46), so the
            # weights sum to a positive value and a head starts as a signed sharpening of
            # ordinary attention rather than cancelling to nothing. tanh bounds each weight.
            self.ensemble_logits = nn.Parameter(self._initial_logits(m))
            # The signed mix has no fixed scale; normalise it per head and per token (never over
            # time). The norm removes any overall factor on w, so w carries no scale of its own:
            # the norm's gain is what scales the head's output, and its initial value
            # (cfg.head_norm_gain) how loud a head starts.
            self.head_norm = RMSNorm(hd, gain=cfg.head_norm_gain(layer))

    @staticmethod
    def _initial_logits(m: int) -> torch.Tensor:
        return torch.tensor([1.0] + [0.5 * (-1) ** i for i in range(1, m)])

    def reset_parameters(self) -> None:
        if self.num_maps > 1:
            with torch.no_grad():
                self.ensemble_logits.copy_(self._initial_logits(self.num_maps))

    def ensemble_weights(self) -> torch.Tensor:
        return torch.tanh(self.ensemble_logits)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Checkpoints from before the inert ensemble scale `s` was removed still hold it. The
        # head norm made it a no-op (a factor on every w_m cancels), so dropping it is exact
        # up to the norm's eps, and old weights keep loading.
        state_dict.pop(prefix + "ensemble_scale", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        m, hd = self.num_maps, self.head_dim
        q = self.query(x).view(B, T, -1, hd)  # [B, T, heads*maps, hd], head-major
        k = self.key(x).view(B, T, -1, hd)
        v = self.value(x).view(B, T, -1, hd)  # [B, T, heads, hd]
        if self.use_ngpt:
            # Normalise -> scale -> rotate. Rotating last keeps q_i . k_j a function of i - j
            # even when s_qk differs between the two coordinates of a rotation plane (NVIDIA's
            # code rotates first, which breaks that); at init the orders agree, as unit(.)
            # commutes with a rotation and s_qk is uniform.
            s_qk = self.s_qk().view(-1, hd)  # per (head, map) and dimension
            q, k = s_qk * unit(q), s_qk * unit(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if m > 1:
            v = v.repeat_interleave(m, dim=2)  # head h's one value serves its m maps
        y = attend(q, k, v, scale=self.softmax_scale, backend=self.backend)  # [B, T, heads*maps, hd]
        if m > 1:
            y = y.view(B, T, -1, m, hd)
            y = torch.einsum("bthmd,m->bthd", y, self.ensemble_weights().to(y.dtype))
            y = self.head_norm(y)
        return self.proj(y.reshape(B, T, -1))


class SwiGLU(nn.Module):
    """SwiGLU MLP, hidden 4*d by default (cfg.hidden_dim). u and v are separate projections so that a column split
    keeps every hidden unit's (u, v) pair on the same rank."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hidden = cfg.n_embd, cfg.hidden_dim
        self.use_ngpt = cfg.use_ngpt
        self.fc_u = nn.Linear(d, hidden, bias=False)
        self.fc_v = nn.Linear(d, hidden, bias=False)
        self.proj = nn.Linear(hidden, d, bias=False)
        if cfg.use_ngpt:
            self.s_u = ScaledVector(hidden, init=1.0, scale=1.0)
            self.s_v = ScaledVector(hidden, init=1.0, scale=1.0)
            # The reference multiplies u and v by sqrt(d); only v's factor matters (it feeds
            # the SiLU), since a constant on u is removed by the normalisation that follows.
            self.gate_gain = math.sqrt(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.fc_u(x), self.fc_v(x)
        if self.use_ngpt:
            u = u * self.s_u()
            v = v * (self.s_v() * self.gate_gain)
        return self.proj(u * F.silu(v))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.use_ngpt = cfg.use_ngpt
        self.attn = LinearEnsembleAttention(cfg, layer)
        self.mlp = SwiGLU(cfg)
        d = cfg.n_embd
        if cfg.use_ngpt:
            # Eigen learning rates: how far each step moves h towards the block's output.
            self.attn_alpha = ScaledVector(d, init=0.05, scale=1.0 / math.sqrt(d))
            self.mlp_alpha = ScaledVector(d, init=0.05, scale=1.0 / math.sqrt(d))
        else:
            self.attn_norm = RMSNorm(d)
            self.mlp_norm = RMSNorm(d)

    @staticmethod
    def sphere_step(h: torch.Tensor, update: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """h <- norm(h + |alpha| * (norm(update) - h)): a step along the sphere towards `update`."""
        h = unit(h)
        return unit(h + alpha.abs().to(h.dtype) * (unit(update) - h))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.use_ngpt:
            h = self.sphere_step(h, self.attn(h, cos, sin), self.attn_alpha())
            return self.sphere_step(h, self.mlp(h), self.mlp_alpha())
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


class LETnGPT(nn.Module):
    """The language model. forward(idx, targets=None) -> (logits, loss)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # Activation checkpointing (a training choice, set by letngpt.train.engine): keep only each block's
        # input and recompute the block in backward. The model has no dropout or other randomness,
        # so the recomputation is bit-identical with no RNG state to carry (with or without TP).
        self.checkpoint_blocks = False
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied, as in nGPT
        if cfg.use_ngpt:
            self.s_z = ScaledVector(cfg.vocab_size, init=1.0, scale=1.0 / math.sqrt(cfg.n_embd))
        else:
            self.final_norm = RMSNorm(cfg.n_embd)  # nGPT has none: its h is already unit norm
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference init: N(0, 1/sqrt(d)) everywhere; GPT's residual outputs shrunk by
        1/sqrt(2 * n_layer); nGPT then projects every matrix onto the sphere."""
        std = 1.0 / math.sqrt(self.config.n_embd)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1.0
                if not self.config.use_ngpt and name.endswith(".proj"):
                    scale = 1.0 / math.sqrt(2 * self.config.n_layer)
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        if self.config.use_ngpt:
            normalize_weights_(self)

    def unit_norm_axes(self) -> dict[str, int]:
        """Parameter name -> the axis normalised to unit length (the embedding axis).

        Input projections and embeddings store one embedding-sized row per output, so
        they are normalised along dim 1; output projections write into the embedding
        space, so each of their columns (dim 0) is. Empty for GPT.
        """
        if not self.config.use_ngpt:
            return {}
        axes = {"wte.weight": 1, "lm_head.weight": 1}
        for i in range(len(self.blocks)):
            for name in ("attn.query", "attn.key", "attn.value", "mlp.fc_u", "mlp.fc_v"):
                axes[f"blocks.{i}.{name}.weight"] = 1
            for name in ("attn.proj", "mlp.proj"):
                axes[f"blocks.{i}.{name}.weight"] = 0
        return axes

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        cos, sin = rope_tables(T, self.config.head_dim, self.config.rope_base, idx.device)
        h = self.wte(idx)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                h = checkpoint(block, h, cos, sin, use_reentrant=False)
            else:
                h = block(h, cos, sin)
        if not self.config.use_ngpt:
            h = self.final_norm(h)
        logits = self.lm_head(h)
        if self.config.use_ngpt:
            logits = logits * self.s_z().to(logits.dtype)
        loss = None if targets is None else self.loss(logits, targets)
        return logits, loss


@torch.no_grad()
def normalize_weights_(model: nn.Module) -> None:
    """Project every nGPT matrix back onto the unit sphere along its embedding axis (fp32
    arithmetic, result cast back); no-op for GPT. For a plain PyTorch model (the initial weights,
    tests): under DeepSpeed the optimizer's fp32 masters overwrite the weights at the next step, so
    there the renormalisation that counts is letngpt.renorm's, on the engine."""
    params = dict(model.named_parameters())
    for name, dim in model.unit_norm_axes().items():
        p = params[name]
        p.copy_(unit(at_least_fp32(p), dim=dim).to(p.dtype))


def build_model(cfg: ModelConfig) -> LETnGPT:
    return LETnGPT(cfg)
