"""Triton kernels against their plain-torch references: each format's `dequantize` + F.linear, and
`lqtk.quant.incoherence` for the transforms. On the CPU under Triton's interpreter (set below); with
TRITON_INTERPRET=0 on a machine with a GPU the same tests run the compiled kernels on it."""
# ruff: noqa: E402  (TRITON_INTERPRET must be set before the kernels are defined, i.e. imported)

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from lqtk.formats import FORMATS
from lqtk.formats import incoherent as incoherence
from lqtk.formats.lut import nearest_level
from lqtk.formats.packing import pack_bits
from lqtk.kernels import triton_kernels
from lqtk.quant import RTN, LeanQuant

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
OUT, IN = 48, 576  # 576 = 4 x 128 + 64: a shorter last group; 48 outputs: a partial output tile


@pytest.fixture
def gpu_blocks(monkeypatch):
    """The wrappers' GPU block sizes (smaller tiles, more programs, K tiles that do not divide the input dim) instead
    of the interpreter's few large ones. fp32 inputs: the interpreter's upcast to fp32 is not needed."""
    monkeypatch.setattr(triton_kernels, "_INTERPRET", False)


def assert_matches(y, ref, tolerance=1e-5):
    """y equals ref up to `tolerance` of ref's largest entry (fp32 sums of a few hundred products)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=10 * tolerance, atol=tolerance * ref.abs().max().item())


def on_device(weight):
    return {name: t.to(DEVICE) for name, t in weight.tensors.items()}, weight.spec


def affine_weight(bits, group_size, symmetric):
    torch.manual_seed(bits)
    return on_device(RTN(bits=bits, group_size=group_size, symmetric=symmetric).quantize(torch.randn(OUT, IN)))


def aqlm_weight(num_codebooks, nbits, group):
    """Random codes, codebooks and scales, stored as AQLM.quantize stores them."""
    torch.manual_seed(nbits)
    codes = torch.randint(0, 2**nbits, (OUT, IN // group, num_codebooks))  # (O, J, M)
    tensors = {"codes": pack_bits(codes.view(OUT, -1), nbits),
               "codebooks": torch.randn(num_codebooks, 2**nbits, group).half(),
               "scales": (torch.rand(OUT, 1) + 0.5).half()}
    spec = {"num_codebooks": num_codebooks, "nbits_per_codebook": nbits, "in_group_size": group, "shape": [OUT, IN]}
    return {name: t.to(DEVICE) for name, t in tensors.items()}, spec


def lut_weight(bits):
    """LeanQuant's nonuniform grid (its k-means levels per row, unweighted) with each weight's nearest level."""
    torch.manual_seed(bits)
    w, method = torch.randn(OUT, IN), LeanQuant(bits=bits, kmeans_iters=10)
    levels = method.fit_grid(w, torch.ones(IN))
    return on_device(method.pack_grids("leanquant", nearest_level(w, levels), [levels]))


def reference(format_name, x, tensors, spec):
    return F.linear(x.float(), FORMATS[format_name].dequantize(tensors, spec).to(x.device)).to(x.dtype)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("group_size", [128, None])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_affine_linear(bits, symmetric, group_size, rows):
    tensors, spec = affine_weight(bits, group_size, symmetric)
    assert triton_kernels.supports("affine", spec) and ("zeros" in tensors) != symmetric
    x = torch.randn(rows, IN, device=DEVICE)
    assert_matches(triton_kernels.affine_linear(x, tensors, spec), reference("affine", x, tensors, spec))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("codebooks", ["2x8", "1x16", "1x8g4"])
def test_aqlm_linear(codebooks, rows):
    num_codebooks, nbits, group = {"2x8": (2, 8, 8), "1x16": (1, 16, 8), "1x8g4": (1, 8, 4)}[codebooks]
    tensors, spec = aqlm_weight(num_codebooks, nbits, group)
    assert triton_kernels.supports("aqlm", spec)
    x = torch.randn(rows, IN, device=DEVICE)
    assert_matches(triton_kernels.aqlm_linear(x, tensors, spec), reference("aqlm", x, tensors, spec))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_linear(bits, rows):
    tensors, spec = lut_weight(bits)
    assert triton_kernels.supports("lut", spec)
    x = torch.randn(rows, IN, device=DEVICE)
    assert_matches(triton_kernels.lut_linear(x, tensors, spec), reference("lut", x, tensors, spec))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["affine", "aqlm", "lut"])
def test_half_activations_batch_dims(kernel, dtype):
    """fp16/bf16 inputs (..., I) give (..., O) in their dtype (under the interpreter computed in fp32)."""
    linear, (tensors, spec) = {"affine": (triton_kernels.affine_linear, affine_weight(3, 128, False)),
                               "aqlm": (triton_kernels.aqlm_linear, aqlm_weight(2, 8, 8)),
                               "lut": (triton_kernels.lut_linear, lut_weight(4))}[kernel]
    x = torch.randn(2, 3, IN, device=DEVICE).to(dtype)
    assert_matches(linear(x, tensors, spec), reference(kernel, x, tensors, spec), tolerance=1e-2)


@pytest.mark.parametrize(("size", "rows"), [(64, 1), (64, 3), (512, 1), (512, 3), (4096, 1), (4096, 3), (32768, 1)])
def test_walsh_hadamard(size, rows):
    x = torch.randn(rows, size, device=DEVICE)
    assert_matches(triton_kernels.walsh_hadamard(x), incoherence.walsh_hadamard(x, -1), tolerance=1e-6)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("size", [576, 1536, 256, 9])  # 64·9, 512·3, a power of two (m = 1), odd (a = 1)
def test_rotate(size, transpose):
    x = torch.randn(3, size, device=DEVICE)
    assert_matches(triton_kernels.rotate(x, 7, transpose), incoherence.rotate(x, 7, transpose), tolerance=1e-6)


@pytest.mark.parametrize("case", ["affine-3bit-g128", "affine-4bit-row-sym", "aqlm-2x8", "aqlm-1x16", "lut-3bit",
                                  "hadamard-4096", "rotate-576", "rotate-576-transpose"])
def test_gpu_tiling(case, gpu_blocks):
    """A few cases again with the tiles the GPU gets (decoding batch of 1, prefill of 5 rows)."""
    x = torch.randn(1 if "row" in case else 5, IN, device=DEVICE)
    if case.startswith("affine"):
        tensors, spec = affine_weight(3, 128, False) if "3bit" in case else affine_weight(4, None, True)
        y, ref = triton_kernels.affine_linear(x, tensors, spec), reference("affine", x, tensors, spec)
    elif case.startswith("aqlm"):
        tensors, spec = aqlm_weight(2, 8, 8) if "2x8" in case else aqlm_weight(1, 16, 8)
        y, ref = triton_kernels.aqlm_linear(x, tensors, spec), reference("aqlm", x, tensors, spec)
    elif case.startswith("lut"):
        tensors, spec = lut_weight(3)
        y, ref = triton_kernels.lut_linear(x, tensors, spec), reference("lut", x, tensors, spec)
    elif case.startswith("hadamard"):
        x = torch.randn(3, 4096, device=DEVICE)
        y, ref = triton_kernels.walsh_hadamard(x), incoherence.walsh_hadamard(x, -1)
    else:
        transpose = case.endswith("transpose")
        y, ref = triton_kernels.rotate(x, 7, transpose), incoherence.rotate(x, 7, transpose)
    assert_matches(y, ref)


def test_walsh_hadamard_refuses_other_sizes():
    with pytest.raises(ValueError, match="power of two"):
        triton_kernels.walsh_hadamard(torch.randn(2, 576, device=DEVICE))


def test_supports():
    assert triton_kernels.supports("affine", {"bits": 3, "group_size": None, "symmetric": True, "shape": [8, 8]})
    assert not triton_kernels.supports("affine", {"bits": 5, "group_size": 128, "symmetric": True, "shape": [8, 8]})
    assert not triton_kernels.supports("aqlm", {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8,
                                               "shape": [8, 12]})  # the groups do not tile the input dim
    assert not triton_kernels.supports("incoherent", {})


def test_linear_dispatches_by_format():
    tensors, spec = lut_weight(2)
    x = torch.randn(2, IN, device=DEVICE)
    assert_matches(triton_kernels.linear("lut", x, tensors, spec), reference("lut", x, tensors, spec))
    with pytest.raises(ValueError, match="no Triton kernel"):
        triton_kernels.linear("incoherent", x, tensors, spec)
