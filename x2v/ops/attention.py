"""Attention entry point shared by every network, and the optional kernels LightX2V's attention keys name.

``torch_sdpa`` is always there (PyTorch picks its fastest kernel for the card: cuDNN or flash on H100/H200).
``flash_attn2`` / ``flash_attn3`` / ``sage_attn2`` ... call their packages when installed; x2v's own 8-bit types are
``sage_triton`` (a Triton kernel; CUDA builds of PyTorch bring Triton) and ``cudnn_fp8`` (cuDNN's fp8 attention;
needs ``nvidia-cudnn-frontend``). Otherwise, for inputs a kernel cannot take (CPU, float32), or if a kernel fails
(e.g. does not build for the card), the call runs torch SDPA, announced once.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

from x2v.errors import first_line
from x2v.ops.fused import fused_enabled
from x2v.ops.quant_math import Fp8Query

log = logging.getLogger(__name__)

TORCH_SDPA = "torch_sdpa"



def installed(module: str, function: str, **kwargs):
    """A kernel of an optional package, imported when first asked for."""
    return lambda: functools.partial(getattr(importlib.import_module(module), function), **kwargs)


def sage_triton():
    from x2v.ops.sage_triton import sage_attention  # imports Triton: only when the type is asked for

    return sage_attention


def cudnn_fp8():
    from x2v.ops.cudnn_fp8 import cudnn_fp8_attention  # imports cuDNN's frontend: only when asked for

    return cudnn_fp8_attention


def cudnn_fp8_output():
    from x2v.ops.cudnn_fp8 import cudnn_fp8_attention_fp8_output

    return cudnn_fp8_attention_fp8_output


# Attention type -> (its function, imported when first asked for; what to install); every kernel takes
# [B, L, heads, d].
KERNELS = {
    "flash_attn2": (installed("flash_attn", "flash_attn_func"), "flash-attn"),
    "flash_attn3": (installed("flash_attn_interface", "flash_attn_func"),
                    "FlashAttention 3 (built from its repository)"),
    "sage_attn2": (installed("sageattention", "sageattn", tensor_layout="NHD"), "sageattention"),
    "sage_attn2_k_int8_v_fp8": (installed("sageattention", "sageattn_qk_int8_pv_fp8_cuda", tensor_layout="NHD"),
                                "SageAttention 2 (built from its repository)"),
    # x2v's own 8-bit types: int8 Q·K + fp8 P·V in Triton; cuDNN's fp8 attention
    "sage_triton": (sage_triton, "triton"),
    "cudnn_fp8": (cudnn_fp8, "nvidia-cudnn-frontend"),
}
OWN_8BIT = ("sage_triton", "cudnn_fp8")
# Types whose kernel can also hand over its output in fp8 with one scale (attention_fp8_output): type -> function
FP8_OUTPUT = {"cudnn_fp8": cudnn_fp8_output}
# Types whose kernel takes Q already in fp8 with one scale (an Fp8Query), e.g. from the RMS norm before it
FP8_QUERY = ("cudnn_fp8",)
# Types LightX2V knows that x2v does not implement (sparse / radial / distributed variants): they run torch SDPA.
NOT_IMPLEMENTED = ("flash_attn4", "sage_attn3", "radial_attn", "svg_attn", "svg2_attn", "nbhd_attn",
                   "nbhd_attn_flashinfer", "sparge_attn", "spas_sage_attn2", "spas_sage_attn3", "spas_flash_attn4",
                   "draft_attn", "dynamic_sparse_attn", "general_sparse_attn", "rainfusion_attn", "sol_attn",
                   "flex_attn", "ring", "ulysses")
HALF_DTYPES = (torch.float16, torch.bfloat16)  # what the optional kernels compute in
KERNEL_DEVICES = ("cuda",)  # where the optional kernels run (tests add "cpu" with Triton's interpreter or fakes)
failed_types: set[str] = set()  # attention types that raised once: SDPA runs for them from then on


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@functools.cache
def kernel(name: str):
    """The function for attention type ``name``, or None (torch SDPA runs): said once per name."""
    if name == TORCH_SDPA:
        return None
    if name in NOT_IMPLEMENTED:
        log.warning("attention type %s is not implemented in x2v; torch SDPA runs instead (same result).", name)
        return None
    if name not in KERNELS:
        raise ValueError(f"unknown attention type {name!r}; expected {TORCH_SDPA}, {', '.join(KERNELS)} "
                         f"(or one of LightX2V's other types, which run torch SDPA)")
    load, package = KERNELS[name]
    try:
        return load()
    except (ImportError, AttributeError) as e:
        hint = (f"; x2v's own 8-bit attention types {' / '.join(OWN_8BIT)} need only Triton / cuDNN's frontend"
                if name.startswith("sage_attn") else "")
        log.warning("attention type %s needs %s (%s); torch SDPA runs instead%s.", name, package, first_line(e), hint)
        return None


def live_kernel(backend: str):
    """The function for attention type ``backend``, or None where torch SDPA runs (the type itself, one that failed
    once, or a kernel that is not installed)."""
    return None if backend == TORCH_SDPA or backend in failed_types else kernel(backend)


def takes_fp8_query(backend: str, v: torch.Tensor) -> bool:
    """Whether ``attention(q, k, v, backend)`` is best given Q as an ``Fp8Query``: the type's kernel (``FP8_QUERY``)
    runs for these values and quantizes Q to fp8 with one scale anyway; not inside ``unfused()``."""
    return backend in FP8_QUERY and fused_enabled() and kernel_takes(v) and live_kernel(backend) is not None


def attention(q: torch.Tensor | Fp8Query, k: torch.Tensor, v: torch.Tensor, backend: str = TORCH_SDPA) -> torch.Tensor:
    """Global, unmasked softmax attention with scale 1/sqrt(head_dim).

    ``q`` is ``[B, Lq, heads, d]`` (an ``Fp8Query`` where ``takes_fp8_query``), ``k``/``v`` are
    ``[B, Lk, heads, d]``; returns ``[B, Lq, heads, d]`` in ``v``'s dtype.
    ``backend`` is a LightX2V attention type (``self_attn_1_type`` ...); see ``kernel``.
    """
    out = _run(backend, live_kernel(backend), q, k, v)
    if out is None:
        return sdpa(q.dequantize(v.dtype) if isinstance(q, Fp8Query) else q, k, v)
    return out[0] if isinstance(out, tuple) else out  # flash-attn 3 returns (out, softmax_lse)


def attention_fp8_output(q: torch.Tensor | Fp8Query, k: torch.Tensor, v: torch.Tensor,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``attention(q, k, v, backend)`` as fp8 values ``[B, Lq, heads, d]``, their one float32 scale and a float32
    offset ``[B, 1, heads, d]`` shared by all query rows (attention = values * scale + offset), for an fp8 matmul
    to take as they are, where the backend's kernel writes fp8 (``cudnn_fp8`` on Hopper); else None (call
    ``attention``)."""
    if backend not in FP8_OUTPUT or live_kernel(backend) is None:
        return None
    return _run(backend, FP8_OUTPUT[backend](), q, k, v)


def kernel_takes(v: torch.Tensor) -> bool:
    """Whether the optional kernels run for attention with these values (their device and dtype)."""
    return v.device.type in KERNEL_DEVICES and v.dtype in HALF_DTYPES


def _run(backend: str, fn, q: torch.Tensor | Fp8Query, k: torch.Tensor, v: torch.Tensor):
    """``fn(q, k, v)``, or None where it cannot run: no kernel, inputs it cannot take (CPU, float32), or a failure
    (said once; torch SDPA gives the same function)."""
    if fn is None or not kernel_takes(v):
        return None
    try:
        return fn(q, k, v)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a kernel built for other cards
        failed_types.add(backend)
        log.warning("attention type %s failed (%s); torch SDPA runs instead.", backend, first_line(e))
        return None
