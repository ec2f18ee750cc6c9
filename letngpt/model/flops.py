"""FLOPs accounting for MFU: matmuls plus attention, counting every ensemble map.

Convention (PaLM appendix B for the matmuls, as Megatron-LM and nanoGPT use it): a multiply-add
is 2 FLOPs, backward costs twice forward, and element-wise work (norms, softmax, RoPE, the nGPT
scalings) is ignored. Causal attention is counted as HALF the full-context work (q.k and p.v over
t/2 keys on average), as FlashAttention's benchmarks and Megatron-LM's
`num_floating_point_operations` count it: the kernels skip the masked half, so counting it would
overstate MFU (by ~1.35x for LET-nGPT at 4k context). Before issue 22 the full context was
counted; the committed sweep reports' FLOPs columns predate the change (README says by how much).
"""

from __future__ import annotations

import re

from letngpt.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token (the embedding lookup does not)."""
    d, m, hidden = cfg.n_embd, cfg.num_maps, cfg.hidden_dim
    attn = (2 * m + 2) * d * d  # M queries, M keys, one value, the output projection
    mlp = 3 * d * hidden  # u, v, down
    return cfg.n_layer * (attn + mlp) + cfg.vocab_size * d


def attention_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward attention FLOPs per token, causal: q.k and p.v over t/2 keys on average, for each
    of the M maps of every layer (2 FLOPs per multiply-add, 2 products: 2 * 2 * (t/2) * d * M)."""
    context = seq_len or cfg.block_size
    return cfg.n_layer * 2 * context * cfg.n_embd * cfg.num_maps


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    return 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward)."""
    return 3 * forward_flops_per_token(cfg, seq_len)


# Dense (not 2:4-sparse) bf16 tensor-core peak TFLOP/s per GPU, for MFU, from NVIDIA's datasheets
# and whitepapers: the dense figure where one is printed (H100 whitepaper: SXM5 989.4, PCIe 756.5;
# A100 312; A10 125; L40S 362.05; L40 181.05; Ada whitepaper: RTX 4090 165.2 with fp32
# accumulate), else half the "with sparsity" one (H100/H200 NVL 1671; H200 and GH200 1979, as
# H100 SXM; B200 4500; L4 242). Matched as whole words of torch's device name, longest key first
# ("H100 PCIe" before "H100"). Left out on purpose: V100 (no bf16 tensor cores) and A10G (AWS's
# part, no vendor figure). Overridable with --peak_tflops.
PEAK_TFLOPS = {"H100": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H200": 989.4, "H200 NVL": 835.5,
               "GH200": 989.4, "B200": 2250.0, "A100": 312.0, "A10": 125.0, "L40S": 362.05, "L40": 181.05,
               "L4": 121.0, "RTX 4090": 165.2}


def peak_tflops(device_name: str) -> float | None:
    """The table's figure for a device name, or None. Keys match whole words only, so "A10" is
    not found in "A10G", "L4" not in "L40S", "H200" not in "GH200", "H200" not in "H20". A MIG
    slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb") has a fraction of the GPU's SMs: unknown too."""
    if re.search(r"(?<![a-z0-9])mig(?![a-z0-9])", device_name.lower()):
        return None
    for key, value in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", device_name.lower()):
            return value
    return None
