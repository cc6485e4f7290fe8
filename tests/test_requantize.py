"""Re-quantization from cached Hessians (`Requantize`) and mixed precision under a bit budget: the allocation is the
brute-force optimum, re-quantizing with the calibration's own method reproduces its export bit for bit, a budget
is kept and beats every uniform candidate it can afford, and bad input is refused before any work."""

import itertools
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, fails_with, recipe_args
from lqtk.cli import main
from lqtk.models import load_causal_lm, prepare_model
from lqtk.phases.hessian_cache import group_files, load_group
from lqtk.quant.allocation import allocate, output_error, output_fisher

DEBUG = REPO / "configs" / "debug"
MIXED = str(DEBUG / "mixed-tiny.yaml")


def test_allocation_is_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(100):
        layers, choices = rng.randint(1, 5), rng.randint(1, 4)
        costs = [[rng.randint(1, 10) for _ in range(choices)] for _ in range(layers)]
        losses = [[rng.random() for _ in range(choices)] for _ in range(layers)]
        budget = rng.randint(sum(map(min, costs)), sum(map(max, costs)))
        best = min(sum(losses[i][c] for i, c in enumerate(pick)) for pick in itertools.product(range(choices),
                   repeat=layers) if sum(costs[i][c] for i, c in enumerate(pick)) <= budget)
        picked = allocate(costs, losses, budget, resolution=budget)  # integer costs: the rounding is exact
        assert sum(costs[i][c] for i, c in enumerate(picked)) <= budget
        assert sum(losses[i][c] for i, c in enumerate(picked)) == pytest.approx(best, abs=1e-12)
    with pytest.raises(ValueError, match="budget"):
        allocate([[3, 4]], [[1.0, 0.5]], 2)


def test_output_fisher_is_the_mean_squared_loss_gradient_of_each_output():
    model = load_causal_lm(prepare_model("tiny-llama")).requires_grad_(False)
    windows = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    fisher = output_fisher(model, windows, names, batch_size=2)
    for name in names:  # the reference: autograd of the summed loss with respect to the kept output, per window
        total = 0
        for window in windows:
            outputs = []
            hook = model.get_submodule(name).register_forward_hook(lambda m, a, out: outputs.append(out))
            model.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_())
            logits = model(window[None]).logits[0, :-1]
            hook.remove()
            model.model.embed_tokens._forward_hooks.clear()
            loss = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
            total = total + torch.autograd.grad(loss, outputs[0])[0][0].pow(2).sum(0)
        assert torch.allclose(fisher[name], total / (3 * 11), rtol=1e-4, atol=1e-10)
    delta, hessian = torch.randn(4, 6), torch.eye(6)
    assert output_error(delta, hessian, torch.tensor([1.0, 0, 0, 0])) == pytest.approx(delta[0].pow(2).sum().item())


@pytest.fixture(scope="module")
def calibrated(debug_run):
    """A GPTQ calibration of the tiny model that kept its Hessians (the debug recipe's run, shared)."""
    return debug_run


def requantize(corpus, calibrated, run_dir, *extra):
    """The re-quantization phase on `calibrated`'s export and Hessians, in-process (it needs no process of its own)."""
    main(recipe_args(corpus, run_dir, "--model.init_args.model", str(calibrated / "model"), *extra, recipe=MIXED))
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_hessians_are_cached_per_group(calibrated):
    files = group_files(calibrated / "hessians")
    assert len(files) == 14 and len(set(files.values())) == 8  # 2 blocks: q/k/v, o, gate/up, down
    linears, hessian, inputs = load_group(files["model.layers.1.self_attn.k_proj"])
    assert linears == [f"model.layers.1.self_attn.{name}_proj" for name in "qkv"] and inputs is None
    assert hessian.shape == (64, 64) and torch.allclose(hessian, hessian.T) and hessian.diagonal().min() > 0


def gptq(**settings) -> str:
    return json.dumps([{"class_path": "lqtk.quant.GPTQ", "init_args": settings}])


@pytest.mark.slow
def test_requantizing_with_the_calibrations_method_reproduces_its_export(corpus, calibrated, tmp_path):
    """GPTQ is deterministic given W and H: the cached H must be the very one the calibration used."""
    requantize(corpus, calibrated, tmp_path / "same", "--model.init_args.budget_bits", "null",  # gptq-tiny's:
               "--model.init_args.candidates", gptq(bits=4, group_size=48, act_order=True, observer="minmax"))
    expected = load_file(calibrated / "model" / "model.safetensors")
    again = load_file(tmp_path / "same" / "model" / "model.safetensors")
    assert expected.keys() == again.keys()
    assert all(torch.equal(expected[name], again[name]) for name in expected)


@pytest.fixture(scope="module")
def mixed(corpus, calibrated, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mixed") / "mixed"
    return run_dir, requantize(corpus, calibrated, run_dir)


@pytest.mark.slow
def test_mixed_precision_keeps_the_budget_and_beats_the_uniform_candidates_it_affords(mixed):
    run_dir, metrics = mixed
    assert metrics["phase"] == "Requantize" and metrics["bits_per_weight"] <= metrics["budget_bits"]
    config = json.loads((run_dir / "model" / "config.json").read_text())["quantization_config"]
    chosen = {name: layer["bits"] for name, layer in config["layers"].items()}
    assert len(set(chosen.values())) > 1  # a real mix, recorded per layer in the export
    assert {name: metrics["candidates"][c]["bits"] for name, c in metrics["allocation"].items()} == chosen
    weights = sum(layer["shape"][0] * layer["shape"][1] for layer in config["layers"].values())
    affordable = [u["proxy_loss"] for u in metrics["uniform"] if u["bits"] <= metrics["budget_bits"] * weights]
    assert affordable and metrics["proxy_loss"] <= min(affordable)  # each uniform choice that fits loses more
    assert metrics["proxy_loss"] > min(u["proxy_loss"] for u in metrics["uniform"])  # the budget binds


@pytest.mark.slow
def test_requantize_refuses_bad_input_with_one_clear_message(corpus, calibrated, tmp_path, capsys):
    args = recipe_args(corpus, tmp_path / "run", "--model.init_args.model", str(calibrated / "model"), recipe=MIXED)
    fails_with(capsys, [*args, "--model.init_args.budget_bits", "1.0"], "budget_bits 1.0 is out of reach")
    fails_with(capsys, [*args, "--model.init_args.budget_bits", "null"], "no budget_bits to choose among them")
    fails_with(capsys, [*args, "--model.init_args.hessians", str(tmp_path)], "holds no cached Hessians")
    fails_with(capsys, [*args, "--model.init_args.layers", "[nothing]"], "matches layers")
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_mixed_calibration_quantizes_the_allocation_sequentially(corpus, calibrated, mixed, tmp_path, capsys):
    main(recipe_args(corpus, tmp_path / "seq", "--model.init_args.model", str(mixed[0] / "model"),
                     recipe=str(DEBUG / "mixed-tiny-seq.yaml")))
    layers = [json.loads((run / "model" / "config.json").read_text())["quantization_config"]["layers"]
              for run in (mixed[0], tmp_path / "seq")]
    assert layers[0] == layers[1]  # the same choice per layer, hence the same bits
    metrics = json.loads((tmp_path / "seq" / "metrics.json").read_text())
    assert metrics["phase"] == "MixedCalibration" and metrics["budget_bits"] == 3.5
    bad = recipe_args(corpus, tmp_path / "bad", "--model.init_args.model", str(calibrated / "model"),
                      recipe=str(DEBUG / "mixed-tiny-seq.yaml"))
    fails_with(capsys, bad, "is not the export of a finished Requantize")
