"""`latte bench`: how fast Latte runs on this machine, measured against the machine's own matmul throughput.

    latte bench                                   # Latte-S/2, 16x4x32x32 latents, batch 1, variants 1-4, fp32, bf16
    latte bench --model Latte-XL/2 --variants 1 --precisions bf16 --no-sampling --no-vae --grad-checkpoint

What it measures, each figure the median of `repeats` timed runs after `warmup` untimed ones:
  peak      large square matmuls per precision, torch.mm and on the CPU oneDNN's, which kernels.Linear calls (several
            sizes; the fastest kernel and size is the limit the model is compared with);
  model     forward (as sampling runs it: kernels.frozen_weights) and forward+backward of each variant: seconds per
            step, FLOP/s from Latte.flops (the matmuls and attention products; forward+backward counts 3x the
            forward, recomputation not counted), utilisation = FLOP/s / that matmul's FLOP/s timed again right
            after each step for as long as the step (the median of the runs' ratios), and peak memory;
  sampling  seconds per DDIM step without and with classifier-free guidance, and one whole video (50 DDIM steps,
            guided, then VAE decoding) split into model calls, VAE decoder calls and the rest (guidance, the
            sampler's arithmetic, VAE chunking);
  vae       frames/s of encoding and decoding with the SD-1.4 autoencoder's architecture (random weights);
  profile   with a folder for it: one more step of each model row under torch.profiler, each op's own time (kernels.c's
            functions among them, as "kernels.c <name>"), the top ones printed, all in the JSON, and a Chrome trace
            in the folder (chrome://tracing, Perfetto).
bf16 is autocast over fp32 weights, as train.py and sample.py run it. Everything also goes to a JSON file.
"""

import ctypes
import gc
import json
import os
import platform
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from latte_cli import PRECISIONS, LatteError, autocast, check_compiler, kernels, replacing, resolve_device
from latte_cli.diffusion import Diffusion, classifier_free_guidance
from latte_cli.vae import AutoencoderKL, VAEConfig
from model import Latte, LatteConfig

VIDEO_STEPS, GUIDANCE, CLASSES = 50, 7.0, 101  # the sampled video: DDIM-50, sample.py's default scale, UCF-101
TINY_VAE = VAEConfig(channels=(32, 32), layers=1, groups=8)  # --quick: the same code at a fraction of the cost


