"""A phase killed with SIGKILL at an arbitrary moment, resumed with `--ckpt_path last`, exports exactly the weights of
an uninterrupted run: GPTQ and AQLM calibration, block fine-tuning, and re-quantization from cached Hessians."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import LQTK, REPO
from test_cli import recipe_args, run_lqtk

DEBUG = REPO / "configs" / "debug"


def walk_args(corpus, run_dir, recipe, *extra):
    return recipe_args(corpus, run_dir, "--data.seq_len", "128", "--data.num_calibration_windows", "24",
                       "--export.evaluate", "false", *extra, recipe=str(recipe))


def kill_then_resume_matches(args, tmp_path):
    """Run `args(run_dir, *extra)` to the end; run it again, SIGKILL it at a random moment after its first
    checkpoint, resume with --ckpt_path last; the two exports must be bit-identical."""
    reference = tmp_path / "reference"
    proc = run_lqtk(*args(reference), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    run_time = json.loads((reference / "metrics.json").read_text())["quantize_time_s"]
    kill_at_random_moment(args(killed), killed, run_time, tmp_path)
    if not (killed / "model").exists():
        proc = run_lqtk(*args(killed, "--ckpt_path", "last"), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all((expected[k] == resumed[k]).all() for k in expected)


def kill_at_random_moment(args, run_dir, run_time, cwd) -> None:
    """Start `lqtk *args` and SIGKILL its process group at a seeded random moment between its first checkpoint and
    0.8 x `run_time` later (mostly mid-run, sometimes during the export)."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    seed = int(os.environ.get("LQTK_KILL_SEED", time.time_ns() % 10_000))
    delay = random.Random(seed).uniform(0, 0.8 * run_time)
    print(f"kill seed {seed}: SIGKILL {delay:.2f} s after the first checkpoint (the run takes {run_time:.2f} s)")
    child = subprocess.Popen([*LQTK, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    print("killed before the export was complete" if not (run_dir / "model").exists() else "killed after the end")


# Fewer rounds and iterations than the debug recipes: resuming is what is tested, and 4 runs must stay quick.
QUICK = {"gptq-tiny": [], "quip-tiny": [], "gptq-w4a8-tiny": [],
         "aqlm-tiny": ["--model.init_args.quantizer.init_args.max_rounds", "2",
                       "--model.init_args.quantizer.init_args.kmeans_iters", "4"]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["gptq-tiny", "quip-tiny", "gptq-w4a8-tiny", "aqlm-tiny"])
def test_calibration_killed_then_resumed_gives_identical_export(recipe, corpus, deep_model, tmp_path):
    kill_then_resume_matches(lambda run_dir, *extra: walk_args(
        corpus, run_dir, DEBUG / f"{recipe}.yaml", "--model.init_args.model", str(deep_model), *QUICK[recipe],
        *extra), tmp_path)


@pytest.mark.slow
def test_block_finetune_killed_then_resumed_gives_identical_export(corpus, deep_model, tmp_path):
    quantized = tmp_path / "quantized"
    proc = run_lqtk(*walk_args(corpus, quantized, DEBUG / "gptq-tiny.yaml", "--model.init_args.model",
                               str(deep_model), "--model.init_args.quantizer.init_args.bits", "2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kill_then_resume_matches(lambda run_dir, *extra: walk_args(
        corpus, run_dir, DEBUG / "aqlm-tiny-ft.yaml", "--model.init_args.model", str(quantized / "model"),
        "--model.init_args.fp_model", str(deep_model), "--model.init_args.tuning.max_steps", "10", *extra), tmp_path)


@pytest.mark.slow
def test_requantize_killed_then_resumed_gives_identical_export(corpus, deep_model, tmp_path):
    calibrated = tmp_path / "calibrated"
    proc = run_lqtk(*walk_args(corpus, calibrated, DEBUG / "gptq-tiny.yaml", "--model.init_args.model",
                               str(deep_model)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kill_then_resume_matches(lambda run_dir, *extra: walk_args(
        corpus, run_dir, DEBUG / "mixed-tiny.yaml", "--model.init_args.model", str(calibrated / "model"),
        "--model.init_args.fp_model", str(deep_model), *extra), tmp_path)
