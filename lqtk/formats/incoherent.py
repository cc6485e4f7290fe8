"""The `incoherent` storage format: an inner format's weight seen through QuIP's randomized Hadamard transforms
(https://arxiv.org/abs/2307.13304, https://arxiv.org/abs/2402.04396; the method: `lqtk.quant.QuIP`).

V = (H_a ⊗ Q_m) · diag(±1) / √a for a size n = a·m with a the largest power of two dividing n (576 = 64·9,
1536 = 512·3): a fast Walsh–Hadamard transform, O(n log a), and a small random orthogonal Q_m. Signs and Q_m come
from a seed, which is stored instead of the matrices. At inference y = Uᵀ (Ŵ̃ (V S⁻¹ x)).
"""

import functools
import math

import torch

from lqtk.errors import LqtkError
from lqtk.formats.base import FORMATS, WeightFormat, decoded_matmul, register_format

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

    def linear(self, x, tensors, spec, bias, cache=None, matmul=decoded_matmul):
        inner, (seed_u, seed_v) = self._inner(tensors), tensors["seeds"].tolist()
        if "input_scales" in tensors:
            x = x / tensors["input_scales"].to(x.dtype)
        x = rotate(x, seed_v).to(x.dtype)
        y = matmul(spec["inner_format"], x, inner, spec["inner"], None, cache)
        y = rotate(y, seed_u, transpose=True).to(y.dtype)
        return y if bias is None else y + bias

    @staticmethod
    def _inner(tensors):
        return {key: t for key, t in tensors.items() if key not in ("seeds", "input_scales")}
