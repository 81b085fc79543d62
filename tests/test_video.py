"""Video I/O: files written here are read back with PyAV directly, and resizing is checked against torch."""

import errno
import os
import stat

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latte_cli import LatteError
from latte_cli.video import BACKGROUND, COLOURS, contact_sheet, read_video, synth, write_video


def smooth_video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(t, 3, h, w) in [-1, 1] with gentle gradients, which H.264 keeps nearly exactly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(t, 3, 3, 3, generator=g) * 1.6 - 0.8
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(-1, 1)


def decode_rgb(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_write_video_is_h264_yuv420p(tmp_path):
    x = smooth_video(6, 31, 33)  # odd sides: yuv420p needs even ones, the last row and column are repeated
    write_video(tmp_path / "v.mp4", x, fps=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no temporary file left
    with av.open(str(tmp_path / "v.mp4")) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (s.width, s.height) == (34, 32)
        assert float(s.average_rate) == 8
    rgb = decode_rgb(tmp_path / "v.mp4")
    assert rgb.shape == (6, 32, 34, 3)
    want = ((x + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(rgb[:, :31, :33].astype(float) - want).mean() < 4  # out of 255: lossy, but close
    assert np.abs(rgb[:, 31, :33].astype(float) - want[:, 30]).mean() < 4  # the repeated last row


def test_names_with_a_colon_are_files_not_protocols(tmp_path, monkeypatch):
    """FFmpeg reads "take: 2.mp4" given relatively as the protocol "take"; the files are opened by absolute path."""
    monkeypatch.chdir(tmp_path)
    x = smooth_video(3, 16, 16)
    write_video("take: 2.mp4", x)
    assert (tmp_path / "take: 2.mp4").is_file()
    assert (read_video("take: 2.mp4", 16) - x).abs().mean() < 0.1  # H.264 at 16 px: close, not exact


def test_written_files_follow_the_umask(tmp_path):
    """Files written through a temporary name get the mode the umask asks for, also where the writer makes its
    temporary file private (safetensors writes 0600)."""
    from safetensors.torch import save_file

    from latte_cli import replacing

    before = os.umask(0o022)
    try:
        with replacing(tmp_path / "shard.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, tmp)
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "shard.safetensors").stat().st_mode) == 0o644


def test_rotated_videos_are_read_upright(tmp_path):
    """A video stored landscape with a 90-degree display rotation (as phones record portrait video) is read as
    players show it: turned counter-clockwise, the stored top row on the left."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16], stored[16:] = (255, 0, 0), (0, 0, 255)  # top red, bottom blue
    with av.open(str(tmp_path / "turned.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode())
    x = (read_video(tmp_path / "turned.mp4", 16) + 1) * 127.5  # (T, 3, 16, 16)
    assert x[:, 0, :, :6].mean() > 200 and x[:, 2, :, :6].mean() < 50  # left: red
    assert x[:, 2, :, 10:].mean() > 200 and x[:, 0, :, 10:].mean() < 50  # right: blue


def test_read_video_crops_the_center_and_resizes(tmp_path):
    x = smooth_video(5, 48, 64, seed=1)
    write_video(tmp_path / "v.mp4", x)
    v = read_video(tmp_path / "v.mp4", 24)
    assert v.shape == (5, 3, 24, 24) and v.dtype == torch.float32 and -1 <= v.min() and v.max() <= 1
    # independent reference: the central 48x48 square of the source, area-averaged to 24x24
    ref = F.interpolate(x[:, :, :, 8:56], size=(24, 24), mode="area")
    assert (v - ref).abs().mean() < 0.03
    shifted = F.interpolate(x[:, :, :, :48], size=(24, 24), mode="area")  # a wrong crop is clearly worse
    assert (v - shifted).abs().mean() > 2 * (v - ref).abs().mean()
    every_other = read_video(tmp_path / "v.mp4", 24, stride=2, max_frames=2)
    assert torch.equal(every_other, v[[0, 2]])


def test_read_video_rejects_bad_files(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    for name, words in (("empty.mp4", "empty"), ("noise.mp4", "cannot read"), ("missing.mp4", "cannot read")):
        with pytest.raises(LatteError, match=words):
            read_video(tmp_path / name, 16)


def test_contact_sheet_png(tmp_path):
    videos = [smooth_video(t, 8, 10, seed=t) for t in (5, 7, 3)]
    contact_sheet(tmp_path / "sheet.png", videos, max_frames=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheet.png"]
    sheet = decode_rgb(tmp_path / "sheet.png")[0]
    assert sheet.shape == (3 * 8, 6 * 10, 3)
    cell = lambda r, c: sheet[r * 8 : (r + 1) * 8, c * 10 : (c + 1) * 10]
    as_uint8 = lambda f: ((f + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(cell(1, 5), as_uint8(videos[1][5]))  # PNG is lossless
    assert np.array_equal(cell(0, 0), as_uint8(videos[0][0]))
    assert cell(2, 4).max() == 0  # the 3-frame video leaves its later cells black
    # a (B, T, 3, H, W) batch works the same, and a PNG reads back as a one-frame item
    contact_sheet(tmp_path / "batch.png", torch.stack([videos[0], videos[0]]))
    assert decode_rgb(tmp_path / "batch.png")[0].shape == (16, 50, 3)
    assert read_video(tmp_path / "batch.png", 16).shape == (1, 3, 16, 16)


def test_synth_bouncing_shapes(tmp_path):
    paths = synth(tmp_path / "data", videos=8, frames=12, size=32, classes=4, seed=3)
    assert [p.relative_to(tmp_path / "data").as_posix() for p in paths[:2]] == [
        "class_0/video_0000.mp4", "class_1/video_0001.mp4"]
    areas = {}
    for i, path in enumerate(paths):
        v = read_video(path, 32)
        assert v.shape == (12, 3, 32, 32) and -1 <= v.min() and v.max() <= 1
        rgb = (v + 1) * 127.5  # (T, 3, H, W) in 0..255
        shape = (rgb - torch.tensor(BACKGROUND)[:, None, None]).norm(dim=1) > 100  # (T, H, W)
        area = shape.flatten(1).sum(1).float()
        assert area.min() > 30 and area.max() < 160  # one bold shape, fully inside every frame
        colour = (rgb.permute(0, 2, 3, 1)[shape]).mean(0)
        assert (colour - torch.tensor(COLOURS[i % 4], dtype=torch.float)).abs().max() < 40
        areas.setdefault(i % 4, []).append(area.mean().item())
        # the centre moves 1-3 px per frame at a constant velocity, except on the frames it bounces; the
        # shape is drawn on whole pixels, so each step is the true one rounded up or down
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        centre = torch.stack([(xx * shape).sum((1, 2)), (yy * shape).sum((1, 2))], 1) / area[:, None]
        step = centre.diff(dim=0).abs()  # (T - 1, 2) as (x, y)
        assert 0.8 < step.mean(0).norm() < 3.3
        assert ((step - step.mean(0)).abs().max(1).values < 1).float().mean() >= 0.6
    # the class decides the shape: square > disc > triangle, diamond in pixel count
    square, disc, tri, diamond = (np.mean(areas[k]) for k in range(4))
    assert square > disc > max(tri, diamond)
    again = synth(tmp_path / "again", videos=2, frames=12, size=32, classes=4, seed=3)
    other = synth(tmp_path / "other", videos=2, frames=12, size=32, classes=4, seed=4)
    assert again[1].read_bytes() == paths[1].read_bytes()
    assert not np.array_equal(decode_rgb(other[1]), decode_rgb(paths[1]))
    # shape_size: a square's side is that share of the frame: 2r or 2r + 1 whole pixels, r = size * share / 2
    for share in (0.25, 0.5):
        big = read_video(synth(tmp_path / f"s{share}", videos=1, frames=4, size=32, classes=1, shape_size=share)[0], 32)
        lit = ((big + 1) * 127.5 - torch.tensor(BACKGROUND)[:, None, None]).norm(dim=1) > 100
        area, r = lit.flatten(1).sum(1).float(), 32 * share / 2
        assert 0.9 * (2 * r) ** 2 <= area.min() and area.max() <= 1.1 * (2 * r + 1) ** 2


def test_synth_rejects_impossible_requests(tmp_path):
    with pytest.raises(LatteError, match="classes"):
        synth(tmp_path, videos=2, frames=4, size=32, classes=21)
    with pytest.raises(LatteError):
        synth(tmp_path, videos=0, frames=4, size=32, classes=1)
    with pytest.raises(LatteError, match="shape size"):
        synth(tmp_path, videos=2, frames=4, size=32, classes=1, shape_size=0.9)


def test_an_unforeseen_error_is_one_line_unless_asked_for_its_traceback(tmp_path, monkeypatch):
    """What no check foresaw (here a TypeError deep in synth) still ends in one line and exit code 1, naming the
    exception; LATTE_TRACEBACK=1 lets it through with its traceback."""
    from typer.testing import CliRunner

    import latte_cli.video
    from latte_cli.cli import app

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for -: 'str' and 'float'\nsecond line")

    monkeypatch.setattr(latte_cli.video, "synth", broken)
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "v")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: TypeError: unsupported operand type(s) for -: 'str' and 'float' (LATTE_TRACEBACK=1 shows where)"]
    monkeypatch.setenv("LATTE_TRACEBACK", "1")
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "v")])
    assert result.exit_code == 1 and isinstance(result.exception, TypeError)


def test_an_output_folder_that_is_a_file_is_a_plain_one_line_error(tmp_path):
    """An OSError names the path and what is wrong with it in words, not Python's "[Errno 17] File exists: ..."; the
    file in the way is left as it was."""
    from typer.testing import CliRunner

    from latte_cli.cli import app

    in_the_way = tmp_path / "videos"
    in_the_way.write_text("notes")
    for out, reason in ((in_the_way, "a file of that name is in the way of the folder"),
                        (in_the_way / "sub", "a part of this path is a file, not a folder")):
        result = CliRunner().invoke(app, ["synth", str(out), "--videos", "1", "--frames", "2"])
        assert result.exit_code == 1 and "Errno" not in result.output
        assert result.output.strip().splitlines() == [f"error: {out}: {reason}"]
    assert in_the_way.read_text() == "notes"
    from latte_cli import os_error_line  # a folder that exists is named as one, not as a file in the way

    assert os_error_line(FileExistsError(errno.EEXIST, "File exists", str(tmp_path))) == f"{tmp_path}: already exists"
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "one"), "--videos", "1", "--frames", "2"])
    assert result.exit_code == 0 and result.output.strip() == f"wrote 1 video of 2 frames to {tmp_path / 'one'}"
