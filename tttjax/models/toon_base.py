"""The toon world's pretrained base DiT, shipped with tttjax, and the command that exports it.

    python -m tttjax.train --config toon_base --workdir /tmp/toon_base        # 80-95 minutes
    python -m tttjax.models.toon_base --export /tmp/toon_base [--out DIR]

`configs/toon_base.py` trains a plain DiT (no TTT layer; tiny's latents, 4 blocks of width
128) for 24000 steps on single 3-second toon clips: the toy-scale stand-in for the pretrained
CogVideoX the paper starts from. `--export` writes the newest intact checkpoint's
parameters as float16 Orbax (`DIR/params`, about 1.9 MB) and `DIR/toon_base.json` (model
config, step, loss, how it was made); DIR defaults to `tttjax/models/toon_base_weights`, the
copy shipped in the package.

    config.checkpoint.init_from = toon_base.params_dir()

warm-starts any config with the same network (width, layers, patch, channels) from it: the
trainer (`tttjax.train.model_state.load_params`) loads every tensor into float32 and
initialises the mixer slot (TTT layers and their gates) fresh, as for CogVideoX.
`python -m tttjax.demo` does this by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tttjax.command_line import ArgumentParser, fail

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toon_base_weights")
INFO_FILE = "toon_base.json"
_PROG = "python -m tttjax.models.toon_base"
_HINT = ("train one with `python -m tttjax.train --config toon_base --workdir W` and export it "
         "with `python -m tttjax.models.toon_base --export W --out DIR`")


def read_info(path: str = DEFAULT_WEIGHTS) -> dict[str, Any]:
    """The JSON description of an exported base (`model` config, `step`, `loss`, ...).
    Raises ValueError when `path` holds no export."""
    info_path = os.path.join(path, INFO_FILE)
    if not (os.path.isfile(info_path) and os.path.isdir(os.path.join(path, "params"))):
        raise ValueError(f"{path!r} holds no exported toon base ({INFO_FILE} + params/); {_HINT}")
    with open(info_path, encoding="utf-8") as f:
        return json.load(f)


def params_dir(path: str = DEFAULT_WEIGHTS) -> str:
    """The Orbax parameter folder of the export at `path`, for `config.checkpoint.init_from`.
    Raises ValueError when `path` holds no export."""
    read_info(path)
    return os.path.join(os.path.abspath(path), "params")


def _last_loss(workdir: str) -> float | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    loss = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            loss = record.get("loss", loss)
    return loss


def export(workdir: str, out: str = DEFAULT_WEIGHTS) -> dict[str, Any]:
    """Writes the newest intact checkpoint of the training run `workdir` to `out` (float16
    `params/` + `toon_base.json`) and returns the JSON written.

    The folder is assembled beside `out` and swapped in whole, so an interrupted export
    leaves the previous one intact. Raises ValueError when `workdir` has no intact
    checkpoint or its parameters are not finite.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from tttjax.small_weights import replace_folder
    from tttjax.train import integrity
    from tttjax.train.checkpoints import newest_intact_step

    workdir = os.path.abspath(workdir)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{workdir!r} is not a training workdir (no config.json); {_HINT}")
    step = newest_intact_step(workdir)
    if step is None:
        raise ValueError(f"{workdir!r} has no intact checkpoint to export; {_HINT}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    # Restored as host NumPy arrays: the run's saved shardings may name devices (a TPU
    # mesh) this machine does not have.
    source = os.path.join(workdir, "checkpoints", str(step), "params")
    reader = ocp.PyTreeCheckpointer()
    stored = reader.metadata(source)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
    params = reader.restore(source, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    bad = integrity.nonfinite_leaves(params)
    if bad:
        raise ValueError(f"{workdir!r} step {step} holds non-finite parameters ({bad[0]})")
    half = jax.tree.map(lambda a: np.asarray(a, np.float16), params)
    overflow = [k for k, a in zip(jax.tree.leaves(params), jax.tree.leaves(half))
                if not np.all(np.isfinite(a))]
    if overflow:
        raise ValueError(f"{workdir!r} step {step}: parameters overflow float16")
    info = {
        "what": "tttjax toon-world base DiT (plain, no mixer), float16 parameters",
        "config": config.get("stage", {}).get("name", ""),
        "step": step,
        "loss": _last_loss(workdir),
        "parameters": int(sum(a.size for a in jax.tree.leaves(half))),
        "model": config["model"],
        "data": {k: config["data"][k] for k in ("dataset", "builder_config", "builder_overrides",
                                                "toon_codec") if k in config["data"]},
        "text_length": config.get("stage", {}).get("text_length"),
        "made_by": "python -m tttjax.train --config toon_base --workdir W; "
                   "python -m tttjax.models.toon_base --export W",
    }
    def write(folder):
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(folder, "params"), half)
        with open(os.path.join(folder, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)

    replace_folder(out, write)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", metavar="WORKDIR", required=True,
                        help="training workdir of a toon_base run")
    parser.add_argument("--out", default=DEFAULT_WEIGHTS,
                        help="folder to write (default: the package's toon_base_weights)")
    args = parser.parse_args(argv)
    try:
        info = export(args.export, args.out)
    except ValueError as err:
        return fail(_PROG, err)
    print(json.dumps({k: info[k] for k in ("config", "step", "loss", "parameters")}
                     | {"out": os.path.abspath(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
