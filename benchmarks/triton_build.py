"""Build x2v's Triton kernels for a GPU architecture without the GPU, and report what the compiler made of them:
the 8-bit attention (``sage_triton``: registers per thread, spills, shared memory, tensor-core instructions) and
the one-pass row kernels (``x2v.ops.row_kernels``: registers, spills, the widest global loads and stores).

    python benchmarks/triton_build.py                  # sm_90 (H100 / H200): every candidate tiling, row kernels
    python benchmarks/triton_build.py --arch 89 --kernels sage --tilings default --json build.json   # Ada

Triton's wheel carries ptxas and cuobjdump, so this runs on any Linux machine. Run-time arguments are specialized
as a real launch specializes them (pointers and integers divisible by 16 are marked so): without that the loads
cannot be vectorized and the compiler does not pipeline them. A kernel that spills registers or leaves the key /
value loads unpipelined will be slow; the tests (`tests/test_sage_triton.py`) hold the default tiling to this.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (before anything imports triton)

import torch  # noqa: E402
import triton  # noqa: E402
from harness import Results, add_json_argument, make_parser  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from x2v.ops import row_kernels as rows  # noqa: E402
from x2v.ops import sage_triton as sage  # noqa: E402

POINTER_TYPES = {torch.int8: "*i8", sage.FP8: "*fp8e4nv", torch.float32: "*fp32", torch.bfloat16: "*bf16",
                 torch.float16: "*fp16"}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def signature(launch: sage.Launch) -> tuple[dict, dict, dict]:
    """Triton's signature, compile-time constants and divisibility attributes for the launch's arguments."""
    names = sage._attention_kernel.arg_names
    types, constants, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, launch.args)):
        if value is None:
            types[name] = "constexpr"
            constants[(i,)] = None
        elif isinstance(value, torch.Tensor):
            types[name] = POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are aligned
        else:
            types[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in launch.constants.items():
        types[name] = "constexpr"
        constants[(names.index(name),)] = value
    return {n: types[n] for n in names}, constants, attrs


def compile_for(arch: int, fn, types: dict, constants: dict, attrs: dict, options: dict) -> tuple[object, dict]:
    """Triton's compile of ``fn`` for ``sm_<arch>`` and its registers per thread and spilled bytes."""
    kernel = triton.compile(ASTSource(fn, types, constants, attrs), target=GPUTarget("cuda", arch, 32),
                            options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    return kernel, dict(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                        spill_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)))


def build(arch: int, q_len: int, kv_len: int, tiling: sage.Tiling, qk_dtype: torch.dtype, pv_fp8: bool) -> dict:
    """Compile for ``sm_<arch>`` on the shapes of one Wan 14B attention (40 heads of 128) and read the result."""
    q = torch.zeros(1, q_len, 40, 128, dtype=torch.bfloat16, device="meta")
    kv = torch.zeros(1, kv_len, 40, 128, dtype=torch.bfloat16, device="meta")
    launch = sage.kernel_launch(q, kv, kv, tiling, qk_dtype, pv_fp8)
    types, constants, attrs = signature(launch)
    kernel, usage = compile_for(arch, sage._attention_kernel, types, constants, attrs, launch.options)
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    return dict(arch=arch, kv_len=kv_len, tiling=str(tiling), qk=str(qk_dtype).split(".")[-1],
                pv="fp8" if pv_fp8 else "bf16", **usage, shared_bytes=kernel.metadata.shared,
                # Tiles loaded ahead by the software pipeline (K: i8 or fp8, V: fp8 or bf16); none means every
                # step waits for its loads.
                pipelined_tiles=sorted(set(re.findall(r"async_copy_global_to_local[^\n]*tensor<(\d+x\d+)x!tt\.ptr<(\w+)>",
                                                      ttgir))),
                mma=sorted(set(re.findall(r"(?:wgmma\.mma_async|mma)\.sync\.aligned\.[\w.]+", ptx))))


# The row kernels' run-time arguments by name ("i32/16": an integer Triton sees divisible by 16, as Wan's widths
# and the modulation's strides are), and the variants to build: (kernel, compile-time constants, row width).
ROW_TYPES = dict(X="*fp32", Y="*bf16", Gate="*fp32", Weight="*fp32", Bias="*fp32", XOut="*fp32", Out="*bf16",
                 width="i32/16", eps="fp32", gate_div="i32/16", gate_stride="i32/16", weight_div="i32/16",
                 weight_stride="i32/16", bias_stride="i32/16", Rope="*fp32", tokens="i32", Values="*fp8e4nv",
                 Scales="*fp32", Scale="*fp32", scale_factor="fp32")
