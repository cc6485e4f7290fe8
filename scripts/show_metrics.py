"""Print the headline figures of a run's metrics.json (used by `make quickstart`)."""

import json
import sys

metrics = json.loads(open(sys.argv[1]).read())
print(f"\nmethod {metrics['method']} · {metrics['bits_per_weight']:.3f} bits/weight · "
      f"quantize {metrics['quantize_time_s']:.0f} s · wall {metrics['wall_time_s']:.0f} s")
print(f"perplexity: fp {metrics['fp_perplexity']:.3f} → quantized {metrics['perplexity']:.3f} "
      f"(× {metrics['ratio_to_fp']:.3f}) on {metrics['tokens']} tokens, windows of {metrics['seq_len']}")
print(f"export: {metrics['export']}\nmetrics: {sys.argv[1]}")
