"""Quantize a local HF Llama with GPTQModel 7.6.0 on CPU, as the reference side of a GPTQ comparison.

Runs inside .venv-gptqmodel (see scripts/gptqmodel_env.sh). Writes:
  OUT/              the GPTQ checkpoint as GPTQModel saves it
  OUT/dequantized/  a plain fp32 HF model whose Linear weights are the dequantized checkpoint weights,
                    so that lqtk can evaluate it with the same code as its own models
and prints one JSON line: {"quantize_time_s", "bits_per_weight", "g_idx_counted", "out"}.
"""

import argparse
import glob
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

# GPTQModel 7.6.0 gives the CPU pool (cores + 1) // 2 workers but its model-loader sub-pool always asks
# for 2, so on a machine with fewer than 4 cores quantize() fails unless the pool is made larger.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="plain HF model directory (safetensors + tokenizer)")
    parser.add_argument("--windows", required=True, help="torch.save'd int64 tensor [N, seq_len] of token ids")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    parser.add_argument("--act-order", action="store_true", help="GPTQModel desc_act=True")
    # GPTQModel's own CPU default ("auto") loads an fp32 model as bfloat16 for calibration.
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype during quantization")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def quantize(args) -> float:
    """Quantize with GPTQModel, save the checkpoint to args.out, return the wall time of quantize() alone."""
    from gptqmodel import GPTQModel, QuantizeConfig

    windows = torch.load(args.windows)
    assert windows.ndim == 2 and not windows.is_floating_point(), "--windows must be an int tensor [N, seq_len]"
    calibration = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows]
    config = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        desc_act=args.act_order,
        # GPTQModel's default act_group_aware=True cannot be combined with desc_act; set it off explicitly
        # (GPTQModel would do the same, with a warning). Without --act-order its default stays on.
        act_group_aware=False if args.act_order else None,
        format="gptq",  # v1 checkpoint: what transformers/optimum and most runtimes load
        device="cpu",
    )
    model = GPTQModel.load(args.model, config, dtype=DTYPES[args.dtype])  # device comes from config
    start = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    quantize_time = time.perf_counter() - start
    model.save(args.out)
    return quantize_time


