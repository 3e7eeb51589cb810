"""8-bit attention through cuDNN: attention type ``cudnn_fp8``, cuDNN's own fp8 flash attention (Hopper and later).

Q, K and V go to fp8 e4m3 with one scale per tensor; K and V first lose their means over the tokens, which shrinks
the values, and with them fp8's rounding error, which is relative to each value. K's mean leaves softmax unchanged;
V's is added back to the output (each output row is a weighted mean of V's rows, P's rows summing to 1). In a DiT
V's mean grows block by block (the modulation's shift reaches every token): left in, it took most of fp8's range
and its rounding error went into every output row alike. cuDNN runs both matmuls on the fp8 tensor cores and
quantizes P = exp(S - max) itself, scaled by 448 (its values are in [0, 1]). On Hopper cuDNN writes the output in
fp8 too (a 16-bit output from fp8 attention needs Blackwell): |O| <= max |V|, and the output scale puts max |V| at
half of fp8's range; x2v then converts it to the input's dtype, adding V's mean, or hands it as it is to an fp8
output projection, which adds the projected mean to its bias (``cudnn_fp8_attention_fp8_output``). The price is
fp8's 3 mantissa bits on Q, K, V, P and (on Hopper) O. In the DiT, Q comes already in fp8 from its RMS norm
(an ``Fp8Query``, ``x2v.ops.norms.rms_norm_rope_fp8``), its scale bounded by the norm's gain: no pass over Q.

Needs NVIDIA's Python frontend for cuDNN (``pip install nvidia-cudnn-frontend``); the cuDNN library itself comes
with CUDA builds of PyTorch. One cuDNN graph per shape and device, built on first use (about a second).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cudnn
import torch

from x2v.ops.fused import fused_on_gpu
from x2v.ops.quant_math import FP8, FP8_MAX, Fp8Query

OUTPUT_HEADROOM = 2.0  # an fp8 output's scale leaves room above max |V| (P's rounding can push a row a bit past it)
FP8_ATTENTION_CAPABILITY = (9, 0)  # cuDNN's fp8 attention: Hopper and later
HALF_OUTPUT_CAPABILITY = (10, 0)  # cuDNN writes bf16 / fp16 from fp8 attention on Blackwell and later only
CUDNN_TYPES = {torch.bfloat16: "BFLOAT16", torch.float16: "HALF", FP8: "FP8_E4M3"}
SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")  # sdpa_fp8's order


@fused_on_gpu
def quantize(x: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x`` [B, L, H, D] (minus its mean over the tokens if ``center``: not for Q, whose mean softmax does not
    ignore) -> fp8 e4m3 of the same shape, its one scale as the [1, 1, 1, 1] float32 tensor cuDNN takes, and the
    mean [B, 1, H, D] or None (x ~ x8 * scale + mean)."""
    x = x.float()
    if center:
        # max |x - mean| per channel is the larger of max - mean and mean - min: the three are reductions over the
        # tokens of the same shape, one pass over x, and the values the same as those of x - mean's own pass
        mean = x.mean(1, keepdim=True)
        amax = torch.maximum(x.amax(1, keepdim=True) - mean, mean - x.amin(1, keepdim=True)).amax()
        x = x - mean
    else:
        mean, amax = None, x.abs().amax()
    scale = (amax.clamp_min(1e-30) / FP8_MAX).reshape(1, 1, 1, 1)  # all zeros quantize to zeros, not NaN
    return (x / scale).to(FP8), scale, mean


def output_scales(v_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For an fp8 output: the scale cuDNN multiplies O by before rounding, and the one that turns it back."""
    o_descale = v_scale * OUTPUT_HEADROOM  # max |V| = 448 * v_scale lands at 448 / OUTPUT_HEADROOM
    return 1.0 / o_descale, o_descale


def bhsd(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Dims and strides of ``x`` [B, L, H, D] in the order cuDNN names them (B, H, L, D)."""
    order = (0, 2, 1, 3)
    return [x.shape[i] for i in order], [x.stride(i) for i in order]


@dataclass
class Graph:
    graph: object  # cudnn.pygraph
    tensors: dict  # its operands by name: q, k, v, o, amax_s, amax_o and SCALARS
    workspace: int = 0  # bytes, known once the plan is built


def make_graph(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, out: torch.Tensor, handle=None,
               sm_version: int | None = None) -> Graph:
    """cuDNN's fp8 attention graph for these operands (shapes, strides and the output's dtype), validated;
    building its plan needs the GPU (``build_plan``)."""
    dt = cudnn.data_type
    options = {name: value for name, value in (("handle", handle), ("sm_version", sm_version)) if value is not None}
    graph = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                          **options)
    tensors = {}
    for name, x in (("q", q8), ("k", k8), ("v", v8)):
        dims, strides = bhsd(x)
        tensors[name] = graph.tensor(name=name, dim=dims, stride=strides, data_type=dt.FP8_E4M3)
    for name in SCALARS:
        tensors[name] = graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT)
    o, _, amax_s, amax_o = graph.sdpa_fp8(*(tensors[name] for name in ("q", "k", "v", *SCALARS)),
                                          generate_stats=False, attn_scale=1 / math.sqrt(q8.shape[-1]),
                                          name="attention")
    dims, strides = bhsd(out)
    o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(getattr(dt, CUDNN_TYPES[out.dtype]))
    for amax in (amax_s, amax_o):  # cuDNN's older fp8 engines want them as outputs; unused here
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
    tensors.update(o=o, amax_s=amax_s, amax_o=amax_o)
    graph.validate()
    return Graph(graph, tensors)


