"""The learned toon codec (`tttjax.data.toon_codec`): shipped weights, geometry, quality."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from tttjax.data import toon_codec, toon_render, toon_world, toy_latents


@pytest.fixture(scope="module")
def codec():
    return toon_codec.load_codec()


def _episode(index, h=64, w=64):
    ep = toon_world.make_episode(0, index, num_segments=2, frames_per_segment=8)
    return ep, toon_render.render_episode(ep, h, w)


def test_shipped_weights_are_small_and_load(codec):
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(toon_codec.DEFAULT_WEIGHTS) for f in files)
    assert size < 400_000
    assert codec.channels == 4 and (codec.temporal, codec.spatial) == (4, 8)
    assert toy_latents.make_toon_codec("learned", 4) is codec or \
        toy_latents.make_toon_codec("learned", 4).channels == 4


def test_geometry_and_standardised_latents(codec):
    _, frames = _episode(0)                                        # 17 frames
    z = codec.encode(frames)
    assert z.shape == (5, 4, 8, 8) and z.dtype == np.float32
    assert abs(float(z.mean())) < 0.6 and 0.4 < float(z.std()) < 1.6
    out = codec.decode(z)
    assert out.shape == frames.shape and out.dtype == np.uint8
    # the small geometry (128 x 192) goes through the same network
    _, big = _episode(1, 128, 192)
    assert codec.encode(big).shape == (5, 4, 16, 24)


def test_learned_codec_draws_the_characters_better_than_the_linear_map(codec):
    """Error on the pixels where the cat, mouse or cheese are drawn (the empty room differs)."""
    linear = toy_latents.ToyLatentCodec(4)
    errs = {"learned": [], "linear": []}
    for index in range(3):
        ep, frames = _episode(index)
        back = np.stack([np.asarray(toon_render._background(s.room, 64, 64))
                         for s in ep.states()])
        mask = np.any(frames != back, axis=-1)
        for name, c in (("learned", codec), ("linear", linear)):
            diff = np.abs(c.decode(c.encode(frames)).astype(np.float32) - frames)
            errs[name].append(diff.mean(-1)[mask].mean())
    assert np.mean(errs["learned"]) < 0.5 * np.mean(errs["linear"]), errs  # measured 0.27


def test_bad_inputs_name_the_problem(codec):
    with pytest.raises(ValueError, match="1 \\+ 4 k frames"):
        codec.encode(np.zeros((6, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="multiple of 8"):
        codec.encode(np.zeros((5, 60, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="toon_codec"):
        toy_latents.make_toon_codec("vae", 4)
    with pytest.raises(ValueError, match="channels"):
        toon_codec.codec_for_channels(16)


def test_training_command_writes_a_codec_that_loads_and_draws_its_sheet(tmp_path, capsys):
    """`--out` trains (here 2 steps of a width-4 net) and saves; `--sheet` draws the new codec;
    the saved folder loads back and encodes / decodes at the toon geometry."""
    from PIL import Image

    out, sheet = tmp_path / "codec", tmp_path / "sheet.png"
    assert toon_codec.main(["--out", str(out), "--steps", "2", "--batch", "2", "--groups", "8",
                            "--width", "4", "--sheet", str(sheet)]) == 0
    info = json.loads((out / "codec.json").read_text())
    assert (info["channels"], info["width"], info["steps"]) == (4, 4, 2)
    codec = toon_codec.load_codec(str(out))
    _, frames = _episode(2)
    z = codec.encode(frames)
    assert z.shape == (5, 4, 8, 8) and np.isfinite(z).all()
    assert codec.decode(z).shape == frames.shape
    # 2 episodes x 3 versions, 5 frames each, enlarged 3x, plus the label margin
    assert Image.open(sheet).size == (3 * (5 * 64 + 44), 3 * 6 * 64)
    # a folder of another network layout (an older tttjax) names the problem and the fix
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "codec.json").write_text(json.dumps(dict(info, layout=1)))
    with pytest.raises(ValueError, match="layout 1.*retrain"):
        toon_codec.load_codec(str(old))
    # --decoder-of retrains only the decoder (here on fresh renders every step): the encoder,
    # and so every latent a DiT learned on, is bit for bit the old one's
    again = tmp_path / "again"
    assert toon_codec.main(["--out", str(again), "--decoder-of", str(out), "--steps", "2",
                            "--batch", "2", "--groups", "8", "--refresh-every", "1"]) == 0
    new = toon_codec.load_codec(str(again))
    assert json.loads((again / "codec.json").read_text())["refresh_every"] == 1
    np.testing.assert_array_equal(new.encode(frames), z)
    np.testing.assert_array_equal(new.shift, codec.shift)
    assert not np.array_equal(new.decode(z), codec.decode(z))
    with pytest.raises(SystemExit):
        toon_codec.main(["--sheet", str(sheet), "--decoder-of", str(out)])
    # the shipped codec's sheet, without training
    capsys.readouterr()
    assert toon_codec.main(["--sheet", str(tmp_path / "shipped.png"), "--held-out"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "shipped.png" in lines[0]
    err = json.loads(lines[1])
    assert 0 < err["weighted_l1"] < err["character_l1"] < 0.3, err  # measured 0.086 / 0.197


@pytest.mark.parametrize("argv, words", [
    ([], "--out DIR"),
    (["--out", "x", "--weights", "y"], "--weights"),
    (["--held-out", "--weights", "/nonexistent"], "codec.json"),
    (["--out", "x", "--steps", "0"], ">= 1"),
])
def test_training_command_usage_errors_are_one_line(argv, words, capsys):
    try:
        code = toon_codec.main(argv)
    except SystemExit as e:  # argparse's own errors exit; the command's return 2
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_a_failed_save_keeps_the_weights_that_were_there(tmp_path, monkeypatch):
    """Retraining in place (`--decoder-of W --out W`) must not lose W to a full disk."""
    import types

    from flax import nnx

    from tttjax import small_weights

    def net(seed):
        return toon_codec.ToonCodecNet(4, 4, rngs=nnx.Rngs(seed))

    path = tmp_path / "w"
    small_weights.save_weights(str(path), net(0), "x.json", {"v": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(small_weights, "json", types.SimpleNamespace(dump=full_disk))
    with pytest.raises(OSError, match="No space"):
        small_weights.save_weights(str(path), net(1), "x.json", {"v": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["w"]           # no staging folder left behind
    back, info = small_weights.load_weights(str(path), "x.json", lambda _: net(2), "hint")
    assert info == {"v": 1}
    want = nnx.to_pure_dict(nnx.state(net(0), nnx.Param))
    got = nnx.to_pure_dict(nnx.state(back, nnx.Param))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a, np.float16), b)
