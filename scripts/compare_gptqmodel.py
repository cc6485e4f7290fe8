"""lqtk against GPTQModel 7.6.0 on the reference model, side by side in one run.

    .venv/bin/python scripts/compare_gptqmodel.py [--dtypes auto float32] [--symmetric] [--update-readme]

GPTQModel is installed in its own venv (.venv-gptqmodel, by scripts/gptqmodel_env.sh: it pins numpy 2.2.6) and
quantizes asymmetric (and with --symmetric, symmetric) with act-order at w4g128 and w3g128, on exactly the
calibration windows lqtk's recipes use (64 x 512 tokens of the calibration plays, seed 0), with its own defaults
otherwise (damp 0.05 with auto-increment, true-sequential), in each working dtype of --dtypes: `auto` is its CPU
default, bfloat16; `float32` is faster on CPUs without bf16 units. Its checkpoints are dequantized exactly to fp32
folders (scripts/gptqmodel_quantize.py) so both toolkits' models are scored by the same code (`lqtk evaluate`, the
default evaluation split). Bits/weight count every stored tensor; quantize time is the quantization call alone for
GPTQModel and the calibration phase alone for lqtk, each measured here. lqtk is compared with GPTQModel's fastest
asymmetric row at the same bits."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from readme_section import update_readme_section

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "compare"
GPTQMODEL_PYTHON = REPO / ".venv-gptqmodel" / "bin" / "python"


def run(cmd: list[str]) -> str:
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), cwd=REPO, check=True, capture_output=True, text=True).stdout


def lqtk_recipe(recipe: str) -> dict:
    run_dir = OUT / f"lqtk-{recipe}"
    run([sys.executable, "-m", "lqtk.cli", "fit", "--config", REPO / "configs" / "smollm2-135m" / f"{recipe}.yaml",
         "--trainer.default_root_dir", run_dir, "--overwrite", "true"])
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"perplexity": m["perplexity"], "fp": m["fp_perplexity"], "bits_per_weight": m["bits_per_weight"],
            "quantize_time_s": m["quantize_time_s"]}


def gptqmodel(model_dir: Path, windows: Path, bits: int, symmetric: bool, dtype: str) -> dict:
    out = OUT / f"gptqmodel-w{bits}g128-{'sym' if symmetric else 'asym'}-{dtype}"
    stdout = run([GPTQMODEL_PYTHON, REPO / "scripts" / "gptqmodel_quantize.py", "--model", model_dir,
                  "--windows", windows, "--bits", bits, "--group-size", 128, "--sym" if symmetric else "--asym",
                  "--act-order", "--dtype", dtype, "--out", out])
    result = json.loads(stdout.strip().splitlines()[-1])
    run([sys.executable, "-m", "lqtk.cli", "evaluate", "--model", out / "dequantized", "--output", out / "eval.json"])
    ppl = json.loads((out / "eval.json").read_text())["perplexity"]
    return {"perplexity": ppl, "bits_per_weight": result["bits_per_weight"],
            "quantize_time_s": result["quantize_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["auto", "float32"], choices=["auto", "float32"],
                        help="GPTQModel working dtypes to run (auto: its CPU default, bfloat16)")
    parser.add_argument("--symmetric", action="store_true", help="also GPTQModel's symmetric rows")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    subprocess.run(["bash", REPO / "scripts" / "gptqmodel_env.sh"], cwd=REPO, check=True)

    from lqtk.data import TextDataModule
    from lqtk.models import prepare_model

    model_dir = prepare_model("smollm2-135m")
    OUT.mkdir(parents=True, exist_ok=True)
    windows = OUT / "calibration_windows.pt"
    torch.save(TextDataModule(tokenizer="smollm2-135m", seq_len=512, num_calibration_windows=64, seed=0)
               .calibration_windows(), windows)  # the recipes' data settings

    rows = []
    for bits in (4, 3):
        for symmetric in (True, False)[not args.symmetric:]:
            for dtype in args.dtypes:
                name = f"GPTQModel 7.6.0 w{bits}g128 {'sym' if symmetric else 'asym'} act-order {dtype}"
                rows.append((name, gptqmodel(model_dir, windows, bits, symmetric, dtype)))
        rows.append((f"lqtk gptq-w{bits}g128", lqtk_recipe(f"gptq-w{bits}g128")))
    fp = next(r["fp"] for _, r in rows if "fp" in r)
    lines = [f"fp32 perplexity {fp:.3f}; same calibration windows, same evaluation code, same machine, one run.", "",
             "| model | bits/weight | perplexity | × fp | quantize time (s) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['perplexity'] / fp:.3f} "
              f"| {r['quantize_time_s']:.0f} |" for name, r in rows]
    for bits in (4, 3):
        asymmetric = [(name, r) for name, r in rows if name.startswith(f"GPTQModel 7.6.0 w{bits}g128 asym")]
        fastest_name, fastest = min(asymmetric, key=lambda row: row[1]["quantize_time_s"])
        best_name, best = min(asymmetric, key=lambda row: row[1]["perplexity"])
        for name, r in rows:
            if name.startswith(f"lqtk gptq-w{bits}"):
                lines.append(f"\n{name}: quantize time × {r['quantize_time_s'] / fastest['quantize_time_s']:.2f} of "
                             f"GPTQModel's fastest asymmetric w{bits}g128 ({fastest_name.split('act-order ')[1]}), "
                             f"perplexity × {r['perplexity'] / best['perplexity']:.3f} of its best "
                             f"({best_name.split('act-order ')[1]})")
    text = "\n".join(lines)
    print(text)
    if args.update_readme:
        update_readme_section("gptqmodel-comparison", text)


if __name__ == "__main__":
    main()
