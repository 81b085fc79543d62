"""train.py: learning, exact resume, two gloo processes against one, EMA, joint training, bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from encode import encode
from latte_cli import LatteError
from latte_cli.cli import app
from latte_cli.diffusion import Diffusion
from latte_cli.video import synth
from model import Latte
from train import LatentClips, TrainConfig, init_weights_from, learning_rate, train, update_ema

TINY = dict(depth=2, hidden_size=64, num_heads=4, frames=4, frame_interval=2, batch=4, log_every=1,
            progress=False, device="cpu")


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Moving shapes in two classes, 16 px, pixel space (3 x 16 x 16 'latents'), with mirrored copies."""
    root = tmp_path_factory.mktemp("data")
    synth(root / "videos", videos=8, frames=12, size=16, classes=2, seed=0)
    encode(root / "videos", root / "latents", vae="none", size=16, labels="folders", flip=True)
    return root / "latents"


def weights(folder, name="model"):
    return load_file(str(folder / f"{name}.safetensors"))


def test_loss_goes_down(latents, tmp_path):
    cfg = TrainConfig(data=str(latents), out=str(tmp_path / "run"), steps=40, lr=2e-3, ckpt_every=40, **TINY)
    last = train(cfg)
    diffusion, g = Diffusion(), torch.Generator().manual_seed(123)
    data = LatentClips(latents, 4, 2, 0, flip=False)
    x0, y = data.batch(16, g, list(range(16)))
    t, noise = torch.randint(1000, (16,), generator=g), torch.randn(x0.shape, generator=g)

    def mse(model):
        with torch.no_grad():
            return diffusion.training_losses(model.eval(), x0, t, {"y": y}, noise)["mse"].mean().item()

    trained = Latte.from_pretrained(last / "model.safetensors")
    untrained = Latte(trained.config)
    assert mse(trained) < 0.8 * mse(untrained)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 40 and all(k in log[0] for k in ("loss", "mse", "vb", "grad_norm", "clips_per_s"))


