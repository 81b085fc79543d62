"""The `latte` command line. Each command only parses its options and calls the typed function of its
stage (encode.py, train.py, sample.py, ...); the stage modules are imported inside the commands so that
`latte --help` stays fast."""

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from safetensors import SafetensorError

from latte_cli import LatteError, first_line, keep_freed_memory, os_error_line

app = typer.Typer(
    name="latte",
    help="Latte, the latent diffusion transformer for video generation: encode videos, train, sample.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
err = Console(stderr=True, soft_wrap=True)  # an error stays on one line, however long


def friendly(fn):
    """Bad input ends in one line naming the problem and exit code 1, never a traceback dump."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (LatteError, OSError, ValueError, SafetensorError) as e:  # OSError: permissions, a full disk
            line = os_error_line(e) if isinstance(e, OSError) else first_line(e)
            # escaped: brackets in a file name are text, not rich markup
            err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - what no check foresaw (a malformed file, memory): one line too
            if os.environ.get("LATTE_TRACEBACK", "0") not in ("", "0"):
                raise
            err.print(f"[bold red]error:[/] {escape(type(e).__name__)}: {escape(first_line(e)[:300])} "
                      "(LATTE_TRACEBACK=1 shows where)", highlight=False, markup=True)
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def setup():
    keep_freed_memory()


# ---------------------------------------------------------------------------------------------- model


@app.command()
@friendly
def info(
    model: str = typer.Option("Latte-XL/2", help="Size preset: Latte-S/2, Latte-B/2, Latte-L/2, Latte-XL/2 (/4, /8)."),
    frames: int = typer.Option(16, help="Frames per clip."),
    size: int = typer.Option(32, help="Latent height and width (256 px / 8 for the SD VAE)."),
    channels: int = typer.Option(4, help="Latent channels."),
    num_classes: int = typer.Option(0, help="Number of classes (0: unconditional)."),
    patch_embed: str = typer.Option("uniform", help="uniform (per-frame patches) or tube (3D tubes)."),
    conditioning: str = typer.Option("adaln", help="adaln (S-AdaLN) or tokens (timestep and class as tokens)."),
    temporal_pos: str = typer.Option("sincos", help="sincos (absolute) or rope (relative, in temporal attention)."),
):
    """Print trainable parameters and forward GFLOPs of each Latte variant at one size ("paper's count":
    adaLN evaluated per token, as the published code does and Table 3 counts)."""
    from rich.table import Table

    from model import Latte, LatteConfig

    table = Table(title=f"{model}, {frames}x{channels}x{size}x{size} latents, batch 1")
    for col in ("variant", "blocks", "params", "forward GFLOPs", "paper's count"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    names = {1: "1 interleaved", 2: "2 late fusion", 3: "3 factorised attention", 4: "4 factorised heads"}
    for variant in (1, 2, 3, 4):
        cfg = LatteConfig.preset(model, variant=variant, input_size=size, num_frames=frames, in_channels=channels,
                                 num_classes=num_classes, patch_embed=patch_embed, conditioning=conditioning,
                                 temporal_pos=temporal_pos)
        with _meta_device():
            net = Latte(cfg)
        params = sum(p.numel() for p in net.parameters() if p.requires_grad)
        flops = net.flops(frames)
        paper = net.flops(frames, per_token_adaln=True)
        table.add_row(names[variant], str(cfg.depth), f"{params / 1e6:.2f}M", f"{flops / 1e9:.2f}",
                      f"{paper / 1e9:.2f}")
    Console().print(table)


def _meta_device():
    import torch

    return torch.device("meta")


@app.command()
@friendly
def convert(
    src: Path = typer.Argument(..., help="A published Latte checkpoint (.pt holding 'ema' or 'model')."),
    out: Path = typer.Argument(..., help="Output .safetensors file (weights plus the JSON config)."),
    num_heads: Optional[int] = typer.Option(None, help="Attention heads, where the width is not a preset's."),
):
    """Convert a published Latte .pt checkpoint into this project's safetensors format."""
    from model import Latte

    if out.suffix != ".safetensors":
        raise LatteError(f"{out}: the output is a .safetensors file")
    net = Latte.from_pretrained(src, num_heads=num_heads)
    net.save(out)
    Console(soft_wrap=True).print(f"wrote {out} ({net.config.describe()})")


@app.command()
@friendly
def bench(
    model: str = typer.Option("Latte-S/2", help="Size preset: Latte-S/2, -B/2, -L/2, -XL/2 (also /4, /8)."),
    frames: int = typer.Option(16, help="Frames per clip."),
    size: int = typer.Option(32, help="Latent height and width."),
    channels: int = typer.Option(4, help="Latent channels."),
    batch: int = typer.Option(1, help="Clips per model call."),
    variants: str = typer.Option("1,2,3,4", help="Variants to measure, comma-separated."),
    precisions: str = typer.Option("fp32,bf16", help="fp32, bf16 (autocast), fp16 (CUDA), comma-separated."),
    repeats: int = typer.Option(5, help="Timed runs of each measurement; the median is reported."),
    warmup: int = typer.Option(2, help="Untimed runs before them."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    out: Path = typer.Option(Path("bench.json"), help="JSON file with every figure."),
    sampling: bool = typer.Option(True, help="Time DDIM steps and one whole guided video (50 steps + VAE)."),
    vae: bool = typer.Option(True, help="Time VAE encoding and decoding (SD-1.4 architecture)."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Also time forward+backward with "
                                         "activation checkpointing."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model for the model timings."),
    quick: bool = typer.Option(False, "--quick", help="A fast smoke run: small matmul, 2 repeats, tiny VAE."),
    depth: Optional[int] = typer.Option(None, help="Override the preset's number of blocks."),
    hidden_size: Optional[int] = typer.Option(None, help="Override the preset's width."),
    num_heads: Optional[int] = typer.Option(None, help="Override the preset's attention heads."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
    profile: Optional[Path] = typer.Option(None, help="Folder: profile one more step of each model row with "
                                           "torch.profiler, print the ops taking the time, write Chrome traces."),
):
    """Measure speed and memory: matmul peak, each variant's forward and forward+backward, sampling, VAE."""
    from latte_cli.bench import bench as run_bench

    try:
        variant_list = tuple(int(v) for v in variants.split(","))
    except ValueError:
        raise LatteError(f"--variants takes numbers separated by commas, not {variants!r}") from None
    run_bench(model=model, frames=frames, size=size, channels=channels, batch=batch, variants=variant_list,
              precisions=tuple(p.strip() for p in precisions.split(",")), repeats=repeats, warmup=warmup,
              device=device, out=out, sampling=sampling, vae=vae, grad_checkpoint=grad_checkpoint,
              compile=compile, quick=quick, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
              threads=threads, profile=profile)


# ----------------------------------------------------------------------------------------------- data


@app.command()
@friendly
def synth(
    out: Path = typer.Argument(..., help="Output folder for the mp4 files."),
    videos: int = typer.Option(64, help="Number of videos."),
    frames: int = typer.Option(16, help="Frames per video."),
    size: int = typer.Option(32, help="Frame height and width in pixels."),
    classes: int = typer.Option(1, help="Classes (1 to 20): shape and colour; in folders class_0, ..."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes the same videos."),
    fps: int = typer.Option(8, help="Frames per second of the mp4 files."),
    shape_size: float = typer.Option(5 / 16, help="The shape's width as a share of the frame's (0.1 to 0.6)."),
):
    """Write a small synthetic data set: one bright shape per video, moving and bouncing off the borders."""
    from latte_cli.video import synth as write_synth

    paths = write_synth(out, videos=videos, frames=frames, size=size, classes=classes, seed=seed, fps=fps,
                        shape_size=shape_size)
    n = len(paths)
    Console(soft_wrap=True).print(f"wrote {n} video{'s' * (n != 1)} of {frames} frames to {out}", highlight=False)


@app.command()
@friendly
def encode(
    src: Path = typer.Argument(..., help="Folder of videos (and images); nested folders are searched."),
    out: Path = typer.Argument(..., help="Output folder for the latent shards and index.json."),
    vae: str = typer.Option("none", help="VAE weights (SD-1.4 KL-f8 file or diffusers folder) or none."),
    size: int = typer.Option(256, help="Short side resized to this, then center-cropped (multiple of 8)."),
    labels: str = typer.Option("none", help="none, or folders: the folder under SRC is the class."),
    flip: bool = typer.Option(False, help="Also store the latents of the mirrored frames."),
    stride: int = typer.Option(1, help="Keep every stride-th frame of each video."),
    min_frames: int = typer.Option(1, help="Skip videos with fewer frames than this (after the stride)."),
    batch: int = typer.Option(16, help="Frames per VAE batch."),
    device: str = typer.Option("cpu", help="Device for the VAE: cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option("fp32", help="VAE precision: fp32, bf16 or fp16."),
):
    """Encode every video into frame latents once: a safetensors file each, plus index.json. Reruns resume."""
    from encode import encode as encode_videos

    encode_videos(src, out, vae=vae, size=size, labels=labels, flip=flip, stride=stride,
                  min_frames=min_frames, batch=batch, device=device, precision=precision)


# ---------------------------------------------------------------------------------------------- train


@app.command()
@friendly
def train(
    data: Path = typer.Argument(..., help="Folder written by `latte encode` (index.json and shards)."),
    out: Path = typer.Option(Path("runs/latte"), help="Run folder: config, log.jsonl, checkpoints."),
    model: str = typer.Option("Latte-S/2", help="Size preset: Latte-S/2, -B/2, -L/2, -XL/2 (also /4, /8)."),
    variant: int = typer.Option(1, help="1 interleaved, 2 late fusion, 3 factorised attention, 4 split heads."),
    patch_embed: str = typer.Option("uniform", help="uniform (per-frame patches) or tube (3D tubes)."),
    tube_stride: int = typer.Option(2, help="Temporal stride of the tube embedding."),
    conditioning: str = typer.Option("adaln", help="adaln (S-AdaLN) or tokens (timestep and class as tokens)."),
    temporal_pos: str = typer.Option("sincos", help="sincos (absolute) or rope (relative)."),
    learn_sigma: bool = typer.Option(True, help="Learn the variance (L_vlb) as well as the noise."),
    depth: Optional[int] = typer.Option(None, help="Override the preset's number of blocks."),
    hidden_size: Optional[int] = typer.Option(None, help="Override the preset's width."),
    num_heads: Optional[int] = typer.Option(None, help="Override the preset's attention heads."),
    frames: int = typer.Option(16, help="Frames per clip."),
    frame_interval: int = typer.Option(3, help="Take every n-th frame for a clip."),
    image_frames: int = typer.Option(0, help="Latte+IMG: frames of other videos appended as images."),
    flip: bool = typer.Option(True, help="Use the mirrored latents where the shards have them."),
    class_dropout: float = typer.Option(0.1, help="Label dropout for classifier-free guidance."),
    steps: int = typer.Option(1000, help="Optimiser steps in all."),
    minutes: float = typer.Option(0.0, help="Stop with a checkpoint after this much training time (0: no limit)."),
    batch: int = typer.Option(8, help="Global batch (all processes and accumulation steps)."),
    accum: int = typer.Option(1, help="Gradient accumulation steps."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (constant after warm-up)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    warmup: int = typer.Option(0, help="Linear warm-up steps."),
    lr_decay: bool = typer.Option(False, "--lr-decay", help="Cosine decay of the rate to 0 over --steps or "
                                                         "--minutes, whichever ends first."),
    clip_grad: float = typer.Option(0.0, help="Max gradient norm (0: no clipping)."),
    clip_grad_from: int = typer.Option(0, help="Clip gradients from this step on."),
    ema_decay: float = typer.Option(0.9999, help="EMA decay of the weights that sampling uses."),
    schedule: str = typer.Option("linear", help="Noise schedule: linear or cosine."),
    precision: str = typer.Option("fp32", help="fp32, bf16 (CPU and CUDA) or fp16 (CUDA, grad scaler)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Activation checkpointing."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    log_every: int = typer.Option(10, help="Log a line every n steps."),
    ckpt_every: int = typer.Option(500, help="Write a checkpoint every n steps (and at the end)."),
    keep_last: int = typer.Option(3, help="Checkpoints to keep."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    init_from: Optional[Path] = typer.Option(None, help="DiT image checkpoint or Latte checkpoint to start from."),
    cond_frames: int = typer.Option(0, help="Long videos: also learn to continue 1..k given frames and to fill "
                                             "between key frames (0: off)."),
    cond_noise: int = typer.Option(100, help="Given frames are noised to a random step below this (LVDM)."),
    train_only: str = typer.Option("all", help="all, or temporal: freeze the rest (Video LDM's recipe)."),
):
    """Train a Latte model on encoded latents (AdamW, EMA, mixed precision; torchrun for several processes)."""
    import train as stage

    kwargs = {k: v for k, v in locals().items() if k != "stage"}
    kwargs.update(data=str(data), out=str(out), init_from=str(init_from) if init_from else None)
    last = stage.train(stage.TrainConfig(**kwargs))
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 wrote the checkpoints
        Console(soft_wrap=True).print(f"checkpoint: {last}", highlight=False)


# --------------------------------------------------------------------------------------------- sample


@app.command()
@friendly
def sample(
    ckpt: Path = typer.Argument(..., help="Checkpoint: a step folder or .safetensors of ours, or a published .pt."),
    out: Path = typer.Option(Path("samples"), help="Output folder for the mp4 files and the contact sheet."),
    num: int = typer.Option(4, help="Number of videos."),
    sampler: str = typer.Option("ddpm", help="ddpm (ancestral, learned variance) or ddim."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default 250 for ddpm, 50 for ddim)."),
    eta: float = typer.Option(0.0, help="DDIM noise: 0 deterministic, 1 like DDPM."),
    clip: Optional[bool] = typer.Option(None, help="Clip predicted x_0 to [-1, 1] (default: with --vae none)."),
    cfg_scale: float = typer.Option(7.0, help="Classifier-free guidance scale (class-conditional models; 1 = off)."),
    classes: Optional[list[str]] = typer.Option(None, "--class", help="Class id or name; repeat it; cycled."),
    seed: int = typer.Option(0, help="Video i uses seed + i: the same seed gives the same videos."),
    vae: str = typer.Option("none", help="SD-1.4 VAE weights (file or folder), or none for pixel-space models."),
    fps: int = typer.Option(8, help="Frames per second of the mp4 files."),
    precision: str = typer.Option("fp32", help="fp32, bf16, or fp16 (CUDA)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    batch: int = typer.Option(4, help="Videos denoised together."),
    frames: Optional[int] = typer.Option(None, help="Frames per video; beyond the model's clip length the video "
                                                    "is extended clip by clip (models trained with --cond-frames)."),
    context: Optional[int] = typer.Option(None, help="Frames of each clip given to the next (default: as trained)."),
    hierarchical: bool = typer.Option(False, "--hierarchical", help="Key frames first, then the frames between "
                                      "them by interpolation (LVDM, Video LDM)."),
    key_every: int = typer.Option(4, help="Frames between key frames with --hierarchical (2-4)."),
    keyframes: Optional[Path] = typer.Option(None, help="Model for the key frames, trained at --key-every times the "
                                             "frame interval (default: CKPT, which gives a higher frame rate)."),
):
    """Sample videos from a Latte checkpoint: mp4 files and one PNG contact sheet."""
    import sample as stage

    paths = stage.sample(stage.SampleConfig(
        ckpt=str(ckpt), out=str(out), num=num, sampler=sampler, steps=steps, eta=eta, clip=clip, cfg_scale=cfg_scale,
        classes=classes or [], seed=seed, vae=vae, fps=fps, precision=precision, device=device, batch=batch,
        frames=frames, context=context, hierarchical=hierarchical, key_every=key_every,
        keyframes=str(keyframes) if keyframes else None))
    n = len(paths) - 1
    Console(soft_wrap=True).print(f"wrote {n} video{'s' * (n != 1)} and {paths[-1]}", highlight=False)


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the data, the run and the samples."),
    minutes: float = typer.Option(8.0, help="Training time budget in minutes."),
    model: str = typer.Option("Latte-S/4", help="Size preset (the demo narrows it with --depth/--hidden-size)."),
    depth: int = typer.Option(6, help="Blocks (spatial and temporal, alternating)."),
    hidden_size: int = typer.Option(128, help="Width."),
    num_heads: int = typer.Option(4, help="Attention heads."),
    videos: int = typer.Option(256, help="Synthetic training videos."),
    num: int = typer.Option(8, help="Videos to sample."),
    sample_steps: int = typer.Option(250, help="DDPM steps."),
    long_frames: int = typer.Option(32, help="Frames of the two long videos made clip by clip (0: none)."),
    seed: int = typer.Option(0, help="Seed of the data, the training and the samples."),
):
    """The whole pipeline in one command, no downloads: synth -> encode -> train -> sample."""
    from latte_cli.demo import demo as run_demo

    run_demo(out, minutes=minutes, model=model, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
             videos=videos, num=num, sample_steps=sample_steps, long_frames=long_frames, seed=seed)


def main():
    app(prog_name="latte")


if __name__ == "__main__":
    sys.exit(main())
