"""The video DiT: token layout, configs, remat, and the paper's integration (docs/design.md §2).

The integration is checked against `reference_forward`, a plain re-statement of docs/design.md §2
written with explicit per-window loops, explicit token index lists for the interleaved and
reversed orders, `tttjax.ops.rope.rope_3d` tables and textbook softmax attention. It reuses
only the model's embedding and output head (diffusers parity in test_convert.py) and the mixer
modules themselves (tested by their own suites).
"""


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tttjax import command_line
from tttjax import sharding as shd
from tttjax.models import dit_config
from tttjax.models.dit import CogVideoXDiT, count_params
from tttjax.models.video_layout import TEXT, VIDEO, VideoLayout
from tttjax.ops.rope import apply_rope, rope_3d


def load_config(name, arg):
    return command_line.load_config(f"{name}:{arg}")


def perturb(model, seed, scale=0.2):
    """Moves every parameter off its init (gates included) so all of them matter.

    The arithmetic is NumPy's, so no XLA kernel is compiled for it.
    """
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            value = np.asarray(var[...])
            var[...] = jnp.asarray(value + scale * rng.standard_normal(value.shape).astype(value.dtype))


def inputs(cfg, stage, batch=2, seed=0, segments=None):
    n = segments or stage.num_segments
    frames = cfg.prefix_frames + n * cfg.frames_per_segment
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (batch, frames, cfg.in_channels, stage.latent_height, stage.latent_width))
    e = jax.random.normal(k2, (batch, n, stage.text_length, cfg.text_embed_dim))
    t = jnp.asarray([17, 803, 400, 999][:batch])
    return x, e, t


