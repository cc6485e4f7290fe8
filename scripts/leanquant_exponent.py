"""LeanQuant's exponent p on the reference model: the proxy error of 3-bit grids for p = 0..4, beside GPTQ's.

    python scripts/leanquant_exponent.py [--windows 16] [--update-readme]

Block 0's q_proj, gate_proj and down_proj of SmolLM2-135M-Instruct with H from calibration windows of the fp model
(the calibration split, never the evaluation text). Printed: the relative proxy error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of
GPTQ w3g128 (min/max and mse scales), LeanQuant non-uniform w3 and LeanQuant affine w3g128 at each p. p = 2 weights a
column by 1/[H⁻¹]_jj, the loss error of rounding it; the paper's p = 4 sharpens that."""

import argparse

from bench_aqlm import block0_hessians, proxy_error
from readme_section import update_readme_section

from lqtk.data import TextDataModule
from lqtk.quant import GPTQ, LeanQuant

EXPONENTS = (0.0, 1.0, 2.0, 3.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="Calibration windows of 512 tokens for H.")
    parser.add_argument("--update-readme", action="store_true")
    args = parser.parse_args()

    windows = TextDataModule(tokenizer="smollm2-135m", num_calibration_windows=args.windows,
                             seq_len=512).calibration_windows()
    quantizers = {"gptq w3g128 minmax": GPTQ(bits=3, group_size=128),
                  "gptq w3g128 mse": GPTQ(bits=3, group_size=128, observer="mse"),
                  **{f"nu-w3 p={p:g}": LeanQuant(bits=3, exponent=p) for p in EXPONENTS},
                  **{f"aff-w3g128 p={p:g}": LeanQuant(bits=3, group_size=128, grid="affine", observer="mse",
                                                      mse_norm=2.0, exponent=p) for p in EXPONENTS}}
    layers = block0_hessians(windows)
    lines = [f"Relative proxy error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), block 0, H from {args.windows} calibration windows "
             "(`python scripts/leanquant_exponent.py`):", "",
             "| grid | " + " | ".join(layers) + " |", "|---" * (len(layers) + 1) + "|"]
    for name, quantizer in quantizers.items():
        errors = [proxy_error(W, H, quantizer.quantize(W, H).dequantize()) for W, H in layers.values()]
        lines.append(f"| {name} | " + " | ".join(f"{e:.3e}" for e in errors) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.update_readme:
        update_readme_section("leanquant-exponent", text)


if __name__ == "__main__":
    main()
