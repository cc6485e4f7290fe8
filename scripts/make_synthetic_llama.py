"""Write a random-weight Llama of a given fp32 size as sharded safetensors, one decoder block at a time (the whole
model never exists in memory), with the byte-level tokenizer of the tiny test model.

    python scripts/make_synthetic_llama.py --out runs/synthetic-5gb --size-gb 5.2
    python scripts/make_synthetic_llama.py --out DIR --layers 8 --hidden 256 --intermediate 688 --heads 4

With --size-gb the number of blocks is chosen so that the fp32 weights take at least that many GB (10^9 bytes); the
other dimensions default to a 1B-class Llama (hidden 2048, intermediate 5632, 16 heads, vocab 32000, tied head)."""

import argparse
import math
from pathlib import Path

from lqtk.reference_models import write_random_llama


def fp32_bytes(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> int:
    kv = hidden * kv_heads // heads
    block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden
    return 4 * (layers * block + vocab * hidden + hidden)  # blocks, tied embedding, final norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size-gb", type=float, help="Smallest fp32 size of the weights (sets --layers).")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, help="Key/value heads (default: --heads).")
    parser.add_argument("--vocab", type=int, default=32000)
    opts = parser.parse_args()
    kv_heads = opts.kv_heads or opts.heads
    dims = dict(hidden=opts.hidden, intermediate=opts.intermediate, heads=opts.heads, kv_heads=kv_heads,
                vocab=opts.vocab)
    layers = opts.layers
    if opts.size_gb is not None:
        per_block = fp32_bytes(1, **dims) - fp32_bytes(0, **dims)
        layers = max(1, math.ceil((opts.size_gb * 1e9 - fp32_bytes(0, **dims)) / per_block))
    write_random_llama(opts.out, num_hidden_layers=layers, hidden_size=opts.hidden,
                       intermediate_size=opts.intermediate, num_attention_heads=opts.heads,
                       num_key_value_heads=kv_heads, vocab_size=opts.vocab, max_position_embeddings=4096)
    print(f"{opts.out}: {layers} blocks, {fp32_bytes(layers, **dims) / 1e9:.2f} GB of fp32 weights")


if __name__ == "__main__":
    main()
