"""Grain loading: segment windows, per-host block shards, iterator state, the latents builder."""

import json

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tttjax.data import latents as latents_lib
from tttjax.data import loader
from tttjax.data.block_shard_sampler import BlockShardSampler
from tttjax.data.windows import SegmentWindows, crop_latents, crop_toon

tfds.disable_progress_bar()


def _config(data_dir, **data):
    return ml_collections.ConfigDict(dict(
        data=dict(dataset="toon_storyboards", builder_config="tiny",
                  builder_overrides=dict(num_train=12, num_validation=0, max_segments=3, seed=1),
                  data_dir=data_dir, manual_dir="", split="train", shuffle=True, worker_count=0,
                  text_encoder_seed=0, toy_latent_seed=0, **data),
        stage=dict(num_segments=2, text_length=8),
        model=dict(in_channels=4, text_embed_dim=16)))


@pytest.fixture(scope="module")
def toon(tmp_path_factory):
    return loader.open_training_source(_config(str(tmp_path_factory.mktemp("tfds"))))


# ------------------------------------------------------------------------------ windows


def test_windows_cover_every_n_segment_clip():
    counts = [1, 3, 2, 4]
    records = [{"n": c} for c in counts]
    w = SegmentWindows(records, counts, 2, lambda ex, s, n: (ex["n"], s, n), name="fake")
    got = [w[i] for i in range(len(w))]
    assert got == [(3, 0, 2), (3, 1, 2), (2, 0, 2), (4, 0, 2), (4, 1, 2), (4, 2, 2)]
    with pytest.raises(ValueError, match="no record"):
        SegmentWindows(records, counts, 5, lambda *a: a)
    with pytest.raises(ValueError, match="stale"):
        SegmentWindows(records, counts[:2], 1, lambda *a: a)


def test_crops_keep_the_prefix_frame_and_mark_scenes():
    n_total, f = 4, 3
    video = np.arange(1 + n_total * f)
    ex = {"video": video, "positions": video, "visible": video, "captions": list("abcd"),
          "actions": list("ABCD"), "scene_start": np.array([1, 0, 1, 0], bool),
          "scene_end": np.array([0, 1, 0, 1], bool)}
    out = crop_toon(f)(ex, 1, 2)
    np.testing.assert_array_equal(out["video"], np.arange(3, 10))   # frame 3 = end of segment 0
    assert out["captions"] == ["b", "c"] and out["actions"] == ["B", "C"]
    np.testing.assert_array_equal(out["scene_start"], [True, True])  # window opens a scene
    np.testing.assert_array_equal(out["scene_end"], [True, True])
    lat = {"latents_mean": np.arange(2 + 4 * 2), "latents_logvar": np.arange(2 + 4 * 2),
           "text": np.arange(4), "captions": list("abcd"), "scene_start": np.ones(4, bool),
           "scene_end": np.zeros(4, bool)}
    out = crop_latents(2, 2)(lat, 2, 2)
    np.testing.assert_array_equal(out["latents_mean"], np.arange(4, 10))
    np.testing.assert_array_equal(out["text"], [2, 3])
    np.testing.assert_array_equal(out["scene_end"], [False, True])


# ------------------------------------------------------------------------------ sharding


def test_block_shard_sampler_is_a_bijection_onto_contiguous_blocks():
    class Identity:
        def __len__(self):
            return 10 ** 9

        def __getitem__(self, i):
            return i
    s = BlockShardSampler(Identity(), global_batch=6, shard_count=3)
    # host h's k-th read (DataLoader index k * 3 + h) covers rows [2h, 2h + 2) of each batch
    host = {h: [s[k * 3 + h] for k in range(6)] for h in range(3)}
    assert host[0] == [0, 1, 6, 7, 12, 13] and host[2] == [4, 5, 10, 11, 16, 17]
    assert sorted(s[i] for i in range(36)) == list(range(36))
    with pytest.raises(ValueError, match="divisible"):
        BlockShardSampler(Identity(), global_batch=6, shard_count=4)


def test_two_hosts_read_the_rows_of_one(toon):
    source, transform = toon
    one = iter(loader.make_loader(source, transform, global_batch=4, shard_index=0, shard_count=1,
                                  seed=3))
    two = [iter(loader.make_loader(source, transform, global_batch=4, shard_index=i, shard_count=2,
                                   seed=3)) for i in range(2)]
    assert 5 * 4 > len(source)  # the batches run across an epoch boundary
    for _ in range(5):
        full = next(one)
        halves = [next(it) for it in two]
        assert full["latents"].shape == (4, 5, 4, 8, 8) and full["text"].shape == (4, 2, 8, 16)
        for key in full:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])


