"""Quantize time of layerwise calibration on 1 and on N processes, side by side in one run.

    .venv/bin/python scripts/compare_processes.py [--recipe gptq-w4g128] [--processes 2] [--gpus] [--update-readme]

Runs `lqtk fit` with the recipe (configs/smollm2-135m/) on the reference model twice, into
runs/processes/<recipe>-{1,N}: on 1 process, then on N (`--trainer.devices N`). On the CPU the cores are shared out:
1 process with all of them as torch threads against N processes with cores/N threads each (Lightning's own split).
With --gpus: 1 GPU against N GPUs. The export is written and checked as always; the evaluation is left out, and the
two exports are compared tensor by tensor (they must be bit-identical). Prints quantize time (the walk) and wall time
(the whole command) of each, and their ratios."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from readme_section import update_readme_section
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def run(recipe: str, processes: int, gpus: bool, root: Path) -> dict:
    run_dir = root / f"{recipe}-{processes}"
    recipe_file = REPO / "configs" / "smollm2-135m" / f"{recipe}.yaml"
    cmd = [sys.executable, "-m", "lqtk.cli", "fit", "--config", str(recipe_file),
           "--trainer.default_root_dir", str(run_dir), "--overwrite", "true", "--export.evaluate", "false",
           "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "gpu" if gpus else "cpu",
           "--trainer.devices", str(processes)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"quantize_time_s": metrics["quantize_time_s"], "wall_time_s": time.perf_counter() - start,
            "export": run_dir / "model"}


def same_export(a: Path, b: Path) -> bool:
    tensors = [{} for _ in (a, b)]
    for folder, into in zip((a, b), tensors):
        for file in sorted(folder.glob("*.safetensors")):
            into.update(load_file(file))
    return tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="gptq-w4g128")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--gpus", action="store_true", help="1 GPU against --processes GPUs")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "processes")
    parser.add_argument("--update-readme", action="store_true")
    opts = parser.parse_args()
    one, many = (run(opts.recipe, n, opts.gpus, opts.root) for n in (1, opts.processes))
    units = "GPUs" if opts.gpus else "processes"
    cores = "" if opts.gpus else f" on {os.cpu_count()} CPU cores"
    table = "\n".join([
        f"`{opts.recipe}` on the reference model{cores}, evaluation off; same export bit for bit: "
        f"{'yes' if same_export(one['export'], many['export']) else 'NO'}.", "",
        f"| {units} | quantize time (s) | wall time (s) |", "|---|---|---|",
        f"| 1 | {one['quantize_time_s']:.1f} | {one['wall_time_s']:.1f} |",
        f"| {opts.processes} | {many['quantize_time_s']:.1f} | {many['wall_time_s']:.1f} |", "",
        f"{opts.processes} {units} vs 1: quantize time × {many['quantize_time_s'] / one['quantize_time_s']:.2f}, "
        f"wall time × {many['wall_time_s'] / one['wall_time_s']:.2f}"])
    print(table)
    if opts.update_readme:
        update_readme_section(f"processes-{'gpu' if opts.gpus else 'cpu'}", table)


if __name__ == "__main__":
    main()
