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

import functools
import math
import zlib
from dataclasses import dataclass, field

import torch

from lqtk.errors import LqtkError
from lqtk.quant.base import FORMATS, QuantizedWeight, WeightFormat, WeightQuantizer, register_format
from lqtk.quant.gptq import GPTQ

MAX_ORTHOGONAL = 256
"""Largest odd factor m of a size n = 2^k·m with a dense random orthogonal block (its cost is m per element)."""


def hadamard_factors(n: int) -> tuple[int, int]:
    """(a, m) with n = a·m, a the largest power of two dividing n."""
    a = n & -n
    if n // a > MAX_ORTHOGONAL:
        raise LqtkError(f"incoherence processing: size {n} = {a}·{n // a} has an odd factor above {MAX_ORTHOGONAL}, "
                        "so it has no fast randomized Hadamard transform; leave the layers of this size out "
                        "(the phase's `skip`) or use a method without incoherence")
    return a, n // a


@functools.lru_cache(maxsize=64)
def random_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random signs (n,) and the random orthogonal block Q_m (m, m) of the transform of size n."""
    _, m = hadamard_factors(n)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    q = q * r.diagonal().sign()  # the sign fix makes Q Haar-distributed
    return signs, q.float()


def walsh_hadamard(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform along `dim` (a power of two long), by log2 butterfly passes in place."""
    x = x.movedim(dim, -1)
    shape, n = x.shape, x.shape[-1]
    x = x.reshape(-1, n).clone()
    h = 1
    while h < n:
        pairs = x.view(-1, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        total = a + b
        b.neg_().add_(a)  # a − b
        a.copy_(total)
        h *= 2
    return (x.view(shape) / math.sqrt(n)).movedim(-1, dim)


def rotate(x: torch.Tensor, seed: int, transpose: bool = False) -> torch.Tensor:
    """V x (or Vᵀ x) along the last dim of `x`, in fp32, for V the randomized Hadamard transform of `seed`."""
    n = x.shape[-1]
    a, m = hadamard_factors(n)
    signs, q = (t.to(x.device) for t in random_factors(n, seed))
    x = x.float()
    if not transpose:
        x = x * signs
    # (H_a ⊗ Q) acts on a row-major (a, m) view X as H_a X Qᵀ
    x = walsh_hadamard(x.reshape(*x.shape[:-1], a, m), dim=-2)
    x = (x @ (q if transpose else q.T)).reshape(*x.shape[:-2], n)
    return x * signs if transpose else x


def layer_seeds(seed: int, weight: torch.Tensor) -> tuple[int, int]:
    """Seeds of U and V: from the config's seed and the weight's bytes, so that every layer gets its own transforms
    and a resumed run the same ones."""
    digest = zlib.crc32(weight.detach().float().cpu().numpy().tobytes(), seed)
    return digest, zlib.crc32(b"V", digest)


@register_format
class IncoherentFormat(WeightFormat):
    """W = Uᵀ Ŵ̃ V S⁻¹: an inner format's weight Ŵ̃ seen through the layer's transforms.

    tensors: the inner format's, plus `seeds` int64 (2,) of U and V, and `input_scales` fp16 (I,) S when rescaled.
    spec: inner_format, inner (the inner format's spec), shape [O, I]."""

    name = "incoherent"

    def dequantize(self, tensors, spec):
        inner, (seed_u, seed_v) = self._inner(tensors), tensors["seeds"].tolist()
        w = FORMATS[spec["inner_format"]].dequantize(inner, spec["inner"]).float()
        w = rotate(rotate(w, seed_v, transpose=True).T, seed_u, transpose=True).T  # Uᵀ Ŵ̃ V
        return w / tensors["input_scales"].float() if "input_scales" in tensors else w

    def linear(self, x, tensors, spec, bias, cache=None):
        inner, (seed_u, seed_v) = self._inner(tensors), tensors["seeds"].tolist()
        if "input_scales" in tensors:
            x = x / tensors["input_scales"].to(x.dtype)
        x = rotate(x, seed_v).to(x.dtype)
        y = FORMATS[spec["inner_format"]].linear(x, inner, spec["inner"], None, cache)
        y = rotate(y, seed_u, transpose=True).to(y.dtype)
        return y if bias is None else y + bias

    @staticmethod
    def _inner(tensors):
        return {key: t for key, t in tensors.items() if key not in ("seeds", "input_scales")}


@dataclass
class QuIP(WeightQuantizer):
    """Incoherence processing around an inner method that uses the Hessian (LDLQ = GPTQ without act-order)."""

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
