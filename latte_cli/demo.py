"""`latte demo`: the whole pipeline on a 2-core CPU in minutes, with nothing downloaded.

synth (bouncing shapes half the frame wide, 4 classes, 16 px) -> encode (pixel space, --vae none) -> train a
small Latte (variant 1 with the paper's best practices: uniform patches, S-AdaLN, sin-cos, learned sigma, EMA, label
dropout for guidance; with given-frame training for long videos) for a time budget -> sample 8-frame clips
with DDPM and guidance, and one long video clip by clip -> mp4 files and contact sheets.

The sizes are chosen for a CPU: 4x4-pixel patches of 16-pixel frames give 16 tokens a frame, so a
2-million-parameter model takes several optimiser steps a second; what a patch holds (48 values) stays well
inside the width (128), which predicting the noise of every pixel needs. Shapes half the frame wide (8 px)
are learnt as single shapes in a few thousand steps; at a third of the frame many samples broke into pieces.
"""

import math
import shutil
import time
from pathlib import Path

from rich.console import Console

from encode import encode
from latte_cli import LatteError
from latte_cli.video import synth
from sample import SampleConfig, sample
from train import TrainConfig, train

DATA = dict(frames=24, size=16, classes=4, shape_size=0.5)  # latte synth's options for the demo's videos


def recipe(data: str | Path, out: str | Path, model: str = "Latte-S/4", depth: int = 6, hidden_size: int = 128,
           num_heads: int = 4, seed: int = 0, **overrides) -> TrainConfig:
    """The demo's training run (the tests train it too, for a fixed number of steps)."""
    return TrainConfig(**{**dict(
        data=str(data), out=str(out), model=model, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
        frames=8, frame_interval=1, cond_frames=3, batch=16, lr=1e-3, ema_decay=0.995, precision="bf16",
        log_every=200, keep_last=1, seed=seed), **overrides})


def demo(out: str | Path = "demo", minutes: float = 8.0, model: str = "Latte-S/4", depth: int = 6,
         hidden_size: int = 128, num_heads: int = 4, videos: int = 256, num: int = 8, sample_steps: int = 250,
         long_frames: int = 32, seed: int = 0) -> list[Path]:
    """Run the demo into `out`; returns the sample paths (mp4 files, then the contact sheet)."""
    out, console = Path(out), Console(soft_wrap=True, highlight=False)
    if not (0 < minutes < math.inf and min(videos, num) > 0 and 1 < sample_steps <= 1000 and long_frames >= 0):
        raise LatteError("--minutes (finite), --videos and --num must be above 0, --sample-steps between 2 and 1000, "
                         "--long-frames not below 0")  # (checked before minutes of training)
    began = time.perf_counter()
    for part in ("videos", "latents", "run"):  # every demo starts afresh (an earlier run's data would be reused)
        shutil.rmtree(out / part, ignore_errors=True)
    console.rule("1/4 synthetic videos")
    synth(out / "videos", videos=videos, seed=seed, **DATA)
    console.print(f"{videos} mp4 files of {DATA['frames']} frames, {DATA['size']}x{DATA['size']}, "
                  f"{DATA['classes']} classes in {out / 'videos'}")
    console.rule("2/4 encode (pixel space)")
    encode(out / "videos", out / "latents", vae="none", size=DATA["size"], labels="folders", flip=True)
    console.rule(f"3/4 train for {minutes:g} minutes")
    last = train(recipe(out / "latents", out / "run", model, depth, hidden_size, num_heads, seed, minutes=minutes,
                        steps=1_000_000, ckpt_every=1_000_000))
    console.rule("4/4 sample")
    paths = sample(SampleConfig(ckpt=str(last), out=str(out / "samples"), num=num, sampler="ddpm",
                                steps=sample_steps, cfg_scale=2.0, seed=seed))
    long = sample(SampleConfig(ckpt=str(last), out=str(out / "long"), num=2, frames=long_frames, sampler="ddpm",
                               steps=sample_steps, cfg_scale=2.0, seed=seed)) if long_frames else []
    console.print(f"done in {(time.perf_counter() - began) / 60:.1f} minutes")
    console.print(f"videos: {', '.join(str(p) for p in paths[:-1] + long[:-1])}")
    console.print(f"contact sheet: {paths[-1]}" + (f", long videos: {long[-1]}" if long else ""))
    return paths
