"""FLOPs accounting for MFU: matmuls plus attention, counting every ensemble map.

Convention (PaLM appendix B, as Megatron-LM and nanoGPT use it): a multiply-add is 2
FLOPs, backward costs twice forward, attention scores are counted over the full context
(the causal mask's half is not subtracted), and element-wise work (norms, softmax, RoPE,
the nGPT scalings) is ignored.
"""

from __future__ import annotations

from .config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token (the embedding lookup does not)."""
    d, m, hidden = cfg.n_embd, cfg.num_maps, cfg.hidden_dim
    attn = (2 * m + 2) * d * d  # M queries, M keys, one value, the output projection
    mlp = 3 * d * hidden  # u, v, down
    return cfg.n_layer * (attn + mlp) + cfg.vocab_size * d


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    t = seq_len or cfg.block_size
    # Per layer and token: q.k over t keys and p.v over t values, for each of the M maps.
    attention = cfg.n_layer * 2 * (2 * t * cfg.n_embd * cfg.num_maps)
    return 2 * matmul_params(cfg) + attention


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward)."""
    return 3 * forward_flops_per_token(cfg, seq_len)


# Dense bf16 peak TFLOP/s per GPU, for MFU. Overridable with --peak_tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
               "V100": 125.0, "GH200": 989.0, "B200": 2250.0, "RTX 4090": 165.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in device_name.lower():
            return value
    return None
