"""Load a Wan DiT from a model folder, a DiT folder or a checkpoint file: the component recipe
(``x2v.loading.load``) plus what only the DiT has, Wan2.2's two experts and LoRAs."""

from __future__ import annotations

from pathlib import Path

import torch

from x2v.errors import CheckpointError
from x2v.loading.components import COMPONENTS
from x2v.loading.load import Plan, materialize, plan
from x2v.loading.lora import apply_loras, describe_model, entries_for_expert, merge_deltas, prepare_loras, target_shapes
from x2v.loading.resolve import Quantization, resolve_dit
from x2v.models.wan_dit import WanDiT, WanDiTConfig


def find_dit(path: Path, expert: str | None) -> Path:
    """The DiT checkpoint under ``path`` by the resolution rules; a Wan2.2 root needs ``expert``."""
    found = resolve_dit(path)
    if expert is not None:
        if expert not in found:
            raise CheckpointError(f"{path}: expert={expert!r} was asked for, but this is a single-DiT model.")
        return found[expert].path
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: a Wan2.2 two-expert model; pass expert='high_noise_model' or expert='low_noise_model' "
            "(or the expert's folder)."
        )
    return found["dit"].path


def load_dit(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    architecture: WanDiTConfig | None = None,
    expert: str | None = None,
    dit_quantized: bool | None = None,
    quant_scheme: str | None = None,
    lora_configs: list | None = None,
    lora_dynamic_apply: bool = False,
    lora_strict: bool = False,
) -> WanDiT:
    """A ready DiT: architecture from the weights (cross-checked with config.json), built on meta, tensors assigned.

    ``path`` is a checkpoint file, a DiT folder or a model directory (resolved as ``x2v inspect`` shows; a Wan2.2
    root needs ``expert``). ``architecture`` overrides what is read from the shapes and config.json.

    ``dtype`` is the compute dtype of linear layers and attention (default: the checkpoint's, bfloat16 for an
    int8/fp8 file); norms, modulation, time embedding and head stay in float32. Quantized weights (LightX2V
    int8/fp8, ComfyUI scaled fp8) are detected from the tensors; their linear layers stay 8-bit
    (``QuantLinear``: 8-bit matmuls on GPUs that have them, else dequantized one layer at a time).
    ``dit_quantized`` / ``quant_scheme`` (LightX2V's ``dit_quantized`` / ``dit_quant_scheme``) are optional:
    when given they must agree with the file, except that a float file declared quantized is quantized at
    load (per output channel, the layers releases quantize). ``model.load_info`` says what was loaded.

    ``lora_configs`` (``{"path", "strength", "alpha", "name"}`` entries or paths) are merged into the weights, or
    attached at run time with ``lora_dynamic_apply`` (``x2v.loading.lora``); a Wan2.2 ``expert`` takes the entries
    naming it. ``lora_strict``: a LoRA key that changes nothing is an error. Reports: ``load_info["loras"]``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory.")
    checkpoint = find_dit(path, expert) if path.is_dir() else path
    planned = plan(COMPONENTS["dit"], checkpoint, Quantization(dit_quantized, quant_scheme), architecture=architecture)
    return finish_dit(planned, dtype=dtype, device=device, expert=expert, lora_configs=lora_configs,
                      lora_dynamic_apply=lora_dynamic_apply, lora_strict=lora_strict)


def finish_dit(planned: Plan, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               expert: str | None = None, lora_configs: list | tuple | None = None, lora_dynamic_apply: bool = False,
               lora_strict: bool = False) -> WanDiT:
    """The DiT ``planned`` describes (``x2v.loading.load.plan``), loaded, with its LoRAs (see ``load_dit``)."""
    deltas, merged = None, set()
    if lora_configs and planned.quantize_kind and not lora_dynamic_apply:
        # Quantizing at load: the LoRAs go into the float weights before they are rounded to 8 bits.
        meta = planned.build()
        deltas, reports = prepare_loras(entries_for_expert(lora_configs, expert), target_shapes(meta),
                                        strict=lora_strict, model_description=describe_model(meta, expert))

    def delta_before_quantizing(key: str, on: torch.device) -> torch.Tensor | None:
        merged.add(key)
        return deltas.delta(key, on)

    model = materialize(planned, dtype=dtype, device=device, delta=delta_before_quantizing if deltas else None)
    encoding = planned.encoding
    model.load_info = {"encoding": encoding.name, "source": planned.source,
                       "quantized": encoding.weight_kind or planned.quantize_kind}
    if deltas:
        merge_deltas(model, deltas, skip=merged)
        model.load_info["loras"] = reports
    elif lora_configs:
        model.load_info["loras"] = apply_loras(model, list(lora_configs), dynamic=lora_dynamic_apply,
                                               strict=lora_strict, expert=expert)
    return model
