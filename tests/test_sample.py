"""sample.py and the demo: readable mp4 files, reproducible seeds, guidance, clean errors."""

import av
import numpy as np
import pytest
from typer.testing import CliRunner

import sample as sample_module
from encode import encode
from latte_cli.cli import app
from latte_cli.vae import AutoencoderKL, VAEConfig
from latte_cli.video import synth
from sample import SampleConfig, sample
from train import TrainConfig, train

TINY = dict(depth=2, hidden_size=64, num_heads=4, frames=4, frame_interval=2, batch=4, progress=False,
            device="cpu", log_every=100)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    synth(root / "videos", videos=6, frames=8, size=16, classes=3, seed=0)
    encode(root / "videos", root / "labelled", vae="none", size=16, labels="folders")
    encode(root / "videos", root / "plain", vae="none", size=16)
    cond = train(TrainConfig(data=str(root / "labelled"), out=str(root / "cond"), steps=2, **TINY))
    uncond = train(TrainConfig(data=str(root / "plain"), out=str(root / "uncond"), steps=2, **TINY))
    return cond, uncond


def read_back(path):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        return np.stack(frames), stream.codec_context.name


@pytest.mark.parametrize("sampler,steps,cfg_scale", [("ddpm", 6, 1.0), ("ddpm", 6, 3.0), ("ddim", 5, 4.0)])
def test_sampling_writes_readable_videos(checkpoints, tmp_path, sampler, steps, cfg_scale):
    cond, _ = checkpoints
    paths = sample(SampleConfig(ckpt=str(cond), out=str(tmp_path), num=3, sampler=sampler, steps=steps,
                                cfg_scale=cfg_scale, classes=["class_2", "0"], batch=2, progress=False))
    assert [p.name for p in paths] == ["sample_000.mp4", "sample_001.mp4", "sample_002.mp4", "contact_sheet.png"]
    for p in paths[:-1]:
        frames, codec = read_back(p)
        assert frames.shape == (4, 16, 16, 3) and codec == "h264"
    with av.open(str(paths[-1])) as c:  # one row per video, one column per frame
        sheet = next(c.decode(video=0))
        assert sheet.height >= 3 * 16 and sheet.width >= 4 * 16
    assert not list(tmp_path.glob("*.tmp*"))


def test_same_seed_same_video_whatever_the_batch(checkpoints, tmp_path):
    _, uncond = checkpoints
    run = lambda out, batch, seed: sample(SampleConfig(ckpt=str(uncond), out=str(tmp_path / out), num=3, seed=seed,
                                                       sampler="ddpm", steps=5, batch=batch, progress=False))
    one_by_one, together, other = run("a", 1, 0), run("b", 3, 0), run("c", 3, 1)
    for a, b in zip(one_by_one[:-1], together[:-1], strict=True):
        fa, fb = read_back(a)[0].astype(int), read_back(b)[0].astype(int)
        assert np.abs(fa - fb).max() <= 1  # the same up to the last bit of float rounding
    assert np.abs(read_back(one_by_one[0])[0].astype(int) - read_back(other[0])[0].astype(int)).max() > 10


def test_guidance_uses_the_null_class(checkpoints, monkeypatch, tmp_path):
    cond, _ = checkpoints
    seen = []
    from model import Latte

    forward = Latte.forward
    monkeypatch.setattr(Latte, "forward", lambda self, x, t, y=None, **kw: (seen.append(y.tolist()),
                                                                              forward(self, x, t, y, **kw))[1])
    sample(SampleConfig(ckpt=str(cond), out=str(tmp_path), num=2, sampler="ddim", steps=2, cfg_scale=5.0,
                        classes=["1"], progress=False))
    assert seen[0] == [1, 1, 3, 3]  # the batch doubled: the class, then the null class (row num_classes)


