"""The `ggml` storage format: a weight held in llama.cpp's own block layouts (the quantized tensor types of GGUF
files), byte for byte, so that writing a GGUF copies the bytes and llama.cpp runs them at its full speed.

Every type decodes a weight the same way: a block of `block` weights is cut into sub-blocks of `sub` weights, each
weight stores an unsigned code q, and

    w = scale[sub-block] · level(q)  (+ offset[sub-block], the types with a minimum)

where `level` is a fixed integer table (q − 8 for Q4_0, llama.cpp's non-uniform kvalues for IQ4_NL), and a
sub-block's scale and offset come from the block's fp16 fields and integer scale codes, computed in fp32 with the
same operations, in the same order, as llama.cpp's and the `gguf` package's dequantization: lqtk decodes these bytes
bit for bit as they do (tests/test_ggml.py checks it against the `gguf` package). The 2-3 bit i-quants
(IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) store vectors instead of levels: each run of 8 (or 4) weights is an entry
of a fixed lattice codebook of positive values (`grid_table`), and each run of 8 weights has a sign code
(`sign_table`: 7 bits and even parity, or 8 free bits for IQ2_S and IQ3_S):

    w = scale[sub-block] · grid[g] · sign[s]

The bytes of one block are described by fields: fp16 values at byte offsets, and integer codes whose bits are spread
over the block by an `interleaved` pattern (llama.cpp packs nibbles and bit planes of neighbouring runs of weights
into the same bytes). A field may take its value from several parts (Q5_0's fifth bit, Q4_K's 6-bit scale codes).
"""

import functools
from dataclasses import dataclass

import gguf
import torch

from lqtk.formats.base import WeightFormat, register_format
from lqtk.formats.packing import decode_by_rows

IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""llama.cpp's `kvalues_iq4nl`: the 16 non-uniform levels of IQ4_NL and IQ4_XS."""


@dataclass(frozen=True)
class Part:
    """Some bits of a field's values: element e's bits [value_shift, value_shift + bits) sit in byte `byte[e]` of
    the block at bit `shift[e]` (a part with bits 0 holds nothing of that element)."""

    byte: tuple[int, ...]
    shift: tuple[int, ...]
    bits: tuple[int, ...]
    value_shift: tuple[int, ...]

    def tensors(self, device) -> tuple[torch.Tensor, ...]:
        """byte (int64, an index), shift, mask of the bits, value_shift (int32)."""
        as_int = functools.partial(torch.tensor, dtype=torch.int32, device=device)
        mask = [(1 << b) - 1 for b in self.bits]
        return torch.tensor(self.byte, device=device), as_int(self.shift), as_int(mask), as_int(self.value_shift)


