"""latte: the command line and the parts the stages share (diffusion maths, the VAE, video I/O)."""

from contextlib import nullcontext

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --precision -> torch dtype name


def autocast(device_type: str, precision: str):
    """The mixed-precision context of --precision: fp32 runs as it is, bf16 and fp16 under torch.autocast.
    (torch is imported here, not at the top, so that `latte --help` starts without it.)"""
    import torch

    return nullcontext() if precision == "fp32" else torch.autocast(device_type, getattr(torch, PRECISIONS[precision]))


class LatteError(Exception):
    """A problem with the user's input (file, checkpoint, data, option). The CLI prints the message on one
    line and exits with code 1, without a traceback."""
