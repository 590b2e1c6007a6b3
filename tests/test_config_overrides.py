"""Config arguments (named or positional), the shared base, and `--config.KEY=VALUE` overrides:
a mixer chosen by flag (`--config.model.mixer=...`) gives the config of the config argument."""

import os

import pytest
from flax import nnx

from tttjax import config_base
from tttjax.command_line import UsageError, load_config
from tttjax.models.dit import CogVideoXDiT
from tttjax.train.__main__ import main as train_main

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def parse(config_flag, *overrides):
    """The config `python -m tttjax.train --config=... --config.KEY=VALUE ...` runs (the one
    loader every command uses)."""
    assert config_flag.startswith("--config=")
    return load_config(config_flag[len("--config="):],
                       *(o[len("--config."):] for o in overrides))


@pytest.mark.parametrize("named,positional", [
    ("tiny:mixer=ttt_mlp,segments=3", "tiny:ttt_mlp,3"),
    ("tiny:ttt_mlp,segments=3", "tiny:ttt_mlp,3"),
    ("tiny:segments=3", "tiny:none,3"),
    ("tiny", "tiny:none,2"),
    ("cogvideox_5b:stage=63s,mixer=ttt_mlp", "cogvideox_5b:63s,ttt_mlp"),
    ("cogvideox_5b:mixer=ttt_linear,stage=9s", "cogvideox_5b:9s,ttt_linear"),
])
def test_named_config_arguments_equal_positional_ones(named, positional):
    assert load_config(named).to_dict() == load_config(positional).to_dict()


@pytest.mark.parametrize("spec,message", [
    ("tiny:flavour=ttt_mlp", "unknown config argument 'flavour'"),
    ("tiny:mixer=ttt_mlp,3", "positional value '3' after a named one"),
    ("tiny:ttt_mlp,mixer=none", "config argument 'mixer' given twice"),
    ("tiny:ttt_mlp,2,3", "too many values"),
    ("tiny:segments=two", "segments='two' must be a non-negative integer"),
    ("tiny:segments=0", "segments must be >= 1"),
    ("cogvideox_5b:stage=63s", "config argument 'mixer' is required"),
    ("cogvideox_5b:5s,ttt_mlp", "unknown stage '5s'"),
])
def test_bad_config_arguments_are_one_line_usage_errors(spec, message):
    with pytest.raises(UsageError) as err:
        load_config(spec)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_bundled_configs_start_from_the_shared_base():
    base = config_base.get_config()
    for spec in ("tiny:ttt_mlp", "cogvideox_5b:63s,ttt_mlp"):
        config = load_config(spec)
        # every shared section and key is there, and what neither config sets is the base's
        assert set(config.keys()) == set(base.keys()) | {"model", "stage"}
        for section in ("diffusion", "checkpoint"):
            assert config[section].to_dict() == base[section].to_dict(), (spec, section)
        assert config.optim.b2 == base.optim.b2 and config.eval.timesteps == base.eval.timesteps
    assert load_config("tiny").mesh.indivisible == "warn"
    assert load_config("cogvideox_5b:63s,ttt_mlp").mesh.indivisible == "error"


@pytest.mark.parametrize("file,by_arg,by_flag,mixer", [
    ("tiny.py", "ttt_mlp", "none", "ttt_mlp"),
    ("tiny.py", "ttt_linear", "ttt_mlp", "ttt_linear"),   # from one mixer's settings to another's
    ("cogvideox_5b.py", "3s,ttt_mlp", "3s,none", "ttt_mlp"),
    ("cogvideox_5b.py", "63s,ttt_linear", "63s,none", "ttt_linear"),
])
def test_mixer_flag_gives_the_config_of_the_argument(file, by_arg, by_flag, mixer):
    want = parse(f"--config={CONFIGS}/{file}:{by_arg}")
    got = parse(f"--config={CONFIGS}/{file}:{by_flag}", f"--config.model.mixer={mixer}")
    assert got.model.to_dict() == want.model.to_dict()
    if file == "tiny.py" or by_arg.startswith("3s,"):
        # cogvideox_5b's later stages also choose train.trainable from the mixer argument
        assert got.to_dict() == want.to_dict()


def test_the_built_mixer_takes_the_settings_of_its_name():
    cfg = parse(f"--config={CONFIGS}/tiny.py", "--config.model.mixer=ttt_mlp",
                "--config.model.mixer_config.ttt_mlp.base_lr=0.5").model
    mixer = nnx.eval_shape(lambda: CogVideoXDiT(cfg, rngs=nnx.Rngs(0))).blocks.mixer.mixer
    assert (mixer.mini_batch_size, mixer.remat_group_size, mixer.base_lr) == (16, 2, 0.5)


def test_train_command_applies_config_overrides(tmp_path, capsys):
    # an override that validation refuses: seen only if the command line's overrides are applied
    code = train_main(["prog", f"--config={CONFIGS}/tiny.py", "--config.steps=0",
                       "--workdir", str(tmp_path)])
    assert code == 2
    assert "config.steps must be an int >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--config=configs/no_such.py"], "--config: no file 'configs/no_such.py'"),
    ([f"--config={CONFIGS}/tiny.py:no_such_mixer"], "no_such_mixer"),
    ([f"--config={CONFIGS}/tiny.py", "--config.model.no_such_key=1"], "no_such_key"),
    ([f"--config={CONFIGS}/tiny.py", "--config.steps=two"], "steps"),
    ([], "--config is required"),
    ([f"--config={CONFIGS}/tiny.py"], "--workdir is required"),
])
def test_train_command_line_errors_are_one_line_with_exit_2(argv, message, capsys):
    code = train_main(["prog", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("python -m tttjax.train: error: "), err
    assert message in err, err
