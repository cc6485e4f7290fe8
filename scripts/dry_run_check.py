"""The dry run's estimates for a recipe against the actual run: time, peak memory and disk, side by side.

    python scripts/dry_run_check.py [RECIPE ...] [--root DIR] [--fresh] [--update-readme]

For each recipe (default: configs/smollm2-135m/gptq-w4g128.yaml) it runs `lqtk fit --dry_run true` first, then the
actual run into ROOT/<recipe> (default runs/dry-run-check), and prints estimate, actual and their ratio. A run folder
that already has a metrics.json is reused (--fresh deletes it first); the dry run always runs, since it writes
nothing there. Run it with nothing else on the machine: both sides are timed. With --update-readme the table
replaces the one between the `dry-run` markers of the docs page."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from readme_section import update_readme_section

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = [REPO / "configs" / "smollm2-135m" / "gptq-w4g128.yaml"]
MIB = 2**20


def lqtk_fit(recipe: Path, run_dir: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "lqtk.cli", "fit", "--config", str(recipe), "--trainer.default_root_dir",
           str(run_dir), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def estimate_and_actual(recipe: Path, root: Path, fresh: bool) -> tuple[dict, dict, dict]:
    """(dry-run result, its estimate, the actual run's figures under the same names)."""
    run_dir = root / recipe.stem
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    dry_run_file = root / f"{recipe.stem}.dry-run.json"
    lqtk_fit(recipe, run_dir, "--dry_run", "true", "--dry_run_output", str(dry_run_file))
    if not (run_dir / "metrics.json").exists():
        lqtk_fit(recipe, run_dir, *(["--overwrite", "true"] if (run_dir / "model").exists() else []))
    result, metrics = json.loads(dry_run_file.read_text()), json.loads((run_dir / "metrics.json").read_text())
    exports = [folder for folder in run_dir.iterdir() if folder.name.startswith("model")]
    actual = {key: metrics[key] for key in ("quantize_time_s", "wall_time_s", "peak_rss_bytes", "peak_gpu_bytes")
              if key in metrics}
    actual |= {"checkpoint_bytes": folder_bytes(run_dir / "checkpoints") + folder_bytes(run_dir / "blocks"),
               "export_bytes": sum(folder_bytes(folder) for folder in exports)}
    return result, result["estimate"], actual


ROWS = [("quantize time (s)", "quantize_time_s", 1), ("wall time (s)", "wall_time_s", 1),
        ("peak RSS (MiB)", "peak_rss_bytes", MIB), ("peak GPU (MiB)", "peak_gpu_bytes", MIB),
        ("checkpoint (MiB)", "checkpoint_bytes", MIB), ("export (MiB)", "export_bytes", MIB)]


def table(recipe: str, result: dict, estimate: dict, actual: dict) -> str:
    measured = result["measured"]
    lines = [f"{recipe} ({result['blocks']} blocks, {result['device']}); the dry run took block 0 in "
             f"{measured['block_wall_s']:.1f} s.", "",
             "| | estimate | actual | estimate / actual |", "|---|---|---|---|"]
    for label, key, unit in ROWS:
        if key in estimate and key in actual:
            lines.append(f"| {label} | {estimate[key] / unit:.1f} | {actual[key] / unit:.1f} "
                         f"| {estimate[key] / actual[key]:.2f} |")
    if result["fp_perplexity_cached"]:
        lines += ["", "The fp perplexity was cached when the dry run ran: its wall time leaves the fp evaluation out, "
                  "which an actual run that evaluated the fp model first included."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", type=Path, default=DEFAULT_RECIPES)
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "dry-run-check")
    parser.add_argument("--fresh", action="store_true", help="Delete the recipes' run folders first.")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    text = "\n\n".join(table(recipe.stem, *estimate_and_actual(recipe.resolve(), args.root, args.fresh))
                       for recipe in args.recipes)
    print(text)
    if args.update_readme:
        update_readme_section("dry-run", text)


if __name__ == "__main__":
    main()
