"""`python -m tttjax.demo` end to end at a few steps: train, sample, write the three files.

The full demo (600 steps) is timed by hand (README); here the same code path runs with 3
training steps from the shipped toon base, 2 sampler steps, a 32-episode dataset and cheap
XLA options.
"""

import json

import imageio.v3 as iio
import numpy as np
from PIL import Image

from tttjax import demo
from tttjax.storyboard import load_storyboard

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
        "xla_cpu_use_fusion_emitters": False}


def test_demo_trains_samples_and_writes_video_gif_and_sheet(tmp_path, monkeypatch, capsys):
    full = demo.demo_config

    def small(steps, text_length, codec="learned", base=""):
        cfg = full(steps, text_length, codec, base)
        cfg.data.builder_overrides = dict(num_train=32, num_validation=0)
        cfg.train.compiler_options = dict(FAST)
        cfg.train.progress_bar = False
        return cfg

    monkeypatch.setattr(demo, "demo_config", small)
    out = tmp_path / "demo"
    # The learned toon codec (the default; the linear one is what the other train tests use).
    argv = ["--out", str(out), "--steps", "3", "--sample-steps", "2", "--data-dir",
            str(tmp_path / "tfds")]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    # It fine-tunes from the shipped base, as the paper from CogVideoX: the base's denoising
    # already holds, so the first steps' loss is far below a random DiT's (about 1.0).
    assert "from the shipped toon base" in printed
    first_loss = json.loads(open(out / "run" / "metrics.jsonl").readline())["loss"]
    assert first_loss < 0.8, first_loss
    for name in ("demo.mp4", "demo.gif", "contact_sheet.png", "storyboard.json"):
        assert str(out / name) in printed and (out / name).stat().st_size > 0
    story = load_storyboard(str(out / "storyboard.json"))
    assert story.num_segments == 3
    assert json.loads((out / "storyboard.json").read_text()) == demo.STORYBOARD
    gif = iio.imread(out / "demo.gif")
    assert gif.ndim == 4 and gif.shape[-1] in (3, 4)
    assert Image.open(out / "contact_sheet.png").size[0] >= 3 * 64
    steps = [json.loads(line)["step"] for line in open(out / "run" / "metrics.jsonl")]
    assert steps[-1] == 3
    # A rerun resumes the finished run (no training) and samples the same video.
    first = np.asarray(iio.imread(out / "demo.gif"))
    assert demo.main(argv) == 0
    assert "trained to step 3" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(iio.imread(out / "demo.gif")), first)
    # The same --out with another network (e.g. another --base's): exit 2, one line naming
    # the difference, before anything is written, and the finished run untouched.
    def other_network(*args, **kwargs):
        cfg = small(*args, **kwargs)
        cfg.model.num_layers = 1
        return cfg

    monkeypatch.setattr(demo, "demo_config", other_network)
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "another model" in err and "num_layers" in err and "\n" not in err
    np.testing.assert_array_equal(np.asarray(iio.imread(out / "demo.gif")), first)


def test_demo_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--steps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--steps" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--from-scratch", "--base", "somewhere"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--base" in err and "\n" not in err
    assert demo.main(["--base", "/nonexistent/base"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no exported toon base" in err and "\n" not in err


def test_demo_model_is_the_bases_network_plus_ttt_layers(tmp_path):
    """With a base, the demo's DiT takes the base's network (here its patch size, which
    tiny's default does not share) and adds TTT-MLP; from scratch it is tiny's."""
    import shutil

    from tttjax.models import toon_base

    shipped = toon_base.read_info()
    config = demo.demo_config(10, 24, "learned", toon_base.DEFAULT_WEIGHTS)
    assert config.model.mixer == "ttt_mlp"
    for key, value in shipped["model"].items():
        if key not in ("mixer", "mixer_config"):
            assert config.model[key] == value, key
    # Another export with other patches: the demo follows it.
    other = tmp_path / "base"
    shutil.copytree(toon_base.DEFAULT_WEIGHTS, other)
    patch = 2 if shipped["model"]["patch_size"] == 1 else 1
    info = dict(shipped, model=dict(shipped["model"], patch_size=patch))
    (other / toon_base.INFO_FILE).write_text(json.dumps(info))
    assert demo.demo_config(10, 24, "learned", str(other)).model.patch_size == patch
    assert demo.demo_config(10, 24).model.patch_size == 2
