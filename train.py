"""Train Latte on the latent shards of `latte encode`.

    latte train latents/ucf --out runs/ucf --model Latte-XL/2 --batch 5 --precision bf16
    torchrun --standalone --nproc-per-node 8 -m latte_cli train latents/ucf --out runs/ucf --batch 40

Reads like nanoGPT's train.py inside one function: setup (distributed from the environment, seed, autocast)
-> data -> model, EMA, optimiser -> resume -> loop -> save. Everything random in a step (clips, flips,
label dropout, timesteps, noise) is drawn from a generator seeded by (seed, step), for the global batch, of
which each rank takes its rows: so a resumed run continues exactly, and N processes train exactly like one
process on the same global batch.
"""

import gc
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from encode import load_index
from latte_cli import LatteError, autocast, check_compiler, first_line, replacing, resolve_device
from latte_cli.diffusion import Diffusion, given_frames
from model import Latte, LatteConfig, read_checkpoint


@dataclass
class TrainConfig:
    data: str                               # folder written by `latte encode` (index.json and shards)
    out: str = "runs/latte"                 # run folder: config.json, log.jsonl, checkpoints/step_*/
    # model (any LatteConfig choice; depth/hidden/heads override the preset)
    model: str = "Latte-S/2"
    variant: int = 1
    patch_embed: str = "uniform"
    tube_stride: int = 2
    conditioning: str = "adaln"
    temporal_pos: str = "sincos"
    learn_sigma: bool = True
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    # data
    frames: int = 16                        # frames per clip
    frame_interval: int = 3                 # clips take every 3rd frame (the paper's main setting)
    image_frames: int = 0                   # Latte+IMG: frames of other videos appended as images
    flip: bool = True                       # use the mirrored latents where the shards have them
    class_dropout: float = 0.1              # labels replaced by the null class, for classifier-free guidance
    # optimisation (paper: AdamW, constant 1e-4, no weight decay, EMA 0.9999)
    steps: int = 1000
    minutes: float = 0.0                    # stop (with a checkpoint) after this much training time; 0: no limit
    batch: int = 8                          # global batch, over all processes and accumulation steps
    accum: int = 1                          # gradient accumulation steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 0                         # linear warm-up steps, then constant ...
    lr_decay: bool = False                  # ... or a cosine decay to 0 over the run (its steps or minutes)
    clip_grad: float = 0.0                  # max gradient norm (0: no clipping) ...
    clip_grad_from: int = 0                 # ... applied from this step on
    ema_decay: float = 0.9999
    schedule: str = "linear"                # noise schedule of the 1000-step diffusion
    # machinery
    precision: str = "fp32"                 # fp32, bf16 (CPU and CUDA autocast) or fp16 (CUDA, with a grad scaler)
    compile: bool = False
    grad_checkpoint: bool = False           # recompute block activations in the backward pass
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    resume: bool = False
    init_from: str | None = None            # a DiT image checkpoint (paper 3.3.4) or a Latte checkpoint
    # long videos (Video LDM, LVDM)
    cond_frames: int = 0                    # train with given frames: prefixes of 1..k frames, key frames (0: off)
    cond_noise: int = 100                   # given frames are noised to a random step below this (LVDM)
    train_only: str = "all"                 # "temporal": freeze all but the temporal blocks (Video LDM)
    progress: bool = True                   # a rich progress bar when the output is a terminal


# ------------------------------------------------------------------------------------------------- data

