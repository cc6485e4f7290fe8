"""Triton kernels for lqtk's quantized formats: each reads the tensors an export stores, as they are stored.

- `affine_linear`: y = x Ŵᵀ for the `affine` format (2/3/4/8-bit codes packed densely, fp16 group scales, packed
  zero points or 2^(b-1)); `aqlm_linear`: the `aqlm` format (M codebooks of 2^B vectors of g); `lut_linear`: the
  `lut` format (a table of 2^b levels per row). One kernel: tiles of x times tiles of Ŵ decoded in registers,
  the product accumulated in fp32 (tensor cores for fp16/bf16 activations).
- `walsh_hadamard`, `rotate`: the orthonormal Walsh–Hadamard transform and QuIP's randomized (H_a ⊗ Q_m)
  transform, as Kronecker factors applied one at a time, each a small matmul along one axis of the row.

The plain-torch references are the formats' own `dequantize` + `F.linear` and `lqtk.formats.incoherent`.
Under `TRITON_INTERPRET=1` (CPU tests) the wrappers compute in fp32 with large blocks: the interpreter gets bf16
wrong, and its time grows with the number of programs. Set the variable before this module is imported.
"""

import math
import os

import torch
import triton
import triton.language as tl

from lqtk.formats.incoherent import hadamard_factors, random_factors

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_HADAMARD_FACTOR = 128
"""Largest Hadamard block one pass multiplies by: a (block × block) operand of a single tl.dot on the GPU."""


def supports(format_name: str, spec: dict) -> bool:
    """Whether a kernel here computes the matmul of a weight stored in `format_name` with `spec`."""
    if format_name == "affine":
        return spec["bits"] in (2, 3, 4, 8) and (spec["group_size"] is None or spec["group_size"] >= 1)
    if format_name == "aqlm":
        return (1 <= spec["num_codebooks"] <= 4 and 1 <= spec["nbits_per_codebook"] <= 16
                and spec["shape"][1] % spec["in_group_size"] == 0)
    if format_name == "lut":
        return spec["bits"] in (2, 3, 4, 8)
    return False


def available() -> bool:
    """Whether the compiled kernels can run (a CUDA device; the interpreter is for tests)."""
    return torch.cuda.is_available()


def linear(format_name: str, x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict,
           cache=None) -> torch.Tensor:
    """x (..., I) · Ŵᵀ -> (..., O) in x's dtype by the kernel of `format_name` (see `supports`); no bias. The
    kernels read the stored tensors as they are: nothing to keep in the layer's `cache`."""
    if not supports(format_name, spec):
        raise ValueError(f"no Triton kernel for the {format_name!r} format with {spec}")
    return {"affine": affine_linear, "aqlm": aqlm_linear, "lut": lut_linear}[format_name](x, tensors, spec)


# --- shared pieces ----------------------------------------------------------------------------------------------
@triton.jit
def _unpack(row_ptr, index, mask, BITS: tl.constexpr):
    """Values number `index` of the int32 rows at `row_ptr`, packed by `pack_bits`: BITS bits each, LSB first,
    densely (when BITS does not divide 32 a value may straddle two words)."""
    bit = index * BITS
    shift = (bit & 31).to(tl.uint32)
    value = tl.load(row_ptr + (bit >> 5), mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:
        # the high bits of a straddling value are the low bits of the next word (which pack_bits always stores)
        straddles = mask & (shift > 32 - BITS)
        high = tl.load(row_ptr + (bit >> 5) + 1, mask=straddles, other=0).to(tl.uint32, bitcast=True)
        value |= high << ((32 - shift) & 31)  # & 31: never a shift by 32, which is undefined (high is 0 there)
    return (value & ((1 << BITS) - 1)).to(tl.int32)


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """x as contiguous rows (R, n) of the dtype the kernels compute in, and the dtype to return."""
    rows = x.reshape(-1, x.shape[-1])
    return (rows.float() if _INTERPRET else rows).contiguous(), x.dtype


def _precision(x: torch.Tensor) -> str:
    """tl.dot's input precision: exact fp32 products for fp32 inputs (not TF32); fp16/bf16 ignore it."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _matmul_blocks(rows: int, out_features: int, in_features: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the decode-and-multiply kernels. On the GPU: tl.dot's smallest M
    (16) for decoding (GEMV) batches, with narrow output tiles so that a 4096-wide layer still has 128 programs;
    64 x 128 tiles for prefill. Under the interpreter: as few programs as possible."""
    if _INTERPRET:
        return (max(16, min(64, triton.next_power_of_2(rows))), min(256, triton.next_power_of_2(out_features)),
                min(256, triton.next_power_of_2(in_features)), 4)
    if rows <= 16:
        return 16, 32, 128, 4
    if rows <= 64:
        return 64, 64, 64, 4
    return 64, 128, 64, 8


def _matmul_grid(rows, out_features, block_m, block_n):
    return triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n)