def unpack_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack `count` codes of `bits` bits from int32 words along dim 0.

    Each column is one LSB-first bit stream over consecutive words, so code r sits at bit r*bits;
    3-bit codes straddle word boundaries, which reading two words at a time handles.
    """
    words = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned view of the int32 words
    words = torch.cat([words, torch.zeros_like(words[:1])])  # the last code may read one word past the end
    bit = torch.arange(count) * bits
    first_word, shift = bit // 32, bit % 32
    two_words = words[first_word] | (words[first_word + 1] << 32)
    return (two_words >> shift[:, None]) & ((1 << bits) - 1)


def dequantize(tensors: dict, prefix: str, bits: int, zero_offset: int) -> torch.Tensor:
    """fp32 weight [O, I] of one GPTQ Linear: w[o, i] = scales[g, o] * (q[i, o] - zp[g, o]), g = g_idx[i]."""
    scales = tensors[f"{prefix}.scales"].float()  # [G, O]
    g_idx = tensors[f"{prefix}.g_idx"].long()  # [I]
    codes = unpack_rows(tensors[f"{prefix}.qweight"], bits, g_idx.numel())  # [I, O]
    # The v1 offset wraps: a zero point of 0 is stored as 2^bits - 1 (GPTQModel's own v1 -> v2 load agrees).
    zeros = (unpack_rows(tensors[f"{prefix}.qzeros"].T, bits, scales.shape[1]).T + zero_offset) % (1 << bits)  # [G, O]
    return (scales[g_idx] * (codes - zeros[g_idx]).float()).T.contiguous()


def load_safetensors_dir(directory: str) -> dict:
    tensors = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def tensor_bits(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size() * 8


def write_dequantized(args, out_dir: str) -> tuple[float, bool]:
    """Write the fp32 dequantized model to out_dir; return (bits per quantized weight, whether g_idx was counted)."""
    with open(os.path.join(args.out, "config.json")) as f:
        qcfg = json.load(f)["quantization_config"]
    # v1 ("gptq") stores (zp - 1) mod 2^bits in qzeros, v2 stores zp itself.
    zero_offset = {"gptq": 1, "gptq_v2": 0}[qcfg.get("checkpoint_format", qcfg.get("format"))]
    bits = qcfg["bits"]
    # Without act-order g_idx[i] = i // group_size is implied, so only act-order checkpoints need it stored.
    count_g_idx = bool(qcfg["desc_act"])

    tensors = load_safetensors_dir(args.out)
    # Everything GPTQ does not quantize (embeddings, norms, biases) comes from the source model in fp32:
    # GPTQModel saves it in its working dtype (bf16 by default on CPU), which would blur the comparison.
    state_dict = {name: tensor.float() for name, tensor in load_safetensors_dir(args.model).items()}
    storage_bits = quantized_weights = 0
    stored = ["qweight", "qzeros", "scales"] + (["g_idx"] if count_g_idx else [])
    for prefix in [name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")]:
        weight = dequantize(tensors, prefix, bits, zero_offset)
        assert state_dict[f"{prefix}.weight"].shape == weight.shape, prefix
        state_dict[f"{prefix}.weight"] = weight
        storage_bits += sum(tensor_bits(tensors[f"{prefix}.{suffix}"]) for suffix in stored)
        quantized_weights += weight.numel()

    os.makedirs(out_dir, exist_ok=True)
    config = AutoConfig.from_pretrained(args.model)  # the source config: no quantization_config
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    save_file(state_dict, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(args.model).save_pretrained(out_dir)
    return storage_bits / quantized_weights, count_g_idx


def check_against_gptqmodel(args, out_dir: str) -> None:
    """Compare our weights with GPTQModel's own load of the checkpoint: its dequantization and its forward."""
    from gptqmodel import GPTQModel

    # GPTQModel's torch kernel only runs in fp16/bf16; fp16 holds the stored fp16 scales exactly.
    reference = GPTQModel.load(args.out, device="cpu", backend="torch", dtype=torch.float16).model.eval()
    our_weights = load_file(os.path.join(out_dir, "model.safetensors"))
    weight_diff = output_diff = output_max = 0.0
    torch.manual_seed(0)
    for name, module in reference.named_modules():
        if not (hasattr(module, "qweight") and hasattr(module, "dequantize_weight")):
            continue
        ours = our_weights[f"{name}.weight"]
        # Forward: its fp16 kernel against an fp32 matmul with our weight, on the same fp16 inputs.
        inputs = torch.randn(8, ours.shape[1], dtype=torch.float16)
        with torch.no_grad():
            expected = inputs.float() @ ours.T
            output_diff = max(output_diff, (module(inputs).float() - expected).abs().max().item())
        output_max = max(output_max, expected.abs().max().item())
        # Dequantization: its unpacking code with the scales upcast, so it runs in fp32 and must match exactly.
        module.scales = module.scales.float()
        module.clear_weight_cache()
        weight_diff = max(weight_diff, (module.dequantize_weight().T - ours).abs().max().item())
    print(f"dequantization check vs GPTQModel: max |weight diff| = {weight_diff:.3g} (fp32); "
          f"max |output diff| = {output_diff:.3g} (its fp16 forward, outputs up to {output_max:.3g})")


def main():
    args = parse_args()
    torch.manual_seed(0)
    quantize_time = quantize(args)
    dequantized_dir = os.path.join(args.out, "dequantized")
    bits_per_weight, g_idx_counted = write_dequantized(args, dequantized_dir)
    check_against_gptqmodel(args, dequantized_dir)
    print(json.dumps({
        "quantize_time_s": round(quantize_time, 2),
        "bits_per_weight": round(bits_per_weight, 4),
        "g_idx_counted": g_idx_counted,
        "out": os.path.abspath(args.out),
    }))


if __name__ == "__main__":
    main()
