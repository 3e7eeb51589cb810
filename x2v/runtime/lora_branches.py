"""LoRA changes applied to a loaded model: merged into a tensor, or attached at run time as low-rank branches.

Attached LoRAs (``lora_dynamic_apply``, ``Pipeline.load_lora``): linear layers get a branch
``((x @ downᵀ) · scales) @ upᵀ`` added to their output by a forward hook, the ranks of every attached LoRA stacked
in one branch; other changes (diffs, pairs on non-linear layers) replace the tensor and keep the original, so
``detach_loras`` restores every original bit for bit. ``x2v.loading.lora`` reads the files and makes the ``Term``s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from x2v.ops.gguf_linear import GgufLinear
from x2v.ops.quant_linear import QuantLinear, input_dtype
from x2v.ops.quant_math import merge_rounding, quantize_weight

ATTACHED = "lora_attached"  # model attribute holding the state of LoRAs attached at run time


@dataclass(frozen=True)
class Term:
    """One LoRA's change to one tensor: ``strength · unit · up @ down`` (a pair; ``unit`` = alpha / rank or 1) or
    ``strength · diff``. ``lora`` is the file it comes from."""

    strength: float
    unit: float = 1.0
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    lora: str = ""

    @property
    def scale(self) -> float:
        return self.strength * self.unit

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def value(self, shape: torch.Size, device) -> torch.Tensor:
        """The change in float32 on ``device`` (a fresh tensor)."""
        if self.diff is not None:
            return self.diff.to(device=device, dtype=torch.float32) * self.scale
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        product = up @ self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (product * self.scale).reshape(shape)


def owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, name = key.rpartition(".")
    return model.get_submodule(module_name), name


def add_delta(module: nn.Module, name: str, delta: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    """Replace ``module.<name>`` by itself + ``delta`` (float32 sum, cast once); returns the replaced tensors.

    Never writes into the old tensor: it may be a view of the checkpoint file, and it is what a detach restores.
    """
    if isinstance(module, QuantLinear) and name == "weight":
        replaced = {"weight": module.weight.data, "weight_scale": module.weight_scale}
        weight = module.dequantized_weight(torch.float32).add_(delta)
        generator = merge_rounding(key, module.kind, weight.device)
        module.weight.data, module.weight_scale = quantize_weight(weight, module.kind, generator=generator)
        return replaced
    tensor = getattr(module, name)
    original = tensor.data
    tensor.data = delta.add_(original).to(original.dtype)
    return {name: original}


class LoraBranch(nn.Module):
    """The low-rank update of one linear layer for every attached LoRA: ``((x @ downᵀ) · scales) @ upᵀ``.

    The ranks of all LoRAs are stacked, so several LoRAs cost one pair of small matmuls. ``scales`` (strength ·
    alpha / rank per rank row, float32) is a tensor written in place by ``set_strength``, so changing a strength
    never recompiles a compiled model. Buffers are not persistent: the model's state dict stays the base model's.
    """

    def __init__(self, pairs: list[Term], device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("down", torch.cat([t.down.to(device, dtype) for t in pairs]), persistent=False)
        self.register_buffer("up", torch.cat([t.up.to(device, dtype) for t in pairs], dim=1), persistent=False)
        self.register_buffer("scales", torch.cat([torch.full((t.rank,), t.scale, dtype=torch.float32, device=device)
                                                  for t in pairs]), persistent=False)
        self.pairs = pairs  # which rows are whose: the terms in row order

    def set_strength(self, lora: str, strength: float) -> None:
        row = 0
        for i, term in enumerate(self.pairs):
            if term.lora == lora:
                self.pairs[i] = term = replace(term, strength=strength)
                self.scales[row:row + term.rank].fill_(term.scale)
            row += term.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x.to(self.down.dtype), self.down)
        return F.linear((hidden.float() * self.scales).to(self.up.dtype), self.up)


def _add_branch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora_branch(args[0]).to(output.dtype)


TensorRef = tuple[nn.Module, str]  # a parameter or buffer by owner and name


@dataclass
class AttachedLoras:
    """What ``attach_loras`` changed in a model, so ``set_lora_strength`` and ``detach_loras`` can redo or undo it."""

    reports: list = field(default_factory=list)  # x2v.loading.lora.LoraReport
    hooks: dict[nn.Module, RemovableHandle] = field(default_factory=dict)  # layers with a LoraBranch
    originals: dict[TensorRef, torch.Tensor] = field(default_factory=dict)  # before the first LoRA
    replaced: dict[str, list[Term]] = field(default_factory=dict)  # official key -> changes made to the tensor itself


def _extend_branch(module: nn.Module, pairs: list[Term], state: AttachedLoras) -> None:
    old = getattr(module, "lora_branch", None)
    if old is None:
        state.hooks[module] = module.register_forward_hook(_add_branch)
    device = (module.packed if isinstance(module, GgufLinear) else module.weight).device
    module.lora_branch = LoraBranch((old.pairs if old else []) + pairs, device, input_dtype(module))


def _restore(module: nn.Module, name: str, original: torch.Tensor) -> None:
    current = getattr(module, name)
    restored = original.to(current.device)  # the model may have moved since
    if isinstance(current, nn.Parameter):
        current.data = restored
    else:
        setattr(module, name, restored)


def _replace(model: nn.Module, key: str, state: AttachedLoras) -> None:
    """Set the tensor ``key`` to its original plus every term of ``state.replaced[key]`` (originals kept)."""
    module, name = owner(model, key)
    terms = state.replaced[key]
    for ref in [(module, name), (module, "weight_scale")]:  # an 8-bit weight comes with its scale
        if ref in state.originals:
            _restore(*ref, state.originals[ref])
    tensor = getattr(module, name)
    total = terms[0].value(tensor.shape, tensor.device)
    for term in terms[1:]:
        total += term.value(tensor.shape, tensor.device)
    for replaced, original in add_delta(module, name, total, key).items():
        state.originals.setdefault((module, replaced), original)


def weight_keys(model: nn.Module) -> list[str]:
    """``model``'s tensor names, with ``<layer>.weight`` for the GGUF layers (which store ``<layer>.packed``)."""
    return [*model.state_dict(keep_vars=True),
            *(f"{name}.weight" for name, module in model.named_modules() if isinstance(module, GgufLinear))]


