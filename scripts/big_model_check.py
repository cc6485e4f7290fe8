"""Quantize a synthetic Llama larger than the 2 GB memory bound and report each run's peak RSS.

    python scripts/big_model_check.py [--recipes rtn-w4g128 gptq-w4g128] [--update-readme]

Builds the random-weight model with scripts/make_synthetic_llama.py if it is absent (default: 5.2 GB of fp32
weights in runs/synthetic-llama-5gb), then runs `lqtk fit` with each recipe of configs/smollm2-135m/ on it through
the model override, into runs/big-model/<recipe> (a finished run, with its metrics.json, is reused). Calibration
is cut to 16 windows of 256 tokens and the evaluation to the first 40 lines of the evaluation play (about 6 windows
with the byte-level tokenizer), to keep a 1.3B-parameter model on 2 CPU cores within the hour; the export is
written, reloaded and checked as always. The replay of finished sub-modules is off: its activations
(16·256·(2·2048 + 5632) floats, 160 MB) are too much for the bound, which counts ~0.6 GB for Python, torch and
Lightning alone."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from readme_section import update_readme_section

from lqtk.data import default_split

REPO = Path(__file__).resolve().parents[1]
BOUND_BYTES = 2 * 10**9
EVAL_LINES = 40


def evaluation_text(out: Path) -> Path:
    """The first EVAL_LINES lines of the default evaluation play."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = Path(default_split()[1][0]).read_text().splitlines()[:EVAL_LINES]
        out.write_text("\n".join(lines) + "\n")
    return out


def run(recipe: str, model: Path, root: Path, text: Path) -> dict:
    run_dir = root / recipe
    if not (run_dir / "metrics.json").exists():
        cmd = [sys.executable, "-m", "lqtk.cli", "fit", "--config", str(REPO / "configs" / "smollm2-135m" /
               f"{recipe}.yaml"), "--model.init_args.model", str(model), "--trainer.default_root_dir", str(run_dir),
               "--data.num_calibration_windows", "16", "--data.seq_len", "256", "--data.evaluation_files",
               f"[{text}]", "--trainer.enable_progress_bar", "false", "--model.init_args.replay", "false"]
        if (run_dir / "checkpoints" / "last.ckpt").exists():
            cmd += ["--ckpt_path", "last"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "synthetic-llama-5gb")
    parser.add_argument("--size-gb", type=float, default=5.2)
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "big-model")
    parser.add_argument("--recipes", nargs="+", default=["rtn-w4g128", "gptq-w4g128"])
    parser.add_argument("--update-readme", action="store_true")
    opts = parser.parse_args()
    if not (opts.model / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_llama.py"), "--out", str(opts.model),
                        "--size-gb", str(opts.size_gb)], check=True)
    model_bytes = sum(f.stat().st_size for f in opts.model.glob("*.safetensors"))
    text = evaluation_text(opts.root / "evaluation.txt")
    rows = []
    for recipe in opts.recipes:
        metrics = run(recipe, opts.model, opts.root, text)
        peak = metrics["peak_rss_bytes"]
        rows.append(f"| {recipe} | {peak / 1e9:.2f} | {'yes' if peak <= BOUND_BYTES else 'NO'} | "
                    f"{metrics['quantize_time_s']:.0f} | {metrics['wall_time_s']:.0f} | {metrics['ratio_to_fp']:.3f} |")
    table = "\n".join([
        f"Synthetic Llama ({opts.model.name}: {model_bytes / 1e9:.2f} GB of fp32 safetensors), 16 calibration windows "
        f"of 256 tokens, peak RSS against the {BOUND_BYTES / 1e9:.0f} GB bound.", "",
        "| recipe | peak RSS (GB) | within bound | quantize time (s) | wall time (s) | × fp perplexity |",
        "|---|---|---|---|---|---|", *rows])
    print(table)
    if opts.update_readme:
        update_readme_section("big-model", table)


if __name__ == "__main__":
    main()
