"""Latte: a latent diffusion transformer for video (Ma et al., 2024), in one file.

Reads top-down like the paper's Fig. 2: helpers (modulate, sin-cos tables, RoPE) -> embedders (patch,
timestep, label) -> attention -> block -> final layer -> Latte -> size presets.

Every design the paper ablates is a config choice:
  variant        1 interleaved spatial/temporal blocks, 2 late fusion, 3 factorised self-attention,
                 4 factorised heads (Sec. 3.2, Fig. 2)
  patch_embed    "uniform" per-frame ViT patches, or "tube" 3D patches with temporal stride (Sec. 3.3.1)
  conditioning   "adaln" (S-AdaLN, adaLN-Zero gates) or "tokens" (timestep and class as tokens) (Sec. 3.3.2)
  temporal_pos   "sincos" absolute table or "rope" inside temporal attention (Sec. 3.3.3)
  num_images     image-video joint training: the last k frames are images that skip everything temporal
                 (Sec. 3.3.5, "Latte+IMG")

Shapes: B batch, F frames (token frames after a tube embedding), C channels, H W latent height and width,
N tokens per frame, K condition tokens, D width, h heads, Dh head width.
The activations stay (B, F, N, D) from embedding to output; spatial attention reads the tensor as
(B F) sequences of N tokens, temporal attention as (B N) sequences of F frames.
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as Fn
import torch.utils.checkpoint
from einops import rearrange

from latte_cli import first_line, kernels, replacing


@dataclass
class LatteConfig:
    input_size: int = 32          # latent H = W the fixed tables are built for (256 px / 8); other sizes work too
    in_channels: int = 4          # latent channels (4 for the SD VAE, 3 in pixel space)
    num_frames: int = 16          # frames the temporal table is built for; other frame counts work too
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28               # number of blocks; variants 1 and 2 count a spatial and a temporal block as two
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 0          # 0: unconditional; else a label table with one extra "null" row for guidance
    learn_sigma: bool = True      # output 2C channels: eps, then the variance interpolation v (improved DDPM)
    variant: int = 1
    patch_embed: str = "uniform"
    tube_stride: int = 2          # temporal stride s of a tube embedding: F frames become F/s token frames
    conditioning: str = "adaln"
    temporal_pos: str = "sincos"
    cond_frames: bool = False     # an extra mask channel marks given frames (long videos: extension, interpolation)

    def __post_init__(self):
        sizes = ("input_size", "in_channels", "num_frames", "patch_size", "hidden_size", "depth", "num_heads",
                 "tube_stride")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.num_classes < 0 or self.mlp_ratio <= 0:
            raise ValueError("num_classes must be 0 or more and mlp_ratio above 0")
        if self.variant not in (1, 2, 3, 4):
            raise ValueError(f"variant must be 1, 2, 3 or 4, not {self.variant}")
        if self.patch_embed not in ("uniform", "tube"):
            raise ValueError(f"patch_embed must be 'uniform' or 'tube', not {self.patch_embed!r}")
        if self.conditioning not in ("adaln", "tokens"):
            raise ValueError(f"conditioning must be 'adaln' or 'tokens', not {self.conditioning!r}")
        if self.temporal_pos not in ("sincos", "rope"):
            raise ValueError(f"temporal_pos must be 'sincos' or 'rope', not {self.temporal_pos!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 2 or (self.temporal_pos == "sincos" and self.hidden_size % 4):
            raise ValueError("the sin-cos tables and RoPE need an even head width and a width divisible by 4")
        if self.variant in (1, 2) and self.depth % 2:
            raise ValueError(f"variants 1 and 2 pair spatial and temporal blocks: depth must be even, not {self.depth}")
        if self.variant == 4 and self.num_heads % 2:
            raise ValueError("variant 4 splits the heads in two halves, so num_heads must be even")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.patch_embed == "tube" and self.num_frames % self.tube_stride:
            raise ValueError(f"num_frames {self.num_frames} is not a multiple of tube_stride {self.tube_stride}")

    @property
    def frame_stride(self) -> int:
        """Frames per token frame: the tube's temporal stride, 1 for uniform patches."""
        return self.tube_stride if self.patch_embed == "tube" else 1

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @staticmethod
    def preset(name: str, **overrides) -> "LatteConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
        kw = dict(PRESETS[name])
        # Variant 3 blocks hold two attentions and a 9-way modulation (25 D^2 weights against 18 D^2), so
        # fewer of them keep the parameter count of variant 1: XL 28 -> 20 blocks (Table 3 compares at ~equal size).
        if overrides.get("variant") == 3 and "depth" not in overrides:
            kw["depth"] = round(kw["depth"] * 18 / 25)
        return LatteConfig(**{**kw, **overrides})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str | dict) -> "LatteConfig":
        d = json.loads(text) if isinstance(text, str) else dict(text)
        known = {f.name for f in fields(LatteConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return LatteConfig(**d)

    def describe(self) -> str:
        return (f"variant {self.variant}, depth {self.depth}, width {self.hidden_size}, patch {self.patch_size}, "
                f"{self.patch_embed}, {self.conditioning}, {self.temporal_pos}, "
                f"{self.num_classes or 'no'} classes")


# ------------------------------------------------------------------------------------------------ helpers

def modulate(norm, x, shift, scale):
    """adaLN (DiT): norm(x) (1 + scale) + shift; shift None: norm(x) alone (a pre-LN block). On the CPU (bf16 or
    fp32) kernels.c computes LayerNorm and modulation in one pass, and the backward in one."""
    if shift is None:
        return norm(x)
    if norm.weight is None and kernels.adaln_fits(x, shift):
        return kernels.norm_modulate(x, shift, scale, norm.eps)
    return torch.addcmul(shift, norm(x), 1 + scale)


def gated(x, gate, branch):
    """The residual x + gate * branch in one pass (adaLN-Zero); gate None: the plain x + branch. (kernels.c: the
    backward in one pass too.)"""
    if gate is None:
        return x + branch
    if kernels.adaln_fits(x, gate, branch):
        return kernels.gated_residual(x, gate, branch)
    return torch.addcmul(x, gate, branch)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE/DiT sin-cos table: (len(pos), dim) = [sin(pos w), cos(pos w)], w = 10000^(-2i/dim), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double().reshape(-1, 1) * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """(h*w, dim), row-major tokens; the first half encodes the column, the second the row (as DiT's table)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def rope_tables(length: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_dim) for rotary embeddings over frame positions (RoFormer, base 10000)."""
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv                  # (F, Dh/2)
    ang = torch.cat([ang, ang], dim=1)                                               # (F, Dh)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def apply_rope(x, cos, sin):
    """x (..., F, Dh): rotate each pair (x_i, x_{i+Dh/2}) by the frame's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


# ---------------------------------------------------------------------------------------------- embedders

class PatchEmbed(nn.Module):
    """uniform: each frame cut into p x p patches (a Conv2d, as ViT); tube: s x p x p tubes (a Conv3d)."""

    def __init__(self, cfg: LatteConfig, in_channels: int):
        super().__init__()
        self.tube = cfg.patch_embed == "tube"
        self.stride = cfg.frame_stride
        p, s, D = cfg.patch_size, self.stride, cfg.hidden_size
        self.proj = nn.Conv3d(in_channels, D, (s, p, p), (s, p, p)) if self.tube else nn.Conv2d(in_channels, D, p, p)

    def forward(self, x, num_images: int = 0):
        """Tokens come out contiguous in (B, F, N, D) order: the residual stream keeps the layout it starts
        with, and every later layer reads it as rows of D."""
        B, F = x.shape[:2]
        if not self.tube:
            x = self.proj(x.flatten(0, 1))                                           # (B F) D h w
            return rearrange(x, "(b f) d h w -> b f (h w) d", b=B).contiguous()
        video, images = x[:, : F - num_images], x[:, F - num_images:]
        x = self.proj(video.transpose(1, 2))                                         # B D F/s h w
        x = rearrange(x, "b d f h w -> b f (h w) d")
        if num_images:  # an image is a still tube: s copies of itself
            img = images.flatten(0, 1)[:, :, None].expand(-1, -1, self.stride, -1, -1)  # (B k) C s H W
            img = rearrange(self.proj(img), "(b k) d 1 h w -> b k (h w) d", b=B)
            x = torch.cat([x, img], dim=1)
        return x.contiguous()                                                        # B F N D


class TimestepEmbedder(nn.Module):
    """t -> [cos(t w), sin(t w)] over 256 frequencies -> MLP (DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row num_classes is the null class that classifier-free guidance uses
    (training replaces labels by it at random, train.py's label dropout)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


# ---------------------------------------------------------------------------------------------- attention

class Attention(nn.Module):
    """Multi-head self-attention over one axis of (B, F, N, D): "spatial" (the N tokens of a frame),
    "temporal" (the F frames at a position) or "split" (variant 4: half the heads each way).
    Each head computes softmax(q k^T / sqrt(Dh)) v; kernels.attention picks the kernel (torch's fused one reads q, k
    and v in place, as strided views into the one qkv output)."""

    def __init__(self, dim: int, heads: int, axis: str):
        super().__init__()
        self.heads, self.axis = heads, axis
        self.qkv = kernels.Linear(dim, 3 * dim)
        self.proj = kernels.Linear(dim, dim)

    def forward(self, x, rope=None, num_images: int = 0):
        B, F, N, D = x.shape
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, D // self.heads))           # B F N 3 h Dh
        if self.axis == "spatial":
            return self.proj(self.spatial(qkv).flatten(3))
        if self.axis == "temporal":  # proj runs in the (B, N, F) order the kernel writes; the caller's add undoes it
            return self.proj(self.temporal(qkv, rope).flatten(3)).transpose(1, 2)
        # split heads: concatenating the halves before proj = proj_s(out_s) + proj_t(out_t), Fig. 2(d)
        if rope is None and not num_images and kernels.split_head_attention_fits(qkv):  # halves in place, no cats
            return self.proj(kernels.split_head_attention(qkv).flatten(3))
        h, Fv = self.heads // 2, F - num_images
        qkv_s, qkv_t = qkv.split(h, dim=4)  # (its gradient: one cat; two slices would each fill zeros first)
        out_s = self.spatial(qkv_s)                                                  # B F N h/2 Dh
        out_t = self.temporal(qkv_t[:, :Fv] if num_images else qkv_t, rope).transpose(1, 2)  # B Fv N h/2 Dh
        if num_images:  # Latte 3.3.5: an image attends over frames to itself alone, which returns v
            out_t = torch.cat([out_t, qkv_t[:, Fv:, :, 2]], dim=1)
        return self.proj(torch.cat([out_s, out_t], dim=3).flatten(3))

    @staticmethod
    def spatial(qkv):                                                                # B F N 3 h Dh
        B = qkv.shape[0]
        out = kernels.packed_attention(rearrange(qkv, "b f n t h d -> t (b f) h n d"))  # (B F) h N Dh
        return rearrange(out, "(b f) h n d -> b f n h d", b=B)

    @staticmethod
    def temporal(qkv, rope):                                                         # B F N 3 h Dh
        B = qkv.shape[0]
        qkv = rearrange(qkv, "b f n t h d -> t (b n) h f d")                         # frames attend
        if rope is None:
            out = kernels.packed_attention(qkv)                                      # (B N) h F Dh
        else:
            q, k, v = qkv.unbind(0)
            out = kernels.attention(apply_rope(q, *rope), apply_rope(k, *rope), v)
        return rearrange(out, "(b n) h f d -> b n f h d", b=B)                       # B N F h Dh


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = kernels.Linear(dim, hidden), kernels.Linear(hidden, dim)

    def forward(self, x):  # GELU in its tanh form (DiT); kernels.linear_gelu computes it faster on the CPU
        return self.fc2(kernels.linear_gelu(self.fc1, x))


# ------------------------------------------------------------------------------------------------- block

class Block(nn.Module):
    """One block class for every variant. kind: "spatial" or "temporal" (variants 1, 2), "factorised"
    (variant 3: spatial attention, temporal attention, MLP) or "split" (variant 4: split-head attention, MLP).
    adaln: each sub-layer's LayerNorm is modulated by (shift, scale) and its residual branch scaled by a gate,
    all regressed from the condition (S-AdaLN, Sec. 3.3.2); tokens: plain pre-LN block."""

    def __init__(self, cfg: LatteConfig, kind: str):
        super().__init__()
        D, self.kind, self.adaln = cfg.hidden_size, kind, cfg.conditioning == "adaln"
        axis = {"spatial": "spatial", "temporal": "temporal", "factorised": "spatial", "split": "split"}[kind]
        norm = lambda: nn.LayerNorm(D, elementwise_affine=not self.adaln, eps=1e-6)
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(D, cfg.num_heads, axis)
        if kind == "factorised":
            self.norm_temporal = norm()
            self.attn_temporal = Attention(D, cfg.num_heads, "temporal")
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        if self.adaln:
            n_mod = 9 if kind == "factorised" else 6
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, n_mod * D))

    def forward(self, x, c, rope=None, num_images: int = 0):
        """x (B, F, N, D); c (B, D) the condition; the last num_images frames are images."""
        if self.kind == "temporal" and num_images:  # Latte 3.3.5: appended images skip temporal blocks
            video = self.forward(x[:, : x.shape[1] - num_images], c, rope)
            return torch.cat([video, x[:, video.shape[1]:]], dim=1)
        if self.adaln:
            mods = self.adaLN_modulation(c)[:, None, None].chunk(9 if self.kind == "factorised" else 6, dim=-1)
        else:
            mods = (None,) * 9  # a pre-LN block: no modulation, no gates
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[:6]
        x = gated(x, gate_a, self.attn(modulate(self.norm1, x, shift_a, scale_a), rope, num_images))
        if self.kind == "factorised":
            shift_t, scale_t, gate_t = mods[6:]
            Fv = x.shape[1] - num_images
            video = x[:, :Fv]
            branch = self.attn_temporal(modulate(self.norm_temporal, video, shift_t, scale_t), rope)
            video = gated(video, gate_t, branch)
            x = torch.cat([video, x[:, Fv:]], dim=1) if num_images else video
        return gated(x, gate_m, self.mlp(modulate(self.norm2, x, shift_m, scale_m)))


class FinalLayer(nn.Module):
    """LayerNorm (modulated under adaln) and a linear map from each token to its p x p x C_out patch."""

    def __init__(self, cfg: LatteConfig):
        super().__init__()
        D, p = cfg.hidden_size, cfg.patch_size
        self.adaln = cfg.conditioning == "adaln"
        self.norm_final = nn.LayerNorm(D, elementwise_affine=not self.adaln, eps=1e-6)
        self.linear = nn.Linear(D, p * p * cfg.out_channels)
        if self.adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift = scale = None
        if self.adaln:
            shift, scale = self.adaLN_modulation(c)[:, None, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final, x, shift, scale))


# ------------------------------------------------------------------------------------------------- Latte

def block_plan(variant: int, depth: int) -> list[str]:
    """The per-block kinds that Fig. 2 draws for each variant."""
    if variant == 1:
        return ["spatial", "temporal"] * (depth // 2)
    if variant == 2:
        return ["spatial"] * (depth // 2) + ["temporal"] * (depth // 2)
    return ["factorised" if variant == 3 else "split"] * depth


class Latte(nn.Module):
    def __init__(self, config: LatteConfig):
        super().__init__()
        cfg = self.config = config
        D, C_in = cfg.hidden_size, cfg.in_channels + int(cfg.cond_frames)
        self.x_embedder = PatchEmbed(cfg, C_in)
        self.t_embedder = TimestepEmbedder(D)
        if cfg.num_classes:
            self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        # Fixed sin-cos tables for the configured shape, kept in the state dict under the published names;
        # other shapes get tables made on the fly.
        n = cfg.input_size // cfg.patch_size
        self.register_buffer("pos_embed", sincos_2d(D, n, n).float()[None])                   # 1 N D
        frames = cfg.num_frames // cfg.frame_stride
        self.register_buffer("temp_embed", sincos_1d(D, torch.arange(frames)).float()[None])  # 1 F D
        self.plan = block_plan(cfg.variant, cfg.depth)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in self.plan)
        # the temporal positions enter once, before the first block that mixes frames (published: after block 0)
        self.first_temporal = next(i for i, k in enumerate(self.plan) if k != "spatial")
        self.final_layer = FinalLayer(cfg)
        if cfg.patch_embed == "tube":  # Sec. 3.3.1: a 3D transposed conv brings F/s token frames back to F
            s = cfg.tube_stride
            self.temporal_upsample = nn.ConvTranspose3d(cfg.out_channels, cfg.out_channels, (s, 1, 1), (s, 1, 1))
        self.gradient_checkpointing = False  # recompute each block in the backward pass: less memory, ~1/3 more time
        self.initialize_weights()

    def initialize_weights(self):
        # transformer linears: Xavier uniform, zero bias (DiT)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # patch embedding: like a linear layer over the flattened patch
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # timestep MLP and label table: N(0, 0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.config.num_classes:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # adaLN-Zero: gates start at 0 so each block starts as the identity; output starts at 0 (DiT)
        for m in [*self.blocks, self.final_layer]:
            if hasattr(m, "adaLN_modulation"):
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # tube output: the transposed conv starts as nearest-neighbour upsampling in time
        if hasattr(self, "temporal_upsample"):
            w = self.temporal_upsample.weight                                        # C_out C_out s 1 1
            with torch.no_grad():
                w.zero_()
                w[:, :, :, 0, 0] = torch.eye(w.shape[0])[:, :, None]
            nn.init.zeros_(self.temporal_upsample.bias)

    # -------------------------------------------------------------------------------------------- forward

    def forward(self, x, t, y=None, num_images: int = 0, mask=None):
        """x (B, F, C, H, W) noisy latents; t (B,) timesteps; y (B,) labels (None: the null class);
        num_images: the last k frames are independent images (joint training);
        mask (B, F) with 1 on given frames, for a model with cond_frames.
        Returns (B, F, 2C, H, W) with learn_sigma (eps, then v), else (B, F, C, H, W)."""
        cfg = self.config
        B, F, C, H, W = x.shape
        if C != cfg.in_channels:
            raise ValueError(f"the model takes {cfg.in_channels} latent channels, the input has {C}")
        if not 0 <= num_images < F:
            raise ValueError(f"num_images must be in [0, {F}), not {num_images}")
        s = cfg.frame_stride
        if (F - num_images) % s:
            raise ValueError(f"{F - num_images} video frames do not divide into tubes of {s}")
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
        if cfg.cond_frames:
            m = torch.zeros(B, F, device=x.device, dtype=x.dtype) if mask is None else mask.to(x.dtype)
            x = torch.cat([x, m[:, :, None, None, None].expand(B, F, 1, H, W)], dim=2)

        x = self.x_embedder(x, num_images)                                           # B F N D
        x = x + self.spatial_table(H // p, W // p, x)
        c = t_emb = self.t_embedder(t)                                               # B D
        if cfg.num_classes:
            y = torch.full((B,), cfg.num_classes, device=x.device, dtype=torch.long) if y is None else y
            y_emb = self.y_embedder(y)
            c = t_emb + y_emb
        Fv = x.shape[1] - num_images                                                 # token frames of video
        rope = rope_tables(Fv, cfg.hidden_size // cfg.num_heads, x.device) if cfg.temporal_pos == "rope" else None
        K = 0
        if cfg.conditioning == "tokens":  # Sec. 3.3.2 "all tokens": t (and y) join every frame's tokens
            cond = torch.stack([t_emb, y_emb] if cfg.num_classes else [t_emb], dim=1)  # B K D
            K = cond.shape[1]
            x = torch.cat([cond[:, None].expand(B, x.shape[1], K, -1).to(x.dtype), x], dim=2)  # B F K+N D

        for i, block in enumerate(self.blocks):
            if i == self.first_temporal and cfg.temporal_pos == "sincos":
                x = x + self.temporal_table(Fv, num_images, x)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, rope, num_images, use_reentrant=False)
            else:
                x = block(x, c, rope, num_images)

        x = self.final_layer(x[:, :, K:], c)                                         # B F N p*p*C_out
        x = rearrange(x, "b f (h w) (p q c) -> b f c (h p) (w q)", h=H // p, p=p, q=p)
        if cfg.patch_embed == "tube":
            x = self.upsample_time(x, num_images, s)
        return x

    def spatial_table(self, h, w, like):
        if self.pos_embed.shape[1] == h * w and h == w:
            return self.pos_embed.to(like.dtype)
        return sincos_2d(self.config.hidden_size, h, w).to(like)[None]

    def temporal_table(self, Fv, num_images, like):
        table = self.temp_embed
        if table.shape[1] != Fv:
            table = sincos_1d(self.config.hidden_size, torch.arange(Fv))[None]
        table = table.to(like)[:, :, None]                                           # 1 Fv 1 D
        return Fn.pad(table, (0, 0, 0, 0, 0, num_images)) if num_images else table   # images: no frame position

    def upsample_time(self, x, num_images, s):
        Fv = x.shape[1] - num_images
        video = self.temporal_upsample(x[:, :Fv].transpose(1, 2)).transpose(1, 2)    # B F C H W
        if not num_images:
            return video
        images = self.temporal_upsample(x[:, Fv:].flatten(0, 1)[:, :, None])         # (B k) C s H W
        images = images.mean(dim=2).unflatten(0, (x.shape[0], num_images))          # B k C H W
        return torch.cat([video, images], dim=1)

    # ------------------------------------------------------------------------------------------ accounting

    def flops(self, frames: int | None = None, batch: int = 1, num_images: int = 0,
              per_token_adaln: bool = False) -> int:
        """Forward FLOPs (2 per multiply-add) of every matmul, convolution and attention product; norms,
        activations and additions are left out (under 1% at every preset). The adaLN linear layers run once
        per clip here; per_token_adaln counts them once per token, as the published code evaluates them (it
        repeats the condition for every token), which is how the paper's Table 3 counts."""
        cfg = self.config
        frames = frames or cfg.num_frames
        s = cfg.frame_stride
        D, p, Cin = cfg.hidden_size, cfg.patch_size, cfg.in_channels + int(cfg.cond_frames)
        N = (cfg.input_size // p) ** 2 + (2 if cfg.num_classes else 1) * (cfg.conditioning == "tokens")
        Fv = (frames - num_images) // s
        F = Fv + num_images
        T = F * N                                                  # tokens of one sample
        mlp = int(D * cfg.mlp_ratio)
        linear = lambda rows, i, o: 2 * rows * i * o
        attn = lambda seqs, length, width: 2 * 2 * seqs * length * length * width  # q k^T and a v
        total = linear(T, Cin * s * p * p, D) + linear(1, 256, D) + linear(1, D, D)
        for kind in self.plan:
            rows = Fv * N if kind == "temporal" else T
            total += linear(rows, D, 3 * D) + linear(rows, D, D) + linear(rows, D, mlp) + linear(rows, mlp, D)
            if kind in ("spatial", "factorised"):
                total += attn(F, N, D)
            if kind in ("temporal", "factorised"):
                total += attn(N, Fv, D)
            if kind == "factorised":
                total += linear(Fv * N, D, 3 * D) + linear(Fv * N, D, D)
            if kind == "split":
                total += attn(F, N, D // 2) + attn(N, Fv, D // 2)
            if cfg.conditioning == "adaln":
                total += linear(T if per_token_adaln else 1, D, (9 if kind == "factorised" else 6) * D)
        if cfg.conditioning == "adaln":
            total += linear(T if per_token_adaln else 1, D, 2 * D)
        total += linear(T, D, p * p * cfg.out_channels)
        if cfg.patch_embed == "tube":
            total += linear(frames * (cfg.input_size) ** 2, cfg.out_channels, cfg.out_channels)
        return batch * total

    # ----------------------------------------------------------------------------------------- checkpoints

    def save(self, path: str | Path, state_dict: dict | None = None, extra: dict | None = None):
        """Weights and config in one safetensors file (tensors and plain values only), written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        meta = {"latte_config": self.config.to_json(), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
        with replacing(path) as tmp:
            save_file(sd, str(tmp), metadata=meta)

    @staticmethod
    def from_pretrained(path: str | Path, num_heads: int | None = None, map_location="cpu", **overrides) -> "Latte":
        """Load one of our checkpoints (a .safetensors file, or a training run's step folder: EMA weights) or a
        published Latte .pt (a torch.save dict with the state dict under "ema" or "model"); the configuration
        comes from our metadata, or is inferred from the published tensors."""
        sd, meta = read_checkpoint(path, map_location)
        cfg = LatteConfig.from_json(meta["latte_config"]) if "latte_config" in meta else infer_config(sd, num_heads)
        if overrides:
            cfg = LatteConfig(**{**asdict(cfg), **overrides})
        model = Latte(cfg)
        model.load_weights(sd, source=str(checkpoint_file(path)))
        return model

    def add_mask_channel(self, sd: dict) -> dict:
        """sd, with a zero mask channel added to its patch embedding where this model has one and sd lacks it: a
        model trained without given frames starts one trained with them exactly as it was."""
        w, own = sd.get("x_embedder.proj.weight"), self.x_embedder.proj.weight
        if w is not None and self.config.cond_frames and w.ndim == own.ndim and w.shape[1] + 1 == own.shape[1]:
            sd = {**sd, "x_embedder.proj.weight": torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)}
        return sd

    def load_weights(self, sd: dict, source: str = "state dict"):
        """Strict load; a mask-channel model accepts weights without the mask channel (it starts at zero)."""
        from latte_cli import LatteError

        own = self.state_dict()
        sd = self.add_mask_channel(sd)
        missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
        if missing or unexpected:
            what = (f"missing {sorted(missing)[:3]}" if missing else "") + (" " if missing and unexpected else "")
            what += f"unexpected {sorted(unexpected)[:3]}" if unexpected else ""
            raise LatteError(f"{source} does not fit the model: {what}")
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise LatteError(f"{source}: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
        self.load_state_dict(sd, strict=True)


def checkpoint_file(path: str | Path) -> Path:
    """The weight file of a checkpoint: the file itself, or in a training step folder the EMA weights."""
    from latte_cli import LatteError

    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("ema.safetensors", "model.safetensors") if (path / n).exists()]
        if not found:
            raise LatteError(f"{path} holds no ema.safetensors or model.safetensors")
        path = found[0]
    if not path.exists():
        raise LatteError(f"checkpoint {path} does not exist")
    return path


def read_checkpoint(path: str | Path, map_location="cpu") -> tuple[dict, dict]:
    """(state dict, metadata) of our safetensors checkpoints or of a torch.save file (the published Latte and
    DiT ones: the state dict itself or under "ema", "model" or "state_dict"; DDP and compile prefixes dropped)."""
    from latte_cli import LatteError, load_torch_file

    path = checkpoint_file(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            return load_file(str(path), device=str(map_location)), meta
        except Exception as e:
            raise LatteError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        sd = load_torch_file(path, map_location)
    except LatteError as e:
        raise LatteError(f"{path} is not a readable torch checkpoint: {e}") from None
    except Exception as e:
        raise LatteError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
                         f"{first_line(e)[:160]})") from None
    if isinstance(sd, dict):
        sd = sd.get("ema", sd.get("model", sd.get("state_dict", sd)))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LatteError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}, {}


def infer_config(sd: dict, num_heads: int | None = None) -> LatteConfig:
    """A published checkpoint's configuration from its tensors (variant 1, uniform patches, S-AdaLN, sin-cos)."""
    from latte_cli import LatteError

    for k in ("x_embedder.proj.weight", "pos_embed", "temp_embed", "final_layer.linear.weight",
              "blocks.0.mlp.fc1.weight"):
        if k not in sd:
            raise LatteError(f"not a Latte checkpoint: no tensor named {k}")
    w = sd["x_embedder.proj.weight"]
    D, C, p = w.shape[0], w.shape[1], w.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or next((v["num_heads"] for v in PRESETS.values() if v["hidden_size"] == D), None)
    if heads is None:
        raise LatteError(f"width {D} matches no preset; pass the number of attention heads")
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    y = sd.get("y_embedder.embedding_table.weight")
    return LatteConfig(
        input_size=math.isqrt(sd["pos_embed"].shape[1]) * p, in_channels=C, num_frames=sd["temp_embed"].shape[1],
        patch_size=p, hidden_size=D, depth=depth, num_heads=heads,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D, num_classes=0 if y is None else y.shape[0] - 1,
        learn_sigma=out == 2 * C,
    )


# ------------------------------------------------------------------------------------------------ presets

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # Table 4
PRESETS = {f"Latte-{name}/{p}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=p)
           for name, (depth, width, heads) in SIZES.items() for p in (2, 4, 8)}
