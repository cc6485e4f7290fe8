"""Time to fit LeanQuant's non-uniform grids for the reference model's largest layer: all rows at once (lqtk) against
a loop over rows (one k-means per row, as the authors' code runs sklearn), in the same run.

    python scripts/bench_grids.py [--bits 2 3 4] [--update-readme]

The layer is block 0's mlp.gate_proj of SmolLM2-135M-Instruct (1536 x 576, tied for the largest with up/down_proj,
and the one with the most rows). The column weights are LeanQuant's d^(-4) from H of 32 calibration windows of 512
tokens. Both ways run the same k-means (`weighted_kmeans`) to convergence; the script checks they give the same
levels and prints seconds and the ratio."""

import argparse
import time

import torch
from bench_aqlm import block0_hessians
from readme_section import update_readme_section

from lqtk.data import TextDataModule
from lqtk.quant import LeanQuant
from lqtk.quant.gptq import inverse_hessian_cholesky
from lqtk.quant.leanquant import weighted_kmeans

LAYER = "mlp.gate_proj"


def seconds(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()

    windows = TextDataModule(tokenizer="smollm2-135m", num_calibration_windows=32, seq_len=512).calibration_windows()
    weight, hessian = block0_hessians(windows)[LAYER]
    quantizer = LeanQuant()
    importance = quantizer.column_importance(hessian, inverse_hessian_cholesky(hessian, quantizer.damp, 0.01))
    lines = [f"Block 0 {LAYER} ({weight.shape[0]} x {weight.shape[1]}), `python scripts/bench_grids.py`:", "",
             "| bits | levels per row | batched (s) | per-row loop (s) | speed-up | same levels |",
             "|---|---|---|---|---|---|"]
    for bits in args.bits:
        batched, levels = seconds(lambda: weighted_kmeans(weight, importance, 2**bits))
        looped, per_row = seconds(lambda: torch.cat([weighted_kmeans(row[None], importance, 2**bits)
                                                     for row in weight]))
        same = torch.allclose(levels, per_row, atol=1e-6)
        lines.append(f"| {bits} | {2**bits} | {batched:.2f} | {looped:.2f} | {looped / batched:.1f}x | {same} |")
    text = "\n".join(lines)
    print(text)
    if args.update_readme:
        update_readme_section("grids-bench", text)


if __name__ == "__main__":
    main()
