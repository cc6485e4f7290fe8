"""`lqtk evaluate` with every layer's matmul on a kernel (LQTK_KERNELS=all) against the dense path (LQTK_KERNELS=off).

    .venv/bin/python scripts/check_kernel_perplexity.py EXPORT_DIR... [--max-windows N] [--update-readme]

Each export is scored twice by the `lqtk evaluate` command, in subprocesses that differ only in LQTK_KERNELS: `all`
runs the CPU kernels (lqtk.kernels.cpu, int_gemm) for every input, including the evaluation's 512-token windows that
the default (`auto`) sends to the dense GEMM, so every kernel the export's formats have is exercised; `off` decodes
each weight and runs F.linear. The relative perplexity difference must be at most --tolerance (1e-4); the exit status
says whether it is for every export. The kernels are GEMVs, slow on whole windows, hence the first --max-windows
windows of the default evaluation split (default 8)."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from readme_section import update_readme_section


def evaluate(export: Path, kernels: str, max_windows: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", "lqtk.cli", "evaluate", "--model", str(export), "--output", str(output),
                        "--max-windows", str(max_windows)], check=True, env={**os.environ, "LQTK_KERNELS": kernels},
                       stdout=subprocess.DEVNULL)
        return json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path, help="lqtk export folders (a run's model/)")
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative perplexity difference")
    parser.add_argument("--update-readme", action="store_true", help="write the docs page section kernel-perplexity")
    opts = parser.parse_args()
    missing = [str(export) for export in opts.exports if not (export / "config.json").is_file()]
    if missing:
        raise SystemExit(f"not lqtk exports (no config.json): {', '.join(missing)}; pass runs' model/ folders")
    rows = ["| export | formats | tokens | kernels (`all`) | dense (`off`) | relative difference |",
            "|---|---|---:|---:|---:|---:|"]
    ok = True
    for export in opts.exports:
        on, off = evaluate(export, "all", opts.max_windows), evaluate(export, "off", opts.max_windows)
        difference = abs(on["perplexity"] / off["perplexity"] - 1)
        ok &= difference <= opts.tolerance
        config = json.loads((export / "config.json").read_text()).get("quantization_config", {})
        formats = ", ".join(sorted({layer["format"] for layer in config.get("layers", {}).values()})) or "?"
        rows.append(f"| `{export}` | {formats} | {on['tokens']} | {on['perplexity']:.6f} | {off['perplexity']:.6f} "
                    f"| {difference:.1e} |")
        print(rows[-1], flush=True)
    note = (f"`scripts/check_kernel_perplexity.py --max-windows {opts.max_windows}`: the first {opts.max_windows} "
            f"windows of the default evaluation split, fp32 on this CPU; tolerance {opts.tolerance:g}.")
    table = "\n".join(rows)
    print(f"\n{table}\n\n{note}")
    if opts.update_readme:
        update_readme_section("kernel-perplexity", f"{table}\n\n{note}")
    if not ok:
        raise SystemExit(f"kernels change the perplexity by more than {opts.tolerance:g} (relative)")


if __name__ == "__main__":
    main()
