"""GGUF DiT files as city96's ComfyUI-GGUF writes them, built with the `gguf` package's writer: every ggml type of the
published Wan GGUFs loads, stays quantized in memory, and computes what the float model built from the `gguf`
package's own dequantization computes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import save_file

import x2v
from x2v.demo import DEMO_DIT, random_weights, write_tiny_model
from x2v.errors import CheckpointError
from x2v.loading.weights import build_on_meta
from x2v.models.wan_dit import WanDiT
from x2v.ops.gguf_linear import GgufLinear

# Every linear's input width a multiple of 256 (the K-quants' block).
CONFIG = replace(DEMO_DIT, dim=256, ffn_dim=512, text_dim=256)
QUANTIZABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16")  # the gguf package writes these itself
K_TYPES = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")  # it only reads these: random blocks with small scales
# byte offsets of each K-type block's float16 scale fields (d, and dmin where the type has one)
SCALE_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[T[kind]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in SCALE_FIELDS[kind]:
        scales = rng.uniform(2e-4, 1e-3, (rows, cols // block)).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, kind: str, prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Wan DiT as a GGUF file: linear weights in ``kind``, everything else F32, the 5-D patch embedding
    reshaped to 4-D with its ``comfy.gguf.orig_shape`` (as ComfyUI-GGUF's converter stores it). Returns the float
    weights the file holds (the gguf package's dequantization)."""
    weights = random_weights(build_on_meta(lambda: WanDiT(CONFIG)), seed=seed)
    linears = {name for name, module in build_on_meta(lambda: WanDiT(CONFIG)).named_modules()
               if isinstance(module, torch.nn.Linear)}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "wan")
    expected = {}
    for name, tensor in weights.items():
        values = tensor.numpy().astype(np.float32)
        if name.removesuffix(".weight") in linears and name.endswith(".weight"):
            qtype = T[kind]
            raw = random_blocks(*values.shape, kind, rng) if kind in K_TYPES else gguf.quants.quantize(values, qtype)
            writer.add_tensor(prefix + name, raw, raw_shape=raw.shape, raw_dtype=qtype)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(values.shape).copy())
        elif values.ndim > 4:
            writer.add_tensor(prefix + name, values.reshape(values.shape[0], -1, *values.shape[-2:]))
            writer.add_array(f"comfy.gguf.orig_shape.{prefix}{name}", list(values.shape))
            expected[name] = torch.from_numpy(values)
        else:
            writer.add_tensor(prefix + name, values)
            expected[name] = torch.from_numpy(values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CONFIG.in_dim, 2, 4, 4, generator=g)
    context = [torch.randn(7, CONFIG.text_dim, generator=g)]
    return x, torch.tensor([700.0]), context


@pytest.mark.parametrize("kind", QUANTIZABLE + K_TYPES)
def test_a_gguf_dit_computes_what_its_dequantized_weights_compute(tmp_path, kind):
    path = tmp_path / f"wan-tiny-{kind}.gguf"
    expected = write_gguf(path, kind, prefix="model.diffusion_model." if kind in ("Q4_0", "Q4_K") else "")
    model = x2v.load_dit(path, dtype=torch.float32)
    save_file(expected, tmp_path / "reference.safetensors")  # the float model the file's values make
    reference = x2v.load_dit(tmp_path / "reference.safetensors", dtype=torch.float32)
    with torch.inference_mode():
        ours, theirs = model(*inputs()), reference(*inputs())
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5 * float(theirs.abs().max()))
    packed = [m for m in model.modules() if isinstance(m, GgufLinear)]
    if kind in ("F16", "BF16"):
        return  # float files load as float layers
    assert packed and all(m.ggml == kind for m in packed)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())  # no full-precision copy of a weight
    file_bytes = sum(t.n_bytes for t in gguf.GGUFReader(path).tensors if t.tensor_type == T[kind])
    assert sum(m.packed.numel() for m in packed) == file_bytes


def test_a_folder_with_one_gguf_dit_generates(tmp_path):
    model = write_tiny_model(tmp_path / "t2v", "t2v")
    for shard in model.glob("diffusion_pytorch_model*"):
        shard.unlink()
    weights = random_weights(build_on_meta(lambda: WanDiT(DEMO_DIT)), seed=1)
    writer = gguf.GGUFWriter(str(model / "wan2.1-t2v-tiny-Q8_0.gguf"), "wan")
    for name, tensor in weights.items():
        values = tensor.numpy().astype(np.float32)
        if values.ndim == 2 and values.shape[1] % 32 == 0:
            raw = gguf.quants.quantize(values, T.Q8_0)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=T.Q8_0)
        elif values.ndim > 4:
            writer.add_tensor(name, values.reshape(values.shape[0], -1, *values.shape[-2:]))
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(values.shape))
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    pipe = x2v.Pipeline.from_pretrained(model, device="cpu", infer_steps=2, target_video_length=5, target_height=64,
                                        target_width=64, dit_quant_scheme="gguf-Q8_0")
    assert any(isinstance(m, GgufLinear) for dit in pipe.dits.values() for m in dit.modules())
    out = pipe.generate("a cat", seed=1, progress=False)
    assert out.frames.shape == (5, 64, 64, 3)
    with pytest.raises(CheckpointError, match="this GGUF file holds Q8_0 weights"):
        x2v.Pipeline.from_pretrained(model, device="cpu", dit_quant_scheme="gguf-Q4_K_M")


