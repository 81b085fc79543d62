"""Encode a folder of videos into frame latents once, so that training never touches pixels or the VAE.

    latte encode data/UCF-101 latents/ucf --vae sd-vae.safetensors --size 256 --labels folders --flip

Every video (or image) becomes one safetensors shard mirroring its path under SRC:
    latents       (T, C, h, w) float16: the VAE posterior mean times the scaling factor (deterministic)
    latents_flip  the same for the horizontally mirrored frames (with --flip; Latte's only augmentation)
    label         int64 scalar class index (with --labels folders)
plus index.json listing the classes, the shards, their frame counts and the VAE settings. Shards and index
are written under a temporary name and renamed, so an interrupted run leaves only whole files, and a rerun
skips the shards that are already there."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from latte_cli import LatteError, replacing, resolve_device
from latte_cli.vae import PRECISIONS, load_vae
from latte_cli.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_video

INDEX = "index.json"


@torch.inference_mode()
def encode(src: str | Path, out: str | Path, vae: str | Path | nn.Module = "none", size: int = 256,
           labels: str = "none", flip: bool = False, stride: int = 1, min_frames: int = 1, batch: int = 16,
           device: str = "cpu", precision: str = "fp32") -> dict:
    """Encode every video and image under src into out (see the module docstring). vae is a weight file,
    "none" (pixel space) or a VAE module. Unreadable, corrupt and too-short files are reported and skipped.
    Returns the summary: encoded, done (by an earlier run), skipped (file and reason), frames, index."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise LatteError(f"{src} {'is not a folder' if src.exists() else 'does not exist'}")
    if size < 8 or size % 8:
        raise LatteError(f"--size must be a positive multiple of 8, got {size}")
    if labels not in ("none", "folders"):
        raise LatteError(f"--labels must be none or folders, got {labels!r}")
    if min(stride, min_frames, batch) < 1:
        raise LatteError("--stride, --min-frames and --batch must be at least 1")
    if precision not in PRECISIONS:
        raise LatteError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = resolve_device(device)
    items, classes, skipped = _scan(src, labels)
    if not items:
        raise LatteError(f"no videos or images found in {src}")
    model = vae.to(device) if isinstance(vae, nn.Module) else load_vae(vae, device=device)
    vae_name = model.name if isinstance(vae, nn.Module) else str(vae)
    # a shard is reused only if it was made with these settings and still has the same label
    settings = json.dumps(dict(vae=vae_name, size=size, stride=stride, flip=flip))
    console = Console(stderr=True, soft_wrap=True)  # one line per message, also in log files

    def too_short(rel: Path, frames: int) -> str | None:
        if not _is_image(rel) and frames < min_frames:
            return f"{src / rel} has {frames} frames, fewer than --min-frames {min_frames}"
        return None

    entries, todo = [], []
    for rel, label in items:
        shard, stamp = out / rel.parent / f"{rel.name}.safetensors", _stamp(src / rel)  # (stamped before reading)
        frames = _finished(shard, settings, label, stamp)
        if frames is None:
            todo.append((rel, label, shard, stamp))
        elif reason := too_short(rel, frames):  # made by an earlier run with a lower --min-frames
            skipped.append(dict(file=rel.as_posix(), reason=reason))
        else:
            entries.append(_entry(out, rel, shard, frames, label))
    done = len(entries)

    def read(rel: Path) -> torch.Tensor:
        return read_video(src / rel, size, stride=1 if _is_image(rel) else stride)

    columns = (TextColumn("encode"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
               TimeRemainingColumn())
    encoded_frames, start = 0, time.perf_counter()
    # a reader thread decodes the next file while the VAE encodes this one (PyAV and torch release the GIL)
    with Progress(*columns, console=console) as progress, ThreadPoolExecutor(1) as reader:
        task = progress.add_task("encode", total=len(items), completed=done, speed="")
        pending = reader.submit(read, todo[0][0]) if todo else None
        for i, (rel, label, shard, stamp) in enumerate(todo):
            current = pending
            if i + 1 < len(todo):
                pending = reader.submit(read, todo[i + 1][0])
            try:
                x = current.result()  # (T, 3, size, size) in [-1, 1]
                if reason := too_short(rel, len(x)):
                    raise LatteError(reason)
            except LatteError as e:
                skipped.append(dict(file=rel.as_posix(), reason=str(e)))
                progress.console.print(f"[yellow]skipped:[/] {escape(str(e))}", highlight=False)
                progress.advance(task)
                continue
            x = x.to(device)
            tensors = {"latents": model.encode(x, chunk=batch, precision=precision)}  # (T, C, h, w)
            if flip:
                tensors["latents_flip"] = model.encode(x.flip(-1), chunk=batch, precision=precision)
            tensors = {k: v.to("cpu", torch.float16).contiguous() for k, v in tensors.items()}
            if label is not None:
                tensors["label"] = torch.tensor(label, dtype=torch.int64)
            shard.parent.mkdir(parents=True, exist_ok=True)
            meta = dict(settings=settings, label=str(label), source=rel.as_posix(), stamp=stamp)
            with replacing(shard) as tmp:
                save_file(tensors, tmp, metadata=meta)
            entries.append(_entry(out, rel, shard, len(x), label))
            encoded_frames += len(x)
            fps = encoded_frames / (time.perf_counter() - start)
            progress.update(task, advance=1, speed=f"{fps:.1f} frames/s")

    entries.sort(key=lambda e: e["source"])
    summary = dict(encoded=len(entries) - done, done=done, skipped=skipped,
                   frames=sum(e["frames"] for e in entries), index=str(out / INDEX))
    console.print(f"encoded {summary['encoded']}, already done {done}, skipped {len(skipped)}; "
                  f"{len(entries)} files with {summary['frames']} frames in {out / INDEX}", highlight=False)
    for s in skipped[:20]:
        console.print(f"  {s['reason']}", highlight=False)
    if len(skipped) > 20:
        console.print(f"  ... and {len(skipped) - 20} more, all listed in {out / INDEX}", highlight=False)
    if not entries:
        raise LatteError(f"none of the {len(items)} files in {src} could be encoded")
    index = dict(version=1, vae=vae_name, scaling_factor=float(model.scaling_factor),
                 latent_channels=int(model.latent_channels), latent_size=size // model.downsample, size=size,
                 stride=stride, flip=flip, labels=labels, classes=classes, files=entries, skipped=skipped)
    with replacing(out / INDEX) as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return summary


def load_index(out_dir: str | Path) -> dict:
    """Read and check the index.json that encode wrote. Shard paths in "files" are relative to out_dir."""
    path = Path(out_dir) / INDEX
    if not path.is_file():
        raise LatteError(f"{path} not found; run `latte encode` first")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LatteError(f"{path} is not valid JSON ({e})") from None
    need = dict(vae=str, scaling_factor=(int, float), latent_channels=int, latent_size=int, size=int,
                flip=bool, classes=list, files=list)
    for key, kind in need.items():
        if not isinstance(index, dict) or not isinstance(index.get(key), kind):
            raise LatteError(f"{path} is missing {key!r} or has the wrong type; encode again")
    for e in index["files"]:
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("frames"), int)):
            raise LatteError(f"{path} has a malformed file entry {e!r}; encode again")
        if not (Path(out_dir) / e["file"]).is_file():
            raise LatteError(f"{Path(out_dir) / e['file']} listed in {path} is missing; encode again")
    if not index["files"]:
        raise LatteError(f"{path} lists no files")
    return index


