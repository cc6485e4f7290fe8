"""Architectures beyond Llama: the debug recipe calibrates, exports, reloads and evaluates tiny random Qwen2 (q/k/v
biases), Gemma-3 (sliding and full attention, q/k norms, BOS), Phi-3 (fused qkv and gate/up) and Qwen2-MoE (fused
experts, shared expert, routers) models; and the mechanisms that make them work: per-block keyword arguments, the
unfused experts, experts' shared passes and the fallback of an expert that got no tokens.

The phases run in-process through `lqtk.cli.main` (the CLI's entry point): a subprocess per run would spend most of
its time importing."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MixtralConfig

from helpers import DEBUG_RECIPE, write_text
from lqtk.anatomy import block_output, decoder_blocks, linear_layers
from lqtk.cli import main
from lqtk.models import load_causal_lm
from lqtk.moe import unfuse_experts
from lqtk.phases import calibration_passes as passes_module
from lqtk.phases.walk import BlockWalk
from lqtk.quant import RTN
from lqtk.reference_models import build_tiny_model

ARCHITECTURES = ["qwen2", "gemma3", "phi3", "qwen2_moe"]
BOS = {"gemma3"}  # Gemma-3 is trained with a BOS token at the start of every sequence


@pytest.fixture(autouse=True)
def cli_argv(monkeypatch):
    """LightningCLI warns when it is given arguments while sys.argv holds pytest's."""
    monkeypatch.setattr(sys, "argv", ["lqtk"])


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A calibration text and a short evaluation text (the evaluations dominate these tests' time)."""
    folder = tmp_path_factory.mktemp("texts")
    return {"calibration": write_text(folder / "calibration.txt", 1200, 0),
            "evaluation": write_text(folder / "evaluation.txt", 300, 1)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(architecture, **config): the folder of a tiny random model, built once per module."""
    folder, built = tmp_path_factory.mktemp("models"), {}

    def build(architecture, **config):
        key = (architecture, *sorted(config.items()))
        if key not in built:
            built[key] = folder / f"{architecture}-{len(built)}"
            build_tiny_model(built[key], architecture, **config)
        return built[key]
    return build


def calibrate(model, texts, run_dir, *extra):
    """The debug recipe (GPTQ w4 g48) on `model`; returns its metrics."""
    main(["fit", "--config", DEBUG_RECIPE, "--model.init_args.model", str(model), "--trainer.default_root_dir",
          str(run_dir), "--data.calibration_files",
          f"[{texts['calibration']}]", "--data.evaluation_files", f"[{texts['evaluation']}]", *extra])
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_calibrate_export_reload_evaluate(architecture, tiny, texts, tmp_path):
    bos = ["--data.bos", "true"] if architecture in BOS else []
    metrics = calibrate(tiny(architecture), texts, tmp_path / "run", *bos)  # the export is reloaded and compared
    assert metrics["bos"] == (architecture in BOS)
    assert 0.9 < metrics["ratio_to_fp"] < 1.1
    fp_linears = linear_layers(decoder_blocks(load_causal_lm(tiny(architecture)))[0])
    layers = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["quantization_config"]["layers"]
    quantized = {name.split(".", 3)[3] for name in layers if name.startswith("model.layers.0.")}
    assert quantized == set(fp_linears) - {"mlp.shared_expert_gate"}  # every Linear but the router
    out = tmp_path / "eval.json"
    main(["evaluate", "--model", str(tmp_path / "run" / "model"), "--text", str(texts["evaluation"]),
          "--seq-len", "64", "--output", str(out), *(["--bos"] if bos else [])])
    assert json.loads(out.read_text())["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_qwen2_biases_survive_the_export(tiny, texts, tmp_path):
    calibrate(tiny("qwen2"), texts, tmp_path / "run", "--export.evaluate", "false")
    fp, exported = load_file(tiny("qwen2") / "model.safetensors"), load_file(tmp_path / "run/model/model.safetensors")
    biases = [key for key in fp if key.endswith("_proj.bias")]
    assert len(biases) == 2 * 3  # q, k, v in both blocks
    assert all(torch.equal(exported[key], fp[key]) for key in biases)


def test_every_block_is_replayed_with_its_own_keyword_arguments(tiny):
    """Gemma-3's sliding-window block 0 and full-attention block 1 get different masks and rope: replaying the
    recorded inputs block by block reproduces the model's own block outputs exactly."""
    model = load_causal_lm(tiny("gemma3"))
    walk = BlockWalk()
    walk.__dict__.update(model=model, blocks=decoder_blocks(model))
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    outputs = []
    handles = [block.register_forward_hook(lambda m, args, out: outputs.append(block_output(out)))
               for block in walk.blocks]
    with torch.no_grad():
        model(tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    hidden, kwargs = walk.capture_block_inputs([tokens])
    first, second = kwargs[0]
    assert first["attention_mask"] is not second["attention_mask"]
    assert first["position_ids"] is second["position_ids"]  # shared, not copied
    with torch.no_grad():
        for block, block_kwargs, expected in zip(walk.blocks, kwargs[0], outputs):
            hidden = block_output(block(hidden, **block_kwargs))
            assert torch.equal(hidden, expected)


@pytest.mark.parametrize("config", ["qwen2_moe", "mixtral"])
def test_unfused_experts_compute_the_fused_logits(config, tiny):
    if config == "mixtral":
        torch.manual_seed(0)
        fused = AutoModelForCausalLM.from_config(MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))
        unfused = unfuse_experts(AutoModelForCausalLM.from_config(fused.config))
        unfused.load_state_dict(fused.state_dict(), strict=False)  # the attention; the experts below
        for block, fused_block in zip(decoder_blocks(unfused), decoder_blocks(fused)):
            for e, expert in enumerate(block.mlp.experts):
                expert.gate_up_proj.weight.data = fused_block.mlp.experts.gate_up_proj[e].detach().clone()
                expert.down_proj.weight.data = fused_block.mlp.experts.down_proj[e].detach().clone()
    else:
        fused = AutoModelForCausalLM.from_pretrained(tiny("qwen2_moe"))
        unfused = load_causal_lm(tiny("qwen2_moe"))
    assert "mlp.experts.3.down_proj" in linear_layers(decoder_blocks(unfused)[0])
    tokens = torch.randint(0, fused.config.vocab_size, (3, 50))
    with torch.no_grad():
        assert torch.equal(fused(tokens).logits, unfused(tokens).logits)


@pytest.mark.slow
def test_experts_share_passes_and_routers_stay_out(tiny):
    model = load_causal_lm(tiny("qwen2_moe"))
    tokens = torch.randint(0, model.config.vocab_size, (1, 8))  # few tokens: some experts are not reached
    for block in decoder_blocks(model):
        linears = {name: m for name, m in linear_layers(block).items() if not name.endswith("shared_expert_gate")}
        sequential, at_once = (passes_module.calibration_passes(linears, lambda: model(tokens), flag)
                               for flag in (True, False))
        assert at_once == [[group for one_pass in sequential for group in one_pass]]  # one pass
        names = [name for one_pass in sequential for group in one_pass for name in group]
        assert sorted(names) == sorted(linears)  # each Linear once, also experts the probe did not reach
        gate_up, down = ([[f"mlp.experts.{e}.{proj}"] for e in range(4)] for proj in ("gate_up_proj", "down_proj"))
        experts_passes = [sorted(one_pass) for one_pass in sequential if "experts." in one_pass[0][0]]
        assert experts_passes == [gate_up, down]


@pytest.mark.slow
def test_merged_expert_passes_give_what_one_pass_per_expert_gives(tiny, texts, tmp_path, monkeypatch):
    """Experts do not feed each other: calibrating all of them in one pass changes nothing but the time."""
    args = ("--export.evaluate", "false")
    calibrate(tiny("qwen2_moe"), texts, tmp_path / "merged", *args)
    merged = passes_module.calibration_passes
    monkeypatch.setattr("lqtk.phases.layerwise.calibration_passes", lambda *a: [
        [group] for one_pass in merged(*a) for group in one_pass])
    calibrate(tiny("qwen2_moe"), texts, tmp_path / "split", *args)
    expected, result = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("split", "merged"))
    assert expected.keys() == result.keys() and all(torch.equal(expected[k], result[k]) for k in expected)


@pytest.mark.slow
def test_expert_without_tokens_is_rounded_to_nearest(tiny, texts, tmp_path):
    """Top-1 routing where expert 1's router row is minus expert 0's, so one of them always scores >= 0 while
    expert 3's row is zero: expert 3 never gets a token. It is quantized with the identity Hessian, which makes
    GPTQ round to nearest: the same weight as RTN's, not the zeros of 'dead' columns."""
    model = tmp_path / "model"
    model.mkdir()
    source = tiny("qwen2_moe", num_experts_per_tok=1)
    for file in source.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    weights = load_file(model / "model.safetensors")
    for block in range(2):
        router = weights[f"model.layers.{block}.mlp.gate.weight"]
        router[1], router[3] = -router[0], 0
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    metrics = calibrate(model, texts, tmp_path / "run", "--export.evaluate", "false")
    dead = [f"model.layers.{block}.mlp.experts.3.{proj}" for block in range(2) for proj in ("gate_up_proj",
                                                                                              "down_proj")]
    assert sorted(metrics["fallback_layers"]) == sorted(dead)
    fp, quantized = (dict(load_causal_lm(path).named_modules()) for path in (model, tmp_path / "run" / "model"))
    rtn = RTN(bits=4, group_size=48)
    for name in dead:
        weight = fp[name].weight
        expected = rtn.quantize(weight, None).dequantize()
        assert torch.allclose(quantized[name].quantized_weight.dequantize(), expected, atol=1e-6)
        assert (expected - weight).norm() < 0.1 * weight.norm()
