"""Agile-Quant's activation quantization: per-token grids, TRIP factors, the calibration of both, the format, and a
whole walk through the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import REPO, outlier_inputs, recipe_args
from lqtk.cli import main
from lqtk.errors import LqtkError
from lqtk.formats import FORMATS
from lqtk.formats.act_quant import fake_quantize_input, fake_quantize_tokens, quantize_tokens
from lqtk.formats.incoherent import rotate
from lqtk.quant import GPTQ, AgileQuant, QuIP
from lqtk.quant.agile_quant import calibrate_inputs, trip_exponents
from lqtk.quant.quip import layer_seeds

RECIPE = str(REPO / "configs" / "debug" / "gptq-w4a8-tiny.yaml")


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_round_trip_error_is_within_half_a_step(bits):
    x = outlier_inputs() * torch.rand(512, 1) + 0.3  # tokens of different sizes, ranges not centred on 0
    q, scale, zero = quantize_tokens(x, bits)
    assert q.min() >= 0 and q.max() <= 2**bits - 1 and torch.equal(q, q.round())
    assert ((fake_quantize_tokens(x, bits) - x).abs() <= scale / 2 * (1 + 1e-5)).all()
    x[7] = 0
    assert torch.equal(fake_quantize_tokens(x, bits)[7], x[7])  # an all-zero token is exact


def test_clipping_bounds_the_range_and_keeps_the_error_inside_it():
    x = outlier_inputs(size=5.0)
    _, scale, _ = quantize_tokens(x, 8, clip=0.8)
    clipped = fake_quantize_tokens(x, 8, clip=0.8)
    assert (clipped.amax(1) <= 0.8 * x.amax(1) + scale[:, 0]).all()
    inside = (x >= 0.8 * x.amin(1, keepdim=True)) & (x <= 0.8 * x.amax(1, keepdim=True))
    assert ((clipped - x).abs()[inside] <= (scale / 2 * (1 + 1e-5)).expand_as(x)[inside]).all()


def test_trip_factors_are_powers_of_two_and_folding_them_into_the_weights_changes_nothing():
    x, w = outlier_inputs(), torch.randn(64, 96)
    exponents = trip_exponents(x.abs().amax(0), threshold=4.0, max_exponent=4)
    assert exponents.dtype == torch.int8 and exponents.min() >= 0 and exponents.max() <= 4
    assert exponents[3] == 4 and exponents[40] == 4 and exponents.sum() < 96 * 1.5  # the outliers get the largest
    factors = torch.exp2(exponents.float())
    assert torch.equal(torch.log2(factors), exponents.float())
    assert torch.equal(F.linear(x / factors, w * factors), F.linear(x, w))  # exact: scaling by 2^α is exact
    # the quantized path as the integer kernels run it: Q_t(x ⊘ 2^α) against the folded weight
    assert torch.equal(F.linear(fake_quantize_tokens(x / factors, 8), w * factors),
                       F.linear(fake_quantize_input(x, 8, 1.0, exponents), w))


@pytest.mark.parametrize("bits", [8, 4])
def test_calibrated_trip_and_clipping_lower_the_output_error(bits):
    x, w = outlier_inputs(), torch.randn(64, 96)

    def error(clip, exponents):
        return (F.linear(fake_quantize_input(x, bits, clip, exponents) - x, w)).square().sum().item()

    clip, exponents = calibrate_inputs(x, w, bits, [1.0, 0.9, 0.8], trip=True, max_exponent=4)
    assert exponents is not None and exponents[3] > 0 and exponents[40] > 0
    assert error(clip, exponents) < 0.5 * error(1.0, None)  # the outliers no longer set every token's step
    plain_clip, plain = calibrate_inputs(x, w, bits, [1.0, 0.9, 0.8], trip=False, max_exponent=4)
    assert plain is None and error(plain_clip, None) <= error(1.0, None)


def test_agile_quant_wraps_the_weight_method_and_quantizes_the_inputs_at_run_time(monkeypatch):
    monkeypatch.setenv("LQTK_KERNELS", "off")  # the float path (the integer kernel's is tests/test_int_gemm.py)
    x, weights = outlier_inputs(), [torch.randn(48, 96), torch.randn(32, 96)]
    hessian = 2 * x.T @ x / len(x)
    inner = GPTQ(bits=4, group_size=32).quantize_shared(weights, hessian)
    for bits, trip in [(8, False), (8, True), (4, True)]:
        layers = AgileQuant(inner=GPTQ(bits=4, group_size=32), bits=bits, trip=trip).quantize_shared(
            weights, hessian, inputs=x[::2])
        for layer, weight_only in zip(layers, inner):
            assert layer.format == "act_quant" and layer.spec["act_bits"] == bits
            assert torch.equal(layer.dequantize(), weight_only.dequantize())  # the weights are GPTQ's
            y = FORMATS[layer.format].linear(x, layer.tensors, layer.spec, None)
            exponents = layer.tensors.get("input_exponents")
            assert ("input_exponents" in layer.tensors) == trip
            expected = F.linear(fake_quantize_input(x, bits, layer.spec["clip"], exponents), weight_only.dequantize())
            assert torch.equal(y, expected)
    with pytest.raises(LqtkError, match="sample of the layer's inputs"):
        AgileQuant().quantize(weights[0], hessian)
    with pytest.raises(LqtkError, match="clip_ratios"):
        AgileQuant(clip_ratios=[1.5])


@pytest.mark.slow
def test_w4a8_walk_with_token_pruning_exports_reloads_and_evaluates(corpus, tmp_path):
    """calibrate → export (reload-and-compare check) → evaluate, with the inputs quantized in every forward; the
    export records its token pruning, so `lqtk evaluate` scores the same positions as the phase's evaluation."""
    run_dir = tmp_path / "run"
    main(recipe_args(corpus, run_dir, "--trainer.enable_progress_bar", "false",
                     "--model.init_args.token_pruning.start_layer", "1", "--model.init_args.token_pruning.keep_ratio",
                     "0.5", recipe=RECIPE))  # in-process, as the evaluation below: no check needs a process
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "agile_quant_a8"
    assert 1 < metrics["perplexity"] < 2 * metrics["fp_perplexity"]
    windows = metrics["tokens"] // 32  # 32 of each window's 63 predicted positions are kept
    assert metrics["tokens"] == windows * 32 and windows > 10
    tensors = load_file(run_dir / "model" / "model.safetensors")
    exponents = [t for name, t in tensors.items() if name.endswith("input_exponents")]
    assert exponents and all(t.dtype == torch.int8 for t in exponents)
    quantization = json.loads((run_dir / "model" / "config.json").read_text())["quantization_config"]
    assert {layer["format"] for layer in quantization["layers"].values()} == {"act_quant"}
    assert quantization["token_pruning"] == {"start_layer": 1, "keep_ratio": 0.5, "recent": 16}
    main(["evaluate", "--model", str(run_dir / "model"), "--text", str(corpus["evaluation"]), "--seq-len", "64",
          "--output", str(tmp_path / "eval.json")])
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert evaluation["tokens"] == metrics["tokens"]
    assert math.isclose(evaluation["perplexity"], metrics["perplexity"], rel_tol=1e-5)