def with_config(model, **changes):
    """The same parameters under a config with `changes` (execution or attention fields)."""
    cfg = ml_collections.ConfigDict(model.cfg.to_dict())
    cfg.update(changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: CogVideoXDiT(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


@nnx.jit
def forward(model, x, e, t):
    return model(x, e, t)


# ------------------------------------------------------------------------------ layout

LAYOUT = VideoLayout(num_frames=7, grid_h=1, grid_w=2, num_segments=3, text_len=2,
                     frames_per_segment=2, prefix_frames=1)


def test_layout_interleave_roundtrip_and_order():
    lay = LAYOUT
    assert lay.chunk_frames == (3, 2, 2)
    text = jnp.arange(lay.total_text_len, dtype=jnp.float32).reshape(1, 3, 2, 1) + 100
    video = jnp.arange(lay.video_len, dtype=jnp.float32).reshape(1, -1, 1)
    seq = lay.interleave(text, video)
    # t0 (100, 101), frames 0-2 (tokens 0-5), t1 (102, 103), frames 3-4, t2, frames 5-6
    want = [100, 101, 0, 1, 2, 3, 4, 5, 102, 103, 6, 7, 8, 9, 104, 105, 10, 11, 12, 13]
    np.testing.assert_array_equal(np.asarray(seq[0, :, 0]), want)
    t2, v2 = lay.deinterleave(seq)
    np.testing.assert_array_equal(t2, text)
    np.testing.assert_array_equal(v2, video)
    np.testing.assert_array_equal(lay.modality, [TEXT if w >= 100 else VIDEO for w in want])


def test_layout_reversal():
    lay = LAYOUT
    text = jnp.arange(lay.total_text_len, dtype=jnp.float32).reshape(1, 3, 2, 1) + 100
    video = jnp.arange(lay.video_len, dtype=jnp.float32).reshape(1, -1, 1)
    seq = np.asarray(lay.interleave(text, video)[0, :, 0])
    rev = seq[lay.reverse_index]
    # segments backwards, each prompt in reading order before its own frames, video reversed
    want = [104, 105, 13, 12, 11, 10, 102, 103, 9, 8, 7, 6, 100, 101, 5, 4, 3, 2, 1, 0]
    np.testing.assert_array_equal(rev, want)
    assert sorted(lay.reverse_index.tolist()) == list(range(lay.seq_len))
    video_part = rev[rev < 100]
    np.testing.assert_array_equal(video_part, np.arange(lay.video_len)[::-1])


def test_layout_rope_and_geometry_errors():
    lay = LAYOUT
    cos = jnp.arange(lay.video_len * 8, dtype=jnp.float32).reshape(-1, 8)
    c, s = lay.interleave_rope(cos, -cos)
    mod = lay.modality
    np.testing.assert_array_equal(c[mod == TEXT], 1.0)
    np.testing.assert_array_equal(s[mod == TEXT], 0.0)
    np.testing.assert_array_equal(c[mod == VIDEO], cos)
    with pytest.raises(ValueError, match="needs 7 latent frames"):
        VideoLayout(8, 1, 2, 3, 2, 2, 1).check_windows()
    with pytest.raises(ValueError, match="one prompt per 3-second segment"):
        VideoLayout(3, 1, 2, 3, 2, 2, 1)


# ------------------------------------------------------------------------------ configs


def test_5b_parameter_count_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers import CogVideoXTransformer3DModel

    cfg = load_config("cogvideox_5b", "3s,none").model
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**dit_config.to_diffusers_config(cfg))
    want = sum(p.numel() for p in ref.parameters())
    abstract = nnx.eval_shape(lambda: CogVideoXDiT(cfg, rngs=nnx.Rngs(0)))
    assert count_params(nnx.state(abstract, nnx.Param)) == want == 5_570_283_072


def test_5b_ttt_mlp_additions():
    base = load_config("cogvideox_5b", "63s,none").model
    ttt = load_config("cogvideox_5b", "63s,ttt_mlp").model
    n_base = count_params(nnx.state(nnx.eval_shape(lambda: CogVideoXDiT(base, rngs=nnx.Rngs(0))), nnx.Param))
    n_ttt = count_params(nnx.state(nnx.eval_shape(lambda: CogVideoXDiT(ttt, rngs=nnx.Rngs(0))), nnx.Param))
    d, h, hd = 3072, 48, 64
    per_layer = (4 * (d * d + d) + h * d + h + 2 * h * hd            # q,k,v,o; lr gate; TTT LN
                 + h * hd * 4 * hd + h * 4 * hd + h * 4 * hd * hd + h * hd  # W1, b1, W2, b2
                 + 2 * d + 4 * d)                                   # post-norm; 4 gate vectors
    assert n_ttt - n_base == 42 * per_layer == 1_659_895_776       # "about 1.66 B"
    assert round(n_ttt / 1e9, 1) == 7.2


def test_stage_configs():
    for stage, frames in (("3s", 13), ("9s", 37), ("18s", 73), ("30s", 121), ("63s", 253)):
        cfg = load_config("cogvideox_5b", f"{stage},ttt_mlp")
        assert cfg.stage.latent_frames == frames
        assert cfg.stage.latent_frames == 1 + 12 * cfg.stage.num_segments
        assert cfg.model.mixer_config.ttt_mlp.mini_batch_size == 64
    with pytest.raises(ValueError, match="unknown stage"):
        load_config("cogvideox_5b", "5s,ttt_mlp")
    with pytest.raises(ValueError, match="'mixer' is required"):
        load_config("cogvideox_5b", "3s")
    with pytest.raises(ValueError, match="not registered"):
        load_config("tiny", "mamba7")
    bad = dit_config.cogvideox_5b()
    bad.remat_policy = "sometimes"
    with pytest.raises(ValueError, match="remat_policy"):
        dit_config.validate(bad)


# ------------------------------------------------------------------------------ base model


@pytest.fixture(scope="module")
def tiny_base():
    cfg = load_config("tiny", "none,1")
    model = CogVideoXDiT(cfg.model, rngs=nnx.Rngs(0))
    perturb(model, 1)
    return cfg, model


def test_input_validation(tiny_base):
    cfg, model = tiny_base
    x, e, t = inputs(cfg.model, cfg.stage)
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :, :2], e, t)
    with pytest.raises(ValueError, match="text embeddings must be"):
        model(x, e[:1], t)
    with pytest.raises(ValueError, match="needs 3 latent frames"):
        model(x[:, :2], e, t)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, e, t[:1])


def test_remat_policies_agree(tiny_base):
    cfg, model = tiny_base
    x, e, t = inputs(cfg.model, cfg.stage)
    e = e[:, 0]
    state = nnx.state(model)

    def run(policy):
        gd, _ = nnx.split(with_config(model, remat_policy=policy, attention="full"))
        loss = lambda st: jnp.sum(nnx.merge(gd, st)(x, e, t) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(state)

    # jax.checkpoint policies other than the named one are JAX's; one remat run checks the
    # plumbing (policy lookup, scan + remat) and the checkpoint names in the block.
    results = {p: run(p) for p in ("none", "save_block_outputs")}
    ref_val, ref_grad = results["none"]
    for policy, (val, grad) in results.items():
        np.testing.assert_allclose(val, ref_val, rtol=1e-6, err_msg=policy)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            # recomputation reorders float32 sums: compare relative to each tensor's scale
            assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)) + 1e-7, policy


