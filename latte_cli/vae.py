"""Stable Diffusion 1.4's autoencoder (KL-f8, Rombach et al. 2022), ported compactly, and its weight loading.

Latte encodes every frame on its own with this image VAE and denoises the stack of latents. The module
and parameter names are those of the original LDM release (`first_stage_model.*` in sd-v1-4.ckpt), so
that file loads by name; `convert_state_dict` renames the diffusers layouts onto them.
`--vae none` gives `PixelSpace`, the identity, so that everything runs where no weight file exists.

Shapes: T frames, C channels, H W pixel size, h w latent size (H/8, W/8 for SD-1.4).
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import Tensor, nn

from latte_cli import PRECISIONS, LatteError, autocast, first_line, load_torch_file


@dataclass(frozen=True)
class VAEConfig:
    channels: tuple[int, ...] = (128, 256, 512, 512)  # width of each level; H and W halve between levels
    layers: int = 2  # resnet blocks per level in the encoder; the decoder has one more
    groups: int = 32  # GroupNorm groups
    latent_channels: int = 4


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions; q, k, v and the output are 1x1 convs as in LDM."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "t c h w -> t (h w) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(rearrange(h, "t (h w) c -> t c h w", h=x.shape[2]))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only, then strides unpadded


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1 = ResnetBlock(channels, channels, groups), AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


def level(cin: int, cout: int, layers: int, groups: int, resample: type[nn.Module] | None, name: str):
    """One resolution level: `layers` resnet blocks, then the resampler (if any) under LDM's name for it."""
    lvl = nn.Module()
    lvl.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers))
    if resample is not None:
        setattr(lvl, name, resample(cout))
    return lvl


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.channels, cfg.groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            level(ch[max(i - 1, 0)], ch[i], cfg.layers, g, Downsample if i < n - 1 else None, "downsample")
            for i in range(n)
        )
        self.mid = mid_block(ch[-1], g)
        self.norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:  # (T, 3, H, W) -> (T, 2 * latent, h, w)
        x = self.conv_in(x)
        for lvl in self.down:
            for block in lvl.block:
                x = block(x)
            if hasattr(lvl, "downsample"):
                x = lvl.downsample(x)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.channels, cfg.groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = mid_block(ch[-1], g)
        # up[i] works at the resolution of down[i], so it is run from the last level back to the first
        self.up = nn.ModuleList(
            level(ch[min(i + 1, n - 1)], ch[i], cfg.layers + 1, g, Upsample if i > 0 else None, "upsample")
            for i in range(n)
        )
        self.norm_out = group_norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # (T, latent, h, w) -> (T, 3, H, W)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            for block in lvl.block:
                x = block(x)
            if hasattr(lvl, "upsample"):
                x = lvl.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    """encode: frames in [-1, 1] -> latents scaled to about unit variance; decode: back. Both run without
    gradients, `chunk` frames at a time (memory stays bounded for long clips), and return float32 on the
    input's device. decode does not clamp: callers clamp to [-1, 1] before writing pixels."""

    scaling_factor: float = 0.18215  # the latents' scale in SD-1.x, so that they have about unit variance

    def __init__(self, cfg: VAEConfig = VAEConfig(), name: str = "AutoencoderKL"):
        super().__init__()
        self.cfg, self.name = cfg, name
        self.latent_channels, self.downsample = cfg.latent_channels, 2 ** (len(cfg.channels) - 1)
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        # channels-last (NHWC) convolutions are the fast path of oneDNN (several times faster in bf16 on CPUs
        # with AMX) and of cuDNN's tensor cores; the frames are converted chunk by chunk in _chunks
        self.to(memory_format=torch.channels_last)

    def _chunks(self, x: Tensor, fn: Callable[[Tensor], Tensor], chunk: int, precision: str) -> Tensor:
        if precision not in PRECISIONS:
            raise LatteError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        p = next(self.parameters())
        outs = []
        with torch.no_grad(), autocast(p.device.type, precision):
            for c in x.split(max(chunk, 1)):
                c = c.to(p.device, p.dtype, memory_format=torch.channels_last)
                outs.append(fn(c).to(x.device, torch.float32, memory_format=torch.contiguous_format))
        return torch.cat(outs)

    def encode(self, frames: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               chunk: int = 8, precision: str = "fp32") -> Tensor:  # (T, 3, H, W) -> (T, latent, h, w)
        check_frames(frames, self.downsample)
        moments = self._chunks(frames, lambda x: self.quant_conv(self.encoder(x)), chunk, precision)
        mean, logvar = moments.chunk(2, dim=1)
        if sample:  # from the posterior N(mean, exp(logvar)), one draw for all frames whatever chunk is
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        return self.scaling_factor * mean

    def decode(self, latents: Tensor, chunk: int = 8, precision: str = "fp32") -> Tensor:
        z = latents / self.scaling_factor  # (T, latent, h, w) -> (T, 3, H, W)
        return self._chunks(z, lambda x: self.decoder(self.post_quant_conv(x)), chunk, precision)


