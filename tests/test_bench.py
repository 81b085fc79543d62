"""`latte bench` end to end on a tiny model (the JSON read back and checked for completeness and consistency,
never for speed), and the model's fast paths against the plain formulas they replace."""

import ctypes
import ctypes.util
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from latte_cli import kernels
from latte_cli.cli import app
from latte_cli.kernels import attention
from model import Attention, Latte, LatteConfig, Mlp, rope_tables

TINY = ["--depth", "2", "--hidden-size", "64", "--num-heads", "4", "--frames", "4", "--size", "8", "--threads", "1"]


@pytest.fixture
def threads():
    """bench sets torch's thread count for the process: give the other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def rel_close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def test_bench_writes_a_complete_consistent_json(tmp_path, threads):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--grad-checkpoint", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert "of peak" in result.output and "wrote" in result.output
    r = json.loads(out.read_text())
    assert r["machine"]["threads"] == 1 and r["machine"]["device"] == "cpu"
    assert r["machine"]["amx"] == ("amx_bf16" in Path("/proc/cpuinfo").read_text())
    assert ("AMX)" in result.output) == r["machine"]["amx"]
    s = r["settings"]
    assert s["repeats"] == 2 and s["warmup"] == 1 and s["overrides"] == {"depth": 2, "hidden_size": 64, "num_heads": 4}

    assert set(r["peak"]) == {"fp32", "bf16"}
    for peak in r["peak"].values():
        assert peak["flops"] == 2 * peak["n"] ** 3 and rel_close(peak["flop_per_s"], peak["flops"] / peak["seconds"])
        assert peak["flop_per_s"] == max(peak["all"].values()) and peak["all"][f"{peak['kernel']} {peak['n']}"]
        kernels_timed = ("torch.mm", "oneDNN") if kernels.ONEDNN_LINEAR else ("torch.mm",)
        assert set(peak["all"]) == {f"{k} {n}" for k in kernels_timed for n in (256, 512)}  # the fastest of all

    passes = {"forward": 1, "forward+backward": 3, "forward+backward (checkpointed)": 3}
    rows = {(v["variant"], v["precision"], v["pass"]): v for v in r["model"]}
    assert set(rows) == {(v, p, name) for v in (1, 2, 3, 4) for p in ("fp32", "bf16") for name in passes}
    for (variant, precision, name), row in rows.items():
        cfg = LatteConfig.preset("Latte-S/2", variant=variant, input_size=8, num_frames=4, in_channels=4,
                                 depth=2, hidden_size=64, num_heads=4)
        with torch.device("meta"):
            net = Latte(cfg)
        assert row["flops"] == passes[name] * net.flops(4) and row["depth"] == 2
        assert row["params"] == sum(p.numel() for p in net.parameters())
        assert len(row["all_seconds"]) == 2 and row["seconds"] == statistics.median(row["all_seconds"])
        assert rel_close(row["flop_per_s"], row["flops"] / row["seconds"])
        assert len(row["all_peak_flop_per_s"]) == 2  # the same matmul, timed after each step
        assert row["peak_flop_per_s"] == statistics.median(row["all_peak_flop_per_s"])
        assert row["peak_flop_per_s"] > 0.2 * r["peak"][precision]["flop_per_s"]
        assert rel_close(row["utilisation"], statistics.median(  # each run's share, against the peak after it
            row["flops"] / s / p for s, p in zip(row["all_seconds"], row["all_peak_flop_per_s"], strict=True)))
        assert row["peak_memory"] is None or row["peak_memory"] > 2**20

    for precision in ("fp32", "bf16"):
        sampling = r["sampling"][precision]
        for key in ("step", "guided_step"):
            assert 0 < sampling[f"{key}_model_seconds"] <= sampling[f"{key}_seconds"]
        video = sampling["video"]
        assert video["steps"] == 2 and video["frames"] == 4 and video["vae"] == "tiny"
        assert rel_close(video["seconds"], video["sample_seconds"] + video["decode_seconds"])
        parts = video["model_seconds"] + video["vae_decoder_seconds"] + video["other_seconds"]
        assert rel_close(video["seconds"], parts)
        assert 0 < video["model_seconds"] < video["sample_seconds"] and 0 < video["vae_decoder_seconds"]
        assert rel_close(video["other_fraction"], video["other_seconds"] / video["seconds"])
        vae = r["vae"][precision]
        assert vae["pixels"] == 8 * 2  # the tiny VAE halves once
        assert rel_close(vae["encode_frames_per_s"], vae["frames"] / vae["encode_seconds"])
        assert rel_close(vae["decode_frames_per_s"], vae["frames"] / vae["decode_seconds"])


def test_bench_options_select_what_is_measured(tmp_path, threads):
    out = tmp_path / "b.json"
    args = ["bench", "--quick", "--variants", "4", "--precisions", "fp32", "--no-sampling", "--no-vae", "--batch", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert [(v["variant"], v["precision"], v["pass"]) for v in r["model"]] == [(4, "fp32", "forward"),
                                                                               (4, "fp32", "forward+backward")]
    assert list(r["peak"]) == ["fp32"] and r["sampling"] == {} and r["vae"] == {}
    with torch.device("meta"):
        net = Latte(LatteConfig.preset("Latte-S/2", variant=4, input_size=8, num_frames=4, depth=2, hidden_size=64,
                                       num_heads=4))
    assert r["model"][0]["flops"] == net.flops(4, batch=2) == 2 * net.flops(4)
    # the VAE timings encode frames into the VAE's own latents: a model of other channels times them too
    args = ["bench", "--quick", "--variants", "1", "--precisions", "fp32", "--no-sampling", "--channels", "3"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["vae"]["fp32"]["encode_seconds"] > 0


@pytest.mark.parametrize("args,message", [
    (["--precisions", "fp64"], "precision"), (["--variants", "5"], "--variants must be among 1, 2, 3, 4, not 5"),
    (["--variants", "one"], "variants"),
    (["--hidden-size", "65"], "divisible"), (["--threads", "-1"], "threads"), (["--depth", "-2"], "depth"),
    (["--depth", "0"], "depth"), (["--num-heads", "0"], "num_heads"), (["--size", "0"], "input_size"),
    (["--channels", "0"], "in_channels"), (["--device", "meta"], "unknown device"), (["--device", "cuda:7"], "cuda:7"),
    (["--out", "."], "not a file name"), (["--profile", "/dev/null/traces"], "--profile /dev/null/traces"),
    (["--channels", "3"], "pass --no-sampling")])
def test_bench_bad_options_are_one_line_errors(tmp_path, args, message, threads):
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(tmp_path / "x.json"), *TINY, *args])
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.iterdir())


def test_bench_profile_lists_the_steps_ops_and_writes_their_traces(tmp_path, threads):
    """--profile: each model row's profiled step holds the ops the model runs, as many times as it runs them (one
    oneDNN product per kernels.Linear forward; one backward of each, and one kernels.c weight gradient where it
    loads), their own times within the step's, and a Chrome trace of the same ops."""
    from latte_cli import bench

    out, traces = tmp_path / "b.json", tmp_path / "traces"
    args = ["bench", "--quick", "--variants", "1", "--no-sampling", "--no-vae", "--profile", str(traces)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert result.output.count("each op's own CPU time") == 4 and "outside the ops" in result.output
    r = json.loads(out.read_text())
    assert r["settings"]["profile"] == str(traces)
    with torch.device("meta"):
        net = Latte(LatteConfig(input_size=8, num_frames=4, hidden_size=64, depth=2, num_heads=4, variant=1))
    linears = sum(isinstance(m, kernels.Linear) for m in net.modules())
    assert linears == 8  # qkv, proj, fc1, fc2 in each of the two blocks
    names = set()
    for row in r["model"]:
        prof = row["profile"]
        train = row["pass"] == "forward+backward"
        trace = Path(prof["trace"])
        assert trace.parent == traces and trace.name == f"v1-{row['precision']}-{'train' if train else 'forward'}.json"
        ops = {op["name"]: op for op in prof["ops"]}
        own = [op["self_seconds"] for op in prof["ops"]]
        assert len(ops) == len(own) > 10 and own == sorted(own, reverse=True) and min(own) > 0
        assert sum(own) <= 1.05 * prof["seconds"] and prof["self_time"] == "cpu"
        dtype = torch.float32 if row["precision"] == "fp32" else torch.bfloat16
        if kernels.ONEDNN_LINEAR:  # + input gradients (in fp32 on Intel CPUs, MKL's)
            input_grads = train and not (kernels.MKL_FP32 and dtype == torch.float32)
            assert ops["mkldnn::_linear_pointwise"]["calls"] == linears * (2 if input_grads else 1)
        if train:
            assert ops["OneDnnLinearBackward"]["calls"] == linears
            if kernels.native_kernel() is not None and dtype == torch.bfloat16 and kernels.NATIVE["amx"]:
                assert ops["kernels.c matmul_tn_amx"]["calls"] == linears  # (on the AMX tiles)
            elif kernels.native_kernel() is not None and dtype in kernels.NATIVE_WEIGHT_GRAD:
                assert ops["kernels.c matmul_tn"]["calls"] == linears
            if kernels.NATIVE_GELU and kernels.native_kernel() is not None:  # each MLP's GELU, both ways
                assert ops["kernels.c gelu"]["calls"] == 2 * sum(isinstance(m, Mlp) for m in net.modules())
            elif row["precision"] == "fp32" and kernels.COMPILED_GELU:  # the GELU's two graphs, named shortly
                assert sum(n.startswith("torch.compile graph ") for n in ops) == 2
        assert not any(n.startswith("##") for n in ops)
        events = json.loads(trace.read_text())["traceEvents"]
        assert set(ops) <= {bench.op_name(e.get("name", "")) for e in events}
        names.add(trace.name)
    assert sorted(p.name for p in traces.iterdir()) == sorted(names)  # no temporary files left


def test_bench_profile_that_cannot_write_its_trace_is_a_one_line_error(tmp_path, threads, monkeypatch):
    """torch's trace writer logs a failed write (a full disk) and goes on: the benchmark stops with one line, and
    neither torch's temporary file nor ours stays behind."""
    from torch.profiler import profile

    def full_disk(self, path):  # as torch 2.13's writer fails: its own temporary half-written, no error raised
        Path(f"{path}.tmp").write_text("{")

    monkeypatch.setattr(profile, "export_chrome_trace", full_disk)
    args = ["bench", "--quick", "--variants", "1", "--precisions", "fp32", "--no-sampling", "--no-vae"]
    result = CliRunner().invoke(app, [*args, "--profile", str(tmp_path / "p"), "--out", str(tmp_path / "b.json"),
                                      *TINY])
    assert result.exit_code == 1 and "could not write" in result.output and "v1-fp32-forward.json" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error:")
    assert list((tmp_path / "p").iterdir()) == [] and not (tmp_path / "b.json").exists()


def test_bench_compile_without_a_compiler_is_a_one_line_error(tmp_path, threads, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    result = CliRunner().invoke(app, ["bench", "--quick", "--compile", "--out", str(tmp_path / "x.json"), *TINY])
    assert result.exit_code == 1 and "torch.compile does not work here" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_bench_memory_is_the_steps_own(threads):
    """The peak memory of a model row is its step's: the reference matmul timed beside each step (three n x n
    matrices) stays out of it."""
    from latte_cli import bench

    torch.set_num_threads(1)
    net = Latte(LatteConfig(input_size=8, num_frames=4, hidden_size=64, depth=2, num_heads=4))
    x, t, cpu = torch.randn(1, 4, 4, 8, 8), torch.tensor([3]), torch.device("cpu")
    memory = []
    for n in (64, 2048):  # 16 MiB a matrix at 2048
        peak = {"n": n, "kernel": "torch.mm", "seconds": 1.0, "flops": 2 * n**3}
        row = bench.model_row(net, net, x, t, "fp32", cpu, False, peak, 1, 1, bench.Clock(cpu))
        memory.append(row["peak_memory"])
    if None in memory:
        pytest.skip("no peak resident set to read here")
    assert abs(memory[1] - memory[0]) < 16 << 20


# ------------------------------------------------------------------------------------------- fast paths

def test_written_out_attention_matches_the_fused_kernel():
    """attention() writes the products out below fp32 on the CPU (here float64): same values and gradients as
    torch's reference (math) kernel, for q, k, v strided as the model passes them."""
    torch.manual_seed(0)
    qkv = torch.randn(6, 10, 3, 4, 8, dtype=torch.float64)  # B L 3 h Dh, as the qkv projection lays it out
    g = torch.randn(6, 4, 10, 8, dtype=torch.float64)
    grads = []
    for explicit in (True, False):
        leaf = qkv.clone().requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in leaf.unbind(2))  # B h L Dh, strided
        with sdpa_kernel(SDPBackend.MATH):
            out = attention(q, k, v) if explicit else F.scaled_dot_product_attention(q, k, v)
        out.backward(g)
        grads.append((out.detach(), leaf.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [True, False])
def test_cpu_attention_path_follows_the_dtype(dtype, grad, monkeypatch):
    """The path attention() takes on the CPU for short rows without kernels.c: fp32 the fused kernel; bf16 the
    written-out products, except for a forward on a CPU with AMX tiles. Both give the fused kernel's values to the
    dtype's precision."""
    monkeypatch.setattr(kernels, "NATIVE_ATTENTION", False)
    monkeypatch.setattr(kernels, "NATIVE_ATTENTION_F32", False)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=dtype, requires_grad=grad) for _ in range(3))
    with torch.profiler.profile() as prof:
        out = attention(q, k, v)
    fused = any("scaled_dot_product" in e.name for e in prof.events())
    assert fused == (dtype == torch.float32 or (not grad and kernels.CPU_AMX))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.allclose(out.double(), ref, atol=1e-5 if dtype == torch.float32 else 3e-2)