def build_plan(graph: Graph) -> Graph:
    g = graph.graph
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    graph.workspace = g.get_workspace_size()
    return graph


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.cache
def handle(device_index: int):
    with torch.cuda.device(device_index):
        return cudnn.create_handle()


_GRAPHS: dict[tuple, Graph] = {}


def planned(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, out: torch.Tensor) -> Graph:
    """The built graph for these operands' shapes, strides, dtypes and device, made on first use."""
    key = tuple((tuple(x.shape), x.stride(), x.dtype) for x in (q8, k8, v8, out)) + (out.device.index,)
    if key not in _GRAPHS:
        _GRAPHS[key] = build_plan(make_graph(q8, k8, v8, out, handle(out.device.index)))
    return _GRAPHS[key]


@functools.cache
def constants(device: torch.device) -> dict[str, torch.Tensor]:
    """P's fixed fp8 scale (its values are in [0, 1]), a 16-bit output's (none) and buffers for the amax outputs."""
    def scalar(value):
        return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)
    return dict(scale_s=scalar(FP8_MAX), descale_s=scalar(1 / FP8_MAX), scale_o=scalar(1.0), amax_s=scalar(0.0),
                amax_o=scalar(0.0))


@fused_on_gpu
def restore(out: torch.Tensor, scale: torch.Tensor | None, mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cuDNN's output (fp8 with its ``scale``, or 16-bit: None) plus V's mean, in ``dtype``."""
    out = out.float() if scale is None else out.float() * scale
    return (out + mean).to(dtype)


def attend(q: torch.Tensor | Fp8Query, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                                  torch.Tensor]:
    """cuDNN's output of the centered V; where it is fp8 (Hopper), the scale that turns it back; V's mean
    (attention = out * scale + mean)."""
    card = capability(v.device)
    if card < FP8_ATTENTION_CAPABILITY:
        raise RuntimeError(f"cuDNN's fp8 attention needs a Hopper or newer GPU (compute capability 9.0); this one "
                           f"is {'.'.join(map(str, card))}: use sage_triton there")
    q8, q_scale = q if isinstance(q, Fp8Query) else quantize(q, False)[:2]
    (k8, k_scale, _), (v8, v_scale, v_mean) = quantize(k, True), quantize(v, True)
    half_output = card >= HALF_OUTPUT_CAPABILITY
    out = torch.empty(q8.shape, dtype=v.dtype if half_output else FP8, device=v.device)
    data = dict(constants(v.device), q=q8, k=k8, v=v8, o=out, descale_q=q_scale, descale_k=k_scale, descale_v=v_scale)
    o_descale = None
    if not half_output:
        data["scale_o"], o_descale = output_scales(v_scale)
    execute(planned(q8, k8, v8, out), data)
    return out, o_descale, v_mean


# Inside compiled blocks (use_compile) these run as they are, between two graphs, like sage_triton.
@torch.compiler.disable
def cudnn_fp8_attention(q: torch.Tensor | Fp8Query, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention in fp8: ``q`` [B, Lq, H, D] (or already in fp8: an ``Fp8Query``), ``k``/``v``
    [B, Lk, H, D] -> [B, Lq, H, D] in ``v``'s dtype (scale 1/sqrt(D), no mask)."""
    return restore(*attend(q, k, v), v.dtype)


@torch.compiler.disable
def cudnn_fp8_attention_fp8_output(q: torch.Tensor | Fp8Query, k: torch.Tensor,
                                   v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The same attention as cuDNN writes it on Hopper, for an fp8 matmul to take as it is (no conversion to 16
    bits and back): fp8 values [B, Lq, H, D], their one scale [1, 1, 1, 1] and the offset [B, 1, H, D] shared by
    all query rows (attention = values * scale + offset); None on cards where cuDNN writes 16 bits (Blackwell),
    before any work."""
    if capability(v.device) >= HALF_OUTPUT_CAPABILITY:
        return None
    return attend(q, k, v)


def execute(graph: Graph, data: dict[str, torch.Tensor]) -> None:
    """Run the built graph on ``data`` (tensors by operand name) on the current CUDA stream; fills ``data["o"]``."""
    device = data["o"].device
    workspace = torch.empty(graph.workspace, dtype=torch.uint8, device=device)
    cudnn_handle = handle(device.index)
    cudnn.set_stream(cudnn_handle, torch.cuda.current_stream(device).cuda_stream)
    graph.graph.execute({graph.tensors[name]: x for name, x in data.items()}, workspace, handle=cudnn_handle)