class PixelSpace(nn.Module):
    """The `none` VAE: frames are their own latents (3 channels in [-1, 1], scale 1, no downsampling)."""

    latent_channels, downsample, scaling_factor, name = 3, 1, 1.0, "none"

    def encode(self, frames: Tensor, sample: bool = False, generator: torch.Generator | None = None,
               chunk: int = 8, precision: str = "fp32") -> Tensor:
        check_frames(frames, 1)
        return frames.float()

    def decode(self, latents: Tensor, chunk: int = 8, precision: str = "fp32") -> Tensor:
        return latents.float()


def check_frames(frames: Tensor, downsample: int) -> None:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise LatteError(f"frames must have shape (T, 3, H, W), got {tuple(frames.shape)}")
    if frames.shape[2] % downsample or frames.shape[3] % downsample:
        raise LatteError(f"frame size {frames.shape[2]}x{frames.shape[3]} is not divisible by {downsample}")


# ------------------------------------------------------------------------------------------- weights


def convert_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> this port's names (LDM's). Unknown keys pass through, for the strict load."""
    # LDM, a whole Stable Diffusion checkpoint (sd-v1-4.ckpt): keep the autoencoder, drop UNet and text model
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    # LDM training leftovers that some autoencoder files carry: the LPIPS/GAN loss and the EMA bookkeeping
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    # diffusers (current to_q/to_k/to_v/to_out.0 or older query/key/value/proj_attn attention names):
    # up_blocks count from the coarsest level while LDM's up[i] is named after the level, so reverse them
    ups = [int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    levels = max(ups, default=-1) + 1
    renames = [
        (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."), (r"\.group_norm\.", ".norm."),
        (r"down_blocks\.(\d+)\.", r"down.\1."),
        (r"up_blocks\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}."),
        (r"\.resnets\.", ".block."), (r"\.downsamplers\.0\.", ".downsample."),
        (r"\.upsamplers\.0\.", ".upsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."), (r"conv_norm_out\.", "norm_out."),
        (r"\.(to_q|query)\.", ".q."), (r"\.(to_k|key)\.", ".k."), (r"\.(to_v|value)\.", ".v."),
        (r"\.(to_out\.0|proj_attn)\.", ".proj_out."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        # diffusers keeps the attention projections as linear layers; LDM as 1x1 convs
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out


def find_weights(path: Path) -> Path:
    """A weight file, or a folder holding diffusers' file (directly or in a `vae/` subfolder)."""
    if path.is_file():
        return path
    if path.is_dir():
        for sub in ("", "vae"):
            for ext in ("safetensors", "bin"):
                if (f := path / sub / f"diffusion_pytorch_model.{ext}").is_file():
                    return f
        raise LatteError(f"no diffusion_pytorch_model.safetensors or .bin in {path} or {path / 'vae'}")
    raise LatteError(f"VAE weights not found: {path}")


def read_state_dict(file: Path) -> dict[str, Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        sd = load_torch_file(file)
    except Exception as e:
        raise LatteError(f"cannot read VAE weights {file}: {first_line(e)}") from e
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd  # LDM .ckpt files wrap it with the step
    if not isinstance(sd, dict):
        raise LatteError(f"{file} does not hold a state dict")
    return sd


def load_vae(path: str | Path | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             cfg: VAEConfig = VAEConfig()) -> AutoencoderKL | PixelSpace:
    """None or "none" -> PixelSpace; else the KL autoencoder from a file or folder in any supported layout,
    in eval mode. Strict: any missing or unexpected weight is an error naming it."""
    if path is None or str(path) == "none":
        return PixelSpace()
    path = Path(path).expanduser().resolve()
    file = find_weights(path)
    config = file.parent / "config.json"  # diffusers' folders say which VAE they hold (SDXL's has SD-1's shapes)
    if config.is_file():
        try:
            scale = json.loads(config.read_text()).get("scaling_factor", AutoencoderKL.scaling_factor)
        except (ValueError, AttributeError):
            scale = AutoencoderKL.scaling_factor
        if abs(scale - AutoencoderKL.scaling_factor) > 1e-6:
            raise LatteError(f"{config}: scaling_factor {scale}: not Stable Diffusion 1's VAE, whose latents this "
                             f"port scales by {AutoencoderKL.scaling_factor}")
    sd = convert_state_dict(read_state_dict(file))
    model = AutoencoderKL(cfg, name=file.relative_to(path.parent).as_posix())
    want = model.state_dict()
    for problem, keys in (("missing", want.keys() - sd.keys()), ("unexpected", sd.keys() - want.keys())):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise LatteError(f"{file}: {problem} VAE weight {sorted(keys)[0]!r} (LDM name){more}")
    for key, value in sd.items():
        if not isinstance(value, Tensor) or value.shape != want[key].shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise LatteError(f"{file}: VAE weight {key!r} has shape {shape}, not {tuple(want[key].shape)}")
    model.load_state_dict(sd)
    return model.to(device=device, dtype=dtype).eval()
