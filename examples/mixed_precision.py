"""Per-layer bits: GPTQ at 3 bits everywhere except the MLPs' down projections and the attention's value
projections, which keep 4 (`layer_quantizers`: regular expressions of Linear names → their quantizer, as GPTQModel's
`dynamic`), against uniform 3 bits; both calibrated on the same windows.

    python examples/mixed_precision.py [MODEL] [--calibration a.txt --evaluation b.txt] [--windows N]

For an allocation chosen by the layers' measured sensitivity within a bits/weight budget, see the Requantize phase
and configs/smollm2-135m/mixed-3.0.yaml (`lqtk chain`).
"""

import argparse
import json

import lqtk
from lqtk.quant import GPTQ

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("model", nargs="?", default="tiny-llama", help="HF model folder or lqtk reference model name")
parser.add_argument("--out", default="runs/examples/mixed", help="folder of the two runs")
parser.add_argument("--calibration", nargs="+", help="calibration text files (default: the Shakespeare split)")
parser.add_argument("--evaluation", nargs="+", help="evaluation text files (default: the Shakespeare split)")
parser.add_argument("--windows", type=int, default=64, help="calibration windows")
parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
opts = parser.parse_args()

data = {"calibration_files": opts.calibration, "evaluation_files": opts.evaluation,
        "num_calibration_windows": opts.windows, "seq_len": opts.seq_len}
runs = {"uniform-w3": {}, "w3-down-v-w4": {"layer_quantizers": {r"mlp\.down_proj|self_attn\.v_proj": GPTQ(bits=4)}}}
for name, options in runs.items():
    export = lqtk.quantize(opts.model, GPTQ(bits=3), data=data, output_dir=f"{opts.out}/{name}", overwrite=True,
                           **options)
    metrics = json.loads((export.parent / "metrics.json").read_text())
    print(f"{name}: {metrics['bits_per_weight']:.2f} bits/weight, perplexity {metrics['perplexity']:.2f} "
          f"(fp {metrics['fp_perplexity']:.2f})")
