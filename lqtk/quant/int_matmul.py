"""Integer compute for activation-quantized layers on the CPU: per-token uint8 activation codes times int8 weight
codes, accumulated in int32 (oneDNN's u8×s8 kernels, as PyTorch's x86 quantization backend uses them).

A layer with per-channel weights w[o, c] = s_o · W[o, c] (W integer, the codes minus their zero point, times the
TRIP factor 2^α_c) and per-token activations x[t, c] ≈ 2^-α_c · s_t · (q[t, c] − z_t) computes
    y[t, o] = s_t · (s_o · Σ_c q[t, c] W[o, c]  −  z_t · s_o · Σ_c W[o, c]),
the sum Σ_c q W in int32, exact. On CPUs without VNNI, the u8×s8 instruction (vpmaddubsw) adds pairs of products
in int16 with saturation: it stays exact while |W| ≤ 64 (255 · 64 · 2 < 2^15), which 4-bit codes with α ≤ 2 meet.

Per-group weight scales (GPTQ's groups of 128) need one integer sum per group, then a float scale: `grouped_linear`
runs one oneDNN call per group, which is correct but, with the library kernels, slower than the float matmul
(`scripts/bench_actquant.py` measures both).
"""

import torch

from lqtk.errors import LqtkError
from lqtk.quant.base import FORMATS
from lqtk.quant.primitives import unpack_bits

SATURATION_FREE = 64
"""Largest |weight| for which the u8×s8 pair sums cannot saturate int16 on CPUs without VNNI."""


def check_int_weight(weight: torch.Tensor) -> torch.Tensor:
    """The integer weight (N, K) as int8, refused if a pair of products could saturate."""
    if weight.abs().max() > SATURATION_FREE:
        raise LqtkError(f"integer weights up to {weight.abs().max().item()} exceed ±{SATURATION_FREE}: the u8×s8 "
                        "kernels would saturate; use 4-bit weights with TRIP exponents ≤ 2")
    return weight.to(torch.int8).contiguous()


def integer_weight(tensors: dict[str, torch.Tensor], spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (O, I) int, scales (O, G)) of an `act_quant` layer over an `affine` weight: the codes minus their zero
    points times the TRIP factors 2^α, and the group scales, so that the dequantized weight is W · scale / 2^α."""
    inner = spec["inner"]
    if spec["inner_format"] != "affine":
        raise LqtkError(f"integer compute needs affine weight codes, not {spec['inner_format']!r}")
    affine = FORMATS["affine"]
    codes = unpack_bits(tensors["qweight"], inner["bits"], inner["shape"][1])
    _, zeros = affine.per_weight(tensors, inner, codes)
    weight = (codes - zeros).long()
    if "input_exponents" in tensors:
        weight = weight << tensors["input_exponents"].long()
    return weight, tensors["scales"].float()


def pack_weight(weight: torch.Tensor, tokens: int) -> torch.Tensor:
    """oneDNN's packed layout of the int8 weight (N, K), for inputs of about `tokens` rows."""
    return torch.ops.onednn.qlinear_prepack(check_int_weight(weight), [tokens, weight.shape[1]])


def scaled_int_matmul(codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 (T, N) = (Σ_c codes[t, c] · W[o, c]) · scales[o]: uint8 codes (T, K), int32 accumulation."""
    out_features = scales.shape[0]
    zeros = torch.zeros(out_features, dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, packed, scales.float().contiguous(), zeros, None, 1.0,
                                              0, torch.float32, "none", [], "")


def int_linear(codes: torch.Tensor, token_scale: torch.Tensor, token_zero: torch.Tensor, packed: torch.Tensor,
               channel_scale: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
    """y (T, N) of per-token codes (T, K) with scales and zero points (T, 1), for a per-channel integer weight
    (packed, its scales (N,) and its row sums Σ_c W[o, c] (N,))."""
    return (scaled_int_matmul(codes, packed, channel_scale) - token_zero * (channel_scale * weight_sum)) * token_scale


def grouped_linear(codes: torch.Tensor, token_scale: torch.Tensor, token_zero: torch.Tensor,
                   packed_groups: list[torch.Tensor], group_scales: torch.Tensor, group_sums: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """`int_linear` for per-group weight scales (N, G) and row sums per group (N, G): one integer sum per group."""
    out = None
    for g, packed in enumerate(packed_groups):
        part = scaled_int_matmul(codes[:, g * group_size:(g + 1) * group_size].contiguous(), packed,
                                 group_scales[:, g])
        out = part if out is None else out.add_(part)
    return (out - token_zero * (group_scales * group_sums).sum(1)) * token_scale
