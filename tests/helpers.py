"""What several test modules share: paths, the CLI run in a subprocess or in-process, seeded inputs and corpora, and
the in-process calibration walk. Test modules import from here, never from each other. (conftest.py sets the
environment before anything imports lqtk, so it imports this module only inside its fixtures.)"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning import Trainer

from lqtk.cli import main
from lqtk.data import TextDataModule
from lqtk.nn import quantized_layers
from lqtk.phases import LayerwiseCalibration
from lqtk.quant import GPTQ, HessianAccumulator
from lqtk.streaming import materialize_all

REPO = Path(__file__).resolve().parents[1]
LQTK = [sys.executable, "-m", "lqtk.cli"]
DEBUG_RECIPE = str(REPO / "configs" / "debug" / "gptq-tiny.yaml")

# Fewer rounds and iterations than the debug recipes, for runs that are killed and resumed: resuming is what is
# tested, and the runs must stay quick.
QUICK = {"gptq-tiny": [], "quip-tiny": [], "gptq-w4a8-tiny": [],
         "aqlm-tiny": ["--model.init_args.quantizer.init_args.max_rounds", "2",
                       "--model.init_args.quantizer.init_args.kmeans_iters", "4"]}

WORDS = ("the king and queen of night shall speak to thee my lord what news from rome "
         "good morrow sweet prince love doth make fools of us all hence away").split()


def write_text(path: Path, words: int, seed: int) -> Path:
    """Seeded pseudo-prose: deterministic, and long enough to make windows of a byte-level tokenizer."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(words // 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the command line

def recipe_args(corpus, run_dir, *extra, recipe=DEBUG_RECIPE, command=("fit", "--config")):
    """A phase (or, with command=("chain",), a chain of them) on the test corpus."""
    return [*command, *([recipe] if isinstance(recipe, str) else recipe), "--trainer.default_root_dir",
            str(run_dir), *corpus_args(corpus), *extra]


def corpus_args(corpus):
    return ["--data.calibration_files", f"[{corpus['calibration']}]",
            "--data.evaluation_files", f"[{corpus['evaluation']}]"]


def run_lqtk(*args, cwd):
    return subprocess.run([*LQTK, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def fails_with(capsys, argv, message):
    """Run the CLI in-process: it must exit non-zero with `message` in its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err, err[-2000:]


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


# --- seeded inputs

def correlated_problem(out_features=48, in_features=80, tokens=2048, seed=0):
    """A weight and the Hessian of correlated inputs with uneven scales (like an LLM's activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=g) @ torch.randn(in_features, in_features, generator=g) * 0.3
    x = x * torch.rand(in_features, generator=g) * 3
    w = torch.randn(out_features, in_features, generator=g)
    accumulator = HessianAccumulator(in_features)
    accumulator.add(x)
    return w, accumulator.hessian(), x


def outlier_inputs(tokens=512, channels=96, outliers=(3, 40), size=60.0, seed=0):
    """LLM-like inputs: most channels of unit size, a few channels tens of times larger in every token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=gen)
    x[:, list(outliers)] *= size
    return x


# --- the calibration walk in-process

def calibrate(corpus, tmp_path, model="tiny-llama", **phase_args) -> LayerwiseCalibration:
    data = TextDataModule(tokenizer=model, calibration_files=[str(corpus["calibration"])],
                          evaluation_files=[str(corpus["evaluation"])], seq_len=64, num_calibration_windows=8,
                          batch_size=4)
    phase = LayerwiseCalibration(model=model, quantizer=GPTQ(bits=3, group_size=48), **phase_args)
    Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_progress_bar=False,
            default_root_dir=tmp_path).fit(phase, datamodule=data)
    return phase


def quantized_tensors(phase) -> dict[str, torch.Tensor]:
    materialize_all(phase.model)  # finished blocks live in their block files
    return {f"{name}.{key}": t for name, m in quantized_layers(phase.model).items() for key, t in m.tensors().items()}
