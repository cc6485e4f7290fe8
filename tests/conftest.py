import os
import random
import sys
from pathlib import Path

import pytest

# Triton reads this when it is first imported (some tests' imports pull it in before tests/test_triton_kernels.py
# runs): the kernels' tests run in its interpreter on the CPU; TRITON_INTERPRET=0 runs them compiled on a GPU
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
LQTK = [sys.executable, "-m", "lqtk.cli"]
WORDS = ("the king and queen of night shall speak to thee my lord what news from rome "
         "good morrow sweet prince love doth make fools of us all hence away").split()


def write_text(path: Path, words: int, seed: int) -> Path:
    """Seeded pseudo-prose: deterministic, and long enough to make windows of a byte-level tokenizer."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(words // 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("corpus")
    return {"calibration": write_text(folder / "calibration.txt", 3000, 0),
            "evaluation": write_text(folder / "evaluation.txt", 1500, 1)}


@pytest.fixture(scope="session")
def deep_model(tmp_path_factory):
    """A tiny Llama deep enough (8 blocks) that a kill lands in the middle of the walk."""
    from lqtk.models import build_tiny_llama

    path = tmp_path_factory.mktemp("deep") / "model"
    build_tiny_llama(path, num_hidden_layers=8, hidden_size=96, intermediate_size=256)
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Reference models built by the tests go to a throwaway cache, not the user's."""
    os.environ.setdefault("LQTK_CACHE", str(tmp_path_factory.mktemp("lqtk-cache")))