def test_one_segment_is_exactly_cogvideox(tiny_base):
    """Segment attention over one 3 s window == CogVideoX's joint attention."""
    cfg, model = tiny_base
    x, e, t = inputs(cfg.model, cfg.stage)
    full = with_config(model, attention="full")
    np.testing.assert_allclose(forward(model, x, e, t), forward(full, x, e[:, 0], t),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ integration


def _attend(q, k, v):
    """Textbook softmax attention, [H, L, d] each."""
    logits = jnp.einsum("hqd,hkd->hqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(logits, axis=-1), v)


def reference_forward(model, mixer_factory, x, e, t):
    """docs/design.md §2-3 stated plainly for one example at a time (see module docstring)."""
    cfg = model.cfg
    lay = model.layout(x.shape, e.shape)
    temb = model.time_embedding(t)
    text_all, video_all = model.embed(x, e, lay)
    flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model.blocks))}
    n, s, hw, fps = lay.num_segments, lay.text_len, lay.tokens_per_frame, lay.frames_per_segment
    hh, d = cfg.num_attention_heads, cfg.attention_head_dim
    win = fps + cfg.prefix_frames
    with jax.ensure_compile_time_eval():  # static tables, also when traced under jit
        local_cos, local_sin = rope_3d((win, lay.grid_h, lay.grid_w), d)
        glob_cos, glob_sin = (np.asarray(a) for a in rope_3d((lay.num_frames, lay.grid_h, lay.grid_w), d))

    # interleaved order as (kind, index) with kind 0 text (index into n*S), 1 video
    order, first = [], lay.num_frames - (n - 1) * fps
    bounds = [(0, first)] + [(first + i * fps, first + (i + 1) * fps) for i in range(n - 1)]
    for i, (f0, f1) in enumerate(bounds):
        order += [(0, i * s + j) for j in range(s)] + [(1, tok) for tok in range(f0 * hw, f1 * hw)]
    rev = []
    for i in reversed(range(n)):
        seg = [o for o in order if (o[0] == 0 and o[1] // s == i)]
        vid = [(1, tok) for tok in range(bounds[i][0] * hw, bounds[i][1] * hw)][::-1]
        rev += seg + vid
    pos = {o: p for p, o in enumerate(order)}
    rev_idx = np.array([pos[o] for o in rev])
    is_video = np.array([o[0] for o in order]) == 1
    vid_tok = np.array([o[1] for o in order])
    ones, zeros = np.ones(d, np.float32), np.zeros(d, np.float32)
    seq_cos = np.stack([glob_cos[o[1]] if o[0] else ones for o in order])
    seq_sin = np.stack([glob_sin[o[1]] if o[0] else zeros for o in order])
    if cfg.reverse_rope == "position":
        # The seed code's choice: the reversed pass's slot j rotates its token by slot j's
        # forward position, i.e. video token tok by the position of its mirror N-1-tok.
        nv = lay.video_len
        rev_rope = (np.stack([glob_cos[nv - 1 - o[1]] if o[0] else ones for o in rev]),
                    np.stack([glob_sin[nv - 1 - o[1]] if o[0] else zeros for o in rev]))
    else:
        rev_rope = (seq_cos[rev_idx], seq_sin[rev_idx])

    def ln(v, scale=None, bias=None, eps=cfg.norm_eps):
        mu = v.mean(-1, keepdims=True)
        out = (v - mu) / jnp.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + eps)
        return out if scale is None else out * scale + bias

    outs = []
    for b in range(x.shape[0]):
        text, video = text_all[b], video_all[b]
        for layer in range(cfg.num_layers):
            P = lambda name: flat[name][layer]  # noqa: E731, B023
            def mod(k):  # noqa: E306
                return jax.nn.silu(temb[b]) @ P(f"modulation{k}/linear/kernel").reshape(temb.shape[-1], -1) \
                    + P(f"modulation{k}/linear/bias").reshape(-1)
            m = mod(1).reshape(6, -1)
            xt = ln(text, P("norm1/scale"), P("norm1/bias")) * (1 + m[4]) + m[3]
            xv = ln(video, P("norm1/scale"), P("norm1/bias")) * (1 + m[1]) + m[0]

            def proj(z, name):
                y = z @ P(f"attn/to_{name}/kernel").reshape(z.shape[-1], -1) + P(f"attn/to_{name}/bias").reshape(-1)
                y = y.reshape(-1, hh, d).transpose(1, 0, 2)
                if name != "v":
                    y = ln(y, P(f"attn/norm_{name}/scale"), P(f"attn/norm_{name}/bias"), cfg.qk_norm_eps)
                return y

            def out_proj(y):
                return y.transpose(1, 0, 2).reshape(-1, hh * d) @ P("attn/to_out/kernel").reshape(hh * d, -1) \
                    + P("attn/to_out/bias")

            tq, tk, tv = proj(xt, "q"), proj(xt, "k"), proj(xt, "v")
            vq, vk, vv = proj(xv, "q"), proj(xv, "k"), proj(xv, "v")
            at = []
            av_sum = jnp.zeros((lay.video_len, hh * d))
            count = np.zeros((lay.video_len, 1))
            for i in range(n):
                a, c = i * fps * hw, (i * fps + win) * hw
                ts = slice(i * s, (i + 1) * s)
                q = jnp.concatenate([tq[:, ts], apply_rope(vq[:, a:c], local_cos, local_sin)], 1)
                k = jnp.concatenate([tk[:, ts], apply_rope(vk[:, a:c], local_cos, local_sin)], 1)
                v = jnp.concatenate([tv[:, ts], vv[:, a:c]], 1)
                y = out_proj(_attend(q, k, v))
                at.append(y[:s])
                av_sum = av_sum.at[a:c].add(y[s:])
                count[a:c] += 1
            at, av = jnp.concatenate(at, 0), av_sum / count
            if mixer_factory is not None:
                mixer = mixer_factory(layer)
                seq = jnp.where(is_video[:, None], av[np.where(is_video, vid_tok, 0)],
                                at[np.where(is_video, 0, vid_tok)])
                gf = jnp.tanh(P("mixer/alpha_fwd"))[is_video.astype(int)]
                gb = jnp.tanh(P("mixer/alpha_bwd"))[is_video.astype(int)]
                z = seq + gf * mixer(seq[None], rope=(seq_cos, seq_sin))[0]
                yr = mixer(z[rev_idx][None], rope=rev_rope)[0]
                z2 = z + gb * jnp.zeros_like(yr).at[rev_idx].set(yr)
                at = z2[~is_video][np.argsort(vid_tok[~is_video])]
                av = z2[is_video][np.argsort(vid_tok[is_video])]
            text = text + m[5] * at
            video = video + m[2] * av
            m = mod(2).reshape(6, -1)

            def ff(z):
                hdn = jax.nn.gelu(z @ P("ff/proj_in/kernel") + P("ff/proj_in/bias"), approximate=True)
                return hdn @ P("ff/proj_out/kernel") + P("ff/proj_out/bias")

            text = text + m[5] * ff(ln(text, P("norm2/scale"), P("norm2/bias")) * (1 + m[4]) + m[3])
            video = video + m[2] * ff(ln(video, P("norm2/scale"), P("norm2/bias")) * (1 + m[1]) + m[0])
        outs.append(video)
    return model.head(jnp.stack(outs), temb, lay)


def mixer_factory_for(model, cfg):
    """Per-layer standalone copies of the model's mixer (unstacked parameters)."""
    from tttjax.layers.registry import make_mixer

    graphdef, state = nnx.split(model.blocks.mixer.mixer)
    mixer_cfg = ml_collections.ConfigDict(dict(
        width=cfg.num_attention_heads * cfg.attention_head_dim, num_heads=cfg.num_attention_heads,
        dtype=jnp.float32, param_dtype=jnp.float32))
    mixer_cfg.update(cfg.mixer_config.to_dict())

    def factory(layer):
        single = make_mixer(cfg.mixer, mixer_cfg, rngs=nnx.Rngs(0))
        nnx.update(single, jax.tree.map(lambda a: a[layer], state))
        return single

    return factory


@nnx.jit
def reference(model, x, e, t):
    factory = None if model.cfg.mixer == "none" else mixer_factory_for(model, model.cfg)
    return reference_forward(model, factory, x, e, t)


@pytest.fixture(scope="module")
def tiny_ttt():
    cfg = load_config("tiny", "ttt_mlp,2")
    model = CogVideoXDiT(cfg.model, rngs=nnx.Rngs(0))
    return cfg, model


def test_gates_at_init(tiny_ttt):
    cfg, model = tiny_ttt
    for name in ("alpha_fwd", "alpha_bwd"):
        gate = getattr(model.blocks.mixer, name)[...]
        assert gate.shape == (cfg.model.num_layers, 2, 64)   # layers x (text, video) x D
        np.testing.assert_array_equal(gate, np.full(gate.shape, 0.1, np.float32))


def test_segment_attention_matches_reference():
    """Local attention only (mixer none), 3 segments: windows, prefix overlap averaging, local RoPE."""
    cfg = load_config("tiny", "none,3")
    model = CogVideoXDiT(cfg.model, rngs=nnx.Rngs(2))
    perturb(model, 3)
    x, e, t = inputs(cfg.model, cfg.stage, batch=1)
    want = reference(model, x, e, t)
    np.testing.assert_allclose(forward(model, x, e, t), want, rtol=2e-5, atol=2e-5)
    # The online-softmax windows (blocks of 5 keys: the last block of each window is padded).
    chunked = with_config(model, attention_impl="chunked", attention_chunk=5)
    np.testing.assert_allclose(forward(chunked, x, e, t), want, rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def tiny_ttt_perturbed(tiny_ttt):
    cfg, model = tiny_ttt
    model = nnx.clone(model)
    perturb(model, 4)
    return cfg, model


def test_ttt_integration_matches_reference(tiny_ttt_perturbed):
    """Segments + gated bidirectional TTT-MLP on the interleaved sequence with global RoPE."""
    cfg, model = tiny_ttt_perturbed
    x, e, t = inputs(cfg.model, cfg.stage, batch=2)
    np.testing.assert_allclose(forward(model, x, e, t), reference(model, x, e, t),
                               rtol=5e-5, atol=5e-5)


def test_reverse_rope_by_position_matches_reference(tiny_ttt_perturbed):
    """`reverse_rope="position"` (the seed code's rotation by slot after the flip) against the
    reference's own mirror-position tables; it must also change the output."""
    cfg, model = tiny_ttt_perturbed
    by_slot = with_config(model, reverse_rope="position")
    x, e, t = inputs(cfg.model, cfg.stage, batch=2)
    out = forward(by_slot, x, e, t)
    np.testing.assert_allclose(out, reference(by_slot, x, e, t), rtol=5e-5, atol=5e-5)
    assert np.abs(np.asarray(out - forward(model, x, e, t))).max() > 1e-3


def test_gradients_reach_mixer_and_gates(tiny_ttt):
    cfg, model = tiny_ttt
    x, e, t = inputs(cfg.model, cfg.stage)
    grads = nnx.grad(lambda m: jnp.mean(m(x, e, t) ** 2))(model)
    flat = nnx.to_flat_state(grads)
    mixer = {"/".join(map(str, p)): v[...] for p, v in flat if "mixer" in p}
    assert mixer and "blocks/mixer/alpha_fwd" in mixer and "blocks/mixer/mixer/W1" in mixer
    for name, g in mixer.items():
        assert np.all(np.isfinite(g)), name
        # every parameter gets gradient in every layer (b_lr etc. included)
        assert np.all(np.abs(np.asarray(g)).reshape(g.shape[0], -1).max(-1) > 0), name


def _mixer_names():
    from tttjax.layers import registry

    return registry.mixer_names()


def test_every_registered_mixer_fits_the_slot():
    """Every mixer traces through the slot (shapes, layout, RoPE tables, gates); cheap."""
    for name in _mixer_names():
        cfg = load_config("tiny", f"{name},2")
        cfg.model.num_layers = 1
        model = nnx.eval_shape(lambda: CogVideoXDiT(cfg.model, rngs=nnx.Rngs(0)))  # noqa: B023
        x, e, t = inputs(cfg.model, cfg.stage, batch=1)
        out = jax.eval_shape(lambda m, *a: m(*a), model, x, e, t)
        assert out.shape == x.shape and out.dtype == jnp.float32, name


@pytest.mark.slow
@pytest.mark.parametrize("name", _mixer_names())
def test_every_registered_mixer_runs_in_the_slot(name):
    cfg = load_config("tiny", f"{name},2")
    cfg.model.num_layers = 1
    model = CogVideoXDiT(cfg.model, rngs=nnx.Rngs(0))
    x, e, t = inputs(cfg.model, cfg.stage, batch=1)
    out = forward(model, x, e, t)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out))), name


