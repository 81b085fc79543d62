"""model.py against Table 4, an independent re-statement of the published forward pass, torch's own FLOP
counter, and the invariants the paper states (images skip the temporal parts, RoPE is relative)."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from einops import rearrange, repeat
from typer.testing import CliRunner

from latte_cli import LatteError
from model import Latte, LatteConfig, apply_rope, rope_tables, sincos_2d


def tiny(**kw) -> LatteConfig:
    base = dict(input_size=8, in_channels=3, num_frames=4, patch_size=2, hidden_size=32, depth=2, num_heads=4)
    return LatteConfig(**{**base, **kw})


def randomize(model: nn.Module, seed: int = 0):
    """Non-zero values everywhere (adaLN-Zero and the zero output layer would hide wiring mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


COMBOS = list(itertools.product((1, 2, 3, 4), ("uniform", "tube"), ("adaln", "tokens"), ("sincos", "rope"),
                                (0, 5), (0, 2)))


@pytest.mark.parametrize("variant,patch_embed,conditioning,temporal_pos,num_classes,num_images", COMBOS)
def test_every_combination_runs_and_trains(variant, patch_embed, conditioning, temporal_pos, num_classes, num_images):
    torch.manual_seed(0)
    cfg = tiny(variant=variant, patch_embed=patch_embed, conditioning=conditioning, temporal_pos=temporal_pos,
               num_classes=num_classes)
    model = Latte(cfg)
    x = torch.randn(2, 4 + num_images, 3, 8, 8)
    t = torch.tensor([3, 700])
    y = torch.tensor([1, 4]) if num_classes else None
    out = model(x, t, y, num_images=num_images)
    assert out.shape == (2, 4 + num_images, 6, 8, 8)
    assert torch.isfinite(out).all()
    target = torch.randn_like(out)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss0 = ((model(x, t, y, num_images=num_images) - target) ** 2).mean()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = ((model(x, t, y, num_images=num_images) - target) ** 2).mean()
    assert loss1 < loss0


def test_fixed_sigma_output_channels():
    out = Latte(tiny(learn_sigma=False))(torch.randn(1, 4, 3, 8, 8), torch.tensor([5]))
    assert out.shape == (1, 4, 3, 8, 8)


TABLE4 = {"Latte-S/2": 32_480_672, "Latte-B/2": 129_547_040, "Latte-L/2": 456_815_648, "Latte-XL/2": 673_681_568}


@pytest.mark.parametrize("name", TABLE4)
def test_parameter_counts_match_table4(name):
    for variant in (1, 2):
        with torch.device("meta"):
            model = Latte(LatteConfig.preset(name, variant=variant))
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TABLE4[name]


def test_variants_3_and_4_stay_near_table3():
    for variant, paper in ((3, 676.33e6), (4, 676.44e6)):
        with torch.device("meta"):
            model = Latte(LatteConfig.preset("Latte-XL/2", variant=variant))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - paper) / paper < 0.015


@pytest.mark.parametrize("variant,patch_embed,conditioning,temporal_pos", [c[:4] for c in COMBOS if c[4:] == (0, 0)])
def test_joint_training_keeps_images_and_video_apart(variant, patch_embed, conditioning, temporal_pos):
    cfg = tiny(variant=variant, patch_embed=patch_embed, conditioning=conditioning, temporal_pos=temporal_pos,
               num_classes=3)
    model = randomize(Latte(cfg)).eval()
    t, y, k = torch.tensor([10, 500]), torch.tensor([0, 2]), 3
    x = torch.randn(2, 4 + k, 3, 8, 8)
    x_new_images, x_new_video = x.clone(), x.clone()
    x_new_images[:, 4:] = torch.randn(2, k, 3, 8, 8)
    x_new_video[:, :4] = torch.randn(2, 4, 3, 8, 8)
    with torch.no_grad():
        out, out_i, out_v = (model(z, t, y, num_images=k) for z in (x, x_new_images, x_new_video))
    assert torch.allclose(out[:, :4], out_i[:, :4], atol=1e-5), "images leaked into the video frames"
    assert torch.allclose(out[:, 4:], out_v[:, 4:], atol=1e-5), "the video leaked into the images"
    assert not torch.allclose(out[:, 4:], out_i[:, 4:], atol=1e-3)  # the images' outputs do depend on them
    # each image is independent of the other images too
    x_one = x.clone()
    x_one[:, 4] = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out_one = model(x_one, t, y, num_images=k)
    assert torch.allclose(out[:, 5:], out_one[:, 5:], atol=1e-5)


def test_frame_count_and_size_follow_the_input():
    model = randomize(Latte(tiny())).eval()
    for shape in ((1, 8, 3, 8, 8), (1, 2, 3, 12, 8)):
        assert model(torch.randn(shape), torch.tensor([1])).shape == (shape[0], shape[1], 6, *shape[3:])


