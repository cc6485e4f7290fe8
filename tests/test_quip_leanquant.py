"""QuIP and LeanQuant against references and properties: the randomized Hadamard transforms are orthogonal and
invert; LDLQ (the paper's rule) gives GPTQ's codes; incoherence around unrounded weights leaves a model's logits
unchanged; the loss-error-weighted k-means lowers the weighted error of a uniform grid, batched as row by row;
bad sizes and settings are refused or stay finite."""

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from helpers import correlated_problem
from lqtk.errors import LqtkError
from lqtk.formats import QuantizedWeight, WeightFormat, register_format
from lqtk.formats.affine import quantize_affine
from lqtk.formats.incoherent import rotate, walsh_hadamard
from lqtk.formats.lut import nearest_level
from lqtk.formats.packing import unpack_bits
from lqtk.nn import QuantizedLinear
from lqtk.quant import GPTQ, LeanQuant, QuIP, WeightQuantizer
from lqtk.quant.leanquant import weighted_kmeans
from lqtk.quant.primitives import minmax_qparams
from lqtk.reference_models import build_tiny_llama


@pytest.mark.parametrize("n", [1, 2, 64, 12, 160, 576, 1536])
def test_randomized_hadamard_is_orthogonal_and_inverts(n):
    v = rotate(torch.eye(n, dtype=torch.float64), seed=7)  # rows: V e_i, i.e. Vᵀ
    torch.testing.assert_close(v @ v.T, torch.eye(n), atol=1e-5, rtol=0)
    x = torch.randn(3, n)
    torch.testing.assert_close(rotate(rotate(x, 7), 7, transpose=True), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 7), x @ v, atol=1e-5, rtol=0)
    assert not torch.allclose(rotate(x, 8), rotate(x, 7)) or n <= 2  # another seed, another transform


def test_fast_walsh_hadamard_equals_the_sylvester_matrix():
    h = torch.ones(1, 1)
    for _ in range(5):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(4, 32)
    torch.testing.assert_close(walsh_hadamard(x, dim=-1), x @ h.T / math.sqrt(32))


def test_sizes_without_a_fast_transform_are_refused():
    with pytest.raises(LqtkError, match="size 1028 = 4·257"):
        QuIP().check_fits((64, 1028))


def ldlq(w, h, bits, damp):
    """The paper's rule, column by column: Ŵ_k = Q(W_k + (W_{<k} − Ŵ_{<k}) Ù_{<k,k}), with H = (Ù + I) D (Ù + I)ᵀ,
    Ù strictly upper triangular, on a per-row min/max grid."""
    h = h + damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    upper = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)  # H = L Lᵀ, L upper triangular
    feedback = upper / upper.diagonal() - torch.eye(len(h), dtype=h.dtype)
    scale, zero = minmax_qparams(w, bits, symmetric=False)
    scale = scale.half().double()  # GPTQ's grid: the fp16 scale it stores
    codes, values = torch.zeros_like(w), torch.zeros_like(w)
    for k in range(w.shape[1]):
        column = w[:, k] + (w[:, :k] - values[:, :k]) @ feedback[:k, k]
        codes[:, k] = quantize_affine(column, scale[:, 0], zero[:, 0], bits)
        values[:, k] = (codes[:, k] - zero[:, 0]) * scale[:, 0]
    return codes


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_ldlq_gives_the_codes_of_gptq(bits):
    w, h, _ = correlated_problem()
    gptq = GPTQ(bits=bits, group_size=None, act_order=False).quantize(w, h)
    codes = unpack_bits(gptq.tensors["qweight"], bits, w.shape[1])
    reference = ldlq(w.double(), h.double(), bits, damp=0.01)
    # GPTQ runs in fp32, the reference in fp64: a weight within rounding of a decision boundary may round apart
    assert (codes != reference).float().mean() < 1e-3


@register_format
class UnroundedFormat(WeightFormat):
    """A dense fp32 weight (test only): incoherence around it must change nothing."""

    name = "test-unrounded"

    def dequantize(self, tensors, spec):
        return tensors["weight"]


