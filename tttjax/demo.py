"""`python -m tttjax.demo`: fine-tune a small TTT-MLP video DiT, then film a storyboard.

On a CPU this takes a few minutes, all of it on this machine (no downloads):

  1. generate the `toon_storyboards/tiny` dataset (procedural cartoon episodes, 64 x 64,
     a few seconds, first run only; `tttjax.data.toon_storyboards`);
  2. fine-tune `configs/tiny.py:ttt_mlp,3` with the base's network (4 DiT blocks of width
     128) and a bidirectional TTT-MLP layer per block (3 segments per clip, prompts cut to
     `--text-length` words) for `--steps`
     steps into `OUT/run` with the real trainer (`tttjax.train`: progress bar, metrics,
     Orbax checkpoints; rerunning resumes, and skips training once it is done). As in the
     paper, which starts from a pretrained CogVideoX, it starts from a pretrained plain DiT:
     the toon base shipped in `tttjax/models/toon_base_weights` (`configs/toon_base.py`,
     24000 steps on 3-second clips), whose weights are loaded and whose TTT layers and
     gates start fresh; the TTT layers learn at 10x the base's rate. `--from-scratch`
     trains everything from random weights instead;
  3. sample the 3-segment storyboard below (written to `OUT/storyboard.json`) with
     DPM-Solver++(2M) SDE and rising classifier-free guidance (`tttjax.generation`);
  4. decode with the toon world's codec and write `OUT/demo.mp4`, `OUT/demo.gif` and
     `OUT/contact_sheet.png` (one frame per segment with its caption).

The model works in the latents of the learned toon codec (`tttjax.data.toon_codec`, a small
convolutional autoencoder with CogVideoX's 4x time / 8x space geometry, 4 channels, weights
shipped), whose decoded frames show the cat, the mouse and the cheese. Its encoder (about
40 ms per 3-segment clip on a CPU) runs once per distinct clip: the data pipeline memoises
encoded windows, which training revisits every epoch. `--codec linear` uses the fixed linear
toy latents instead (`tttjax.data.toy_latents`: an 8 x 8 colour mosaic per frame, 2.7 frames
per second at 64 x 64). The same commands scale to real
data (`python -m tttjax.precompute`, `configs/cogvideox_5b.py`). Sample the trained run again with

    python -m tttjax.sample --workdir OUT/run --storyboard OUT/storyboard.json --out x.mp4
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from tttjax import storage
from tttjax.command_line import ArgumentParser, fail

STORYBOARD = [
    {"text": "The orange cat walks slowly over to the right side of the kitchen. "
             "The kitchen has yellow walls and a wooden floor.",
     "neg_text": ""},
    {"text": "The little white mouse scurries over to the left side of the kitchen. "
             "The kitchen has yellow walls and a wooden floor."},
    {"text": "The black cat jumps high into the air and lands to the left. "
             "The cellar has blue walls and a gray stone floor.",
     "requires_scene_transition": True},
]

_PROG = "python -m tttjax.demo"


def demo_config(steps: int, text_length: int, codec: str = "learned", base: str = ""):
    """`configs/tiny.py:ttt_mlp,3` trained for `steps` steps, prompts of `text_length` words,
    on the latents of the toon codec `codec` ("learned" or "linear"), warm-started from the
    exported toon base at `base` ("": random weights), whose network (every model field but
    the mixer) it then takes, so an export of another width, depth or patch size works too."""
    from tttjax.command_line import load_config

    config = load_config("tiny:ttt_mlp,3")
    config.steps = steps
    config.log_every = max(1, min(50, steps))
    config.checkpoint_every = max(1, steps // 2)
    config.stage.text_length = text_length
    config.data.toon_codec = codec
    config.optim.new.warmup_steps = config.optim.pretrained.warmup_steps = min(50, steps)
    if base:
        from tttjax.models import dit_config, toon_base

        config.checkpoint.init_from = toon_base.params_dir(base)
        # The demo's DiT is the base's network (its patch size, width, layers) plus the TTT
        # layers, whatever tiny's defaults are.
        model = config.model
        for key, value in toon_base.read_info(base)["model"].items():
            if key not in ("mixer", "mixer_config"):
                model[key] = value
        config.model = dit_config.validate(model)
        # The paper's ratio: pretrained weights at a tenth of the new layers' rate, so the
        # fine-tune adds the TTT layers without undoing what the base learned.
        config.optim.pretrained.lr = config.optim.new.lr / 10
    return config


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n", 1)[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tttjax_demo",
                        help="output folder, local or gs://... (default ./tttjax_demo); the "
                             "training workdir is OUT/run")
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--sample-steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--text-length", type=int, default=24,
                        help="prompt words the model reads (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--codec", default="learned", choices=("linear", "learned"),
                        help="toon latent codec (default learned, which draws the characters; "
                             "linear: 8 x 8 colour mosaics)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train from random weights instead of the shipped toon base "
                             "(always so with --codec linear, whose latents the base never saw)")
    parser.add_argument("--base", default="",
                        help="a local folder of an exported toon base to start from (default: "
                             "the shipped one, tttjax/models/toon_base_weights); the demo's DiT "
                             "is that base's network (width, layers, patch size) plus TTT-MLP")
    parser.add_argument("--data-dir", default="",
                        help="TFDS data dir for toon_storyboards (default: ~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    if min(args.steps, args.sample_steps, args.text_length) < 1:
        parser.error("--steps, --sample-steps and --text-length must be >= 1")

    from tqdm import tqdm

    from tttjax.generation import generate, load_generator
    from tttjax.sample import write_outputs
    from tttjax.storyboard import parse_storyboard
    from tttjax.train import config as config_lib
    from tttjax.train import command

    start = time.time()
    out = storage.resolve(args.out)    # a local folder, or gs://... (the run and outputs there)
    workdir = f"{out}/run"
    if args.base and (args.from_scratch or args.codec != "learned"):
        parser.error("--base needs the learned codec and no --from-scratch")
    base = ""
    if not args.from_scratch and args.codec == "learned":
        from tttjax.models import toon_base

        base = args.base or toon_base.DEFAULT_WEIGHTS
    try:
        config = demo_config(args.steps, args.text_length, args.codec, base)
        config.data.data_dir = args.data_dir
        config = config_lib.validate(config)
    except (FileNotFoundError, ValueError) as err:
        return fail(_PROG, err)
    start_from = "the shipped toon base" if base and not args.base else (base or "random weights")
    print(f"[1/3] training {config.steps} steps of the TTT-MLP DiT on toon_storyboards/tiny "
          f"from {start_from} -> {workdir}", flush=True)
    result, code = command.run(_PROG, config, workdir)
    if result is None:
        return code
    print(f"      trained to step {result.step} ({time.time() - start:.0f} s so far)", flush=True)

    storyboard = parse_storyboard(STORYBOARD, source="demo storyboard")
    storage.path(out).mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(f"{out}/storyboard.json", json.dumps(STORYBOARD, indent=2))
    gen = load_generator(workdir)
    n = storyboard.num_segments
    print(f"[2/3] sampling {n} segments ({gen.num_frames(n)} frames at {gen.fps:.2g} fps), "
          f"{args.sample_steps} steps", flush=True)
    with tqdm(total=args.sample_steps, desc="sample", unit="step", file=sys.stdout) as bar:
        video = generate(gen, storyboard, seed=args.seed, steps=args.sample_steps,
                         progress=lambda _: bar.update(1))
    paths = write_outputs(video, f"{out}/demo.mp4", f"{out}/demo.gif", f"{out}/contact_sheet.png")
    print(f"[3/3] wrote (in {time.time() - start:.0f} s):", flush=True)
    for p in paths + [f"{out}/storyboard.json"]:
        print(f"      {p}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
