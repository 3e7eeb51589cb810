"""LoRAs on a Wan DiT: read the files, report what they change, merge them into the weights or attach them at run time.

``W' = W + strength · scale · up @ down`` with ``scale = alpha / rank`` (alpha from ``lora_configs``, else the file's
``.alpha``, else scale 1); ``.diff`` / ``.diff_b`` / ``.diff_m`` tensors add ``strength · diff``.

* Merged (the default): each changed tensor is computed in float32 on its own device and cast once, one tensor at
  a time; the model is never copied, and the file pages of a replaced weight are handed back. A quantized layer is
  dequantized, changed and re-quantized (stochastic rounding for fp8, docs/pitfalls.md B03).
* Dynamic (``lora_dynamic_apply``): linear layers get a low-rank branch ``((x @ downᵀ) · scales) @ upᵀ`` added to
  their output, the ranks of every attached LoRA stacked in one branch; other changes (diffs, conv pairs) replace
  the tensor and keep the original, so ``detach_loras`` restores every original bit for bit. That machinery is
  ``x2v.runtime.lora_branches``; this module reads the files and prepares the changes.

Every LoRA gets a ``LoraReport`` (matched tensors, skipped keys grouped by reason, the model it seems made for),
always logged at WARNING, the level the command line shows.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from x2v.errors import CheckpointError, UnsupportedModelError
from x2v.formats.dit_keys import variant_name
from x2v.formats.lora_keys import (
    ALPHA, LONE_ALPHA, UNRECOGNIZED, LoraTarget, alpha_value, check_supported, describe_skipped, group_by_target,
    guess_variant, shape_problem, skip_reason,
)
from x2v.formats.metadata import EXPERTS
from x2v.formats.readers import read_checkpoint
from x2v.loading.weights import check_finite, has_non_finite
from x2v.models.wan_dit import WanDiTConfig
from x2v.ops.gguf_linear import GgufLinear
from x2v.runtime.lora_branches import (
    ATTACHED, Term, add_delta, attach_terms, attached_loras, detach_loras, owner, set_lora_strength,
)
from x2v.runtime.pages import FileMappings, release_pages

log = logging.getLogger(__name__)

__all__ = ["LoraEntry", "LoraReport", "apply_loras", "attach_loras", "attached_loras", "detach_loras", "merge_loras",
           "prepare_loras", "set_lora_strength"]


@dataclass
class LoraEntry:
    """One ``lora_configs`` entry: the file, its strength, an alpha overriding the file's, the Wan2.2 expert."""

    path: str
    strength: float = 1.0
    alpha: float | None = None
    name: str | None = None

    @classmethod
    def from_config(cls, entry: dict | str | os.PathLike | LoraEntry) -> LoraEntry:
        if isinstance(entry, cls):
            return entry
        if isinstance(entry, (str, os.PathLike)):
            return cls(str(entry))
        if not isinstance(entry, dict) or not entry.get("path"):
            raise ValueError(f"a lora_configs entry is a path or {{\"path\": ..., \"strength\": 1.0, \"alpha\": null, "
                             f"\"name\": ...}}, got {entry!r}")
        unknown = set(entry) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"lora_configs entry {entry['path']}: unknown keys {sorted(unknown)}; expected path, "
                             "strength, alpha, name")
        name, strength, alpha = entry.get("name"), entry.get("strength"), entry.get("alpha")
        problems = number_problems(strength, alpha)
        if problems:
            raise ValueError(f"lora_configs entry {entry['path']}: {'; '.join(problems)}")
        if name is not None and name not in EXPERTS:
            raise ValueError(f"lora_configs entry {entry['path']}: name {name!r} is not a Wan2.2 expert; use "
                             f"{' or '.join(EXPERTS)}, or leave it out for a single-DiT model")
        return cls(str(entry["path"]), 1.0 if strength is None else float(strength),
                   None if alpha is None else float(alpha), name)


MAX_STRENGTH, MAX_ALPHA = 100.0, 1e5  # far beyond any useful LoRA; larger values only overflow the weights