FP8_OUT = dict(Out="*fp8e4nv")
NORM = dict(QUANT=False, ROUND_FP16=False, QMAX_=448.0, INT8=False)  # the LayerNorms' 16-bit output
NORM_FP8 = dict(NORM, QUANT=True)  # ... quantized per row for fp8 layers
# (kernel, its constants, row width, operand types other than ROW_TYPES')
ROW_VARIANTS = [(rows._layer_norm_kernel, dict(HAS_Y=False, HAS_GATE=False, ONE_PLUS=True, **NORM), 5120, {}),
                (rows._layer_norm_kernel, dict(HAS_Y=True, HAS_GATE=False, ONE_PLUS=True, **NORM), 5120, {}),
                (rows._layer_norm_kernel, dict(HAS_Y=True, HAS_GATE=True, ONE_PLUS=False, **NORM), 5120, {}),
                (rows._layer_norm_kernel, dict(HAS_Y=False, HAS_GATE=False, ONE_PLUS=True, **NORM_FP8), 5120, FP8_OUT),
                (rows._layer_norm_kernel, dict(HAS_Y=True, HAS_GATE=False, ONE_PLUS=True, **NORM_FP8), 5120, FP8_OUT),
                (rows._layer_norm_kernel, dict(HAS_Y=True, HAS_GATE=True, ONE_PLUS=False, **NORM_FP8), 5120, FP8_OUT),
                (rows._rms_norm_rope_kernel, dict(HEAD_DIM=128, HAS_ROPE=True, FP8_SCALED=False), 5120, {}),
                (rows._rms_norm_rope_kernel, dict(HEAD_DIM=128, HAS_ROPE=True, FP8_SCALED=True), 5120, FP8_OUT),  # Q
                (rows._quantize_kernel, dict(QMAX_=448.0, GELU=False, INT8=False), 5120, {}),
                (rows._quantize_kernel, dict(QMAX_=448.0, GELU=True, INT8=False), 13824, {}),  # the 14B feed-forward
                (rows._layer_norm_kernel, dict(HAS_Y=True, HAS_GATE=True, ONE_PLUS=False, **NORM), 1536, {})]  # 1.3B


def build_row_kernel(arch: int, fn, constants: dict, width: int, types_here: dict) -> dict:
    """Compile one row kernel as ``row_kernels`` launches it for rows of ``width`` (X bf16 where it is an
    activation, float32 where it is the residual stream)."""
    block, warps = rows._launch(width)
    constants = dict(constants, BLOCK=block)
    types, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            types[name], consts[(i,)] = "constexpr", constants[name]
            continue
        types[name] = "*bf16" if name == "X" and fn is not rows._layer_norm_kernel else ROW_TYPES[name]
        types[name] = types_here.get(name, types[name])
        if types[name].startswith("*") or types[name] == "i32/16":  # torch's allocations are aligned
            attrs[(i,)] = [["tt.divisibility", 16]]
        types[name] = types[name].removesuffix("/16")
    kernel, usage = compile_for(arch, fn, types, consts, attrs, dict(num_warps=warps))
    ptx = kernel.asm["ptx"]
    return dict(arch=arch, kernel=fn.__name__, constants=constants, width=width, warps=warps, **usage,
                loads=sorted(set(re.findall(r"ld\.global(?:\.\w+)*?\.(v\d)?\.?b(\d+)", ptx))),
                stores=sorted(set(re.findall(r"st\.global(?:\.\w+)*?\.(v\d)?\.?b(\d+)", ptx))))


def sage_builds(arch: int, kv_lens: list[int], tilings: str) -> list[dict]:
    default, pv_fp8 = sage.defaults(divmod(arch, 10))
    tilings = sage.CANDIDATES if tilings == "all" else (default,)
    if pv_fp8:
        variants = [(t, torch.int8, True) for t in tilings]
        variants += [(default, sage.FP8, True), (default, torch.int8, False)]
    else:  # no fp8: what sage_attention runs there
        variants = [(t, torch.int8, False) for t in tilings]
    results = []
    for kv_len in kv_lens:
        for tiling, qk, pv_fp8 in variants:
            try:
                r = build(arch, 32760, kv_len, tiling, qk, pv_fp8)
            except Exception as e:  # noqa: BLE001 - e.g. fp8 on a card without it: reported, the rest still built
                print(f"kv {kv_len:>6} {tiling} QK {qk} PV {'fp8' if pv_fp8 else 'bf16'}: does not build "
                      f"({str(e).strip().splitlines()[-1][:200]})", flush=True)
                results.append(dict(arch=arch, kv_len=kv_len, tiling=str(tiling), error=str(e)[-500:]))
                continue
            results.append(r)
            print(f"kv {kv_len:>6} {r['tiling']} QK {r['qk']} PV {r['pv']}: {r['registers']} registers, "
                  f"{r['spill_bytes']} bytes spilled, {r['shared_bytes'] // 1024} KiB shared, "
                  f"tiles loaded ahead {r['pipelined_tiles']}, {' '.join(r['mma'])}", flush=True)
    return results


def row_builds(arch: int) -> list[dict]:
    results = []
    for fn, constants, width, types_here in ROW_VARIANTS:
        try:
            r = build_row_kernel(arch, fn, constants, width, types_here)
        except Exception as e:  # noqa: BLE001 - e.g. fp8 before Ada: reported, the rest still built
            print(f"{fn.__name__} {constants} width {width}: does not build ({str(e).strip().splitlines()[-1][:200]})",
                  flush=True)
            results.append(dict(arch=arch, kernel=fn.__name__, constants=constants, width=width, error=str(e)[-500:]))
            continue
        results.append(r)
        print(f"{r['kernel']} {constants} width {width}, {r['warps']} warps: {r['registers']} registers, "
              f"{r['spill_bytes']} bytes spilled, loads {r['loads']}, stores {r['stores']}", flush=True)
    return results


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100 / H200)")
    parser.add_argument("--kernels", nargs="+", choices=["sage", "rows"], default=["sage", "rows"])
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[32760, 512],
                        help="sage: key lengths (self-attention at 480P, text)")
    parser.add_argument("--tilings", choices=["default", "all"], default="all", help="sage: which tilings")
    add_json_argument(parser)
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}")
    results = Results(args.json)
    if "sage" in args.kernels:
        results.add(*sage_builds(args.arch, args.kv_lens, args.tilings))
    if "rows" in args.kernels:
        results.add(*row_builds(args.arch))


if __name__ == "__main__":
    main()
