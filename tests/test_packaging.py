"""Packaging promises: importing tttjax leaves global settings alone, and its layers build
without a mesh even when Flax's eager sharding is switched on by the user."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx


def test_import_changes_no_flax_setting():
    code = ("import flax; before = flax.config.flax_always_shard_variable; "
            "import tttjax, tttjax.models.dit; "
            "assert flax.config.flax_always_shard_variable == before, 'changed'; print(before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"  # Flax's default, untouched


def test_layers_do_not_shard_eagerly_under_users_setting():
    from tttjax.layers.ttt import TTTMLP

    # A user's process with eager sharding on and no mesh: tttjax's parameters still only
    # carry logical names (placed later by a run's rules), so construction works anywhere.
    with nnx.use_eager_sharding(True):
        layer = TTTMLP(16, 2, mini_batch_size=4, base_lr=1.0, rngs=nnx.Rngs(0))
        abstract = nnx.eval_shape(lambda: TTTMLP(16, 2, mini_batch_size=4, base_lr=1.0,
                                                 rngs=nnx.Rngs(0)))
    params = nnx.state(layer, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and all(v.get_metadata()["eager_sharding"] is False for v in leaves)
    assert all(v.get_metadata().get("out_sharding") for v in leaves)
    assert jax.tree.map(jnp.shape, nnx.state(abstract, nnx.Param)) == jax.tree.map(
        jnp.shape, params)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_config_names_resolve_to_the_configs_folder():
    from tttjax import command_line

    assert {"tiny", "cogvideox_5b"} <= set(command_line.bundled_config_names())
    by_name = command_line.load_config("tiny:ttt_mlp", "steps=4")
    by_path = command_line.load_config(os.path.join(ROOT, "configs", "tiny.py") + ":ttt_mlp",
                                       "steps=4")
    assert by_name.to_dict() == by_path.to_dict() and by_name.steps == 4
    big = command_line.load_config("cogvideox_5b:63s,ttt_mlp")
    assert big.model.mixer == "ttt_mlp"


def test_shipped_toon_base_is_the_toon_base_config_trained_to_its_end():
    """The weights the demo starts from are `configs/toon_base.py`'s run, exported at its last
    step: tiny's plain DiT with 4 blocks of width 128, the data and prompt length the config
    names."""
    import json

    from tttjax import command_line
    from tttjax.models import toon_base

    config = command_line.load_config("toon_base")
    tiny = command_line.load_config("tiny:none,1").model.to_dict()
    assert config.model.to_dict() == dict(tiny, num_layers=4, num_attention_heads=8)
    info = toon_base.read_info()
    assert info["model"] == json.loads(config.model.to_json())
    assert info["step"] == config.steps and info["text_length"] == config.stage.text_length
    assert info["data"]["toon_codec"] == "learned"
    assert info["data"]["builder_overrides"] == config.data.builder_overrides.to_dict()
    assert os.path.isdir(toon_base.params_dir())


@pytest.mark.parametrize("spec,message", [
    ("no_such", "no bundled config 'no_such' (bundled: cogvideox_5b, tiny"),
    ("no_such.py:ttt_mlp", "no file 'no_such.py'"),
    ("tiny:no_such_mixer", "no_such_mixer"),
])
def test_unknown_config_is_a_usage_error(spec, message):
    from tttjax.command_line import UsageError, load_config

    with pytest.raises(UsageError, match=re.escape(message)):
        load_config(spec)


def test_train_reads_a_bundled_config_by_name_from_another_directory(tmp_path):
    # config.steps=0 is refused by validation: seen only if the name resolved and the
    # override applied, and nothing is compiled.
    cmd = [sys.executable, "-m", "tttjax.train", "--config", "tiny:ttt_mlp", "--workdir",
           str(tmp_path / "w"), "--config.steps=0"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config.steps must be an int >= 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_optional_package_names_its_extra():
    from tttjax.optional_dependency import MissingDependency, require

    assert require("json", "video", "x").dumps([]) == "[]"
    with pytest.raises(MissingDependency,
                       match=re.escape("writing MP4 needs the 'no_such_pkg' package, not "
                                       "installed: pip install 'tttjax[video]'")):
        require("no_such_pkg.v3", "video", "writing MP4")


def test_ci_runs_exactly_the_readme_test_command_through_the_constraints():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line for line in f.read().splitlines() if line.startswith("python3 -m venv")]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(ci) == 1 and ci[0] in readme.splitlines(), ci
    assert "-c constraints.txt" in ci[0]
    with open(os.path.join(ROOT, "constraints.txt"), encoding="utf-8") as f:
        pins = dict(line.split("==") for line in f.read().splitlines()
                    if line and not line.startswith("#"))
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                 "tensorflow-datasets", "ml_collections", "torch"):
        assert name in pins, name
