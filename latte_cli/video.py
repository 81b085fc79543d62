"""Video in and out with PyAV: read and square-crop clips, write H.264 mp4s and PNG contact sheets, and
make the synthetic data set of bouncing shapes used by the demo and the tests.

Frames are (T, 3, H, W) float tensors in [-1, 1], the range the VAE encodes and decodes."""

import math
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from torch import Tensor

from latte_cli import LatteError, replacing

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}  # one-frame items for joint training (Latte+IMG)


def read_video(path: str | Path, size: int, stride: int = 1, max_frames: int | None = None) -> Tensor:
    """Decode every stride-th frame (at most max_frames), scale the short side to size and center-crop a
    size x size square. Images give one frame. Returns (T, 3, size, size) in [-1, 1]."""
    if size < 1 or stride < 1 or (max_frames is not None and max_frames < 1):
        raise LatteError(f"read_video needs size, stride, max_frames >= 1: {size}, {stride}, {max_frames}")
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise LatteError(f"{path} is empty")
    frames = []
    # swscale converts YUV to RGB and scales in one pass; AREA averages the pixels it covers (antialiased)
    reformatter = VideoReformatter()
    try:
        with av.open(str(path.absolute())) as container:  # absolute: "a:b.mp4" is no FFmpeg protocol
            if not container.streams.video:
                raise LatteError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # let FFmpeg decode with frame and slice threads
            for i, frame in enumerate(container.decode(stream)):
                if i % stride:
                    continue
                scale = size / min(frame.width, frame.height)
                w, h = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
                rgb = reformatter.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA")
                rgb = rgb.to_ndarray()  # (h, w, 3) uint8
                turns = round(getattr(frame, "rotation", 0) / 90) % 4  # display rotation, counter-clockwise: phone
                if turns:  # videos and EXIF-rotated photos are stored turned and shown upright
                    rgb = np.ascontiguousarray(np.rot90(rgb, turns))
                    h, w = rgb.shape[:2]
                top, left = (h - size) // 2, (w - size) // 2
                frames.append(rgb[top : top + size, left : left + size])
                if len(frames) == max_frames:
                    break
    except av.FFmpegError as e:
        raise LatteError(f"cannot read {path}: {e.strerror or e}") from None
    if not frames:
        raise LatteError(f"{path} holds no decodable frames")
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (T, 3, size, size) uint8
    return x.float() / 127.5 - 1


