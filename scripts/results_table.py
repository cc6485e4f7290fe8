"""Quantize the reference model with each recipe and print the results table (markdown).

    python scripts/results_table.py [--recipes rtn-w4g128 gptq-w4g128 ...] [--update-readme]

Each recipe runs as `lqtk fit --config configs/smollm2-135m/<recipe>.yaml` into runs/table/<recipe> and reports
from its metrics.json: true bits/weight, perplexity on the default evaluation split, ratio to fp, and the time of
the calibration phase alone. With --update-readme the table replaces the one between the README's markers."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from readme_section import update_readme_section

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["rtn-w4g128", "gptq-w4g128", "rtn-w3g128", "gptq-w3g128", "gptq-w3g128-mse", "rtn-w2g64", "gptq-w2g64"]


def run_recipe(recipe: str) -> dict:
    run_dir = REPO / "runs" / "table" / recipe
    recipe_file = REPO / "configs" / "smollm2-135m" / f"{recipe}.yaml"
    cmd = [sys.executable, "-m", "lqtk.cli", "fit", "--config", str(recipe_file),
           "--trainer.default_root_dir", str(run_dir), "--overwrite", "true"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "metrics.json").read_text())


def table(rows: list[tuple[str, dict]]) -> str:
    fp = rows[0][1]["fp_perplexity"]
    lines = [f"SmolLM2-135M-Instruct, fp32 perplexity **{fp:.3f}** on {rows[0][1]['tokens']} tokens "
             f"(seq_len {rows[0][1]['seq_len']}, no BOS).", "",
             "| recipe | bits/weight | perplexity | × fp | quantize time (s) |", "|---|---|---|---|---|"]
    for recipe, m in rows:
        lines.append(f"| {recipe} | {m['bits_per_weight']:.3f} | {m['perplexity']:.3f} | {m['ratio_to_fp']:.3f} "
                     f"| {m['quantize_time_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    rows = [(recipe, run_recipe(recipe)) for recipe in args.recipes]
    text = table(rows)
    print(text)
    if args.update_readme:
        update_readme_section("results-table", text)


if __name__ == "__main__":
    main()
