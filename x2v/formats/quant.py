"""Quantized DiT weight encodings, as tables and pure functions: detect, check against the config, dequantize.

The encoding is read from the tensors themselves (dtypes, scale names and shapes), never from file names or
metadata: LightX2V files carry no marker, and the substring "scaled_fp8" in a LightX2V name does not mean ComfyUI
layout. Every function works on official-named keys (the output of ``dit_keys.to_official``).

Encodings (per quantized layer ``<layer>.weight``):

* ``lightx2v-int8`` / ``lightx2v-fp8``: int8 / float8 weight + ``<layer>.weight_scale`` ``[out, 1]`` (per channel).
* ``fp8-pertensor``: float8 weight + single-element ``weight_scale`` + optional ``input_scale`` (LightX2V scheme
  ``fp8-pertensor``, also ModelOpt-style files).
* ``comfy-scaled-fp8`` / ``comfy-scaled-int8``: weight + 0-dim ``<layer>.scale_weight`` + optional 0-dim
  ``scale_input``, usually with the ``scaled_fp8`` marker tensor (ComfyUI, LightX2V ``*_comfyui.safetensors``;
  the int8 variant is written by LightX2V's converter in ComfyUI mode).
* ``plain-fp8``: float8 weights without any scale, the bf16 values cast straight to fp8 (ComfyUI's
  ``*_fp8_e4m3fn.safetensors`` repacks, LightX2V's ``--comfyui_mode --full_quantized``): scale 1, as ComfyUI loads
  them. Told apart from a scaled file that lost its scales by the values: scaled weights reach the fp8 maximum.

In every case ``W = q * scale``. Activation scales are static calibration for fp8 matmuls: irrelevant once the
weights are dequantized, so they are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from x2v.errors import CheckpointError, UnsupportedModelError
from x2v.formats.keys import summarize_keys

MARKER = "scaled_fp8"  # ComfyUI: the marker's presence means "scaled fp8 file"; its value is irrelevant here
WEIGHT_KINDS = {torch.int8: "int8", torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8"}
WEIGHT_SCALES = ("weight_scale", "scale_weight")  # LightX2V spelling, ComfyUI spelling
ACTIVATION_SCALES = {"input_scale": "weight_scale", "scale_input": "scale_weight"}  # -> the weight scale it goes with
SCALE_NAMES = (*WEIGHT_SCALES, *ACTIVATION_SCALES)
PER_CHANNEL, PER_TENSOR = "per-channel", "per-tensor"

# (scale name, weight kind, scale granularity) -> encoding name; any other combination is not a known layout.
ENCODINGS = {
    ("weight_scale", "int8", PER_CHANNEL): "lightx2v-int8",
    ("weight_scale", "fp8", PER_CHANNEL): "lightx2v-fp8",
    ("weight_scale", "fp8", PER_TENSOR): "fp8-pertensor",
    ("scale_weight", "fp8", PER_TENSOR): "comfy-scaled-fp8",
    ("scale_weight", "int8", PER_TENSOR): "comfy-scaled-int8",
    (None, "fp8", PER_TENSOR): "plain-fp8",
}
# A plain fp8 cast keeps the weights' own range (|w| of a few units); a scaled fp8 weight reaches the fp8 maximum
# (448) in every row (per channel) or somewhere (per tensor). Weights sampled to tell them apart:
PLAIN_FP8_MAX, PLAIN_FP8_SAMPLES = 224.0, 4

# Layers the LightX2V converter quantizes in released Wan DiTs (2-D tensors whose third name component is
# self_attn, cross_attn or ffn); everything else stays in high precision.
RELEASE_QUANTIZED = re.compile(
    r"^(?:vace_)?blocks\.\d+\.(?:self_attn\.[qkvo]|cross_attn\.(?:[qkvo]|k_img|v_img)|ffn\.[02])\.weight$"
)

# dit_quant_scheme -> (weight kind, scale granularity) of the files its kernels run; None: not quantized.
# Per-channel kernels also run per-tensor files (a per-tensor scale is a per-channel scale repeated), not the reverse.
SCHEME_FAMILIES: dict[str, tuple[str, str] | None] = {
    "Default": None,
    "fp8-vllm": ("fp8", PER_CHANNEL),
    "int8-vllm": ("int8", PER_CHANNEL),
    "fp8-sgl": ("fp8", PER_CHANNEL),
    "int8-sgl": ("int8", PER_CHANNEL),
    "fp8-q8f": ("fp8", PER_CHANNEL),
    "int8-q8f": ("int8", PER_CHANNEL),
    "fp8-triton": ("fp8", PER_CHANNEL),
    "int8-triton": ("int8", PER_CHANNEL),
    "fp8-torchao": ("fp8", PER_CHANNEL),
    "int8-torchao": ("int8", PER_CHANNEL),
    "fp8-pertensor": ("fp8", PER_TENSOR),
    # Vendor kernels of the same per-channel family.
    "int8-vllm-hygon-dcu": ("int8", PER_CHANNEL),
    "fp8-musa": ("fp8", PER_CHANNEL),
    "int8-tmo": ("int8", PER_CHANNEL),
    "int8-npu": ("int8", PER_CHANNEL),
    "fp8-intel-xpu": ("fp8", PER_CHANNEL),
    "int8-iluvatar": ("int8", PER_CHANNEL),
}

# t5_quant_scheme / clip_quant_scheme also take the bare kind (LightX2V lists "int8" and "fp8" for umT5).
ENCODER_SCHEMES = {"int8": ("int8", PER_CHANNEL), "fp8": ("fp8", PER_CHANNEL)}


def scheme_families(component: str) -> dict[str, tuple[str, str] | None]:
    """The scheme names ``<component>_quant_scheme`` takes (component dit, t5 or clip) -> their families."""
    return SCHEME_FAMILIES if component == "dit" else {**SCHEME_FAMILIES, **ENCODER_SCHEMES}


GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_S", "Q5_K_M", "Q5_0", "Q5_1", "Q4_K_S", "Q4_K_M", "Q4_0", "Q4_1", "Q3_K_S",
              "Q3_K_M", "BF16")
# LightX2V's GGUF schemes (and x2v's for the other types it reads): they name a GGUF file's type, which x2v reads
# from the file itself (x2v.loading.gguf); on another file they are a contradiction.
GGUF_SCHEMES = ("W-gguf-Q4_K", *(f"gguf-{t}" for t in (*GGUF_TYPES, "Q5_K", "Q4_K", "Q3_K", "Q2_K", "F16")))

# Schemes LightX2V knows whose weight layouts x2v cannot read yet -> what they hold.
UNSUPPORTED_SCHEMES: dict[str, str] = {
    "fp8-b128-deepgemm": "fp8 weights with 128x128 block scales",
    "nvfp4": "NVFP4 (packed fp4 weights with fp8 block-16 scales)",
    "mxfp4": "MXFP4 (packed fp4 weights with e8m0 block scales)",
    "mxfp6-mxfp8": "MXFP6 weights with e8m0 block scales",
    "mxfp8": "MXFP8 weights with e8m0 block scales",
    "int4-g128-marlin": "int4 group-128 weights (Marlin)",
}

# LightX2V's names before Oct 2025 (config key mm_config.mm_type) -> today's dit_quant_scheme.
LEGACY_SCHEMES = {
    "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm": "fp8-vllm",
    "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Vllm-ActSgl": "fp8-vllm",
    "W-int8-channel-sym-A-int8-channel-sym-dynamic-Vllm": "int8-vllm",
    "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Sgl": "fp8-sgl",
    "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Sgl-ActVllm": "fp8-sgl",
    "W-int8-channel-sym-A-int8-channel-sym-dynamic-Sgl-ActVllm": "int8-sgl",
    "W-fp8-channel-sym-A-fp8-channel-sym-dynamic-Q8F": "fp8-q8f",
    "W-int8-channel-sym-A-int8-channel-sym-dynamic-Q8F": "int8-q8f",
    "W-int8-channel-sym-A-int8-channel-sym-dynamic-Torchao": "int8-torchao",
    "W-fp8-block128-sym-A-fp8-channel-group128-sym-dynamic-Deepgemm": "fp8-b128-deepgemm",
    "W-fp8-block128-sym-A-fp8-channel-group128-sym-dynamic-Deepgemm-ActSgl": "fp8-b128-deepgemm",
    "W-int4-group128-sym-Marlin": "int4-g128-marlin",
}


@dataclass(frozen=True)
class Encoding:
    """How a checkpoint stores its weights. ``layers`` are the quantized layers (``blocks.0.ffn.0``...)."""

    name: str  # "float" or a value of ENCODINGS
    weight_kind: str | None = None  # "int8" | "fp8"
    granularity: str | None = None  # PER_CHANNEL | PER_TENSOR
    scale_name: str | None = None  # "weight_scale" | "scale_weight"; None: plain fp8, scale 1
    layers: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return bool(self.layers)

    @property
    def family(self) -> str:
        return f"{self.weight_kind} {self.granularity}" if self.quantized else "float (not quantized)"

    @property
    def scale_keys(self) -> frozenset[str]:
        """The tensors that describe the quantization, not the model: every layer's scales and the marker."""
        return frozenset({MARKER} | {f"{layer}.{n}" for layer in self.layers for n in SCALE_NAMES})

    def scale_of(self, tensors: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
        """The stored weight scale of a quantized ``layer``; 1 for a plain fp8 cast, which stores none."""
        if self.scale_name is None:
            return torch.ones((), dtype=torch.float32)
        return tensors[f"{layer}.{self.scale_name}"]

    @property
    def unusual_layers(self) -> tuple[str, ...]:
        """Quantized layers that released files keep in high precision (accepted, worth a notice)."""
        return tuple(layer for layer in self.layers if not quantized_in_releases(f"{layer}.weight"))


FLOAT = Encoding("float")


def without_scales(tensors: dict[str, torch.Tensor], encoding: Encoding) -> dict[str, torch.Tensor]:
    """The model's own tensors (a quantized weight has its float shape): scales and marker left out."""
    return {k: t for k, t in tensors.items() if k not in encoding.scale_keys}


# The same for LightX2V's quantized umT5 and CLIP files (official names; CLIP also without ``visual.``).
T5_RELEASE_QUANTIZED = re.compile(r"^blocks\.\d+\.(?:attn\.[qkvo]|ffn\.(?:gate\.0|fc1|fc2))\.weight$")
CLIP_RELEASE_QUANTIZED = re.compile(r"^(?:visual\.)?transformer\.\d+\.(?:attn\.(?:to_qkv|proj)|mlp\.[02])\.weight$")
RELEASE_RULES = {"dit": RELEASE_QUANTIZED, "t5": T5_RELEASE_QUANTIZED, "clip": CLIP_RELEASE_QUANTIZED}


def quantized_in_releases(key: str, component: str = "dit") -> bool:
    """Whether LightX2V's released int8/fp8 files of ``component`` (dit, t5, clip) store this official key
    quantized: the block attention and feed-forward linears only."""
    return RELEASE_RULES[component].match(key) is not None


def _scale_granularity(scale_key: str, scale: torch.Tensor, weight: torch.Tensor, source: str) -> str:
    out_channels = weight.shape[0] if weight.dim() else 1
    if not scale.is_floating_point() or scale.dtype in WEIGHT_KINDS:
        raise CheckpointError(
            f"{source}: scale {scale_key} is {scale.dtype}; expected a float32/bfloat16/float16 scale. "
            "This is not a layout x2v can read; use a LightX2V int8/fp8 or ComfyUI scaled-fp8 file."
        )
    if scale.numel() == 1:
        return PER_TENSOR
    if scale_key.endswith(".weight_scale") and tuple(scale.shape) == (out_channels, 1):
        return PER_CHANNEL
    if scale_key.endswith(".weight_scale") and weight.dim() == 2 and tuple(scale.shape) == (
        -(-weight.shape[0] // 128), -(-weight.shape[1] // 128)
    ):
        raise UnsupportedModelError(
            f"{source}: {scale_key} {tuple(scale.shape)} holds 128x128 block scales (LightX2V fp8-b128-deepgemm), "
            "not supported yet by x2v. Use the per-channel fp8/int8 release of this model."
        )
    expected = f"[{out_channels}, 1] (per channel) or a single element" if scale_key.endswith(".weight_scale") \
        else "a single element (0-dim, per tensor)"
    raise CheckpointError(
        f"{source}: {scale_key} has shape {tuple(scale.shape)} for a weight of shape {tuple(weight.shape)}; "
        f"expected {expected}. The file is corrupt or in a layout x2v does not know; download it again."
    )


def _check_scale_keys(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every ``*scale*`` tensor must be a known scale of a quantized weight: an ignored scale means garbage."""
    unknown, orphans, on_float = [], [], []
    for key, tensor in tensors.items():
        layer, _, name = key.rpartition(".")
        if key == MARKER or "scale" not in name:
            continue
        if name not in WEIGHT_SCALES and name not in ACTIVATION_SCALES:
            unknown.append(key)
            continue
        weight = tensors.get(f"{layer}.weight")
        if weight is None:
            orphans.append(key)
        elif weight.dtype not in WEIGHT_KINDS:
            on_float.append(f"{key} (weight {weight.dtype})")
        elif name in ACTIVATION_SCALES and (f"{layer}.{ACTIVATION_SCALES[name]}" not in tensors or tensor.numel() != 1):
            unknown.append(f"{key} {tuple(tensor.shape)}")
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} unrecognized scale tensor(s): {', '.join(unknown[:5])}. x2v reads "
            "weight_scale ([out, 1] or one element, LightX2V), scale_weight (0-dim, ComfyUI) and the single-element "
            "activation scales input_scale (with weight_scale) / scale_input (with scale_weight). Ignoring a scale "
            "would run wrongly scaled weights, so this layout (e.g. NVFP4 weight_scale_2) is refused; use a "
            "LightX2V int8/fp8 or ComfyUI scaled-fp8 file."
        )
    if orphans:
        raise CheckpointError(
            f"{source}: {len(orphans)} scale tensor(s) without their weight: {summarize_keys(orphans)}. "
            "The file is incomplete or corrupt; download it again."
        )
    if on_float:
        raise CheckpointError(
            f"{source}: {len(on_float)} scale(s) attached to weights that are not int8/fp8: "
            f"{', '.join(on_float[:3])}. The file was probably converted without applying its scales; x2v will not "
            "guess whether they still apply. Use the original quantized file or a plain bf16/fp16 one."
        )


def detect_encoding(tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> Encoding:
    """The encoding of an official-named DiT state dict, validated: every quantized tensor has exactly one scale."""
    packed = [k for k, t in tensors.items() if t.dtype == torch.uint8]
    if packed:
        raise UnsupportedModelError(
            f"{source}: {len(packed)} uint8 tensor(s) ({summarize_keys(packed)}): packed NVFP4/MXFP weights, "
            "not supported yet by x2v. Use the fp8, int8 or bf16 release of this model."
        )
    _check_scale_keys(tensors, source)
    layouts: dict[tuple[str, str, str], list[str]] = {}
    unscaled, doubly_scaled = [], []
    for key, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_KINDS or key == MARKER:
            continue
        layer = key.removesuffix(".weight")
        scales = [n for n in WEIGHT_SCALES if f"{layer}.{n}" in tensors] if key.endswith(".weight") else []
        if not scales:
            unscaled.append(key)
            continue
        if len(scales) > 1:
            doubly_scaled.append(layer)
            continue
        scale_key = f"{layer}.{scales[0]}"
        granularity = _scale_granularity(scale_key, tensors[scale_key], tensor, source)
        layouts.setdefault((scales[0], WEIGHT_KINDS[tensor.dtype], granularity), []).append(layer)
    if unscaled:
        if not layouts and plain_fp8_cast(tensors, unscaled):
            return Encoding(ENCODINGS[None, "fp8", PER_TENSOR], "fp8", PER_TENSOR, None,
                            tuple(key.removesuffix(".weight") for key in unscaled))
        described = ", ".join(f"{key} ({tensors[key].dtype})" for key in unscaled[:3])
        raise CheckpointError(
            f"{source}: {len(unscaled)} quantized tensor(s) without a scale: {described}"
            f"{' ...' if len(unscaled) > 3 else ''}. Their values reach the 8-bit range a scale maps (or they are "
            "int8, or mixed with scaled layers), so the scales were lost; casting them without their scales gives "
            "garbage, so x2v refuses. Expected <layer>.weight_scale (LightX2V) or <layer>.scale_weight (ComfyUI) "
            "next to each quantized weight; use the bf16/fp16 release, or a LightX2V int8/fp8 or ComfyUI scaled-fp8 "
            "file."
        )
    if doubly_scaled:
        raise CheckpointError(
            f"{source}: {len(doubly_scaled)} layer(s) carry both weight_scale and scale_weight "
            f"({summarize_keys(doubly_scaled)}); x2v cannot tell which applies. Re-export the file with one of them."
        )
    if not layouts:
        return FLOAT
    if len(layouts) > 1:
        described = "; ".join(
            f"{ENCODINGS.get(layout, '/'.join(layout))}: {len(layers)} layer(s), e.g. {layers[0]}"
            for layout, layers in layouts.items()
        )
        raise CheckpointError(
            f"{source}: mixes weight encodings ({described}). No known tool writes such a file; it was probably "
            "merged from several files. Use one release file as published."
        )
    (layout, layers), = layouts.items()
    scale_name, weight_kind, granularity = layout
    if layout not in ENCODINGS:
        raise CheckpointError(
            f"{source}: {weight_kind} weights with {granularity} {scale_name} tensors, a layout no known tool "
            f"writes (known: {', '.join(ENCODINGS.values())}). Use a LightX2V or ComfyUI release file."
        )
    if MARKER in tensors and scale_name != "scale_weight":
        raise CheckpointError(
            f"{source}: has the ComfyUI '{MARKER}' marker but LightX2V-style weight_scale tensors; no known tool "
            "writes this mix, so x2v will not guess which runtime's scaling applies. Use the file as published."
        )
    return Encoding(ENCODINGS[layout], weight_kind, granularity, scale_name, tuple(layers))


def plain_fp8_cast(tensors: dict[str, torch.Tensor], unscaled: list[str]) -> bool:
    """Whether unscaled 8-bit weights are bf16 values cast straight to fp8 (scale 1): fp8 ``.weight`` tensors only,
    no ComfyUI scaled-fp8 marker, and sampled weights that stay far below the fp8 maximum a scale would reach."""
    if MARKER in tensors or not all(k.endswith(".weight") and WEIGHT_KINDS[tensors[k].dtype] == "fp8"
                                    for k in unscaled):
        return False
    sample = unscaled[:PLAIN_FP8_SAMPLES]
    return all(tensors[k].float().abs().amax() < PLAIN_FP8_MAX for k in sample)


def _accepts(family: tuple[str, str], encoding: Encoding) -> bool:
    weight_kind, granularity = family
    return weight_kind == encoding.weight_kind and (granularity == PER_CHANNEL or encoding.granularity == PER_TENSOR)


def schemes_for(encoding: Encoding) -> list[str]:
    """The dit_quant_scheme values that describe this encoding, most common first."""
    if not encoding.quantized:
        return ["Default"]
    return [s for s, family in SCHEME_FAMILIES.items() if family and _accepts(family, encoding)]


def _holds(encoding: Encoding) -> str:
    if not encoding.quantized:
        return "this file holds float weights (no int8/fp8 tensors)"
    return f"this file holds {encoding.family} weights ({encoding.name})"


def _fix(encoding: Encoding, component: str) -> str:
    if not encoding.quantized:
        declare = f"set {component}_quantized false ({component}_quant_scheme Default)"
    else:
        declare = f"set {component}_quantized true and {component}_quant_scheme {schemes_for(encoding)[0]} " \
                  f"(or another {encoding.weight_kind} scheme)"
    return f"{declare}, or leave both out: x2v detects the encoding"


def check_scheme(encoding: Encoding, declared_scheme: str | None, quantized: bool | None, source: str,
                 component: str = "dit") -> None:
    """Refuse a LightX2V-style declaration (``dit_quantized`` / ``dit_quant_scheme``, or the ``t5_`` / ``clip_``
    keys for ``component`` t5 / clip) that contradicts the file.

    x2v detects the encoding itself, so declaring nothing is fine; only a contradiction is an error, because it
    means the user pointed at the wrong file or believes it holds something else. Legacy long names (mm_type)
    are accepted. Per-channel schemes accept per-tensor files of the same weight kind (e.g. ComfyUI scaled fp8
    with fp8-vllm): a per-tensor scale is a per-channel scale repeated. fp8-pertensor accepts per-tensor only.
    """
    holds, fix = _holds(encoding), _fix(encoding, component)
    families = scheme_families(component)
    scheme = LEGACY_SCHEMES.get(declared_scheme, declared_scheme)
    if scheme in GGUF_SCHEMES:
        raise CheckpointError(f"{source}: {component}_quant_scheme '{declared_scheme}' names a GGUF file, but {holds}. "
                              f"Point {component}_quantized_ckpt at the .gguf file, or: {fix}.")
    if scheme in UNSUPPORTED_SCHEMES:
        raise UnsupportedModelError(
            f"{source}: {component}_quant_scheme '{declared_scheme}' ({UNSUPPORTED_SCHEMES[scheme]}) is recognized "
            f"but not supported yet by x2v. Supported: {', '.join(families)} (and their legacy long names). "
            f"As {holds}: {fix}."
        )
    if scheme is not None and scheme not in families:
        raise CheckpointError(
            f"{source}: unknown {component}_quant_scheme '{declared_scheme}'. Expected one of: "
            f"{', '.join(families)} (or their legacy long names). As {holds}: {fix}."
        )
    scheme_quantized = None if scheme is None else scheme != "Default"
    if quantized is not None and scheme_quantized is not None and quantized != scheme_quantized:
        raise CheckpointError(
            f"{source}: contradictory settings {component}_quantized {str(quantized).lower()} and "
            f"{component}_quant_scheme '{declared_scheme}'. As {holds}: {fix}."
        )
    declared_quantized = quantized if quantized is not None else scheme_quantized
    if declared_quantized is None:
        return
    if declared_quantized and not encoding.quantized:
        if scheme_kind(scheme, component) is None:
            raise CheckpointError(
                f"{source}: {component}_quantized is true but {holds} and no {component}_quant_scheme says how to "
                f"quantize it. Set {component}_quant_scheme to an fp8 scheme (fp8-vllm) or an int8 one (int8-vllm) to "
                f"quantize it at load, or point {component}_quantized_ckpt at a quantized file."
            )
        return  # a float file declared quantized is quantized at load
    if not declared_quantized and encoding.quantized:
        raise CheckpointError(
            f"{source}: declared not quantized ({component}_quantized false / {component}_quant_scheme Default) but "
            f"{holds}: {fix}."
        )
    family = families.get(scheme)
    if family is not None and not _accepts(family, encoding):
        raise CheckpointError(
            f"{source}: {component}_quant_scheme '{declared_scheme}' expects {' '.join(family)} weights, but "
            f"{holds}: {fix}."
        )


def scheme_kind(scheme: str | None, component: str = "dit") -> str | None:
    """``"int8"`` / ``"fp8"`` for a per-channel ``<component>_quant_scheme`` (legacy names too), None for
    Default/None/unknown."""
    family = scheme_families(component).get(LEGACY_SCHEMES.get(scheme, scheme)) if scheme else None
    return family[0] if family else None
