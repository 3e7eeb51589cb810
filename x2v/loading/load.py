"""One recipe loads every component of ``x2v.loading.components``: find the file, read it (memory-mapped), map its
keys to the official names, read the architecture and the quantization, build the network on the meta device,
swap in the 8-bit linears, assign the tensors (cast once, no second copy).

``plan`` stops before any weight is read (``x2v inspect`` uses it); ``load_component`` finishes the job. The public
loaders below are that recipe with each component's keyword arguments; ``x2v.loading.dit`` adds the DiT's experts
and LoRAs on top.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from x2v.errors import CheckpointError
from x2v.formats.keys import summarize_keys
from x2v.formats.quant import FLOAT, Encoding, scheme_kind
from x2v.formats.tokenizer import WanTokenizer
from x2v.loading.components import COMPONENTS, Component, with_overrides
from x2v.loading.gguf import check_gguf_scheme, is_gguf, keep_packed, read_weights
from x2v.loading.quantized import prepare_quantized, read_quantization
from x2v.loading.resolve import Quantization, find_in_folder
from x2v.loading.weights import assign_weights, build_on_meta

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a checkpoint will load as, read from its header and shapes only."""

    component: Component
    checkpoint: Path
    tensors: dict[str, torch.Tensor]  # official names, the ones the network holds (memory-mapped, unread)
    architecture: Any  # the network's config
    encoding: Encoding  # how the file stores its weights
    quantize_kind: str | None  # "int8" / "fp8": a float file quantized at load
    default_dtype: torch.dtype | None  # the file's own compute dtype (None: float32)

    @property
    def source(self) -> str:
        return str(self.checkpoint)

    def build(self) -> nn.Module:
        """The network on the meta device (no memory, no random initialisation)."""
        return build_on_meta(lambda: self.component.model(self.architecture))


def checkpoint_of(component: Component, path: str | os.PathLike, quantization: Quantization) -> Path:
    """``path`` itself when it is a file, else the component's file in that folder."""
    path = Path(path).expanduser()
    if not path.exists():
        keys = " / ".join(component.file_keys)
        raise CheckpointError(f"{path}: not found. Pass a Wan model folder or the {component.what} checkpoint file "
                              f"(config key {keys}).")
    if path.is_file() or component.name == "dit":  # a DiT folder is resolved by x2v.loading.dit
        return path
    kind = scheme_kind(quantization.scheme, component.name) if quantization.quantized else None
    return find_in_folder(component.name, path, kind)


def plan(component: Component, checkpoint: Path, quantization: Quantization = Quantization(), *,
         architecture: Any = None, overrides: dict | None = None) -> Plan:
    """Read ``checkpoint``'s header: official names, architecture (``architecture`` replaces what the shapes say,
    ``overrides`` changes some of its fields), encoding checked against ``quantization``."""
    source = str(checkpoint)
    packed = is_gguf(checkpoint)
    tensors = component.to_official(read_weights(checkpoint), source)
    config = with_overrides(architecture or component.architecture(tensors, checkpoint), overrides)
    default_dtype = component.default_dtype(tensors)
    tensors = component.used(tensors, config)
    encoding, quantize_kind = FLOAT, None
    if packed:  # GGUF: its blocks stay as they are (materialize); a declared scheme must name its type
        check_gguf_scheme(tensors, quantization, source, component.name)
    elif component.quantizable:
        encoding, quantize_kind = read_quantization(tensors, source, component.name, quantization.quantized,
                                                    quantization.scheme)
    return Plan(component, checkpoint, tensors, config, encoding, quantize_kind, default_dtype)