def random_latte(cfg: LatteConfig) -> Latte:
    """A Latte with seeded N(0, 0.1) weights everywhere (the zero-initialised gates and output layer too)."""
    torch.manual_seed(0)
    net = Latte(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.1)
    return net


def graph_nodes(out):
    nodes = [out.grad_fn]
    for node in nodes:  # the whole autograd graph, breadth first
        nodes += [f for f, _ in node.next_functions if f is not None and f not in nodes]
    return [node.name() for node in nodes]


@pytest.mark.skipif(not kernels.ONEDNN_LINEAR, reason="this torch has no oneDNN matmul")
def test_looped_fp32_attention_matches_float64(monkeypatch):
    """fp32 attention over rows of 128 and more runs a matrix at a time through oneDNN (LoopedAttention): float64
    attention's values and gradients to fp32 precision, for q, k, v strided as the model passes them, with and
    without autograd. Shorter rows, and more threads than LOOP_MAX_THREADS, keep the fused kernel."""
    monkeypatch.setattr(kernels, "LOOP_MAX_THREADS", torch.get_num_threads())
    torch.manual_seed(0)
    qkv = torch.randn(2, 130, 3, 4, 16, dtype=torch.float64)  # B L 3 h Dh, as the qkv projection lays it out
    g = torch.randn(2, 4, 130, 16, dtype=torch.float64)

    def run(dtype):
        leaf = qkv.to(dtype, copy=True).requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in leaf.unbind(2))  # B h L Dh, strided
        out = attention(q, k, v)
        out.backward(g.to(dtype))
        with torch.no_grad(), torch.profiler.profile() as prof:
            inferred = attention(q, k, v)
        fused = any("scaled_dot_product" in e.name for e in prof.events())
        return out, leaf.grad, inferred, fused, graph_nodes(out)

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    out, grad, inferred, fused, nodes = run(torch.float32)
    ref, ref_grad, *_ = run(torch.float64)
    assert "LoopedAttentionBackward" in nodes and not fused
    assert rel(out, ref) < 1e-5 and rel(inferred, ref) < 1e-5 and rel(grad, ref_grad) < 1e-5
    q = qkv.float()[:, :, 0].transpose(1, 2)
    assert kernels.looped_attention_fits(q) and not kernels.looped_attention_fits(q[:, :, :100])
    monkeypatch.setattr(kernels, "LOOP_MAX_THREADS", torch.get_num_threads() - 1)
    assert not kernels.looped_attention_fits(q)
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN switched off: the fused kernel
        assert not kernels.looped_attention_fits(q)