# --- affine: integer codes, group scales and zero points -------------------------------------------------------
@triton.jit
def _affine_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, words, groups, zero_words,
                   BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, N) = x (M, K) · Ŵᵀ,  Ŵ[n, k] = (q[n, k] − zero[n, g]) · scale[n, g],  g = k // GROUP_SIZE."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        # Stage 1: the (BLOCK_K, BLOCK_N) tile of codes and the group parameters of each of its weights
        mask = (rk[:, None] < K) & (rn[None, :] < N)
        q = _unpack(qweight_ptr + rn[None, :] * words, rk[:, None], mask, BITS)
        group = rk[:, None] // GROUP_SIZE  # the last group may be shorter: K need not be a multiple
        scale = tl.load(scales_ptr + rn[None, :] * groups + group, mask=mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            zero = 1 << (BITS - 1)
        else:
            zero = _unpack(zeros_ptr + rn[None, :] * zero_words, group, mask, BITS)
        # Stage 2: decode in fp32, multiply in x's dtype, accumulate in fp32
        w = ((q - zero).to(tl.float32) * scale).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def affine_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
    """x (..., I) · Ŵᵀ -> (..., O) in x's dtype, for an `affine` weight (no bias: the caller adds it)."""
    out_features, in_features = spec["shape"]
    rows, dtype = _flat(x)
    qweight, scales = tensors["qweight"].contiguous(), tensors["scales"].contiguous()
    zeros = tensors["zeros"].contiguous() if "zeros" in tensors else qweight  # not read when symmetric
    out = torch.empty(rows.shape[0], out_features, dtype=rows.dtype, device=rows.device)
    block_m, block_n, block_k, warps = _matmul_blocks(rows.shape[0], out_features, in_features)
    _affine_kernel[_matmul_grid(rows.shape[0], out_features, block_m, block_n)](
        rows, qweight, scales, zeros, out, rows.shape[0], out_features, in_features, qweight.shape[1],
        scales.shape[1], zeros.shape[1], BITS=spec["bits"], GROUP_SIZE=spec["group_size"] or in_features,
        SYMMETRIC="zeros" not in tensors, PRECISION=_precision(rows),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out.to(dtype).view(*x.shape[:-1], out_features)


# --- aqlm: sums of codewords --------------------------------------------------------------------------------------
@triton.jit
def _aqlm_kernel(x_ptr, codes_ptr, codebooks_ptr, scales_ptr, out_ptr, M, N, K, words,
                 NUM_CODEBOOKS: tl.constexpr, CODE_BITS: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, N) = scale[n] · x (M, K) · Ŵᵀ,  Ŵ[n, j·g + d] = Σ_m codebooks[m, code[n, j, m], d].

    Codebooks are gathered from global memory: 2x8 ones (8 KB) stay in L1, 1x16 ones (1 MB) in L2."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        mask = (rk[:, None] < K) & (rn[None, :] < N)
        group, dim = rk[:, None] // GROUP, rk[:, None] % GROUP
        w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m in tl.static_range(NUM_CODEBOOKS):
            # codes are stored (n, j, m)-major: code (j, m) of row n is value j·M + m of the row
            code = _unpack(codes_ptr + rn[None, :] * words, group * NUM_CODEBOOKS + m, mask, CODE_BITS)
            word = (m << CODE_BITS) + code  # codeword index in the (M·2^B, g) table
            w += tl.load(codebooks_ptr + word * GROUP + dim, mask=mask, other=0.0).to(tl.float32)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    scale = tl.load(scales_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)  # one per row: applied once, at the end
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], (acc * scale[None, :]).to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def aqlm_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
    """x (..., I) · Ŵᵀ -> (..., O) in x's dtype, for an `aqlm` weight (no bias: the caller adds it)."""
    out_features, in_features = spec["shape"]
    rows, dtype = _flat(x)
    codes, codebooks = tensors["codes"].contiguous(), tensors["codebooks"].contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=rows.dtype, device=rows.device)
    block_m, block_n, block_k, warps = _matmul_blocks(rows.shape[0], out_features, in_features)
    _aqlm_kernel[_matmul_grid(rows.shape[0], out_features, block_m, block_n)](
        rows, codes, codebooks, tensors["scales"].contiguous(), out, rows.shape[0], out_features, in_features,
        codes.shape[1], NUM_CODEBOOKS=spec["num_codebooks"], CODE_BITS=spec["nbits_per_codebook"],
        GROUP=spec["in_group_size"], PRECISION=_precision(rows),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out.to(dtype).view(*x.shape[:-1], out_features)


# --- lut: a table of levels per row -------------------------------------------------------------------------------
@triton.jit
def _lut_kernel(x_ptr, qweight_ptr, levels_ptr, out_ptr, M, N, K, words, BITS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, N) = x (M, K) · Ŵᵀ,  Ŵ[n, k] = levels[n, q[n, k]] (a row's 2^BITS levels stay in L1)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        mask = (rk[:, None] < K) & (rn[None, :] < N)
        q = _unpack(qweight_ptr + rn[None, :] * words, rk[:, None], mask, BITS)
        w = tl.load(levels_ptr + (rn[None, :] << BITS) + q, mask=mask, other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def lut_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
    """x (..., I) · Ŵᵀ -> (..., O) in x's dtype, for a `lut` weight (no bias: the caller adds it)."""
    out_features, in_features = spec["shape"]
    rows, dtype = _flat(x)
    qweight = tensors["qweight"].contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=rows.dtype, device=rows.device)
    block_m, block_n, block_k, warps = _matmul_blocks(rows.shape[0], out_features, in_features)
    _lut_kernel[_matmul_grid(rows.shape[0], out_features, block_m, block_n)](
        rows, qweight, tensors["levels"].contiguous(), out, rows.shape[0], out_features, in_features,
        qweight.shape[1], BITS=spec["bits"], PRECISION=_precision(rows),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out.to(dtype).view(*x.shape[:-1], out_features)


# --- Walsh–Hadamard and randomized Hadamard transforms --------------------------------------------------------
@triton.jit
def _axis_matmul_kernel(x_ptr, out_ptr, matrix_ptr, signs_ptr, P, S, C, N, scale,
                        HADAMARD: tl.constexpr, SIGNS_IN: tl.constexpr, SIGNS_OUT: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """One Kronecker factor: each row (length N) of x viewed as (N / (S·C), S, C), and the middle axis multiplied
    by an (S, S) matrix A times `scale`: the Hadamard matrix (HADAMARD, S a power of two) or `matrix_ptr`.

    The P = rows·N / S vectors along that axis are the rows of a (P, S) matrix X whose vector p starts at
    (p // C)·S·C + p % C with stride C; the program computes its BLOCK_P vectors' outputs Y[:, j-block] = X Aᵀ.
    Optionally the input (SIGNS_IN) or output (SIGNS_OUT) is multiplied by signs (N,) along the row."""
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    rj = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    base = (rp // C) * (S * C) + rp % C  # (BLOCK_P,) first element of each vector
    acc = tl.zeros((BLOCK_P, BLOCK_S), dtype=tl.float32)
    for i0 in range(0, S, BLOCK_S):
        ri = i0 + tl.arange(0, BLOCK_S)
        offsets = base[:, None] + ri[None, :] * C
        mask = (rp[:, None] < P) & (ri[None, :] < S)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if SIGNS_IN:
            x *= tl.load(signs_ptr + offsets % N, mask=mask, other=0.0)
        # Aᵀ[i, j] = A[j, i]: the Hadamard entry is (−1)^popcount(i & j) (Sylvester order, that of the butterflies)
        if HADAMARD:
            parity = ri[:, None] & rj[None, :]
            parity ^= parity >> 8
            parity ^= parity >> 4
            parity ^= parity >> 2
            parity ^= parity >> 1
            a = tl.where((ri[:, None] < S) & (rj[None, :] < S), 1.0 - 2.0 * (parity & 1).to(tl.float32), 0.0)
        else:
            a = tl.load(matrix_ptr + rj[None, :] * S + ri[:, None], mask=(ri[:, None] < S) & (rj[None, :] < S),
                        other=0.0)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    offsets = base[:, None] + rj[None, :] * C
    mask = (rp[:, None] < P) & (rj[None, :] < S)
    y = acc * scale
    if SIGNS_OUT:
        y *= tl.load(signs_ptr + offsets % N, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def _axis_matmul(x, out, size, stride, matrix=None, signs=None, signs_out=False, precision="ieee"):
    """out = x with the axis of `size` elements at `stride` of each row multiplied by `matrix` (None: the
    orthonormal Hadamard matrix H_size / √size), signs applied before (or after, `signs_out`) when given."""
    vectors = x.numel() // size
    block_s = max(16, min(triton.next_power_of_2(size), 256 if _INTERPRET else 64))
    block_p = 1024 if _INTERPRET else 64
    grid = (triton.cdiv(vectors, block_p), triton.cdiv(size, block_s))
    _axis_matmul_kernel[grid](
        x, out, matrix if matrix is not None else x, signs if signs is not None else x, vectors, size, stride,
        x.shape[-1], 1 / math.sqrt(size) if matrix is None else 1.0, HADAMARD=matrix is None,
        SIGNS_IN=signs is not None and not signs_out, SIGNS_OUT=signs is not None and signs_out,
        PRECISION=precision, BLOCK_P=block_p, BLOCK_S=block_s, num_warps=4)
    return out


def _hadamard_passes(x, out_dtype, signs=None, signs_out=False, inner=1):
    """The transform H_a ⊗ I_inner of rows x (R, a·inner), H_a orthonormal, as passes of Hadamard factors of at
    most 128 (H_a = H_a1 ⊗ H_a2 ⊗ …: each pass multiplies one axis). Intermediates are fp32."""
    n, precision = x.shape[-1], _precision(x)
    bits = (n // inner).bit_length() - 1
    passes = max(1, math.ceil(bits / int(math.log2(_MAX_HADAMARD_FACTOR))))
    factors = [bits // passes + (i < bits % passes) for i in range(passes)]  # near-equal powers of two
    stride = n
    for i, factor in enumerate(factors):
        stride //= 2**factor
        last = i == len(factors) - 1
        out = torch.empty_like(x, dtype=out_dtype if last else torch.float32)
        x = _axis_matmul(x, out, 2**factor, stride, signs=signs if (last if signs_out else i == 0) else None,
                         signs_out=signs_out, precision=precision)
    return x


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of x (..., n) along its last dim, n a power of two (at most 128^3
    in three passes, any larger in more): `lqtk.formats.incoherent.walsh_hadamard(x, -1)`, in x's dtype, computed
    in fp32."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"walsh_hadamard: the last dim {n} is not a power of two")
    rows, dtype = _flat(x)
    return _hadamard_passes(rows, rows.dtype).to(dtype).view(x.shape)


def rotate(x: torch.Tensor, seed: int, transpose: bool = False) -> torch.Tensor:
    """V x (or Vᵀ x) along the last dim, V = (H_a ⊗ Q_m)·diag(signs)/√a the randomized Hadamard transform of `seed`
    (as `lqtk.formats.incoherent.rotate`, fp32 in and out): signs, then H_a on the a axis of the row seen as (a, m),
    then Q_m on the m axis (reversed, with Qᵀ, for the transpose)."""
    n = x.shape[-1]
    a, m = hadamard_factors(n)
    signs, q = (t.to(x.device).contiguous() for t in random_factors(n, seed))
    if m == 1:
        signs = signs * q[0, 0]  # Q_1 = ±1: one more sign of every element
    rows = x.reshape(-1, n).float().contiguous()
    out = torch.empty_like(rows)
    if not transpose:
        if a > 1:
            rows = _hadamard_passes(rows, torch.float32, signs=signs, inner=m)
        else:
            rows = rows * signs
        return _axis_matmul(rows, out, m, 1, matrix=q).view(x.shape) if m > 1 else rows.view(x.shape)
    if m > 1:
        rows = _axis_matmul(rows, out, m, 1, matrix=q.T.contiguous())
    if a > 1:
        return _hadamard_passes(rows, torch.float32, signs=signs, signs_out=True, inner=m).view(x.shape)
    return (rows * signs).view(x.shape)
