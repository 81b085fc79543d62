"""Sample videos from a trained Latte model.

    latte sample runs/ucf/checkpoints/step_00100000 --out samples --num 8 --class ApplyEyeMakeup --vae sd-vae
    latte sample ucf101.pt --out samples --sampler ddim --steps 50 --cfg-scale 7 --vae sd-vae-ft-ema

Each video's starting noise and every later draw come from its own generator (seed + video number), so a
video is the same whatever the batch it is made in. Latents go through the VAE decoder a chunk of frames at a
time, and each video is written as an H.264 mp4, plus one PNG contact sheet of all videos.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from latte_cli import LatteError, autocast, kernels, resolve_device
from latte_cli.diffusion import Diffusion, classifier_free_guidance, given_frames, randn
from latte_cli.vae import load_vae
from latte_cli.video import contact_sheet, write_video
from model import Latte, checkpoint_file


@dataclass
class SampleConfig:
    ckpt: str                               # our checkpoint (.safetensors or a step folder) or a published .pt
    out: str = "samples"
    num: int = 4                            # videos
    sampler: str = "ddpm"                   # ddpm (ancestral, learned variance) or ddim
    steps: int | None = None                # denoising steps: 250 for ddpm, 50 for ddim
    eta: float = 0.0                        # DDIM noise (0: deterministic)
    clip: bool | None = None                # clip predicted x_0 to [-1, 1]; default: in pixel space (--vae none)
    cfg_scale: float = 7.0                  # classifier-free guidance for class-conditional models (1: none)
    classes: list[str] = field(default_factory=list)  # ids or names, cycled over the videos; default all
    seed: int = 0
    vae: str = "none"                       # SD-1.4 VAE weights, or none for pixel-space models
    fps: int = 8
    precision: str = "fp32"                 # fp32, bf16, fp16 (CUDA)
    device: str = "auto"
    batch: int = 4                          # videos denoised together
    vae_chunk: int = 8                      # frames per VAE decoder call
    progress: bool = True
    # long videos (models trained with --cond-frames)
    frames: int | None = None               # frames per video; more than the model's clip extends it clip by clip
    context: int | None = None              # frames of the previous clip given to the next (default: as trained)
    hierarchical: bool = False              # key frames first, then the frames between them (LVDM, Video LDM)
    key_every: int = 4                      # key frames are this many frames apart (2-4, as trained)
    keyframes: str | None = None            # a model trained at key_every x the frame interval (default: this one)


def checkpoint_info(path: Path) -> dict:
    """What train.py stores beside our weights (class names, cond_frames, cond_noise), else {}."""
    path = checkpoint_file(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items() if k != "latte_config"}


def resolve_labels(requested: list[str], num_classes: int, names: list[str], num: int) -> list[int] | None:
    if not num_classes:
        if requested:
            raise LatteError("this model is unconditional; it takes no --class")
        return None
    ids = []
    for r in requested or [str(i) for i in range(num_classes)]:
        if r in names:
            ids.append(names.index(r))
        elif r.lstrip("-").isdigit() and 0 <= int(r) < num_classes:
            ids.append(int(r))
        else:
            known = f"; known names: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}" if names else ""
            raise LatteError(f"class {r!r} is not one of the model's {num_classes} classes (0..{num_classes - 1}"
                             f"{known})")
    return [ids[i % len(ids)] for i in range(num)]


@torch.no_grad()
def sample(cfg: SampleConfig) -> list[Path]:
    """Make cfg.num videos; returns the mp4 paths, then the contact sheet's."""
    device = str(resolve_device(cfg.device))
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if cfg.sampler not in ("ddpm", "ddim"):
        raise LatteError(f"--sampler must be ddpm or ddim, not {cfg.sampler!r}")
    if cfg.precision not in ("fp32", "bf16", "fp16") or (cfg.precision == "fp16" and device_type != "cuda"):
        raise LatteError(f"--precision {cfg.precision} is not available on {device} (fp32, bf16; fp16 on CUDA)")
    if min(cfg.num, cfg.batch, cfg.vae_chunk, cfg.fps) < 1:
        raise LatteError("--num, --batch, --vae-chunk and --fps must be at least 1")
    for name in ("steps", "frames", "context"):  # None: the default below
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise LatteError(f"--{name} must be at least 1, not {getattr(cfg, name)}")
    steps = cfg.steps or (250 if cfg.sampler == "ddpm" else 50)
    if not 2 <= steps <= 1000:
        raise LatteError(f"--steps must be between 2 and 1000, not {steps}")
    if not (abs(cfg.cfg_scale) < math.inf and 0 <= cfg.eta <= 1):  # (comparisons with NaN fail: caught too)
        raise LatteError(f"--cfg-scale must be finite and --eta between 0 and 1, not {cfg.cfg_scale} and {cfg.eta}")
    if cfg.keyframes and not cfg.hierarchical:
        raise LatteError("--keyframes is the key-frame model of --hierarchical sampling; pass both or neither")

    # everything is checked before the first file is written
    model = Latte.from_pretrained(cfg.ckpt).to(device).eval()
    mc = model.config
    vae = load_vae(cfg.vae, device=device)
    if vae.latent_channels != mc.in_channels:
        raise LatteError(f"the model makes {mc.in_channels}-channel latents but the VAE ({cfg.vae}) takes "
                         f"{vae.latent_channels}; pass the VAE the model was trained with")
    info = checkpoint_info(Path(cfg.ckpt))
    labels = resolve_labels(cfg.classes, mc.num_classes, info.get("classes", []), cfg.num)
    F, total = mc.num_frames, cfg.frames or mc.num_frames
    context = cfg.context or info.get("cond_frames") or F // 4
    if (total > F or cfg.hierarchical) and not mc.cond_frames:
        raise LatteError(f"this model makes {F}-frame clips; longer videos need a model trained with --cond-frames")
    if total > F and not 0 < context < F:
        raise LatteError(f"--context must be between 1 and {F - 1}, not {context}")
    r = cfg.key_every
    if cfg.hierarchical and not 2 <= r <= min(4, F - 1):
        raise LatteError(f"--key-every must be 2, 3 or 4 (the key-frame spacings training draws), not {r}")
    key_model = model
    if cfg.hierarchical and cfg.keyframes:
        key_model = Latte.from_pretrained(cfg.keyframes).to(device).eval()
        if key_model.config.num_frames != F or key_model.config.in_channels != mc.in_channels:
            raise LatteError(f"--keyframes {cfg.keyframes} makes clips of another shape than {cfg.ckpt}")
        if not key_model.config.cond_frames or key_model.config.num_classes != mc.num_classes:
            raise LatteError(f"--keyframes {cfg.keyframes} must be trained with --cond-frames and the same classes")
    keys = (total - 1) // r + 1 + ((total - 1) % r > 0) if cfg.hierarchical else total  # key frames needed
    windows = -(-(keys - 1) // ((F - 1) // r)) if cfg.hierarchical else 0  # interpolation windows
    clips = 1 + max(0, -(-(keys - F) // (F - context))) + windows  # first clip, extensions, windows
    diffusion = Diffusion(learn_sigma=mc.learn_sigma, respacing=f"ddim{steps}" if cfg.sampler == "ddim" else str(steps))
    cond_noise = info.get("cond_noise", 100) // 2  # given frames at a fixed small noise level (LVDM)
    forward = Diffusion(learn_sigma=mc.learn_sigma)  # the 1000-step forward process that noises given frames
    mixed = autocast(device_type, cfg.precision)
    shape = (F, mc.in_channels, mc.input_size, mc.input_size)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in [f"sample_{i:03d}.mp4" for i in range(cfg.num)] + ["contact_sheet.png"]:
        if (out / name).is_dir():
            raise LatteError(f"{out / name} is a folder, where sampling writes a file")
    console = Console(stderr=True, soft_wrap=True)
    columns = (TextColumn("sample"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    batches = [list(range(i, min(i + cfg.batch, cfg.num))) for i in range(0, cfg.num, cfg.batch)]
    videos, paths = [], []
    with Progress(*columns, console=console, disable=not cfg.progress) as bar:
        task = bar.add_task("sample", total=len(batches) * clips * diffusion.num_timesteps)

        def latents(ids: list[int]) -> torch.Tensor:
            """The latent videos of these video numbers, (len(ids), total, C, H, W)."""
            generators = [torch.Generator().manual_seed(cfg.seed + i) for i in ids]
            y = torch.tensor([labels[i] for i in ids], device=device) if labels is not None else None

            def clip(net, clean=None, mask=None):  # one clip, with given frames where mask is True
                given = None
                if clean is not None:  # LVDM: given frames enter at a fixed small noise level
                    t_given = torch.full((len(ids),), cond_noise, device=device)
                    given = (clean, forward.q_sample(clean, t_given, randn(clean.shape, generators, device)))
                return generate(net, diffusion, (len(ids), *shape), generators, cfg, y, given, mask, device,
                                callback=lambda *_: bar.advance(task))

            with mixed, kernels.frozen_weights():  # the weights stay as loaded: cast and reordered once
                z = clip(key_model)
                while z.shape[1] < keys:  # extend: the last frames become the next clip's given frames
                    clean = torch.cat([z[:, -context:], torch.zeros_like(z[:, : F - context])], dim=1)
                    new = clip(key_model, clean, prefix_mask(len(ids), F, context, device))
                    z = torch.cat([z, new[:, context:]], dim=1)
                if cfg.hierarchical:
                    z = fill_between(clip, model, z[:, :keys], r, F)
            return z[:, :total].float()

        for ids in batches:
            for i, z in zip(ids, latents(ids), strict=True):
                if not torch.isfinite(z).all():
                    raise LatteError(f"sample {i}'s latents hold NaN or infinite values (a diverged model?); "
                                     "it was not written")
                frames = vae.decode(z, chunk=cfg.vae_chunk, precision=cfg.precision).clamp(-1, 1).cpu()
                path = out / f"sample_{i:03d}.mp4"
                write_video(path, frames, fps=cfg.fps)
                videos.append(frames)
                paths.append(path)
    sheet = out / "contact_sheet.png"
    contact_sheet(sheet, videos, max_frames=total, scale=max(1, 64 // max(videos[0].shape[2:])))  # cells >= 64 px
    return [*paths, sheet]


def prefix_mask(batch: int, frames: int, given: int, device) -> torch.Tensor:
    return (torch.arange(frames, device=device) < given).expand(batch, frames)


def fill_between(clip, model, keys: torch.Tensor, r: int, F: int) -> torch.Tensor:
    """Hierarchical generation (LVDM 3.3, Video LDM's T -> rT): key frames r apart become every r-th frame,
    and windows of F frames, each starting at a key frame and given the keys inside it, fill the frames
    between. Consecutive windows share one key frame; frames after a window's last key are left to the next."""
    B, K = keys.shape[:2]
    video = keys.new_zeros(B, (K - 1) * r + 1 + F, *keys.shape[2:])           # room for the last window
    video[:, : (K - 1) * r + 1 : r] = keys
    mask = (torch.arange(F, device=keys.device) % r == 0).expand(B, F)       # keys every r frames from 0
    stride = r * ((F - 1) // r)                                               # to the window's last key
    for start in range(0, (K - 1) * r, stride):
        window = video[:, start : start + F]
        inside = torch.arange(start, start + F, device=keys.device) <= (K - 1) * r  # no keys past the last
        video[:, start : start + stride] = clip(model, window, mask & inside)[:, :stride]
    return video[:, : (K - 1) * r + 1]


def generate(model, diffusion: Diffusion, shape: tuple, generators: list, cfg: SampleConfig, y=None,
             given: tuple | None = None, mask=None, device="cpu", callback=None) -> torch.Tensor:
    """One clip of latents. y: class labels; given = (clean, noised) latents of the frames where mask
    (B, F) is True, for a --cond-frames model: the model sees the noised ones, the output holds the clean
    ones. Guidance contrasts with the model stripped of every condition: the null class and no given frames
    (classifier-free guidance; Video LDM's context guidance)."""
    fn, kwargs, uncond = model, {}, {}
    if y is not None:
        kwargs["y"], uncond["y"] = y, torch.full_like(y, model.config.num_classes)
    if given is not None:
        fn, kwargs["mask"], uncond["mask"] = given_frames(model, given[1]), mask.float(), torch.zeros_like(mask.float())
    elif model.config.cond_frames:
        kwargs["mask"] = torch.zeros(shape[:2], device=device)
    if uncond and cfg.cfg_scale != 1.0:
        fn = classifier_free_guidance(fn, cfg.cfg_scale, uncond)
    # pixels live in [-1, 1], so clipping each x_0 prediction is right there (DDPM); latents are unbounded
    clip = cfg.clip if cfg.clip is not None else cfg.vae == "none"
    if cfg.sampler == "ddim":
        z = diffusion.ddim_sample_loop(fn, shape, model_kwargs=kwargs, generator=generators, device=device,
                                       eta=cfg.eta, clip_denoised=clip, callback=callback)
    else:
        z = diffusion.p_sample_loop(fn, shape, model_kwargs=kwargs, generator=generators, device=device,
                                    clip_denoised=clip, callback=callback)
    if given is not None:  # the given frames come back as they were given, without their light noise
        z = torch.where(mask[:, :, None, None, None], given[0], z)
    return z
