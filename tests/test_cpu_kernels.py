"""The CPU kernels (lqtk/kernels/cpu.py) against the plain-torch reference F.linear(x, dequantized weight), for each
format and the cases their code paths split on: batch sizes below and above the switch to the buffered product,
groups ending mid-row, groups that do or do not fit the 2/4-bit superblock layout, symmetric and asymmetric zero
points, 1 to 3 AQLM codebooks, row counts that are not a multiple of the 4 rows multiplied together."""

import pytest
import torch
import torch.nn.functional as F

from lqtk.errors import LqtkError
from lqtk.formats import FORMATS
from lqtk.formats.packing import pack_bits
from lqtk.kernels import cpu
from lqtk.quant import RTN, HessianAccumulator, LeanQuant

OUT_FEATURES = 37  # not a multiple of 4: the last rows of the buffered product are padding
BATCHES = [1, 3, 5, 16]  # 1 and 3 rows go through `gemv`, 5 and 16 through `gemm` (chunks of 3, 2 and 1)


def test_the_extension_builds():
    assert cpu.available(), cpu.build_error()  # compiled once into lqtk.kernels.build_directory(), shared by all runs


QUANTIZED = {}


def quantized(quantizer, in_features: int, out_features: int = OUT_FEATURES):
    """A random weight quantized by `quantizer`, once per setting: it serves every batch size."""
    key = (repr(quantizer), in_features, out_features)
    if key not in QUANTIZED:
        w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
        QUANTIZED[key] = quantizer.quantize(w, hessian(in_features) if quantizer.needs_hessian else None)
    return QUANTIZED[key]


def hessian(in_features: int) -> torch.Tensor:
    accumulator = HessianAccumulator(in_features)
    accumulator.add(torch.randn(256, in_features, generator=torch.Generator().manual_seed(1)))
    return accumulator.hessian()


def check_equals_reference(format_name: str, tensors: dict, spec: dict, batch: int) -> None:
    x = torch.randn(batch, spec["shape"][1], generator=torch.Generator().manual_seed(batch))
    reference = F.linear(x, FORMATS[format_name].dequantize(tensors, spec))
    assert cpu.supports(format_name, spec)
    torch.testing.assert_close(cpu.linear(format_name, x, tensors, spec), reference, rtol=1e-5,
                               atol=1e-5 * reference.abs().max().item())


# 576 = 4 x 128 + 64 (a short last group) fits the superblocks of 32 (4 bits) and 64 (2 bits) inputs; groups of 48
# over 200 inputs (4 x 48 + 8) fit neither: those take the per-block path, as do 3 bits
@pytest.mark.parametrize("in_features, group_size", [(576, 128), (576, None), (200, 48)])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("batch", BATCHES)
def test_affine(in_features, group_size, bits, symmetric, batch):
    q = quantized(RTN(bits=bits, group_size=group_size, symmetric=symmetric), in_features)
    check_equals_reference("affine", q.tensors, q.spec, batch)


@pytest.mark.parametrize("in_features", [576, 200])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("batch", BATCHES)
def test_lut(in_features, bits, batch):
    q = quantized(LeanQuant(bits=bits), in_features)
    check_equals_reference("lut", q.tensors, q.spec, batch)


@pytest.mark.parametrize("in_features", [576, 200])  # 200: 25 groups, codes read 8 bytes at a time past the row
@pytest.mark.parametrize("num_codebooks", [1, 2, 3])
@pytest.mark.parametrize("batch", BATCHES)
def test_aqlm(in_features, num_codebooks, batch):
    """Random codes, codebooks and scales stored as `AQLM.quantize` stores them (its k-means and beam search take
    seconds on a busy machine, and the kernel does not care where the codes come from)."""
    g = torch.Generator().manual_seed(num_codebooks)
    codes = torch.randint(0, 256, (OUT_FEATURES, in_features // 8 * num_codebooks), generator=g)
    tensors = {"codes": pack_bits(codes, 8), "codebooks": torch.randn(num_codebooks, 256, 8, generator=g).half(),
               "scales": torch.rand(OUT_FEATURES, 1, generator=g).half()}
    spec = {"num_codebooks": num_codebooks, "nbits_per_codebook": 8, "in_group_size": 8,
            "shape": [OUT_FEATURES, in_features]}
    check_equals_reference("aqlm", tensors, spec, batch)


@pytest.mark.parametrize("batch", [1, 16])
def test_rows_shared_by_threads(batch):
    """1000 rows of 256 inputs are several chunks of rows, taken by two threads as each becomes free."""
    q = quantized(LeanQuant(bits=3), 256, out_features=1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_equals_reference("lut", q.tensors, q.spec, batch)
    finally:
        torch.set_num_threads(threads)


def test_any_leading_shape_and_dtype_and_fp32_scales():
    q = quantized(RTN(bits=4, group_size=64), 128)
    x = torch.randn(2, 3, 128).bfloat16()
    y = cpu.linear("affine", x, q.tensors, q.spec)
    assert y.shape == (2, 3, OUT_FEATURES) and y.dtype == torch.bfloat16
    reference = F.linear(x.float(), q.dequantize())
    torch.testing.assert_close(y, reference.bfloat16())
    fp32_scales = q.tensors | {"scales": q.tensors["scales"].float()}
    torch.testing.assert_close(cpu.linear("affine", x.float(), fp32_scales, q.spec), reference, rtol=1e-5, atol=1e-5)


def test_supports_and_refusals():
    assert cpu.supports("aqlm", {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8, "shape": [8, 64]})
    assert not cpu.supports("aqlm", {"num_codebooks": 1, "nbits_per_codebook": 16, "in_group_size": 8,
                                     "shape": [8, 64]})
    assert cpu.supports("affine", {"bits": 4, "group_size": None, "symmetric": True, "shape": [8, 64]})
    assert not cpu.supports("affine", {"bits": 8, "group_size": 64, "symmetric": True, "shape": [8, 64]})
    assert not cpu.supports("affine", {"bits": 4, "group_size": 20, "symmetric": True, "shape": [8, 60]})
    assert not cpu.supports("incoherent", {"shape": [8, 64]})
    q = quantized(RTN(bits=8, group_size=None), 64)
    with pytest.raises(LqtkError, match="no CPU kernel"):
        cpu.linear("affine", torch.randn(1, 64), q.tensors, q.spec)
