"""Which kernel runs a quantized layer's matmul: the one place the formats' `linear` asks.

A batch-1 decode step is a GEMV that reads every weight once: reading 2-4-bit codes instead of fp32 weights is the
speed-up, so a kernel that computes from the codes wins. A prefill or evaluation batch is a GEMM that reuses each
weight many times: decoding the weight once and running the dense GEMM is faster there, so weight-only kernels run
only for inputs of at most `MAX_KERNEL_TOKENS` rows (the GEMV regime) unless `LQTK_KERNELS=all`. Integer GEMMs of
activation-quantized layers (`lqtk.kernels.int_gemm`) beat the fp32 GEMM, so they run at any size.

    LQTK_KERNELS=auto   (default) as above, where a kernel exists
    LQTK_KERNELS=all    kernels for every input that one exists for (to check they compute what the dense path does)
    LQTK_KERNELS=off    never: decode, then the dense matmul (activation-quantized layers: the float path)

On a GPU the Triton kernels run (`lqtk.kernels.triton_kernels`), on the CPU the C++ ones (`lqtk.kernels.cpu`,
`lqtk.kernels.int_gemm`, built on first use; if a build fails, the dense path runs and the module's `build_error()`
says why). Gradients never go through a kernel."""

import importlib
import os

import torch

MAX_KERNEL_TOKENS = 16
MODES = ("auto", "all", "off")
GEMM_FORMATS = {"act_quant"}
"""Formats whose kernels beat decode-then-dense-matmul at any batch size."""


def mode() -> str:
    value = os.environ.get("LQTK_KERNELS", "auto")
    if value not in MODES:
        from lqtk.errors import LqtkError

        raise LqtkError(f"LQTK_KERNELS={value!r}: choose one of {', '.join(MODES)}")
    return value


def backend(device: torch.device, format_name: str):
    """The kernel module for `format_name` on `device`, or None where none runs."""
    if device.type == "cuda":
        name = "triton_kernels"
    elif device.type == "cpu":
        name = "int_gemm" if format_name in GEMM_FORMATS else "cpu"
    else:
        return None
    try:
        module = importlib.import_module(f"lqtk.kernels.{name}")
    except ImportError:  # triton absent
        return None
    return module if module.available() else None


def kernel_linear(format_name: str, x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict, cache=None):
    """x Ŵᵀ (no bias) by a kernel for the stored `tensors`, or None when none applies (the caller decodes). `cache`:
    the layer's (see `WeightFormat.linear`), for kernels that repack the weight once."""
    current = mode()
    if current == "off" or (torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad
                                                                                 for t in tensors.values()))):
        return None
    if current == "auto" and format_name not in GEMM_FORMATS and x.numel() > MAX_KERNEL_TOKENS * x.shape[-1]:
        return None
    module = backend(x.device, format_name)
    if module is None or not module.supports(format_name, spec):
        return None
    return module.linear(format_name, x, tensors, spec, cache)
