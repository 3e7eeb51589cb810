"""Checkpoint readers: block-split folders, shard indexes, truncated files, pickles, and the memory a cast load takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ckpt_utils import write_sharded
from safetensors.torch import save_file

from x2v.errors import CheckpointError
from x2v.formats.readers import read_block_split, read_checkpoint, read_index
from x2v.loading.weights import assign_weights, build_on_meta
from x2v.runtime.pages import FileMappings

REPO = Path(__file__).resolve().parents[1]


def dit_like(blocks: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {"patch_embedding.weight": torch.randn(8, 4, generator=g), "head.modulation": torch.randn(1, 2, 8)}
    for i in range(blocks):
        tensors[f"blocks.{i}.self_attn.q.weight"] = torch.randn(8, 8, generator=g)
        tensors[f"blocks.{i}.norm3.bias"] = torch.randn(8, generator=g)
    return tensors


def write_block_split(directory: Path, tensors: dict[str, torch.Tensor], index: bool = False) -> Path:
    """LightX2V ``--save_by_block`` layout: non_block.safetensors + block_{i}.safetensors (+ index)."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        file = f"block_{name.split('.')[1]}.safetensors" if name.startswith("blocks.") else "non_block.safetensors"
        files.setdefault(file, {})[name] = t
    weight_map = {}
    for file, part in files.items():
        save_file(part, str(directory / file))
        weight_map.update(dict.fromkeys(part, file))
    if index:
        total = sum((directory / f).stat().st_size for f in files)  # the converter counts file bytes
        (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(actual[name], t), name


@pytest.mark.parametrize("index", [False, True])
def test_block_split_folder(tmp_path, index):
    tensors = dit_like()
    folder = write_block_split(tmp_path / "lazy", tensors, index=index)
    assert_same(read_block_split(folder), tensors)
    assert_same(read_checkpoint(folder), tensors)


def test_block_split_gap_names_the_missing_file(tmp_path):
    folder = write_block_split(tmp_path / "lazy", dit_like(blocks=4))
    (folder / "block_2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing: block_2\.safetensors"):
        read_checkpoint(folder)


def test_block_split_tensor_in_the_wrong_file(tmp_path):
    folder = write_block_split(tmp_path / "lazy", dit_like())
    save_file({"blocks.1.self_attn.q.weight": torch.zeros(8, 8)}, str(folder / "block_0.safetensors"))
    with pytest.raises(CheckpointError, match=r"block_0\.safetensors: holds 'blocks\.1\.self_attn\.q\.weight', "
                                              r"which belongs in block_1\.safetensors"):
        read_block_split(folder)


def test_block_split_block_tensor_in_non_block(tmp_path):
    tensors = dit_like()
    folder = write_block_split(tmp_path / "lazy", tensors)
    save_file({"head.modulation": tensors["head.modulation"], "blocks.0.norm3.bias": torch.zeros(8)},
              str(folder / "non_block.safetensors"))
    with pytest.raises(CheckpointError, match=r"non_block\.safetensors: holds 'blocks\.0\.norm3\.bias'"):
        read_block_split(folder)


def test_block_split_index_must_agree(tmp_path):
    folder = write_block_split(tmp_path / "lazy", dit_like(), index=True)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["blocks.0.norm3.bias"] = "block_1.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"block_0\.safetensors: holds 'blocks\.0\.norm3\.bias', which the index "
                                              r"places in block_1\.safetensors"):
        read_checkpoint(folder)


def test_plain_folder_is_not_read_as_a_whole(tmp_path):
    with pytest.raises(CheckpointError, match="a folder; pass the checkpoint file"):
        read_checkpoint(tmp_path)


def test_sharded_index(tmp_path):
    tensors = dit_like()
    assert_same(read_index(write_sharded(tmp_path, tensors, shards=3)), tensors)