def test_errors_are_one_line_and_write_nothing(checkpoints, tmp_path, monkeypatch):
    cond, uncond = checkpoints
    runner = CliRunner()
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(cond), "--class", "9"], "not one of the model's 3 classes"),
        ([str(cond), "--class", "nope"], "not one of the model's 3 classes"),
        ([str(uncond), "--class", "1"], "unconditional"),
        ([str(cond), "--sampler", "euler"], "ddpm or ddim"),
        ([str(cond), "--vae", str(tmp_path / "no-vae")], "not found"),
        ([str(cond), "--device", "meta"], "unknown device"),
        ([str(cond), "--frames", "-2"], "--frames must be at least 1"),
        ([str(cond), "--steps", "0"], "--steps must be at least 1"),
        ([str(cond), "--steps", "1"], "--steps must be between 2 and 1000"),
        ([str(cond), "--cfg-scale", "nan"], "--cfg-scale must be finite"),
        ([str(cond), "--cfg-scale", "inf"], "--cfg-scale must be finite"),
        ([str(cond), "--sampler", "ddim", "--eta", "nan"], "--eta between 0 and 1"),
        ([str(cond), "--sampler", "ddim", "--eta", "50"], "--eta between 0 and 1"),
        ([str(cond), "--keyframes", str(cond)], "pass both or neither"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = runner.invoke(app, ["sample", *args, "--out", str(out)])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    # a 4-channel VAE for a 3-channel model
    small = AutoencoderKL(VAEConfig(channels=(32, 32), layers=1, groups=8))
    monkeypatch.setattr(sample_module, "load_vae", lambda *a, **k: small)
    result = runner.invoke(app, ["sample", str(cond), "--vae", "x", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "3-channel latents" in result.output and not (tmp_path / "out").exists()


def test_outputs_are_checked_before_sampling_and_nan_latents_are_not_written(checkpoints, tmp_path, monkeypatch):
    cond, _ = checkpoints
    runner = CliRunner()
    out = tmp_path / "taken"
    (out / "contact_sheet.png").mkdir(parents=True)
    result = runner.invoke(app, ["sample", str(cond), "--num", "2", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 1 and "contact_sheet.png is a folder" in result.output, result.output
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png"]  # nothing sampled, nothing written

    from model import Latte  # a diverged model: every prediction NaN

    forward = Latte.forward
    monkeypatch.setattr(Latte, "forward", lambda self, *a, **kw: forward(self, *a, **kw) * float("nan"))
    out = tmp_path / "nan"
    result = runner.invoke(app, ["sample", str(cond), "--num", "2", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 1 and "sample 0's latents hold NaN" in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:") and not list(out.glob("*.mp4"))


def test_demo_end_to_end_in_seconds(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--minutes", "0.02", "--videos", "8",
                                      "--depth", "2", "--hidden-size", "32", "--num", "2", "--sample-steps", "3"])
    assert result.exit_code == 0, result.output
    assert "contact sheet" in result.output
    frames, _ = read_back(tmp_path / "samples" / "sample_001.mp4")
    assert frames.shape == (8, 16, 16, 3)
    assert (tmp_path / "samples" / "contact_sheet.png").is_file()
    frames, _ = read_back(tmp_path / "long" / "sample_001.mp4")  # made clip by clip
    assert frames.shape == (32, 16, 16, 3)
    for args in (["--num", "0"], ["--sample-steps", "1"], ["--minutes", "nan"]):  # checked before any work
        result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "again"), *args])
        assert result.exit_code == 1 and args[0] in result.output and not (tmp_path / "again").exists()


def shape_statistics(paths, labels, classes=4):
    """Over videos with these class labels: the share of frames that show one shape, the share of those in
    their class's colour, and the steps of the shape's centre from frame to frame (pixels)."""
    from shapes import frame_shapes

    frames, steps = [], []
    for path, label in zip(paths, labels, strict=True):
        found = frame_shapes(read_back(path)[0], classes)
        frames += [(f["one"], f["colour"] == label) for f in found]
        centres = [f["centre"] for f in found if f["one"]]
        steps += [np.linalg.norm(b - a) for a, b in zip(centres, centres[1:], strict=False)]
    one = [o for o, _ in frames]
    return np.mean(one), np.mean([c for o, c in frames if o]), np.array(steps)


def test_the_demo_model_draws_one_shape_per_frame_moving_smoothly(demo_model, tmp_path):
    """The demo's promise, measured: the data show one shape of the class's colour in every frame, moving
    0.5-1.5 pixels a frame; the demo's model (3,000 steps here) must draw one shape in most frames (stray
    pixels aside), in the right colour, moving as smoothly."""
    root = demo_model.parents[2]
    data = sorted((root / "videos").rglob("*.mp4"))[::16]  # 16 videos from the class_0, ..., class_3 folders
    one, colour, steps = shape_statistics(data, [int(p.parent.name.split("_")[1]) for p in data])
    assert one == 1.0 and colour == 1.0 and 0.5 <= steps.mean() <= 1.5 and steps.max() < 3
    paths = sample(SampleConfig(ckpt=str(demo_model), out=str(tmp_path), num=16, sampler="ddpm", steps=250,
                                cfg_scale=2.0, seed=0, progress=False))[:-1]  # classes 0, 1, 2, 3, 0, ...
    one, colour, steps = shape_statistics(paths, [i % 4 for i in range(16)])
    assert one >= 0.6, one
    assert colour >= 0.95, colour
    assert 0.25 <= steps.mean() <= 2.0 and steps.max() < 4, steps
