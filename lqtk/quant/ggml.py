"""GPTQ on llama.cpp's own grids: the GGML tensor types of GGUF files (`lqtk.formats.ggml`), calibrated.

llama.cpp's quantizer chooses each sub-block's scale (and minimum) by a weighted search, rounds every weight to the
nearest level, and quantizes the sub-block scales to the type's integer scale codes: its weights are an importance
matrix (diag of XᵀX) times a term in the weight's own size. Here the same choices are made for the least
Hessian-weighted error, and the weights are rounded one column at a time with GPTQ's error feedback
(`ErrorFeedback`), so that each rounding error is compensated by the columns still ahead. A group of GPTQ is one
block of the type (32 weights, or a 256-weight super-block whose sub-block scales share an fp16 d): its scales are
fixed when the walk first reaches one of its columns, from the weights as updated so far, and stored exactly as the
type stores them, so that the error feedback sees the decoded values, not float ones.

The 2-3 bit i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) store each run of 8 (or 4) weights as an entry of a fixed
lattice codebook, signs apart (IQ2_XXS, IQ2_XS, IQ3_XXS: an even count of minus signs per run of 8). Their walk rounds 8
columns at a time (QuIP#'s block LDLQ, `ErrorFeedback.vector_size`): each row's 8 weights take the entry and signs of
least error weighted by the columns' LDL diagonal, found by trying every entry (a few hundred: exhaustive, no beam
needed), the parity rule included exactly.
"""

import functools
import warnings
from dataclasses import dataclass

import torch

from lqtk.errors import LqtkError
from lqtk.formats import QuantizedWeight
from lqtk.formats.ggml import TYPES, BlockType, GGMLFormat, grid_table
from lqtk.quant.gptq import ErrorFeedback

SHAPE_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL",
                  "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
                  "IQ2_S": "IQ4_NL"}
"""The 32-wide type a tensor gets when its rows are not a multiple of 256 (llama.cpp's quantizer's choice)."""


