"""`python -m tttjax.bench study`: the paper's comparison of sequence mixers, at toy scale,
scored by a machine instead of human raters.

Each mixer is trained with the real trainer on the same toon stories (the tiny DiT of
`configs/tiny.py`, `--segments` 3-second segments per clip, the learned toon codec), with the
same steps, batch and seeds. Attention is local to a segment (the paper's layout), so only the
mixer can carry a story across segments; `none` is local attention alone and `full` (opt-in)
attends over the whole clip. Every trained run then films the same held-out storyboards
(episodes of another toon world seed, never trained on) with the same sampling seeds, and
`tttjax.eval` scores each video against its storyboard:

    following     each segment shows what its text says (action, room, scene changes)
    consistency   characters and rooms keep their look, motion continues across segments

The table gives each mixer's mean scores with 95% bootstrap confidence intervals (resampling
the (storyboard, seed) videos), training tokens/s and wall time; a CSV holds every video's
scores and a PNG plots the means with their intervals. Runs live in WORKDIR/<mixer>_s<seed>:
rerunning the command resumes an interrupted training and reuses finished scores.

    python -m tttjax.bench study                              # the default study (CPU: < 1 h)
    python -m tttjax.bench study --steps 3000 --seeds 0,1,2 --storyboards 32 --mixers \\
        ttt_mlp,ttt_linear,gated_deltanet,mamba2,swa,none,full  # a larger one, on an accelerator
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np

from tttjax import storage
from tttjax.command_line import ArgumentParser, UsageError, fail

_PROG = "python -m tttjax.bench study"
DEFAULT_MIXERS = ("ttt_mlp", "ttt_linear", "gated_deltanet", "mamba2", "swa", "none")
HELD_OUT_WORLD = 1_000_003   # toon world seed of the held-out storyboards (training uses 0)


def study_config(mixer: str, *, segments: int, steps: int, seed: int, batch: int,
                 train_episodes: int, text_length: int, codec: str, data_dir: str):
    """`tiny:mixer=MIXER,segments=N` trained on `train_episodes` toon stories of exactly N
    segments (so every clip is a whole story), prompts of `text_length` words."""
    from tttjax.command_line import load_config
    from tttjax.models import dit_config
    from tttjax.train import config as config_lib

    # Loaded at the bundled segment count (load_config validates against the bundled tiny
    # dataset, whose stories have at most 3 segments), then stretched to `segments` stories.
    config = load_config(f"tiny:mixer={mixer}")
    config.stage.update(name=f"tiny{segments}", num_segments=segments,
                        latent_frames=dit_config.latent_frames(config.model, segments))
    config.seed = seed
    config.steps = steps
    config.log_every = max(1, min(50, steps))
    config.checkpoint_every = steps
    config.train.global_batch_size = batch
    config.train.progress_bar = False
    config.stage.text_length = text_length
    config.data.toon_codec = codec
    config.data.data_dir = data_dir
    config.data.builder_overrides = dict(min_segments=segments, max_segments=segments,
                                         num_train=train_episodes, num_validation=0)
    config.optim.new.warmup_steps = config.optim.pretrained.warmup_steps = min(50, steps)
    return config_lib.validate(config)


def held_out_storyboards(count: int, segments: int) -> list[list[dict]]:
    """`count` storyboards of `segments` segments from the held-out toon world."""
    from tttjax.data.toon_export import make_episode

    return [make_episode(HELD_OUT_WORLD, i, segments)[2] for i in range(count)]


def bootstrap_interval(values, *, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` [N] (N >= 1)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _train(config, workdir: str) -> dict:
    from tttjax.train.loop import train

    start = time.time()
    result = train(config, workdir)
    if result.step < config.steps:
        raise RuntimeError(f"{workdir}: training stopped at step {result.step} of {config.steps}")
    logged = [r for r in result.records if "tokens_per_sec" in r]
    return {"train_s": round(time.time() - start, 1),
            "tokens_per_sec": logged[-1]["tokens_per_sec"] if logged else float("nan"),
            "final_loss": logged[-1]["loss"] if logged else float("nan")}


def _film_and_score(workdir: str, boards: list[list[dict]], seeds: list[int], steps: int
                    ) -> list[dict]:
    from tttjax.eval.score import score_video
    from tttjax.generation import generate, load_generator
    from tttjax.storyboard import parse_storyboard

    gen = load_generator(workdir)
    rows = []
    for index, board in enumerate(boards):
        storyboard = parse_storyboard(board, source=f"held-out storyboard {index}")
        for seed in seeds:
            video = generate(gen, storyboard, seed=seed, steps=steps)
            result = score_video(video.frames, board)
            rows.append({"storyboard": index, "sample_seed": seed,
                         "following": result["following"], "consistency": result["consistency"]})
    return rows


def run_one(mixer: str, seed: int, args, boards) -> tuple[dict, list[dict]]:
    """Trains (or resumes) one run and films and scores the held-out storyboards, reusing
    scores a finished earlier call saved in the run's `study_scores.json`."""
    workdir = f"{args.workdir}/{mixer}_s{seed}"
    scores_file = storage.path(f"{workdir}/study_scores.json")
    key = {"steps": args.steps, "storyboards": len(boards), "sample_steps": args.sample_steps,
           "sample_seeds": args.sample_seeds}
    if scores_file.exists():
        saved = json.loads(scores_file.read_text())
        if saved["key"] == key:
            return saved["run"], saved["videos"]
    config = study_config(mixer, segments=args.segments, steps=args.steps, seed=seed,
                          batch=args.batch, train_episodes=args.train_episodes,
                          text_length=args.text_length, codec=args.codec,
                          data_dir=args.data_dir)
    run = {"mixer": mixer, "seed": seed, **_train(config, workdir)}
    start = time.time()
    videos = _film_and_score(workdir, boards, args.sample_seeds, args.sample_steps)
    run["sample_s"] = round(time.time() - start, 1)
    videos = [{"mixer": mixer, "train_seed": seed, **v} for v in videos]
    storage.write_text_atomic(str(scores_file),
                              json.dumps({"key": key, "run": run, "videos": videos}))
    return run, videos