def test_attention_compiles_in_one_graph(monkeypatch):
    """Under torch.compile the kernel choice costs no graph break (fullgraph=True raises at one), also for fp32
    rows long enough for the oneDNN loop in eager mode."""
    monkeypatch.setattr(kernels, "LOOP_MAX_THREADS", torch.get_num_threads())
    q, k, v = (torch.randn(2, 4, 130, 16) for _ in range(3))
    compiled = torch.compile(kernels.attention, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)


@pytest.mark.skipif(not kernels.VECTOR_BYTES, reason="x86 vector width only")
def test_short_rows_take_the_softmax_in_fp32(monkeypatch):
    """bf16 rows shorter than a bf16 vector but as long as an fp32 one (temporal attention over 16 frames on
    AVX-512) take the softmax in fp32: the same values as the bf16 softmax, and gradients as close to float64's.
    (The written-out products: kernels.c, where it runs, takes these rows in fp32 anyway.)"""
    monkeypatch.setattr(kernels, "NATIVE_ATTENTION", False)
    L = kernels.VECTOR_BYTES // 4
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, L, 8, dtype=torch.float64) for _ in range(3))
    g = torch.randn(4, 3, L, 8, dtype=torch.float64)
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*exact).backward(g)
    runs = []
    for vector_bytes in (kernels.VECTOR_BYTES, 0):  # 0: every row takes the bf16 softmax
        monkeypatch.setattr(kernels, "VECTOR_BYTES", vector_bytes)
        leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves)
        casts = graph_nodes(out).count("ToCopyBackward0")
        out.backward(g.bfloat16())
        error = max((t.grad.double() - ref.grad).abs().max().item() for t, ref in zip(leaves, exact, strict=True))
        runs.append((out.detach(), casts, error))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == 2 and runs[1][1] == 0  # to fp32 and back
    assert runs[0][2] < 0.05 and runs[0][2] <= 1.5 * runs[1][2]


needs_native = pytest.mark.skipif(not kernels.NATIVE_CPU or kernels.native_kernel() is None,
                                  reason="kernels.c needs x86 AVX-512 BF16 and a C compiler")


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("S, L, h, Dh", [(2, 256, 6, 64), (3, 48, 3, 72), (5, 16, 2, 8), (1, 160, 2, 130)])
def test_native_attention_matches_float64(S, L, h, Dh, dtype, monkeypatch):
    """kernels.c against float64 attention on the same inputs, q, k and v strided in one qkv projection as the
    model passes them. bf16: the output within one bf16 rounding, with and without autograd, the gradients within
    1%, both no further off than the products written out (its scores stay fp32); fp32: within 1e-5, and no more
    than twice as far off as torch's paths (LoopedAttention for long rows, else the fused kernel). The output comes
    back in the (S, L, h, Dh) order proj reads."""
    flag = "NATIVE_ATTENTION" if dtype == torch.bfloat16 else "NATIVE_ATTENTION_F32"
    monkeypatch.setattr(kernels, "AMX_NATIVE_LENGTH", None)  # (AMX tiles: long bf16 rows go to ATen's products)
    tolerance = 2**-8 if dtype == torch.bfloat16 else 1e-5
    torch.manual_seed(0)
    qkv = (2 * torch.randn(S, L, 3, h, Dh)).to(dtype)  # S L 3 h Dh, as the qkv projection lays it out
    g = torch.randn(S, h, L, Dh).to(dtype)
    runs = {}
    for name in ("native", "written", "exact"):
        monkeypatch.setattr(kernels, flag, name == "native")
        leaf = (qkv.double() if name == "exact" else qkv.clone()).requires_grad_()
        q, k, v = (t.transpose(1, 2) for t in leaf.unbind(2))  # S h L Dh, strided
        with torch.profiler.profile() as prof:
            out = F.scaled_dot_product_attention(q, k, v) if name == "exact" else attention(q, k, v)
            out.backward(g.to(out.dtype))
        assert any(e.name == "NativeAttentionBackward" for e in prof.events()) == (name == "native")
        runs[name] = out.detach().double(), leaf.grad.double()
        if name == "native":
            with torch.no_grad():
                inferred = attention(q, k, v)
    ref, ref_grad = runs.pop("exact")
    errors = {name: ((o - ref).abs().max().item(), ((gr - ref_grad).abs().max() / ref_grad.abs().max()).item())
              for name, (o, gr) in runs.items()}
    assert (inferred.double() - ref).abs().max() <= tolerance * ref.abs().max()
    assert errors["native"][0] <= tolerance * ref.abs().max() and errors["native"][1] < 0.01 * tolerance / 2**-8
    slack = 1 if dtype == torch.bfloat16 else 2
    assert all(n <= slack * w for n, w in zip(errors["native"], errors["written"], strict=True)), errors
    assert inferred.shape == (S, h, L, Dh) and inferred.transpose(1, 2).is_contiguous()