def _second_shard(toon, global_batch, **kw):
    """A fresh iterator over shard 1 of 2 of the toon loader (seed 7)."""
    source, transform = toon
    return iter(loader.make_loader(source, transform, global_batch=global_batch, shard_index=1,
                                   shard_count=2, seed=7, **kw))


def test_iterator_state_resumes_the_same_stream(toon):
    make = lambda: _second_shard(toon, 2)  # noqa: E731
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["latents"] for _ in range(3)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["latents"], want)


def test_position_from_examples_consumed_matches_grain_state(toon):
    from tttjax.train.loop import _position_iterator

    make = lambda: _second_shard(toon, 4)  # noqa: E731
    it = make()
    for _ in range(3):
        next(it)
    positioned = make()
    _position_iterator(positioned, 3 * 2, shard_index=1, shard_count=2, worker_count=0,
                       local_batch=2)
    assert json.loads(positioned.get_state()) == json.loads(it.get_state())
    np.testing.assert_array_equal(next(positioned)["text"], next(it)["text"])


def test_multi_worker_loading_resumes_exactly(toon):
    """worker_count > 0 (the 5B config's 4 workers): Grain's own iterator state, and the
    position the trainer computes from the examples consumed, both continue the stream
    exactly where an uninterrupted iterator goes on."""
    from tttjax.train.loop import _position_iterator

    make = lambda: _second_shard(toon, 4, worker_count=2)  # noqa: E731
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    # Copies: worker batches live in shared memory that Grain recycles.
    copy = lambda batch: {key: np.array(batch[key]) for key in ("latents", "text")}  # noqa: E731
    expected = [copy(next(it)) for _ in range(2)]
    resumed = make()
    resumed.set_state(state)
    positioned = make()
    _position_iterator(positioned, 3 * 2, shard_index=1, shard_count=2, worker_count=2,
                       local_batch=2)
    for want in expected:
        for how, got in (("grain state", copy(next(resumed))),
                         ("position", copy(next(positioned)))):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{how}: {key}")


def test_host_rows_from_a_batch_sharding():
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    assert loader.host_rows(sharding, (8, 3)) == (0, 1)  # one process holds every row
    replicated = NamedSharding(mesh, PartitionSpec())
    assert loader.host_rows(replicated, (8, 3)) == (0, 1)


def test_toon_inputs_carry_scene_markers(toon):
    source, transform = toon
    ex = source[0]
    out = transform.map(ex)
    assert out["latents"].shape == (5, 4, 8, 8) and out["text"].shape == (2, 8, 16)
    # the first token of a scene-opening segment is the <start_scene> marker's vector
    marker = transform.encoder.encode(["<start_scene>"], 1)[0, 0]
    np.testing.assert_array_equal(out["text"][0, 0], marker)


def test_unknown_toon_config_and_fields_are_named():
    with pytest.raises(ValueError, match="no config 'huge'"):
        loader.toon_config("huge")
    with pytest.raises(ValueError, match="unknown toon_storyboards fields"):
        loader.toon_config("tiny", {"fps": 3})


# ------------------------------------------------------------------------------ latents


LCFG = latents_lib.LatentsConfig(name="test_tiny", latent_channels=4, text_length=3,
                                 text_embed_dim=8, frames_per_segment=2, prefix_frames=1,
                                 scaling_factor=0.5)


def _write_videos(root, rng):
    videos = {}
    for i, n in enumerate((1, 3, 2)):
        arrays = dict(latents_mean=rng.standard_normal((1 + 2 * n, 4, 4, 6)),
                      latents_logvar=rng.standard_normal((1 + 2 * n, 4, 4, 6)) - 2,
                      text=rng.standard_normal((n, 3, 8)),
                      scene_start=np.arange(n) == 0, scene_end=np.arange(n) == n - 1,
                      captions=[f"video {i} segment {j}" for j in range(n)])
        latents_lib.write_source_example(str(root / "train" / f"v{i}.npz"), config=LCFG, **arrays)
        videos[f"v{i}"] = arrays
    return videos