def interleaved(count: int, width: int, bits: int, offset: int = 0, value_shift: int = 0) -> Part:
    """`count` values of `bits` bits from byte `offset` on: runs of `width` consecutive values fill `width` bytes,
    the next run the next `bits` bits of the same bytes, until the bytes are full (llama.cpp's nibble, 2-bit and
    bit-plane layouts: Q4_0 is width 16, Q2_K width 32, Q5_0's high bits width 1)."""
    per_byte = 8 // bits
    chunk = per_byte * width
    byte = [offset + e // chunk * width + e % chunk % width for e in range(count)]
    shift = [bits * (e % chunk // width) for e in range(count)]
    return Part(tuple(byte), tuple(shift), (bits,) * count, (value_shift,) * count)


def bits_at(starts: list[int], bits: int) -> list[Part]:
    """Values of `bits` bits (at most 9) starting at the given bit positions of the block, little-endian (the bits
    of llama.cpp's uint16 and uint32 words): the first part holds the bits in a value's first byte, the second the
    rest, in the next byte."""
    low = [min(bits, 8 - start % 8) for start in starts]
    rest = [bits - n for n in low]
    return [Part(tuple(start // 8 for start in starts), tuple(start % 8 for start in starts), tuple(low),
                 (0,) * len(starts)),
            Part(tuple(start // 8 + (n > 0) for start, n in zip(starts, rest)), (0,) * len(starts), tuple(rest),
                 tuple(low))]


def k_scale_codes(minimum: bool, offset: int = 4) -> list[Part]:
    """Q4_K/Q5_K's eight 6-bit scale (or min) codes in 12 bytes from `offset`: codes 0-3 in the low 6 bits of bytes
    0-3 (mins: 4-7); codes 4-7 with their low 4 bits in the low (mins: high) nibble of bytes 8-11 and their top 2 bits
    in the top 2 bits of bytes 0-3 (mins: 4-7)."""
    base = offset + (4 if minimum else 0)
    low = Part(tuple([base + j for j in range(4)] + [offset + 8 + j for j in range(4)]),
               (0,) * 4 + (4 if minimum else 0,) * 4, (6,) * 4 + (4,) * 4, (0,) * 8)
    high = Part((offset,) * 4 + tuple(base + j for j in range(4)), (0,) * 4 + (6,) * 4, (0,) * 4 + (2,) * 4,
                (0,) * 4 + (4,) * 4)
    return [low, high]


@dataclass(frozen=True)
class BlockType:
    """One GGML quantized tensor type. `halves`: its fp16 fields by byte offset (`d`, and `m` or `dmin`); `codes`:
    its integer fields (`q` per weight, `scales` and `mins` per sub-block; the i-quants: `grid` per vector, `signs`
    per 8 weights) as parts. `levels[q]` is a code's level (the i-quants: the values of their codebook's entries);
    `scale_codes`: how a sub-block's scale code decodes (None: the block's d is the scale; `unsigned`: d·code;
    `signed`: d·(code − 32), or d·code for int8 codes; `odd`: d·(0.5 + code)·`scale_factor`); `minimum`: the
    sub-block's offset, `+m` (the 32-wide types: the block's m) or `-dmin·min` (the k-quants)."""

    name: str
    block: int
    sub: int
    size: int
    halves: dict[str, int]
    codes: dict[str, list[Part]]
    levels: tuple[int, ...]
    scale_codes: str | None = None
    minimum: str | None = None
    scale_factor: float = 1.0

    @property
    def vectors(self) -> bool:
        """Whether the weights are lattice-codebook vectors with sign codes (the i-quants below 4 bits)."""
        return "grid" in self.codes

    @property
    def sign_bits(self) -> int:
        """Bits of a run of 8 weights' sign code: 7 (the 8th sign makes the count of minus signs even) or 8."""
        return self.code_bits["signs"]

    @property
    def even_signs(self) -> bool:
        """Whether a run of 8 weights must have an even count of minus signs (its sign code has 7 bits)."""
        return self.sign_bits == 7

    @property
    def code_bits(self) -> dict[str, int]:
        """The width in bits of each integer field's codes."""
        return {name: max(b + s for part in parts for b, s in zip(part.bits, part.value_shift))
                for name, parts in self.codes.items()}

    def unpack(self, blocks: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Blocks (N, size) uint8 -> ({fp16 field: (N,) fp32}, {code field: (N, count) int32})."""
        halves = {name: blocks[:, at:at + 2].contiguous().view(torch.float16)[:, 0].float()
                  for name, at in self.halves.items()}
        wide = blocks.to(torch.int32)
        codes = {}
        for name, parts in self.codes.items():
            value = 0
            for part in parts:
                byte, shift, mask, value_shift = part.tensors(blocks.device)
                value = value + (((wide[:, byte] >> shift) & mask) << value_shift)
            codes[name] = value
        return halves, codes

    def pack(self, halves: dict[str, torch.Tensor], codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of `unpack`: fp16 fields (N,) (rounded to fp16 here) and codes (N, count) -> blocks (N, size)."""
        count = next(iter(codes.values())).shape[0]
        out = torch.zeros(count, self.size, dtype=torch.int32, device=next(iter(codes.values())).device)
        for name, at in self.halves.items():
            pair = halves[name].to(torch.float16).reshape(-1, 1).view(torch.uint8)
            out[:, at:at + 2] = pair.to(torch.int32)
        for name, parts in self.codes.items():
            value = codes[name].to(torch.int32)
            for part in parts:
                byte, shift, mask, value_shift = part.tensors(out.device)
                # distinct (byte, bit) positions: adding is or-ing
                out.scatter_add_(1, byte.expand_as(value), ((value >> value_shift) & mask) << shift)
        return out.to(torch.uint8)

    def sub_scales(self, halves: dict[str, torch.Tensor], codes: dict[str, torch.Tensor]):
        """(scale, offset or None), each (N, sub-blocks) fp32, as llama.cpp computes them from the stored fields."""
        d = halves["d"][:, None]
        if self.scale_codes is None:
            scale = d
        elif self.scale_codes == "unsigned":
            scale = d * codes["scales"].float()
        elif self.scale_codes == "odd":
            scale = d * (0.5 + codes["scales"].float()) * self.scale_factor
        elif self.code_bits["scales"] == 8:  # int8 codes (Q6_K)
            scale = d * (codes["scales"] - 256 * (codes["scales"] >= 128)).float()
        else:
            scale = d * (codes["scales"] - 32).float()
        if self.minimum == "+m":
            return scale, halves["m"][:, None]
        if self.minimum == "-dmin":
            return scale, -(halves["dmin"][:, None] * codes["mins"].float())
        return scale, None

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks (N, size) uint8 -> weights (N, block) fp32."""
        halves, codes = self.unpack(blocks)
        scale, offset = self.sub_scales(halves, codes)
        if self.vectors:
            value = grid_table(self.name).to(blocks.device)[codes["grid"].long()].reshape(len(blocks), self.block)
            signs = sign_table(self.sign_bits).to(blocks.device)
            sign = signs[codes["signs"].long()].reshape(len(blocks), self.block)
            return scale.repeat_interleave(self.sub, 1) * value * sign
        level = torch.tensor(self.levels, dtype=torch.float32, device=blocks.device)[codes["q"].long()]
        w = scale.repeat_interleave(self.sub, 1) * level
        return w if offset is None else w + offset.repeat_interleave(self.sub, 1)


@functools.cache
def grid_table(type_name: str) -> torch.Tensor:
    """The lattice codebook of an i-quant type, (entries, 4 or 8) fp32 positive values (llama.cpp's iq2xxs_grid,
    iq2xs_grid, iq2s_grid, iq3xxs_grid, iq3s_grid), as the `gguf` package holds it."""
    quant = getattr(gguf.quants, type_name)
    quant.init_grid()
    return torch.from_numpy(quant.grid.reshape(quant.grid_shape).copy())


@functools.cache
def sign_table(bits: int = 7) -> torch.Tensor:
    """(2^bits, 8) ±1: a code's bits are the signs of the first `bits` weights of a run of 8 (1: minus). With 7
    (llama.cpp's ksigns), the 8th sign makes the count of minus signs even."""
    minus = (torch.arange(2**bits)[:, None] >> torch.arange(bits)) & 1
    if bits == 7:
        minus = torch.cat([minus, minus.sum(1, keepdim=True) % 2], 1)
    return 1 - 2 * minus.float()


def _nibbles(count: int, width: int, offset: int) -> Part:
    return interleaved(count, width, 4, offset)


K = 256  # the k- and i-quants' super-block
TYPES: dict[str, BlockType] = {t.name: t for t in [
    BlockType("Q4_0", 32, 32, 18, {"d": 0}, {"q": [_nibbles(32, 16, 2)]}, tuple(range(-8, 8))),
    BlockType("Q4_1", 32, 32, 20, {"d": 0, "m": 2}, {"q": [_nibbles(32, 16, 4)]}, tuple(range(16)), minimum="+m"),
    BlockType("Q5_0", 32, 32, 22, {"d": 0}, {"q": [_nibbles(32, 16, 6), interleaved(32, 1, 1, 2, 4)]},
              tuple(range(-16, 16))),
    BlockType("Q5_1", 32, 32, 24, {"d": 0, "m": 2}, {"q": [_nibbles(32, 16, 8), interleaved(32, 1, 1, 4, 4)]},
              tuple(range(32)), minimum="+m"),
    BlockType("Q8_0", 32, 32, 34, {"d": 0}, {"q": [interleaved(32, 32, 8, 2)]},
              tuple(range(128)) + tuple(range(-128, 0))),  # int8 codes
    BlockType("Q2_K", K, 16, 84, {"d": 80, "dmin": 82},
              {"q": [interleaved(K, 32, 2, 16)], "scales": [interleaved(16, 16, 4, 0)],
               "mins": [Part(tuple(range(16)), (4,) * 16, (4,) * 16, (0,) * 16)]},
              tuple(range(4)), "unsigned", "-dmin"),
    BlockType("Q3_K", K, 16, 110, {"d": 108},
              {"q": [interleaved(K, 32, 2, 32), interleaved(K, 32, 1, 0, 2)],
               "scales": [interleaved(16, 8, 4, 96), interleaved(16, 4, 2, 104, 4)]},
              tuple(range(-4, 4)), "signed"),
    BlockType("Q4_K", K, 32, 144, {"d": 0, "dmin": 2},
              {"q": [_nibbles(K, 32, 16)], "scales": k_scale_codes(False),
               "mins": k_scale_codes(True)},
              tuple(range(16)), "unsigned", "-dmin"),
    BlockType("Q5_K", K, 32, 176, {"d": 0, "dmin": 2},
              {"q": [_nibbles(K, 32, 48), interleaved(K, 32, 1, 16, 4)], "scales": k_scale_codes(False),
               "mins": k_scale_codes(True)},
              tuple(range(32)), "unsigned", "-dmin"),
    BlockType("Q6_K", K, 16, 210, {"d": 208},
              {"q": [_nibbles(K, 64, 0), interleaved(K, 32, 2, 128, 4)], "scales": [interleaved(16, 16, 8, 192)]},
              tuple(range(-32, 32)), "signed"),
    BlockType("IQ2_XS", K, 16, 74, {"d": 0},
              {"grid": bits_at([16 + 16 * e for e in range(32)], 9),
               "signs": bits_at([25 + 16 * e for e in range(32)], 7),
               "scales": bits_at([66 * 8 + 4 * e for e in range(16)], 4)},
              (8, 25, 43), "odd", scale_factor=0.25),
    BlockType("IQ2_XXS", K, 32, 66, {"d": 0},
              {"grid": bits_at([16 + 64 * (e // 4) + 8 * (e % 4) for e in range(32)], 8),
               "signs": bits_at([16 + 64 * (e // 4) + 32 + 7 * (e % 4) for e in range(32)], 7),
               "scales": bits_at([16 + 64 * s + 60 for s in range(8)], 4)},
              (8, 25, 43), "odd", scale_factor=0.25),
    BlockType("IQ2_S", K, 16, 82, {"d": 0},
              {"grid": [interleaved(32, 32, 8, 2), interleaved(32, 1, 2, 66, 8)],
               "signs": [interleaved(32, 32, 8, 34)], "scales": [interleaved(16, 1, 4, 74)]},
              (8, 25, 43), "odd", scale_factor=0.25),
    BlockType("IQ3_S", K, 32, 110, {"d": 0},
              {"grid": [interleaved(64, 64, 8, 2), interleaved(64, 1, 1, 66, 8)],
               "signs": [interleaved(32, 32, 8, 74)], "scales": [interleaved(8, 1, 4, 106)]},
              (1, 3, 5, 7, 9, 11, 13, 15), "odd", scale_factor=2.0),
    BlockType("IQ3_XXS", K, 32, 98, {"d": 0},
              {"grid": bits_at([16 + 8 * e for e in range(64)], 8),
               "signs": bits_at([(66 + 4 * (e // 4)) * 8 + 7 * (e % 4) for e in range(32)], 7),
               "scales": bits_at([(66 + 4 * e) * 8 + 28 for e in range(8)], 4)},
              (4, 12, 20, 28, 36, 44, 52, 62), "odd", scale_factor=0.5),
    BlockType("IQ4_NL", 32, 32, 18, {"d": 0}, {"q": [_nibbles(32, 16, 2)]}, IQ4_LEVELS),
    BlockType("IQ4_XS", K, 32, 136, {"d": 0},
              {"q": [_nibbles(K, 16, 8)], "scales": [interleaved(8, 1, 4, 4), interleaved(8, 1, 2, 2, 4)]},
              IQ4_LEVELS, "signed"),
]}


@register_format
class GGMLFormat(WeightFormat):
    """w = the GGML blocks of each row, decoded (see the module).

    tensors: `blocks` uint8 (O, I / block · size): each row's blocks in llama.cpp's layout, as a GGUF stores them.
    spec: type (a name in TYPES), shape [O, I]."""

    name = "ggml"

    def dequantize(self, tensors, spec):
        kind = TYPES[spec["type"]]
        out_features, in_features = spec["shape"]

        def decode(rows):
            blocks = rows["blocks"].reshape(-1, kind.size)
            return kind.decode(blocks).reshape(-1, in_features)

        return decode_by_rows(decode, tensors, [out_features, in_features])