@needs_native
def test_amx_tiles_leave_kernels_c_the_short_bf16_rows(monkeypatch):
    """With AMX tiles (AMX_NATIVE_LENGTH), kernels.c takes bf16 rows up to that length (temporal attention) and
    ATen's products on the tiles the longer ones; fp32 rows of any length stay with kernels.c."""
    monkeypatch.setattr(kernels, "NATIVE_ATTENTION", True)
    for amx, fits in ((32, {16: True, 32: True, 48: False, 256: False}), (None, dict.fromkeys((16, 48, 256), True))):
        monkeypatch.setattr(kernels, "AMX_NATIVE_LENGTH", amx)
        for L, fit in fits.items():
            q = torch.randn(2, 3, L, 8, dtype=torch.bfloat16)
            assert kernels.native_attention_fits(q, q, q) == fit, (amx, L)
            assert kernels.native_attention_fits(q.float(), q.float(), q.float())


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_attention_keeps_nans_and_splits_work_exactly(dtype, monkeypatch):
    """A NaN in a query row gives that row NaN (as torch's attention does) and no other; the matrices split over
    two threads give the very bytes of one thread. Under a dispatch mode (FlopCounterMode) torch's paths run."""
    monkeypatch.setattr(kernels, "NATIVE_ATTENTION", True)
    q, k, v = (torch.randn(4, 2, 32, 16).to(dtype) for _ in range(3))
    assert kernels.native_attention_fits(q, k, v)
    with FlopCounterMode(display=False):  # a dispatch mode sees torch's ops only: they run in its place
        assert not kernels.native_attention_fits(q, k, v)
    q[1, 0, 5, 3] = float("nan")
    out = attention(q, k, v)
    assert out[1, 0, 5].isnan().all() and out.isnan().sum() == 16
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(attention(q, k, v))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0].nan_to_num(), outs[1].nan_to_num())


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [slice(None), slice(1, 3)])  # all of qkv, or half its heads (variant 4: gaps)
def test_packed_attention_returns_one_gradient_in_qkv_layout(dtype, heads, monkeypatch):
    """packed_attention, the model's call: the same bytes as attention(q, k, v), output and gradients, its gradient
    written by kernels.c straight into qkv's layout (no stack of q's, k's and v's); without kernels.c, the same
    values through attention."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 32, 3, 4, 16).to(dtype)                                     # S L 3 h Dh
    g = torch.randn(2, 4, 32, 16)[:, heads].to(dtype)
    runs = []
    for packed, native in ((True, True), (False, True), (True, False)):
        monkeypatch.setattr(kernels, "NATIVE_ATTENTION" if dtype == torch.bfloat16 else "NATIVE_ATTENTION_F32", native)
        leaf = qkv.clone().requires_grad_()
        view = leaf.permute(2, 0, 3, 1, 4)[:, :, heads]                              # 3 S h L Dh
        out = kernels.packed_attention(view) if packed else attention(*view.unbind(0))
        nodes = graph_nodes(out)
        out.backward(g)
        runs.append((out.detach(), leaf.grad, nodes))
    (out, grad, nodes), (ref, ref_grad, ref_nodes), (fallback, fallback_grad, _) = runs
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
    assert nodes[0] == ref_nodes[0] == "NativeAttentionBackward" and "UnbindBackward0" in ref_nodes
    assert "UnbindBackward0" not in nodes and "StackBackward0" not in nodes
    tolerance = 2**-6 if dtype == torch.bfloat16 else 1e-5  # (bf16: two roundings of values up to 2)
    assert (fallback - out).abs().max() <= tolerance and (fallback_grad - grad).abs().max() <= 4 * tolerance


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_head_attention_writes_both_halves_in_place(dtype, monkeypatch):
    """Variant 4's attention by kernels.c in one piece (SplitHeadAttention): the same bytes as its halves apart and
    joined by cats, output, gradients and output without autograd, at batch 1 and 2, with no cat either way; images
    appended or RoPE over the frames take the halves apart. (bf16 too on a CPU with AMX tiles, which skips it.)"""
    monkeypatch.setattr(kernels, "AMX_NATIVE_LENGTH", None)
    torch.manual_seed(0)
    att = Attention(64, 4, "split").to(dtype)
    fits = kernels.split_head_attention_fits
    for B in (1, 2):
        x = torch.randn(B, 16, 32, 64, dtype=dtype, requires_grad=True)
        g = torch.randn(B, 16, 32, 64, dtype=dtype)
        runs = {}
        for whole in (True, False):
            monkeypatch.setattr(kernels, "split_head_attention_fits", fits if whole else lambda qkv: False)
            with torch.profiler.profile() as prof:
                out = att(x)
                grads = torch.autograd.grad(out, [x, *att.parameters()], g)
            names = [e.name for e in prof.events()]
            assert ("SplitHeadAttentionBackward" in names) == whole and ("aten::cat" in names) != whole
            with torch.no_grad():
                runs[whole] = [out, *grads, att(x)]
        assert all(torch.equal(a, b) for a, b in zip(*runs.values(), strict=True))
    qkv = att.qkv(x).unflatten(-1, (3, 4, 16))
    assert fits(qkv) and not fits(qkv[:, :, :24].contiguous()) and not fits(qkv[:, :4].contiguous())  # rows % 16
    for out in (att(x, num_images=2), att(x, rope=rope_tables(16, 16, "cpu"))):
        assert "SplitHeadAttentionBackward" not in graph_nodes(out)


def test_native_attention_falls_back_without_a_compiler(tmp_path, monkeypatch):
    """With no C compiler (and nothing built before), bf16 attention without autograd takes the written-out
    products: the same function, no error."""
    monkeypatch.setattr(kernels, "NATIVE", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert kernels.native_kernel() is None and not list(tmp_path.rglob("*.so"))
    q, k, v = (torch.randn(2, 3, 32, 8).bfloat16() for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.allclose(attention(q, k, v).double(), ref, atol=3e-2)


def test_a_damaged_kernels_build_is_set_aside(tmp_path, monkeypatch):
    """A cached build without kernels.c's functions (another library under its name) is not used, and goes, so
    that the next process builds it again."""
    import _ctypes  # a shared library without kernels.c's functions

    monkeypatch.setattr(kernels, "NATIVE", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = Path(kernels.__file__).with_name("kernels.c")
    digest = hashlib.sha256(source.read_bytes() + " ".join(kernels.NATIVE_FLAGS).encode()).hexdigest()[:16]
    build = tmp_path / "cache" / "latte" / f"kernels-{digest}.so"
    build.parent.mkdir(parents=True)
    for damaged in (Path(_ctypes.__file__).read_bytes(), b"\x7fELF truncated"):  # loads without them; does not load
        monkeypatch.setattr(kernels, "NATIVE", {})
        build.write_bytes(damaged)
        assert kernels.native_kernel() is None and not build.exists()


@needs_native
@pytest.mark.parametrize("D", [64, 72])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_adaln_matches_float64(D, dtype):
    """kernels.c's adaLN passes against float64 on the same bf16 or fp32 inputs: LayerNorm (1 + scale) + shift,
    with and without autograd, for x sliced as appended images leave it (each sample's rows contiguous, samples
    further apart), and the gated residual x + gate branch for a branch in the (B, N, F) order temporal attention
    writes (its gradient in that layout) and for one with gaps between samples: values and gradients to the
    dtype's rounding."""
    torch.manual_seed(0)
    B, Fr, N = 2, 5, 6
    x = (3 * torch.randn(B, Fr + 2, N, D) + 1).to(dtype)[:, :Fr]                        # B F N D, per sample
    shift, scale, gate = (torch.randn(B, 1, 1, D).to(dtype) for _ in range(3))
    branch = torch.randn(B, N, Fr, D).to(dtype).transpose(1, 2)                         # B F N D, strided
    g1, g2 = torch.randn(B, Fr, N, D).to(dtype), torch.randn(B, Fr, N, D).to(dtype)
    assert kernels.adaln_fits(x, shift) and kernels.adaln_fits(x, gate, branch)
    tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-5

    def grads(fn, *inputs, g):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(g.to(out.dtype))
        return [out.detach().double()] + [t.grad.double() for t in leaves], leaves

    got, _ = grads(lambda *a: kernels.norm_modulate(*a, 1e-6), x, shift, scale, g=g1)
    with torch.no_grad():
        inferred = kernels.norm_modulate(x, shift, scale, 1e-6)
    plain = lambda a, b, c: F.layer_norm(a, (D,), eps=1e-6) * (1 + c) + b  # noqa: E731
    ref, _ = grads(plain, *(t.double() for t in (x, shift, scale)), g=g1)
    assert torch.equal(inferred.double(), got[0])
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() <= tolerance * b.abs().max(), (a - b).abs().max()
    got, leaves = grads(kernels.gated_residual, x, gate, branch, g=g2)
    with torch.no_grad():
        assert torch.equal(kernels.gated_residual(x, gate, branch).double(), got[0])
    ref, _ = grads(torch.addcmul, *(t.double() for t in (x, gate, branch)), g=g2)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() <= tolerance * b.abs().max(), (a - b).abs().max()
    assert leaves[2].grad.stride() == branch.stride()
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16  # (torch's ops would promote: they take it)
    assert not kernels.adaln_fits(x, shift.to(other)) and not kernels.adaln_fits(x, gate.to(other), branch)
    whole = torch.randn(B, Fr + 2, N, D).to(dtype)

    def gapped(fn, dt):  # the branch a slice of a leaf, with gaps between samples
        leaves = [t.to(dt).clone().requires_grad_() for t in (x, gate, whole)]
        fn(leaves[0], leaves[1], leaves[2][:, 1:Fr + 1]).backward(g2.to(dt))
        return [t.grad.double() for t in leaves]

    for a, b in zip(gapped(kernels.GatedResidual.apply, dtype), gapped(torch.addcmul, torch.float64), strict=True):
        assert (a - b).abs().max() <= tolerance * b.abs().max(), (a - b).abs().max()