def number_problems(strength, alpha) -> list[str]:
    """What is wrong with a LoRA entry's ``strength`` and ``alpha`` (None: not given)."""
    problems = []
    if strength is not None and not (_is_number(strength) and abs(strength) <= MAX_STRENGTH):
        problems.append(f"strength must be a number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g} (e.g. 1.0), got "
                        f"{strength!r}")
    if alpha is not None and not (_is_number(alpha) and 0 <= alpha <= MAX_ALPHA):
        problems.append(f"alpha must be a number from 0 to {MAX_ALPHA:g} or null (null: the file's own alpha), got "
                        f"{alpha!r}")
    return problems


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class LoraReport:
    """What one LoRA file changed in one model; ``summary()`` is the text x2v logs."""

    path: str
    model: str  # what it was applied to, e.g. "Wan2.1 T2V-14B"
    strength: float
    total: int  # tensors in the file
    matched: int  # tensors applied
    pairs: int  # up/down pairs applied
    diffs: int  # diff tensors applied
    made_for: str  # the base model the LoRA's shapes point to
    alpha: float | None = None  # from lora_configs
    name: str | None = None
    ranks: list[int] = field(default_factory=list)
    file_alphas: list[float] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> file keys

    def summary(self) -> str:
        ranks = f"rank{'s' if len(self.ranks) > 1 else ''} {', '.join(map(str, self.ranks))}" if self.ranks \
            else "no pairs"
        if self.alpha is not None:
            alpha = f"alpha {self.alpha:g} from lora_configs"
        elif self.file_alphas:
            alpha = f"alpha {', '.join(f'{a:g}' for a in self.file_alphas)} from the file"
        else:
            alpha = "no alpha: scale 1"
        lines = [f"LoRA {self.path} (strength {self.strength:g}, {ranks}, {alpha}) on {self.model}: matched "
                 f"{self.matched} of {self.total} tensors ({self.pairs} pairs, {self.diffs} diffs)"]
        lines += [f"  {line}" for line in describe_skipped(self.skipped)]
        lines.append(f"  seems made for: {self.made_for}")
        return "\n".join(lines)


