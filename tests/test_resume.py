"""A phase killed with SIGKILL at an arbitrary moment, resumed with `--ckpt_path last`, exports exactly the weights of
an uninterrupted run: GPTQ and AQLM calibration, block fine-tuning, and re-quantization from cached Hessians."""

import json

import pytest
from safetensors.torch import load_file

from helpers import QUICK, REPO, kill_at_random_moment, recipe_args
from lqtk.cli import main

DEBUG = REPO / "configs" / "debug"


def walk_args(corpus, run_dir, recipe, *extra):
    return recipe_args(corpus, run_dir, "--data.seq_len", "128", "--data.num_calibration_windows", "24",
                       "--export.evaluate", "false", *extra, recipe=str(recipe))


def finished(args, run_dir):
    main(args(run_dir))  # in-process: only the killed run needs a process of its own
    return run_dir


def kill_then_resume_matches(args, tmp_path, reference=None):
    """Run `args(run_dir, *extra)` to the end (unless `reference` is that run, finished); run it again, SIGKILL it at
    a random moment after its first checkpoint, resume with --ckpt_path last; the two exports must be
    bit-identical."""
    reference = reference or finished(args, tmp_path / "reference")
    killed = tmp_path / "killed"
    run_time = json.loads((reference / "metrics.json").read_text())["quantize_time_s"]
    kill_at_random_moment(args(killed), killed, run_time, tmp_path)
    if not (killed / "model").exists():
        main(args(killed, "--ckpt_path", "last"))
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all((expected[k] == resumed[k]).all() for k in expected)


def calibration_args(corpus, deep_model, recipe):
    return lambda run_dir, *extra: walk_args(corpus, run_dir, DEBUG / f"{recipe}.yaml", "--model.init_args.model",
                                             str(deep_model), *QUICK[recipe], *extra)


@pytest.fixture(scope="module")
def gptq_run(corpus, deep_model, tmp_path_factory):
    """The uninterrupted gptq-tiny calibration of the deep model: the reference of its kill test, and the
    calibration (with its Hessians) that the re-quantization test starts from."""
    return finished(calibration_args(corpus, deep_model, "gptq-tiny"), tmp_path_factory.mktemp("gptq") / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["gptq-tiny", "quip-tiny", "gptq-w4a8-tiny", "aqlm-tiny"])
def test_calibration_killed_then_resumed_gives_identical_export(recipe, corpus, deep_model, tmp_path, request):
    reference = request.getfixturevalue("gptq_run") if recipe == "gptq-tiny" else None
    kill_then_resume_matches(calibration_args(corpus, deep_model, recipe), tmp_path, reference)


@pytest.mark.slow
def test_block_finetune_killed_then_resumed_gives_identical_export(corpus, deep_model, tmp_path):
    quantized = tmp_path / "quantized"  # in-process: the input of both fine-tuning runs
    main(walk_args(corpus, quantized, DEBUG / "gptq-tiny.yaml", "--model.init_args.model", str(deep_model),
                   "--model.init_args.quantizer.init_args.bits", "2"))
    kill_then_resume_matches(lambda run_dir, *extra: walk_args(
        corpus, run_dir, DEBUG / "aqlm-tiny-ft.yaml", "--model.init_args.model", str(quantized / "model"),
        "--model.init_args.fp_model", str(deep_model), "--model.init_args.tuning.max_steps", "10", *extra), tmp_path)


@pytest.mark.slow
def test_requantize_killed_then_resumed_gives_identical_export(corpus, deep_model, gptq_run, tmp_path):
    kill_then_resume_matches(lambda run_dir, *extra: walk_args(
        corpus, run_dir, DEBUG / "mixed-tiny.yaml", "--model.init_args.model", str(gptq_run / "model"),
        "--model.init_args.fp_model", str(deep_model), *extra), tmp_path)