def test_inspect_describes_a_gguf_file(tmp_path):
    from x2v.loading.inspect import inspect_model

    path = tmp_path / "wan-Q4_K.gguf"
    write_gguf(path, "Q4_K")
    report = inspect_model(path)[0]
    assert report.facts["container"] == "GGUF" and report.facts["dtypes"]["Q4_K"] == 26
    assert report.facts["quantization"].startswith("GGUF Q4_K")
    assert report.facts["memory_bfloat16"] < path.stat().st_size  # as loaded: the blocks, not bf16 weights


def test_unreadable_gguf_files_are_named_errors(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(CheckpointError, match="broken.gguf: not a readable GGUF file"):
        x2v.load_dit(broken)
    other = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(other), "wan")
    block, size = gguf.GGML_QUANT_SIZES[T.IQ4_NL]
    writer.add_tensor("blocks.0.self_attn.q.weight", np.zeros((4, 256 // block * size), np.uint8),
                      raw_shape=(4, 256 // block * size), raw_dtype=T.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="stored as IQ4_NL, which x2v does not read; it reads F32"):
        x2v.load_dit(other)


def test_a_lora_runs_beside_gguf_layers_and_is_refused_for_merging(tmp_path):
    from x2v.errors import UnsupportedModelError
    from x2v.loading.lora import LoraEntry, apply_loras
    from x2v.runtime.lora_branches import detach_loras

    path = tmp_path / "wan-Q4_K.gguf"
    expected = write_gguf(path, "Q4_K")
    save_file(expected, tmp_path / "reference.safetensors")
    g = torch.Generator().manual_seed(5)
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": 0.1 * torch.randn(256, 4, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_down.weight": 0.1 * torch.randn(4, 256, generator=g),
               "diffusion_model.blocks.1.ffn.2.lora_up.weight": 0.1 * torch.randn(256, 4, generator=g),
               "diffusion_model.blocks.1.ffn.2.lora_down.weight": 0.1 * torch.randn(4, 512, generator=g)}, lora)
    entry = LoraEntry.from_config({"path": str(lora), "strength": 0.7})
    packed, plain = (x2v.load_dit(p, dtype=torch.float32) for p in (path, tmp_path / "reference.safetensors"))
    with torch.inference_mode():
        before = packed(*inputs())
    for model in (packed, plain):
        [report] = apply_loras(model, [entry], dynamic=True)
        assert report.matched == 4
    with torch.inference_mode():
        ours, theirs = packed(*inputs()), plain(*inputs())
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5 * float(theirs.abs().max()))
        assert not torch.allclose(ours, before)
        detach_loras(packed)
        torch.testing.assert_close(packed(*inputs()), before, rtol=0, atol=0)
    with pytest.raises(UnsupportedModelError, match="cannot be merged into a GGUF model's blocks"):
        apply_loras(packed, [entry], dynamic=False)


def test_convert_turns_a_gguf_file_into_float_safetensors(tmp_path):
    from x2v.cli.main import main

    path = tmp_path / "wan-Q5_K.gguf"
    write_gguf(path, "Q5_K")
    assert main(["convert", str(path), str(tmp_path / "float.safetensors"), "--layout", "single", "--dtype", "fp32",
                 "--quiet"]) == 0
    packed, plain = (x2v.load_dit(p, dtype=torch.float32) for p in (path, tmp_path / "float.safetensors"))
    with torch.inference_mode():
        torch.testing.assert_close(packed(*inputs()), plain(*inputs()), rtol=0, atol=0)


def test_fuzz_corrupt_gguf_files_end_in_a_named_error_or_a_load(tmp_path):
    """Truncations and flipped bytes (header, names, shapes, metadata): a CheckpointError naming the file, or a
    model that loads; never another exception."""
    import random

    from conftest import fuzz_report

    source = tmp_path / "base.gguf"
    write_gguf(source, "Q4_0")
    data, rng, seed = source.read_bytes(), random.Random(11), 11
    outcomes: dict[str, int] = {}
    for case in range(80):
        corrupt = bytearray(data[: rng.randrange(len(data))] if case % 2 else data)
        for _ in range(0 if case % 2 else rng.randrange(1, 6)):
            corrupt[rng.randrange(min(len(corrupt), 4000))] = rng.randrange(256)
        path = tmp_path / f"case{case}.gguf"
        path.write_bytes(bytes(corrupt))
        try:
            x2v.load_dit(path, dtype=torch.float32)
            outcome = "loaded"
        except CheckpointError as error:
            assert str(path) in str(error)
            outcome = "refused"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    fuzz_report(f"fuzz: 80 cases, seed {seed} (GGUF files: {outcomes})")


def test_the_scheme_of_a_float_gguf_file_names_its_own_type(tmp_path):
    path = tmp_path / "wan-BF16.gguf"
    write_gguf(path, "BF16")
    assert any(isinstance(m, torch.nn.Linear) for m in x2v.load_dit(path, quant_scheme="gguf-BF16").modules())
    with pytest.raises(CheckpointError, match="this GGUF file holds BF16, F32 weights"):
        x2v.load_dit(path, quant_scheme="gguf-Q8_0")
