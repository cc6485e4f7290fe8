"""Fast matmul kernels for quantized weight formats (which one runs: `lqtk.kernels.dispatch`), and the build of
their C++ extensions."""

import os
import shutil
import time
from pathlib import Path

import torch

from lqtk.console import clock, say

# not -march=native: the same code on every x86 machine with AVX2. -fopenmp: at::parallel_for is inlined into the
# extension and runs its loop on one thread unless the extension itself is compiled with OpenMP.
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def build_directory() -> Path:
    """Where the C++ extensions are compiled: $LQTK_KERNEL_CACHE, else ~/.cache/lqtk/torch_extensions. Not under
    $LQTK_CACHE (which tests point at a fresh folder): a build is keyed by its sources, so all runs can share it."""
    return Path(os.environ.get("LQTK_KERNEL_CACHE", Path.home() / ".cache" / "lqtk" / "torch_extensions"))


def build_extension(name: str, source: Path):
    """(the compiled module, None) or (None, why it cannot be built here): compiled on the first call in any process
    (torch.utils.cpp_extension, with ninja), then loaded from `build_directory()/name`."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"the CPU kernels need an x86 CPU with AVX2 and FMA (torch finds {capability})"
    if shutil.which("ninja") is None:  # pip's ninja lives in the venv's bin, not on PATH unless it is activated
        try:
            import ninja
        except ImportError:
            return None, "compiling the CPU kernels needs ninja: pip install ninja"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    from torch.utils.cpp_extension import load

    # a folder per extension: torch's build lock is per folder, and a process waiting on another's build of a
    # different extension in the same folder would then import a module that was never built
    folder = build_directory() / name
    folder.mkdir(parents=True, exist_ok=True)
    built = folder / f"{name}.so"  # ninja rebuilds it when the source is newer
    compiling = not built.exists() or built.stat().st_mtime < source.stat().st_mtime
    if compiling:
        say(f"compiling the C++ kernels {name} (once, on first use: a minute or more on a few cores)")
    start = time.monotonic()
    try:
        module = load(name, [str(source)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                      build_directory=str(folder))
    except Exception as error:  # a missing compiler, a compile error: the layers run their dense or float path
        say(f"the C++ kernels {name} could not be built ({type(error).__name__}): the layers compute without them")
        return None, f"{type(error).__name__}: {error}"
    if compiling:
        say(f"compiled {name} in {clock(time.monotonic() - start)}")
    return module, None
