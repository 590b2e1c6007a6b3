"""A mixer chosen by flag (`--config.model.mixer=...`) gives the config of the config argument."""

import os

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from tttjax.models.dit import CogVideoXDiT
from tttjax.train.__main__ import main as train_main

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def parse(*argv):
    """The config the command line `python -m tttjax.train` parses from these flags."""
    argv = ["prog", *argv]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


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