def compute_dtype(plan: Plan, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype asked for; else bfloat16 for 8-bit weights, else the file's own (float32 when it has none)."""
    if dtype is not None:
        return dtype
    if plan.encoding.quantized or plan.quantize_kind:
        return torch.bfloat16
    return plan.default_dtype or torch.float32


def log_quantization(plan: Plan, dtype: torch.dtype) -> None:
    """Log how 8-bit weights run (the command line shows INFO with --verbose)."""
    encoding = plan.encoding
    if encoding.quantized:
        log.info("%s: %s weights (%s), run quantized with %s compute.", plan.source, encoding.family, encoding.name,
                 dtype)
        if encoding.unusual_layers:
            log.info("%s: also quantizes layers released files keep in high precision: %s.",
                     plan.source, summarize_keys(f"{layer}.weight" for layer in encoding.unusual_layers))
    elif plan.quantize_kind:
        log.info("%s: float weights quantized to %s per output channel at load.", plan.source, plan.quantize_kind)


def materialize(plan: Plan, *, dtype: torch.dtype | None, device: torch.device | str, delta=None) -> nn.Module:
    """Build ``plan``'s network on meta and assign its tensors: 8-bit linears where the file (or the quantization
    asked for) has them, float tensors cast once to the compute dtype (``keep_fp32`` ones to float32).
    ``delta(key, device)``: a LoRA change added to a float weight before it is quantized at load."""
    dtype = compute_dtype(plan, dtype)
    log_quantization(plan, dtype)
    component = plan.component
    model = plan.build()
    tensors = keep_packed(model, plan.tensors, dtype, component.keep_fp32)
    tensors = prepare_quantized(model, tensors, plan.encoding, quantize_kind=plan.quantize_kind,
                                component=component.name, dtype=dtype, device=device, keep_fp32=component.keep_fp32,
                                delta=delta)
    return assign_weights(model, tensors, dtype=dtype, device=device, keep_fp32=component.keep_fp32,
                          source=plan.source, what=component.describe(plan.architecture))


def load_component(name: str, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", quantization: Quantization = Quantization(),
                   overrides: dict | None = None) -> nn.Module:
    """Component ``name`` of ``COMPONENTS`` from a model folder or its checkpoint file, ready to run."""
    component = COMPONENTS[name]
    checkpoint = checkpoint_of(component, path, quantization)
    return materialize(plan(component, checkpoint, quantization, overrides=overrides), dtype=dtype, device=device)


# --- the public loaders ----------------------------------------------------------------------------------------


def load_text_encoder(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                      device: torch.device | str = "cpu", quantized: bool | None = None,
                      quant_scheme: str | None = None) -> nn.Module:
    """umT5 encoder from a model folder or a checkpoint file (official or HF/ComfyUI names).

    ``dtype=None`` keeps the checkpoint's dtype (bf16 for the official file). Every weight, norms included, is stored
    in ``dtype``, as in the official bf16 runtime; norms still compute their variance in float32. Quantized files
    (LightX2V ``models_t5_umt5-xxl-enc-{fp8,int8}.pth``, ComfyUI scaled fp8) keep their attention and feed-forward
    linears 8-bit. ``quantized`` / ``quant_scheme`` (``t5_quantized`` / ``t5_quant_scheme``) must agree with the
    file; with a float file they quantize it at load.
    """
    return load_component("t5", path, dtype=dtype, device=device, quantization=Quantization(quantized, quant_scheme))


def load_image_encoder(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                       device: torch.device | str = "cpu", num_heads: int | None = None,
                       quantized: bool | None = None, quant_scheme: str | None = None) -> nn.Module:
    """The CLIP vision tower (Wan2.1 I2V / FLF2V) from a model folder or a checkpoint (official or transformers
    names).

    ``dtype=None`` keeps the checkpoint's floating dtype; LayerNorm weights are always stored in float32.
    ``num_heads`` overrides the head count inferred from the width (the checkpoint does not store it). Quantized
    LightX2V files (``...-vit-huge-14-{fp8,int8}.pth``) keep their attention and MLP linears 8-bit; ``quantized`` /
    ``quant_scheme`` (``clip_quantized`` / ``clip_quant_scheme``) must agree with the file, and with a float file
    quantize it at load.
    """
    return load_component("clip", path, dtype=dtype, device=device, quantization=Quantization(quantized, quant_scheme),
                          overrides={"num_heads": num_heads} if num_heads else None)


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> nn.Module:
    """Wan2.1 (z 16) or Wan2.2 (z 48) VAE, recognized from its tensors, from a model folder or a checkpoint file
    (.pth / .safetensors / shard index). ``dtype=None`` means float32, as the official code runs the VAE;
    encode / decode compute in the weights' dtype."""
    return load_component("vae", path, dtype=dtype, device=device)


def load_tokenizer(path: str | os.PathLike, *, text_len: int = 512) -> WanTokenizer:
    """The umT5 tokenizer from a model folder or a tokenizer folder; see ``WanTokenizer`` for what a call returns."""
    from transformers import AutoTokenizer  # the only use of transformers at run time

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a folder. Pass the model folder or the tokenizer folder "
                              "(config key t5_tokenizer_path).")
    directory = find_in_folder("tokenizer", directory)
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{directory}: cannot load the umT5 tokenizer ({e}). Check that the folder is complete, "
            "or set the config key t5_tokenizer_path to a working tokenizer folder."
        ) from None
    return WanTokenizer(hf_tokenizer, text_len)
