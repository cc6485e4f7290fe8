"""The `affine` storage format: integer codes with a scale and zero point per group of input columns, and the
affine grid arithmetic that the producers (RTN, GPTQ) and activation quantization share."""

import torch

from lqtk.formats.base import WeightFormat, largest_gains, register_format
from lqtk.formats.packing import decode_by_rows, pack_bits, unpack_bits


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


def quantize_affine(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.div(w, scale).round_().add_(zero).clamp_(0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return quantize_affine(w, scale, zero, bits).sub_(zero).mul_(scale)


@register_format
class AffineFormat(WeightFormat):
    """w[o, i] = (q[o, i] - zero[o, g(i)]) · scale[o, g(i)],  g(i) = i // group_size.

    tensors: `qweight` int32 (O, ceil(I·b/32)), codes packed densely along the input dim;
             `scales` fp16 (O, G); `zeros` int32 (O, ceil(G·b/32)) packed zero points, asymmetric only
             (symmetric zero points are 2^(b-1) and not stored).
    spec: bits, group_size (null = one group per row), symmetric, shape [O, I]."""

    name = "affine"

    def dequantize(self, tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
        def decode(rows):
            q = unpack_bits(rows["qweight"], spec["bits"], spec["shape"][1])
            scale, zero = self.per_weight(rows, spec, q)
            return (q - zero) * scale
        return decode_by_rows(decode, tensors, spec["shape"])

    def nearest_codes(self, tensors, spec, target, max_change, beam_size):
        """Each weight's nearest grid point is found by rounding; the weights whose change gains most are taken."""
        bits, (_, in_features) = spec["bits"], spec["shape"]
        q = unpack_bits(tensors["qweight"], bits, in_features)
        scale, zero = self.per_weight(tensors, spec, q)
        current = (q - zero) * scale
        proposed = torch.clamp(torch.round(target / scale) + zero, 0, 2**bits - 1)
        gain = (current - target).square() - ((proposed - zero) * scale - target).square()
        q = torch.where(largest_gains(gain, max_change), proposed.to(q.dtype), q)
        return {name: t for name, t in tensors.items() if not t.is_floating_point()} | {"qweight": pack_bits(q, bits)}

    def per_weight(self, tensors, spec, q):
        """Scale and zero point of every weight (O, I)."""
        bits, (_, in_features) = spec["bits"], spec["shape"]
        scales = tensors["scales"].float()
        if "zeros" in tensors:
            zeros = unpack_bits(tensors["zeros"], bits, scales.shape[1])
        else:
            zeros = torch.full_like(scales, 2 ** (bits - 1))
        group = torch.arange(in_features, device=q.device) // (spec["group_size"] or in_features)
        return scales[:, group], zeros[:, group]
