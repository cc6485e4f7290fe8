"""Quantize the reference model with each recipe (or chain of recipes) and print a results table (markdown).

    python scripts/results_table.py [--table results-table|aqlm-table|distill-table|quip-table|actquant-table]
                                    [--recipes a b+c ...] [--fresh] [--update-readme]

A row is a recipe, or a chain `calibration+finetune` run by `lqtk chain` into runs/table/<recipe>: a phase already
finished there is reused (so a re-run after a stop continues, and chains share their first phase); --fresh deletes a
row's run folders first. Each row reports from the last phase's metrics.json: true bits/weight, perplexity on the
default evaluation split, ratio to fp, and the phases' own time added up (calibration, fine-tuning; not loading or
evaluation). With --update-readme the table replaces the one between the docs page's markers of the same name."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from readme_section import update_readme_section

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "table"
TABLES = {
    "results-table": ["rtn-w4g128", "gptq-w4g128", "rtn-w3g128", "gptq-w3g128", "rtn-w2g64", "gptq-w2g64"],
    "aqlm-table": ["gptq-w2g64", "aqlm-2x8-g8", "aqlm-2x8-g8+aqlm-2x8-g8-ft", "gptq-w3g128", "aqlm-3x8-g8-ft"],
    "distill-table": ["gptq-w2g64", "gptq-w2g64+gptq-w2g64-distill", "gptq-w2g64+gptq-w2g64-pv",
                      "aqlm-2x8-g8+aqlm-2x8-g8-ft", "aqlm-2x8-g8+aqlm-2x8-g8-ft+aqlm-2x8-g8-distill",
                      "aqlm-2x8-g8+aqlm-2x8-g8-ft+aqlm-2x8-g8-pv"],
    "quip-table": ["gptq-w2g64", "quip-w2", "leanquant-nu-w2", "quip-leanquant-nu-w2", "gptq-w3g128",
                   "leanquant-nu-w3", "leanquant-aff-w3g128", "quip-w3", "gptq-w4g128",
                   "leanquant-nu-w4", "quip-w4"],
    "actquant-table": ["gptq-w4g128", "gptq-w4a8", "gptq-w4a8-trip", "gptq-w4a4", "gptq-w4a4-trip",
                       "quip-w4a4-trip", "gptq-w4a8-prune25", "gptq-w4a8-prune50"],
}


def run_row(row: str, fresh: bool) -> dict:
    """Run the chain `row` (recipes joined by +) and return its last metrics, time summed over its phases."""
    phases = row.split("+")
    if fresh:
        for phase in phases:
            shutil.rmtree(RUNS / phase, ignore_errors=True)
    cmd = [sys.executable, "-m", "lqtk.cli", "chain", *(str(REPO / "configs" / "smollm2-135m" / f"{p}.yaml")
                                                          for p in phases), "--root", str(RUNS)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    metrics = [json.loads((RUNS / phase / "metrics.json").read_text()) for phase in phases]
    if "perplexity" not in metrics[-1]:  # a finished run reused, made without its evaluation
        raise SystemExit(f"{RUNS / phases[-1]} was run without its evaluation (export.evaluate false): "
                         f"run this row again with --fresh, or remove that folder")
    return metrics[-1] | {"quantize_time_s": sum(m["quantize_time_s"] for m in metrics)}


def table(rows: list[tuple[str, dict]]) -> str:
    fp = rows[0][1]["fp_perplexity"]
    lines = [f"SmolLM2-135M-Instruct, fp32 perplexity **{fp:.3f}** on {rows[0][1]['tokens']} tokens "
             f"(seq_len {rows[0][1]['seq_len']}, no BOS).", "",
             "| recipe | bits/weight | perplexity | × fp | quantize time (s) |", "|---|---|---|---|---|"]
    for recipe, m in rows:
        lines.append(f"| {recipe.split('+')[-1]} | {m['bits_per_weight']:.3f} | {m['perplexity']:.3f} "
                     f"| {m['ratio_to_fp']:.3f} | {m['quantize_time_s']:.0f} |")
    return "\n".join(lines)


def aqlm_checks(rows: dict[str, dict]) -> str:
    """The AQLM comparisons, computed from the rows (those whose rows were run)."""
    lines = [""]
    if {"gptq-w2g64", "aqlm-2x8-g8"} <= rows.keys():
        ratio = rows["gptq-w2g64"]["perplexity"] / rows["aqlm-2x8-g8"]["perplexity"]
        lines.append(f"- gptq-w2g64 / aqlm-2x8-g8 perplexity: **{ratio:.1f}×**")
    if {"aqlm-2x8-g8", "aqlm-2x8-g8+aqlm-2x8-g8-ft"} <= rows.keys():
        ft = rows["aqlm-2x8-g8+aqlm-2x8-g8-ft"]
        gain = ft["perplexity"] / rows["aqlm-2x8-g8"]["perplexity"]
        lines.append(f"- aqlm-2x8-g8-ft / aqlm-2x8-g8 perplexity: **{gain:.3f}**; aqlm-2x8-g8-ft × fp: "
                     f"**{ft['ratio_to_fp']:.2f}**")
    if {"gptq-w3g128", "aqlm-3x8-g8-ft"} <= rows.keys():
        w3, aqlm3 = rows["gptq-w3g128"], rows["aqlm-3x8-g8-ft"]
        lines.append(f"- aqlm-3x8-g8-ft / gptq-w3g128 perplexity: **{aqlm3['perplexity'] / w3['perplexity']:.3f}** "
                     f"at **{aqlm3['bits_per_weight'] - w3['bits_per_weight']:+.3f}** bits/weight")
    return "\n".join(lines + not_run("aqlm-table", rows))


def distill_checks(rows: dict[str, dict]) -> str:
    """The distillation comparisons: each distilled student against its student, PV-tuning against distillation with
    the same steps, and the AQLM students against fp."""
    lines = [""]
    for student in ("gptq-w2g64", "aqlm-2x8-g8+aqlm-2x8-g8-ft"):
        name = student.split("+")[0]
        distill, pv = f"{student}+{name}-distill", f"{student}+{name}-pv"
        if {student, distill} <= rows.keys():
            ratio = rows[distill]["perplexity"] / rows[student]["perplexity"]
            lines.append(f"- {name}-distill / its student perplexity: **{ratio:.3f}**")
        if {distill, pv} <= rows.keys():
            ratio = rows[pv]["perplexity"] / rows[distill]["perplexity"]
            lines.append(f"- {name}-pv / {name}-distill perplexity, same steps: **{ratio:.3f}**")
    for row in TABLES["distill-table"][-2:]:
        if row in rows:
            m = rows[row]
            lines.append(f"- {row.split('+')[-1]} × fp: **{m['ratio_to_fp']:.3f}** at {m['bits_per_weight']:.3f} "
                         "bits/weight")
    return "\n".join(lines + not_run("distill-table", rows))


def quip_checks(rows: dict[str, dict]) -> str:
    """The QuIP/LeanQuant comparisons: perplexity and bits/weight against the GPTQ row of the same width."""
    lines = [""]
    for method, baseline in [("quip-w2", "gptq-w2g64"), ("leanquant-nu-w3", "gptq-w3g128"),
                             ("leanquant-aff-w3g128", "gptq-w3g128")]:
        if {method, baseline} <= rows.keys():
            m, b = rows[method], rows[baseline]
            lines.append(f"- {method} / {baseline} perplexity: **{m['perplexity'] / b['perplexity']:.3f}** "
                         f"at **{m['bits_per_weight'] - b['bits_per_weight']:+.3f}** bits/weight")
    return "\n".join(lines + not_run("quip-table", rows))


def actquant_checks(rows: dict[str, dict]) -> str:
    """The activation-quantization comparisons: W4A8 against W4A16, W4A4 with TRIP against plain W4A4, and W4A4 with
    TRIP (on the plain or the rotated inputs) against W4A16."""
    lines = [""]
    for method, baseline in [("gptq-w4a8", "gptq-w4g128"), ("gptq-w4a8-trip", "gptq-w4g128"),
                             ("gptq-w4a4-trip", "gptq-w4a4"), ("gptq-w4a4-trip", "gptq-w4g128"),
                             ("quip-w4a4-trip", "gptq-w4g128")]:
        if {method, baseline} <= rows.keys():
            ratio = rows[method]["perplexity"] / rows[baseline]["perplexity"]
            lines.append(f"- {method} / {baseline} perplexity: **{ratio:.3f}**")
    return "\n".join(lines + not_run("actquant-table", rows))


def not_run(name: str, rows: dict[str, dict]) -> list[str]:
    missing = [row for row in TABLES[name] if row not in rows]
    return [f"- not run yet: {', '.join(missing)}"] if missing else []


CHECKS = {"aqlm-table": aqlm_checks, "distill-table": distill_checks, "quip-table": quip_checks,
          "actquant-table": actquant_checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), default="results-table")
    parser.add_argument("--recipes", nargs="+", help="Rows to run instead of the table's (recipe or a+b chain).")
    parser.add_argument("--fresh", action="store_true", help="Delete the rows' runs first instead of reusing them.")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    rows = [(row, run_row(row, args.fresh)) for row in args.recipes or TABLES[args.table]]
    text = table(rows)
    if args.table in CHECKS:
        text += "\n" + CHECKS[args.table](dict(rows))
    print(text)
    if args.update_readme:
        update_readme_section(args.table, text)


if __name__ == "__main__":
    main()
