"""Long videos: frame conditioning (mask channel, given frames), mask patterns, extension, and Video LDM's
temporal-only training from an image model."""

import pytest
import torch

from latte_cli.diffusion import Diffusion, given_frames
from model import Latte, LatteConfig
from sample import SampleConfig, fill_between, generate
from train import draw_masks, freeze_all_but_temporal, init_weights_from


def tiny(**kw):
    return LatteConfig(**{**dict(input_size=8, in_channels=3, num_frames=6, hidden_size=32, depth=4, num_heads=4,
                                 num_classes=3), **kw})


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_an_unconditioned_model_loads_and_is_unchanged_with_the_mask_off():
    plain = randomize(Latte(tiny())).eval()
    cond = Latte(tiny(cond_frames=True)).eval()
    cond.load_weights(plain.state_dict())
    assert torch.count_nonzero(cond.x_embedder.proj.weight[:, 3]) == 0  # the mask channel starts at zero
    x, t, y = torch.randn(2, 6, 3, 8, 8), torch.tensor([5, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        expected = plain(x, t, y)
        assert torch.equal(cond(x, t, y, mask=torch.zeros(2, 6)), expected)
        assert torch.equal(cond(x, t, y), expected)
        randomize(cond)  # once trained, the mask does matter
        assert not torch.allclose(cond(x, t, y, mask=torch.zeros(2, 6)), cond(x, t, y, mask=torch.ones(2, 6)))


def test_init_from_an_unconditioned_checkpoint(tmp_path):
    """train --cond-frames --init-from a model trained without given frames: every tensor is taken, the mask
    channel added at zero, as load_weights does."""
    plain = randomize(Latte(tiny()))
    plain.save(tmp_path / "plain.safetensors")
    cond = Latte(tiny(cond_frames=True))
    message = init_weights_from(cond, str(tmp_path / "plain.safetensors"))
    assert message.startswith(f"initialised {len(cond.state_dict())} of {len(cond.state_dict())} tensors")
    assert torch.equal(cond.x_embedder.proj.weight[:, :3], plain.x_embedder.proj.weight)
    assert torch.count_nonzero(cond.x_embedder.proj.weight[:, 3]) == 0


def test_given_frames_come_back_unchanged():
    model = randomize(Latte(tiny(cond_frames=True)), seed=3).eval()
    diffusion = Diffusion(respacing="ddim5")
    clean = torch.randn(2, 6, 3, 8, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    noised = Diffusion().q_sample(clean, torch.full((2,), 50), torch.randn_like(clean))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    for sampler in ("ddim", "ddpm"):
        cfg = SampleConfig(ckpt="", sampler=sampler, cfg_scale=3.0)
        with torch.no_grad():
            z = generate(model, diffusion, (2, 6, 3, 8, 8), gens, cfg, torch.tensor([1, 2]), (clean, noised), mask)
        assert torch.equal(z[mask], clean[mask])
        assert not torch.allclose(z[~mask], clean[~mask])


def test_the_model_sees_the_noised_given_frames_and_the_mask():
    seen = {}

    def model(x, t, mask=None, **kw):
        seen.update(x=x, mask=mask)
        return torch.zeros_like(x)

    x, given = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1]]).float()
    given_frames(model, given)(x, torch.tensor([1, 2]), mask=mask)
    m = mask.bool()
    assert torch.equal(seen["x"][m], given[m]) and torch.equal(seen["x"][~m], x[~m])
    assert seen["mask"] is mask


def test_mask_patterns():
    masks = draw_masks(3000, 16, 4, torch.Generator().manual_seed(0))
    count = masks.sum(1)
    none = count == 0
    prefix = torch.tensor([bool(m[: int(c)].all()) for m, c in zip(masks, count, strict=True)]) & ~none
    keys = ~none & ~prefix
    for part in (none, prefix, keys):  # a third each
        assert 0.29 < part.float().mean() < 0.38
    assert count[prefix].min() == 1 and count[prefix].max() == 4
    for m in masks[keys][:300]:  # key frames every 2-4 frames from the first
        idx = torch.nonzero(m).flatten()
        assert idx[0] == 0 and len(set(idx.diff().tolist())) == 1 and 2 <= idx[1] <= 4


def test_temporal_only_training_starts_as_the_image_model(tmp_path):
    kw = dict(temporal_pos="rope", num_classes=5, depth=6)
    # an image model: variant 2 is 3 spatial blocks then 3 temporal ones; zero temporal gates make them the
    # identity, so it is a DiT of 3 blocks applied to each frame, and its blocks 0-2 are the DiT's blocks
    image = randomize(Latte(tiny(variant=2, **kw)), seed=1).eval()
    for block in image.blocks[3:]:
        torch.nn.init.zeros_(block.adaLN_modulation[-1].weight)
        torch.nn.init.zeros_(block.adaLN_modulation[-1].bias)
    dit = {k: v for k, v in image.state_dict().items() if not k.startswith(("blocks.3", "blocks.4", "blocks.5"))}
    torch.save(dit, tmp_path / "dit.pt")
    video = Latte(tiny(variant=1, **kw)).eval()
    init_weights_from(video, str(tmp_path / "dit.pt"), spatial_only=True)
    x, t, y = torch.randn(2, 6, 3, 8, 8), torch.tensor([3, 600]), torch.tensor([1, 4])
    with torch.no_grad():
        out = video(x, t, y)
        assert torch.allclose(out, image(x, t, y), atol=1e-5)
        perm = torch.randperm(6)
        assert torch.allclose(video(x[:, perm], t, y), out[:, perm], atol=1e-5)  # frames are independent
    trainable = freeze_all_but_temporal(video)
    names = [n for n, p in video.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(("blocks.1.", "blocks.3.", "blocks.5.")) for n in names)
    assert trainable == sum(p.numel() for p in video.blocks[1::2].parameters())
    with pytest.raises(Exception, match="rope"):
        freeze_all_but_temporal(Latte(tiny()))