def test_sharded_forward_equals_single_device(tiny_ttt_perturbed):
    cfg, model = tiny_ttt_perturbed
    x, e, t = inputs(cfg.model, cfg.stage, batch=2)   # same shapes as above: forward is cached
    ref = forward(model, x, e, t)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    shardings = shd.state_shardings(state, mesh)
    sharded = jax.tree.map(lambda v, s: v.replace(jax.device_put(v[...], s)), state, shardings,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda st, x, e, t: nnx.merge(graphdef, st)(x, e, t))(sharded, x, e, t)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_sequence_sharding_over_a_non_dividing_axis(tiny_ttt_perturbed):
    """`activation_length=tensor` on 3 tensor devices: 80 video and 16 text tokens do not divide by 3.

    The activations are still split along the sequence (XLA pads the last shard; the 5B
    video streams, 1350 tokens per latent frame, never divide by 4), and the forward pass and
    the parameter gradients equal the single-device ones.
    """
    cfg, model = tiny_ttt_perturbed
    x, e, t = inputs(cfg.model, cfg.stage, batch=2)
    video_tokens = x.shape[1] * x.shape[3] * x.shape[4] // cfg.model.patch_size ** 2
    assert video_tokens % 3 and e.shape[1] * e.shape[2] % 3

    def loss(m, x, e, t):
        return jnp.mean(jnp.square(m(x, e, t)))

    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(loss))(model, x, e, t)
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 3}, jax.devices()[:6])
    rules = shd.merge_rules([("activation_length", "tensor")])
    graphdef, state = nnx.split(model)

    def sharded_loss(st, x, e, t):
        return loss(nnx.merge(graphdef, st), x, e, t)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        # One compile: the compiled executable gives both the HLO and the run (calling the
        # jitted function after .lower().compile() would compile it again).
        compiled = jax.jit(jax.value_and_grad(sharded_loss)).lower(state, x, e, t).compile()
        hlo = compiled.as_text()
        out_loss, grads = compiled(state, x, e, t)
    # The video stream saved per block for the backward pass ([layers, batch, tokens, D], one
    # example per fsdp shard) is split into ceil(80 / 3) = 27-token shards; while
    # non-dividing axes were dropped, every device held all 80 tokens of it.
    width = cfg.model.num_attention_heads * cfg.model.attention_head_dim
    layers = cfg.model.num_layers
    assert f"[{layers},1,{video_tokens},{width}]" not in hlo
    assert f"[{layers},1,{-(-video_tokens // 3)},{width}]" in hlo
    np.testing.assert_allclose(out_loss, ref_loss, rtol=2e-5)
    ref_flat = jax.tree.leaves(nnx.state(ref_grads))
    assert len(ref_flat) == len(jax.tree.leaves(grads))
    for got, want in zip(jax.tree.leaves(grads), ref_flat):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    # The TTT scan context-parallel over the same axis (mixer_config.<mixer>.context_axis):
    # each tensor device scans its span of the interleaved sequence (padded to 3 x 16 tokens)
    # and passes the inner state on; both directions of the gated bidirectional mixer.
    mixer_config = ml_collections.ConfigDict(model.cfg.mixer_config.to_dict())
    mixer_config[model.cfg.mixer].context_axis = "tensor"
    cp_graphdef, cp_state = nnx.split(with_config(model, mixer_config=mixer_config))

    def cp_loss(st, x, e, t):
        return loss(nnx.merge(cp_graphdef, st), x, e, t)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        lowered = jax.jit(jax.value_and_grad(cp_loss)).lower(cp_state, x, e, t)
        hlo = lowered.as_text()
        cp_out, cp_grads = lowered.compile()(cp_state, x, e, t)
    assert "collective_permute" in hlo
    np.testing.assert_allclose(cp_out, ref_loss, rtol=2e-5)
    for got, want in zip(jax.tree.leaves(cp_grads), ref_flat):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
