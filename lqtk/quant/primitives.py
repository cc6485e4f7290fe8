"""Affine integer quantization primitives shared by the scalar methods (RTN, GPTQ).

A weight row is cut into groups of `group_size` input columns (the last group of a row is shorter when
`group_size` does not divide the input dim, as in GPTQ's reference code). Each group has a scale and an
integer zero point:  w ≈ (q - zero) * scale,  q in [0, 2**bits - 1].
"""

import math

import torch

from lqtk.errors import LqtkError

SUPPORTED_BITS = (2, 3, 4, 8)


def check_scheme(bits: int, group_size: int | None) -> None:
    if bits not in SUPPORTED_BITS:
        raise LqtkError(f"unsupported bits={bits}: choose one of {SUPPORTED_BITS}")
    if group_size is not None and group_size < 1:
        raise LqtkError(f"group_size={group_size} must be >= 1, or null for one group per output channel")


def group_starts(in_features: int, group_size: int | None) -> list[int]:
    """First column of each group; the last group may be shorter (576 = 4x128 + 64 gives 5 groups)."""
    step = in_features if group_size is None else group_size
    return list(range(0, in_features, step))


def minmax_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` (O, n) covering the row's range; both (O, 1) fp32."""
    return range_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), bits, symmetric)


def range_qparams(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """Scale and zero point of rows whose values lie in [wmin, wmax] (O, 1), a range widened to include 0."""
    maxq = 2**bits - 1
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    if symmetric:
        wmax = torch.maximum(-wmin, wmax)
        wmin = -wmax
    span = wmax - wmin
    span = torch.where(span > 0, span, torch.ones_like(span))  # an all-zero row quantizes exactly with any scale
    scale = span / maxq
    zero = torch.full_like(scale, 2 ** (bits - 1)) if symmetric else torch.round(-wmin / scale)
    return scale, zero


def mse_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    importance: torch.Tensor | None = None,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale search: shrink the min/max range by factors 1, 1-1/grid, ... and keep, per row, the range whose
    rounding error sum_j importance_j |q(w_j) - w_j|^norm is least (GPTQ/GPTQModel `mse`, llm-compressor's MSE
    observer). `importance` (n,) weights the columns, e.g. diag(H) so the error is measured where the inputs are."""
    wmin, wmax = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    best_scale, best_zero = range_qparams(wmin, wmax, bits, symmetric)
    best_err = torch.full_like(best_scale, float("inf"))
    for i in range(int(max_shrink * grid) + 1):
        shrink = 1 - i / grid
        # the range of w·shrink is shrink·[wmin, wmax] exactly (multiplying by a positive number keeps the order)
        scale, zero = range_qparams(wmin * shrink, wmax * shrink, bits, symmetric)
        err = fake_quantize(w, scale, zero, bits).sub_(w).abs_().pow_(norm)  # in place: one temporary, not five
        if importance is not None:
            err.mul_(importance)
        err = err.sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_affine(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.div(w, scale).round_().add_(zero).clamp_(0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return quantize_affine(w, scale, zero, bits).sub_(zero).mul_(scale)


def pack_bits(q: torch.Tensor, bits: int, rows: int = 256) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers along the last dim into int32 words, densely (LSB first; a 3-bit value
    may straddle two words). (R, n) -> (R, ceil(n*bits/32)), `rows` rows at a time (int64 temporaries)."""
    n = q.shape[1]
    pos = torch.arange(n, device=q.device) * bits
    word, shift = pos // 32, pos % 32
    out = torch.empty(q.shape[0], math.ceil(n * bits / 32), dtype=torch.int32, device=q.device)
    for start in range(0, q.shape[0], rows):
        v = q[start:start + rows].to(torch.int64)
        packed = torch.zeros(v.shape[0], out.shape[1] + 1, dtype=torch.int64, device=q.device)
        packed.scatter_add_(1, word.expand_as(v), (v << shift) & 0xFFFFFFFF)
        packed.scatter_add_(1, (word + 1).expand_as(v), v >> (32 - shift))  # the straddling high bits
        packed = packed[:, :-1]
        out[start:start + rows] = torch.where(packed >= 2**31, packed - 2**32, packed)
    return out


def decode_by_rows(decode, tensors: dict[str, torch.Tensor], shape: list[int], rows: int = 256) -> torch.Tensor:
    """The fp32 (O, I) weight `decode(tensors of some rows)` gives, decoded `rows` rows at a time (every tensor of
    the format has one row per output row): unpacking's int64 temporaries then exist for a few rows, not for the
    whole weight (several times its fp32 size: 0.5 GB at once for a 5632 x 2048 Linear)."""
    first = next(iter(tensors.values()))
    out = torch.empty(shape, device=first.device)
    for start in range(0, shape[0], rows):
        out[start:start + rows] = decode({name: t[start:start + rows] for name, t in tensors.items()})
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (R, words) int32 -> (R, n) int64."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:, :1])], dim=1)
    pos = torch.arange(n, device=packed.device) * bits
    word, shift = pos // 32, pos % 32
    value = (words[:, word] >> shift) | (words[:, word + 1] << (32 - shift))
    return value & (2**bits - 1)
