"""encode.py on small synthetic sets: the shards read back equal the VAE applied to the decoded frames,
bad files are skipped with their reason, and a rerun only redoes what is missing."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from encode import encode, load_index
from latte_cli import LatteError
from latte_cli.cli import app
from latte_cli.vae import AutoencoderKL, VAEConfig
from latte_cli.video import contact_sheet, read_video, synth


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """6 videos of 8 frames in 3 class folders, plus an empty and a corrupt file among them."""
    src = tmp_path_factory.mktemp("src")
    synth(src, videos=6, frames=8, size=32, classes=3, seed=0)
    (src / "class_1" / "empty.mp4").write_bytes(b"")
    (src / "class_2" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    return src


def shard(out, source):
    return load_file(out / f"{source}.safetensors")


def test_pixel_space_with_labels_and_flip(videos, tmp_path):
    summary = encode(videos, tmp_path, vae="none", size=32, labels="folders", flip=True)
    assert (summary["encoded"], summary["done"], summary["frames"]) == (6, 0, 48)
    reasons = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"class_1/empty.mp4", "class_2/noise.mp4"}
    assert "empty" in reasons["class_1/empty.mp4"] and "cannot read" in reasons["class_2/noise.mp4"]
    index = load_index(tmp_path)
    assert index["classes"] == ["class_0", "class_1", "class_2"]
    assert (index["latent_channels"], index["latent_size"], index["scaling_factor"]) == (3, 32, 1.0)
    assert index["vae"] == "none" and index["flip"]
    assert [f["frames"] for f in index["files"]] == [8] * 6
    for f in index["files"]:
        t = load_file(tmp_path / f["file"])
        assert t["latents"].dtype == torch.float16 and t["latents"].shape == (8, 3, 32, 32)
        assert t["label"].item() == f["label"] == int(f["source"].split("/")[0][-1])
        frames = read_video(videos / f["source"], 32)  # pixel space: the latents are the frames
        assert torch.allclose(t["latents"].float(), frames, atol=1e-3)
        assert torch.equal(t["latents_flip"], t["latents"].flip(-1))  # mirrored left to right
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []  # no temporary files left


def test_small_random_vae(tmp_path):
    synth(tmp_path / "src", videos=2, frames=5, size=32, classes=2, seed=1)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(channels=(8, 16), layers=1, groups=4)).eval()  # downsamples by 2
    encode(tmp_path / "src", tmp_path / "out", vae=vae, size=16, labels="folders", flip=True, batch=3)
    index = load_index(tmp_path / "out")
    assert (index["latent_channels"], index["latent_size"], index["scaling_factor"]) == (4, 8, 0.18215)
    f = index["files"][1]
    t = load_file(tmp_path / "out" / f["file"])
    assert t["label"].item() == 1
    frames = read_video(tmp_path / "src" / f["source"], 16)
    assert t["latents"].shape == t["latents_flip"].shape == (5, 4, 8, 8) and t["latents"].dtype == torch.float16
    want = vae.encode(frames)  # the posterior mean, scaled
    assert want.abs().max() > 1e-3
    assert torch.allclose(t["latents"].float(), want, rtol=1e-2, atol=1e-4)
    assert torch.allclose(t["latents_flip"].float(), vae.encode(frames.flip(-1)), rtol=1e-2, atol=1e-4)


def test_rerun_resumes(videos, tmp_path):
    encode(videos, tmp_path, size=32, labels="folders")
    shards = sorted(tmp_path.rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    # an interrupted run: one shard never finished, its temporary file left behind
    victim = shards[2]
    victim.unlink()
    stale = victim.with_name(f".{victim.name}.tmp")
    stale.write_bytes(b"half a file")
    (tmp_path / "index.json").unlink()
    shards[4].write_bytes(b"garbage under the final name")  # not made by encode: made again
    summary = encode(videos, tmp_path, size=32, labels="folders")
    assert (summary["encoded"], summary["done"], len(summary["skipped"])) == (2, 4, 2)
    assert victim.is_file() and not stale.exists()
    assert load_file(shards[4])["latents"].shape == (8, 3, 32, 32)
    assert all(p.stat().st_mtime_ns == stamps[p] for p in shards if p not in (victim, shards[4]))
    assert len(load_index(tmp_path)["files"]) == 6
    # other settings make other latents: nothing is reused
    assert encode(videos, tmp_path, size=32, labels="folders", flip=True)["encoded"] == 6


def test_a_replaced_source_is_encoded_again(videos, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(videos, src)
    encode(src, tmp_path / "out", size=32, labels="folders")
    replaced = sorted(src.rglob("video_*.mp4"))[0]
    shutil.copy(sorted(src.rglob("video_*.mp4"))[-1], replaced)  # another video under the same name
    summary = encode(src, tmp_path / "out", size=32, labels="folders")
    assert (summary["encoded"], summary["done"]) == (1, 5)
    rel = replaced.relative_to(src).as_posix()
    got = load_file(tmp_path / "out" / f"{rel}.safetensors")["latents"].float()
    assert torch.allclose(got, read_video(replaced, 32), atol=1e-2)


def test_stride_min_frames_and_images(tmp_path):
    src = tmp_path / "src"
    synth(src / "long", videos=2, frames=9, size=32, classes=1, seed=1)
    synth(src / "short", videos=1, frames=3, size=32, classes=1, seed=2)
    shutil.copy(src / "long" / "video_0000.mp4", src / "long" / ".hidden.mp4")  # hidden files are ignored
    (src / "notes.txt").write_text("not a video")
    contact_sheet(src / "still.png", read_video(src / "long" / "video_0001.mp4", 32)[:1])
    summary = encode(src, tmp_path / "out", size=32, stride=2, min_frames=4)
    assert [s["file"] for s in summary["skipped"]] == ["short/video_0000.mp4"]
    assert "fewer than --min-frames 4" in summary["skipped"][0]["reason"]
    files = {f["source"]: f for f in load_index(tmp_path / "out")["files"]}
    assert sorted(files) == ["long/video_0000.mp4", "long/video_0001.mp4", "still.png"]
    assert files["long/video_0000.mp4"]["frames"] == 5 and files["long/video_0000.mp4"]["label"] is None
    assert files["still.png"]["frames"] == 1 and files["still.png"]["image"]  # one-frame item, kept
    every_other = read_video(src / "long" / "video_0000.mp4", 32)[::2]
    got = shard(tmp_path / "out", "long/video_0000.mp4")
    assert torch.allclose(got["latents"].float(), every_other, atol=1e-3) and "label" not in got
    with pytest.raises(LatteError, match="could be encoded"):
        encode(src / "short", tmp_path / "none", size=32, min_frames=4)
    again = encode(src, tmp_path / "out", size=32, stride=2, min_frames=6)  # a rerun asking for more frames
    assert sorted(s["file"] for s in again["skipped"]) == ["long/video_0000.mp4", "long/video_0001.mp4",
                                                          "short/video_0000.mp4"]
    assert [f["source"] for f in load_index(tmp_path / "out")["files"]] == ["still.png"]


def test_load_index_errors(tmp_path):
    with pytest.raises(LatteError, match="not found"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(LatteError, match="not valid JSON"):
        load_index(tmp_path)
    good = dict(vae="none", scaling_factor=1.0, latent_channels=3, latent_size=8, size=8, flip=False, classes=[],
                files=[dict(file="gone.safetensors", frames=4)])
    (tmp_path / "index.json").write_text(json.dumps({k: v for k, v in good.items() if k != "size"}))
    with pytest.raises(LatteError, match="'size'"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(good))
    with pytest.raises(LatteError, match="missing"):
        load_index(tmp_path)


def test_cli_end_to_end(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["synth", str(tmp_path / "src"), "--videos", "3", "--frames", "4", "--size", "16",
                            "--classes", "2", "--seed", "5"])
    assert r.exit_code == 0 and "wrote 3 videos of 4 frames" in r.output, r.output
    assert sorted(p.parent.name for p in (tmp_path / "src").rglob("*.mp4")) == ["class_0", "class_0", "class_1"]
    r = runner.invoke(app, ["encode", str(tmp_path / "src"), str(tmp_path / "out"), "--size", "16",
                            "--labels", "folders", "--flip"])
    assert r.exit_code == 0, r.output
    index = load_index(tmp_path / "out")
    assert index["flip"] and [f["label"] for f in index["files"]] == [0, 0, 1]
    r = runner.invoke(app, ["encode", str(tmp_path / "missing"), str(tmp_path / "out2")])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert not os.path.exists(tmp_path / "out2")
    r = runner.invoke(app, ["encode", str(tmp_path / "src"), str(tmp_path / "out2"), "--device", "meta"])
    assert r.exit_code == 1 and "unknown device" in r.output and not os.path.exists(tmp_path / "out2")