class LatentClips:
    """Clips of `frames` latents at `frame_interval` from the shards, with their labels, and (Latte+IMG)
    single frames drawn from other videos. Shards are memory-mapped by safetensors, so only the clips read
    are loaded."""

    def __init__(self, root: str | Path, frames: int, interval: int, image_frames: int, flip: bool):
        self.root, self.frames, self.interval, self.image_frames = Path(root), frames, interval, image_frames
        self.index = load_index(root)
        self.flip = flip and self.index["flip"]
        self.span = (frames - 1) * interval + 1  # frames a clip covers in its video
        entries = self.index["files"]
        self.videos = [e for e in entries if not e.get("image") and e["frames"] >= self.span]
        self.too_short = sum(1 for e in entries if not e.get("image") and e["frames"] < self.span)
        if not self.videos:
            longest = max((e["frames"] for e in entries if not e.get("image")), default=0)
            raise LatteError(f"no video in {root} has the {self.span} frames a clip of {frames} at interval "
                             f"{interval} needs (the longest has {longest}); lower --frames or --frame-interval")
        self.image_sources = [e for e in entries if e["frames"] > 0]  # frames of any file may serve as images
        self.classes = self.index["classes"]
        self.channels, self.size = self.index["latent_channels"], self.index["latent_size"]
        self._open = {}
        for e in entries:  # now, not mid-run: a re-encode stopped halfway leaves shards the index does not describe
            self._check(e)

    def _check(self, entry: dict):
        """The shard holds the latents the index lists (frames x channels x size x size, mirrored too where
        flipping) and its label is one of the classes."""
        path, want = self.root / entry["file"], (entry["frames"], self.channels, self.size, self.size)
        keys = ("latents", "latents_flip") if self.flip else ("latents",)
        try:  # (opened and closed: a data set's every shard held open would use a memory map each)
            with safe_open(str(path), "pt") as f:
                shapes = [tuple(f.get_slice(key).get_shape()) for key in keys]
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
            raise LatteError(f"cannot read {path} ({first_line(e)}); encode again") from None
        for key, shape in zip(keys, shapes, strict=True):
            if shape != want:
                raise LatteError(f"{path} holds {key} of shape {list(shape)}, not the {list(want)} its index lists; "
                                 "encode again")
        label = entry.get("label")
        if self.classes and label is not None and not (type(label) is int and 0 <= label < len(self.classes)):
            raise LatteError(f"{path}: label {label!r} is not one of the index's {len(self.classes)} classes; "
                             "encode again")

    def _tensor(self, entry: dict, key: str):
        f = self._open.get(entry["file"])
        if f is None:
            f = self._open[entry["file"]] = safe_open(str(self.root / entry["file"]), "pt")
        return f.get_slice(key)

    def _read(self, entry: dict, start: int, stop: int, step: int, mirrored: bool) -> torch.Tensor:
        key = "latents_flip" if mirrored else "latents"
        try:
            x = self._tensor(entry, key)[start:stop]
        except Exception as e:
            raise LatteError(f"cannot read {self.root / entry['file']} ({e}); encode again") from None
        return x[::step].float()

    def batch(self, n: int, g: torch.Generator, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A global batch of n clips drawn with g (the same on every rank); returns only `rows` of it:
        x (len(rows), frames + image_frames, C, H, W) and labels (len(rows),) or None."""
        vid = torch.randint(len(self.videos), (n,), generator=g)
        u = torch.rand(n, generator=g)
        mirror = torch.rand(n, generator=g) < 0.5
        img_src = torch.randint(len(self.image_sources), (n, self.image_frames), generator=g)
        img_u = torch.rand(n, self.image_frames, generator=g)
        img_mirror = torch.rand(n, self.image_frames, generator=g) < 0.5
        clips, labels = [], []
        for i in rows:
            e = self.videos[vid[i]]
            start = int(u[i] * (e["frames"] - self.span + 1))
            parts = [self._read(e, start, start + self.span, self.interval, self.flip and bool(mirror[i]))]
            for j in range(self.image_frames):
                src = self.image_sources[img_src[i, j]]
                if src is e and len(self.image_sources) > 1:  # images come from other videos
                    src = self.image_sources[(img_src[i, j] + 1) % len(self.image_sources)]
                k = int(img_u[i, j] * src["frames"])
                parts.append(self._read(src, k, k + 1, 1, self.flip and bool(img_mirror[i, j])))
            clips.append(torch.cat(parts))
            labels.append(e.get("label") or 0)
        y = torch.tensor(labels) if self.classes else None
        return torch.stack(clips), y


def draw_masks(n: int, frames: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(n, frames) bool, True on given frames. Each clip draws one of three patterns with equal chance:
    none (unconditional generation), a prefix of 1..k frames (prediction, to extend a video), or key frames
    every 2-4 frames (interpolation), so that one network learns all three (Video LDM 3.1.1, LVDM 3.3)."""
    kind = torch.randint(3, (n, 1), generator=g)
    length = torch.randint(1, k + 1, (n, 1), generator=g)
    every = torch.randint(2, 5, (n, 1), generator=g)
    i = torch.arange(frames)[None]
    return ((kind == 1) & (i < length)) | ((kind == 2) & (i % every == 0))


def freeze_all_but_temporal(model: Latte) -> int:
    """Video LDM: train only the temporal parts of an image model; returns the trainable parameter count.
    The temporal blocks start as the identity (zero adaLN gates), so the model starts as the image model."""
    cfg = model.config
    if cfg.variant == 4 or cfg.conditioning != "adaln":
        raise LatteError("--train-only temporal needs separate, gated temporal parts: variants 1-3 with adaln")
    if cfg.temporal_pos != "rope":
        raise LatteError("--train-only temporal needs --temporal-pos rope: a sin-cos table added to every token "
                         "would change what the frozen spatial blocks see")
    model.requires_grad_(False)
    for block in model.blocks:
        part = block if block.kind == "temporal" else getattr(block, "attn_temporal", None)
        if part is not None:
            part.requires_grad_(True)
        if block.kind == "factorised":  # its modulation serves both attentions and the MLP; train it too
            block.adaLN_modulation.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_inputs(cfg: TrainConfig, data: LatentClips, timesteps: int, num_classes: int, step: int,
                rows: list[int]) -> dict[str, torch.Tensor]:
    """Everything random in one optimiser step (clips, flips, images, timesteps, noise, label dropout, given
    frames), drawn for the whole global batch from a generator seeded by (seed, step); `rows` are kept."""
    g, n = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step), cfg.batch
    x0, y = data.batch(n, g, rows)
    out = {"x0": x0, "t": torch.randint(timesteps, (n,), generator=g)[rows],
           "noise": torch.randn((n, *x0.shape[1:]), generator=g)[rows]}
    if y is not None:  # label dropout: the null class trains the unconditional model for guidance
        out["y"] = torch.where(torch.rand(n, generator=g)[rows] < cfg.class_dropout, num_classes, y)
    if cfg.cond_frames:
        mask = draw_masks(n, cfg.frames, cfg.cond_frames, g)[rows]
        out["mask"] = torch.cat([mask, mask.new_zeros(len(rows), cfg.image_frames)], dim=1)
        out["t_given"] = torch.randint(cfg.cond_noise, (n,), generator=g)[rows]
        out["noise_given"] = torch.randn((n, *x0.shape[1:]), generator=g)[rows]
    return out


