"""What x2v reads from tensor shapes alone: variant names and the tasks a DiT can serve."""

import pytest

from x2v.errors import CheckpointError
from x2v.formats.dit_keys import check_task, supported_tasks, variant_name
from x2v.models.wan_dit import WanDiTConfig

T2V_14B = WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
I2V_21 = WanDiTConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                      image_branch=True)
I2V_22 = WanDiTConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
TI2V = WanDiTConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30)


@pytest.mark.parametrize("cfg,name,tasks", [
    (T2V_14B, "Wan2.1 T2V-14B", ["t2v", "t2i"]),
    (I2V_21, "Wan2.1 I2V-14B", ["i2v"]),
    (I2V_22, "Wan2.2 I2V-A14B expert", ["i2v"]),
    (TI2V, "Wan2.2 TI2V-5B", ["t2v", "i2v"]),
])
def test_variant_and_tasks(cfg, name, tasks):
    assert variant_name(cfg) == name
    assert supported_tasks(cfg) == tasks
    for task in tasks:
        check_task(cfg, task, "model")


def test_i2v_with_t2v_weights_is_refused():
    with pytest.raises(CheckpointError, match="task i2v needs an image-to-video DiT.*Wan2.1 T2V-14B"):
        check_task(T2V_14B, "i2v", "model")
    with pytest.raises(ValueError, match="unknown task"):
        check_task(T2V_14B, "video2music", "model")
