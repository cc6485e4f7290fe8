"""W4A8 layers computed in integers on AVX2 CPUs (no VNNI): the input quantized per token to uint8 codes at run
time and multiplied by the integer weight (4-bit codes minus their zero point, times TRIP factors 2^α, |W| ≤ 64)
with exact int32 sums, the scales applied after — one C++ call per layer (csrc/int_gemm.cpp, compiled on first use
into lqtk.kernels.build_directory()). `act_quant` layers with 8-bit inputs over 4-bit affine weights run
here at any batch size (`supports`, `linear`, through lqtk.kernels.dispatch): an integer GEMM beats the fp32 one.

    from lqtk.kernels import int_gemm
    if int_gemm.available():
        packed = int_gemm.pack_w4(weight, group_size=128)      # once: W (N, K) integers
        y = int_gemm.w4a8_linear(x, packed, scales, clip)      # == F.linear(fake_quantize_tokens(x, 8, clip),
                                                               #              W · scale per weight)

The product of a uint8 code and a weight is summed in pairs in int16 by vpmaddubsw; for plain 4-bit weights
(|W| ≤ 16) four such results are added in int16 before one widening to int32, for |W| ≤ 32 two, up to 64 one (the
chain length is chosen from the weight when it is packed), so the sums never saturate. oneDNN's u8×s8 kernels, which
widen every pair sum, and run per-group scales as one call per group, reached 1.44x (per channel) and 0.45x (groups of
128) of fp32 at 2048 tokens x 4096²; here the per-token quantization, the per-group scales and the zero-point
correction are all inside the one call.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from lqtk.errors import LqtkError
from lqtk.formats import FORMATS
from lqtk.formats.packing import unpack_bits
from lqtk.kernels import build_extension

SOURCE = Path(__file__).parent / "csrc" / "int_gemm.cpp"
MAX_WEIGHT = 64
"""Largest |W|: 2 · 255 · 64 < 2^15, so one vpmaddubsw pair sum cannot saturate int16."""
GROUP_MULTIPLE = 16
"""Group sizes must be multiples of this (the kernel's step over the inputs)."""
BLOCK_TOKENS, BLOCK_OUTPUTS = 255, 32
"""Tokens × outputs per task handed to a thread (a multiple of the 3 × 16 micro-tile)."""
_build_error: str | None = None


@functools.cache
def _extension():
    """The compiled module, or None (the reason in `_build_error`)."""
    global _build_error
    module, _build_error = build_extension("lqtk_int_gemm", SOURCE)
    return module


def available() -> bool:
    """Whether the kernels run here (compiles them on the first call; never raises)."""
    return _extension() is not None


def build_error() -> str | None:
    """Why `available()` is False (None when it is True or was not called yet)."""
    return _build_error


def _kernels():
    kernels = _extension()
    if kernels is None:
        raise LqtkError(f"the integer CPU kernels are not available: {_build_error}")
    return kernels


@dataclass
class PackedW4:
    """An integer weight (N, K) packed for `w4a8_linear`."""

    panels: torch.Tensor
    """int8 (N_pad / 16, K_pad / 4, 16, 4): 16 outputs per panel, 4 consecutive inputs per output (zero padded)."""
    out_features: int
    in_features: int
    group_size: int | None
    """Inputs per scale group (None: one scale per output channel)."""
    chain: int
    """vpmaddubsw results added in int16 before widening: 4 (|W| ≤ 16), 2 (≤ 32) or 1 (≤ 64)."""
    weight_sum: torch.Tensor | None
    """Per channel: Σ_c W[o, c], int32 (N_pad,)."""
    group_sums: torch.Tensor | None
    """Per group: Σ_{c in g} W[o, c], fp32 (N_pad / 16, G, 16) (exact: below 2^24)."""

    @property
    def groups(self) -> int:
        return 1 if self.group_size is None else -(-self.in_features // self.group_size)


def pack_w4(weight_int: torch.Tensor, group_size: int | None = None) -> PackedW4:
    """Pack the integer weight W (N, K) (any integer dtype, |W| ≤ 64) once, for scales per output channel
    (group_size None) or per group of `group_size` inputs (a multiple of 16; the last group may be shorter)."""
    if weight_int.dim() != 2 or weight_int.is_floating_point():
        raise LqtkError(f"pack_w4 takes an integer weight (N, K), not {tuple(weight_int.shape)} {weight_int.dtype}")
    out_features, in_features = weight_int.shape
    max_abs = int(weight_int.abs().max()) if weight_int.numel() else 0
    if max_abs > MAX_WEIGHT:
        raise LqtkError(f"integer weights up to {max_abs} exceed ±{MAX_WEIGHT}: vpmaddubsw would saturate; use 4-bit "
                        "weights with TRIP exponents ≤ 2")
    if group_size is not None and (group_size <= 0 or group_size % GROUP_MULTIPLE):
        raise LqtkError(f"group_size={group_size}: the integer kernel needs a multiple of {GROUP_MULTIPLE}")
    if group_size is not None and group_size >= in_features:
        group_size = None  # one group: per channel
    weight = weight_int.to(torch.int8).contiguous()
    panels = _kernels().pack_weight(weight)
    n_pad = panels.shape[0] * 16
    pad = (0, 0, 0, n_pad - out_features)
    chain = 4 if max_abs <= 16 else 2 if max_abs <= 32 else 1
    if group_size is None:
        weight_sum = torch.nn.functional.pad(weight_int.long().sum(1, keepdim=True), pad).view(-1).int()
        return PackedW4(panels, out_features, in_features, None, chain, weight_sum, None)
    sums = torch.stack([g.long().sum(1) for g in weight_int.split(group_size, dim=1)], 1)
    sums = torch.nn.functional.pad(sums, pad).float()  # (N_pad, G), in the panels' order (N_pad / 16, G, 16):
    return PackedW4(panels, out_features, in_features, group_size, chain, None,
                    sums.view(n_pad // 16, 16, -1).transpose(1, 2).contiguous())


def w4a8_linear(x: torch.Tensor, packed: PackedW4, scales: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """F.linear(fake_quantize_tokens(x, 8, clip), W · scale per weight) for x (..., K) fp32 and scales (N, G) (G = 1
    or (N,) per channel), computed from uint8 codes of x and the packed integer weight: (..., N) fp32."""
    kernels = _kernels()
    if x.shape[-1] != packed.in_features:
        raise LqtkError(f"x has {x.shape[-1]} inputs; the weight has {packed.in_features}")
    scales = scales.float().reshape(packed.out_features, -1).contiguous()
    if scales.shape[1] != packed.groups:
        raise LqtkError(f"scales have {scales.shape[1]} groups; the packed weight has {packed.groups}")
    rows = x.reshape(-1, packed.in_features).float().contiguous()
    empty = torch.empty(0)
    y = kernels.w4a8_linear(rows, packed.panels, packed.out_features, packed.chain, scales,
                            packed.weight_sum if packed.weight_sum is not None else empty,
                            packed.group_sums if packed.group_sums is not None else empty,
                            packed.group_size or 0, float(clip), BLOCK_TOKENS, BLOCK_OUTPUTS)
    return y.reshape(*x.shape[:-1], packed.out_features)


def quantize_tokens(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's per-token quantization of x (T, K) fp32, as lqtk.formats.act_quant.quantize_tokens(x, 8, clip):
    (codes (T, K) uint8, scales (T, 1), zero points (T, 1))."""
    rows, inputs = x.shape
    codes, scale, zero = _kernels().quantize(x.float().contiguous(), float(clip))
    codes = codes.permute(0, 2, 1, 3).reshape(-1, codes.shape[1] * 4)  # triples interleaved by 4 inputs -> rows
    return codes[:rows, :inputs], scale[:rows, None], zero[:rows, None]


def int_matmul(codes: torch.Tensor, packed: PackedW4) -> torch.Tensor:
    """Σ_c codes[t, c] · W[o, c] in int32 (T, N), for uint8 codes (T, K): the kernel's integer sums alone."""
    rows, inputs = codes.shape
    if inputs != packed.in_features:
        raise LqtkError(f"codes have {inputs} inputs; the weight has {packed.in_features}")
    k_pad = packed.panels.shape[1] * 4
    padded = torch.zeros(-(-max(rows, 1) // 3) * 3, k_pad, dtype=torch.uint8)
    padded[:rows, :inputs] = codes
    triples = padded.view(-1, 3, k_pad // 4, 4).permute(0, 2, 1, 3).contiguous()
    out = _kernels().int_matmul(triples, packed.panels, packed.chain, BLOCK_TOKENS, BLOCK_OUTPUTS)
    return out[:rows, :packed.out_features]


def integer_weight(tensors: dict[str, torch.Tensor], spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (O, I) int, scales (O, G)) of an `act_quant` layer over an `affine` weight: the codes minus their zero
    points times the TRIP factors 2^α, and the group scales, so that the dequantized weight is W · scale / 2^α."""
    inner = spec["inner"]
    if spec["inner_format"] != "affine":
        raise LqtkError(f"integer compute needs affine weight codes, not {spec['inner_format']!r}")
    codes = unpack_bits(tensors["qweight"], inner["bits"], inner["shape"][1])
    _, zeros = FORMATS["affine"].per_weight(tensors, inner, codes)
    weight = (codes - zeros).long()
    if "input_exponents" in tensors:
        weight = weight << tensors["input_exponents"].long()
    return weight, tensors["scales"].float()


def supports(format_name: str, spec: dict) -> bool:
    """act_quant layers with 8-bit inputs over affine weights of at most 4 bits in groups of a multiple of 16 (the
    TRIP exponents, at most 2 by default, are checked when the weight is packed)."""
    if format_name != "act_quant" or spec["act_bits"] != 8 or spec["inner_format"] != "affine":
        return False
    group_size = spec["inner"]["group_size"]
    return spec["inner"]["bits"] <= 4 and (group_size is None or group_size % GROUP_MULTIPLE == 0)


def linear(format_name: str, x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict, cache=None):
    """The act_quant layer's x Ŵᵀ (no bias) in integers: Q_t(x ⊘ 2^α) times the packed W (packed once per layer
    when the layer's `cache` is given), in x's dtype; None when the weight does not fit the kernel (|W| > 64)."""
    def pack():
        weight, scales = integer_weight(tensors, spec)
        if weight.abs().max() > MAX_WEIGHT:
            return None
        return pack_w4(weight, spec["inner"]["group_size"]), scales
    packed = cache("int_gemm", pack) if cache else pack()
    if packed is None:
        return None
    scaled = x.float() / torch.exp2(tensors["input_exponents"].float()) if "input_exponents" in tensors else x
    return w4a8_linear(scaled, *packed, spec["clip"]).to(x.dtype)
