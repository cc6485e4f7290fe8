"""The `act_quant` storage format: an inner format's weight whose layer quantizes its input per token at run time,
with TRIP's power-of-two channel factors optional (Agile-Quant, https://arxiv.org/abs/2312.05693; the method:
`lqtk.quant.AgileQuant`).

Per token t (a row x_t of the input):  x̂_t = (q_t − z_t) · s_t,  q_t = clamp(round(x_t / s_t) + z_t, 0, 2^b − 1),
with s_t and z_t from the token's range [min, max] (widened to include 0) times a clipping ratio c ≤ 1; with TRIP
x̂ = 2^α ⊙ Q_t(x ⊘ 2^α).
"""

import torch

from lqtk.formats.affine import fake_quantize, quantize_affine, range_qparams
from lqtk.formats.base import FORMATS, WeightFormat, decoded_matmul, register_format


def token_qparams(x: torch.Tensor, bits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (..., 1) of each token (row along the last dim) of x: the affine grid of the token's range
    including 0, times `clip` (`range_qparams`, one group per token)."""
    return range_qparams(x.amin(-1, keepdim=True) * clip, x.amax(-1, keepdim=True) * clip, bits, symmetric=False)


def quantize_tokens(x: torch.Tensor, bits: int, clip: float = 1.0):
    """Codes (uint8 values in fp32), scales and zero points of per-token quantization."""
    scale, zero = token_qparams(x, bits, clip)
    return quantize_affine(x, scale, zero, bits), scale, zero


def fake_quantize_tokens(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    return fake_quantize(x, *token_qparams(x, bits, clip), bits)


def fake_quantize_input(x: torch.Tensor, bits: int, clip: float, exponents: torch.Tensor | None) -> torch.Tensor:
    """x̂ = 2^α ⊙ Q_t(x ⊘ 2^α) (α = 0 without TRIP), in x's dtype."""
    if exponents is None:
        return fake_quantize_tokens(x.float(), bits, clip).to(x.dtype)
    factors = torch.exp2(exponents.float())
    return (fake_quantize_tokens(x.float() / factors, bits, clip) * factors).to(x.dtype)


@register_format
class ActivationQuantizedFormat(WeightFormat):
    """An inner format's weight whose layer quantizes its input per token at run time (TRIP factors optional).

    tensors: the inner format's, plus `input_exponents` int8 (I,) α of TRIP (absent without TRIP).
    spec: inner_format, inner (the inner format's spec), shape [O, I], act_bits, clip."""

    name = "act_quant"

    def dequantize(self, tensors, spec):
        return FORMATS[spec["inner_format"]].dequantize(self._inner(tensors), spec["inner"])

    def linear(self, x, tensors, spec, bias, cache=None, matmul=decoded_matmul):
        """The fake-quantized input through the inner format (where a kernel runs, the layer computes the same in
        integers instead, up to fp32 rounding: 8-bit inputs over affine 4-bit weights on the CPU,
        lqtk.kernels.int_gemm)."""
        x = fake_quantize_input(x, spec["act_bits"], spec["clip"], tensors.get("input_exponents"))
        return matmul(spec["inner_format"], x, self._inner(tensors), spec["inner"], bias, cache)

    @staticmethod
    def _inner(tensors):
        return {key: t for key, t in tensors.items() if key != "input_exponents"}
