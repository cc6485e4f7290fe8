"""The AVX2 W4A8 integer GEMM (lqtk.kernels.int_gemm): exact int32 sums for every int16 chain length, the same
per-token codes as quantize_tokens, and the same output as the fake-quantized float layer."""

import pytest
import torch
import torch.nn.functional as F

from helpers import outlier_inputs
from lqtk.errors import LqtkError
from lqtk.formats import FORMATS
from lqtk.formats.act_quant import fake_quantize_input, fake_quantize_tokens, quantize_tokens
from lqtk.kernels import int_gemm
from lqtk.kernels.int_gemm import integer_weight
from lqtk.nn import QuantizedLinear
from lqtk.quant import GPTQ, AgileQuant

BUILT = int_gemm.available()  # compiled once into lqtk.kernels.build_directory(), shared by every run


def test_the_extension_builds():
    assert BUILT, int_gemm.build_error()


def int_weight(out_features, in_features, max_abs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-max_abs, max_abs + 1, (out_features, in_features), generator=gen)


def reference(x, weight, scales, group_size, clip):
    """F.linear of the fake-quantized input and the dequantized weight, in fp32 as the evaluation runs it."""
    columns = torch.arange(weight.shape[1]) // (group_size or weight.shape[1])
    return F.linear(fake_quantize_tokens(x, 8, clip), (weight * scales[:, columns]).float())


@pytest.mark.parametrize("max_abs,chain", [(15, 4), (16, 4), (32, 2), (64, 1)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_integer_sums_are_exact(max_abs, chain, tokens):
    gen = torch.Generator().manual_seed(tokens)
    codes = torch.randint(0, 256, (tokens, 200), dtype=torch.uint8, generator=gen)  # 200: padded to 208 inputs
    weight = int_weight(40, 200, max_abs)
    codes[0] = 255  # the largest int16 partial sums: 255 · max|W| per product, all of one sign
    weight[:2] = max_abs
    weight[2:4] = -max_abs
    packed = int_gemm.pack_w4(weight)
    assert packed.chain == chain
    acc = int_gemm.int_matmul(codes, packed)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), codes.double() @ weight.double().T)


@pytest.mark.parametrize("clip", [1.0, 0.85])
def test_codes_are_those_of_quantize_tokens(clip):
    x = outlier_inputs(tokens=37, channels=1000) * torch.rand(37, 1) + 0.3
    x[3] = 0  # an all-zero token
    x[4] = x[4].abs()  # a token without negative values
    x[5, ::3] = x[5, ::3].round()  # values on the grid's half steps are likely somewhere: ties round to even
    codes, scale, zero = int_gemm.quantize_tokens(x, clip)
    expected = quantize_tokens(x, 8, clip)
    assert torch.equal(codes.float(), expected[0])
    assert torch.equal(scale, expected[1]) and torch.equal(zero, expected[2])


@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("max_abs", [15, 60])
def test_layer_is_the_fake_quantized_float_layer(group_size, tokens, max_abs):
    """576 inputs: in groups of 128, a shorter last group of 64; 40 outputs: a partial panel of 16."""
    x = outlier_inputs(tokens=tokens, channels=576, outliers=(7, 300), size=20.0, seed=tokens)
    weight = int_weight(40, 576, max_abs, seed=tokens)
    scales = torch.rand(40, 1 if group_size is None else 5, generator=torch.Generator().manual_seed(1)) * 1e-2
    packed = int_gemm.pack_w4(weight, group_size)
    for clip in (1.0, 0.9):
        expected = reference(x, weight, scales, group_size, clip)
        y = int_gemm.w4a8_linear(x, packed, scales, clip)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_leading_dimensions_and_per_channel_scales_as_a_vector():
    x = torch.randn(2, 5, 64)
    weight = int_weight(16, 64, 15)
    scales = torch.rand(16) * 1e-2
    y = int_gemm.w4a8_linear(x, int_gemm.pack_w4(weight), scales)
    assert y.shape == (2, 5, 16)
    expected = reference(x.reshape(10, 64), weight, scales[:, None], None, 1.0).reshape(2, 5, 16)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("group_size", [None, 32])
def test_agile_quant_layer_with_trip(group_size):
    """The act_quant layer's run-time output (TRIP factors folded into the integer weight) from one kernel call."""
    x = outlier_inputs(tokens=64)
    hessian = 2 * x.T @ x / len(x)
    config = AgileQuant(inner=GPTQ(bits=4, group_size=group_size), bits=8, trip=True, max_exponent=2)
    layer, = config.quantize_shared([torch.randn(40, 96)], hessian, inputs=x)
    dense = FORMATS[layer.spec["inner_format"]].dequantize(layer.tensors, layer.spec["inner"])
    expected = F.linear(fake_quantize_input(x, 8, layer.spec["clip"], layer.tensors["input_exponents"]), dense)
    weight, scales = integer_weight(layer.tensors, layer.spec)
    factors = torch.exp2(layer.tensors["input_exponents"].float())
    y = int_gemm.w4a8_linear(x / factors, int_gemm.pack_w4(weight, group_size), scales, layer.spec["clip"])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_unsupported_weights_are_refused():
    with pytest.raises(LqtkError, match="saturate"):
        int_gemm.pack_w4(torch.full((4, 32), 65))
    with pytest.raises(LqtkError, match="multiple of 16"):
        int_gemm.pack_w4(int_weight(4, 64, 7), group_size=24)
    packed = int_gemm.pack_w4(int_weight(4, 64, 7), group_size=32)
    with pytest.raises(LqtkError, match="groups"):
        int_gemm.w4a8_linear(torch.randn(3, 64), packed, torch.ones(4, 1))


def test_act_quant_layers_run_the_kernel_by_default_and_the_float_path_when_off(monkeypatch):
    x = outlier_inputs(tokens=300)
    config = AgileQuant(inner=GPTQ(bits=4, group_size=32), bits=8, trip=True)
    layer = QuantizedLinear(config.quantize_shared([torch.randn(40, 96)], 2 * x.T @ x / len(x), inputs=x)[0],
                            bias=torch.randn(40))
    with torch.no_grad():
        y = layer(x)
        assert "int_gemm" in layer._decoded  # packed once, kept by the layer
        monkeypatch.setenv("LQTK_KERNELS", "off")
        expected = layer(x)
    assert not torch.equal(y, expected)  # different arithmetic...
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())  # ...same layer