def write_video(path: str | Path, frames: Tensor, fps: int = 8, crf: int = 17) -> None:
    """Write (T, 3, H, W) frames in [-1, 1] as an H.264 mp4 in yuv420p, the format every player opens.
    crf 17 is close to visually lossless; lower is larger and closer."""
    path = Path(path)
    rgb = _to_uint8(_check_video(frames))  # (T, H, W, 3)
    # yuv420p stores colour at half resolution, so H.264 needs even sides: repeat the last row/column
    rgb = np.pad(rgb, ((0, 0), (0, rgb.shape[1] % 2), (0, rgb.shape[2] % 2), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, av.open(str(tmp.absolute()), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = rgb.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # no lookahead: with it, x264 encoded the same small clip differently from run to run
        stream.options = {"crf": str(crf), "x264-params": "rc-lookahead=0"}
        for a in rgb:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        container.mux(stream.encode())  # flush the frames the encoder still holds


def contact_sheet(path: str | Path, videos: list[Tensor] | Tensor, max_frames: int = 16, scale: int = 1) -> None:
    """One PNG with a row per video and a column per frame (the first max_frames frames). videos is a list
    of (T, 3, H, W) tensors in [-1, 1] of one size, a (B, T, 3, H, W) tensor or a single video; scale > 1
    enlarges each pixel to a scale x scale block, so that small frames can be seen."""
    if isinstance(videos, Tensor):
        videos = list(videos) if videos.ndim == 5 else [videos]
    if not videos:
        raise LatteError("contact_sheet needs at least one video")
    h, w = _check_video(videos[0]).shape[2:]
    if any(_check_video(v).shape[2:] != (h, w) for v in videos):
        raise LatteError("contact_sheet needs videos of one frame size")
    cols = min(max(len(v) for v in videos), max_frames)
    sheet = np.zeros((len(videos) * h, cols * w, 3), np.uint8)  # shorter videos leave black cells
    for r, v in enumerate(videos):
        for c, frame in enumerate(_to_uint8(v[:cols])):
            sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = frame
    sheet = sheet.repeat(scale, axis=0).repeat(scale, axis=1)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = sheet.shape[1], sheet.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(sheet, format="rgb24")) + codec.encode(None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_bytes(b"".join(bytes(p) for p in packets))


def _check_video(frames: Tensor) -> Tensor:
    if frames.ndim != 4 or frames.shape[1] != 3 or len(frames) == 0:
        raise LatteError(f"expected video frames of shape (T, 3, H, W), got {tuple(frames.shape)}")
    return frames


def _to_uint8(frames: Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    x = (frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------ synthetic data

# Class k is SHAPES[k % 4] drawn in COLOURS[k % 5]: 20 distinct classes, bold enough that a tiny model
# learns them in minutes at 32 x 32 px.
SHAPES = ("square", "disc", "triangle", "diamond")
COLOURS = ((255, 64, 64), (64, 230, 64), (80, 130, 255), (255, 220, 40), (240, 80, 240))
BACKGROUND = (16, 16, 24)


def synth(out: str | Path, videos: int, frames: int, size: int, classes: int, seed: int = 0,
          fps: int = 8, shape_size: float = 5 / 16) -> list[Path]:
    """Write `videos` mp4s of one filled shape moving at constant velocity and bouncing off the borders.
    The class picks shape and colour; start, direction and speed (1-3 px per frame at size 32) are random
    from seed; shape_size is the shape's width as a share of the frame's. With classes > 1 the files go in
    folders class_0, class_1, ... (zero-padded so that the sorted names keep the class order)."""
    if videos < 1 or frames < 1 or size < 16 or fps < 1:
        raise LatteError("synth needs videos, frames and fps >= 1 and size >= 16")
    if not 0.1 <= shape_size <= 0.6:
        raise LatteError(f"synth's shape size is a share of the frame from 0.1 to 0.6, got {shape_size}")
    if not 1 <= classes <= len(SHAPES) * len(COLOURS):
        raise LatteError(f"synth makes 1 to {len(SHAPES) * len(COLOURS)} classes, got {classes}")
    rng = np.random.default_rng(seed)
    out, digits = Path(out), len(str(classes - 1))
    paths = []
    for i in range(videos):
        k = i % classes
        clip = _bouncing_shape(rng, SHAPES[k % len(SHAPES)], COLOURS[k % len(COLOURS)], frames, size, shape_size)
        folder = out / f"class_{k:0{digits}d}" if classes > 1 else out
        paths.append(folder / f"video_{i:04d}.mp4")
        write_video(paths[-1], torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1, fps=fps)
    return paths


def _bouncing_shape(rng: np.random.Generator, shape: str, colour: tuple, frames: int, size: int,
                    shape_size: float) -> np.ndarray:
    """(frames, size, size, 3) uint8 of one shape whose centre follows a straight line folded at the
    borders (a bounce is a mirror image of the straight path)."""
    r = size * shape_size / 2  # half extent: by default an 11 px square at size 32
    lo, span = r, size - 1 - 2 * r  # centres in [r, size - 1 - r] keep the whole shape in the frame
    angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(1, 3) * size / 32
    velocity = speed * np.array([math.cos(angle), math.sin(angle)])
    p = rng.uniform(lo, lo + span, 2) + np.arange(frames)[:, None] * velocity  # (T, 2) straight line as (x, y)
    p = lo + span - np.abs((p - lo) % (2 * span) - span)  # folded into [lo, lo + span]
    yy, xx = np.mgrid[:size, :size]
    dx, dy = xx - p[:, 0, None, None], yy - p[:, 1, None, None]  # (T, size, size)
    mask = {
        "square": np.maximum(abs(dx), abs(dy)) <= r,
        "disc": dx**2 + dy**2 <= r**2,
        "triangle": (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2),  # apex up, base 2r wide
        "diamond": abs(dx) + abs(dy) <= r,
    }[shape]
    return np.where(mask[..., None], np.array(colour, np.uint8), np.array(BACKGROUND, np.uint8))