def test_resume_is_exact(latents, tmp_path):
    straight = train(TrainConfig(data=str(latents), out=str(tmp_path / "a"), steps=6, ckpt_every=6, **TINY))
    train(TrainConfig(data=str(latents), out=str(tmp_path / "b"), steps=3, ckpt_every=3, **TINY))
    resumed = train(TrainConfig(data=str(latents), out=str(tmp_path / "b"), steps=6, ckpt_every=3, resume=True,
                                **TINY))
    assert resumed.name == straight.name == "step_00000006"
    for name in ("model", "ema"):
        a, b = weights(straight, name), weights(resumed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = torch.load(straight / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(resumed / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    # keep-last and atomic folders: only whole checkpoints, no temporary folders
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000006"]


def test_two_gloo_processes_match_one(latents, tmp_path):
    args = ["train", str(latents), "--steps", "3", "--batch", "4", "--depth", "2", "--hidden-size", "64",
            "--num-heads", "4", "--frames", "4", "--frame-interval", "2", "--device", "cpu", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=300)
    ddp = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "latte_cli",  # a free port
              *args, "--out", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = run("-m", "latte_cli", *args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-2000:]
    ckpt = tmp_path / "ddp" / "checkpoints" / "step_00000003"
    prints = json.loads((ckpt / "state.json").read_text())["rank_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]  # both ranks hold identical weights
    a, b = weights(ckpt), weights(tmp_path / "one" / "checkpoints" / "step_00000003")
    # the same global batch: equal up to float32 summation order (gloo sums the two halves' gradients)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def test_ema_arithmetic():
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    e0, d, values = 0.5, 0.9, [1.0, -2.0, 3.0, 0.25]
    ema.weight.data.fill_(e0)
    for v in values:
        model.weight.data.fill_(v)
        update_ema(ema, model, d)
    n = len(values)  # ema_n = d^n e_0 + (1 - d) sum_k d^(n-1-k) v_k
    expected = d**n * e0 + (1 - d) * sum(d ** (n - 1 - k) * v for k, v in enumerate(values))
    assert ema.weight.item() == pytest.approx(expected, rel=1e-6)


def test_learning_rate_schedules():
    constant = TrainConfig(data="", lr=2e-3, steps=100, warmup=10)
    assert [learning_rate(constant, s, 0.0) for s in (0, 4, 9, 50, 99)] == pytest.approx([2e-4, 1e-3, 2e-3, 2e-3, 2e-3])
    by_steps = TrainConfig(data="", lr=2e-3, steps=100, lr_decay=True)  # lr (1 + cos(pi s / S)) / 2
    assert learning_rate(by_steps, 0, 1e9) == pytest.approx(2e-3)  # no minutes: the clock does not count
    assert learning_rate(by_steps, 50, 0.0) == pytest.approx(1e-3)
    assert learning_rate(by_steps, 75, 0.0) == pytest.approx(1e-3 * (1 - 2**-0.5))
    by_time = TrainConfig(data="", lr=2e-3, steps=10**6, minutes=2.0, lr_decay=True)
    assert learning_rate(by_time, 10, 60.0) == pytest.approx(1e-3)  # half the minutes gone: half the rate
    assert learning_rate(by_time, 10, 200.0) == 0.0  # past the budget


def test_joint_training_feeds_images_from_other_videos(latents, monkeypatch, tmp_path):
    data = LatentClips(latents, 4, 2, 3, flip=False)
    x, y = data.batch(6, torch.Generator().manual_seed(0), list(range(6)))
    assert x.shape == (6, 4 + 3, 3, 16, 16) and y.shape == (6,)
    frames = {e["file"]: load_file(str(latents / e["file"]))["latents"].float() for e in data.index["files"]}
    for clip in x:
        own = next(f for f, v in frames.items() if any(torch.equal(clip[0], fr) for fr in v))
        for img in clip[4:]:
            sources = [f for f, v in frames.items() if any(torch.equal(img, fr) for fr in v)]
            assert sources and own not in sources
    seen = []
    forward = Latte.forward
    monkeypatch.setattr(Latte, "forward", lambda self, x, t, y=None, num_images=0, mask=None: (
        seen.append((x.shape[1], num_images)), forward(self, x, t, y, num_images, mask))[1])
    train(TrainConfig(data=str(latents), out=str(tmp_path / "run"), steps=1, image_frames=3, **TINY))
    assert seen == [(7, 3)]


def test_bad_data_sets_fail_cleanly(latents, tmp_path):
    runner = CliRunner()
    cases = [
        (["train", str(tmp_path / "nothing")], "not found"),
        (["train", str(latents), "--frames", "16", "--frame-interval", "3"], "frames a clip of 16"),
        (["train", str(latents), "--variant", "5", "--frames", "4"], "variant must be 1, 2, 3 or 4"),
        (["train", str(latents), "--frames", "4", "--init-from", str(tmp_path / "nothing.pt")], "does not exist"),
        (["train", str(latents), "--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA"),
        (["train", str(latents), "--frames", "4", "--device", "meta"], "unknown device"),
        (["train", str(latents), "--frames", "4", "--depth", "0"], "depth must be at least 1"),
        (["train", str(latents), "--frames", "4", "--accum", "0"], "--accum must be at least 1"),
        (["train", str(latents), "--frames", "4", "--batch", "0"], "--batch must be at least 1"),
        (["train", str(latents), "--frames", "4", "--log-every", "0"], "--log-every must be at least 1"),
        (["train", str(latents), "--frames", "4", "--image-frames", "-1"], "--image-frames must be at least 0"),
        (["train", str(latents), "--frames", "4", "--frame-interval", "0"], "--frame-interval must be at least 1"),
        (["train", str(latents), "--frames", "4", "--warmup", "-1"], "--warmup must be at least 0"),
        (["train", str(latents), "--frames", "4", "--lr", "0"], "--lr must be above 0"),
        (["train", str(latents), "--frames", "4", "--lr", "nan"], "--lr must be above 0"),
        (["train", str(latents), "--frames", "4", "--minutes", "nan"], "(and finite)"),
        (["train", str(latents), "--frames", "4", "--ema-decay", "nan"], "--ema-decay and --class-dropout must be"),
        (["train", str(latents), "--frames", "4", "--ema-decay", "2"], "--ema-decay and --class-dropout must be"),
        (["train", str(latents), "--frames", "4", "--class-dropout", "-1"], "--ema-decay and --class-dropout"),
        (["train", str(latents), "--frames", "4", "--out", str(latents / "index.json")], "index.json"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [args[0], "--out", str(tmp_path / "run"), *args[1:], "--steps", "1"])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output


def test_shards_the_index_does_not_describe_stop_before_training(latents, tmp_path):
    """A re-encode stopped halfway leaves shards of another size than index.json says, or a label edited by hand
    out of range: the run stops at the start, naming the shard, before it writes anything."""
    index = json.loads((latents / "index.json").read_text())
    first = index["files"][0]
    for case in ("size", "label"):
        data = tmp_path / case
        shutil.copytree(latents, data)
        if case == "size":  # the first shard re-made at twice the size
            shard = load_file(str(data / first["file"]))
            save_file({k: torch.cat([v, v], -1).repeat_interleave(2, -2) if v.dim() == 4 else v
                       for k, v in shard.items()}, str(data / first["file"]))
            message = f"{data / first['file']} holds latents of shape [{first['frames']}, 3, 32, 32], not the"
        else:
            edited = json.loads((data / "index.json").read_text())
            edited["files"][0]["label"] = 7
            (data / "index.json").write_text(json.dumps(edited))
            message = "label 7 is not one of the index's 2 classes"
        out = tmp_path / f"run_{case}"
        result = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--frames", "4", "--depth", "2",
                                          "--hidden-size", "32", "--num-heads", "2", "--steps", "1"])
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_resume_checks_the_state_and_a_fresh_run_takes_init_from(latents, tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(data=str(latents), out=str(run), steps=1, ckpt_every=1, **TINY))
    ckpt = run / "checkpoints" / "step_00000001"
    state = json.loads((ckpt / "state.json").read_text())
    for bad in ({"step": "two"}, {"seconds": "x"}, {"train": [1]}):  # a state.json edited or damaged
        (ckpt / "state.json").write_text(json.dumps({**state, **bad}))
        with pytest.raises(LatteError, match="cannot resume from"):
            train(TrainConfig(data=str(latents), out=str(run), steps=2, resume=True, **TINY))
    (ckpt / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "step"}))
    with pytest.raises(LatteError, match="cannot resume from.*KeyError"):
        train(TrainConfig(data=str(latents), out=str(run), steps=2, resume=True, **TINY))
    # --resume on a run with no checkpoint yet starts it, from --init-from (a restartable job's first start)
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    train(TrainConfig(data=str(latents), out=str(fresh), steps=1, resume=True, init_from=str(ckpt), lr=1e-12,
                      seed=1, **TINY))  # (another seed: other initial weights, were --init-from ignored)
    assert f"initialised 33 of 33 tensors from {ckpt}" in capsys.readouterr().out
    a, b = weights(ckpt, "ema"), weights(fresh / "checkpoints" / "step_00000001")  # (a folder gives its EMA)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # one step at lr 1e-12 from the same weights


def test_compile_without_a_compiler_is_a_one_line_error(latents, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    result = CliRunner().invoke(app, ["train", str(latents), "--frames", "4", "--depth", "2", "--hidden-size", "64",
                                      "--num-heads", "4", "--compile", "--steps", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "torch.compile does not work here" in result.output
    assert "Traceback" not in result.output


def test_nan_loss_stops_and_keeps_the_last_checkpoint(latents, tmp_path):
    bad = tmp_path / "latents"
    shutil.copytree(latents, bad)
    run = tmp_path / "run"
    train(TrainConfig(data=str(bad), out=str(run), steps=2, ckpt_every=2, **TINY))
    for f in bad.rglob("*.safetensors"):
        save_file({k: torch.full_like(v, float("nan")) if k.startswith("latents") else v
                   for k, v in load_file(str(f)).items()}, str(f), metadata={"settings": "x"})
    args = ["train", str(bad), "--out", str(run), "--resume", "--steps", "4", "--depth", "2", "--hidden-size", "64",
            "--num-heads", "4", "--frames", "4", "--frame-interval", "2", "--batch", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "loss became nan at step 2" in result.output and "step_00000002" in result.output
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert all(torch.isfinite(v).all() for v in weights(run / "checkpoints" / "step_00000002").values())


def test_nan_gradient_stops_before_the_weights_take_it(latents, tmp_path, monkeypatch):
    """A finite loss with a NaN gradient (a bf16/fp32 run has no scaler to skip it) stops the run before the
    optimiser, the EMA or a checkpoint sees it."""
    clip = torch.nn.utils.clip_grad_norm_

    def poisoned(params, max_norm):
        params[0].grad.fill_(float("nan"))
        return clip(params, max_norm)

    run = tmp_path / "run"
    train(TrainConfig(data=str(latents), out=str(run), steps=2, ckpt_every=2, **TINY))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    with pytest.raises(LatteError, match="gradient norm became nan at step 2.*step_00000002"):
        train(TrainConfig(data=str(latents), out=str(run), steps=4, ckpt_every=1, resume=True, **TINY))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]


def test_an_interrupted_checkpoint_leaves_nothing_behind(latents, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(TrainConfig(data=str(latents), out=str(run), steps=2, ckpt_every=2, **TINY))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(latents), out=str(run), steps=3, resume=True, **TINY))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]  # no .step_00000003.tmp


def test_resume_names_the_options_that_changed(latents, tmp_path, capsys):
    run = tmp_path / "run"
    train(TrainConfig(data=str(latents), out=str(run), steps=2, ckpt_every=2, **TINY))
    train(TrainConfig(data=str(latents), out=str(run), steps=3, resume=True, **TINY))
    assert "note: options changed" not in capsys.readouterr().out
    train(TrainConfig(data=str(latents), out=str(run), steps=4, resume=True, lr=2e-4, **{**TINY, "batch": 2}))
    out = capsys.readouterr().out
    assert "note: options changed since the checkpoint: --batch 4 -> 2, --lr 0.0001 -> 0.0002" in out


def test_resume_continues_the_training_clock(latents, tmp_path):
    """--minutes and a time-based learning-rate decay count the training time of the run so far, not since the
    last --resume: the checkpoint stores it and the resumed run starts from it."""
    run = tmp_path / "run"
    train(TrainConfig(data=str(latents), out=str(run), steps=2, ckpt_every=2, **TINY))
    state = json.loads((run / "checkpoints" / "step_00000002" / "state.json").read_text())
    assert state["seconds"] > 0
    state["seconds"] = 3600.0  # an hour of training so far
    (run / "checkpoints" / "step_00000002" / "state.json").write_text(json.dumps(state))
    train(TrainConfig(data=str(latents), out=str(run), steps=10, minutes=30, resume=True, **TINY))
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_00000003"  # past the budget: one step


def test_init_from_a_dit_checkpoint(latents, tmp_path):
    from model import LatteConfig

    image_model = Latte(LatteConfig(input_size=16, in_channels=3, patch_size=2, hidden_size=64, depth=2,
                                    num_heads=4, num_classes=1000))
    for p in image_model.parameters():
        p.data.normal_()
    dit = {k: v for k, v in image_model.state_dict().items() if k != "temp_embed"}  # DiT has no frame table
    torch.save(dit, tmp_path / "DiT.pt")
    video_model = Latte(LatteConfig(input_size=16, in_channels=3, patch_size=2, hidden_size=64, depth=2,
                                    num_heads=4, num_classes=2))
    message = init_weights_from(video_model, str(tmp_path / "DiT.pt"))
    assert "initialised" in message
    ours = video_model.state_dict()
    assert torch.equal(ours["blocks.1.attn.qkv.weight"], dit["blocks.1.attn.qkv.weight"])
    assert torch.equal(ours["pos_embed"], dit["pos_embed"])
    assert torch.equal(ours["y_embedder.embedding_table.weight"], torch.zeros(3, 64))


def test_bf16_autocast_and_accumulation_on_the_cpu(latents, tmp_path):
    """bf16 autocast trains on the CPU; accumulating 2 x 2 clips equals one batch of 4 in fp32."""
    tiny = {**TINY, "batch": 4}
    bf16 = train(TrainConfig(data=str(latents), out=str(tmp_path / "bf16"), steps=2, precision="bf16", **tiny))
    assert all(torch.isfinite(v).all() for v in weights(bf16).values())
    log = [json.loads(line) for line in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert all(0 < entry["loss"] < 10 for entry in log)
    one = train(TrainConfig(data=str(latents), out=str(tmp_path / "one"), steps=2, **tiny))
    two = train(TrainConfig(data=str(latents), out=str(tmp_path / "two"), steps=2, accum=2, **tiny))
    a, b = weights(one), weights(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