def summarize(runs: list[dict], videos: list[dict], mixers: list[str], resamples: int
              ) -> list[dict]:
    """One row per mixer: mean scores over its videos with bootstrap intervals, and the
    training figures averaged over its seeds."""
    rows = []
    for mixer in mixers:
        mine = [v for v in videos if v["mixer"] == mixer]
        trained = [r for r in runs if r["mixer"] == mixer]
        row = {"mixer": mixer, "videos": len(mine)}
        for name in ("following", "consistency"):
            values = [v[name] for v in mine]
            lo, hi = bootstrap_interval(values, resamples=resamples)
            row.update({name: float(np.mean(values)), f"{name}_lo": lo, f"{name}_hi": hi})
        for name in ("tokens_per_sec", "train_s", "final_loss"):
            row[name] = float(np.mean([r[name] for r in trained]))
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    """Mean following and consistency per mixer with their 95% intervals."""
    from tttjax.optional_dependency import require

    matplotlib = require("matplotlib", "plots", "the study plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    for ax, name in zip(axes, ("following", "consistency")):
        means = np.array([r[name] for r in rows])
        err = np.array([[r[name] - r[f"{name}_lo"] for r in rows],
                        [r[f"{name}_hi"] - r[name] for r in rows]])
        ax.bar(x, means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(x, [r["mixer"] for r in rows], rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name} (mean, 95% bootstrap CI)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    storage.path(path).write_bytes(image.getvalue())


def _csv_list(text: str, flag: str, convert=str) -> list:
    try:
        values = [convert(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"{flag} must be a comma-separated list, got {text!r}")
    return values


def _parse(argv) -> argparse.Namespace:
    from tttjax.layers.registry import MIXER_NAMES

    parser = ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default=",".join(DEFAULT_MIXERS),
                        help=f"comma-separated, from {', '.join(MIXER_NAMES)} (default: "
                             f"{','.join(DEFAULT_MIXERS)})")
    parser.add_argument("--segments", type=int, default=6,
                        help="3-second segments per story (default 6, so a story is 6 "
                             "attention windows)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (400)")
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated (0)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (8)")
    parser.add_argument("--train-episodes", type=int, default=512,
                        help="toon stories to train on (512)")
    parser.add_argument("--storyboards", type=int, default=8, help="held-out storyboards (8)")
    parser.add_argument("--sample-seeds", default="0",
                        help="sampling seeds per storyboard, comma-separated (0)")
    parser.add_argument("--sample-steps", type=int, default=20, help="sampler steps (20)")
    parser.add_argument("--text-length", type=int, default=24,
                        help="prompt words the model reads (24)")
    parser.add_argument("--codec", default="learned", choices=("learned", "linear"),
                        help="toon latent codec (learned)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--workdir", default="tttjax_study",
                        help="folder of the runs, local or gs://... (./tttjax_study)")
    parser.add_argument("--data-dir", default="",
                        help="TFDS data dir (default WORKDIR/tfds)")
    parser.add_argument("--csv", default="", help="per-video scores (default WORKDIR/study.csv)")
    parser.add_argument("--plot", default="", help="PNG (default WORKDIR/study.png; 'none': skip)")
    args = parser.parse_args(argv)
    try:
        args.mixers = _csv_list(args.mixers, "--mixers")
        unknown = [m for m in args.mixers if m not in MIXER_NAMES]
        if unknown:
            raise UsageError(f"--mixers: unknown {unknown}; choose from {', '.join(MIXER_NAMES)}")
        args.seeds = _csv_list(args.seeds, "--seeds", int)
        args.sample_seeds = _csv_list(args.sample_seeds, "--sample-seeds", int)
    except UsageError as err:
        parser.error(str(err))
    positive = ("segments", "steps", "batch", "train_episodes", "storyboards", "sample_steps",
                "text_length", "bootstrap")
    bad = [f"--{name.replace('_', '-')}" for name in positive if getattr(args, name) < 1]
    if bad:
        parser.error(f"{', '.join(bad)} must be >= 1")
    args.workdir = storage.resolve(args.workdir)
    args.data_dir = args.data_dir or f"{args.workdir}/tfds"
    args.csv = args.csv or f"{args.workdir}/study.csv"
    args.plot = args.plot or f"{args.workdir}/study.png"
    return args


def main(argv=None) -> int:
    from tttjax.bench.table import MarkdownTable, write_csv

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    boards = held_out_storyboards(args.storyboards, args.segments)
    print(f"# study: {len(args.mixers)} mixers x seeds {args.seeds}, tiny DiT, {args.segments} "
          f"segments per story, {args.steps} steps of batch {args.batch} on "
          f"{args.train_episodes} stories ({args.codec} codec); {len(boards)} held-out "
          f"storyboards x sampling seeds {args.sample_seeds}, {args.sample_steps} sampler steps",
          flush=True)
    runs, videos = [], []
    try:
        for mixer in args.mixers:
            for seed in args.seeds:
                run, scored = run_one(mixer, seed, args, boards)
                runs.append(run)
                videos += scored
                print(f"# {mixer} seed {seed}: trained in {run['train_s']:.0f} s "
                      f"({run['tokens_per_sec']:.0f} tokens/s), following "
                      f"{np.mean([v['following'] for v in scored]):.3f}, consistency "
                      f"{np.mean([v['consistency'] for v in scored]):.3f}", flush=True)
    except (ValueError, UsageError) as err:
        return fail(_PROG, err)
    except (OSError, RuntimeError) as err:
        return fail(_PROG, err, code=1)
    rows = summarize(runs, videos, args.mixers, args.bootstrap)
    table = MarkdownTable(("mixer", "following", "95% CI", "consistency", "95% CI ",
                           "train tokens/s", "train s", "final loss"), float_format=".3f")
    for r in rows:
        table.row({"mixer": r["mixer"], "following": r["following"],
                   "95% CI": f"[{r['following_lo']:.3f}, {r['following_hi']:.3f}]",
                   "consistency": r["consistency"],
                   "95% CI ": f"[{r['consistency_lo']:.3f}, {r['consistency_hi']:.3f}]",
                   "train tokens/s": f"{r['tokens_per_sec']:.0f}",
                   "train s": f"{r['train_s']:.0f}", "final loss": r["final_loss"]})
    write_csv(videos, args.csv)
    write_csv(rows, args.csv.removesuffix(".csv") + "_summary.csv")
    if args.plot != "none":
        plot(rows, args.plot, f"toon study: {args.segments}-segment stories, {args.steps} steps, "
                              f"{len(videos) // max(1, len(args.mixers))} videos per mixer")
        print(f"# wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
