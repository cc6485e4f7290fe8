"""QuIP: incoherence processing, then adaptive rounding (Chee et al. 2023, "QuIP: 2-Bit Quantization of Large
Language Models With Guarantees", https://arxiv.org/abs/2307.13304; the randomized Hadamard transform of QuIP#,
https://arxiv.org/abs/2402.04396).

Rounding error is worst where a weight or a Hessian direction stands out. Random orthogonal U (O×O) and V (I×I)
spread every row and column over all others:
    W̃ = U W Vᵀ,   H̃ = V H Vᵀ,   so that  tr((Ŵ̃ − W̃) H̃ (Ŵ̃ − W̃)ᵀ) = tr((Ŵ − W) H (Ŵ − W)ᵀ)  for Ŵ = Uᵀ Ŵ̃ V,
and W̃ is quantized by the inner method with H̃: LDLQ, which is GPTQ's loop (`gptq.py`), on any grid the project has.
At inference y = Uᵀ (Ŵ̃ (V x)): the layer transforms its input and output and runs the inner format's matmul.

U and V are randomized Hadamard transforms, V = (H_a ⊗ Q_m) · diag(±1) / √a for a size n = a·m with a the largest
power of two dividing n (576 = 64·9, 1536 = 512·3): a fast Walsh–Hadamard transform, O(n log a), and a small random
orthogonal Q_m. Signs and Q_m come from a seed, which is stored instead of the matrices.

Before the transforms, QuIP's diagonal rescaling balances W and H: W ← W S, H ← S⁻¹ H S⁻¹ with
S = diag((diag H / diag WᵀW)^¼), and the layer divides its input by S.
"""

import zlib
from dataclasses import dataclass, field

import torch

from lqtk.formats import IncoherentFormat, QuantizedWeight
from lqtk.formats.incoherent import hadamard_factors, rotate
from lqtk.quant.base import WeightQuantizer
from lqtk.quant.gptq import GPTQ


def layer_seeds(seed: int, weight: torch.Tensor) -> tuple[int, int]:
    """Seeds of U and V: from the config's seed and the weight's bytes, so that every layer gets its own transforms
    and a resumed run the same ones."""
    digest = zlib.crc32(weight.detach().float().cpu().numpy().tobytes(), seed)
    return digest, zlib.crc32(b"V", digest)


@dataclass
class QuIP(WeightQuantizer):
    """Incoherence processing around an inner method that uses the Hessian (LDLQ = GPTQ without act-order)."""

    format = IncoherentFormat.name

    inner: WeightQuantizer = field(default_factory=lambda: GPTQ(bits=2, group_size=None, act_order=False))
    """The method run on the transformed weight and Hessian (GPTQ, LeanQuant; their grid, bits and groups)."""
    rescale: bool = True
    """QuIP's diagonal rescaling of W and H before the transforms (stores S: 16 bits per input)."""
    seed: int = 0
    """Base seed of the random transforms (each layer's is derived from it and its weight)."""

    def check_fits(self, shape: tuple[int, int]) -> None:
        for n in shape:
            hadamard_factors(n)
        self.inner.check_fits(shape)

    @property
    def input_sample_rows(self) -> int:
        """The inner method's (activation quantization calibrates on the transformed inputs)."""
        return self.inner.input_sample_rows

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None, progress=None) -> QuantizedWeight:
        return self.quantize_shared([weight], hessian, progress)[0]

    def quantize_shared(self, weights, hessian, progress=None, inputs=None) -> list[QuantizedWeight]:
        """One by one: every Linear has its own transforms (seeded by its weight). The input sample, if any, goes
        through the layer's input transform x ↦ V S⁻¹ x, so the inner method sees the inputs its weight will read."""
        if hessian is None:
            raise ValueError("QuIP needs the calibration Hessian of the layer's inputs")
        return [self._quantize_one(weight, hessian, progress, inputs) for weight in weights]

    def _quantize_one(self, weight, hessian, progress, inputs) -> QuantizedWeight:
        w, h = weight.float(), hessian.float()
        tensors = {}
        if self.rescale:
            scales = input_scales(w, h).half().float()  # as stored, so that the layer divides by what W was scaled by
            w, h = w * scales, h / scales[:, None] / scales
            tensors["input_scales"] = scales.half()
            inputs = None if inputs is None else inputs.float() / scales
        seed_u, seed_v = layer_seeds(self.seed, weight)
        w = rotate(rotate(w, seed_v).T, seed_u).T  # U W Vᵀ
        h = rotate(rotate(h, seed_v).T, seed_v)  # V H Vᵀ (H is symmetric)
        inputs = None if inputs is None else rotate(inputs, seed_v)
        inner = self.inner.quantize_shared([w], h, progress, inputs=inputs)[0]
        tensors |= inner.tensors | {"seeds": torch.tensor([seed_u, seed_v], dtype=torch.int64)}
        spec = {"inner_format": inner.format, "inner": inner.spec, "shape": list(weight.shape)}
        return QuantizedWeight("quip", IncoherentFormat.name, spec, tensors, inner.history)


def input_scales(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """QuIP's S = (diag H / diag WᵀW)^¼ per input: it equalizes how much each input column weighs in the proxy loss
    against how large its weights are. Clamped so that dead inputs (zero in H or W) keep a finite scale."""
    diag_h = (hessian.diagonal() / hessian.diagonal().max()).clamp(min=1e-8)
    diag_w = weight.square().sum(0).clamp(min=1e-8)
    return (diag_h / diag_w).pow(0.25)