def learning_rate(cfg: TrainConfig, step: int, seconds: float) -> float:
    """Linear warm-up, then constant, or with lr_decay a cosine from cfg.lr to 0 over the run: the share of
    it done is that of its steps or of its minutes (seconds of training so far), whichever is further."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    if not cfg.lr_decay:
        return lr
    done = max(step / cfg.steps, seconds / (60 * cfg.minutes) if cfg.minutes > 0 else 0.0)
    return lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


# ----------------------------------------------------------------------------------------- checkpoints

def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach().to(e.dtype), 1 - decay)


def fingerprint(model: torch.nn.Module) -> list[float]:
    """Two float64 sums over all weights: equal on every rank of a healthy DDP run."""
    with torch.no_grad():
        return [sum(p.double().sum().item() for p in model.parameters()),
                sum(p.double().abs().sum().item() for p in model.parameters())]


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (a folder appears only once wholly written)."""
    return sorted(p for p in (run / "checkpoints").glob("step_*") if (p / "state.json").exists())


def save_checkpoint(run: Path, step: int, model: Latte, ema: Latte, opt, scaler, cfg: TrainConfig, extra: dict):
    final = run / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = {"classes": extra["classes"], "step": step, "cond_frames": cfg.cond_frames,
                "cond_noise": cfg.cond_noise}
        model.save(tmp / "model.safetensors", extra=info)
        ema.save(tmp / "ema.safetensors", extra=info)
        torch.save({"optimizer": opt.state_dict(), "scaler": scaler.state_dict()}, tmp / "optimizer.pt")
        state = {"step": step, "seed": cfg.seed, "train": asdict(cfg), "model": json.loads(model.config.to_json()),
                 "rng": f"every step reseeds from (seed={cfg.seed}, step); the next step is {step}", **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # a run restarted from an earlier checkpoint rewrites this step
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:  # an error or Ctrl-C leaves no half-written checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(run)[: -cfg.keep_last] if cfg.keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def init_weights_from(model: Latte, path: str, spatial_only: bool = False) -> str:
    """Initialise from a DiT image checkpoint (Latte 3.3.4) or another Latte checkpoint: every tensor whose
    name and shape match is copied (DiT block i -> Latte block i; the per-frame position table is the DiT
    table, reused for every frame); a label table of another size (DiT's 1000 classes) is dropped and the
    new one starts at zero. spatial_only (Video LDM): image block j -> the j-th spatial block, and the
    temporal blocks keep their identity initialisation."""
    try:
        sd, _ = read_checkpoint(path)
    except LatteError as e:
        raise LatteError(f"--init-from: {e}") from None
    own = model.state_dict()
    if spatial_only:
        spatial = [i for i, kind in enumerate(model.plan) if kind == "spatial"]
        renamed = {}
        for k, v in sd.items():
            parts = k.split(".")
            if parts[0] != "blocks":
                renamed[k] = v
            elif int(parts[1]) < len(spatial):
                renamed[".".join(["blocks", str(spatial[int(parts[1])]), *parts[2:]])] = v
        sd = renamed
    sd = model.add_mask_channel(sd)
    copied = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    if "x_embedder.proj.weight" not in copied:
        raise LatteError(f"--init-from {path}: its patch embedding does not fit this model")
    if model.config.num_classes and "y_embedder.embedding_table.weight" not in copied:
        copied["y_embedder.embedding_table.weight"] = torch.zeros_like(own["y_embedder.embedding_table.weight"])
    model.load_state_dict({**own, **copied})
    return f"initialised {len(copied)} of {len(own)} tensors from {path}"


# ------------------------------------------------------------------------------------------------ train

def check_counts(cfg: TrainConfig):
    at_least = dict(steps=1, batch=1, accum=1, frames=1, frame_interval=1, log_every=1, ckpt_every=1, image_frames=0,
                    warmup=0, clip_grad_from=0, keep_last=0, cond_frames=0)
    for name, low in at_least.items():
        if getattr(cfg, name) < low:
            raise LatteError(f"--{name.replace('_', '-')} must be at least {low}, not {getattr(cfg, name)}")
    if not (0 < cfg.lr < math.inf and all(0 <= v < math.inf for v in (cfg.minutes, cfg.weight_decay, cfg.clip_grad))):
        raise LatteError("--lr must be above 0, and --minutes, --weight-decay and --clip-grad not below 0 (and finite)")
    if not (0 <= cfg.ema_decay <= 1 and 0 <= cfg.class_dropout <= 1):  # (comparisons with NaN fail: caught too)
        raise LatteError(f"--ema-decay and --class-dropout must be between 0 and 1, not {cfg.ema_decay} and "
                         f"{cfg.class_dropout}")
    if cfg.train_only not in ("all", "temporal"):
        raise LatteError(f"--train-only must be all or temporal, not {cfg.train_only!r}")
    if not 0 <= cfg.cond_frames < cfg.frames or not 0 < cfg.cond_noise <= 1000:
        raise LatteError(f"--cond-frames must be in [0, {cfg.frames}) and --cond-noise in (0, 1000]")


def train(cfg: TrainConfig) -> Path:
    """Train; returns the folder of the last checkpoint."""
    # ---- setup
    check_counts(cfg)
    ddp = int(os.environ.get("RANK", -1)) != -1
    if cfg.device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    else:
        device = str(resolve_device(cfg.device))
        if ddp and device == "cuda":  # torchrun: a GPU per process
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions on Ampere and later
        torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise LatteError(f"--precision must be fp32, bf16 or fp16, not {cfg.precision!r}")
    if cfg.precision == "fp16" and device_type != "cuda":
        raise LatteError("--precision fp16 needs a CUDA device (use bf16 on the CPU)")
    if cfg.batch % (world * cfg.accum):
        raise LatteError(f"--batch {cfg.batch} does not split into {world} processes x {cfg.accum} accumulation steps")
    per = cfg.batch // (cfg.accum * world)             # clips per rank and accumulation step
    # this rank's rows of the global batch, accumulation step by step: a step's batch is the same however
    # it is split into processes and accumulation steps
    rows = [(k * world + rank) * per + j for k in range(cfg.accum) for j in range(per)]
    mixed = autocast(device_type, cfg.precision)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.precision == "fp16")
    run = Path(cfg.out)
    log = Logger(run, master, cfg.progress)

    # ---- data
    data = LatentClips(cfg.data, cfg.frames, cfg.frame_interval, cfg.image_frames, cfg.flip)

    # ---- model, EMA, optimiser
    overrides = {k: getattr(cfg, k) for k in ("depth", "hidden_size", "num_heads") if getattr(cfg, k) is not None}
    try:
        mcfg = LatteConfig.preset(
            cfg.model, variant=cfg.variant, patch_embed=cfg.patch_embed, tube_stride=cfg.tube_stride,
            conditioning=cfg.conditioning, temporal_pos=cfg.temporal_pos, learn_sigma=cfg.learn_sigma,
            input_size=data.size, in_channels=data.channels, num_frames=cfg.frames,
            num_classes=len(data.classes), cond_frames=cfg.cond_frames > 0, **overrides)
    except ValueError as e:
        raise LatteError(f"model options: {e}") from None
    if data.size % mcfg.patch_size:
        raise LatteError(f"latents of {data.size}x{data.size} do not divide into patches of {mcfg.patch_size}")
    torch.manual_seed(cfg.seed)  # the initial weights
    model = Latte(mcfg).to(device)
    found = checkpoints(run) if cfg.resume else []
    if cfg.init_from and not found:  # (with --resume too, while the run has no checkpoint: a restartable job's start)
        log.line(init_weights_from(model, cfg.init_from, spatial_only=cfg.train_only == "temporal"))
    if cfg.train_only == "temporal":
        log.line(f"training the temporal parts only: {freeze_all_but_temporal(model) / 1e6:.2f}M parameters")
    ema = Latte(mcfg).to(device).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())  # EMA starts as an exact copy
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    diffusion = Diffusion(schedule=cfg.schedule, learn_sigma=cfg.learn_sigma)

    # ---- resume
    start, seconds = 0, 0.0
    if found:
        ckpt = found[-1]
        try:
            state = json.loads((ckpt / "state.json").read_text())
            start, seconds = state["step"], state.get("seconds", 0.0)  # training time so far: --minutes, lr decay
            if not (type(start) is int and start >= 0 and type(seconds) in (int, float) and 0 <= seconds < math.inf):
                raise ValueError(f"step {start!r} and seconds {seconds!r} in state.json")
            if not isinstance(state.get("train", {}), dict):
                raise ValueError("state.json's train options are not a table")
            if state["model"] != json.loads(mcfg.to_json()):
                raise LatteError(f"{ckpt} was trained with another model configuration; use another --out")
            model.load_weights(load_file(str(ckpt / "model.safetensors"), device=device), str(ckpt))
            ema.load_weights(load_file(str(ckpt / "ema.safetensors"), device=device), str(ckpt))
            other = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
            opt.load_state_dict(other["optimizer"])
            if other["scaler"]:  # an fp16 run's; fp32 and bf16 runs store the disabled scaler's empty state
                scaler.load_state_dict(other["scaler"])
        except LatteError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
            raise LatteError(f"cannot resume from {ckpt}: {type(e).__name__}: {first_line(e)[:200]}") from None
        log.line(f"resumed from {ckpt} at step {start}")
        free = ("out", "resume", "steps", "minutes", "log_every", "ckpt_every", "keep_last", "progress", "device",
                "init_from", "compile", "grad_checkpoint")  # (options that leave the steps' arithmetic as it was)
        before = {k: v for k, v in state.get("train", {}).items() if k not in free}
        changed = [f"--{k.replace('_', '-')} {v} -> {getattr(cfg, k)}" for k, v in before.items()
                   if hasattr(cfg, k) and getattr(cfg, k) != v]
        if changed:  # allowed (a lower rate to fine-tune, say), but then the run no longer continues exactly
            log.line("note: options changed since the checkpoint: " + ", ".join(changed))
    else:
        if not cfg.resume and checkpoints(run):  # every rank stops, not rank 0 alone
            raise LatteError(f"{run} already holds checkpoints; pass --resume to continue or choose another --out")
        if master:
            run.mkdir(parents=True, exist_ok=True)
            with replacing(run / "config.json") as tmp:
                tmp.write_text(json.dumps({"train": asdict(cfg), "model": asdict(mcfg)}, indent=1))
    if master:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.line(f"model: {cfg.model}, {mcfg.describe()}, {n / 1e6:.2f}M parameters; data: {len(data.videos)} videos"
                 + (f" ({data.too_short} too short, left out)" if data.too_short else "")
                 + f", {len(data.classes) or 'no'} classes; {world} process(es) on {device}, {cfg.precision}")

    net = model
    if cfg.grad_checkpoint:
        net.gradient_checkpointing = True
    if cfg.compile:
        check_compiler(device)
        net = torch.compile(net)
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device_type == "cuda" else None)

    # ---- loop
    extra = {"classes": data.classes, "data": str(cfg.data)}
    last = found[-1] if found else None
    timer, window = time.perf_counter(), []
    log.start(cfg.steps, start)
    began = time.perf_counter() - seconds  # elapsed: training seconds, on the device (NCCL broadcasts no CPU tensor)
    elapsed = torch.tensor(seconds, dtype=torch.float64, device=device)

    def stop(what: str, step: int):  # a NaN or infinite value: before the weights take it, naming the last checkpoint
        opt.zero_grad(set_to_none=True)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise LatteError(f"{what} at step {step}; stopped ({where})")

    for step in range(start, cfg.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step, elapsed.item())
        terms = torch.zeros(3, device=device)
        inputs = step_inputs(cfg, data, diffusion.num_timesteps, mcfg.num_classes, step, rows)
        for k in range(cfg.accum):
            b = {name: v[k * per : (k + 1) * per].to(device) for name, v in inputs.items()}
            kwargs, fn, loss_frames = {"num_images": cfg.image_frames}, net, None
            if "y" in b:
                kwargs["y"] = b["y"]
            if "mask" in b:  # given frames, lightly noised (LVDM's conditional latent perturbation)
                given = diffusion.q_sample(b["x0"], b["t_given"], b["noise_given"])
                fn, kwargs["mask"], loss_frames = given_frames(net, given), b["mask"], ~b["mask"]  # loss: the rest
            sync = nullcontext() if not ddp or k == cfg.accum - 1 else net.no_sync()
            with sync:
                with mixed:
                    losses = diffusion.training_losses(fn, b["x0"], b["t"], kwargs, b["noise"], frame_mask=loss_frames)
                loss = losses["loss"].mean() / cfg.accum
                scaler.scale(loss).backward()
            terms += torch.stack([losses[n].detach().float().mean() for n in ("loss", "mse", "vb")]) / cfg.accum
        if ddp:
            dist.all_reduce(terms)  # a sum: gloo has no average
            terms /= world
        if not torch.isfinite(terms).all():
            stop(f"the loss became {terms[0].item()}", step)
        scaler.unscale_(opt)
        clip = cfg.clip_grad if cfg.clip_grad > 0 and step >= cfg.clip_grad_from else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
        if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # (fp16's scaler skips such steps itself)
            stop(f"the gradient norm became {grad_norm.item()}", step)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, cfg.ema_decay)

        done = step + 1
        elapsed = torch.tensor(time.perf_counter() - began, dtype=torch.float64, device=device)
        if ddp:  # rank 0's clock decides for all (the time budget and a time-based learning rate)
            dist.broadcast(elapsed, 0)
        final = done == cfg.steps or (cfg.minutes > 0 and elapsed.item() > 60 * cfg.minutes)
        window.append(time.perf_counter() - timer)
        timer = time.perf_counter()
        if done % cfg.log_every == 0 or final:
            sec = sum(window) / len(window)
            log.record(step=done, loss=terms[0].item(), mse=terms[1].item(), vb=terms[2].item(),
                       grad_norm=grad_norm.item(), steps_per_s=1 / sec, clips_per_s=cfg.batch / sec,
                       lr=opt.param_groups[0]["lr"])
            window = []
        log.advance()
        if done % cfg.ckpt_every == 0 or final:
            if ddp:  # every rank's weights fingerprinted: DDP must keep the replicas identical
                prints = [None] * world
                dist.all_gather_object(prints, fingerprint(model))
                extra["rank_fingerprints"] = prints
                if any(p != prints[0] for p in prints):
                    raise LatteError(f"the {world} processes hold different weights at step {done}")
            if master:
                extra["seconds"] = elapsed.item()  # training time so far, for --resume
                last = save_checkpoint(run, done, model, ema, opt, scaler, cfg, extra)
            if ddp:
                dist.barrier()
        if final:
            break
    log.stop()
    if ddp:  # DDP holds the process group: freed now, not at interpreter exit, where gloo's threads could abort
        net = fn = sync = None
        gc.collect()
        dist.destroy_process_group()
    return last if last is not None else run


class Logger:
    """Rank 0 logs: one plain, greppable line per log step on stdout and in log.jsonl; a rich progress bar
    when stdout is a terminal."""

    def __init__(self, run: Path, master: bool, progress: bool):
        from rich.console import Console

        self.run, self.master, self.console = run, master, Console(soft_wrap=True, highlight=False)
        self.use_bar = master and progress and self.console.is_terminal
        self.bar = None

    def line(self, text: str):
        if self.master:
            self.console.print(text)

    def start(self, total: int, done: int):
        if self.use_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                               console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=done)
            self.bar.start()

    def advance(self):
        if self.bar is not None:
            self.bar.advance(self.task)

    def stop(self):
        if self.bar is not None:
            self.bar.stop()

    def record(self, **values):
        if not self.master:
            return
        with open(self.run / "log.jsonl", "a") as f:
            f.write(json.dumps(values) + "\n")
        self.line(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))