@dataclass
class Unrounded(WeightQuantizer):
    def quantize(self, weight, hessian, progress=None):
        return QuantizedWeight("unrounded", UnroundedFormat.name, {"shape": list(weight.shape)},
                               {"weight": weight.float().clone()})


def test_incoherence_around_unrounded_weights_gives_the_original_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    build_tiny_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        expected = model(tokens).logits
    x = torch.randn(512, 160)
    original = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]:
        h = 2 * x[:, :linear.in_features].T @ x[:, :linear.in_features] / len(x)
        quantized = QuIP(inner=Unrounded()).quantize(linear.weight.detach(), h)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantizedLinear(quantized, linear.bias))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, atol=1e-4, rtol=1e-4)
    stored = model.model.layers[0].mlp.down_proj.tensors()["weight"]
    assert (stored - original).abs().max() > 0.1 * original.abs().max()  # what is stored is transformed


def test_quip_lowers_the_error_of_gptq_at_2_bits_on_an_outlier_weight():
    w, h, x = correlated_problem(out_features=64, in_features=96)
    w[:, 5] *= 20  # an outlier input column: a per-row grid wastes its 4 levels on it
    def error(quantized):
        return ((w - quantized.dequantize()) @ x.T).square().sum()
    gptq = GPTQ(bits=2, group_size=None, act_order=False)
    assert error(QuIP(inner=gptq).quantize(w, h)) < 0.8 * error(gptq.quantize(w, h))


def test_weighted_kmeans_lowers_the_weighted_error_of_a_uniform_grid_batched_as_row_by_row():
    g = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(3).sample((48, 200))  # heavy tails, as LLM weights
    importance = torch.rand(200, generator=g) ** 4
    levels = weighted_kmeans(w, importance, 8)
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    uniform = lo + (hi - lo) * torch.linspace(0, 1, 8)
    def weighted_error(grid):
        return ((w - grid.gather(1, nearest_level(w, grid))).square() * importance).sum(1)
    assert (weighted_error(levels) <= weighted_error(uniform) + 1e-6).all()
    assert weighted_error(levels).sum() < 0.7 * weighted_error(uniform).sum()
    row_by_row = torch.cat([weighted_kmeans(row[None], importance, 8) for row in w])
    torch.testing.assert_close(levels, row_by_row)


def test_more_levels_than_distinct_weights_and_zero_exponent_stay_finite():
    w = torch.tensor([[0.5, 0.5, -1.0, -1.0, 0.5, 2.0]] * 3)
    levels = weighted_kmeans(w, torch.ones(6), 16)
    assert torch.isfinite(levels).all()
    assert torch.equal(levels.gather(1, nearest_level(w, levels)), w)  # each distinct weight is a level
    h = torch.eye(6) + 0.1
    q = LeanQuant(bits=4, exponent=0.0).quantize(w, h)
    torch.testing.assert_close(q.dequantize(), w)
    with pytest.raises(LqtkError, match="exponent=-1.0 must be >= 0"):
        LeanQuant(exponent=-1.0)
    with pytest.raises(LqtkError, match="set group_size null"):
        LeanQuant(group_size=128)
    with pytest.raises(LqtkError, match="set observer: mse"):
        LeanQuant(grid="affine", group_size=128)


@pytest.mark.parametrize("bits", [2, 3])
def test_leanquant_grids_lower_the_output_error_of_gptq_minmax(bits):
    w, h, x = correlated_problem(out_features=64, in_features=128)
    w = w * torch.distributions.StudentT(3).sample(w.shape).abs().sqrt()  # heavier tails
    def error(quantizer):
        return ((w - quantizer.quantize(w, h).dequantize()) @ x.T).square().sum()
    gptq = error(GPTQ(bits=bits, group_size=None))
    assert error(LeanQuant(bits=bits)) < gptq
    affine = LeanQuant(bits=bits, group_size=32, grid="affine", observer="mse", mse_norm=2.0)
    assert error(affine) < error(GPTQ(bits=bits, group_size=32))
