"""Integer compute of activation-quantized layers: exact int32 accumulation, and the same output as the
fake-quantized float matmul the evaluation runs."""

import pytest
import torch
from test_activations import outlier_inputs

from lqtk.errors import LqtkError
from lqtk.quant import FORMATS, GPTQ, AgileQuant
from lqtk.quant.activations import quantize_tokens
from lqtk.quant.int_matmul import grouped_linear, int_linear, integer_weight, pack_weight, scaled_int_matmul


def test_integer_accumulation_is_exact():
    codes = torch.randint(0, 256, (37, 160), dtype=torch.uint8)
    weight = torch.randint(-64, 65, (48, 160), dtype=torch.int8)
    acc = scaled_int_matmul(codes, pack_weight(weight, 37), torch.ones(48))
    assert torch.equal(acc.double(), codes.double() @ weight.double().T)  # |acc| < 2^24: exact in fp32 too


@pytest.mark.parametrize("group_size", [None, 32])
def test_integer_path_computes_the_fake_quantized_float_matmul(group_size):
    """From an AgileQuant layer (4-bit weights, TRIP exponents ≤ 2): the integer operands reproduce the layer's
    run-time output, per channel and per group."""
    x = outlier_inputs(tokens=64)
    hessian = 2 * x.T @ x / len(x)
    config = AgileQuant(inner=GPTQ(bits=4, group_size=group_size), bits=8, trip=True, max_exponent=2)
    layer, = config.quantize_shared([torch.randn(40, 96)], hessian, inputs=x)
    assert "input_exponents" in layer.tensors
    expected = FORMATS[layer.format].linear(x, layer.tensors, layer.spec, None)
    weight, scales = integer_weight(layer.tensors, layer.spec)
    factors = torch.exp2(layer.tensors["input_exponents"].float())
    codes, token_scale, token_zero = quantize_tokens(x / factors, 8, layer.spec["clip"])
    codes = codes.to(torch.uint8)
    if group_size is None:
        y = int_linear(codes, token_scale, token_zero, pack_weight(weight, 64), scales[:, 0], weight.sum(1))
    else:
        groups = weight.split(group_size, dim=1)
        y = grouped_linear(codes, token_scale, token_zero, [pack_weight(g, 64) for g in groups], scales,
                           torch.stack([g.sum(1) for g in groups], 1).float(), group_size)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


def test_weights_that_could_saturate_are_refused():
    with pytest.raises(LqtkError, match="saturate"):
        pack_weight(torch.full((4, 8), 100), 4)
