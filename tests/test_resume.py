"""A calibration run killed with SIGKILL at an arbitrary moment, resumed with `--ckpt_path last`, exports exactly
the weights of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import LQTK
from lqtk.models import build_tiny_llama
from test_cli import recipe_args, run_lqtk


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """Deep enough (8 blocks) that a kill lands in the middle of the walk."""
    path = tmp_path_factory.mktemp("deep") / "model"
    build_tiny_llama(path, num_hidden_layers=8, hidden_size=96, intermediate_size=256)
    return path


def walk_args(corpus, run_dir, model, *extra):
    return recipe_args(corpus, run_dir, "--model.init_args.model", str(model), "--data.seq_len", "128",
                       "--data.num_calibration_windows", "24", "--export.evaluate", "false", *extra)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_export(corpus, deep_model, tmp_path):
    reference = tmp_path / "reference"
    proc = run_lqtk(*walk_args(corpus, reference, deep_model), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoints" / "last.ckpt"
    walk_time = json.loads((reference / "metrics.json").read_text())["quantize_time_s"]
    seed = int(os.environ.get("LQTK_KILL_SEED", time.time_ns() % 10_000))
    delay = random.Random(seed).uniform(0, 0.8 * walk_time)  # mostly mid-walk, sometimes during the export
    print(f"kill seed {seed}: SIGKILL {delay:.2f} s after the first checkpoint (walk takes {walk_time:.2f} s)")
    child = subprocess.Popen([*LQTK, *walk_args(corpus, killed, deep_model)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()

    print("killed before the export was complete" if not (killed / "model").exists() else "killed after the end")
    if not (killed / "model").exists():
        proc = run_lqtk(*walk_args(corpus, killed, deep_model, "--ckpt_path", "last"), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_file(reference / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all((expected[k] == resumed[k]).all() for k in expected)
