"""latte_cli/vae.py against diffusers' AutoencoderKL with seeded random weights (norm layers perturbed too, so
that a wrong mapping cannot hide behind all-ones): the key mapping of every layout on the full SD-1.4
configuration, and equal encode/decode outputs on a small configuration (and once on the full one).
Tolerance for fp32 outputs: rtol 1e-4, atol 1e-5 (the two differ only in the order of float operations)."""

import contextlib
import sys
import types

import diffusers
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from latte_cli import LatteError
from latte_cli.vae import AutoencoderKL, PixelSpace, VAEConfig, convert_state_dict, load_vae

SD14 = VAEConfig()
SMALL = VAEConfig(channels=(32, 64, 64), layers=1, groups=8)  # three levels: shortcuts on some, not others
TOL = dict(rtol=1e-4, atol=1e-5)


def reference(cfg: VAEConfig, seed: int = 0) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed)
    n = len(cfg.channels)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.channels,
        layers_per_block=cfg.layers, norm_num_groups=cfg.groups, latent_channels=cfg.latent_channels,
        scaling_factor=0.18215)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model.eval()


# ---------------------------------------------------------- the other layouts, written from the diffusers one


def old_attention_names(sd: dict) -> dict:
    """diffusers before 0.15 named the attention projections query/key/value/proj_attn."""
    names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for key, value in sd.items():
        for new, old in names.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def ldm_layout(sd: dict, cfg: VAEConfig) -> dict:
    """The original CompVis names, from a table of block prefixes (written independently of vae.py): the
    decoder's up[i] is the level of down[i], so diffusers' up_blocks.0 is up.{n-1}; attention is 1x1 convs."""
    n, blocks = len(cfg.channels), {}
    for part in ("encoder", "decoder"):
        blocks[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        blocks[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        blocks[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        blocks[f"{part}.conv_norm_out"] = f"{part}.norm_out"
    for i in range(n):
        for j in range(cfg.layers):
            blocks[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        for j in range(cfg.layers + 1):
            blocks[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        blocks[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        blocks[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"
    leaves = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
              "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        prefix = max((p for p in blocks if key.startswith(p + ".")), key=len, default=None)
        head, rest = (blocks[prefix], key[len(prefix) + 1:]) if prefix else ("", key)
        module, param = rest.rsplit(".", 1) if "." in rest else ("", rest)
        if module in ("to_q", "to_k", "to_v", "to_out.0") and param == "weight":
            value = value[:, :, None, None]
        out[".".join(s for s in (head, leaves.get(module, module), param) if s)] = value
    return out


@contextlib.contextmanager
def lightning_callbacks():
    """sd-v1-4.ckpt also pickles PyTorch Lightning's ModelCheckpoint class (a key of its callbacks' states): a
    stand-in module of that name while the file is written; Lightning is not installed when it is read."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    modules = {name: types.ModuleType(name) for name in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[names[-1]].ModelCheckpoint = cls
    sys.modules.update(modules)
    try:
        yield {cls: {"monitor": None, "best_model_score": None}}
    finally:
        for name in names:
            sys.modules.pop(name)


def sd_checkpoint(sd: dict) -> dict:
    """sd-v1-4.ckpt: the autoencoder under first_stage_model, next to the UNet, text encoder and EMA."""
    ckpt = {"first_stage_model." + k: v for k, v in sd.items()}
    ckpt |= {"model.diffusion_model.out.0.weight": torch.ones(2), "cond_stage_model.x.weight": torch.ones(2)}
    ckpt |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000)}
    return {"state_dict": ckpt, "global_step": 470000}


def layouts(ref: diffusers.AutoencoderKL, cfg: VAEConfig) -> dict[str, dict]:
    sd = ref.state_dict()
    ldm = ldm_layout(sd, cfg)
    loss = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(3)}
    return {"diffusers": sd, "diffusers-old": old_attention_names(sd), "ldm": ldm,
            "ldm-with-loss": ldm | loss, "sd-checkpoint": sd_checkpoint(ldm)["state_dict"]}


# ---------------------------------------------------------------------------- full size: keys and counts


@pytest.fixture(scope="module")
def full():
    return reference(SD14)


def test_full_size_parameter_count_and_every_layout_loads_strictly(full):
    port = AutoencoderKL()
    count = sum(p.numel() for p in port.parameters())
    assert count == sum(p.numel() for p in full.parameters()) == 83_653_863
    want = port.state_dict()
    # names and shapes of the original release (sd-v1-4.ckpt), as the independent LDM layout makes them
    ldm = ldm_layout(full.state_dict(), SD14)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert ldm["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    converted = {name: convert_state_dict(sd) for name, sd in layouts(full, SD14).items()}
    for name, sd in converted.items():
        assert sd.keys() == want.keys(), name
        port.load_state_dict(sd, strict=True)
        for key, value in sd.items():  # every layout puts every tensor in the same place
            assert torch.equal(value, converted["diffusers"][key]), (name, key)


def test_full_size_outputs_match_diffusers(full):
    port = AutoencoderKL()
    port.load_state_dict(convert_state_dict(sd_checkpoint(ldm_layout(full.state_dict(), SD14))["state_dict"]))
    torch.manual_seed(1)
    frames, latents = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        mean = full.encode(frames).latent_dist.mean
        pixels = full.decode(latents / 0.18215).sample
    torch.testing.assert_close(port.encode(frames), 0.18215 * mean, **TOL)
    torch.testing.assert_close(port.decode(latents), pixels, **TOL)


# --------------------------------------------------------------- small size: files on disk, outputs compared


def write(layout: str, sd: dict, root) -> str:
    """Each layout as the file users have; returns the path to give load_vae."""
    if layout == "diffusers":  # a model folder: vae/diffusion_pytorch_model.safetensors
        (root / "model" / "vae").mkdir(parents=True)
        file = root / "model/vae/diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, file)
        return str(root / "model")
    if layout == "diffusers-old":  # a VAE folder with the older .bin
        (root / "sd-vae-ft-ema").mkdir()
        torch.save(sd, root / "sd-vae-ft-ema" / "diffusion_pytorch_model.bin")
        return str(root / "sd-vae-ft-ema")
    if layout == "ldm":  # vae-ft-mse-840000-ema-pruned.safetensors
        save_file({k: v.contiguous() for k, v in sd.items()}, root / "vae-ft-mse.safetensors")
        return str(root / "vae-ft-mse.safetensors")
    if layout == "ldm-with-loss":  # a .ckpt holding {"state_dict": ...}
        torch.save({"state_dict": sd}, root / "vae-ft-ema.ckpt")
        return str(root / "vae-ft-ema.ckpt")
    with lightning_callbacks() as callbacks:  # the whole Stable Diffusion checkpoint, as Lightning saved it
        torch.save(sd_checkpoint(sd) | {"callbacks": callbacks}, root / "sd-v1-4.ckpt")
    return str(root / "sd-v1-4.ckpt")


@pytest.mark.parametrize("layout", ["diffusers", "diffusers-old", "ldm", "ldm-with-loss", "sd-checkpoint"])
def test_every_layout_from_disk_encodes_and_decodes_like_diffusers(layout, tmp_path):
    ref = reference(SMALL, seed=2)
    sd = layouts(ref, SMALL)[layout] if layout != "sd-checkpoint" else ldm_layout(ref.state_dict(), SMALL)
    vae = load_vae(write(layout, sd, tmp_path), cfg=SMALL)
    assert isinstance(vae, AutoencoderKL) and not vae.training and vae.downsample == 4
    torch.manual_seed(3)
    frames, latents = torch.rand(3, 3, 16, 24) * 2 - 1, torch.randn(3, 4, 4, 6)
    with torch.no_grad():
        posterior = ref.encode(frames).latent_dist
        sampled = posterior.sample(torch.Generator().manual_seed(4))
        pixels = ref.decode(latents / 0.18215).sample
    torch.testing.assert_close(vae.encode(frames, chunk=2), 0.18215 * posterior.mean, **TOL)
    drawn = vae.encode(frames, sample=True, generator=torch.Generator().manual_seed(4), chunk=2)
    torch.testing.assert_close(drawn, 0.18215 * sampled, **TOL)
    torch.testing.assert_close(vae.decode(latents, chunk=2), pixels, **TOL)


def test_names_recorded_for_the_index(tmp_path):
    ref = reference(SMALL)
    sd = ref.state_dict()
    folder = write("diffusers", sd, tmp_path)
    assert load_vae(folder, cfg=SMALL).name == "model/vae/diffusion_pytorch_model.safetensors"
    assert load_vae(tmp_path / "model" / "vae", cfg=SMALL).name == "vae/diffusion_pytorch_model.safetensors"
    assert load_vae(write("ldm", ldm_layout(sd, SMALL), tmp_path), cfg=SMALL).name == "vae-ft-mse.safetensors"


def test_bad_weights_are_clear_errors(tmp_path):
    sd = ldm_layout(reference(SMALL).state_dict(), SMALL)
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "decoder.up.1.block.1.conv1.bias"},
                    "missing VAE weight 'decoder.up.1.block.1.conv1.bias'"),
        "unexpected": (sd | {"decoder.up.1.block.2.conv1.bias": torch.zeros(64)},
                       "unexpected VAE weight 'decoder.up.1.block.2.conv1.bias'"),
        "shape": (sd | {"quant_conv.bias": torch.zeros(4)}, "'quant_conv.bias' has shape (4,)"),
    }
    for name, (bad, message) in cases.items():
        save_file({k: v.contiguous() for k, v in bad.items()}, tmp_path / f"{name}.safetensors")
        with pytest.raises(LatteError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_vae(tmp_path / f"{name}.safetensors", cfg=SMALL)
    with pytest.raises(LatteError, match="not found"):
        load_vae(tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatteError, match="no diffusion_pytorch_model"):
        load_vae(tmp_path / "empty")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LatteError, match="cannot read"):
        load_vae(tmp_path / "broken.safetensors")
    sdxl = tmp_path / "sdxl-vae"  # the same shapes, another latent scale
    sdxl.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, sdxl / "diffusion_pytorch_model.safetensors")
    (sdxl / "config.json").write_text('{"scaling_factor": 0.13025}')
    with pytest.raises(LatteError, match="scaling_factor 0.13025"):
        load_vae(sdxl, cfg=SMALL)
    torch.save({"state_dict": sd, "callback": Pickled()}, tmp_path / "code.ckpt")  # weights_only refuses it
    with pytest.raises(LatteError, match="cannot read"):
        load_vae(tmp_path / "code.ckpt", cfg=SMALL)


class Pickled:
    pass


# ------------------------------------------------------------------------ chunks, precision, pixel space


def test_chunks_precision_and_shapes():
    torch.manual_seed(5)
    vae = AutoencoderKL(SMALL).eval()
    frames = torch.rand(5, 3, 16, 16) * 2 - 1
    whole = vae.encode(frames, chunk=8)
    torch.testing.assert_close(vae.encode(frames, chunk=2), whole, **TOL)
    a = vae.encode(frames, sample=True, generator=torch.Generator().manual_seed(0), chunk=1)
    b = vae.encode(frames, sample=True, generator=torch.Generator().manual_seed(0), chunk=8)
    torch.testing.assert_close(a, b, **TOL)
    assert not torch.allclose(a, whole)
    pixels = vae.decode(whole, chunk=8)
    torch.testing.assert_close(vae.decode(whole, chunk=3), pixels, **TOL)
    for precision in ("bf16", "fp16"):  # autocast: close to fp32, returned as fp32
        z, x = vae.encode(frames, precision=precision), vae.decode(whole, precision=precision)
        assert z.dtype == x.dtype == torch.float32
        torch.testing.assert_close(z, whole, rtol=0, atol=0.05 * whole.abs().max().item())
        torch.testing.assert_close(x, pixels, rtol=0, atol=0.05 * pixels.abs().max().item())
    with pytest.raises(LatteError, match="precision"):
        vae.encode(frames, precision="fp8")
    with pytest.raises(LatteError, match="not divisible by 4"):
        vae.encode(torch.zeros(1, 3, 16, 18))
    with pytest.raises(LatteError, match=r"\(T, 3, H, W\)"):
        vae.encode(torch.zeros(3, 16, 16))


def test_pixel_space_is_the_identity():
    for path in (None, "none"):
        vae = load_vae(path)
        assert isinstance(vae, PixelSpace) and vae.name == "none"
        assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (3, 1, 1.0)
    frames = torch.rand(4, 3, 10, 14) * 2 - 1
    assert torch.equal(vae.encode(frames, sample=True), frames) and torch.equal(vae.decode(frames), frames)
    with pytest.raises(LatteError, match="shape"):
        vae.encode(torch.zeros(4, 4, 10, 14))