class LoraDeltas:
    """The prepared changes of one or more LoRAs, per official model key; each computed only when asked for."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self._shapes = shapes
        self._terms: dict[str, list[Term]] = {}

    def add(self, terms: dict[str, list[Term]]) -> None:
        for key, more in terms.items():
            self._terms.setdefault(key, []).extend(more)

    def keys(self) -> set[str]:
        return set(self._terms)

    def terms(self, key: str) -> list[Term]:
        return list(self._terms.get(key, ()))

    def pairs(self, key: str) -> list[Term]:
        return [t for t in self._terms.get(key, ()) if t.diff is None]

    def delta(self, key: str, device=None, *, pairs: bool = True) -> torch.Tensor | None:
        """float32 sum over every prepared LoRA of the change to ``key`` (strength and alpha/rank applied), in
        the order the LoRAs were given; None if none changes it. ``pairs=False``: the diffs only."""
        terms = [t for t in self._terms.get(key, ()) if pairs or t.diff is not None]
        if not terms:
            return None
        total = terms[0].value(self._shapes[key], device)
        for term in terms[1:]:
            total += term.value(self._shapes[key], device)
        return total


def unit_scale(alpha: float | None, rank: int) -> float:
    """``alpha / rank``; no alpha (or alpha 0, ComfyUI's "none") means 1."""
    return alpha / rank if alpha else 1.0


def _read(entry: LoraEntry) -> dict[str, torch.Tensor]:
    path = Path(entry.path)
    if not path.is_file():
        raise CheckpointError(f"{path}: LoRA file not found; check the path in lora_configs (or load_lora).")
    tensors = read_checkpoint(path)
    check_finite(tensors, str(path))  # a NaN in one pair blacks out every video
    return tensors


def _skip_unused(targets: dict[str, LoraTarget], shapes: dict, model: str, num_blocks: int,
                 skipped: dict[str, list[str]]) -> dict[str, LoraTarget]:
    """The targets present in the model; the file keys of the rest go to ``skipped`` under their reason."""
    used = {}
    for key, target in targets.items():
        if key not in shapes:
            skipped.setdefault(skip_reason(key, model, num_blocks), []).extend(target.keys.values())
            continue
        if target.up is None and target.alpha is not None:
            skipped.setdefault(LONE_ALPHA, []).append(target.keys[ALPHA])
        if target.up is not None or target.diff is not None:
            used[key] = target
    return used


def _prepare_one(entry: LoraEntry, shapes: dict, *, strict: bool, model: str,
                 num_blocks: int) -> tuple[LoraReport, dict[str, list[Term]]]:
    source = entry.path
    tensors = _read(entry)
    check_supported(tensors, source)
    targets, unrecognized = group_by_target(tensors, source)
    made_for = guess_variant(targets)
    skipped = {UNRECOGNIZED: unrecognized} if unrecognized else {}
    used = _skip_unused(targets, shapes, model, num_blocks, skipped)
    mismatches = [p for key, t in used.items() if (p := shape_problem(key, t, shapes[key]))]
    if mismatches:
        raise CheckpointError(
            f"{source}: this LoRA does not fit the {model}: {len(mismatches)} shape mismatch(es): "
            + "; ".join(mismatches[:4]) + (" ..." if len(mismatches) > 4 else "")
            + f". It seems made for {made_for}; use it with that model. Nothing was applied."
        )
    terms: dict[str, list[Term]] = {}
    ranks, file_alphas = set(), set()
    for key, target in used.items():
        if target.up is not None:
            file_alpha = alpha_value(target.alpha, target.keys[ALPHA], source) if target.alpha is not None else None
            ranks.add(target.rank)
            file_alphas.update([file_alpha] if file_alpha else [])
            unit = unit_scale(entry.alpha if entry.alpha is not None else file_alpha, target.rank)
            terms.setdefault(key, []).append(Term(entry.strength, unit, up=target.up, down=target.down, lora=source))
        if target.diff is not None:
            terms.setdefault(key, []).append(Term(entry.strength, diff=target.diff, lora=source))
    report = LoraReport(
        path=source, model=model, strength=entry.strength, total=len(tensors),
        matched=len(tensors) - sum(map(len, skipped.values())), pairs=sum(t.up is not None for t in used.values()),
        diffs=sum(t.diff is not None for t in used.values()), made_for=made_for, alpha=entry.alpha, name=entry.name,
        ranks=sorted(ranks), file_alphas=sorted(file_alphas), skipped=skipped,
    )
    if report.matched == 0:
        raise CheckpointError(f"{report.summary()}\n{source}: no tensor of this LoRA applies to the {model}; it is "
                              "made for another model, or in a key convention x2v does not know.")
    if strict and skipped:
        raise CheckpointError(f"{report.summary()}\n{source}: lora_strict is true and {report.total - report.matched} "
                              "tensor(s) were not applied (above, with the reason). Set lora_strict false to apply "
                              "the rest, or use a LoRA made for this model.")
    log.warning(report.summary())
    # Strength 0 changes nothing: no term, so not even a re-quantization touches the weights.
    return report, {k: [t for t in ts if t.scale != 0] for k, ts in terms.items() if any(t.scale != 0 for t in ts)}


def prepare_loras(entries: list[LoraEntry], target_shapes: dict[str, torch.Size], *, strict: bool = False,
                  model_description: str = "") -> tuple[LoraDeltas, list[LoraReport]]:
    """Read, map and shape-check every LoRA against a model's ``official key -> shape`` map; apply nothing.

    Any problem (shape mismatch, unsupported adapter type, with ``strict`` any key left unapplied) is raised before
    a single tensor changes. Each LoRA's report is logged.
    """
    model = model_description or "model"
    num_blocks = len({m[1] for k in target_shapes if (m := re.match(r"blocks\.(\d+)\.", k))})
    deltas = LoraDeltas(dict(target_shapes))
    reports = []
    for entry in map(LoraEntry.from_config, entries):
        report, terms = _prepare_one(entry, target_shapes, strict=strict, model=model, num_blocks=num_blocks)
        reports.append(report)
        deltas.add(terms)
    return deltas, reports


# --- applying to a model -----------------------------------------------------------------------------------------


def target_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Every tensor a LoRA may change, by name: the model's, and the weights GGUF layers keep as blocks."""
    shapes = {key: tensor.shape for key, tensor in model.state_dict(keep_vars=True).items()}
    shapes.update({f"{name}.weight": torch.Size((module.out_features, module.in_features))
                   for name, module in model.named_modules() if isinstance(module, GgufLinear)})
    return shapes


def describe_model(model: nn.Module, expert: str | None = None) -> str:
    """How reports name the model: ``Wan2.1 T2V-14B``, ``Wan2.2 T2V expert (high_noise_model)``."""
    config = getattr(model, "config", None)
    if not isinstance(config, WanDiTConfig):
        return type(model).__name__
    return f"Wan2.2 {config.model_type.upper()} expert ({expert})" if expert else variant_name(config)


def merge_loras(model: nn.Module, entries: list, *, strict: bool = False,
                description: str | None = None) -> list[LoraReport]:
    """Merge LoRAs into ``model``'s weights in place, one tensor at a time on the tensor's own device."""
    if getattr(model, ATTACHED, None) is not None:
        raise ValueError("this model has LoRAs attached at run time; detach_loras(model) before merging others")
    deltas, reports = prepare_loras(entries, target_shapes(model), strict=strict, model_description=description or
                                    describe_model(model))
    merge_deltas(model, deltas)
    return reports


def merge_deltas(model: nn.Module, deltas: LoraDeltas, skip: set[str] = frozenset()) -> None:
    """Add prepared LoRA changes to ``model``'s tensors (except ``skip``, merged already), one at a time."""
    mappings = FileMappings()
    for key in (k for k in model.state_dict() if k in deltas.keys() and k not in skip):  # sequential reads
        module, name = owner(model, key)
        # Passed on, not kept: each delta is freed before the next one is computed.
        replaced = add_delta(module, name, deltas.delta(key, getattr(module, name).device), key)
        if any(has_non_finite(getattr(module, changed)) for changed in replaced):
            loras = ", ".join(sorted({term.lora for term in deltas.terms(key)}))
            raise CheckpointError(f"{loras}: merged into {key}, it gives NaN or infinite values (its values times "
                                  "the strength overflow the weights' dtype); lower the strength or check the file")
        for original in replaced.values():
            release_pages(mappings.pages(original))  # the file's copy of this tensor is no longer needed


def attach_loras(model: nn.Module, entries: list, *, strict: bool = False,
                 description: str | None = None) -> list[LoraReport]:
    """Add LoRAs at run time, on top of any already attached; the base weights stay as they are
    (``x2v.runtime.lora_branches``)."""
    shapes = target_shapes(model)
    deltas, reports = prepare_loras(entries, shapes, strict=strict, model_description=description or
                                    describe_model(model))
    attach_terms(model, {key: deltas.terms(key) for key in deltas.keys()}, reports)
    return reports


def entries_for_expert(entries: list, expert: str | None) -> list[LoraEntry]:
    """The entries that apply to one DiT: all of them for a single DiT (``expert`` None), those naming the expert
    for a Wan2.2 expert. An entry without a name on an expert is an error: never one expert silently (C07)."""
    entries = [LoraEntry.from_config(e) for e in entries]
    if expert is None:
        if len({e.name for e in entries if e.name}) > 1:
            raise ValueError("lora_configs name both Wan2.2 experts, but one DiT is loaded; load the model root "
                             "(both experts), or pass expert= to load_dit")
        return entries
    unnamed = [e.path for e in entries if e.name is None]
    if unnamed:
        raise ValueError(f"{unnamed[0]}: a Wan2.2 two-expert model needs \"name\": \"high_noise_model\" or "
                         "\"low_noise_model\" in each lora_configs entry (which expert the LoRA is for; add one "
                         "entry per expert to apply it to both)")
    return [e for e in entries if e.name == expert]


def apply_loras(model: nn.Module, entries: list, *, dynamic: bool = False, strict: bool = False,
                expert: str | None = None) -> list[LoraReport]:
    """The LoRAs of ``entries`` meant for this DiT (see ``entries_for_expert``), merged or attached at run time."""
    mine = entries_for_expert(entries, expert)
    if not mine:
        return []
    if not dynamic and any(isinstance(module, GgufLinear) for module in model.modules()):
        raise UnsupportedModelError(f"{mine[0].path}: a LoRA cannot be merged into a GGUF model's blocks without "
                                    "quantizing them again; set lora_dynamic_apply true (the LoRA then runs beside "
                                    "the GGUF layers, as Pipeline.load_lora does)")
    apply = attach_loras if dynamic else merge_loras
    return apply(model, mine, strict=strict, description=describe_model(model, expert))