def test_index_missing_shard(tmp_path):
    index = write_sharded(tmp_path, dit_like(), shards=3)
    (tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names 1 shard\(s\) that are not in .*00002-of-00003\.safetensors"):
        read_checkpoint(index)


def test_index_lists_a_key_twice(tmp_path):
    index = write_sharded(tmp_path, dit_like(), shards=2)
    text = index.read_text()
    duplicate = '"weight_map": {"head.modulation": "diffusion_pytorch_model-00002-of-00002.safetensors", '
    index.write_text(text.replace('"weight_map": {', duplicate, 1))
    with pytest.raises(CheckpointError, match="key 'head.modulation' appears twice"):
        read_checkpoint(index)


def test_index_places_a_key_in_the_wrong_shard(tmp_path):
    index = write_sharded(tmp_path, dit_like(), shards=2)
    data = json.loads(index.read_text())
    data["weight_map"]["patch_embedding.weight"] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="holds 'patch_embedding.weight', which the index places in .*00002"):
        read_checkpoint(index)


def test_tensor_in_two_shards(tmp_path):
    tensors = dit_like()
    index = write_sharded(tmp_path, tensors, shards=2)
    second = tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"
    save_file({**read_checkpoint(second), "patch_embedding.weight": tensors["patch_embedding.weight"]}, str(second))
    with pytest.raises(CheckpointError, match="'patch_embedding.weight' is also in .*00001-of-00002"):
        read_checkpoint(index)


def test_index_total_size_far_from_the_shards(tmp_path):
    index = write_sharded(tmp_path, dit_like(), shards=2)
    data = json.loads(index.read_text())
    data["metadata"]["total_size"] *= 2  # e.g. the fp32 index next to bf16 shards
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"total_size is [\d,]+ bytes, but the shards hold [\d,]+ bytes"):
        read_checkpoint(index)


def test_truncated_safetensors_names_expected_and_actual_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    size = path.stat().st_size
    os.truncate(path, size - 1000)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: truncated file: the header describes {size} "
                                              rf"bytes, the file has {size - 1000} \(1000 missing\)"):
        read_checkpoint(path)


def test_pth_with_nested_state_dict(tmp_path):
    tensors = dit_like(blocks=1)
    path = tmp_path / "train.pth"
    torch.save({"state_dict": tensors, "epoch": 3}, path)
    assert_same(read_checkpoint(path), tensors)


class Stack(torch.nn.Module):
    def __init__(self, count: int, shape: tuple[int, ...]):
        super().__init__()
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(shape)) for _ in range(count))


def test_no_cast_on_cpu_keeps_the_file_mapping(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({f"w.{i}": torch.randn(64, 64).bfloat16() for i in range(3)}, str(path))
    model = assign_weights(build_on_meta(lambda: Stack(3, (64, 64))), read_checkpoint(path), dtype=torch.bfloat16)
    assert all(FileMappings().pages(p) is not None for p in model.parameters())  # views of the file, not copies


def test_cast_load_gives_the_file_values_and_leaves_the_source_readable(tmp_path):
    tensors = {f"w.{i}": torch.randn(300, 1000) for i in range(4)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    source = read_checkpoint(path)
    model = assign_weights(build_on_meta(lambda: Stack(4, (300, 1000))), source, dtype=torch.bfloat16)
    for i, p in enumerate(model.w):
        assert p.dtype == torch.bfloat16 and torch.equal(p, tensors[f"w.{i}"].bfloat16())
        assert torch.equal(source[f"w.{i}"], tensors[f"w.{i}"])  # released pages read back from the file


def test_cast_load_peak_memory_stays_near_the_model_size(tmp_path):
    """fp32 file (300 MB, 30 tensors) -> bf16 model: peak RSS grows by ~the model (150 MB), not file + model."""
    path = tmp_path / "fp32.safetensors"
    count, shape = 30, (2500, 1000)
    save_file({f"w.{i}": torch.full(shape, float(i)) for i in range(count)}, str(path))
    file_bytes = path.stat().st_size
    code = textwrap.dedent(f"""
        import torch
        from test_readers import Stack
        from x2v.formats.readers import read_checkpoint
        from x2v.loading.weights import assign_weights, build_on_meta

        def status(field):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

        model = build_on_meta(lambda: Stack({count}, {shape}))
        before = status("VmRSS")
        model = assign_weights(model, read_checkpoint({str(path)!r}), dtype=torch.bfloat16)
        assert model.w[{count - 1}][0, 0].item() == {count - 1}
        print(status("VmHWM") - before)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    growth = int(done.stdout.split()[-1])
    assert growth < 0.75 * file_bytes, f"peak RSS grew by {growth / 1e6:.0f} MB for a {file_bytes / 1e6:.0f} MB file"
