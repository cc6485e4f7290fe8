"""Perplexity of a run's serving exports, loaded by the engines' own loaders, against lqtk's export.

    .venv/bin/python scripts/check_serving_exports.py RUN_DIR [--quantize] [--max-windows N] [--update-readme]

RUN_DIR is a run folder of configs/smollm2-135m/gptq-w4g128.yaml (or another affine recipe) holding `model/`; with
--quantize a missing run is made first (`lqtk fit`, about 5 minutes on 2 idle cores). Serving exports missing from
the run (`model-compressed-tensors/`, `model-gptq/`: a run of a recipe without export.serving_formats) are written
from `model/` by lqtk.export.serving. All three are scored by lqtk's evaluation code (lqtk.evaluate.perplexity) on
the default evaluation split with the run's seq_len and bos:
  - model/                     loaded by lqtk;
  - model-compressed-tensors/  loaded by transformers + compressed-tensors (dequantize=True when asymmetric: the
                               compressed CPU path refuses packed zero points);
  - model-gptq/                loaded by transformers + optimum + gptqmodel (backend gptq_torch) in .venv-gptqmodel
                               (scripts/gptqmodel_env.sh, plus torchmetrics for lqtk's evaluation code), through
                               scripts/gptq_serving_check.py in a subprocess.
Each must be within --tolerance (0.5%) of lqtk's perplexity; the exit status says whether all are."""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from readme_section import update_readme_section

from lqtk.data import TextDataModule, default_split
from lqtk.evaluate import EVAL_BATCH_SIZE, perplexity
from lqtk.export.serving import export_serving, load_compressed_tensors, serving_folder
from lqtk.models import load_causal_lm

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "smollm2-135m" / "gptq-w4g128.yaml"
GPTQ_PYTHON = REPO / ".venv-gptqmodel" / "bin" / "python"


def timed(label: str, evaluate) -> dict:
    start = time.perf_counter()
    ppl, tokens = evaluate()
    seconds = time.perf_counter() - start
    print(f"{label}: perplexity {ppl:.4f} on {tokens} tokens ({seconds:.0f} s)", flush=True)
    return {"perplexity": ppl, "tokens": tokens, "eval_time_s": seconds}


def gptq_perplexity(folder: Path, windows: torch.Tensor) -> tuple[float, int]:
    if not GPTQ_PYTHON.exists():
        raise SystemExit(f"{GPTQ_PYTHON} is missing: create it with scripts/gptqmodel_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(windows, Path(tmp) / "windows.pt")
        proc = subprocess.run([str(GPTQ_PYTHON), str(REPO / "scripts" / "gptq_serving_check.py"), "--model",
                               str(folder), "--windows", str(Path(tmp) / "windows.pt"), "--output",
                               str(Path(tmp) / "result.json")], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"the GPTQ load in .venv-gptqmodel failed:\n{proc.stderr[-3000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
    return result["perplexity"], result["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder with model/ (and the serving exports, if written)")
    parser.add_argument("--quantize", action="store_true", help=f"run {RECIPE.relative_to(REPO)} first if needed")
    parser.add_argument("--max-windows", type=int, help="only the first N evaluation windows (a quick check)")
    parser.add_argument("--tolerance", type=float, default=0.005, help="largest relative perplexity difference")
    parser.add_argument("--update-readme", action="store_true", help="write the docs page section serving-exports")
    opts = parser.parse_args()
    run, model_dir = opts.run, opts.run / "model"
    if not model_dir.exists():
        if not opts.quantize:
            raise SystemExit(f"{model_dir} does not exist: pass a finished run folder, or --quantize")
        subprocess.run([sys.executable, "-m", "lqtk.cli", "fit", "--config", str(RECIPE),
                        "--trainer.default_root_dir", str(run)], check=True)
    for format_name in ("compressed-tensors", "gptq"):
        if not (run / serving_folder(format_name)).exists():
            print(f"writing {serving_folder(format_name)}/ from model/", flush=True)
            export_serving(model_dir, run / serving_folder(format_name), format_name)

    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    seq_len, bos = metrics.get("seq_len", 512), metrics.get("bos", False)
    data = TextDataModule(tokenizer=str(model_dir), evaluation_files=default_split()[1], seq_len=seq_len, bos=bos,
                          batch_size=EVAL_BATCH_SIZE)
    windows = data.evaluation_windows()[: opts.max_windows]
    results = {
        "lqtk": timed("model/ (lqtk)", lambda: perplexity(load_causal_lm(model_dir, lazy=True), windows)),
        "compressed-tensors": timed("model-compressed-tensors/ (transformers + compressed-tensors)", lambda: perplexity(
            load_compressed_tensors(run / serving_folder("compressed-tensors")), windows)),
        "gptq": timed("model-gptq/ (transformers + optimum + gptqmodel)",
                      lambda: gptq_perplexity(run / serving_folder("gptq"), windows)),
    }
    reference = results["lqtk"]["perplexity"]
    rows = ["| export | loaded by | perplexity | ratio to lqtk |", "|---|---|---:|---:|"]
    loaders = {"lqtk": "lqtk", "compressed-tensors": "transformers + compressed-tensors 0.20.0",
               "gptq": "transformers + optimum + gptqmodel 7.6.0 (gptq_torch)"}
    ok = True
    for name, result in results.items():
        ratio = result["perplexity"] / reference
        ok &= abs(ratio - 1) <= opts.tolerance
        folder = "model" if name == "lqtk" else serving_folder(name)
        rows.append(f"| `{folder}/` | {loaders[name]} | {result['perplexity']:.4f} | {ratio:.5f} |")
    table = "\n".join(rows)
    note = (f"{RECIPE.relative_to(REPO)}, {results['lqtk']['tokens']} tokens of the default evaluation split "
            f"(seq_len {seq_len}), fp32 on the CPU; `scripts/check_serving_exports.py`.")
    print(f"\n{table}\n\n{note}")
    (run / "serving_check.json").write_text(json.dumps({"results": results, "seq_len": seq_len, "bos": bos}, indent=2)
                                            + "\n")
    if opts.update_readme:
        update_readme_section("serving-exports", f"{table}\n\n{note}")
    if not ok:
        raise SystemExit(f"a serving export's perplexity differs from lqtk's by more than {opts.tolerance:.1%}")


if __name__ == "__main__":
    main()