@needs_native
@pytest.mark.parametrize("variant", [1, 3, 4])
@pytest.mark.parametrize("kernel", ["attention", "adaln", "gelu"])
def test_native_kernels_in_the_model(variant, kernel, monkeypatch):
    """The bf16 model (spatial attention over 64 tokens and temporal over 16 frames, images appended) with each of
    kernels.c's kernels and without it: outputs, with and without autograd, and gradients as close to the fp32
    model's. Every block takes it."""
    cfg = LatteConfig(input_size=16, num_frames=16, hidden_size=64, depth=2, num_heads=4, variant=variant,
                      num_classes=3)
    net = random_latte(cfg)
    x, t, y = torch.randn(2, 18, 4, 16, 16), torch.tensor([3, 900]), torch.tensor([0, 2])

    def run(precision):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad(), kernels.frozen_weights():
                inferred = net(x, t, y, num_images=2).double()
            out = net(x, t, y, num_images=2)
        out.float().square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
        net.zero_grad()
        return inferred, out.detach().double(), grads

    monkeypatch.setattr(kernels, "AMX_NATIVE_LENGTH", None)  # (every row length, as without AMX tiles)
    ref = run("fp32")
    errors = []
    node = {"attention": "NativeAttentionBackward", "adaln": "NormModulateBackward", "gelu": "NativeGeluBackward"}
    per_block = {"attention": {1: 1, 3: 2, 4: 2}, "adaln": {1: 2, 3: 3, 4: 2}, "gelu": {1: 1, 3: 1, 4: 1}}
    for native in (True, False):
        monkeypatch.setattr(kernels, f"NATIVE_{kernel.upper()}", native)
        with torch.profiler.profile() as prof:
            runs = zip(run("bf16"), ref, strict=True)
            errors.append([(a - b).abs().max().item() / b.abs().max().item() for a, b in runs])
        calls = [e.name for e in prof.events()].count(node[kernel])
        final_layer = kernel == "adaln"  # the final layer's modulated norm too
        assert calls == native * (cfg.depth * per_block[kernel][variant] + final_layer)
    assert max(errors[0]) < 0.05 and all(n <= 1.5 * w for n, w in zip(*errors, strict=True)), errors


@pytest.mark.parametrize("variant", [1, 3, 4])
def test_fp32_and_float64_models_agree(variant, monkeypatch):
    """The fp32 model (on the CPU: oneDNN's linear layers, kernels.c's attention over 144-token frames where it runs,
    else the oneDNN loop, the fused kernel over frames, the compiled GELU, kernels.c's adaLN and weight gradients
    where it runs) and its float64 copy (plain products): the same function and the same gradients, with and
    without autograd (the fused GELU without)."""
    monkeypatch.setattr(kernels, "LOOP_MAX_THREADS", torch.get_num_threads())
    cfg = LatteConfig(input_size=24, in_channels=3, num_frames=4, hidden_size=32, depth=2, num_heads=4,
                      variant=variant, num_classes=3, temporal_pos="rope")
    net = random_latte(cfg)
    x, t, y = torch.randn(2, 5, 3, 24, 24), torch.tensor([3, 900]), torch.tensor([0, 2])
    exact = Latte(cfg).double()
    exact.load_state_dict(net.state_dict())
    reference = exact(x.double(), t, y, num_images=1)
    trained = net(x, t, y, num_images=1)
    with torch.no_grad():
        inferred = net(x, t, y, num_images=1)
    assert trained.requires_grad and torch.allclose(trained.double(), reference, atol=1e-5)
    assert torch.allclose(inferred.double(), reference, atol=1e-5)
    native = kernels.NATIVE_CPU and kernels.native_kernel() is not None
    attention = "NativeAttentionBackward" if native else "LoopedAttentionBackward" if kernels.ONEDNN_LINEAR else None
    assert attention is None or attention in graph_nodes(trained)
    assert ("NormModulateBackward" in graph_nodes(trained)) == native  # kernels.c's adaLN in fp32 too
    reference.square().sum().backward()
    trained.square().sum().backward()
    for (name, p), q in zip(net.named_parameters(), exact.parameters(), strict=True):
        assert torch.allclose(p.grad.double(), q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item()), name


def test_flop_counter_sees_the_fused_cpu_kernel():
    """kernels.py teaches torch's FlopCounterMode the CPU attention kernel: the same count as the math path,
    whose products torch counts itself."""
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    counts = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(backend), torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * 2 * (2 * 3 * 16 * 16 * 8)


