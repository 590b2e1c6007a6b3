"""CogVideoX VAE: parity with diffusers' AutoencoderKLCogVideoX on tiny random models.

Tolerance: max |ours - diffusers| / max |diffusers| < 1e-4 in float32 (observed ~1e-6;
the gap is convolution summation order). Temporal tiling must equal untiled processing
to 1e-5 (same arithmetic up to XLA fusion choices).
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from tiny_hf_models import save_tiny_vae
from tttjax.models.vae import SpatialTiling, VAEConfig, frame_batches, sample_posterior
from tttjax.models.vae_weights import config_from_diffusers, from_diffusers_vae

TOL = 1e-4

# 3 blocks (4x spatial, 4x temporal), GroupNorm eps 1e-3 so eps mix-ups show.
CONFIG_A = dict(block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1,
                norm_num_groups=4, norm_eps=1e-3, down_block_types=("CogVideoXDownBlock3D",) * 3,
                up_block_types=("CogVideoXUpBlock3D",) * 3, sample_height=16, sample_width=16)
# CogVideoX's 4-block layout (8x spatial, 4x temporal) with quant convs.
CONFIG_B = dict(block_out_channels=(8, 8, 16, 16), latent_channels=3, layers_per_block=2,
                norm_num_groups=2, use_quant_conv=True, use_post_quant_conv=True)


def _to_ours(t):  # diffusers [B, C, T, H, W] -> ours [B, T, C, H, W]
    return np.transpose(t.detach().numpy(), (0, 2, 1, 3, 4))


def _to_torch(a):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(a), (0, 2, 1, 3, 4))))


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _build(tmp_path_factory, name, cfg, seed):
    folder = str(tmp_path_factory.mktemp(name))
    model = save_tiny_vae(folder, cfg, seed)
    vae, config = from_diffusers_vae(folder)
    return model, vae, config, folder


@pytest.fixture(scope="module")
def model_a(tmp_path_factory):
    return _build(tmp_path_factory, "vae_a", CONFIG_A, 0)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    return _build(tmp_path_factory, "vae_b", CONFIG_B, 1)


def test_frame_batches_follow_diffusers():
    assert frame_batches(49, 8) == (9, 8, 8, 8, 8, 8)
    assert frame_batches(13, 2) == (3, 2, 2, 2, 2, 2)
    assert frame_batches(16, 8) == (8, 8)
    assert frame_batches(15, 8) == (15,)
    assert frame_batches(1, 2) == (1,)
    with pytest.raises(ValueError, match="at least one frame"):
        frame_batches(0, 8)


@pytest.mark.parametrize("which,shape", [("a", (2, 3, 25, 16, 24)), ("b", (1, 3, 16, 24, 16))])
def test_encode_matches_diffusers_tiled_and_untiled(which, shape, model_a, model_b):
    torch_vae, vae, _, _ = model_a if which == "a" else model_b
    x = torch.from_numpy(np.random.default_rng(2).uniform(-1, 1, shape).astype(np.float32))
    with torch.no_grad():
        post = torch_vae.encode(x).latent_dist
    ref_mean, ref_logvar = _to_ours(post.mean), _to_ours(post.logvar)
    mean, logvar = vae.encode(_to_ours(x), tile_batches=None)
    assert _rel_err(mean, ref_mean) < TOL and _rel_err(logvar, ref_logvar) < TOL
    t_mean, t_logvar = vae.encode(_to_ours(x), tile_batches=1)
    assert _rel_err(t_mean, mean) < 1e-5 and _rel_err(t_logvar, logvar) < 1e-5


@pytest.mark.parametrize("which,shape", [("a", (2, 4, 7, 4, 6)), ("b", (1, 3, 4, 3, 2))])
def test_decode_matches_diffusers_tiled_and_untiled(which, shape, model_a, model_b):
    torch_vae, vae, _, _ = model_a if which == "a" else model_b
    z = torch.from_numpy(np.random.default_rng(3).standard_normal(shape).astype(np.float32))
    with torch.no_grad():
        ref = _to_ours(torch_vae.decode(z).sample)
    full = vae.decode(_to_ours(z), tile_batches=None)
    assert _rel_err(full, ref) < TOL
    chunks = list(vae.decode_chunks(_to_ours(z), tile_batches=1))
    assert len(chunks) == len(frame_batches(shape[2], 2))
    assert _rel_err(jnp.concatenate(chunks, axis=1), full) < 1e-5


def test_frame_batching_is_part_of_the_numbers(model_a):
    """One GroupNorm segment over all frames differs from diffusers' per-batch statistics,
    so the parity tests above do test the segment bookkeeping."""
    torch_vae, vae, _, _ = model_a
    z = np.random.default_rng(3).standard_normal((2, 7, 4, 4, 6)).astype(np.float32)
    with torch.no_grad():
        ref = _to_ours(torch_vae.decode(_to_torch(z)).sample)
    decode_one_segment = nnx.jit(lambda m, zz: m.decode_tile(zz, (7,), None)[0])
    one_segment = decode_one_segment(vae, jnp.moveaxis(jnp.asarray(z), 2, -1))
    assert _rel_err(jnp.moveaxis(one_segment, -1, 2), ref) > 1e-3


def test_spatial_tiling_matches_diffusers(model_a):
    """Sizes keep the number of distinct tile shapes (= compilations) small: encode tiles
    one row of two columns, decode a 2 x 2 grid; both blend (decode in both directions)."""
    torch_vae, vae, _, _ = model_a
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 9, 8, 16)).astype(np.float32))
    z = torch.from_numpy(rng.standard_normal((1, 4, 3, 5, 5)).astype(np.float32))
    enc_tiling = dict(tile_sample_min_height=12, tile_sample_min_width=12,
                      tile_overlap_factor_height=1 / 6, tile_overlap_factor_width=1 / 3)
    dec_tiling = dict(tile_sample_min_height=16, tile_sample_min_width=16,
                      tile_overlap_factor_height=1 / 4, tile_overlap_factor_width=1 / 4)
    try:
        torch_vae.enable_tiling(**enc_tiling)
        with torch.no_grad():
            ref_mean = _to_ours(torch_vae.encode(x).latent_dist.mean)
        torch_vae.enable_tiling(**dec_tiling)
        with torch.no_grad():
            ref_video = _to_ours(torch_vae.decode(z).sample)
    finally:
        torch_vae.disable_tiling()
    mean, _ = vae.encode(_to_ours(x), spatial_tiling=SpatialTiling(**enc_tiling))
    assert _rel_err(mean, ref_mean) < TOL
    video = vae.decode(_to_ours(z), spatial_tiling=SpatialTiling(**dec_tiling))
    assert _rel_err(video, ref_video) < TOL


def test_gradients_through_tiled_decode_match_torch(model_a):
    """Gradients flow through the conv cache carried between temporal tiles."""
    torch_vae, vae, _, _ = model_a
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1, 5, 4, 4, 6)).astype(np.float32)  # ours: [B, T, C, h, w]
    w = rng.standard_normal((1, 17, 3, 16, 24)).astype(np.float32)  # ours: [B, T, C, H, W]
    z_t = _to_torch(z).requires_grad_(True)
    (torch_vae.decode(z_t).sample * _to_torch(w)).sum().backward()
    grad = jax.grad(lambda zz: jnp.sum(vae.decode(zz, tile_batches=1) * w))(jnp.asarray(z))
    assert _rel_err(grad, _to_ours(z_t.grad)) < TOL


def test_import_reads_sharded_and_bf16_folders(model_a, tmp_path):
    torch_vae, vae, _, _ = model_a
    sharded = tmp_path / "sharded"
    torch_vae.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").exists()
    vae_sharded, _ = from_diffusers_vae(str(sharded))
    ours = jax.tree.leaves(vae)
    for a, b in zip(ours, jax.tree.leaves(vae_sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bf16 = tmp_path / "pipeline" / "vae"  # a pipeline folder with a vae/ sub-folder
    copy.deepcopy(torch_vae).to(torch.bfloat16).save_pretrained(bf16)
    vae_bf16, _ = from_diffusers_vae(str(tmp_path / "pipeline"))
    kernel = np.asarray(vae_bf16.encoder.conv_in.conv.kernel[...])
    ref = torch_vae.encoder.conv_in.conv.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(kernel, ref.transpose(2, 3, 4, 1, 0))


def test_import_lists_missing_and_unexpected_keys(model_a, tmp_path):
    _, _, _, folder = model_a
    weights = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    weights["encoder.extra.weight"] = torch.zeros(2)
    del weights["decoder.conv_out.conv.bias"]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(weights, str(bad / "diffusion_pytorch_model.safetensors"))
    (bad / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(ValueError, match=r"missing keys \['decoder.conv_out.conv.bias'\]; "
                                         r"unexpected keys \['encoder.extra.weight'\]"):
        from_diffusers_vae(str(bad))


def test_import_rejects_wrong_configs(model_a, tmp_path):
    _, _, _, folder = model_a
    raw = json.load(open(os.path.join(folder, "config.json")))
    with pytest.raises(ValueError, match="not an AutoencoderKLCogVideoX"):
        config_from_diffusers({**raw, "_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="norm_num_groups"):
        config_from_diffusers({**raw, "norm_num_groups": 3})
    (tmp_path / "config.json").write_text(json.dumps({**raw, "latent_channels": 5}))
    for name in ("diffusion_pytorch_model.safetensors",):
        os.symlink(os.path.join(folder, name), tmp_path / name)
    with pytest.raises(ValueError, match="shape mismatches"):
        from_diffusers_vae(str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        from_diffusers_vae(str(tmp_path / "nowhere"))


def test_bad_inputs_raise(model_a):
    _, vae, _, _ = model_a
    with pytest.raises(ValueError, match="transpose diffusers"):
        vae.encode(np.zeros((1, 3, 9, 16, 16), np.float32))  # diffusers' layout
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        vae.decode(np.zeros((4, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="tile_batches"):
        vae.decode(np.zeros((1, 3, 4, 4, 4), np.float32), tile_batches=0)
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig(act_fn="tanh")


def test_sample_posterior_statistics():
    mean = jnp.full((4, 3, 2, 8, 8), 0.5)
    logvar = jnp.full_like(mean, np.log(4.0))
    z = sample_posterior(mean, logvar, jax.random.key(0))
    assert abs(float(z.mean()) - 0.5) < 0.15 and abs(float(z.std()) - 2.0) < 0.15


def test_cogvideox_depth_matches_diffusers(tmp_path_factory):
    """CogVideoX's full depth (4 blocks, 3 layers per block, 32 groups, 16 latent channels)
    at the smallest widths 32 groups allow and a 9-frame 16 x 16 clip."""
    cfg = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=3, norm_num_groups=32)
    torch_vae, vae, config, _ = _build(tmp_path_factory, "vae_depth", cfg, 6)
    assert config.temporal_compression_ratio == 4 and config.spatial_compression == 8
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 9, 16, 16)).astype(np.float32))
    z = torch.from_numpy(rng.standard_normal((1, 16, 3, 2, 2)).astype(np.float32))
    with torch.no_grad():
        ref_mean = _to_ours(torch_vae.encode(x).latent_dist.mean)
        ref_video = _to_ours(torch_vae.decode(z).sample)
    assert _rel_err(vae.encode(_to_ours(x), tile_batches=1)[0], ref_mean) < TOL
    assert _rel_err(vae.decode(_to_ours(z), tile_batches=1), ref_video) < TOL
