"""Convert diffusers CogVideoX transformer weights into a tttjax Orbax checkpoint.

    python -m tttjax.convert --diffusers /path/CogVideoX-5b/transformer --out /ckpt/cogvideox5b_ttt \
        [--mixer ttt_mlp] [--param-dtype bfloat16] [--seed 0]

The output folder holds `model_config.json` and `state/` (Orbax); restore it with
`tttjax.models.dit_weights.load_checkpoint(path, config, mesh=...)`. Mixer parameters (TTT layer
and its four gate vectors per block) are freshly initialised. Exit code 2 with a one-line
message on bad input.

Both folders may be `gs://bucket/...`: a diffusers folder in a bucket is first copied to a
temporary local folder (of a pipeline folder only its transformer/), read there and deleted,
so the machine needs that much free disk; the output is written to the bucket directly.
"""

from __future__ import annotations

import argparse
import sys
import time

from tttjax.command_line import ArgumentParser, fail


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tttjax.convert", description=__doc__.split("\n")[0])
    p.add_argument("--diffusers", required=True,
                   help="diffusers CogVideoXTransformer3DModel folder (or a pipeline folder); "
                        "gs://... is copied to a local temporary folder first")
    p.add_argument("--out", required=True, help="output checkpoint folder (local or gs://...)")
    p.add_argument("--mixer", default="none", help="mixer in the paper's slot (default: none)")
    p.add_argument("--attention", default=None, choices=("full", "segment"),
                   help="attention mode stored in the config (default: segment with a mixer, "
                        "full without)")
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="storage dtype of the parameters")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh mixer parameters")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from tttjax.models.dit_weights import from_diffusers, save_checkpoint
        from tttjax.models.dit import count_params

        attention = args.attention or ("full" if args.mixer == "none" else "segment")
        start = time.time()
        model, cfg = from_diffusers(args.diffusers, seed=args.seed, mixer=args.mixer,
                                    attention=attention, param_dtype=args.param_dtype)
        from flax import nnx

        n = count_params(nnx.state(model, nnx.Param))
        out = save_checkpoint(model, args.out)
    except (ValueError, FileNotFoundError, OSError) as err:
        return fail("python -m tttjax.convert", err)
    print(f"wrote {out}: {n:,} parameters, mixer {cfg.mixer!r}, {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
