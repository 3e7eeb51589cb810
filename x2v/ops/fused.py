"""Elementwise work fused into one kernel per call on GPUs (small pure functions, compiled or hand-written).

Around each matmul of a DiT block sit norms, modulation, RoPE and dtype casts. Run op by op they read and write
the 32k-token activations many times (float32 round trips); fused, each such function is one pass that reads its
input once and writes its output once, in the dtype the next layer takes: a one-pass Triton kernel where
``x2v.ops.row_kernels`` has one, else ``torch.compile``. The Python function is the definition: eager runs (CPU,
``unfused()``, or a compile failure) compute the same values.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from x2v.errors import first_line

log = logging.getLogger(__name__)

_enabled = True
# Compiling costs seconds once per process and shape; it pays off on large activations (a 480P video has
# 32,760 tokens of 1,536-5,120 channels), not on text embeddings or tiny test models, which stay eager.
MIN_ELEMENTS = 1 << 22
# where fusing is worth it (tests add "cpu": the compiled path in C++, the row kernels in Triton's interpreter)
FUSED_DEVICES = ("cuda",)
COMPILE_OPTIONS = {"coordinate_descent_tuning": True}
_kernels_enabled = True  # False inside compiled_only()


@contextmanager
def unfused():
    """Run the fused functions eagerly (op by op) inside this block: for comparisons and benchmarks."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


@contextmanager
def compiled_only():
    """Inside this block the fused functions skip their hand-written kernels and run compiled (as before those
    kernels existed): for comparisons and benchmarks."""
    global _kernels_enabled
    before, _kernels_enabled = _kernels_enabled, False
    try:
        yield
    finally:
        _kernels_enabled = before


def fused_enabled() -> bool:
    """False inside ``unfused()``."""
    return _enabled


def fused_on_gpu(fn=None, *, row_kernel: bool = False):
    """``fn`` run as fused kernels when its first argument is a large tensor on a GPU; eager elsewhere, for small
    inputs, inside an already compiled model (which fuses this code with the rest), or if compiling fails (said
    once).

    ``row_kernel``: ``x2v.ops.row_kernels`` has a hand-written version of the same name (a one-pass Triton kernel),
    tried first: it returns None for arguments it does not take; one that raises, or no Triton, is said once and
    not tried again.
    Otherwise ``fn`` is compiled per shape (a generation keeps its shapes) with launch settings tuned on the card:
    the activation quantization compiled shape-generic and untuned took 0.59 ms per call at 14B / 480P on an H100,
    0.26 ms so.
    """
    if fn is None:
        return functools.partial(fused_on_gpu, row_kernel=row_kernel)
    state = {"compiled": None, "kernel": row_kernel}  # each False once it failed; "kernel" becomes the function

    @functools.wraps(fn)
    def run(x: torch.Tensor, *args):
        if (torch.compiler.is_compiling() or not _enabled or x.device.type not in FUSED_DEVICES
                or x.numel() < MIN_ELEMENTS):
            return fn(x, *args)
        if state["kernel"] and _kernels_enabled:
            try:
                if state["kernel"] is True:
                    from x2v.ops import row_kernels  # imports Triton: only once a GPU runs a fused function

                    state["kernel"] = getattr(row_kernels, fn.__name__)
                out = state["kernel"](x, *args)
            except Exception as e:  # noqa: BLE001 - e.g. no Triton, or a kernel that does not build for this card
                state["kernel"] = False
                log.warning("%s: its Triton kernel failed (%s); it runs compiled.", fn.__name__, first_line(e))
            else:
                if out is not None:
                    return out
        if state["compiled"] is False:
            return fn(x, *args)
        try:
            if state["compiled"] is None:
                state["compiled"] = torch.compile(fn, dynamic=False, options=COMPILE_OPTIONS)
            return state["compiled"](x, *args)
        except Exception as e:  # noqa: BLE001 - compiling is only an optimisation; the eager result is the same
            state["compiled"] = False
            log.warning("%s runs unfused (torch.compile failed: %s).", fn.__name__, first_line(e))
        return fn(x, *args)

    return run


def is_bare(layer: nn.Module, cls: type) -> bool:
    """``layer`` is exactly a ``cls`` with no forward hooks (dynamic LoRA branches and offload are hooks), so its
    computation may be done without calling it (fused with its neighbours)."""
    return type(layer) is cls and not layer._forward_pre_hooks and not layer._forward_hooks


def linear_gelu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gelu(layer(x), approximate="tanh")``. On GPUs, for a plain half-precision ``nn.Linear`` with a bias, one
    cuBLAS call adds the bias and applies GELU in its epilogue: the GELU's own pass over the feed-forward's widest
    activation (32,760 x 13,824 at 14B / 480P) is gone. (``torch._addmm_activation`` computes the tanh form on
    CUDA, as torch's reference decomposition states; other layer kinds, e.g. 8-bit or with a LoRA branch, run
    as modules.)"""
    if (_enabled and is_bare(layer, nn.Linear) and layer.bias is not None and x.device.type in FUSED_DEVICES
            and x.dtype in (torch.float16, torch.bfloat16) and layer.weight.dtype == x.dtype):
        out = torch._addmm_activation(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], out.shape[-1])
    return F.gelu(layer(x), approximate="tanh")
