"""GGUF-quantized weights in the network: ``PackedTensor`` (a tensor as a GGUF file stores it, seen by any torch op as
its float32 values) and ``GgufLinear`` (a linear layer that keeps its weight packed and dequantizes it when it runs:
the model holds the file's bytes, not a full-precision copy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from x2v.ops.gguf_quants import dequantize, ggml_type, row_bytes
from x2v.ops.quant_linear import swap_linears


class PackedTensor(torch.Tensor):
    """A GGUF-quantized tensor: its logical shape (float32), its packed bytes ``[rows, row bytes]`` (uint8, a view
    of the mapped file) and its ggml type. Reading its shape costs nothing; any torch op on it dequantizes it first
    (exactly: ``dequantize``), so code written for float tensors (shape checks, casts) works on it unchanged."""

    @staticmethod
    def __new__(cls, packed: torch.Tensor, ggml: str, shape: tuple[int, ...]):
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.float32, device=packed.device)
        tensor.packed, tensor.ggml = packed, ggml
        return tensor

    def __init__(self, packed: torch.Tensor, ggml: str, shape: tuple[int, ...]):
        super().__init__()

    def __repr__(self) -> str:
        return f"PackedTensor({self.ggml}, shape={tuple(self.shape)})"

    def values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed, self.ggml, dtype).reshape(self.shape)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unpack(value):
            return value.values() if isinstance(value, PackedTensor) else value

        return func(*tree_map(unpack, args), **tree_map(unpack, kwargs or {}))


class GgufLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` kept as GGUF blocks (the ``packed`` buffer, ``[out, row bytes]`` uint8) and
    dequantized in ``compute_dtype`` at each call; the bias is a plain parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ggml: str, compute_dtype: torch.dtype):
        super().__init__()
        kind = ggml_type(ggml)
        self.in_features, self.out_features = in_features, out_features
        self.ggml, self.compute_dtype = kind.name, compute_dtype
        self.register_buffer("packed", torch.empty(out_features, row_bytes(kind, in_features), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype)) if bias else None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.ggml}, compute {self.compute_dtype}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.packed, self.ggml, x.dtype), self.bias)


def replace_with_gguf(model: nn.Module, layers: dict[str, str], compute_dtype: torch.dtype) -> None:
    """Swap the ``nn.Linear`` modules named in ``layers`` (name -> ggml type) for empty ``GgufLinear`` (meta model)."""
    swap_linears(model, layers, lambda name, old: GgufLinear(old.in_features, old.out_features, old.bias is not None,
                                                             layers[name], compute_dtype))
