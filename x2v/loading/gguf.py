"""GGUF checkpoints (city96's ComfyUI-GGUF Wan files, LightX2V's ``gguf-<TYPE>`` schemes): read with the maintained
``gguf`` package, mapped, nothing dequantized until it is used.

Facts (docs/formats.md, GGUF): dimensions are stored reversed (the reader gives them in torch order); a tensor the
converter reshaped (the 5-D ``patch_embedding`` into ≤ 4 dims) carries its shape in ``comfy.gguf.orig_shape.<name>``;
float tensors (F32, F16, BF16) are plain arrays; quantized ones are blocks of bytes, one row per output channel.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from x2v.errors import CheckpointError
from x2v.formats.readers import read_checkpoint
from x2v.ops.gguf_linear import PackedTensor, replace_with_gguf
from x2v.ops.gguf_quants import GGML_TYPES, ggml_type, row_bytes

MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."
FLOAT_TYPES = ("F32", "F16", "BF16")  # stored as plain arrays
FLOAT_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def is_gguf(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(f"{path}: a GGUF file; reading it needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(path)
    except Exception as error:  # the reader's own checks raise ValueError; a truncated file, struct or index errors
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error}); download it "
                              "again") from None


def _field_ints(field) -> list[int]:
    return [int(field.parts[i][0]) for i in field.data]


def is_dit_gguf(path: Path) -> bool:
    """A GGUF file holding a Wan DiT (not a umT5 encoder): its tensors end with the head's modulation."""
    try:
        reader = _reader(path)
    except CheckpointError:
        return True  # let loading it say what is wrong
    return any(t.name.endswith(("head.modulation", "scale_shift_table")) for t in reader.tensors)


def read_gguf(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file by name, in torch shape: float ones as views of the mapped file, quantized ones
    as ``PackedTensor`` (their bytes mapped, their values computed when used)."""
    path = Path(path)
    reader = _reader(path)
    shapes = {name.removeprefix(ORIG_SHAPE): _field_ints(field) for name, field in reader.fields.items()
              if name.startswith(ORIG_SHAPE)}
    with warnings.catch_warnings():  # the map is read-only, and x2v never writes into a file's tensors
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return _tensors(path, reader, shapes)


def _tensors(path: Path, reader, shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for info in reader.tensors:
        name, kind = info.name, info.tensor_type.name
        if kind not in GGML_TYPES:
            raise CheckpointError(f"{path}: tensor {name} is stored as {kind}, which x2v does not read; it reads "
                                  f"{', '.join(GGML_TYPES)}")
        logical = tuple(int(n) for n in reversed(info.shape))
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name} appears twice; the file is corrupt")
        if kind in FLOAT_TYPES:
            data = np.asarray(info.data)
            if kind == "BF16":  # numpy has no bfloat16: the reader gives its bytes
                tensor = torch.from_numpy(data.view(np.uint8).reshape(-1)).view(torch.bfloat16).reshape(logical)
            else:
                tensor = torch.from_numpy(data).reshape(logical)
        else:
            ggml = ggml_type(kind)
            rows, width = int(np.prod(logical[:-1], dtype=np.int64)), logical[-1]
            packed = torch.from_numpy(np.asarray(info.data)).reshape(rows, row_bytes(ggml, width))
            tensor = PackedTensor(packed, kind, logical)
        if name in shapes:  # the converter's reshape of a >4-D tensor, undone
            target = tuple(shapes[name])
            if int(np.prod(target)) != tensor.numel():
                raise CheckpointError(f"{path}: {ORIG_SHAPE}{name} says {list(target)}, but the tensor holds "
                                      f"{tensor.numel()} values")
            tensor = tensor.reshape(target) if not isinstance(tensor, PackedTensor) else tensor.values().reshape(target)
        tensors[name] = tensor
    return tensors


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Any checkpoint: a GGUF file (``read_gguf``) or what ``read_checkpoint`` reads."""
    return read_gguf(path) if is_gguf(path) else read_checkpoint(path)


def stored_kind(tensor: torch.Tensor) -> str:
    """How a tensor is stored: its ggml type when GGUF-quantized, else its dtype (``bfloat16``)."""
    return tensor.ggml if isinstance(tensor, PackedTensor) else str(tensor.dtype).removeprefix("torch.")


def packed_types(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {tensor.ggml for tensor in tensors.values() if isinstance(tensor, PackedTensor)}


def check_gguf_scheme(tensors: dict[str, torch.Tensor], quantization, source: str, component: str) -> None:
    """LightX2V's ``<component>_quant_scheme: "gguf-<TYPE>"`` (``gguf-Q4_K_M``: the Q4_K family) must name a type
    the file holds; another scheme, or ``<component>_quantized: false``, contradicts a GGUF file."""
    packed = packed_types(tensors)
    types = packed or {FLOAT_NAMES[tensor.dtype] for tensor in tensors.values() if tensor.dtype in FLOAT_NAMES}
    held, scheme = ", ".join(sorted(types)), quantization.scheme
    if quantization.quantized is False and packed:
        raise CheckpointError(f"{source}: a GGUF file with {held} weights, but {component}_quantized is false; set "
                              f"it true (or leave it out)")
    if scheme is None or scheme == "Default" and not packed:
        return
    wanted = scheme.removeprefix("W-").removeprefix("gguf-") if "gguf" in scheme else None
    if wanted is None or not any(wanted == t or wanted.startswith(f"{t}_") for t in types):
        raise CheckpointError(f"{source}: {component}_quant_scheme is '{scheme}', but this GGUF file holds {held} "
                              f"weights; set it to 'gguf-{sorted(types)[0]}' (or leave it out: x2v reads the type "
                              "from the file)")


def swap_packed_linears(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                        keep_fp32: tuple[str, ...] = ()) -> dict[str, str]:
    """Make each linear of ``model`` (built on meta) whose weight ``tensors`` hold as GGUF blocks a ``GgufLinear``
    computing in ``dtype`` (float32 for the layers the model keeps in float32); returns them (layer -> type)."""
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    layers = {key.removesuffix(".weight"): tensor.ggml for key, tensor in tensors.items()
              if isinstance(tensor, PackedTensor) and key.endswith(".weight") and tensor.ndim == 2
              and key.removesuffix(".weight") in linears}
    for fp32 in (True, False):
        chosen = {name: ggml for name, ggml in layers.items() if any(s in name for s in keep_fp32) == fp32}
        replace_with_gguf(model, chosen, torch.float32 if fp32 else dtype)
    return layers


def keep_packed(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                keep_fp32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors to assign to ``model`` (built on meta) when some are GGUF blocks: the linears whose weight is
    packed become ``GgufLinear`` holding those bytes (``swap_packed_linears``); any other packed tensor is
    dequantized (float32)."""
    if not packed_types(tensors):
        return tensors
    layers = swap_packed_linears(model, tensors, dtype, keep_fp32)
    kept = {}
    for key, tensor in tensors.items():
        if key.endswith(".weight") and key.removesuffix(".weight") in layers:
            kept[f"{key.removesuffix('.weight')}.packed"] = tensor.packed
        else:
            kept[key] = tensor.values() if isinstance(tensor, PackedTensor) else tensor
    return kept
