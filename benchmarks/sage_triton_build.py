"""Build x2v's 8-bit attention kernel (``sage_triton``) for a GPU architecture without the GPU, and report what the
compiler made of it: registers per thread, spills, shared memory, tensor-core instructions.

    python benchmarks/sage_triton_build.py                  # sm_90 (H100 / H200), every candidate tiling
    python benchmarks/sage_triton_build.py --arch 89 --tilings default --json build.json   # Ada

Triton's wheel carries ptxas and cuobjdump, so this runs on any Linux machine. Run-time arguments are specialized
as a real launch specializes them (pointers and integers divisible by 16 are marked so): without that the loads
cannot be vectorized and the compiler does not pipeline them. A kernel that spills registers or leaves the key /
value loads unpipelined will be slow; the tests (`tests/test_sage_triton.py`) hold the default tiling to this.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def build(arch: int, q_len: int, kv_len: int, tiling: sage.Tiling, qk_dtype: torch.dtype, pv_fp8: bool) -> dict:
    """Compile for ``sm_<arch>`` on the shapes of one Wan 14B attention (40 heads of 128) and read the result."""
    q = torch.zeros(1, q_len, 40, 128, dtype=torch.bfloat16, device="meta")
    kv = torch.zeros(1, kv_len, 40, 128, dtype=torch.bfloat16, device="meta")
    launch = sage.kernel_launch(q, kv, kv, tiling, qk_dtype, pv_fp8)
    types, constants, attrs = signature(launch)
    kernel = triton.compile(ASTSource(sage._attention_kernel, types, constants, attrs),
                            target=GPUTarget("cuda", arch, 32), options=launch.options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    return dict(arch=arch, kv_len=kv_len, tiling=str(tiling), qk=str(qk_dtype).split(".")[-1],
                pv="fp8" if pv_fp8 else "bf16",
                registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                spill_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)),
                shared_bytes=kernel.metadata.shared,
                # Tiles loaded ahead by the software pipeline (K: i8 or fp8, V: fp8 or bf16); none means every
                # step waits for its loads.
                pipelined_tiles=sorted(set(re.findall(r"async_copy_global_to_local[^\n]*tensor<(\d+x\d+)x!tt\.ptr<(\w+)>",
                                                      ttgir))),
                mma=sorted(set(re.findall(r"(?:wgmma\.mma_async|mma)\.sync\.aligned\.[\w.]+", ptx))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100 / H200)")
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[32760, 512],
                        help="key lengths (self-attention at 480P, text)")
    parser.add_argument("--tilings", choices=["default", "all"], default="all")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    default, pv_fp8 = sage.defaults(divmod(args.arch, 10))
    tilings = sage.CANDIDATES if args.tilings == "all" else (default,)
    if pv_fp8:
        variants = [(t, torch.int8, True) for t in tilings]
        variants += [(default, sage.FP8, True), (default, torch.int8, False)]
    else:  # no fp8: what sage_attention runs there
        variants = [(t, torch.int8, False) for t in tilings]
    print(f"triton {triton.__version__}, sm_{args.arch}")
    results = []
    for kv_len in args.kv_lens:
        for tiling, qk, pv_fp8 in variants:
            try:
                r = build(args.arch, 32760, kv_len, tiling, qk, pv_fp8)
            except Exception as e:  # noqa: BLE001 - e.g. fp8 on a card without it: reported, the rest still built
                print(f"kv {kv_len:>6} {tiling} QK {qk} PV {'fp8' if pv_fp8 else 'bf16'}: does not build "
                      f"({str(e).strip().splitlines()[-1][:200]})", flush=True)
                results.append(dict(arch=args.arch, kv_len=kv_len, tiling=str(tiling), error=str(e)[-500:]))
                continue
            results.append(r)
            print(f"kv {kv_len:>6} {r['tiling']} QK {r['qk']} PV {r['pv']}: {r['registers']} registers, "
                  f"{r['spill_bytes']} bytes spilled, {r['shared_bytes'] // 1024} KiB shared, "
                  f"tiles loaded ahead {r['pipelined_tiles']}, {' '.join(r['mma'])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
