"""CPU matmuls straight from the stored codes of the `aqlm`, `affine` and `lut` formats, for decode batch sizes
(1 to 16 rows of x), where a dense F.linear is bound by reading the fp32 weight. The kernels are a small C++
extension (csrc/cpu_kernels.cpp, AVX2 + FMA) compiled on first use into lqtk.kernels.build_directory().

    from lqtk.kernels import cpu
    if cpu.available() and cpu.supports(fmt, spec):
        y = cpu.linear(fmt, x, tensors, spec)  # == F.linear(x, FORMATS[fmt].dequantize(tensors, spec)), no bias
"""

import functools
from pathlib import Path

import torch

from lqtk.errors import LqtkError
from lqtk.kernels import build_extension

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
_build_error: str | None = None


@functools.cache
def _extension():
    """The compiled module, or None (the reason in `_build_error`)."""
    global _build_error
    module, _build_error = build_extension("lqtk_cpu_kernels", SOURCE)
    return module


def available() -> bool:
    """Whether the kernels run here (compiles them on the first call; never raises)."""
    return _extension() is not None


def build_error() -> str | None:
    """Why `available()` is False (None when it is True or was not called yet)."""
    return _build_error


def supports(format_name: str, spec: dict) -> bool:
    """Whether a kernel covers this format and spec (the machine is `available()`'s business)."""
    in_features = spec["shape"][1]
    if format_name == "aqlm":
        return (spec["nbits_per_codebook"] == 8 and spec["in_group_size"] == 8 and spec["num_codebooks"] in (1, 2, 3)
                and in_features % 8 == 0)
    if format_name == "affine":
        return spec["bits"] in (2, 3, 4) and in_features % 8 == 0 and (spec["group_size"] or 8) % 8 == 0
    if format_name == "lut":
        return spec["bits"] in (2, 3, 4) and in_features % 8 == 0
    return False


def linear(format_name: str, x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict,
           cache=None) -> torch.Tensor:
    """x (..., I) of any float dtype times the weight's transpose: (..., O) in x's dtype. Computed in fp32. The
    kernels read the stored tensors as they are: nothing to keep in the layer's `cache`."""
    kernels = _extension()
    if kernels is None:
        raise LqtkError(f"the CPU kernels are not available: {_build_error}")
    if not supports(format_name, spec):
        raise LqtkError(f"no CPU kernel for the {format_name!r} format with {spec}")
    out_features, in_features = spec["shape"]
    rows = x.reshape(-1, in_features).float()  # the kernels copy it once more, to their own row layout
    if format_name == "aqlm":
        y = kernels.aqlm_gemv(rows, tensors["codes"].contiguous(), tensors["codebooks"], tensors["scales"].contiguous(),
                              spec["num_codebooks"], spec["nbits_per_codebook"], spec["in_group_size"])
    elif format_name == "affine":
        zeros = tensors.get("zeros")
        y = kernels.affine_gemv(rows, tensors["qweight"].contiguous(), tensors["scales"].contiguous(),
                                None if zeros is None else zeros.contiguous(), spec["bits"], spec["group_size"],
                                in_features)
    else:
        y = kernels.lut_gemv(rows, tensors["qweight"].contiguous(), tensors["levels"].contiguous(), spec["bits"],
                             in_features)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
