"""latte: the command line and the parts the stages share (diffusion maths, the VAE, video I/O)."""

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --precision -> torch dtype name


def autocast(device_type: str, precision: str):
    """The mixed-precision context of --precision: fp32 runs as it is, bf16 and fp16 under torch.autocast.
    (torch is imported here, not at the top, so that `latte --help` starts without it.)"""
    import torch

    return nullcontext() if precision == "fp32" else torch.autocast(device_type, getattr(torch, PRECISIONS[precision]))


def resolve_device(name: str):
    """--device: auto (CUDA where there is one, else the CPU), cpu, cuda or cuda:N, checked; a torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise LatteError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatteError(f"device {name} asked for, but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LatteError(f"device {name} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def check_compiler(device) -> None:
    """--compile: torch.compile a tiny function on the device now (it needs a C++ compiler on the CPU, Triton on
    CUDA), so that a missing piece is a one-line error here instead of a traceback in the middle of the run."""
    import torch

    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - whatever the compiler stack raises
        raise LatteError(f"--compile: torch.compile does not work here ({type(e).__name__}: "
                         f"{first_line(e)[:200]})") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (the one line an error shows), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Inert:
    """Stands in for a training framework's classes pickled beside the weights (never called)."""

    def __setstate__(self, state):
        pass


def load_torch_file(path: Path, map_location="cpu"):
    """torch.load(weights_only=True): a downloaded file never runs code. What training scripts pickle beside the
    weights loads too: argparse's Namespace of plain values (DiT's training checkpoints keep their "args") and
    PyTorch Lightning's callbacks (sd-v1-4.ckpt), these as inert stand-ins. Anything else is a LatteError saying
    what the file holds (path-free: the caller names the file)."""
    import argparse
    import pickle

    import torch

    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # a zip archive, or a pickle of the old format
        raise LatteError("not a torch.save file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", lambda f: [])(path)
        lightning = [name for name in unsafe if name.startswith(("pytorch_lightning.", "lightning."))]
        others = [name for name in unsafe if name not in lightning and name != "argparse.Namespace"]
        if others or not unsafe:
            found = f" ({', '.join(others[:3])})" if others else ""
            raise LatteError(f"it pickles Python objects{found} that a weights-only load refuses") from e
        with torch.serialization.safe_globals([argparse.Namespace, *((_Inert, name) for name in lightning)]):
            return torch.load(path, map_location=map_location, weights_only=True)


def os_error_line(e: OSError) -> str:
    """An OSError as the one line a user reads: the path and what is wrong with it, not Python's "[Errno 17]"."""
    if e.filename is None or not e.strerror:
        return first_line(e)
    if e.errno == errno.EEXIST:  # (mkdir where a file stands; else whatever exists already)
        reason = "already exists" if os.path.isdir(e.filename) else "a file of that name is in the way of the folder"
    else:
        reason = {errno.ENOTDIR: "a part of this path is a file, not a folder",
                  errno.EISDIR: "a folder, where a file was expected"}.get(e.errno, e.strerror)
    return f"{e.filename}: {reason}"


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary name next to path and rename it to path once the block has written it, so that
    readers see the whole file or none; a failed or interrupted write leaves path untouched. The file gets the
    permissions the umask asks for (safetensors writes 0600 whatever it is)."""
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: folder scans skip it
    try:
        yield tmp
        _umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask_mode(path: Path) -> None:
    try:  # Linux shows the umask without changing it
        mask = int(re.search(r"Umask:\s+(\d+)", Path("/proc/self/status").read_text())[1], 8)
    except (OSError, TypeError):
        mask = os.umask(0o022)
        os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MiB for reuse instead of handing each back to the kernel. By default
    an activation over 128 KiB is a fresh mmap whose pages fault in again on first touch (glibc raises that limit
    only to sizes it has seen freed): a Latte-S/2 training step on the CPU allocates hundreds of them and spent
    5-8% of its time there. True where glibc took
    the settings; elsewhere nothing changes."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_max = libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's most) come from the heap
    trim = libc.mallopt(-1, 1 << 30)       # M_TRIM_THRESHOLD: give the heap's free top back only past 1 GiB
    return mmap_max == trim == 1


class LatteError(Exception):
    """A problem with the user's input (file, checkpoint, data, option). The CLI prints the message on one
    line and exits with code 1, without a traceback."""
