"""Layerwise calibration shared by several processes (gloo on the CPU), run as CLI subprocesses on the 8-block tiny
Llama (`deep_model`): 2 processes, and 2 "nodes" on this machine launched by torchrun, export bit for bit what 1
process exports; a walk on 2 processes killed (SIGKILL of one of them) resumes on 1 process to the same export."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LQTK, REPO, fails_with, recipe_args, run_lqtk
from lqtk.cli import main

RECIPE = str(REPO / "configs" / "debug" / "gptq-tiny.yaml")


def walk_args(corpus, model, run_dir, *extra):
    # 6 calibration batches: 3 per process, so the Hessians' pairwise sums are split unevenly
    return recipe_args(corpus, run_dir, "--model.init_args.model", str(model), "--data.seq_len", "128",
                       "--data.num_calibration_windows", "24", "--data.batch_size", "4",
                       "--trainer.enable_progress_bar", "false", *extra, recipe=RECIPE)


@pytest.fixture(scope="module")
def one_process(corpus, deep_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    main(walk_args(corpus, deep_model, run_dir))  # in-process: the several-process runs compared with it are not
    return run_dir


def export(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_export(run_dir, reference) -> None:
    ours, expected = export(run_dir), export(reference)
    assert ours.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(ours[name], expected[name])]
    assert not different, different


@pytest.mark.slow
def test_two_processes_export_what_one_process_exports(corpus, deep_model, one_process, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_lqtk(*walk_args(corpus, deep_model, run_dir, "--trainer.devices", "2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    assert_same_export(run_dir, one_process)
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, one_process))
    assert metrics["perplexity"] == expected["perplexity"]
    assert metrics["layer_errors"] == expected["layer_errors"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun_export_what_one_process_exports(corpus, deep_model, one_process, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "lqtk.cli",
         *walk_args(corpus, deep_model, run_dir, "--trainer.num_nodes", "2", "--trainer.devices", "1")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_export(run_dir, one_process)


@pytest.mark.slow
def test_walk_on_two_processes_killed_resumes_on_one(corpus, deep_model, one_process, tmp_path):
    """SIGKILL one of the two processes (seeded choice, and moment between the first checkpoint and 0.6 x the walk's
    time later), then the rest of the run; `--ckpt_path last` on one process must give the uninterrupted export."""
    run_dir, walk_time = tmp_path / "run", json.loads((one_process / "metrics.json").read_text())["quantize_time_s"]
    seed = int(os.environ.get("LQTK_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    victim, delay = rng.choice(["process 0", "process 1"]), rng.uniform(0, 0.6 * walk_time)
    print(f"kill seed {seed}: SIGKILL {victim} {delay:.2f} s after the first checkpoint")
    launcher = subprocess.Popen([*LQTK, *walk_args(corpus, deep_model, run_dir, "--trainer.devices", "2")],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    checkpoint, deadline = run_dir / "checkpoints" / "last.ckpt", time.monotonic() + 300
    while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")  # process 1, while the run lasts
    children = children.read_text().split() if launcher.poll() is None and children.exists() else []
    if launcher.poll() is None:
        os.kill(launcher.pid if victim == "process 0" or not children else int(children[0]), signal.SIGKILL)
        time.sleep(0.5)
        os.killpg(launcher.pid, signal.SIGKILL)  # the survivor would wait for its peer until gloo's timeout
    launcher.wait()
    print("killed before the export was complete" if not (run_dir / "model").exists() else "killed after the end")
    if not (run_dir / "model").exists():
        main(walk_args(corpus, deep_model, run_dir, "--ckpt_path", "last"))
    assert_same_export(run_dir, one_process)


@pytest.mark.slow
def test_more_processes_than_calibration_batches_is_refused(corpus, deep_model, tmp_path, capsys):
    fails_with(capsys, walk_args(corpus, deep_model, tmp_path / "run", "--data.num_calibration_windows", "4",
                                 "--trainer.devices", "2"), "1 calibration batches cannot be shared by 2 processes")
    assert not (tmp_path / "run").exists()
