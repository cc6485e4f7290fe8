"""Agile-Quant's activation quantization (Shen et al. 2023, "Agile-Quant: Activation-Guided Quantization for Faster
Inference of LLMs on the Edge", https://arxiv.org/abs/2312.05693): the weights by an inner method (GPTQ), and the
input of every quantized Linear quantized per token, at run time, to 8 or 4 bits.

Per token t (a row x_t of the input):
    x̂_t = (q_t − z_t) · s_t,   q_t = clamp(round(x_t / s_t) + z_t, 0, 2^b − 1),
with s_t and z_t from the token's range [min, max] (widened to include 0) times a clipping ratio c ≤ 1.

TRIP. A few input channels carry values tens of times larger than the rest, so they set every token's range, hence
its step s_t, and the other channels get a handful of levels. TRIP divides channel j by a power of two 2^α_j before
the per-token quantization and multiplies it back after:
    x̂ = 2^α ⊙ Q_t(x ⊘ 2^α),   so   Ŵ x̂ = (Ŵ · diag 2^α) Q_t(x ⊘ 2^α).
A power of two is exact in floating point and a shift in integer arithmetic: the factors fold into the weight's
columns. The channels given a factor are those whose calibration maximum |x_j| exceeds a threshold τ, with
α_j = ceil(log2(max_j / τ)) (at most `max_exponent`), so that they no longer stand out.

Calibration, per group of Linears that read the same input: τ (from the largest channel maximum down by powers of
two; the largest itself means no factors) and c (from `clip_ratios`) are chosen together for the least output error
||(x̂ − x) Ŵᵀ||² of the group's quantized weights on a sample of its calibration inputs.
"""

from dataclasses import dataclass, field

import torch

from lqtk.errors import LqtkError
from lqtk.formats import ActivationQuantizedFormat, QuantizedWeight
from lqtk.formats.act_quant import fake_quantize_input
from lqtk.quant.base import WeightQuantizer
from lqtk.quant.gptq import GPTQ


def trip_exponents(channel_max: torch.Tensor, threshold: float, max_exponent: int) -> torch.Tensor:
    """α_j = ceil(log2(max_j / τ)) for the channels above τ, else 0, at most `max_exponent` (int8, (I,))."""
    ratio = (channel_max / threshold).clamp(min=1)
    return torch.ceil(torch.log2(ratio)).clamp(max=max_exponent).to(torch.int8)


def output_error(weight: torch.Tensor):
    """A function of input errors δ (n, I) giving ||δ Ŵᵀ||², through the Gram matrix ŴᵀŴ when Ŵ is tall."""
    if weight.shape[0] > weight.shape[1]:
        gram = weight.T @ weight
        return lambda delta: (delta @ gram * delta).sum().item()
    return lambda delta: (delta @ weight.T).square().sum().item()


def calibrate_inputs(inputs: torch.Tensor, weight: torch.Tensor, bits: int, clip_ratios: list[float], trip: bool,
                     max_exponent: int) -> tuple[float, torch.Tensor | None]:
    """(c, α or None) of least ||(x̂ − x) Ŵᵀ||² over the sample `inputs` (n, I) for the quantized weight Ŵ (O, I)."""
    inputs, error = inputs.float(), output_error(weight.float())
    channel_max = inputs.abs().amax(0)
    top = channel_max.max().item()
    thresholds = [top / 2**k for k in range(max_exponent + 1)] if trip and top > 0 else [top]
    best = (float("inf"), 1.0, None)
    for threshold in thresholds:
        exponents = trip_exponents(channel_max, threshold, max_exponent) if threshold < top else None
        for clip in clip_ratios:
            err = error(fake_quantize_input(inputs, bits, clip, exponents) - inputs)
            if err < best[0]:
                best = (err, clip, exponents)
    return best[1], best[2]


@dataclass
class AgileQuant(WeightQuantizer):
    """Weights by `inner`, inputs per token to `bits` bits with a calibrated clipping ratio and optional TRIP."""

    format = ActivationQuantizedFormat.name

    inner: WeightQuantizer = field(default_factory=lambda: GPTQ(bits=4, group_size=128))
    """The weight method (GPTQ w4g128 in the paper)."""
    bits: int = 8
    """Bits per activation code: 8 or 4 (2 to 8 accepted)."""
    trip: bool = False
    """Give outlier input channels power-of-two factors (TRIP)."""
    max_exponent: int = 2
    """Largest TRIP exponent α (factor 2^α): 2 keeps (q − z)·2^α of 4-bit weight codes within ±64, where the
    integer kernels cannot saturate (lqtk.kernels.int_gemm)."""
    clip_ratios: list[float] = field(default_factory=lambda: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75])
    """Clipping ratios of the token range tried per layer (1: no clipping)."""
    input_sample_rows: int = 1024
    """Calibration input rows per group of Linears on which the clipping ratio and TRIP factors are chosen."""

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise LqtkError(f"activation bits={self.bits}: choose 8 or 4 (2 to 8)")
        if not self.clip_ratios or not all(0 < c <= 1 for c in self.clip_ratios):
            raise LqtkError(f"clip_ratios={self.clip_ratios}: give ratios in (0, 1], e.g. [1.0, 0.9, 0.8]")

    @property
    def method(self) -> str:
        return f"agile_quant_a{self.bits}"

    def check_fits(self, shape: tuple[int, int]) -> None:
        self.inner.check_fits(shape)

    def quantize(self, weight, hessian, progress=None) -> QuantizedWeight:
        return self.quantize_shared([weight], hessian, progress)[0]

    def quantize_shared(self, weights, hessian, progress=None, inputs=None) -> list[QuantizedWeight]:
        if inputs is None:
            raise LqtkError("AgileQuant chooses the activation grid on a sample of the layer's inputs: run it through "
                            "LayerwiseCalibration, or call quantize_shared with inputs")
        inner = self.inner.quantize_shared(weights, hessian, progress)
        dense = torch.cat([q.dequantize() for q in inner])
        clip, exponents = calibrate_inputs(inputs, dense, self.bits, self.clip_ratios, self.trip, self.max_exponent)
        return [QuantizedWeight(self.method, ActivationQuantizedFormat.name,
                                {"inner_format": q.format, "inner": q.spec, "shape": q.spec["shape"],
                                 "act_bits": self.bits, "clip": clip},
                                q.tensors | ({} if exponents is None else {"input_exponents": exponents.clone()}),
                                q.history) for q in inner]
