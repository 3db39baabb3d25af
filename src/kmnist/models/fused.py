"""Linear + ReLU as one oneDNN matrix product on the CPU: the same numbers, one pass less over memory.

The report's Mixer spends much of a CPU training step on ReLU over its 512-wide hidden
activations: in bf16 the element-wise kernel is memory-bound and takes about as long as the
matrix product before it. oneDNN applies the ReLU while it writes the product (a post-op), so the
pre-activation tensor is never stored or read again. Its backward is the usual one, written out.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _fusable(x: torch.Tensor) -> bool:
    # Not while torch.compile or torch.export (ONNX) traces the model: they see the plain ops.
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and not torch.compiler.is_compiling())


@functools.cache
def _onednn_takes(dtype: torch.dtype) -> bool:
    # oneDNN has bf16 products only on CPUs with AVX512 or AMX; elsewhere (e.g. AVX2-only CPUs) it
    # refuses to build the primitive, and the plain ops (which emulate bf16) must run instead.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _LinearReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
        ctx.save_for_backward(x, weight, out)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, out = ctx.saved_tensors
        grad_hidden = torch.ops.aten.threshold_backward(grad, out, 0).reshape(-1, out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_hidden @ weight).reshape(x.shape)
        flat_x = x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # The bias gradient (column sums) from the weight's own product: [x, 1], so the hidden
            # gradient is read once, not twice (about 4% of a report-model step).
            both = grad_hidden.t() @ torch.cat([flat_x, flat_x.new_ones(len(flat_x), 1)], dim=1)
            grad_weight, grad_bias = both[:, :-1], both[:, -1]
        elif ctx.needs_input_grad[1]:
            grad_weight = grad_hidden.t() @ flat_x
        return grad_x, grad_weight, grad_bias


def linear_relu(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """relu(layer(x)), fused on the CPU (autocast respected), plain elsewhere."""
    if not _fusable(x):
        return F.relu(layer(x))
    weight, bias = layer.weight, layer.bias
    if torch.is_autocast_enabled("cpu"):  # autocast does not see custom functions: cast as it would for linear
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if x.dtype != weight.dtype or not _onednn_takes(x.dtype):  # e.g. fp16 autocast, or bf16 without AVX512
        return F.relu(layer(x))
    return _LinearReLU.apply(x.contiguous(), weight.contiguous(), bias)


def mlp(layers: nn.Sequential, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Run a Sequential(Linear, ReLU, *rest), its first two layers fused when `fused`."""
    if not fused:
        return layers(x)
    first, _, *rest = layers
    x = linear_relu(first, x)
    for layer in rest:
        x = layer(x)
    return x


def set_fused(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the fused Linear + ReLU on or off in every module of `model` that has one (same numbers)."""
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = enabled
    return model
