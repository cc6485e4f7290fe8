"""Re-quantizing from cached Hessians (`lqtk.phases.Requantize`) against recalibrating the same layers, side by side.

    .venv/bin/python scripts/bench_requantize.py CALIBRATION_RUN RECIPE [--layers REGEX ...] [--update-readme]

CALIBRATION_RUN is a finished LayerwiseCalibration run with `save_hessians` (e.g. runs/report/gptq-w4g128); RECIPE
a calibration recipe of the same model whose quantizer is the new setting (e.g. configs/smollm2-135m/gptq-w3g128.yaml).
For each layer selection (all Linears, then each --layers pattern, default `mlp.down_proj`), in one run:
  - recalibration: `lqtk fit --config RECIPE`, with the Linears outside the selection kept fp (`skip`), so that the
    calibration quantizes exactly those layers: the whole model still runs over the calibration windows;
  - re-quantization: `lqtk fit` of a Requantize phase over CALIBRATION_RUN's export with RECIPE's quantizer as its
    one candidate and the selection as its `layers`: no forward pass.
Both skip evaluation and serving exports; the phases' own `quantize_time_s` are compared (the work that differs), and
the wall times of the whole commands printed beside them. Run it with nothing else on the machine."""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from readme_section import update_readme_section

REPO = Path(__file__).resolve().parents[1]
LINEARS = [f"self_attn.{name}_proj" for name in "qkvo"] + [f"mlp.{name}_proj" for name in ("gate", "up", "down")]
BASE = REPO / "configs" / "smollm2-135m" / "mixed-3.0.yaml"  # a Requantize recipe: its candidates are replaced


def fit(args: list[str], run_dir: Path) -> tuple[float, float]:
    """(the phase's quantize_time_s, the command's wall time)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lqtk.cli", "fit", *args, "--trainer.default_root_dir", str(run_dir),
                    "--export.evaluate", "false", "--export.serving_formats", "[]", "--trainer.enable_progress_bar",
                    "false"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return json.loads((run_dir / "metrics.json").read_text())["quantize_time_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calibration_run", type=Path)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--layers", nargs="*", default=["mlp.down_proj"],
                        help="layer selections besides all Linears (a regex each)")
    parser.add_argument("--update-readme", action="store_true", help="write the docs page section requantize-bench")
    opts = parser.parse_args()
    if not (opts.calibration_run / "hessians").is_dir():
        raise SystemExit(f"{opts.calibration_run} has no hessians/: pass a run calibrated with save_hessians true")
    recipe = yaml.safe_load(opts.recipe.read_text())
    quantizer = recipe["model"]["init_args"]["quantizer"]
    rows = ["| layers | recalibrate (s) | re-quantize from cached H (s) | speed-up | wall times (s) |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as tmp:
        for selection in [None, *opts.layers]:
            skip = [] if selection is None else [name for name in LINEARS if not re.search(selection, name)]
            name = "all Linears" if selection is None else f"`{selection}`"
            calibrate, calibrate_wall = fit(["--config", str(opts.recipe), "--model.init_args.skip", json.dumps(skip)],
                                            Path(tmp) / f"calibrate-{len(rows)}")
            layers = "null" if selection is None else json.dumps([selection])
            requantize, requantize_wall = fit(
                ["--config", str(BASE), "--model.init_args.model", str(opts.calibration_run / "model"),
                 "--model.init_args.budget_bits", "null", "--model.init_args.candidates", json.dumps([quantizer]),
                 "--model.init_args.layers", layers], Path(tmp) / f"requantize-{len(rows)}")
            rows.append(f"| {name} | {calibrate:.1f} | {requantize:.1f} | **{calibrate / requantize:.1f}x** | "
                        f"{calibrate_wall:.0f} vs {requantize_wall:.0f} |")
            print(rows[-1], flush=True)
    note = (f"`scripts/bench_requantize.py {opts.calibration_run} {opts.recipe}`: {opts.recipe.stem}'s quantizer on "
            f"the layers of {opts.calibration_run.name}, phases' quantize_time_s (wall times of the whole commands, "
            "loading and export included, beside them); 2 CPU threads.")
    table = "\n".join(rows)
    print(f"\n{table}\n\n{note}")
    if opts.update_readme:
        update_readme_section("requantize-bench", f"{table}\n\n{note}")


if __name__ == "__main__":
    main()
