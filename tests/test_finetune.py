"""Block fine-tuning (`tune_block`, the `BlockFinetune` phase) and chained recipes on the tiny model: tuning lowers a
block's held-out error, the chain calibrates with AQLM then fine-tunes and exports both formats, a re-run skips
finished phases, and bad input is refused with one clear message."""

import json

import pytest
import torch

from helpers import REPO, fails_with, recipe_args, run_lqtk
from lqtk.anatomy import decoder_blocks, linear_layers
from lqtk.cli import main
from lqtk.errors import LqtkError
from lqtk.models import load_causal_lm
from lqtk.nn import QuantizedLinear, set_submodule
from lqtk.phases.block_tuning import BlockTuning, held_out_error, tune_block
from lqtk.quant import RTN
from lqtk.reference_models import build_tiny_llama

DEBUG = REPO / "configs" / "debug"
CHAIN = [str(DEBUG / "aqlm-tiny.yaml"), str(DEBUG / "aqlm-tiny-ft.yaml")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "fp"
    build_tiny_llama(path)
    return path


def block_batches(model, block, count=4, seed=0):
    """(inputs, fp targets, block kwargs) batches of random hidden states through the fp `block`."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(count * 2, 16, model.config.hidden_size, generator=gen)
    positions = torch.arange(16)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, positions), "position_ids": positions}
    with torch.no_grad():
        return [(x, block(x, **kwargs), kwargs) for x in hidden.split(2)]


def quantize_block(block) -> None:
    for name, linear in linear_layers(block).items():
        set_submodule(block, name, QuantizedLinear(RTN(bits=2, group_size=16).quantize(linear.weight.detach())))


@pytest.mark.slow
def test_tuning_lowers_the_held_out_error_and_stores_fp16(tiny):
    model = load_causal_lm(tiny).requires_grad_(False)
    block = decoder_blocks(model)[0]
    batches = block_batches(model, block)
    quantize_block(block)
    before = held_out_error(block, batches[-1:])
    result = tune_block(block, batches, BlockTuning(lr=1e-3, max_steps=30, eval_every=3, patience=3), 0)
    assert result["error_before"] == pytest.approx(before)
    assert result["error_after"] < 0.9 * before
    assert result["error_after"] == pytest.approx(held_out_error(block, batches[-1:]))
    scales = block.self_attn.q_proj.scales
    assert scales.dtype == torch.float16 and not scales.requires_grad  # stored as exported, frozen again


def test_tuning_an_fp_block_or_diverging_is_refused(tiny):
    model = load_causal_lm(tiny).requires_grad_(False)
    block = decoder_blocks(model)[0]
    batches = block_batches(model, block)
    with pytest.raises(LqtkError, match="has no trainable tensors"):
        tune_block(block, batches, BlockTuning(tune_norms=False), 0)
    quantize_block(block)
    with pytest.raises(LqtkError, match="lower block_tuning.lr"):
        tune_block(block, batches, BlockTuning(lr=1e30, max_steps=5), 0)
    with pytest.raises(LqtkError, match="needs at least one to train on"):
        tune_block(block, batches, BlockTuning(validation_batches=4), 0)


def test_tuning_that_changes_nothing_says_so(tiny, caplog):
    """lr so high that every step overshoots: early stopping keeps the starting tensors, and a warning says so."""
    model = load_causal_lm(tiny).requires_grad_(False)
    block = decoder_blocks(model)[0]
    batches = block_batches(model, block)
    quantize_block(block)
    start = {name: t.clone() for name, t in block.state_dict().items()}
    result = tune_block(block, batches, BlockTuning(lr=10.0, max_steps=4, eval_every=1, patience=2), 0, "block 0")
    assert result["error_after"] == result["error_before"]
    assert all(torch.equal(t, start[name]) for name, t in block.state_dict().items())
    assert "block 0: fine-tuning changed nothing" in caplog.text and "lower lr (now 10)" in caplog.text


@pytest.fixture(scope="module")
def chain_run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    args = [*recipe_args(corpus, root, "--export.hf_aqlm", "true", recipe=CHAIN, command=("chain",))]
    args[args.index("--trainer.default_root_dir")] = "--root"
    proc = run_lqtk(*args, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, args


@pytest.mark.slow
def test_chain_calibrates_then_fine_tunes(chain_run):
    root, _ = chain_run
    calibrated = json.loads((root / "aqlm-tiny" / "metrics.json").read_text())
    tuned = json.loads((root / "aqlm-tiny-ft" / "metrics.json").read_text())
    assert calibrated["method"] == tuned["method"] == "aqlm" and tuned["phase"] == "BlockFinetune"
    assert tuned["model"] == str(root / "aqlm-tiny" / "model")  # the previous phase's export
    assert all(len(h["objective"]) >= 2 for h in calibrated["layer_history"].values())
    assert set(tuned["block_tuning"]) == {"model.layers.0", "model.layers.1"}
    assert all(b["error_after"] <= b["error_before"] for b in tuned["block_tuning"].values())
    for phase in ("aqlm-tiny", "aqlm-tiny-ft"):
        quant = json.loads((root / phase / "model-hf-aqlm" / "config.json").read_text())["quantization_config"]
        assert quant["quant_method"] == "aqlm" and quant["nbits_per_codebook"] == 6


@pytest.mark.slow
def test_calibration_tunes_each_block_in_the_loop(corpus, tmp_path):
    run_dir = tmp_path / "run"
    main(recipe_args(corpus, run_dir, "--model.init_args.block_tuning.max_steps", "6",
                     "--model.init_args.block_tuning.eval_every", "2", "--export.evaluate", "false",
                     recipe=str(DEBUG / "aqlm-tiny.yaml")))
    tuned = json.loads((run_dir / "metrics.json").read_text())["block_tuning"]
    assert set(tuned) == {"model.layers.0", "model.layers.1"}
    assert all(0 < b["steps"] <= 6 and b["error_after"] <= b["error_before"] for b in tuned.values())


@pytest.mark.slow
def test_chain_rerun_skips_finished_phases(chain_run, tmp_path):
    root, args = chain_run
    weights = root / "aqlm-tiny-ft" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    proc = run_lqtk(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("is finished") == 2 and weights.stat().st_mtime_ns == before


def test_finetune_of_an_fp_model_is_refused(corpus, tiny, tmp_path, capsys):
    argv = recipe_args(corpus, tmp_path / "run", "--model.init_args.model", str(tiny),
                       recipe=str(DEBUG / "aqlm-tiny-ft.yaml"))
    fails_with(capsys, argv, "is not a quantized model")
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_finetune_against_a_quantized_fp_model_is_refused(chain_run, corpus, tmp_path, capsys):
    root, _ = chain_run
    argv = recipe_args(corpus, tmp_path / "run", "--model.init_args.model", str(root / "aqlm-tiny" / "model"),
                       "--model.init_args.fp_model", str(root / "aqlm-tiny" / "model"),
                       recipe=str(DEBUG / "aqlm-tiny-ft.yaml"))
    fails_with(capsys, argv, "is a quantized model: point it at the fp model")


def test_hf_aqlm_export_of_gptq_is_refused_before_calibrating(corpus, tmp_path, capsys):
    fails_with(capsys, recipe_args(corpus, tmp_path / "run", "--export.hf_aqlm", "true"),
               "export.hf_aqlm needs an AQLM model")


def test_aqlm_setting_larger_than_a_layer_is_refused_up_front(corpus, tmp_path, capsys):
    argv = recipe_args(corpus, tmp_path / "run", "--model.init_args.quantizer.init_args.nbits_per_codebook", "8",
                       recipe=str(DEBUG / "aqlm-tiny.yaml"))
    fails_with(capsys, argv, "model.layers.0.self_attn.k_proj: AQLM 2x8 g8: its codebooks (4096 values) are "
                             "larger than the 32x64 layer")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_chain_with_a_missing_recipe_is_refused(tmp_path, capsys):
    fails_with(capsys, ["chain", str(DEBUG / "aqlm-tiny.yaml"), str(tmp_path / "nope.yaml")], "does not exist")