def test_bad_input_is_a_clear_error():
    model = Latte(tiny(patch_embed="tube"))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="tubes"):
        model(torch.randn(1, 3, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="depth must be even"):
        tiny(depth=3)
    with pytest.raises(ValueError, match="unknown model"):
        LatteConfig.preset("Latte-XXL/2")


# ------------------------------------------------------------------------------------ published layout
# The published forward pass, restated independently of model.py: conditions repeated per sequence,
# (b f) t d <-> (b t) f d reshapes, the temporal table added after block 0, DiT's sin-cos tables in numpy.

def np_sincos_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def np_sincos_2d(dim, n):
    gw, gh = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32))  # xy indexing
    return np.concatenate([np_sincos_1d(dim // 2, gw), np_sincos_1d(dim // 2, gh)], axis=1)


class RefBlock(nn.Module):
    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        B, N, D = x.shape
        ln = lambda z: nn.functional.layer_norm(z, (D,), eps=1e-6)
        sm, cm, gm, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=1)
        h = ln(x) * (1 + cm[:, None]) + sm[:, None]
        q, k, v = self.attn.qkv(h).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5).softmax(-1)
        x = x + gm[:, None] * self.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))
        h = ln(x) * (1 + cf[:, None]) + sf[:, None]
        return x + gf[:, None] * self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(h), approximate="tanh"))


class RefLatte(nn.Module):
    def __init__(self, size=8, p=2, C=3, D=32, depth=4, heads=4, frames=4, num_classes=0):
        super().__init__()
        self.p, self.C = p, C
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, p, p)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        if num_classes:
            self.y_embedder = nn.Module()
            self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, D)
        self.pos_embed = nn.Parameter(torch.from_numpy(np_sincos_2d(D, size // p)).float()[None], requires_grad=False)
        self.temp_embed = nn.Parameter(torch.from_numpy(np_sincos_1d(D, np.arange(frames))).float()[None],
                                       requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(D, heads) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(D, p * p * 2 * C)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, t, y=None):
        b, f = x.shape[:2]
        x = self.x_embedder.proj(rearrange(x, "b f c h w -> (b f) c h w")).flatten(2).transpose(1, 2) + self.pos_embed
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype))
        if y is not None:
            c = c + self.y_embedder.embedding_table(y)
        c_s, c_t = repeat(c, "n d -> (n r) d", r=f), repeat(c, "n d -> (n r) d", r=x.shape[1])
        for i in range(0, len(self.blocks), 2):
            x = self.blocks[i](x, c_s)
            x = rearrange(x, "(b f) t d -> (b t) f d", b=b)
            if i == 0:
                x = x + self.temp_embed
            x = self.blocks[i + 1](x, c_t)
            x = rearrange(x, "(b t) f d -> (b f) t d", b=b)
        shift, scale = self.final_layer.adaLN_modulation(c_s).chunk(2, dim=1)
        x = nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        x = self.final_layer.linear(x)
        n = math.isqrt(x.shape[1])
        x = x.reshape(x.shape[0], n, n, self.p, self.p, 2 * self.C)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 2 * self.C, n * self.p, n * self.p)
        return rearrange(x, "(b f) c h w -> b f c h w", b=b)


