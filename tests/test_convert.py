"""diffusers CogVideoX -> tttjax import: output and gradient parity with the PyTorch original.

Tiny random `CogVideoXTransformer3DModel`s (torch CPU, float32) are saved with
`save_pretrained`, imported with `from_diffusers`, and run on the same inputs; diffusers gets
the 3D rotary embedding its pipeline computes (`_prepare_rotary_positional_embeddings`).
Tolerance: relative error < 1e-5 (max |diff| / max |ref|), float32 on both sides.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid  # noqa: E402
from flax import nnx  # noqa: E402

from tttjax.models.dit_weights import from_diffusers, load_checkpoint, save_checkpoint  # noqa: E402
from tttjax.models.embeddings import pipeline_rope_positions  # noqa: E402
from tttjax.sharding import make_mesh  # noqa: E402

TOL = 1e-5

# name -> (diffusers kwargs, input shape B, T, H, W, text length)
CASES = {
    # CogVideoX-5B flavour: RoPE on the training grid (integer positions).
    "rope": (dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=24,
                  time_embed_dim=20, in_channels=4, out_channels=4, sample_height=8,
                  sample_width=12, use_rotary_positional_embeddings=True), (2, 3, 8, 12, 7)),
    # RoPE on a grid other than the training grid (fractional pipeline positions), no q/k/v
    # bias, [sin, cos] time order with a frequency shift, more output channels.
    "rope_crop": (dict(num_attention_heads=2, attention_head_dim=16, num_layers=3, text_embed_dim=24,
                       time_embed_dim=16, in_channels=4, out_channels=8, sample_height=12,
                       sample_width=12, attention_bias=False, flip_sin_to_cos=False, freq_shift=1,
                       norm_eps=1e-6, use_rotary_positional_embeddings=True), (1, 2, 8, 12, 5)),
    # CogVideoX-2B flavour: fixed 3D sin-cos positions, exact GELU, LayerNorms without affine.
    "sincos": (dict(num_attention_heads=3, attention_head_dim=16, num_layers=2, text_embed_dim=20,
                    time_embed_dim=16, in_channels=4, out_channels=4, sample_height=8, sample_width=8,
                    sample_frames=9, max_text_seq_length=6, activation_fn="gelu",
                    norm_elementwise_affine=False, use_rotary_positional_embeddings=False),
               (2, 3, 8, 8, 6)),
}


def _torch_model(kwargs, seed=0):
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**kwargs).eval()
    with torch.no_grad():  # perturb every parameter so norms/biases are not at their init values
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _pipeline_rope(model, t, h, w):
    cfg = model.config
    if not cfg.use_rotary_positional_embeddings:
        return None
    p = cfg.patch_size
    gh, gw = h // p, w // p
    crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), t)


def _inputs(model, shape, seed=1):
    b, t, h, w, s = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, model.config.in_channels, h, w, generator=g)
    e = torch.randn(b, s, model.config.text_embed_dim, generator=g)
    ts = torch.tensor([3, 999, 500][:b])
    return x, e, ts


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kwargs, shape = CASES[request.param]
    model = _torch_model(kwargs)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    ours, cfg = from_diffusers(str(folder))
    return request.param, model, shape, ours, folder


@pytest.fixture(scope="module")
def jitted():
    @nnx.jit
    def fwd(model, x, e, t):
        return model(x, e, t)
    return fwd


def test_forward_matches_diffusers(case, jitted):
    name, model, shape, ours, _ = case
    x, e, ts = _inputs(model, shape)
    with torch.no_grad():
        ref = model(x, e, ts, image_rotary_emb=_pipeline_rope(model, shape[1], shape[2], shape[3]),
                    return_dict=False)[0].numpy()
    out = jitted(ours, jnp.asarray(x.numpy()), jnp.asarray(e.numpy()), jnp.asarray(ts.numpy()))
    assert out.shape == ref.shape
    assert _rel(out, ref) < TOL, name


def test_gradients_match_diffusers(case):
    """d(sum(out * r)) / d(latents, text, block-0 q weight, proj_out weight) vs torch autograd."""
    name, model, shape, ours, _ = case
    if name == "rope_crop":
        pytest.skip("forward parity covers this config; gradients run on the other two (CPU budget)")
    x, e, ts = _inputs(model, shape, seed=2)
    x.requires_grad_(True)
    e.requires_grad_(True)
    model.zero_grad()
    out = model(x, e, ts, image_rotary_emb=_pipeline_rope(model, shape[1], shape[2], shape[3]),
                return_dict=False)[0]
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * r).sum().backward()

    def loss(m, xj, ej):
        return jnp.sum(m(xj, ej, jnp.asarray(ts.numpy())) * jnp.asarray(r.numpy()))

    grads, gx, ge = nnx.grad(loss, argnums=(0, 1, 2))(
        ours, jnp.asarray(x.detach().numpy()), jnp.asarray(e.detach().numpy()))
    assert _rel(gx, x.grad.numpy()) < TOL, name
    assert _rel(ge, e.grad.numpy()) < TOL, name
    h, d = model.config.num_attention_heads, model.config.attention_head_dim
    wq = model.transformer_blocks[0].attn1.to_q.weight.grad.numpy()        # [out, in]
    ours_wq = np.asarray(grads.blocks.attn.to_q.kernel[...][0]).reshape(h * d, h * d).T
    assert _rel(ours_wq, wq) < TOL, name
    assert _rel(np.asarray(grads.proj_out.kernel[...]).T, model.proj_out.weight.grad.numpy()) < TOL


def test_sharded_safetensors_and_checkpoint_roundtrip(tmp_path, jitted):
    """Shards + index json import the same; the Orbax checkpoint restores the same model."""
    kwargs, shape = CASES["rope"]
    model = _torch_model(kwargs)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert any(n.endswith(".index.json") for n in os.listdir(tmp_path / "sharded"))
    ours, cfg = from_diffusers(str(tmp_path / "sharded"))
    x, e, ts = (jnp.asarray(a.numpy()) for a in _inputs(model, shape))
    ref = jitted(ours, x, e, ts)

    save_checkpoint(ours, str(tmp_path / "ckpt"))
    restored = load_checkpoint(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(jitted(restored, x, e, ts), ref)

    # Placed straight into shardings on 8 devices, from safetensors and from the checkpoint.
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    for placed in (from_diffusers(str(tmp_path / "sharded"), mesh=mesh)[0],
                   load_checkpoint(str(tmp_path / "ckpt"), mesh=mesh)):
        kernel = placed.blocks.ff.proj_in.kernel[...]
        layers, width, hidden = kernel.shape
        assert kernel.sharding.shard_shape(kernel.shape) == (layers, width // 4, hidden)
        for a, b in zip(jax.tree.leaves(nnx.state(placed)), jax.tree.leaves(nnx.state(ours))):
            np.testing.assert_array_equal(a, b)


def test_cli_writes_checkpoint_and_reports_errors(tmp_path, capsys):
    from tttjax.convert import main

    kwargs, _ = CASES["rope"]
    _torch_model(kwargs).save_pretrained(tmp_path / "src")
    assert main(["--diffusers", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    assert os.path.isfile(tmp_path / "out" / "model_config.json")
    restored = load_checkpoint(str(tmp_path / "out"))
    ref, _ = from_diffusers(str(tmp_path / "src"))
    for a, b in zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(ref))):
        np.testing.assert_array_equal(a, b)

    assert main(["--diffusers", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m tttjax.convert: error:") and "config.json" in err and "\n" not in err


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import save_file

    kwargs, _ = CASES["rope"]
    model = _torch_model(kwargs)
    model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("transformer_blocks.1.attn1.to_k.weight")
    state["transformer_blocks.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError) as err:
        from_diffusers(str(tmp_path))
    msg = str(err.value)
    assert "missing keys ['transformer_blocks.1.attn1.to_k.weight']" in msg
    assert "unexpected keys ['transformer_blocks.0.extra.weight']" in msg


def test_config_mismatch_and_unsupported_variants(tmp_path):
    kwargs, _ = CASES["rope"]
    _torch_model(kwargs).save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(raw, time_embed_dim=24)))
    with pytest.raises(ValueError, match="shape mismatches"):
        from_diffusers(str(tmp_path))
    cfg_file.write_text(json.dumps(dict(raw, patch_size_t=2)))
    with pytest.raises(ValueError, match="patch_size_t"):
        from_diffusers(str(tmp_path))
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unknown config.model field 'mixr'"):
        from_diffusers(str(tmp_path), mixr="ttt_mlp")


@pytest.mark.parametrize("grid,base", [((30, 45), (30, 45)), ((4, 6), (6, 6)), ((8, 4), (6, 9)),
                                       ((5, 5), (3, 7))])
def test_rope_positions_match_pipeline(grid, base):
    """Our pipeline-grid positions give diffusers' `get_3d_rotary_pos_embed` tables exactly."""
    from tttjax.models.embeddings import rope_3d_at

    crops = get_resize_crop_region_for_grid(grid, base[1], base[0])
    cos, sin = get_3d_rotary_pos_embed(64, crops, grid, 3)
    rows, cols = pipeline_rope_positions(grid[0], grid[1], base[0], base[1])
    ours = rope_3d_at(np.arange(3, dtype=np.float32), rows, cols, 64)
    np.testing.assert_allclose(np.asarray(ours[0]), cos.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(ours[1]), sin.numpy(), atol=2e-6)


def test_bfloat16_checkpoint_and_fresh_mixer(tmp_path):
    """bf16 safetensors import exactly; a configured mixer is freshly initialised (docs/design.md §1-2)."""
    pytest.importorskip("tttjax.layers.registry")
    kwargs, _ = CASES["rope"]
    model = _torch_model(kwargs)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    ours, cfg = from_diffusers(str(tmp_path), param_dtype="bfloat16", mixer="ttt_mlp",
                               attention="segment", frames_per_segment=2)
    assert cfg.mixer == "ttt_mlp"
    wq = model.transformer_blocks[1].attn1.to_q.weight.detach().float().numpy()
    ours_wq = np.asarray(ours.blocks.attn.to_q.kernel[...][1].astype(jnp.float32))
    np.testing.assert_array_equal(ours_wq.reshape(wq.shape[1], -1).T, wq)
    assert ours.blocks.attn.to_q.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours.blocks.mixer.alpha_fwd[...], jnp.bfloat16(0.1))
    w1 = np.asarray(ours.blocks.mixer.mixer.W1[...].astype(jnp.float32))
    assert abs(w1.std() - 0.02) < 0.004 and np.all(np.asarray(ours.blocks.mixer.mixer.b1[...]) == 0)