def test_rotated_inputs_quip_around_agile_quant_calibrates_on_the_transformed_inputs_and_beats_trip_at_4_bits():
    x, w = outlier_inputs(channels=128), torch.randn(64, 128)
    hessian = 2 * x.T @ x / len(x)
    weights_only = GPTQ(bits=8, group_size=32, act_order=False)  # fine weights: the activation error dominates
    rotated = QuIP(inner=AgileQuant(inner=weights_only, bits=4, trip=True)).quantize_shared([w], hessian,
                                                                                              inputs=x[::2])[0]
    layer = rotated.tensors
    scales = layer["input_scales"].float()
    inner_inputs = rotate(x / scales, layer_seeds(0, w)[1])  # what the layer's inner act_quant format reads
    spec = rotated.spec["inner"]
    assert rotated.format == "incoherent" and rotated.spec["inner_format"] == "act_quant"
    # the clipping ratio and TRIP factors were chosen on those transformed inputs
    clip, exponents = calibrate_inputs(inner_inputs[::2], FORMATS["act_quant"].dequantize(layer, spec), 4,
                                       AgileQuant().clip_ratios, True, 2)
    assert spec["clip"] == clip and torch.equal(layer.get("input_exponents", torch.zeros(0)),
                                                torch.zeros(0) if exponents is None else exponents)
    plain = AgileQuant(inner=weights_only, bits=4, trip=True).quantize_shared([w], hessian, inputs=x[::2])[0]
    exact = F.linear(x, w)

    def error(q):
        return (FORMATS[q.format].linear(x, q.tensors, q.spec, None) - exact).square().sum().item()
    assert error(rotated) < 0.5 * error(plain)  # the rotation spreads the outlier channels over all channels
