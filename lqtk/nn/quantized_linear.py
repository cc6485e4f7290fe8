"""`QuantizedLinear`: an nn.Linear replacement that holds a `QuantizedWeight` and decodes it in forward.

Floating-point tensors of the weight (scales, codebooks) are frozen nn.Parameters, so a fine-tuning phase can
train them by flipping `requires_grad`; integer codes are buffers. `quantized_matmul` runs the matmul: the one place
that chooses between a kernel reading the stored tensors and the format's decoding, with the layer's cache of the
decoded weight (a wrapping format's inner one) while its tensors are frozen."""

import torch
import torch.nn.functional as F
from torch import nn

from lqtk.errors import LqtkError
from lqtk.formats import FORMATS, QuantizedWeight, WeightFormat
from lqtk.kernels.dispatch import kernel_linear


def quantized_matmul(format_name: str, x: torch.Tensor, tensors: dict[str, torch.Tensor], spec: dict,
                     bias: torch.Tensor | None, cache=None) -> torch.Tensor:
    """x Ŵᵀ + b of a weight stored in `format_name`: by a kernel reading the stored tensors where one applies
    (lqtk.kernels.dispatch), else by the format, which decodes Ŵ or, if it wraps another format's weight,
    transforms x around that weight's matmul, chosen here again."""
    y = kernel_linear(format_name, x, tensors, spec, cache)
    if y is not None:
        return y if bias is None else y + bias
    return FORMATS[format_name].linear(x, tensors, spec, bias, cache, quantized_matmul)


class QuantizedLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.method, self.format, self.spec = weight.method, weight.format, weight.spec
        self.out_features, self.in_features = weight.spec["shape"]
        self.tensor_names = list(weight.tensors)
        for name, tensor in weight.tensors.items():
            if tensor.is_floating_point():
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._decoded_key, self._decoded = None, {}  # tensor versions, and what `_cached` kept for them
        self.weight_grad: torch.Tensor | None = None  # when set, training forwards add ∂L/∂Ŵ to it (PV-tuning)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.tensor_names}

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.method, self.format, self.spec, self.tensors())

    def layer_config(self) -> dict:
        """What an export records for this layer so a loader can rebuild it."""
        return {"method": self.method, "format": self.format, **self.spec}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.tensors()
        if self.weight_grad is not None and torch.is_grad_enabled():
            if type(FORMATS[self.format]).linear is not WeightFormat.linear:
                raise LqtkError(f"the {self.format!r} format computes its matmul without a decoded weight: it has no "
                                "∂L/∂Ŵ for PV-tuning")
            weight = FORMATS[self.format].dequantize(tensors, self.spec)
            if not weight.requires_grad:  # codes alone trained: Ŵ is a leaf of the graph
                weight.requires_grad_()
            weight.register_hook(self._add_weight_grad)
            return F.linear(x, weight.to(x.dtype), self.bias)
        frozen = not any(t.requires_grad for t in tensors.values())
        return quantized_matmul(self.format, x, tensors, self.spec, self.bias, self._cached if frozen else None)

    def _add_weight_grad(self, grad: torch.Tensor) -> None:
        self.weight_grad.add_(grad)

    def _cached(self, name: str, decode):
        """decode()'s result under `name` (the decoded weight, a wrapped format's inner one, a kernel's packing),
        reused while no tensor changed: decoding packed codes for every batch would dominate calibration and
        evaluation. Training bypasses it."""
        key = tuple((t.data_ptr(), t._version) for t in self.tensors().values())
        if self._decoded_key != key:
            self._decoded_key, self._decoded = key, {}
        if name not in self._decoded:
            self._decoded[name] = decode()
        return self._decoded[name]

    def drop_decoded(self) -> None:
        """Forget the decoded weight: a streamed block frees it with the block (lqtk.streaming)."""
        self._decoded_key, self._decoded = None, {}

    def _apply(self, fn, recurse=True):
        self.drop_decoded()  # a decoded copy must not outlive a move to another device or dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, {self.spec}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantized_linear_from_config(config: dict, tensors: dict, bias: torch.Tensor | None) -> QuantizedLinear:
    """Rebuild a layer from its `layer_config()` and tensors (an export or a checkpoint)."""
    config = dict(config)
    method, format_name = config.pop("method"), config.pop("format")
    if format_name not in FORMATS:
        raise LqtkError(f"unknown weight format {format_name!r}: this model needs a newer lqtk")
    tensors = {name: t.detach().clone() for name, t in tensors.items()}
    return QuantizedLinear(QuantizedWeight(method, format_name, config, tensors), bias)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
