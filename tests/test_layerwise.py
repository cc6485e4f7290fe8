"""LayerwiseCalibration's walk in-process on the tiny model: the replay of finished sub-modules changes no bit of the
result, a non-sequential walk gives every group of Linears its own Hessian, and layer_quantizers pick per Linear."""

import pytest
import torch

from helpers import calibrate, quantized_tensors
from lqtk.models import load_causal_lm
from lqtk.nn import quantized_layers
from lqtk.quant import GPTQ, RTN
from lqtk.streaming import materialize_all


@pytest.mark.parametrize("model, sequential, tails", [  # the fast lane keeps one: Llama, not sequential
    pytest.param("tiny-llama", True, {"self_attn": ("self_attn.o_proj", 2), "mlp": ("mlp.down_proj", 0)},
                 marks=pytest.mark.slow),
    ("tiny-llama", False, {"self_attn": ("self_attn.o_proj", 2), "mlp": ("mlp.down_proj", 0)}),
    pytest.param("tiny-qwen2-moe", True, {"self_attn": ("self_attn.o_proj", 2), "mlp": None},  # its mlp sums experts
                 marks=pytest.mark.slow),
    pytest.param("tiny-gemma3", True, {"self_attn": ("self_attn.o_proj", 2), "mlp": ("mlp.down_proj", 0)},
                 marks=pytest.mark.slow),
])
def test_replay_changes_no_bit_of_the_result(corpus, tmp_path, model, sequential, tails):
    replayed = calibrate(corpus, tmp_path / "replay", model, sequential=sequential)
    recomputed = calibrate(corpus, tmp_path / "recompute", model, sequential=sequential, replay=False)
    assert replayed.tails[0] == tails
    assert torch.equal(replayed.inputs, recomputed.inputs)  # the last block's outputs
    ours, theirs = quantized_tensors(replayed), quantized_tensors(recomputed)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.slow
def test_non_sequential_walk_calibrates_every_group_on_its_own_inputs(corpus, tmp_path):
    sequential = calibrate(corpus, tmp_path / "sequential")
    one_stage = calibrate(corpus, tmp_path / "one-stage", sequential=False)
    assert one_stage.passes[0] == [[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                    ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]]
    ours, theirs = quantized_tensors(one_stage), quantized_tensors(sequential)
    # block 0's first group sees the same (fp) inputs either way; later groups see fp rather than quantized inputs
    first = [key for key in ours if key.startswith("model.layers.0.self_attn.q_proj")]
    assert all(torch.equal(ours[key], theirs[key]) for key in first)
    assert not torch.equal(ours["model.layers.0.mlp.down_proj.qweight"], theirs["model.layers.0.mlp.down_proj.qweight"])
    assert max(one_stage.layer_errors.values()) < 0.2


@pytest.mark.slow
def test_bf16_forwards_quantize_about_as_well_as_fp32(corpus, tmp_path):
    fp32 = calibrate(corpus, tmp_path / "fp32")
    bf16 = calibrate(corpus, tmp_path / "bf16", compute_dtype="bfloat16")
    assert bf16.inputs.dtype == torch.float32  # cached activations stay fp32
    for name, error in fp32.layer_errors.items():
        assert bf16.layer_errors[name] == pytest.approx(error, rel=0.2), name


def test_layer_quantizers_override_the_quantizer_of_the_linears_they_match(corpus, tmp_path):
    rtn = RTN(bits=3, group_size=16)  # takes no Hessian: its result is known without the walk
    phase = calibrate(corpus, tmp_path, layer_quantizers={r"\.v_proj$": rtn, "down_proj": GPTQ(bits=2, group_size=32)})
    fp = load_causal_lm("tiny-llama")
    for name, layer in quantized_layers(phase.model).items():
        expected = {"v_proj": ("rtn", 3), "down_proj": ("gptq", 2)}.get(name.rsplit(".", 1)[1], ("gptq", 3))
        assert (layer.method, layer.spec["bits"]) == expected
    materialize_all(phase.model)
    name = "model.layers.1.self_attn.v_proj"
    alone = rtn.quantize(fp.get_submodule(name).weight.detach(), None)
    assert all(torch.equal(t, alone.tensors[key]) for key, t in quantized_layers(phase.model)[name].tensors().items())
