"""Turn a module built on the meta device into a ready model by assigning checkpoint tensors.

No weight is ever randomly initialized: the module is constructed under ``torch.device("meta")``
and each parameter is replaced by the checkpoint tensor, cast once to its target dtype and device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from x2v.errors import CheckpointError
from x2v.formats.keys import summarize_keys
from x2v.ops.quant_math import QUANT_DTYPES
from x2v.runtime.pages import FileMappings, read_pages, release_pages

QUANT_STORAGE = tuple(QUANT_DTYPES.values())  # storage of quantized layers: never cast
ALLOW_NON_FINITE = "X2V_ALLOW_NON_FINITE_WEIGHTS"  # set to 1: load weights holding NaN / infinity anyway
# fp8 bit patterns (sign bit masked off) that are not finite numbers: e4m3fn has NaN only (S.1111.111), e5m2 infinity
# and NaN (S.11111.xx).
FP8_NOT_FINITE = {torch.float8_e4m3fn: (0x7F, 0x7F), torch.float8_e5m2: (0x7C, 0x7C)}  # dtype -> (mask, pattern)


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def target_dtype(name: str, stored: torch.dtype, dtype: torch.dtype, keep_fp32: tuple[str, ...],
                 declared: torch.dtype | None = None) -> torch.dtype:
    if declared in QUANT_STORAGE or name.endswith(".weight_scale"):
        return declared  # a quantized layer's int8/fp8 weight and float32 scale keep the dtypes it declares
    if not stored.is_floating_point:
        return stored
    if any(s in name for s in keep_fp32):
        return torch.float32
    return dtype


def on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def copy_to(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return tensor.to(device=device, dtype=dtype)
    # Move the stored bytes and convert on the accelerator: no full-size CPU temporary, and faster.
    return tensor.to(device).to(dtype)


def to_targets(sources: dict[str, tuple[torch.Tensor, torch.dtype]], device: torch.device) -> dict[str, torch.Tensor]:
    """Each ``name -> (tensor, target dtype)`` as a tensor of that dtype on ``device``, one tensor at a time.

    A tensor that is already right is kept as it is (on CPU a view of the mapped file: the model *is* the
    mapping). The others are copied in file order; while one is converted, a helper thread reads the next one's
    file pages, and each source's pages leave this process right after its copy. The peak is the model plus
    about two tensors, not the file plus the model.
    """
    mappings = FileMappings()
    ready = {}
    copies = []
    for name, (tensor, dtype) in sources.items():
        if tensor.dtype == dtype and on_device(tensor, device):
            ready[name] = tensor
        else:
            copies.append((name, tensor, dtype, mappings.pages(tensor)))
    copies.sort(key=lambda c: c[1].data_ptr())  # sequential reads within each file
    following = [pages for _, _, _, pages in copies[1:]] + [None]
    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = reader.submit(read_pages, copies[0][3] if copies else None)
        for (name, tensor, dtype, pages), next_pages in zip(copies, following):
            ahead.result()  # this tensor's pages are in
            ahead = reader.submit(read_pages, next_pages)
            ready[name] = copy_to(tensor, dtype, device)
            release_pages(pages)
    return ready


def has_non_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds a NaN or an infinity: one reduction, on the device where it lives (a meta tensor
    holds no values)."""
    if tensor.is_meta:
        return False
    if tensor.dtype in FP8_NOT_FINITE:
        mask, pattern = FP8_NOT_FINITE[tensor.dtype]
        return bool(((tensor.view(torch.uint8) & mask) == pattern).any())
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Which of ``tensors`` hold NaN or infinity, said in a few words (None: all finite)."""
    broken = [name for name, tensor in tensors.items() if has_non_finite(tensor)]
    if not broken:
        return None
    return (f"{len(broken)} tensor(s) hold NaN or infinite values ({', '.join(broken[:5])}"
            f"{', ...' if len(broken) > 5 else ''})")


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity: every frame would come out black or wrong, with no error."""
    found = non_finite(tensors) if os.environ.get(ALLOW_NON_FINITE) != "1" else None
    if found:
        raise CheckpointError(
            f"{source}: {found}; every video would come out black or wrong. The file is corrupt (download it "
            f"again) or was saved from a diverged training run. To load it anyway: {ALLOW_NON_FINITE}=1")


def weight_problems(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> list[str]:
    """Missing and unexpected tensors (summarized by pattern) and shape mismatches, as readable lines."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {summarize_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {summarize_keys(unexpected)}")
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)}, {what} expects {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
    recast = [f"{k}: file {tensors[k].dtype}, {what} expects {v.dtype}" for k, v in expected.items()
              if k in tensors and v.dtype in QUANT_STORAGE and tensors[k].dtype != v.dtype]
    if recast:
        problems.append(f"{len(recast)} quantized weight(s) of another kind: " + "; ".join(recast[:3]))
    return problems


def assign_weights(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    keep_fp32: tuple[str, ...] = (),
    source: str = "checkpoint",
    what: str = "model",
) -> nn.Module:
    """Assign ``tensors`` to the meta-device ``model``; every key must match by name and shape.

    Parameters whose name contains one of ``keep_fp32`` are stored in float32 (norms, modulation,
    time embedding: the official code computes them in float32); other floating tensors become ``dtype``.
    """
    expected = model.state_dict()
    problems = weight_problems(expected, tensors, what)
    if problems:
        raise CheckpointError(f"{source}: does not fit the {what}:\n  " + "\n  ".join(problems))

    sources = {
        name: (tensors[name], target_dtype(name, tensors[name].dtype, dtype, keep_fp32, expected[name].dtype))
        for name in expected
    }
    targets = to_targets(sources, torch.device(device))
    check_finite(targets, source)  # after the cast: a value the compute dtype cannot hold is caught too
    model.load_state_dict(targets, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()