def bench(model: str = "Latte-S/2", frames: int = 16, size: int = 32, channels: int = 4, batch: int = 1,
          variants=(1, 2, 3, 4), precisions=("fp32", "bf16"), repeats: int = 5, warmup: int = 2,
          device: str = "auto", out: str | Path = "bench.json", sampling: bool = True, vae: bool = True,
          grad_checkpoint: bool = False, compile: bool = False, quick: bool = False,
          depth: int | None = None, hidden_size: int | None = None, num_heads: int | None = None,
          threads: int | None = None, profile: str | Path | None = None) -> dict:
    """Measure, print the tables, write `out` (JSON) and return what it holds. quick: a smoke run (a small
    matmul, at most 2 repeats and 1 warm-up, a 2-step video, a tiny VAE). threads: torch's CPU threads. profile: a
    folder for each model row's Chrome trace (made if missing)."""
    dev = resolve_device(device)
    for p in precisions:
        if p not in PRECISIONS or (p == "fp16" and dev.type != "cuda"):
            raise LatteError(f"precision {p!r} is not available on {dev.type} (fp32, bf16; fp16 on CUDA)")
    if not variants or any(v not in (1, 2, 3, 4) for v in variants):
        raise LatteError(f"--variants must be among 1, 2, 3, 4, not {','.join(map(str, variants)) or 'none'}")
    if repeats < 1 or warmup < 0 or batch < 1 or (threads is not None and threads < 1):
        raise LatteError("repeats, batch and threads must be at least 1 and warmup at least 0")
    out = Path(out)
    if not out.parent.is_dir() or out.is_dir() or not os.access(out.parent, os.W_OK):
        raise LatteError(f"--out {out}: not a file name in a writable folder")
    if threads:  # for the whole process, as torch's setting is
        torch.set_num_threads(threads)
    if dev.type == "cuda":  # as train.py: TF32 matmuls count as fp32 there, in the peak too
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if quick:
        repeats, warmup = min(repeats, 2), min(warmup, 1)
    overrides = {k: v for k, v in dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads).items()
                 if v is not None}
    configs = {v: preset(model, v, frames, size, channels, **overrides) for v in variants}  # bad options fail now
    if sampling and channels != VAEConfig().latent_channels:  # (the VAE timings encode frames: any channels)
        raise LatteError(f"the sampling timings decode with the SD-1.4 VAE's {VAEConfig().latent_channels} latent "
                         f"channels, not {channels}; pass --no-sampling")
    if compile:
        check_compiler(dev)
    if profile is not None:  # the last check, as it makes the folder
        profile = Path(profile)
        try:
            profile.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LatteError(f"--profile {profile}: cannot make the folder ({e.strerror or e})") from None
        if not os.access(profile, os.W_OK):
            raise LatteError(f"--profile {profile}: the folder is not writable")
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    clock = Clock(dev)
    run = lambda fn: measure(fn, repeats, warmup, clock)

    result = {
        "machine": machine(dev),
        "settings": dict(model=model, frames=frames, size=size, channels=channels, batch=batch,
                         variants=list(variants), precisions=list(precisions), repeats=repeats, warmup=warmup,
                         grad_checkpoint=grad_checkpoint, compile=compile, quick=quick, overrides=overrides,
                         profile=None if profile is None else str(profile)),
        "peak": {}, "model": [], "sampling": {}, "vae": {},
    }
    sizes = (256, 512) if quick else (4096, 8192) if dev.type == "cuda" else (1024, 2048, 4096)
    for p in precisions:
        console.print(f"matmul peak, {p}, n = {', '.join(map(str, sizes))}")
        result["peak"][p] = matmul_peak(sizes, getattr(torch, PRECISIONS[p]), dev, run)
    x = torch.randn(batch, frames, channels, size, size, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    for variant in variants:
        net = Latte(configs[variant]).to(dev)
        call = torch.compile(net) if compile else net
        for p in precisions:
            for checkpointed, train in ((False, False), (False, True)) + ((True, True),) * grad_checkpoint:
                row = {"variant": variant, "precision": p, "pass": "forward+backward" if train else "forward"}
                row["pass"] += " (checkpointed)" if checkpointed else ""
                console.print(f"variant {variant}, {p}, {row['pass']}")
                net.gradient_checkpointing = checkpointed
                row.update(model_row(call, net, x, t, p, dev, train, result["peak"][p], repeats, warmup, clock))
                if profile is not None:
                    name = ("train-ckpt" if checkpointed else "train") if train else "forward"
                    trace = profile / f"v{variant}-{p}-{name}.json"
                    row["profile"] = profile_step(call, net, x, t, p, dev, train, clock, trace)
                result["model"].append(row)
        del net, call

    if sampling or vae:
        autoencoder = AutoencoderKL(TINY_VAE if quick else VAEConfig()).to(dev).eval()
        vae_name = "tiny" if quick else "SD-1.4"
    if sampling:
        net = Latte(replace(configs[variants[0]], num_classes=CLASSES)).to(dev)
        for p in precisions:
            console.print(f"sampling, {p}")
            result["sampling"][p] = sample_times(net.eval(), autoencoder, (1, frames, channels, size, size), p,
                                                 dev, clock, repeats, warmup, steps=2 if quick else VIDEO_STEPS)
            result["sampling"][p]["video"]["vae"] = vae_name
        del net
    if vae:
        for p in precisions:
            console.print(f"vae, {p}")
            result["vae"][p] = {"vae": vae_name, **vae_rates(autoencoder, 1 if quick else 2, size, p, dev, run)}

    result["machine"]["load_average_after"] = load_average()
    with replacing(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print_tables(result)
    Console(highlight=False, soft_wrap=True).print(f"wrote {out}")
    return result


# ------------------------------------------------------------------------------------------------ pieces

def preset(model: str, variant: int, frames: int, size: int, channels: int, **kw) -> LatteConfig:
    try:
        return LatteConfig.preset(model, variant=variant, input_size=size, num_frames=frames,
                                  in_channels=channels, **kw)
    except ValueError as e:
        raise LatteError(f"model options: {e}") from None


class Clock:
    """Wall-clock seconds of device work: CUDA is synchronised before each reading."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def measure(fn: Callable, repeats: int, warmup: int, clock: Clock) -> list[float]:
    """Seconds of each of `repeats` runs of fn after `warmup` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        start = clock()
        fn()
        if i >= warmup:
            times.append(clock() - start)
    return times


def matmul_peak(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device, run: Callable) -> dict:
    """The fastest square n x n matmul of `sizes` and kernels: a single size understates the limit where it misses
    the caches' sweet spot (on a 1 MiB-L2 EPYC, 4096 ran fp32 10% below 1024 and 3072, and below the model's own
    linear layers), and torch.mm alone where oneDNN is faster (fp32 there: torch.mm calls MKL, 14% slower)."""
    rows = []
    for name, matmul in matmuls(dtype, device).items():
        for n in sizes:
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            seconds = statistics.median(run(lambda a=a, b=b, matmul=matmul: matmul(a, b)))
            flops = 2 * n**3
            rows.append({"kernel": name, "n": n, "flops": flops, "seconds": seconds, "flop_per_s": flops / seconds})
    best = max(rows, key=lambda r: r["flop_per_s"])
    return {**best, "all": {f"{r['kernel']} {r['n']}": r["flop_per_s"] for r in rows}}


def matmuls(dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    found = {"torch.mm": torch.mm}
    if device.type == "cpu" and kernels.ONEDNN_LINEAR and dtype in kernels.FUSED_DTYPES:  # a b^T: the same FLOPs
        found["oneDNN"] = kernels.mm_t
    return found


def model_row(call: Callable, net: Latte, x, t, precision: str, device: torch.device, train: bool, peak: dict,
              repeats: int, warmup: int, clock: Clock) -> dict:
    """One forward (no autograd), or one forward and backward of a scalar loss as a training step runs it:
    seconds, FLOP/s, peak memory, and the utilisation: the median over the runs of the step's FLOP/s over the
    matmul peak's (the fastest kernel and size again) timed right after it for about as long as the step took. A
    shared machine's speed drifts by 10% and more between minutes, and with AMX tiles by 2x within seconds (the
    neighbours' work): each share compares the model and its limit over the same stretch of time."""
    dtype = getattr(torch, PRECISIONS[precision])
    matmul = matmuls(dtype, device)[peak["kernel"]]
    step = model_step(call, net, x, t, precision, device, train)
    times, peaks = [], []
    with kernels.frozen_weights():  # forward as sample.py runs it (training takes no notice)
        reset_peak_memory(device)
        step()  # the first warm-up run, alone: the peak memory is the step's, without the reference's matrices
        memory = peak_memory(device)
        a, b = (torch.randn(peak["n"], peak["n"], device=device, dtype=dtype) for _ in range(2))
        untimed = max(warmup - 1, 0)
        for i in range(untimed + repeats):
            start = clock()
            step()
            seconds = clock() - start
            calls = max(1, round(max(seconds, 0.1) / peak["seconds"]))
            start = clock()
            for _ in range(calls):
                matmul(a, b)
            if i >= untimed:
                times.append(seconds)
                peaks.append(calls * peak["flops"] / (clock() - start))
    flops = net.flops(x.shape[1], batch=x.shape[0]) * (3 if train else 1)
    seconds = statistics.median(times)
    return {"depth": net.config.depth, "params": sum(p.numel() for p in net.parameters()), "flops": flops,
            "seconds": seconds, "all_seconds": times, "flop_per_s": flops / seconds,
            "peak_flop_per_s": statistics.median(peaks), "all_peak_flop_per_s": peaks,
            "utilisation": statistics.median(flops / s / p for s, p in zip(times, peaks, strict=True)),
            "peak_memory": memory}


def model_step(call: Callable, net: Latte, x, t, precision: str, device: torch.device, train: bool) -> Callable:
    """One forward without autograd, or (train) a forward and backward of a scalar loss as a training step runs it."""
    def forward():
        with torch.no_grad(), autocast(device.type, precision):
            call(x, t)

    def forward_backward():
        with autocast(device.type, precision):
            out = call(x, t)
        out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)

    net.train(train)
    return forward_backward if train else forward


def profile_step(call: Callable, net: Latte, x, t, precision: str, device: torch.device, train: bool, clock: Clock,
                 trace: Path) -> dict:
    """One more step (after model_row's) under torch.profiler: its seconds, each op's own time (self time: without
    the ops it calls; the GPU's on CUDA), the ops sorted by it, and the Chrome trace written to `trace`. The ops'
    times add up to the step's but for the Python around them and the profiler's own cost."""
    from torch.profiler import ProfilerActivity, profile

    step = model_step(call, net, x, t, precision, device, train)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with kernels.frozen_weights():  # as model_row timed it: an untimed step first makes the weights' frozen copies
        step()
        with profile(activities=activities) as prof:
            start = clock()
            step()
            seconds = clock() - start
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    ops = [{"name": op_name(e.key), "calls": e.count, "self_seconds": own(e) / 1e6}
           for e in prof.key_averages() if own(e) > 0]
    ops.sort(key=lambda op: -op["self_seconds"])
    with replacing(trace) as tmp:
        try:
            prof.export_chrome_trace(str(tmp))  # (torch writes a temporary file of its own and renames it)
        finally:
            Path(f"{tmp}.tmp").unlink(missing_ok=True)
        if not tmp.is_file():  # torch logs a failed write and goes on
            raise LatteError(f"--profile: could not write {trace} (is the disk full?)")
    return {"seconds": seconds, "self_time": "cuda" if cuda else "cpu", "trace": str(trace), "ops": ops}


def op_name(key: str) -> str:  # "## Call CompiledFxGraph f4l4draoozzpd...(52 letters) ##": a graph of torch.compile
    found = re.fullmatch(r"## Call CompiledFxGraph (\w{8})\w* ##", key.strip())
    return f"torch.compile graph {found[1]}" if found else key


def vae_rates(autoencoder: AutoencoderKL, frames: int, size: int, precision: str, device: torch.device,
              run: Callable) -> dict:
    """Frames/s of encoding and decoding a batch of frames (latent size x size)."""
    px = size * autoencoder.downsample
    pixels = torch.rand(frames, 3, px, px, device=device) * 2 - 1
    latents = autoencoder.encode(pixels, precision=precision)
    enc = statistics.median(run(lambda: autoencoder.encode(pixels, precision=precision)))
    dec = statistics.median(run(lambda: autoencoder.decode(latents, precision=precision)))
    return {"frames": frames, "pixels": px, "encode_seconds": enc, "decode_seconds": dec,
            "encode_frames_per_s": frames / enc, "decode_frames_per_s": frames / dec}


class CallTimer:
    """Seconds spent inside a module's forward calls, summed; as a context manager it removes its hooks."""

    def __init__(self, module: torch.nn.Module, clock: Clock):
        self.clock, self.seconds, self._start = clock, 0.0, 0.0
        self.hooks = [module.register_forward_pre_hook(self.start), module.register_forward_hook(self.stop)]

    def start(self, *_):
        self._start = self.clock()

    def stop(self, *_):
        self.seconds += self.clock() - self._start

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for hook in self.hooks:
            hook.remove()


def sample_times(net: Latte, autoencoder: AutoencoderKL, shape: tuple, precision: str, device: torch.device,
                 clock: Clock, repeats: int, warmup: int, steps: int) -> dict:
    """DDIM steps timed one by one (the median after the warm-up steps), without and with guidance, each with the
    time inside the model; then one guided video of `steps` steps decoded by the VAE, with the time inside the
    model and the VAE decoder: the rest is guidance, the sampler's arithmetic and VAE chunking."""
    y = torch.zeros(shape[0], dtype=torch.long, device=device)
    guided = classifier_free_guidance(net, GUIDANCE, {"y": torch.full_like(y, net.config.num_classes)})
    with CallTimer(net, clock) as model_timer, CallTimer(autoencoder.decoder, clock) as decoder_timer:
        def sample(fn, n: int, keep: int) -> tuple[torch.Tensor, list[float], list[float]]:
            """n DDIM steps: the latents and the last `keep` steps' seconds, in all and inside the model."""
            marks, inside = [clock()], [model_timer.seconds]

            def tick(*_):
                marks.append(clock())
                inside.append(model_timer.seconds)

            diffusion = Diffusion(learn_sigma=net.config.learn_sigma, respacing=f"ddim{n}")
            with autocast(device.type, precision), kernels.frozen_weights():  # as sample.py runs it
                z = diffusion.ddim_sample_loop(fn, shape, model_kwargs={"y": y}, device=device, callback=tick,
                                               generator=torch.Generator().manual_seed(0))
            per_step = lambda v: [b - a for a, b in zip(v[:-1], v[1:], strict=True)][-keep:]
            return z, per_step(marks), per_step(inside)

        out = {}
        for name, fn in (("step", net), ("guided_step", guided)):
            _, total, inside = sample(fn, max(warmup + repeats, 2), repeats)
            out[f"{name}_seconds"], out[f"{name}_model_seconds"] = statistics.median(total), statistics.median(inside)
        model_timer.seconds = 0.0
        start = clock()
        z = sample(guided, steps, steps)[0]
        sampled = clock()
        autoencoder.decode(z[0].float(), chunk=8, precision=precision)
        end = clock()
    other = (end - start) - model_timer.seconds - decoder_timer.seconds
    out["video"] = {"steps": steps, "frames": shape[1], "guided": True, "seconds": end - start,
                    "sample_seconds": sampled - start, "decode_seconds": end - sampled,
                    "model_seconds": model_timer.seconds, "vae_decoder_seconds": decoder_timer.seconds,
                    "other_seconds": other, "other_fraction": other / (end - start)}
    return out


def reset_peak_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # glibc keeps freed memory mapped: give it back first, so that the next peak is the next step's own
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> int | None:
    """Bytes: the CUDA allocator's peak since the reset, or on the CPU the process's peak resident set (weights,
    gradients, activations and the interpreter; None where Linux's /proc is not there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found[1]) * 1024 if found else None


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
        name = found[1].strip() if found else platform.processor() or platform.machine()
    return {"device": device.type, "name": name, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average_before": load_average(),
            "kernels_c": device.type == "cpu" and kernels.NATIVE_CPU and kernels.native_kernel() is not None,
            "amx": device.type == "cpu" and kernels.CPU_AMX}  # AMX tiles: bf16 products several times faster


# ------------------------------------------------------------------------------------------------ tables

PROFILE_ROWS = 12  # the top ops of each profiled step printed (the JSON holds them all)


def print_tables(r: dict):
    console = Console(highlight=False)
    m, s = r["machine"], r["settings"]
    native = (", kernels.c" if m.get("kernels_c") else "") + (", AMX" if m.get("amx") else "")
    console.print(f"{m['name']} ({m['device']}, {m['threads']} threads{native}), torch {m['torch']}; {s['model']}, "
                  f"batch {s['batch']}, {s['frames']}x{s['channels']}x{s['size']}x{s['size']} latents; "
                  f"median of {s['repeats']} after {s['warmup']} warm-up")
    table = Table(title="matmul peak")
    for col in ("dtype", "kernel", "n", "TFLOP/s"):
        table.add_column(col, justify="right")
    for p, v in r["peak"].items():
        for name, rate in v["all"].items():
            style = "bold" if name == f"{v['kernel']} {v['n']}" else None
            table.add_row(p, *name.split(), f"{rate / 1e12:.3f}", style=style)
    console.print(table)
    table = Table(title="model")
    for col in ("variant", "dtype", "pass", "s/step", "TFLOP/s", "peak", "of peak", "memory"):
        table.add_column(col, justify="left" if col == "pass" else "right", no_wrap=True)
    short = {"forward": "fwd", "forward+backward": "fwd+bwd", "forward+backward (checkpointed)": "fwd+bwd ckpt"}
    for v in r["model"]:
        mem = f"{v['peak_memory'] / 2**30:.2f} GiB" if v["peak_memory"] else "-"
        table.add_row(str(v["variant"]), v["precision"], short[v["pass"]], f"{v['seconds']:.4f}",
                      f"{v['flop_per_s'] / 1e12:.3f}", f"{v['peak_flop_per_s'] / 1e12:.3f}", f"{v['utilisation']:.0%}",
                      mem)
    console.print(table)
    for v in r["model"]:
        if "profile" in v:
            print_profile(console, v, short[v["pass"]])
    if r["sampling"]:
        table = Table(title="sampling: s per DDIM step; a guided video and its time shares (first variant, batch 1)")
        for col in ("dtype", "s/step", "guided", "video steps", "video s", "model", "VAE", "other"):
            table.add_column(col, justify="right", no_wrap=True)
        for p, v in r["sampling"].items():
            vid = v["video"]
            parts = ("model_seconds", "vae_decoder_seconds", "other_seconds")
            shares = [f"{vid[k] / vid['seconds']:.1%}" for k in parts]
            table.add_row(p, f"{v['step_seconds']:.4f}", f"{v['guided_step_seconds']:.4f}", str(vid["steps"]),
                          f"{vid['seconds']:.2f}", *shares)
        console.print(table)
    if r["vae"]:
        table = Table(title="VAE")
        for col in ("dtype", "frame size", "encode frames/s", "decode frames/s"):
            table.add_column(col, justify="right")
        for p, v in r["vae"].items():
            table.add_row(p, f"{v['pixels']}x{v['pixels']}", f"{v['encode_frames_per_s']:.3f}",
                          f"{v['decode_frames_per_s']:.3f}")
        console.print(table)


def print_profile(console: Console, row: dict, name: str):
    prof = row["profile"]
    ops, seconds = prof["ops"], prof["seconds"]
    where = "GPU" if prof["self_time"] == "cuda" else "CPU"
    console.print(f"variant {row['variant']}, {row['precision']}, {name}: a profiled step of {seconds:.4f} s, "
                  f"each op's own {where} time; trace {prof['trace']}", soft_wrap=True)  # (the path in one piece)
    table = Table()
    for col in ("op", "calls", "ms", "of step"):
        table.add_column(col, justify="left" if col == "op" else "right")
    shown, rest = ops[:PROFILE_ROWS], ops[PROFILE_ROWS:]
    lines = [(op["name"], str(op["calls"]), op["self_seconds"]) for op in shown]
    if rest:
        lines.append((f"{len(rest)} other ops", str(sum(op["calls"] for op in rest)),
                      sum(op["self_seconds"] for op in rest)))
    if prof["self_time"] == "cpu":  # the rest of the step's wall time: Python, autograd's bookkeeping, the profiler
        lines.append(("outside the ops", "", seconds - sum(op["self_seconds"] for op in ops)))
    for op, calls, sec in lines:
        table.add_row(op, calls, f"{sec * 1e3:.1f}", f"{sec / seconds:.1%}")
    console.print(table)
