import pytest
from conftest import small_config

from qat_jax import resolve


@pytest.mark.parametrize("overrides,n_devices,match", [
    ({"model.d_model": 66}, 1, r"model.d_model=66 is not divisible by model.n_heads=4"),
    ({"model.n_kv_heads": 3}, 1, r"model.n_kv_heads=3 must divide model.n_heads=4"),
    ({"model.n_layers": 0}, 1, r"model.n_layers=0 must be positive"),
    ({"model.compute_dtype": "fp8"}, 1, r"model.compute_dtype='fp8'"),
    ({"data.batch_size": 6}, 4, r"data.batch_size=6 is not divisible by the 4 data-parallel"),
    ({"mesh.data": 4}, 2, r"4 x 1 x 1 = 4 devices, but 2 are available"),
    ({"mesh.tensor": 3}, 8, r"mesh.fsdp \* mesh.tensor = 3 does not divide the 8 devices"),
    ({"mesh.tensor": 8, "mesh.data": 1}, 8, r"model.n_heads=4 is not divisible by mesh.tensor=8"),
    ({"optimizer.grad_accum_steps": 3}, 1, r"optimizer.grad_accum_steps=3 must divide"),
    ({"optimizer.b2": 1.0}, 1, r"optimizer.b2=1.0 must be in \[0, 1\)"),
    ({"data.source": "web"}, 1, r"data.source='web'; valid"),
    ({"data.source": "files"}, 1, r"data.source='files' needs data.path"),
    ({"data.val_every_nth_doc": 1}, 1, r"data.val_every_nth_doc=1 must be >= 2"),
    ({"schedule.total_tokens": 10}, 1, r"schedule.total_tokens=10 is less than one step"),
])
def test_bad_configs_name_the_key(tmp_path, overrides, n_devices, match):
    config = small_config(str(tmp_path), **overrides)
    with pytest.raises(resolve.ConfigError, match=match):
        resolve.resolve(config, n_devices=n_devices, n_processes=1)


def test_good_config_on_8_devices(tmp_path):
    """A resolved Run carries the mesh as configured (data -1 kept: it means every device
    fsdp and tensor leave, wherever the Run is built), and its shape on 8 devices."""
    from qat_jax import sharding

    config = small_config(str(tmp_path), **{"mesh.fsdp": 2, "mesh.tensor": 2})
    run = resolve.resolve(config, n_devices=8, n_processes=1)
    assert run.mesh == sharding.MeshSpec(data=-1, fsdp=2, tensor=2)
    assert sharding.mesh_shape(run.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.mesh_shape(run.mesh, 4) == {"data": 1, "fsdp": 2, "tensor": 2}


def test_batch_divisible_by_hosts(tmp_path):
    config = small_config(str(tmp_path), **{"data.batch_size": 8})
    with pytest.raises(resolve.ConfigError, match="not divisible by the 3 hosts"):
        resolve.resolve(config, n_devices=1, n_processes=3)


def test_every_float_key_must_be_finite(tmp_path):
    """The whole class: each float key of the config, set to inf and to nan, is refused by
    name before anything runs (a non-finite learning rate or weight decay would only show
    as a diverged run after the compile)."""
    import math

    config = small_config(str(tmp_path))
    floats = [f"{g}.{k}" for g, group in config.to_dict().items() if isinstance(group, dict)
              for k, v in group.items() if isinstance(v, float)]
    assert {"optimizer.peak_lr", "optimizer.weight_decay", "model.init_std"} <= set(floats)
    for key in floats:
        for bad in (math.inf, math.nan):
            c = small_config(str(tmp_path), **{key: bad})
            with pytest.raises(resolve.ConfigError,
                               match=rf"^{key.replace('.', r'[.]')}=(inf|nan) must be a finite"):
                resolve.resolve(c, n_devices=1, n_processes=1)


def test_loop_spec_holds_the_loop_keys(tmp_path):
    """The Run's LoopSpec is what train.py's loop reads: every checkpoint.*, logging.* and
    compile.* key (a key added to qat_jax/configs/base.py and not to the spec would silently be
    ignored), the seed and model.init_from, by value."""
    import dataclasses

    config = small_config(str(tmp_path), **{"checkpoint.every_steps": 7, "logging.every_steps": 3,
                                            "compile.cache_min_compile_s": 2.5})
    config.seed = 11
    spec = resolve.resolve(config, n_devices=1, n_processes=1).loop
    names = {"checkpoint": {"every_steps": "checkpoint_every", "max_to_keep": "max_to_keep"},
             "logging": {"every_steps": "log_every", "eval_every_steps": "eval_every",
                         "tensorboard": "tensorboard"},
             "compile": {"cache_dir": "compile_cache_dir",
                         "cache_min_compile_s": "compile_cache_min_s"}}
    for group, fields in names.items():
        assert set(config[group].keys()) == set(fields), group
        for key, field in fields.items():
            assert getattr(spec, field) == config[group][key], (group, key)
    assert (spec.seed, spec.init_from) == (11, config.model.init_from)
    assert {f.name for f in dataclasses.fields(spec)} == {
        *(f for fields in names.values() for f in fields.values()), "seed", "init_from"}
    assert (spec.checkpoint_every, spec.log_every, spec.compile_cache_min_s) == (7, 3, 2.5)