def _scan(src: Path, labels: str) -> tuple[list[tuple[Path, int | None]], list[str], list[dict]]:
    """(relative path, label) of each video and image under src, sorted; hidden files and folders are
    ignored. With labels="folders" the class is the first folder under src, classes sorted by name."""
    suffixes = VIDEO_SUFFIXES | IMAGE_SUFFIXES
    rels = sorted((p.relative_to(src) for p in src.rglob("*") if p.suffix.lower() in suffixes),
                  key=Path.as_posix)
    rels = [r for r in rels if not any(part.startswith(".") for part in r.parts) and (src / r).is_file()]
    if labels == "none":
        return [(r, None) for r in rels], [], []
    classes = sorted({r.parts[0] for r in rels if len(r.parts) > 1})
    if rels and not classes:
        raise LatteError(f"--labels folders needs class folders in {src}, found files only")
    loose = [r for r in rels if len(r.parts) == 1]
    skipped = [dict(file=r.as_posix(), reason=f"{src / r} is not inside a class folder") for r in loose]
    return [(r, classes.index(r.parts[0])) for r in rels if len(r.parts) > 1], classes, skipped


def _is_image(rel: Path) -> bool:
    return rel.suffix.lower() in IMAGE_SUFFIXES


def _stamp(file: Path) -> str:
    """The source file's size and modification time: a file replaced under the same name is encoded again."""
    st = file.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _finished(shard: Path, settings: str, label: int | None, stamp: str) -> int | None:
    """The frame count of a shard made earlier from this file (as it is now) with the same settings and label, else
    None. Shards from before stamps were recorded are trusted."""
    if not shard.is_file():
        return None
    try:
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("settings") != settings or meta.get("label") != str(label):
                return None
            if meta.get("stamp", stamp) != stamp:
                return None
            return f.get_slice("latents").get_shape()[0]
    except (SafetensorError, OSError):  # an unreadable shard is simply made again
        return None


def _entry(out: Path, rel: Path, shard: Path, frames: int, label: int | None) -> dict:
    return dict(file=shard.relative_to(out).as_posix(), source=rel.as_posix(), frames=frames, label=label,
                image=_is_image(rel))