@pytest.mark.parametrize("num_classes", [0, 7])
def test_published_checkpoint_loads_and_matches(tmp_path, num_classes):
    torch.manual_seed(0)
    ref = randomize(RefLatte(num_classes=num_classes), seed=1)
    with torch.no_grad():  # the fixed tables as published (randomize overwrote them)
        ref.pos_embed.copy_(torch.from_numpy(np_sincos_2d(32, 4)).float()[None])
        ref.temp_embed.copy_(torch.from_numpy(np_sincos_1d(32, np.arange(4))).float()[None])
    path = tmp_path / "published.pt"
    torch.save({"ema": ref.state_dict(), "model": {}, "opt": {}}, path)
    ours = Latte.from_pretrained(path, num_heads=4).eval()
    assert ours.config.variant == 1 and ours.config.num_classes == num_classes and ours.config.learn_sigma
    x, t = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 999])
    y = torch.tensor([0, 6]) if num_classes else None
    with torch.no_grad():  # in float64, so that any difference is a difference of maths
        expected, got = ref.double()(x, t, y), ours.double()(x, t, y)
    assert torch.allclose(got, expected, atol=1e-9, rtol=1e-9), (got - expected).abs().max()
    # our format and back: identical outputs
    runner = CliRunner()
    from latte_cli.cli import app

    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "new [v2]" / "ours.safetensors"), "--num-heads",
                                 "4"])  # a folder made on the way, brackets in its name
    assert result.exit_code == 0, result.output
    again = Latte.from_pretrained(tmp_path / "new [v2]" / "ours.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(again.double()(x, t, y), got)


def test_sincos_tables_match_dit(tmp_path):
    assert torch.allclose(sincos_2d(32, 5, 5).float(), torch.from_numpy(np_sincos_2d(32, 5)).float(), atol=1e-6)


def test_convert_errors_are_one_line(tmp_path):
    from latte_cli.cli import app

    cases = ((["ours.pt"], "is a .safetensors file"), (["x.safetensors"], "missing [a].pt does not exist"))
    for args, message in cases:
        result = CliRunner().invoke(app, ["convert", str(tmp_path / "missing [a].pt"), *args])
        assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_wrong_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LatteError, match="bad.pt is not a readable torch checkpoint: not a torch.save file"):
        Latte.from_pretrained(bad)
    (tmp_path / "index.json").write_text('{"videos": []}')
    with pytest.raises(LatteError, match="not a torch.save file"):
        Latte.from_pretrained(tmp_path / "index.json")
    torch.save({"ema": {"w": torch.zeros(1)}, "hook": Pickled()}, tmp_path / "code.pt")  # never unpickled
    with pytest.raises(LatteError, match=r"pickles Python objects \(.*Pickled\) that a weights-only load refuses"):
        Latte.from_pretrained(tmp_path / "code.pt")
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(LatteError, match="not a Latte checkpoint"):
        Latte.from_pretrained(tmp_path / "other.pt")
    with pytest.raises(LatteError, match="does not exist"):
        Latte.from_pretrained(tmp_path / "missing.pt")
    model = Latte(tiny())
    sd = model.state_dict()
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:, :5]
    with pytest.raises(LatteError, match="shape"):
        model.load_weights(sd)


class Pickled:
    def __setstate__(self, state):
        raise AssertionError("a checkpoint's pickled object ran")


def test_a_training_checkpoint_with_its_args_loads(tmp_path):
    """DiT's train.py saves {"model", "ema", "opt", "args"}, args an argparse Namespace: a weights-only load
    accepts that one class (plain values), and the EMA weights come out."""
    import argparse

    from model import read_checkpoint

    ema = {"module.x_embedder.proj.weight": torch.randn(8, 4, 2, 2)}
    args = argparse.Namespace(model="DiT-XL/2", lr=1e-4, image_size=256, results_dir="results")
    torch.save({"model": {}, "ema": ema, "opt": {}, "args": args}, tmp_path / "0100000.pt")
    sd, meta = read_checkpoint(tmp_path / "0100000.pt")
    assert meta == {} and sd.keys() == {"x_embedder.proj.weight"}
    assert torch.equal(sd["x_embedder.proj.weight"], ema["module.x_embedder.proj.weight"])


def test_rope_depends_only_on_frame_distance():
    cos, sin = rope_tables(12, 8, "cpu")
    q, k = torch.randn(8), torch.randn(8)
    dot = lambda m, n: (apply_rope(q, cos[m], sin[m]) * apply_rope(k, cos[n], sin[n])).sum()
    assert torch.allclose(dot(2, 5), dot(6, 9), atol=1e-5)
    assert not torch.allclose(dot(2, 5), dot(2, 6), atol=1e-3)


@pytest.mark.parametrize("variant,patch_embed,conditioning", [(1, "uniform", "adaln"), (2, "tube", "adaln"),
                                                               (3, "uniform", "tokens"), (4, "tube", "adaln")])
def test_flop_count_matches_torch_counter(variant, patch_embed, conditioning):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(variant=variant, patch_embed=patch_embed, conditioning=conditioning, hidden_size=64,
               input_size=16, num_frames=8, depth=4, num_classes=5)
    model = Latte(cfg).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 8, 3, 16, 16), torch.tensor([3]), torch.tensor([1]))
    measured = counter.get_total_flops()
    assert abs(model.flops(8) - measured) / measured < 0.01, (model.flops(8), measured)


def test_info_lists_every_variant():
    from latte_cli.cli import app

    result = CliRunner().invoke(app, ["info", "--model", "Latte-S/2"])
    assert result.exit_code == 0, result.output
    for name in ("1 interleaved", "2 late fusion", "3 factorised", "4 factorised heads"):
        assert name in result.output
    assert "32.48M" in result.output


def test_counting_adaln_per_token_reproduces_table3_for_variant_1():
    """The published code repeats the condition for every token; counted that way, Latte-XL/2 variant 1 at
    16x4x32x32 costs what Table 3 says (5572.69 GFLOPs)."""
    with torch.device("meta"):
        model = Latte(LatteConfig.preset("Latte-XL/2", variant=1))
    assert abs(model.flops(16, per_token_adaln=True) - 5572.69e9) / 5572.69e9 < 1e-3
    assert model.flops(16) < 0.7 * model.flops(16, per_token_adaln=True)
