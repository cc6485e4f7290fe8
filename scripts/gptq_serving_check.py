"""Load a GPTQ export (lqtk.export.serving) with transformers + optimum + gptqmodel and run it: the logits of some
token ids, or the perplexity of evaluation windows with lqtk's evaluation code. Runs in .venv-gptqmodel (made by
scripts/gptqmodel_env.sh: gptqmodel pins numpy 2.2.6, so it has a venv of its own); the tests and
scripts/check_serving_exports.py call it as a subprocess.

    .venv-gptqmodel/bin/python scripts/gptq_serving_check.py --model DIR [DIR ...] --ids IDS.pt --logits OUT.pt [...]
    .venv-gptqmodel/bin/python scripts/gptq_serving_check.py --model DIR --windows WINDOWS.pt --output OUT.json

On the CPU it loads with `GPTQConfig(bits, backend="gptq_torch")`: gptqmodel's default CPU kernel rounds scales and
zeros to bf16. The perplexity mode imports lqtk from this repository, which needs torchmetrics in that venv."""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPTQConfig

REPO = Path(__file__).resolve().parents[1]


def load(folder: Path, dtype: torch.dtype):
    bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu",
                                                 quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"))
    return model.eval()


def kernel_name(model) -> str:
    kernel = type(next(m for m in model.modules() if hasattr(m, "qweight")))
    return f"{kernel.__module__}.{kernel.__qualname__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="+", required=True,
                        help="GPTQ export folders (several: one load of gptqmodel for all, logits only)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--ids", type=Path, help="token ids (B, T) saved with torch.save: write their logits")
    parser.add_argument("--logits", type=Path, nargs="+", help="where to torch.save each model's fp32 logits (B, T, V)")
    parser.add_argument("--windows", type=Path, help="evaluation windows (n, T) saved with torch.save: perplexity")
    parser.add_argument("--output", type=Path, help="JSON file for the perplexity")
    parser.add_argument("--batch-size", type=int, default=2)
    opts = parser.parse_args()
    if opts.ids is not None:
        if len(opts.logits or []) != len(opts.model):
            parser.error("--logits needs one file per --model")
        for folder, out in zip(opts.model, opts.logits):
            model = load(folder, getattr(torch, opts.dtype))
            with torch.no_grad():
                logits = model(torch.load(opts.ids)).logits.float()
            torch.save(logits, out)
            print(json.dumps({"model": str(folder), "kernel": kernel_name(model), "shape": list(logits.shape)}))
    if opts.windows is not None:
        if len(opts.model) != 1:
            parser.error("--windows takes one --model")
        model = load(opts.model[0], getattr(torch, opts.dtype))
        sys.path.insert(0, str(REPO))
        from lqtk.evaluate import perplexity

        start = time.perf_counter()
        ppl, tokens = perplexity(model, torch.load(opts.windows), opts.batch_size)
        result = {"perplexity": ppl, "tokens": tokens, "eval_time_s": time.perf_counter() - start,
                  "kernel": kernel_name(model), "model": str(opts.model[0])}
        opts.output.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