@pytest.mark.skipif(not kernels.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_onednn_linear_matches_aten(precision, monkeypatch):
    """kernels.Linear on the CPU (oneDNN's matmul, bias in its epilogue, and its own backward): nn.Linear's values
    and gradients, against float64, in fp32 and under bf16 autocast, with and without autograd; fp32 weights get
    fp32 gradients, and a frozen input gets none. The backward's oneDNN calls: the input gradient's (in fp32 on
    Intel CPUs, MKL's), and the weight gradient's in fp32 elsewhere."""
    monkeypatch.setattr(kernels, "NATIVE_WEIGHT_GRAD", ())  # (kernels.c's: test_native_weight_grad_*)
    monkeypatch.setattr(kernels, "AMX_WEIGHT_GRAD", False)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape) or original(*a),
                        raising=False)
    torch.manual_seed(0)
    layer = kernels.Linear(48, 40)
    x = torch.randn(2, 3, 10, 48)
    g = torch.randn(2, 3, 10, 40)
    exact = torch.nn.Linear(48, 40).double()
    exact.load_state_dict(layer.state_dict())
    xd = x.double().requires_grad_()
    ref = exact(xd)
    ref.backward(g.double())
    tol = 1e-5 if precision == torch.float32 else 2**-7  # relative to each tensor's largest value

    def close(a, b):
        return (a.double() - b).abs().max().item() <= tol * b.abs().max().item()

    for x_grad in (True, False):
        layer.zero_grad()
        leaf = x.clone().requires_grad_(x_grad)
        with torch.autocast("cpu", precision, enabled=precision == torch.bfloat16):
            out = layer(leaf)
            with torch.no_grad():
                inferred = layer(leaf)
        assert out.dtype == inferred.dtype == precision and "OneDnnLinearBackward" in graph_nodes(out)
        calls.clear()
        out.backward(g.to(precision))
        weight_grad = [(40, 60)] if precision in kernels.ONEDNN_WEIGHT_GRAD else []  # g^T (out, tokens)
        x_onednn = x_grad and not (kernels.MKL_FP32 and precision == torch.float32)  # (MKL's on Intel CPUs)
        assert calls == ([(60, 40)] if x_onednn else []) + weight_grad
        assert close(out, ref) and close(inferred, ref)
        assert layer.weight.grad.dtype == torch.float32 and close(layer.weight.grad, exact.weight.grad)
        assert close(layer.bias.grad, exact.bias.grad)
        assert close(leaf.grad, xd.grad) if x_grad else leaf.grad is None