def test_hierarchical_keeps_the_key_frames_and_fills_between():
    model = randomize(Latte(tiny(cond_frames=True)), seed=5).eval()
    keys, masks = torch.randn(2, 5, 3, 8, 8), []
    cfg, gens = SampleConfig(ckpt="", sampler="ddim", cfg_scale=2.0), [torch.Generator().manual_seed(i) for i in (0, 1)]

    def clip(net, clean, mask):
        masks.append(mask[0].tolist())
        return generate(net, Diffusion(respacing="ddim3"), (2, 6, 3, 8, 8), gens, cfg, torch.tensor([0, 1]),
                        (clean, clean), mask)

    with torch.no_grad():
        video = fill_between(clip, model, keys, 2, 6)
    assert video.shape == (2, 9, 3, 8, 8) and torch.equal(video[:, ::2], keys)
    assert torch.isfinite(video).all() and not torch.allclose(video[:, 1], torch.zeros(2, 3, 8, 8))
    # windows start at keys 0 and 4 and are given the keys inside them (none past the last key)
    assert masks == [[True, False, True, False, True, False], [True, False, True, False, True, False]]


def test_long_videos_through_the_cli(tmp_path):
    import av
    from typer.testing import CliRunner

    from encode import encode
    from latte_cli.cli import app
    from latte_cli.video import synth

    synth(tmp_path / "videos", videos=4, frames=10, size=16, classes=1)
    encode(tmp_path / "videos", tmp_path / "latents", size=16)
    runner = CliRunner()
    common = ["--depth", "2", "--hidden-size", "32", "--num-heads", "4", "--frames", "6", "--frame-interval", "1",
              "--batch", "2", "--steps", "2", "--device", "cpu"]
    assert runner.invoke(app, ["train", str(tmp_path / "latents"), "--out", str(tmp_path / "plain"), *common]
                         ).exit_code == 0
    result = runner.invoke(app, ["train", str(tmp_path / "latents"), "--out", str(tmp_path / "long"), *common,
                                 "--cond-frames", "2"])
    assert result.exit_code == 0, result.output
    for extra in ([], ["--hierarchical", "--key-every", "3"]):
        out = tmp_path / f"samples{len(extra)}"
        result = runner.invoke(app, ["sample", str(tmp_path / "long" / "checkpoints" / "step_00000002"), "--out",
                                     str(out), "--frames", "23", "--num", "1", "--sampler", "ddim", "--steps", "2",
                                     *extra])
        assert result.exit_code == 0, result.output
        with av.open(str(out / "sample_000.mp4")) as c:
            assert sum(1 for _ in c.decode(video=0)) == 23
    result = runner.invoke(app, ["sample", str(tmp_path / "plain" / "checkpoints" / "step_00000002"), "--out",
                                 str(tmp_path / "no"), "--frames", "23"])
    assert result.exit_code == 1 and "--cond-frames" in result.output and not (tmp_path / "no").exists()


def test_extension_to_four_times_the_clip_stays_continuous(demo_model, tmp_path):
    """32 frames from a model trained on 8: the first clip, then 5 new frames per clip given 3. The step from
    frame to frame across a join is at most 1.5 times the mean step inside clips, and the videos are coherent:
    consecutive frames differ less than half as much as the same frame of two different videos."""
    import av
    import numpy as np

    from sample import SampleConfig, sample

    paths = sample(SampleConfig(ckpt=str(demo_model), out=str(tmp_path), num=6, frames=32, context=3,
                                sampler="ddpm", steps=100, cfg_scale=2.0, progress=False))
    videos = []
    for p in paths[:-1]:
        with av.open(str(p)) as c:
            videos.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(float))
    videos = np.stack(videos)                                                   # (6, 32, 16, 16, 3)
    assert videos.shape[:2] == (6, 32)
    step = np.abs(np.diff(videos, axis=1)).mean(axis=(0, 2, 3, 4))             # frame t -> t + 1
    joins = [7, 12, 17, 22, 27]
    inside = np.delete(step, joins)
    assert step[joins].mean() <= 1.5 * inside.mean(), (step[joins], inside.mean())
    pairs = [(a, b) for a in range(6) for b in range(6) if a != b]
    between = np.mean([np.abs(videos[a] - videos[b]).mean() for a, b in pairs])
    assert inside.mean() < 0.5 * between, (inside.mean(), between)
