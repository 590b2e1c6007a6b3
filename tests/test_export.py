"""`python -m tttjax.export`: safetensors in diffusers' layout plus the mixer, read back bitwise.

A tiny random diffusers `CogVideoXTransformer3DModel` (every parameter perturbed) is imported
with a TTT-MLP mixer, its mixer parameters randomised too, saved as a converted checkpoint and
exported: the base tensors must equal diffusers' own state dict (so diffusers reads the folder
as written), and `read_export` must rebuild every parameter bitwise; the same in bfloat16
(param_dtype), and to / from a `gs://` folder (local emulator). Exporting a training
workdir and sampling from the export: tests/test_sample.py.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from tttjax import export as export_cli  # noqa: E402
from tttjax.models.dit_weights import from_diffusers, is_mixer_path, save_checkpoint  # noqa: E402

# no q/k/v bias, more output channels than input (the layouts most easily confused)
KWARGS = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=24,
              time_embed_dim=16, in_channels=4, out_channels=8, sample_height=8, sample_width=8,
              attention_bias=False, use_rotary_positional_embeddings=True)


def _flat(model):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _checkpoint(tmp_path_factory, **overrides):
    """(diffusers model, our model with a perturbed TTT-MLP mixer, converted checkpoint path)."""
    torch.manual_seed(0)
    theirs = CogVideoXTransformer3DModel(**KWARGS).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    src = tmp_path_factory.mktemp("diffusers")
    theirs.save_pretrained(src)
    model, _ = from_diffusers(str(src), mixer="ttt_mlp", attention="segment",
                              frames_per_segment=2, **overrides)
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    # the mixer's gates and norms start at constants: perturb them (the base stays diffusers')
    flat = [(p, v.replace(v[...] + 0.1 * jax.random.normal(next(keys), v.shape, v.dtype))
             if is_mixer_path(p) else v) for p, v in nnx.to_flat_state(state)]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return theirs, model, save_checkpoint(model, str(tmp_path_factory.mktemp("ckpt")))


def _assert_same_parameters(model, back):
    a, b = _flat(model), _flat(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    theirs, model, ckpt = _checkpoint(tmp_path_factory)
    out = tmp_path_factory.mktemp("export")
    assert export_cli.main(["--workdir", ckpt, "--out", str(out)]) == 0
    return theirs, model, out


def test_base_tensors_are_diffusers_state_dict_and_diffusers_loads_them(exported):
    theirs, _, out = exported
    stored = load_file(os.path.join(out, export_cli.BASE_FILE))
    want = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    want = {k: v for k, v in want.items() if k in stored or not k.startswith("patch_embed.pos")}
    assert stored.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(stored[k], v, err_msg=k)
    config = json.loads((out / "config.json").read_text())
    assert all(config[k] == v for k, v in KWARGS.items())
    reread, info = CogVideoXTransformer3DModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_array_equal(reread.proj_out.weight.detach().numpy(),
                                  want["proj_out.weight"])


def test_round_trip_is_bitwise_with_the_mixer(exported):
    _, model, out = exported
    mixer = load_file(os.path.join(out, export_cli.MIXER_FILE))
    assert "transformer_blocks.1.mixer.alpha_fwd" in mixer
    assert "transformer_blocks.0.mixer.mixer.W1" in mixer
    back, cfg = export_cli.read_export(str(out))
    assert cfg.to_dict() == model.cfg.to_dict()
    _assert_same_parameters(model, back)
    assert json.loads((out / export_cli.PAIRING_FILE).read_text())["text_length"] == 226


def test_bfloat16_parameters_round_trip_bitwise(tmp_path_factory):
    """param_dtype bfloat16: stored as safetensors BF16 (not widened), read back bitwise."""
    from safetensors import safe_open

    _, model, ckpt = _checkpoint(tmp_path_factory, param_dtype="bfloat16")
    flat = _flat(model)
    assert {str(v.dtype) for v in flat.values()} == {"bfloat16"}
    out = tmp_path_factory.mktemp("export_bf16")
    assert export_cli.main(["--workdir", ckpt, "--out", str(out)]) == 0
    for name in (export_cli.BASE_FILE, export_cli.MIXER_FILE):
        with safe_open(str(out / name), framework="numpy") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"BF16"}, (name, dtypes)
    back, cfg = export_cli.read_export(str(out))
    assert cfg.param_dtype == "bfloat16"
    _assert_same_parameters(model, back)


def test_export_to_and_from_a_bucket(exported, tmp_path):
    """`--out gs://...` and `read_export("gs://...")` against the local emulator."""
    import gcs_emulator

    if gcs_emulator.available() is not None:
        pytest.skip(gcs_emulator.available())
    _, model, local = exported
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(model, ckpt)
    with gcs_emulator.GCSEmulator() as gcs:
        gcs.create_bucket("bucket")
        assert export_cli.main(["--workdir", ckpt, "--out", "gs://bucket/export"]) == 0
        from tttjax import storage

        for name in ("config.json", export_cli.TTTJAX_CONFIG, export_cli.PAIRING_FILE,
                     export_cli.BASE_FILE, export_cli.MIXER_FILE):
            assert storage.path(f"gs://bucket/export/{name}").read_bytes() == (local / name).read_bytes(), name
        back, _ = export_cli.read_export("gs://bucket/export")
        # from_pretrained reads the bucket export's configs; a converted source needs its VAE
        from tttjax.generation import is_exported, load_generator

        assert is_exported("gs://bucket/export")
        with pytest.raises(ValueError, match="exported folder gs://bucket/export needs the "
                                             "CogVideoX VAE"):
            load_generator("gs://bucket/export", hashed_text_seed=0)
    _assert_same_parameters(model, back)


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert export_cli.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert export_cli.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a folder" in err[0] and "neither a training workdir" in err[1]
