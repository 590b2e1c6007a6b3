"""Model folders and outputs in a Cloud Storage bucket (local emulator, no network): every
command that reads Hugging Face folders or writes dumps accepts `gs://` (issue 15).

A tiny random CogVideoX pipeline folder (transformer/, vae/, text_encoder/, tokenizer/) is
uploaded to the emulator's bucket; `python -m tttjax.convert` turns its transformer into a
checkpoint in the bucket, and the VAE and T5 loaders read their parts of it: all bitwise
equal to reading the same folders from local disk. Only the requested sub-folder of a
pipeline is copied. `python -m tttjax.bench aot --dump_dir gs://...` uploads XLA's dump.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import gcs_emulator
from tttjax import local_copy, storage

pytestmark = pytest.mark.skipif(gcs_emulator.available() is not None,
                                reason=str(gcs_emulator.available()))
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

DIT = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, text_embed_dim=16,
           time_embed_dim=8, in_channels=4, out_channels=4, sample_height=4, sample_width=4,
           use_rotary_positional_embeddings=True)
VAE = dict(block_out_channels=(8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
           down_block_types=("CogVideoXDownBlock3D",) * 2,
           up_block_types=("CogVideoXUpBlock3D",) * 2, sample_height=8, sample_width=8)
T5 = dict(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4,
          relative_attention_num_buckets=8, dropout_rate=0.0)
WORDS = "the a cat mouse jumps runs over table".split()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(local pipeline folder, its gs:// copy) with the emulator running."""
    from diffusers import CogVideoXTransformer3DModel
    from transformers import T5Tokenizer

    from tiny_hf_models import save_tiny_t5, save_tiny_vae, spiece_lines, train_spiece

    root = tmp_path_factory.mktemp("pipe") / "CogVideoX-tiny"
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(**DIT).save_pretrained(root / "transformer")
    save_tiny_vae(str(root / "vae"), VAE, 0)
    tok = str(root / "tokenizer")
    train_spiece(tok, spiece_lines(WORDS, 200, 3, 7), vocab_size=24)
    T5Tokenizer.from_pretrained(tok, extra_ids=4).save_pretrained(tok)
    save_tiny_t5(str(root / "text_encoder"), T5)
    (root / "model_index.json").write_text("{}")
    with gcs_emulator.GCSEmulator() as gcs:
        gcs.create_bucket("bucket")
        url = "gs://bucket/weights/CogVideoX-tiny"
        storage.upload_tree(root, url)
        yield str(root), url


def _equal_states(a, b):
    la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def test_convert_from_bucket_to_bucket_equals_local(pipeline, capsys):
    from tttjax.convert import main
    from tttjax.models.dit_weights import from_diffusers, load_checkpoint

    local, url = pipeline
    out = "gs://bucket/ckpt/tiny_ttt"
    assert main(["--diffusers", url, "--out", out, "--mixer", "ttt_mlp"]) == 0
    assert out in capsys.readouterr().out
    assert storage.path(f"{out}/model_config.json").is_file()
    ref, _ = from_diffusers(local, mixer="ttt_mlp", attention="segment")
    _equal_states(load_checkpoint(out), ref)     # fresh mixer too: the same seed

    assert main(["--diffusers", "gs://bucket/nowhere", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "gs://bucket/nowhere" in err and "\n" not in err


def test_vae_and_t5_from_bucket_equal_local(pipeline):
    from tttjax.models.vae_weights import from_diffusers_vae
    from tttjax.text.t5 import T5TextEncoder

    local, url = pipeline
    vae_gs, cfg_gs = from_diffusers_vae(url)                 # the pipeline's vae/
    vae, cfg = from_diffusers_vae(local)
    assert cfg_gs == cfg
    _equal_states(vae_gs, vae)

    ref = T5TextEncoder.from_pretrained(local)
    prompts = ["the cat jumps <start_scene>", "a mouse"]
    want = ref.encode(prompts, max_length=6)
    for source in (url, f"{url}/text_encoder"):             # the tokenizer/ next to it is found
        enc = T5TextEncoder.from_pretrained(source)
        np.testing.assert_array_equal(enc.tokenize(prompts, 6), ref.tokenize(prompts, 6))
        np.testing.assert_array_equal(enc.encode(prompts, max_length=6), want)


def test_only_the_requested_subfolder_is_copied(pipeline, tmp_path):
    _, url = pipeline
    n = local_copy.download_tree(url, str(tmp_path / "c"), subfolders=("vae",))
    assert sorted(os.listdir(tmp_path / "c")) == ["model_index.json", "vae"]
    assert n == 1 + len(os.listdir(tmp_path / "c" / "vae"))
    with local_copy.local_folder(f"{url}/tokenizer", subfolders=()) as folder:
        assert os.path.isfile(os.path.join(folder, "spiece.model"))
        kept = folder
    assert not os.path.exists(kept)                          # the copy is deleted
    with pytest.raises(FileNotFoundError, match="gs://bucket/none"):
        local_copy.download_tree("gs://bucket/none", str(tmp_path / "d"))
    with local_copy.local_folder(str(tmp_path)) as same:     # local: used in place
        assert same == str(tmp_path)


def test_aot_dump_dir_in_bucket(pipeline):
    from test_train_run import tiny
    from tttjax.bench import aot

    config = tiny("")
    config.mesh.axes = {"data": 1, "fsdp": 1, "tensor": 1}
    config.train.global_batch_size = 1
    aot.compile_train_step(config, jax.devices()[:1], dump_dir="gs://bucket/xla_dump")
    names = [p.name for p in storage.path("gs://bucket/xla_dump").iterdir()]
    assert any(n.endswith(".txt") for n in names) and any("memory-usage" in n or "buffer" in n
                                                             for n in names), names[:10]