def test_latents_builder_round_trip_and_loading(tmp_path):
    rng = np.random.default_rng(0)
    videos = _write_videos(tmp_path / "manual", rng)
    builder = latents_lib.build_latents_dataset(str(tmp_path / "manual"), str(tmp_path / "tfds"), LCFG)
    meta = builder.info.metadata
    assert meta["segment_counts"]["train"] == [1, 3, 2] and meta["scaling_factor"] == 0.5
    source = builder.as_data_source(split="train")
    ex = source[1]
    want = videos[ex["video_id"].decode()]
    assert ex["latents_mean"].dtype == np.float16
    np.testing.assert_array_equal(ex["latents_mean"], want["latents_mean"].astype(np.float16))
    np.testing.assert_array_equal(ex["text"], want["text"].astype(np.float16))
    assert [c.decode() for c in ex["captions"]] == want["captions"]
    windows = SegmentWindows(source, meta["segment_counts"]["train"], 2, crop_latents(2, 1))
    assert len(windows) == 3  # two from the 3-segment video, one from the 2-segment one
    batch = loader.LatentsToModelInputs(meta["scaling_factor"]).map(windows[0])
    assert batch["latents"].shape == (5, 4, 4, 6) and batch["text"].shape == (2, 3, 8)
    np.testing.assert_allclose(batch["latents"],
                               0.5 * want["latents_mean"].astype(np.float16)[:5].astype(np.float32))
    np.testing.assert_allclose(batch["latents_logvar"],
                               want["latents_logvar"].astype(np.float16)[:5] + 2 * np.log(0.5),
                               rtol=1e-6, atol=1e-6)


def test_latent_scale_option_overrides_the_recorded_vae_scale():
    """0 keeps the dataset's VAE scale; 1.0 is the seed code's (docs/design.md §8); the sampler's
    VAE decoder divides by the same factor."""
    import ml_collections

    from tttjax.generation import VAEDecoder
    from tttjax.video_io import to_uint8

    assert loader.model_latent_scale(ml_collections.ConfigDict({"latent_scale": 0.0}), 0.7) == 0.7
    assert loader.model_latent_scale(ml_collections.ConfigDict({"latent_scale": 1.0}), 0.7) == 1.0
    assert loader.model_latent_scale(ml_collections.ConfigDict({}), 0.7) == 0.7

    class IdentityVAE:   # decode = identity, so the decoder's output shows its scaling
        scaling_factor = 0.7
        config = ml_collections.ConfigDict({"temporal_compress_level": 2})

        def decode_chunks(self, z, tile_batches):
            yield np.tanh(z)   # [1, F, C, H, W] in [-1, 1]

    z = np.full((2, 3, 1, 1), 0.35, np.float32)
    for scale, want in ((None, 0.5), (1.0, 0.35)):
        frames = VAEDecoder(IdentityVAE(), latent_scale=scale).decode(z)
        expected = to_uint8(np.tanh(np.full((2, 1, 1, 3), want, np.float32)))
        np.testing.assert_array_equal(frames, expected)


def test_latents_source_examples_are_validated(tmp_path):
    rng = np.random.default_rng(1)
    good = dict(latents_mean=rng.standard_normal((5, 4, 2, 2)),
                latents_logvar=rng.standard_normal((5, 4, 2, 2)), text=np.zeros((2, 3, 8)),
                scene_start=[True, False], scene_end=[False, True], captions=["a", "b"])
    latents_lib.write_source_example(str(tmp_path / "ok.npz"), config=LCFG, **good)
    with pytest.raises(ValueError, match="1 segments need 3 latent frames"):
        latents_lib.write_source_example(str(tmp_path / "bad.npz"), config=LCFG,
                                         **dict(good, text=np.zeros((1, 3, 8)),
                                                scene_start=[True], scene_end=[True], captions=["a"]))
    with pytest.raises(ValueError, match="text must be"):
        latents_lib.write_source_example(str(tmp_path / "bad.npz"), config=LCFG,
                                         **dict(good, text=np.zeros((2, 4, 8))))


def test_toon_transform_encodes_each_window_once():
    """Training revisits every window each epoch; the (costly, learned) codec runs once per
    distinct clip, and callers get their own copies."""
    import pickle

    from tttjax.data.text_encoder import HashedTextEncoder

    transform = loader.ToonToModelInputs(CountingCodec(), HashedTextEncoder(16), 8, cache_size=2)
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (9, 16, 16, 3), dtype=np.uint8) for _ in range(3)]

    def example(video):
        return {"video": video, "captions": [b"a cat runs."], "scene_start": [True],
                "scene_end": [False]}

    first = transform.map(example(videos[0]))["latents"]
    first[...] = -1.0                                    # the caller's copy, not the cache's
    again = transform.map(example(videos[0].copy()))["latents"]
    assert CountingCodec.calls == 1 and again.min() >= 0
    transform.map(example(videos[1]))
    transform.map(example(videos[2]))                    # evicts videos[0] (size 2)
    transform.map(example(videos[0]))
    assert CountingCodec.calls == 4
    assert len(pickle.loads(pickle.dumps(transform))._latents) == 0   # Grain's workers: no cache


class CountingCodec:   # module level: the transform is pickled in the test above
    calls = 0

    def encode(self, video):
        CountingCodec.calls += 1
        return video[::4, :8, :8, :1].astype(np.float32).transpose(0, 3, 1, 2)
