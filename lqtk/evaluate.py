"""Perplexity of a causal LM over evaluation windows (the WikiText-2 protocol of GPTQ and most quantization
papers: the text joined and tokenized once, cut into non-overlapping windows of seq_len tokens, every window
scored independently with no context carried over; each window's first token is only context)."""

import torch
from torchmetrics.text import Perplexity


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) of `model` on `windows` (n, seq_len)."""
    metric = Perplexity()
    device = next(model.parameters()).device
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits.float()
        metric.update(logits[:, :-1].cpu(), batch[:, 1:].cpu())
    return metric.compute().item(), windows.shape[0] * (windows.shape[1] - 1)
