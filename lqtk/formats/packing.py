"""Dense bit packing of integer codes into int32 words, shared by the formats that store codes."""

import math

import torch


def pack_bits(q: torch.Tensor, bits: int, rows: int = 256) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers along the last dim into int32 words, densely (LSB first; a 3-bit value
    may straddle two words). (R, n) -> (R, ceil(n*bits/32)), `rows` rows at a time (int64 temporaries)."""
    n = q.shape[1]
    pos = torch.arange(n, device=q.device) * bits
    word, shift = pos // 32, pos % 32
    out = torch.empty(q.shape[0], math.ceil(n * bits / 32), dtype=torch.int32, device=q.device)
    for start in range(0, q.shape[0], rows):
        v = q[start:start + rows].to(torch.int64)
        packed = torch.zeros(v.shape[0], out.shape[1] + 1, dtype=torch.int64, device=q.device)
        packed.scatter_add_(1, word.expand_as(v), (v << shift) & 0xFFFFFFFF)
        packed.scatter_add_(1, (word + 1).expand_as(v), v >> (32 - shift))  # the straddling high bits
        packed = packed[:, :-1]
        out[start:start + rows] = torch.where(packed >= 2**31, packed - 2**32, packed)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (R, words) int32 -> (R, n) int64."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:, :1])], dim=1)
    pos = torch.arange(n, device=packed.device) * bits
    word, shift = pos // 32, pos % 32
    value = (words[:, word] >> shift) | (words[:, word + 1] << (32 - shift))
    return value & (2**bits - 1)


def decode_by_rows(decode, tensors: dict[str, torch.Tensor], shape: list[int], rows: int = 256) -> torch.Tensor:
    """The fp32 (O, I) weight `decode(tensors of some rows)` gives, decoded `rows` rows at a time (every tensor of
    the format has one row per output row): unpacking's int64 temporaries then exist for a few rows, not for the
    whole weight (several times its fp32 size: 0.5 GB at once for a 5632 x 2048 Linear)."""
    first = next(iter(tensors.values()))
    out = torch.empty(shape, device=first.device)
    for start in range(0, shape[0], rows):
        out[start:start + rows] = decode({name: t[start:start + rows] for name, t in tensors.items()})
    return out