@pytest.mark.skipif(not kernels.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_frozen_weights_are_reordered_once_and_follow_updates(precision):
    """Inside frozen_weights() (sampling), Linear and linear_gelu without autograd reuse one cast, reordered copy
    of each weight: nn.Linear's values, the copy made once, made again after an in-place update of the weight
    (an optimiser step or load_state_dict), and dropped when the block ends."""
    if precision not in kernels.FUSED_DTYPES:
        pytest.skip(f"oneDNN takes no {precision} matmul on this CPU")
    torch.manual_seed(0)
    layer, x = kernels.Linear(48, 40), torch.randn(2, 7, 48)
    tol = 1e-5 if precision == torch.float32 else 2**-7

    def expected():
        out = F.linear(x.double(), layer.weight.double(), layer.bias.double())
        return out, F.gelu(out, approximate="tanh")

    def close(a, b):
        return (a.double() - b).abs().max().item() <= tol * b.abs().max().item()

    with torch.no_grad(), torch.autocast("cpu", precision, enabled=precision == torch.bfloat16):
        with kernels.frozen_weights():
            assert close(layer(x), expected()[0]) and close(kernels.linear_gelu(layer, x), expected()[1])
            packed = kernels.FROZEN.get()[layer][1]
            assert packed.is_mkldnn and packed.dtype == precision
            layer(x)
            with kernels.frozen_weights():  # nested: the same copies
                layer(x)
            assert kernels.FROZEN.get()[layer][1] is packed  # reused, not made again
            layer.weight.mul_(-2)  # in place, as an optimiser step or load_state_dict writes
            assert close(layer(x), expected()[0]) and close(kernels.linear_gelu(layer, x), expected()[1])
            assert kernels.FROZEN.get()[layer][1] is not packed
        assert kernels.FROZEN.get() is None


@pytest.mark.skipif(not kernels.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
def test_frozen_weights_belong_to_their_thread_and_skip_inference_tensors():
    """frozen_weights() caches for the thread that opened it (another thread sees no cache, however the blocks
    interleave), and weights made under torch.inference_mode, which keep no version counter, are cast per call."""
    layer, x = kernels.Linear(8, 8), torch.randn(3, 8)
    seen = []
    with torch.no_grad(), kernels.frozen_weights():
        layer(x)
        other = threading.Thread(target=lambda: seen.append(kernels.FROZEN.get()))
        other.start()
        other.join()
        assert layer in kernels.FROZEN.get()
    assert seen == [None] and kernels.FROZEN.get() is None
    with torch.inference_mode():
        layer = kernels.Linear(8, 8)
    with torch.no_grad(), kernels.frozen_weights():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)
        assert layer not in kernels.FROZEN.get()


NO_AVX512 = """
import torch
from latte_cli import kernels
from latte_cli.bench import matmuls
from model import Latte, LatteConfig
assert kernels.FUSED_DTYPES == (torch.float32,) and "oneDNN" not in matmuls(torch.bfloat16, torch.device("cpu"))
net = Latte(LatteConfig(input_size=8, num_frames=4, hidden_size=64, depth=2, num_heads=4))
x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([3])
with torch.autocast("cpu", torch.bfloat16):
    out = net(x, t)
    with torch.no_grad(), kernels.frozen_weights():
        assert torch.allclose(net(x, t).float(), out.float(), atol=0.05)
out.float().square().mean().backward()
print("ok")
"""


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="x86 only")
def test_bf16_runs_where_onednn_has_no_bf16_matmul():
    """On an x86 CPU without AVX-512 oneDNN builds no bf16 matmul: the bf16 paths (training, frozen sampling
    weights, the bench's peak) stay with ATen. oneDNN is capped to AVX2 in a subprocess to stand for such a CPU."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    run = subprocess.run([sys.executable, "-c", NO_AVX512], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_fused_cpu_gelu_matches_aten(monkeypatch):
    """Without autograd on the CPU, Mlp runs fc1 + tanh-GELU as one oneDNN call: the same function as
    F.gelu(fc1(x), approximate="tanh"), in fp32 and under bf16 autocast, for the whole model."""
    if not kernels.FUSED_GELU:
        pytest.skip("this torch has no oneDNN linear + GELU")
    torch.manual_seed(0)
    net = Latte(LatteConfig(input_size=16, in_channels=3, num_frames=4, hidden_size=64, depth=2, num_heads=4,
                            num_classes=5)).eval()
    for p in net.parameters():  # adaLN-Zero starts with every block switched off: give the MLPs a say
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 4, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 4])
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[3]) or original(*a),
                        raising=False)
    for precision in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", precision, enabled=precision == torch.bfloat16):
            fused = net(x, t, y).float()
            monkeypatch.setattr(kernels, "FUSED_GELU", False)
            aten = net(x, t, y).float()
            monkeypatch.setattr(kernels, "FUSED_GELU", True)
        tol = 1e-5 if precision == torch.float32 else 3e-2 * aten.abs().max().item()
        assert (fused - aten).abs().max().item() < tol
    assert calls.count("gelu") == 2 * net.config.depth  # every block's MLP went through it, in both precisions


def test_compiled_training_gelu_matches_aten(monkeypatch):
    """Training on the CPU runs the tanh-GELU as two compiled passes of h sigmoid(2u) and its derivative: the tanh
    formula's values and gradients (float32 to 1e-6, bf16 to its rounding), taken by Mlp in fp32 and bf16; where
    compiling fails, ATen's own GELU. (Where kernels.c runs, its GELU goes first, below.)"""
    monkeypatch.setattr(kernels, "NATIVE_GELU", False)
    torch.manual_seed(0)
    h32, g32 = torch.randn(4000) * 3, torch.randn(4000)
    ref = F.gelu(h32.double(), approximate="tanh")
    ref_grad = torch.ops.aten.gelu_backward(g32.double(), h32.double(), approximate="tanh")
    assert torch.allclose(kernels.gelu_forward(h32).double(), ref, atol=1e-6)
    assert torch.allclose(kernels.gelu_backward(g32, h32).double(), ref_grad, atol=1e-5)

    h = h32.view(2, 20, 100).bfloat16().requires_grad_()
    y = kernels.training_gelu(h)
    y.backward(g32.view(2, 20, 100).bfloat16())
    assert kernels.COMPILED_GELU and y.dtype == h.grad.dtype == torch.bfloat16
    assert torch.allclose(y.double(), F.gelu(h.detach().double(), approximate="tanh"), rtol=2**-7, atol=2**-7)
    ref_grad = torch.ops.aten.gelu_backward(g32.view(2, 20, 100).bfloat16().double(), h.detach().double(),
                                            approximate="tanh")
    assert torch.allclose(h.grad.double(), ref_grad, rtol=2**-7, atol=2**-7)

    for precision in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", precision, enabled=precision == torch.bfloat16):
            assert "CompiledGeluBackward" in graph_nodes(Mlp(16, 64)(torch.randn(5, 16, requires_grad=True)))

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "COMPILED_GELU", None)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):  # the first call's trial compile is the one its passes keep using: a graph each, no more
        with torch.autocast("cpu", torch.bfloat16):
            out = Mlp(16, 64)(torch.randn(5, 16, requires_grad=True))
        out.float().sum().backward()  # as train.py calls it, outside autocast
    assert kernels.COMPILED_GELU and counters["stats"]["unique_graphs"] == 2

    monkeypatch.setattr(kernels, "COMPILED_GELU", None)
    monkeypatch.setattr(torch, "compile", broken)
    assert torch.equal(kernels.training_gelu(h), F.gelu(h, approximate="tanh")) and kernels.COMPILED_GELU is False


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_gelu_matches_float64(dtype):
    """kernels.c's GELU passes (training): the tanh-GELU's values and gradients in float64 on the same inputs, to
    one bf16 rounding or (fp32) within 2e-7 and 2e-6 and no further off than ATen's fp32 GELU, also where 2u is far
    out in either direction, in a length that is no multiple of the vector width; a NaN stays NaN. An output that
    is not 64-byte aligned (in fp32: no streaming stores) gets the same bytes. Mlp takes them in both dtypes."""
    torch.manual_seed(0)
    h = torch.cat([torch.randn(4001) * 3, torch.tensor([-100.0, -12.0, 12.0, 100.0, float("nan")])]).to(dtype)
    g = torch.randn(len(h)).to(dtype)
    leaf = h.clone().requires_grad_()
    y = kernels.training_gelu(leaf)
    y.backward(g)
    assert "NativeGeluBackward" in graph_nodes(y) and y.dtype == leaf.grad.dtype == dtype
    x = h.double().requires_grad_()  # float64 h sigmoid(2u) = 0.5 h (1 + tanh u) without its cancellation at h << 0
    ref = x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    ref.backward(g.double())
    assert torch.allclose(ref, F.gelu(h.double(), approximate="tanh"), atol=1e-15, equal_nan=True)
    if dtype == torch.bfloat16:
        assert torch.allclose(y.double(), ref, rtol=2**-8, atol=1e-30, equal_nan=True)
        assert torch.allclose(leaf.grad.double(), x.grad, rtol=2**-7, atol=1e-30, equal_nan=True)
    else:  # fp32's own rounding of 2u moves e^-2u by more than 1e-6 where h << 0: errors on the scale 1 + |value|
        def error(a, b):
            return ((a.double() - b) / (1 + b.abs())).abs()[:-1].max().item()

        aten = F.gelu(h, approximate="tanh"), torch.ops.aten.gelu_backward(g, h, approximate="tanh")
        assert error(y, ref) <= 2e-7 and error(y, ref) <= 1.5 * error(aten[0], ref)
        assert error(leaf.grad, x.grad) <= 2e-6 and error(leaf.grad, x.grad) <= 1.5 * error(aten[1], x.grad)
    assert y[-1].isnan() and leaf.grad[-1].isnan() and not y[:-1].isnan().any()
    for grad in (None, g):  # into a buffer 4 bytes past a 64-byte boundary
        aligned = kernels.native_gelu(h, grad)
        shifted = torch.empty(len(h) + 1, dtype=dtype)[1:]
        kernels.native_call(kernels.NATIVE["lib"].gelu, h.data_ptr(), None if grad is None else grad.data_ptr(),
                            shifted.data_ptr(), len(h), dtype == torch.float32)
        assert aligned.data_ptr() % 64 == 0 and shifted.data_ptr() % 64 != 0
        assert torch.equal(aligned.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           shifted.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert "NativeGeluBackward" in graph_nodes(Mlp(16, 64)(torch.randn(5, 16, requires_grad=True)))


def amx_ready() -> bool:
    return kernels.native_kernel() is not None and kernels.NATIVE["amx"]


def record_native_calls(monkeypatch) -> list[str]:
    """The names of the kernels.c functions called from here on, in order (each still runs)."""
    called, native_call = [], kernels.native_call
    monkeypatch.setattr(kernels, "native_call", lambda fn, *a: called.append(fn.__name__) or native_call(fn, *a))
    return called


@needs_native
@pytest.mark.parametrize("dtype, amx", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("T, out, inp", [(4096, 384, 1536), (4096, 1152, 384), (301, 37, 45), (7, 1, 70), (129, 9, 12),
                                         (1100, 64, 64)])
def test_native_weight_grad_matches_float64(T, out, inp, dtype, amx, monkeypatch):
    """kernels.c's weight gradient g^T x and bias gradient (g's column sums, in the same pass), with fmadd or
    vdpbf16ps and in bf16 on the AMX tiles: float64's on the same inputs, in fp32 at least as close as oneDNN's and
    ATen's (bf16: its products are exact, the sums fp32), over token counts odd, short and past a block of rows,
    widths that are no multiple of its tiles, either operand the wider, and rows of g with gaps (a slice of a wider
    tensor); one, two and three threads give the same bytes (each value's sum runs in one order)."""
    if amx and not amx_ready():
        pytest.skip("this CPU has no AMX tiles")
    monkeypatch.setattr(kernels, "NATIVE_WEIGHT_GRAD", (torch.float32, torch.bfloat16))
    monkeypatch.setattr(kernels, "AMX_WEIGHT_GRAD", amx)
    called = record_native_calls(monkeypatch)
    torch.manual_seed(0)
    g = torch.randn(T, out + 5)[:, 2:out + 2].to(dtype)
    x = torch.randn(T, inp).to(dtype)
    ref, ref_bias, bias_scale = g.double().t() @ x.double(), g.double().sum(0), g.double().abs().sum(0).max()
    results = []
    for threads in (1, 2, 3):
        with torch.inference_mode():
            torch.set_num_threads(threads)
            try:
                results.append(kernels.weight_grad(g, x, bias=True))
            finally:
                torch.set_num_threads(1)
    w, b = results[0]
    assert called == ["matmul_tn_amx" if amx else "matmul_tn"] * 3
    assert w.shape == (out, inp) and w.dtype == torch.float32 and b.shape == (out,) and b.dtype == torch.float32
    assert all(torch.equal(w, rw) and torch.equal(b, rb) for rw, rb in results)
    assert kernels.weight_grad(g, x)[1] is None
    error = (w.double() - ref).abs().max() / ref.abs().max()
    bias_error = (b.double() - ref_bias).abs().max() / bias_scale  # (relative to the sum of sizes: no cancellation)
    if dtype == torch.float32:
        assert error <= 2 * (kernels.mm_t(g.t(), x.t()).double() - ref).abs().max() / ref.abs().max() + 1e-7
        assert bias_error <= 2 * (g.sum(0).double() - ref_bias).abs().max() / bias_scale + 1e-7
    assert error < 1e-6 and bias_error < 1e-6, (error, bias_error)


@needs_native
@pytest.mark.parametrize("T, out", [(4096, 1152), (301, 37), (7, 70), (129, 9)])
def test_native_column_sums_match_float64(T, out, monkeypatch):
    """kernels.c's bf16 bias gradient where the weight gradient is ATen's (CPUs with AMX tiles where the tiles'
    kernel cannot build, larger results): g's column sums in fp32, over rows with gaps and widths that are no
    multiple of its blocks, as close to float64's as fp32 rounding allows and closer than ATen's bf16 sums; fp32
    stays with ATen."""
    monkeypatch.setattr(kernels, "NATIVE_WEIGHT_GRAD", ())
    monkeypatch.setattr(kernels, "AMX_WEIGHT_GRAD", False)
    torch.manual_seed(0)
    g = torch.randn(T, out + 5)[:, 2:out + 2].bfloat16()
    x = torch.randn(T, 24).bfloat16()
    ref, scale = g.double().sum(0), g.double().abs().sum(0).max()
    w, sums = kernels.weight_grad(g, x, bias=True)
    assert torch.equal(w, g.t() @ x) and sums.dtype == torch.float32 and sums.shape == (out,)
    error = (sums.double() - ref).abs().max() / scale
    assert error <= 1e-6 and error < (g.sum(0).double() - ref).abs().max() / scale, error
    assert kernels.column_sums(g.float()).dtype == torch.float32  # ATen's
    assert torch.equal(kernels.column_sums(g.float()), g.float().sum(0))


@needs_native
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_native_weight_grad_in_the_model(precision, monkeypatch):
    """The model's gradients with kernels.c's weight gradients and without: as close to float64's, and it takes
    every linear layer's weight gradient that goes through oneDNN, but for results larger than WEIGHT_GRAD_MAX (in
    bf16 on a CPU with AMX tiles, the tiles' kernel, which has no such limit)."""
    cfg = LatteConfig(input_size=16, num_frames=8, hidden_size=64, depth=2, num_heads=4, num_classes=3)
    net = random_latte(cfg)
    x, t, y = torch.randn(2, 8, 4, 16, 16), torch.tensor([3, 900]), torch.tensor([0, 2])
    exact = random_latte(cfg).double()
    exact.load_state_dict(net.state_dict())
    exact(x.double(), t, y).square().mean().backward()
    ref = torch.cat([p.grad.flatten() for p in exact.parameters()])
    called = record_native_calls(monkeypatch)
    errors = []
    kernel = "matmul_tn_amx" if precision == "bf16" and amx_ready() else "matmul_tn"
    for native in (True, False):
        monkeypatch.setattr(kernels, "NATIVE_WEIGHT_GRAD", (torch.float32, torch.bfloat16) if native else ())
        monkeypatch.setattr(kernels, "AMX_WEIGHT_GRAD", native)
        called.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), torch.profiler.profile() as p:
            net(x, t, y).float().square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
        net.zero_grad()
        errors.append((grads - ref).abs().max().item() / ref.abs().max().item())
        layers = [e.name for e in p.events()].count("OneDnnLinearBackward")
        assert layers >= 4 * cfg.depth and called.count(kernel) == native * layers
    assert errors[0] <= 1.2 * errors[1] + 1e-7, errors
    monkeypatch.setattr(kernels, "NATIVE_WEIGHT_GRAD", (torch.float32, torch.bfloat16))
    monkeypatch.setattr(kernels, "AMX_WEIGHT_GRAD", True)
    monkeypatch.setattr(kernels, "WEIGHT_GRAD_MAX", 64 * 64 - 1)  # results past it (every layer here) go to torch
    called.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        net(x, t, y).float().square().mean().backward()
    assert "matmul_tn" not in called and called.count("matmul_tn_amx") == (kernel == "matmul_tn_amx") * layers


MALLINFO = """
import ctypes, sys, torch
from latte_cli import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "1": assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(16 << 18)  # a 16 MiB activation
held = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(held.hblkhd - before, freed.hblkhd - before, freed.fordblks)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"), reason="glibc >= 2.33 only")
def test_keep_freed_memory_keeps_activation_blocks_in_the_heap():
    """keep_freed_memory() (the latte command runs it first): glibc takes the settings, and a 16 MiB block comes
    from the heap and stays there once freed, for the next step to reuse without faulting its pages in again.
    With glibc's defaults (the control) the block is a fresh mmap that goes back to the kernel when freed."""
    runs = [subprocess.run([sys.executable, "-c", MALLINFO, flag], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parents[1]).stdout.split() for flag in ("0", "1")]
    (mapped_0, after_0, _), (mapped_1, after_1, free_1) = ([int(n) >> 20 for n in run] for run in runs)
    assert mapped_0 >= 16 and after_0 == 0  # default: mmapped, then unmapped
    assert mapped_1 == after_1 == 0 and free_1 >= 16  # kept: heap memory, still there after the free


def test_compiled_model_matches_eager_without_autograd():
    """torch.compile (bench and train --compile) traces the model's CPU paths: the oneDNN linear + GELU gives way
    to the compiler's own kernel, with the same values."""
    torch.manual_seed(0)
    net = Latte(LatteConfig(input_size=8, in_channels=4, num_frames=4, hidden_size=32, depth=2, num_heads=4))
    for p in net.parameters():  # adaLN-Zero starts with every block switched off: give the MLPs a say
        p.data.normal_(0, 0.05)
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        assert torch.allclose(torch.compile(net)(x, t), net(x, t), atol=1e-5)
