import pytest
import torch
import torch.nn.functional as F

from lqtk.nn import QuantizedLinear, quantized_linear_from_config
from lqtk.quant import RTN


def make_layer(bias=True):
    w = torch.randn(12, 40)
    b = torch.randn(12) if bias else None
    return QuantizedLinear(RTN(bits=4, group_size=16).quantize(w), b), b


def test_forward_equals_dense_matmul_with_the_decoded_weight():
    layer, bias = make_layer()
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(layer(x), F.linear(x, layer.quantized_weight.dequantize(), bias))


def test_floating_tensors_are_frozen_parameters_and_codes_are_buffers():
    layer, _ = make_layer()
    params = dict(layer.named_parameters())
    assert set(params) == {"scales", "bias"} and not any(p.requires_grad for p in params.values())
    assert set(dict(layer.named_buffers())) == {"qweight", "zeros"}


def test_decoded_weight_cache_follows_changes_and_training():
    layer, _ = make_layer(bias=False)
    x = torch.randn(4, 40)
    before = layer(x)
    with torch.no_grad():
        layer.scales.mul_(2)  # an in-place change must not be hidden by the cache
    torch.testing.assert_close(layer(x), 2 * before, rtol=1e-3, atol=1e-3)
    layer.scales.requires_grad_(True)  # training decodes afresh so gradients reach the scales
    layer(x).sum().backward()
    assert layer.scales.grad is not None and layer.scales.grad.abs().sum() > 0


def test_rebuilt_from_its_layer_config_and_tensors():
    layer, _ = make_layer()
    copy = quantized_linear_from_config(layer.layer_config(), layer.tensors(), layer.bias)
    x = torch.randn(2, 40)
    assert torch.equal(copy(x), layer(x))


def test_bits_per_weight_counts_codes_scales_and_zeros():
    from lqtk.model_format import bits_per_weight

    model = torch.nn.Sequential(QuantizedLinear(RTN(bits=4, group_size=128).quantize(torch.randn(576, 576))),
                                QuantizedLinear(RTN(bits=3, group_size=128, symmetric=True)
                                                .quantize(torch.randn(64, 576))))
    # 576 inputs = 5 groups (4 x 128 + 64). Asymmetric 4-bit: codes, 5 fp16 scales, 5 packed 4-bit zeros (1 word)
    # per row; symmetric 3-bit: codes (54 words) and 5 fp16 scales per row, no zeros.
    expected = (576 * (576 * 4 + 5 * 16 + 32) + 64 * (54 * 32 + 5 * 16)) / (576 * 576 + 64 * 576)
    assert bits_per_weight(model) == pytest.approx(expected)
