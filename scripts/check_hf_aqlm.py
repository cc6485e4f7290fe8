"""Perplexity of an AQLM run's HF AQLM export (loaded by plain transformers + aqlm) against its lqtk export.

    python scripts/check_hf_aqlm.py RUN_DIR [--max-windows N] [--update-readme]

Runs `lqtk evaluate` on RUN_DIR/model (lqtk's loader) and on RUN_DIR/model-hf-aqlm, which `load_causal_lm` hands to
`AutoModelForCausalLM.from_pretrained` (transformers' AQLM integration and the aqlm package's kernels; no lqtk code
in the model), on the default evaluation split (or its first N windows: aqlm's CPU kernel for 8-bit codebooks runs on
one thread and needs far longer than lqtk for the whole split), and prints both perplexities and their ratio."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from readme_section import update_readme_section

REPO = Path(__file__).resolve().parents[1]


def evaluate(model_dir: Path, max_windows: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        env = os.environ | {"NUMBA_NUM_THREADS": "1"}  # aqlm's 8-bit CPU kernel races on several threads
        cmd = [sys.executable, "-m", "lqtk.cli", "evaluate", "--model", str(model_dir), "--output", str(out)]
        cmd += ["--max-windows", str(max_windows)] if max_windows else []
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--max-windows", type=int, help="Only the first N evaluation windows.")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()
    lqtk, hf = (evaluate(args.run_dir / folder, args.max_windows) for folder in ("model", "model-hf-aqlm"))
    text = (f"{args.run_dir.name}: lqtk export perplexity {lqtk['perplexity']:.3f} ({lqtk['eval_time_s']:.0f} s), "
            f"HF AQLM export in plain transformers + aqlm {hf['perplexity']:.3f} ({hf['eval_time_s']:.0f} s), "
            f"ratio **{hf['perplexity'] / lqtk['perplexity']:.5f}**, on {lqtk['tokens']} tokens.")
    print(text)
    if args.update_readme:
        update_readme_section("hf-aqlm-check", text)


if __name__ == "__main__":
    main()