@functools.cache
def level_table(type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels the search may use, ascending, and the code of each. Q8_0 leaves out −128: llama.cpp's AVX2 dot
    product takes |q| of a signed byte, and |−128| does not fit (its own quantizer never writes it)."""
    levels = TYPES[type_name].levels
    usable = sorted(set(levels) - ({-128} if type_name == "Q8_0" else set()))
    return torch.tensor(usable, dtype=torch.float32), torch.tensor([levels.index(level) for level in usable])


def nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending `levels` for each entry of x (consecutive integers: by rounding)."""
    if levels[-1] - levels[0] == len(levels) - 1:
        return (x - levels[0]).round().clamp(0, len(levels) - 1).long()
    return torch.searchsorted((levels[1:] + levels[:-1]) / 2, x.contiguous())


def fit_scale(x: torch.Tensor, weight: torch.Tensor, levels: torch.Tensor, steps: int = 9) -> torch.Tensor:
    """Per row of x (R, n): the scale s minimizing Σ weight (x − s·level)², each x at its nearest level. Candidates
    map the row's largest |x| to either end of the table, moved by up to ±`steps` tenths of a level step (llama.cpp's
    `make_qx_quants`); for each, the codes are rounded and s re-fitted by weighted least squares. All candidates are
    tried at once, as a leading dim."""
    top = x.gather(1, x.abs().argmax(1, keepdim=True))
    step = 0.1 * float((levels[1:] - levels[:-1]).min())
    ends = [end for end in {float(levels[0]), float(levels[-1])} if end != 0]
    denominators = torch.tensor([end + step * t for end in ends for t in range(-steps, steps + 1)])
    scale = top / denominators[:, None, None]  # (C, R, 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    level = levels[nearest(x / scale, levels)]
    sumlx, suml2 = (weight * x * level).sum(2), (weight * level * level).sum(2)
    gain = torch.where(suml2 > 0, sumlx * sumlx / suml2.clamp(min=1e-30), 0)  # Σw x² − the least error
    best = gain.argmax(0, keepdim=True)
    return (sumlx.gather(0, best) / suml2.gather(0, best).clamp(min=1e-30))[0]


def fit_scale_min(x: torch.Tensor, weight: torch.Tensor, top: int, nonpositive: bool, steps: int = 20):
    """Per row of x (R, n): scale s and offset m minimizing Σ weight (x − s·l − m)², l = clamp(round((x − m)/s), 0,
    top); m <= 0 if `nonpositive` (the k-quants store −m). Candidates stretch the row's range over top − 1 ... top + 1
    levels (llama.cpp's `make_qkx2_quants`), each re-fitted by weighted least squares for s and m together."""
    low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    if nonpositive:
        low = low.clamp(max=0)
    span = (high - low).clamp(min=1e-30)
    stretch = torch.tensor([top - 1 + 2 * t / steps for t in range(steps + 1)])[:, None, None]
    level = (stretch / span * (x - low)).round().clamp(0, top)  # (C, R, n)
    sw, sx = weight.sum(1), (weight * x).sum(1)
    sl, sl2, sxl = (weight * level).sum(2), (weight * level * level).sum(2), (weight * x * level).sum(2)
    det = sw * sl2 - sl * sl
    ok = det > 0
    scale = torch.where(ok, (sw * sxl - sx * sl) / det.clamp(min=1e-30), (span / top)[:, 0])
    offset = torch.where(ok, (sl2 * sx - sl * sxl) / det.clamp(min=1e-30), low[:, 0])
    if nonpositive:
        clipped = offset > 0
        offset = torch.where(clipped, 0, offset)
        scale = torch.where(clipped, sxl / sl2.clamp(min=1e-30), scale)
    err = (weight * (scale[..., None] * level + offset[..., None] - x).square()).sum(2)
    best = torch.where(ok, err, float("inf")).argmin(0, keepdim=True)
    return scale.gather(0, best)[0], offset.gather(0, best)[0]


def level_key(index: torch.Tensor, type_name: str) -> torch.Tensor:
    """Runs of level indices (..., dim) read as numbers in base len(levels): one key per run."""
    return (index * len(TYPES[type_name].levels) ** torch.arange(index.shape[-1])).sum(-1)


@functools.cache
def grid_levels(type_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An i-quant codebook as indices into the type's levels, (entries, dim), and the inverse: the entry of each
    run of level indices by its `level_key`, −1 where the codebook has none."""
    levels = torch.tensor(TYPES[type_name].levels, dtype=torch.float32)
    index = torch.searchsorted(levels, grid_table(type_name).contiguous())
    entry = torch.full((len(levels) ** index.shape[1],), -1, dtype=torch.long)
    entry[level_key(index, type_name)] = torch.arange(len(index))
    return index, entry


def even_signs(x: torch.Tensor, weight: torch.Tensor, parity: bool = True) -> torch.Tensor:
    """±1 (N, 8k): the signs of x (+ for 0) per run of 8; with `parity`, the sign of least weight·x² is flipped in
    each run that has an odd count of minus signs (the codebooks' parity rule, llama.cpp's choice before its
    search)."""
    sign = torch.where(x < 0, -1.0, 1.0).reshape(len(x), -1, 8)
    odd = ((sign < 0).sum(2, keepdim=True) % 2 == 1) & parity
    cheapest = (weight * x * x).reshape(sign.shape).argmin(2, keepdim=True)
    flip = odd & (torch.arange(8) == cheapest)
    return torch.where(flip, -sign, sign).reshape(x.shape)


def entry_costs(magnitude: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, grid: torch.Tensor):
    """(Σ weight (magnitude − scale·g)² − Σ weight·magnitude²) / scale, for each vector (N, dim) and codebook entry
    g: (N, G), in one matmul (the search's cost: this is most of it)."""
    return torch.cat([scale[:, None] * weight, -2 * weight * magnitude], 1) @ torch.cat([grid.square(), grid], 1).T


def fit_vector_scale(x: torch.Tensor, weight: torch.Tensor, type_name: str, steps: int = 9):
    """Per row of x (R, n): the scale s minimizing Σ weight (x − s·sign·g)², each vector of x at its nearest codebook
    entry g, the signs those of x (`even_signs`, with the type's parity rule if it has one). Candidates map the row's
    largest |x| to the codebook's largest value moved by up to ±`steps` tenths of its smallest step (llama.cpp's
    `quantize_row_iq2_xs`); for each, the entries are found and s re-fitted by weighted least squares. Returns s and Σ
    weight·g² (what its error costs)."""
    grid = grid_table(type_name)
    levels = torch.tensor(TYPES[type_name].levels, dtype=torch.float32)
    rows, dim = len(x), grid.shape[1]
    # >= 0 but where a sign was flipped
    target = (x * even_signs(x, weight, TYPES[type_name].even_signs)).reshape(-1, dim)
    vector_weight = weight.reshape(-1, dim)
    top = x.abs().amax(1)
    step = 0.1 * float((levels[1:] - levels[:-1]).min())
    best_gain, scale, cost = torch.full((rows,), -1.0), torch.zeros(rows), torch.zeros(rows)
    for t in range(-steps, steps + 1):
        candidate = (top / (levels[-1] + step * t)).repeat_interleave(x.shape[1] // dim)
        g = grid[entry_costs(target, vector_weight, candidate, grid).argmin(1)]
        sumlx = (vector_weight * target * g).reshape(rows, -1).sum(1)
        suml2 = (vector_weight * g * g).reshape(rows, -1).sum(1).clamp(min=1e-30)
        gain = sumlx.clamp(min=0) ** 2 / suml2
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        scale = torch.where(better, sumlx.clamp(min=0) / suml2, scale)
        cost = torch.where(better, suml2, cost)
    return scale, cost


@dataclass
class GGML(ErrorFeedback):
    """GPTQ (LDLQ without act-order) on a GGML type's grid, with the scales chosen for the least Hessian-weighted
    error and stored as the type stores them: writes the `ggml` format, a GGUF's tensor bytes."""

    method = "ggml"
    format = GGMLFormat.name

    type: str = "Q4_K"
    """The GGML type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32), Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256),
    IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S (lattice codebooks, 256), IQ4_NL (32), IQ4_XS (256). A weight whose rows are
    not a multiple of 256 takes llama.cpp's 32-wide fallback (Q4_K → Q5_0, Q2_K/Q3_K → Q4_0, IQ2_XS → IQ4_NL, ...), with
    a warning."""

    def __post_init__(self):
        if self.type not in TYPES:
            raise LqtkError(f"unknown GGML type {self.type!r}: choose one of {', '.join(TYPES)}")
        if self.block_size % self.vector_size:
            raise LqtkError(f"{self.type} rounds {self.vector_size} columns at a time: block_size must be a multiple "
                            f"of {self.vector_size}, not {self.block_size}")

    @property
    def kind(self) -> BlockType:
        return TYPES[self.type]

    @property
    def group_size(self) -> int:
        return self.kind.block

    @property
    def vector_size(self) -> int:
        return 8 if self.kind.vectors else 1

    @property
    def bits(self) -> int:
        """Bits per weight code (4 for Q4_K, IQ4_NL; the scales come on top)."""
        return (len(self.kind.levels) - 1).bit_length()

    def check_fits(self, shape):
        if shape[1] % 32:
            raise LqtkError(f"{self.type} needs rows that are a multiple of 32 weights (GGML blocks), not {shape[1]}")

    def for_shape(self, in_features: int) -> "GGML":
        """This config, or its 32-wide fallback when the rows cannot take the type's blocks."""
        if in_features % self.kind.block == 0:
            return self
        fallback = SHAPE_FALLBACK[self.type]
        warnings.warn(f"{self.type} needs rows that are a multiple of {self.kind.block} weights; rows of "
                      f"{in_features} are quantized to {fallback} (as llama.cpp's quantizer does)")
        return type(self)(**{**self.__dict__, "type": fallback})

    def quantize_shared(self, weights, hessian, progress=None, inputs=None):
        config = self.for_shape(weights[0].shape[1])
        if config is not self:
            return config.quantize_shared(weights, hessian, progress, inputs)
        return super().quantize_shared(weights, hessian, progress, inputs)

    # the grid interface of the error-feedback walk
    def column_importance(self, hessian, inverse_cholesky):
        """diag(H): where the inputs are large (llama.cpp's importance matrix)."""
        return hessian.diagonal()

    def fit_grid(self, w, importance):
        """One block per row of `w` (O, block): the scale and offset (zero without a minimum) of each sub-block
        (O, S), as decoded from the stored fields that follow them: the fp16 fields (O,) in `BlockType.halves`'
        order, then the scale codes (O, S) and min codes, where the type has them."""
        kind = self.kind
        rows, subs = w.shape[0], kind.block // kind.sub
        x = w.reshape(rows * subs, kind.sub)
        weight = importance.float().clamp(min=0).reshape(1, subs, kind.sub).expand(rows, subs, kind.sub)
        weight = weight.reshape(rows * subs, kind.sub) + 1e-12 * importance.abs().max().clamp(min=1)  # all-zero: even
        levels, _ = level_table(kind.name)
        if kind.vectors:
            (scale, scale_weight), offset = fit_vector_scale(x, weight, kind.name), None
        elif kind.minimum is None:
            scale, offset = fit_scale(x, weight, levels), None
        else:
            scale, offset = fit_scale_min(x, weight, int(levels[-1]), kind.minimum == "-dmin")
        halves, codes = {}, {}
        if kind.scale_codes is None:  # the 32-wide types: the scale is the block's fp16 d
            halves["d"] = scale
            if offset is not None:
                halves["m"] = offset
        else:
            if not kind.vectors:  # what a scale's error costs: Σ weight·level² of its sub-block
                at_level = levels[nearest(torch.where(scale[:, None] != 0, x / scale[:, None], 0), levels)]
                scale_weight = (weight * at_level.square()).sum(1)
            halves["d"], codes["scales"] = self.quantize_scales(scale.reshape(rows, subs),
                                                                scale_weight.reshape(rows, subs))
            if offset is not None:
                halves["dmin"], codes["mins"] = self.quantize_scales(-offset.reshape(rows, subs),
                                                                     weight.sum(1).reshape(rows, subs))
        halves = {name: value.half().float() for name, value in halves.items()}
        sub_scale, sub_offset = kind.sub_scales(halves, codes)
        sub_offset = torch.zeros(rows, subs) if sub_offset is None else sub_offset
        return (sub_scale.expand(rows, subs), sub_offset.expand(rows, subs), *(halves[name] for name in kind.halves),
                *(codes[name] for name in self.scale_fields))

    @property
    def scale_fields(self) -> list[str]:
        """The type's integer fields per sub-block (scale and min codes), in its order."""
        return [name for name in self.kind.codes if name in ("scales", "mins")]

    def quantize_scales(self, scales: torch.Tensor, weight: torch.Tensor):
        """A super-block's sub-block scales (O, S) as the type stores them: an fp16 d and integer codes, d chosen by
        the same weighted search (each scale weighted by how much its error costs)."""
        bits = self.kind.code_bits["scales"]
        if self.kind.scale_codes == "odd":
            levels = (0.5 + torch.arange(2**bits, dtype=torch.float32)) * self.kind.scale_factor
            d = fit_scale(scales, weight, levels).half().float()
            return d, nearest(torch.where(d[:, None] != 0, scales / d[:, None], 0), levels)
        low = -(2 ** (bits - 1)) if self.kind.scale_codes == "signed" else 0
        levels = torch.arange(low, low + 2**bits, dtype=torch.float32)
        d = fit_scale(scales, weight, levels).half().float()
        level = torch.where(d[:, None] != 0, scales / d[:, None], 0).round().clamp(low, low + 2**bits - 1)
        code = level.long() - low if bits < 8 else level.long() & 0xFF  # 6-bit codes are offset, int8 two's complement
        return d, code

    def round_to_grid(self, column, grid, index):
        scale, offset = grid[0][:, index // self.kind.sub], grid[1][:, index // self.kind.sub]
        levels, codes = level_table(self.kind.name)
        target = column if self.kind.minimum is None else column - offset
        pick = nearest(torch.where(scale != 0, target / scale, 0), levels)
        value = scale * levels[pick]
        return codes[pick], value if self.kind.minimum is None else value + offset

    def round_vector_to_grid(self, columns, grid, index, weight):
        """Columns (8, O) from `index` of a block, with their error weights (8,): each row's 8 weights as the
        codebook entries and signs of least weighted error under the stored sub-block scale. Every entry is tried;
        where x has an odd count of minus signs, one sign must flip: the cheapest flip (4·w·|x|·g·s) is added to each
        entry's cost, and for two 4-wide entries (IQ3_XXS) the half where flipping costs least takes it (IQ2_S and
        IQ3_S have no parity rule: every sign is x's). Returns
        codes (level index · 2 + minus) and the decoded values, (8, O) each."""
        scale = grid[0][:, index // self.kind.sub]
        table = grid_table(self.kind.name)
        rows, dim = columns.shape[1], table.shape[1]
        halves = 8 // dim
        x = columns.T.reshape(rows, halves, dim)
        magnitude, negative, weight = x.abs(), x < 0, weight.reshape(halves, dim)
        plain = torch.stack([entry_costs(magnitude[:, h], weight[h].expand(rows, dim), scale, table)
                             for h in range(halves)], 1)  # (O, halves, G)
        best_plain, entry = plain.min(2)
        odd = (negative.reshape(rows, 8).sum(1) % 2 == 1) & self.kind.even_signs
        # the rows that must flip a sign: per unit of scale, as `plain`
        flip_cost = 4 * (weight[:, None] * table)[None] * magnitude[odd][:, :, None]
        best_flipped, flipped_entry = (plain[odd] + flip_cost.amin(3)).min(2)
        flip_half = torch.zeros(rows, halves, dtype=torch.bool)
        flip_half[odd] = torch.arange(halves) == (best_flipped - best_plain[odd]).argmin(1, keepdim=True)
        entry[odd] = torch.where(flip_half[odd], flipped_entry, entry[odd])
        g = table[entry]  # (O, halves, dim)
        flip_at = flip_half[..., None] & (torch.arange(dim) == (weight * magnitude * g).argmin(2, keepdim=True))
        minus = (negative ^ flip_at).reshape(rows, 8)
        value = scale[:, None] * g.reshape(rows, 8) * torch.where(minus, -1.0, 1.0)
        level = grid_levels(self.kind.name)[0][entry].reshape(rows, 8)
        return (2 * level + minus).T.to(torch.uint8), value.T

    def vector_fields(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-weight codes of whole blocks (N, block) -> the `grid` entry of each vector and the `signs` code of each
        run of 8 (its first `sign_bits` minus bits)."""
        index, entry = grid_levels(self.kind.name)
        level, minus = (codes >> 1).long(), (codes & 1).long()
        grid = entry[level_key(level.reshape(len(codes), -1, index.shape[1]), self.kind.name)]
        bits = self.kind.sign_bits
        signs = (minus.reshape(len(codes), -1, 8)[..., :bits] << torch.arange(bits)).sum(2)
        return {"grid": grid, "signs": signs}

    def pack_grids(self, method, codes, grids):
        kind = self.kind
        rows, columns = codes.shape
        names = [*kind.halves, *self.scale_fields]
        fields = {name: torch.stack([grid[2 + i] for grid in grids], 1) for i, name in enumerate(names)}
        blocks = rows * len(grids)  # row-major: a row's blocks in order
        weight_codes = codes.reshape(blocks, kind.block)
        packed = kind.pack({name: fields[name].reshape(blocks) for name in kind.halves},
                           {**(self.vector_fields(weight_codes) if kind.vectors else {"q": weight_codes}),
                            **{name: fields[name].reshape(blocks, -1) for name in self.scale_fields}})
        return QuantizedWeight(method, GGMLFormat.name, {"type": kind.name, "shape": [rows, columns]},
                               {"blocks": packed.reshape(rows, -1)})
