import os
from pathlib import Path

import pytest

# Triton reads this when it is first imported (some tests' imports pull it in before tests/test_triton_kernels.py
# runs): the kernels' tests run in its interpreter on the CPU; TRITON_INTERPRET=0 runs them compiled on a GPU.
# Importing lqtk imports Triton: hence the imports of lqtk (and of helpers, which imports it) inside the fixtures.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Two pytest workers share the cores, and many tests start lqtk processes of their own (several, for the distributed
# ones): with one intra-op thread each, they take turns instead of spinning against each other (OpenMP's threads
# busy-wait). Every compared run gets the same setting; tests of threading set their own count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    from helpers import write_text

    folder = tmp_path_factory.mktemp("corpus")
    return {"calibration": write_text(folder / "calibration.txt", 3000, 0),
            "evaluation": write_text(folder / "evaluation.txt", 1500, 1)}


@pytest.fixture(scope="session")
def deep_model(tmp_path_factory):
    """A tiny Llama deep enough (8 blocks) that a kill lands in the middle of the walk."""
    from lqtk.reference_models import build_tiny_llama

    path = tmp_path_factory.mktemp("deep") / "model"
    build_tiny_llama(path, num_hidden_layers=8, hidden_size=96, intermediate_size=256)
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Reference models built by the tests go to a throwaway cache, not the user's."""
    os.environ.setdefault("LQTK_CACHE", str(tmp_path_factory.mktemp("lqtk-cache")))


@pytest.fixture(scope="session")
def debug_run(corpus, tmp_path_factory) -> Path:
    """The debug recipe (GPTQ w4 on the tiny model, its Hessians kept) run to the end by the `lqtk` command on the
    test corpus, its stdout and stderr in one file, run.log beside the run folder. One run that tests only read:
    test_cli checks the run and its export, test_console its log, test_requantize re-quantizes from its Hessians."""
    import subprocess

    from helpers import LQTK, recipe_args

    run_dir = tmp_path_factory.mktemp("debug") / "run"
    log = run_dir.parent / "run.log"
    with log.open("w") as out:
        proc = subprocess.run([*LQTK, *recipe_args(corpus, run_dir)], cwd=run_dir.parent, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return run_dir
