"""Load an lqtk export with plain transformers (`import lqtk` registers its format) and generate greedily.

    python examples/load_and_generate.py runs/examples/gptq-w4g128/model    # e.g. the export of quantize_gptq.py
    python examples/load_and_generate.py                                    # tiny-llama (fp): any HF folder loads

An export is a Hugging Face folder (config.json with a `quantization_config` of quant_method "lqtk", safetensors, the
tokenizer), so the usual two lines load it; `lqtk.load(folder)` does the same for lqtk's reference model names too.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lqtk  # noqa: F401  (registers quant_method "lqtk" with transformers)
from lqtk.models import resolve_model

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("model", nargs="?", default="tiny-llama", help="export or HF folder, or reference model name")
parser.add_argument("--prompt", default="Now is the winter of our discontent")
parser.add_argument("--tokens", type=int, default=16, help="new tokens to generate")
opts = parser.parse_args()

folder = resolve_model(opts.model)  # a reference model name → its folder in lqtk's cache (built on first use)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
quantized = sum(type(module).__name__ == "QuantizedLinear" for module in model.modules())
print(f"{folder}: {quantized} quantized Linears")
ids = tokenizer(opts.prompt, return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=opts.tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
print(repr(tokenizer.decode(out[0])))
