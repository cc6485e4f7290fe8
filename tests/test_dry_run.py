"""`lqtk fit --dry_run true` on the tiny model: estimates printed and written, nothing in the run folder, sizes near
the actual run's; and a run refused, with nothing written, when its filesystem lacks room."""

import json
import shutil

import pytest

from helpers import fails_with, recipe_args, write_text
from lqtk.cli import main


@pytest.fixture(scope="module")
def short_corpus(corpus, tmp_path_factory):
    """The test corpus with a short evaluation text (a few windows), so that two runs take seconds."""
    evaluation = write_text(tmp_path_factory.mktemp("short") / "evaluation.txt", 240, 1)
    return {"calibration": corpus["calibration"], "evaluation": evaluation}


def folder_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.slow
def test_dry_run_estimates_the_run_and_writes_nothing(short_corpus, tmp_path, capsys):
    run_dir, estimate_file = tmp_path / "run", tmp_path / "dry-run.json"
    main(recipe_args(short_corpus, run_dir, "--dry_run", "true", "--dry_run_output", str(estimate_file)))
    out = capsys.readouterr().out
    assert "lqtk dry run" in out and "wall time" in out and "disk" in out
    assert not run_dir.exists()  # no config.yaml, checkpoint, export or metrics.json
    result = json.loads(estimate_file.read_text())
    estimate = result["estimate"]
    assert result["blocks"] == 2 and all(value > 0 for value in estimate.values())
    assert estimate["quantize_time_s"] < estimate["wall_time_s"]

    main(recipe_args(short_corpus, run_dir))  # the actual run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["quantize_time_s"] > 0
    assert 0.8 < estimate["export_bytes"] / folder_bytes(run_dir / "model") < 1.25  # tokenizer files not counted
    walk_state = folder_bytes(run_dir / "checkpoints") + folder_bytes(run_dir / "blocks")  # inputs; finished blocks
    assert 0.7 < estimate["checkpoint_bytes"] / walk_state < 1.25  # nor Lightning's state


class FillingDisk:
    """A `shutil.disk_usage` whose filesystem has its real free space for the first `roomy` calls, then 1 KiB."""

    def __init__(self, roomy: int):
        self.roomy, self.calls, self.real = roomy, 0, shutil.disk_usage

    def __call__(self, path):
        self.calls += 1
        usage = self.real(path)
        return usage if self.calls <= self.roomy else usage._replace(free=1024)


@pytest.mark.parametrize("roomy", [0, 1], ids=["before the walk", "before the first checkpoint"])
def test_run_without_room_on_disk_is_refused(roomy, short_corpus, tmp_path, capsys, monkeypatch):
    disk = FillingDisk(roomy)
    monkeypatch.setattr(shutil, "disk_usage", disk)
    run_dir = tmp_path / "run"
    fails_with(capsys, recipe_args(short_corpus, run_dir), "for the checkpoint (cached block inputs and results)")
    assert disk.calls == roomy + 1  # refused by the check that came after the roomy ones
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()


def test_dry_run_refuses_a_checkpoint_to_resume(short_corpus, tmp_path, capsys):
    fails_with(capsys, recipe_args(short_corpus, tmp_path / "run", "--dry_run", "true", "--ckpt_path", "last"),
               "drop --ckpt_path")
