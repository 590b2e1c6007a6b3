"""`python -m tttjax.sample` on the CogVideoX path: converted DiT + diffusers VAE + T5 folders.

Tiny random diffusers / transformers models are saved to folders as a user's weights would
be, converted with `python -m tttjax.convert`, and sampled through the CLI. The decoded video
and the prompt embeddings are checked against diffusers / transformers on the same latents
and prompts.
"""

import json

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from tiny_hf_models import spiece_lines, train_spiece
from tttjax import sample as sample_cli
from tttjax.convert import main as convert_main
from tttjax.generation import generate, load_generator
from tttjax.storyboard import parse_storyboard
from tttjax.text.tokenizer import SCENE_TOKENS

TEXT_LENGTH = 12
STORY = [{"text": "The cat jumps over the table.", "neg_text": "blurry"},
         {"text": "The mouse hides in the wall.", "requires_scene_transition": True}]


def _spiece(folder):
    words = "the a cat mouse jumps runs over table kitchen hides wall blurry in".split()
    train_spiece(folder, spiece_lines(words, 400, 3, 9), vocab_size=32)
    T5Tokenizer.from_pretrained(folder, extra_ids=4).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox_tiny")
    torch.manual_seed(0)
    dit = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, num_layers=1, text_embed_dim=16,
        time_embed_dim=16, in_channels=4, out_channels=4, sample_height=4, sample_width=6,
        use_rotary_positional_embeddings=True).eval()
    dit.save_pretrained(root / "transformer")
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        sample_height=16, sample_width=24).eval()
    vae.save_pretrained(root / "vae")
    t5_dir = root / "text_encoder"
    t5_dir.mkdir()
    _spiece(str(t5_dir))
    t5 = T5EncoderModel(T5Config(vocab_size=48, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8,
                                 dropout_rate=0.0)).eval()
    t5.save_pretrained(t5_dir)
    assert convert_main(["--diffusers", str(root / "transformer"), "--out", str(root / "ckpt")]) == 0
    story = root / "story.json"
    story.write_text(json.dumps(STORY))
    return dict(root=root, ckpt=str(root / "ckpt"), vae=str(root / "vae"), t5=str(t5_dir),
                story=str(story), torch_vae=vae, torch_t5=t5)


def test_cli_needs_the_vae_and_text_encoder(folders, capsys, tmp_path):
    out = tmp_path / "o.mp4"
    assert sample_cli.main(["--workdir", folders["ckpt"], "--storyboard", folders["story"],
                            "--out", str(out), "--text-encoder", folders["t5"]]) == 2
    err = capsys.readouterr().err.strip()
    assert "--vae" in err and "\n" not in err and not out.exists()
    assert sample_cli.main(["--workdir", folders["ckpt"], "--storyboard", folders["story"],
                            "--out", str(out), "--vae", folders["vae"]]) == 2
    assert "--text-encoder" in capsys.readouterr().err and not out.exists()


def test_cli_samples_a_converted_checkpoint(folders, tmp_path):
    out = tmp_path / "o.mp4"
    rc = sample_cli.main(["--workdir", folders["ckpt"], "--storyboard", folders["story"],
                          "--out", str(out), "--vae", folders["vae"], "--text-encoder",
                          folders["t5"], "--text-length", str(TEXT_LENGTH), "--steps", "2"])
    assert rc == 0
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    # 2 segments: 1 + 2 x 12 latent frames -> (25 - 1) x 4 + 1 frames of (4 x 4) x (6 x 4) pixels
    assert sum(1 for _ in reader) == 97 and tuple(meta["size"]) == (24, 16)


def test_prompts_and_decoding_match_the_reference_models(folders):
    gen = load_generator(folders["ckpt"], vae=folders["vae"], text_encoder=folders["t5"],
                         text_length=TEXT_LENGTH)
    story = parse_storyboard(STORY)
    video = generate(gen, story, seed=0, steps=2)
    assert video.latents.shape == (25, 4, 4, 6) and video.fps == 16

    tok = T5Tokenizer.from_pretrained(folders["t5"])
    # the scene markers are added in ttt-video-dit's order (SCENE_TOKENS), as tttjax does
    tok.add_special_tokens({"additional_special_tokens": list(SCENE_TOKENS)})
    ids = tok(story.prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        ref_text = folders["torch_t5"](ids).last_hidden_state.numpy()
    ours_text = gen.text_encoder.encode(story.prompts, max_length=TEXT_LENGTH)
    np.testing.assert_allclose(ours_text, ref_text, atol=1e-5, rtol=1e-4)

    z = torch.from_numpy(video.latents.transpose(1, 0, 2, 3)[None] / gen.decoder.vae.scaling_factor)
    with torch.no_grad():
        ref = folders["torch_vae"].decode(z).sample[0].numpy().transpose(1, 2, 3, 0)
    ref_u8 = np.round((np.clip(ref, -1, 1) + 1) * 127.5)
    assert video.frames.shape == ref_u8.shape
    assert np.abs(video.frames.astype(np.float64) - ref_u8).max() <= 1  # rounding of float32 noise