def attach_terms(model: nn.Module, changes: dict[str, list[Term]], reports: list) -> None:
    """Attach prepared LoRA changes (official key -> terms) on top of any already attached; the base weights stay
    as they are. Pairs on linear layers become a ``LoraBranch``; other changes (diffs, pairs on other layers)
    replace their tensor with the original kept for ``detach_loras``. ``reports`` (one per LoRA, with ``path`` and
    ``strength``) are kept for ``set_lora_strength`` and ``attached_loras``."""
    state = getattr(model, ATTACHED, None) or AttachedLoras()
    for key in (k for k in weight_keys(model) if k in changes):
        module, name = owner(model, key)
        branchable = name == "weight" and isinstance(module, (nn.Linear, QuantLinear, GgufLinear))
        pairs = [t for t in changes[key] if t.diff is None] if branchable else []
        if pairs:
            _extend_branch(module, pairs, state)
        rest = [t for t in changes[key] if not (branchable and t.diff is None)]
        if rest and isinstance(module, GgufLinear):
            raise ValueError(f"{rest[0].lora}: changes {key} by a full difference (.diff), which a GGUF layer cannot "
                             "take without quantizing it again; use a LoRA of low-rank pairs, or a non-GGUF model")
        if rest:
            state.replaced.setdefault(key, []).extend(rest)
            _replace(model, key, state)
    state.reports += reports
    setattr(model, ATTACHED, state)


def set_lora_strength(model: nn.Module, lora: str | os.PathLike, strength: float) -> None:
    """Change the strength of a LoRA attached at run time, without reloading or recompiling anything."""
    state = getattr(model, ATTACHED, None)
    reports = [r for r in state.reports if r.path == str(lora)] if state else []
    if not reports:
        raise ValueError(f"{lora}: not attached at run time to this model (attach_loras / Pipeline.load_lora first)")
    if any(r.strength == 0 for r in reports):
        raise ValueError(f"{lora}: attached with strength 0, which attaches nothing; detach and attach it with a "
                         "non-zero strength")
    for module in state.hooks:
        module.lora_branch.set_strength(str(lora), strength)
    for key, terms in state.replaced.items():
        if any(t.lora == str(lora) for t in terms):
            terms[:] = [replace(t, strength=strength) if t.lora == str(lora) else t for t in terms]
            _replace(model, key, state)
    for report in reports:
        report.strength = strength


def detach_loras(model: nn.Module) -> None:
    """Remove every LoRA attached at run time: branches and hooks gone, replaced tensors restored bit for bit."""
    state = getattr(model, ATTACHED, None)
    if state is None:
        return
    for module, hook in state.hooks.items():
        hook.remove()
        del module.lora_branch
    for (module, name), original in state.originals.items():
        _restore(module, name, original)
    delattr(model, ATTACHED)


def attached_loras(model: nn.Module) -> list:
    state = getattr(model, ATTACHED, None)
    return list(state.reports) if state else []
