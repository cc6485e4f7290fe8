"""Output of a run written to a file (CI, nohup, `| tee`): plain progress lines, no terminal control sequences, none
of the libraries' lines that do not apply to lqtk (lqtk.console.quiet)."""

import json
import re
import time
from types import SimpleNamespace

import pytest
import torch

from lqtk import console, evaluate

NOISE = ("GPU available", "TPU available", "💡 Tip", "will override existing callbacks",
         "but have no `validation_step`", "LeafSpec", "Generating train split", "`Trainer.fit` stopped",
         "Loading weights", "LightningCLI's args parameter")


@pytest.mark.slow
def test_a_logged_run_has_one_plain_line_per_block_and_no_noise(debug_run):
    """The debug recipe run by the `lqtk` command with stdout and stderr in one file (conftest's debug_run)."""
    run_dir, text = debug_run, (debug_run.parent / "run.log").read_text()
    assert "\x1b[" not in text and "\r" not in text  # no rich frame, no tqdm bar
    blocks = json.loads((run_dir / "model" / "config.json").read_text())["num_hidden_layers"]
    lines = re.findall(r"^\[\d\d:\d\d:\d\d\] calibrate block (\d+)/(\d+) · done in ", text, re.MULTILINE)
    assert lines == [(str(k), str(blocks)) for k in range(1, blocks + 1)], text[:3000]
    assert [noise for noise in NOISE if noise in text] == [], text[:3000]


def test_progress_lines_count_steps_and_extrapolate_the_time_left(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 25.0, 30.0])
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=lambda: next(clock), strftime=time.strftime))
    progress = console.Progress("calibrate block", 4, done=1)  # a resumed run: block 1 was done before
    progress.update(2, "done in 0:10")
    progress.update(3, "done in 0:15")
    progress.update(4)
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["calibrate block 2/4 · done in 0:10 · 0:10 elapsed, ETA 0:20",
                     "calibrate block 3/4 · done in 0:15 · 0:25 elapsed, ETA 0:12",
                     "calibrate block 4/4 · 0:30 elapsed"]
    assert console.clock(3723) == "1:02:03"


def test_perplexity_tells_its_progress_block_by_block(capsys, monkeypatch):
    from lqtk.models import load_causal_lm

    monkeypatch.setattr(evaluate, "PROGRESS_EVERY_S", 0)
    model = load_causal_lm("tiny-llama")
    ppl, _ = evaluate.perplexity(model, torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0)))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"\[[\d:]{8}\] perplexity of 4 windows: block 1/2 · \d+:\d\d elapsed, ETA \d+:\d\d", lines[0])
    assert re.fullmatch(rf"\[[\d:]{{8}}\] perplexity of 4 windows: {re.escape(f'{ppl:.4g}')} \(\d+:\d\d\)", lines[1])
