"""Faster kernels for model.py on the CPU: the same functions as their plain PyTorch forms, computed in ways that
measured faster there. model.py calls the entry points below; each falls back to the plain form.

  attention(q, k, v)     softmax(q k^T / sqrt(Dh)) v: kernels.c, torch's fused kernel, the products written out,
                         or (fp32, long rows) a matrix at a time through oneDNN
  split_head_attention   variant 4's two halves of heads in one piece by kernels.c (no cats of the halves)
  Linear                 nn.Linear, its products through oneDNN; weight_grad, its weight gradient, kernels.c's
                         (in bf16 on the AMX tiles where the CPU has them)
  linear_gelu(fc1, x)    GELU(fc1 x) in its tanh form: one oneDNN call, kernels.c's passes (training), two
                         compiled passes, or ATen's GELU
  norm_modulate, GatedResidual
                         adaLN's LayerNorm + modulation in one pass, and the gated residual's backward in one
                         (bf16 and fp32, kernels.c); model.modulate and model.gated call them where adaln_fits

kernels.c holds the hand-written ones, for x86 CPUs with AVX-512 BF16: built on first use by the system's C compiler.
Measured on a 2-vCPU AVX-512 EPYC (no AMX) with one thread, Latte-S/2 at 16x4x32x32 (`latte bench`), and where a
comment says so on a 2-vCPU Xeon with AMX tiles; the README's performance section has the figures."""

import contextlib
import contextvars
import ctypes
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as Fn


def cpu_info(key: str) -> str:  # the first CPU's line of /proc/cpuinfo for key ("flags", "vendor_id"), or ""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(key)).split(":")[1].strip()
    except (OSError, StopIteration, IndexError):
        return ""


CPU_FLAGS = set(cpu_info("flags").split())
CPU_AMX = "amx_bf16" in CPU_FLAGS
# ATen's fp32 products call MKL, Intel's own library: on a 2-vCPU Xeon it ran Latte-S/2's products 5-10% faster than
# oneDNN (the weight gradient's, which oneDNN takes transposed, 1.6-2x), on the AMD EPYC at 65-85% of oneDNN's speed.
MKL_FP32 = cpu_info("vendor_id") == "GenuineIntel" and torch.backends.mkl.is_available()
FUSED_GELU = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_LINEAR = FUSED_GELU  # the same oneDNN entry point
ONEDNN_BF16 = ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # x86: AVX-512 or AMX; else ATen's
FUSED_DTYPES = (torch.float32, torch.bfloat16) if ONEDNN_BF16 else (torch.float32,)  # the dtypes oneDNN takes here
GELU_DTYPES = (torch.float32, torch.bfloat16)  # the compiled training GELU (any CPU)
ONEDNN_WEIGHT_GRAD = () if MKL_FP32 else (torch.float32,)  # dtypes whose weight gradient goes through oneDNN too


def cpu_dtype(x: torch.Tensor):
    """The dtype the CPU computes x's next product in (autocast's, or x's own); None off the CPU."""
    if x.device.type != "cpu":
        return None
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def onednn(dtype) -> bool:
    """Whether a CPU product in dtype goes through oneDNN now: a dtype it takes, oneDNN not switched off
    (torch.backends.mkldnn.flags), and not inside torch.compile, which makes its own kernels."""
    return (ONEDNN_LINEAR and dtype in FUSED_DTYPES and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.enabled)


def mm_t(a, b):  # a b^T through oneDNN's matmul (the linear layers' entry point, no bias or epilogue)
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


# ---------------------------------------------------------------------------------------------- attention

def attention(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v over (..., L, Dh). On the CPU in fp32 with rows of 128 and more and one or two
    threads, one matrix at a time through oneDNN (LoopedAttention, below; not under torch.compile). Otherwise
    torch's fused kernel, except on the CPU in other dtypes than fp32: there the products written out measured
    faster (bf16: spatial attention 1.8x and temporal 8x in training, 1.5x in a forward), but for a forward on a CPU
    with AMX tiles, where the fused kernel was the faster one. Written out, q, k and v are first copied out of the
    strided qkv projection (the batched products would copy them anyway, operand by operand), and the 1/sqrt(Dh)
    rides on the q k^T product instead of a pass over q. Where kernels.c runs (below), it takes all of it, in bf16
    and fp32."""
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if native_attention_fits(q, k, v):
        return NativeAttention.apply(q, k, v) if training else native_attention(q, k, v)
    if looped_attention_fits(q):
        return LoopedAttention.apply(q, k, v) if training else looped_attention(q, k, v)[0]
    if not (q.device.type == "cpu" and q.dtype != torch.float32 and (training or not CPU_AMX)):
        return Fn.scaled_dot_product_attention(q, k, v)
    out_shape = (*q.shape[:-1], v.shape[-1])
    q, k, v = (t.contiguous().flatten(0, -3) for t in (q, k, v))                    # (...) L Dh
    s = torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), beta=0, alpha=q.shape[-1] ** -0.5)
    if s.dtype == torch.bfloat16 and VECTOR_BYTES // 4 <= s.shape[-1] < VECTOR_BYTES // 2:
        return (s.float().softmax(dim=-1).to(v.dtype) @ v).view(out_shape)
    return (s.softmax(dim=-1) @ v).view(out_shape)


def packed_attention(qkv):
    """attention(*qkv.unbind(0)) for qkv (3, ..., L, Dh), views into the qkv projection's output: where kernels.c
    takes it in training, its gradient comes back as one tensor in qkv's own layout, which the projection's backward
    reads as it is (q's, k's and v's apart would be stacked into it, a copy of them all)."""
    q, k, v = qkv.unbind(0)
    if torch.is_grad_enabled() and qkv.requires_grad and native_attention_fits(q, k, v):
        return NativeAttention.apply(qkv)
    return attention(q, k, v)


# ATen's CPU softmax is several times slower on rows shorter than one vector register (measured on AVX-512: bf16 rows
# of 16 and fp32 rows of 8; rows of 32 and more run at full speed in both). A bf16 vector holds twice the elements
# of an fp32 one, so rows of 16-31 (AVX-512; 8-15 on AVX2), such as temporal attention over 16 frames, go through
# fp32: 2.3x faster forward, 3.9x forward+backward at 16 (the same values: the bf16 softmax computes in fp32 and
# rounds). Longer rows stay bf16, where the fp32 copy of the scores costs more.
VECTOR_BYTES = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability(), 0)


# fp32 attention over long rows (spatial attention) runs a (batch, head) matrix at a time through oneDNN's matmul:
# torch's fused kernel computes its fp32 products with MKL, which runs this AMD CPU's matmuls at under half of
# oneDNN's speed. Spatial attention of Latte-S/2 (96 matrices of 256 x 64): forward 1.24x, forward+backward 1.4x;
# a training step 3-4.6% faster, a forward 1.5-3.3% (A/B of alternating steps). It keeps the probabilities for the
# backward (the fused kernel recomputes them): 25 MB per spatial layer of Latte-S/2 at batch 1. Each product is
# small, so short rows (temporal attention) and many threads, which would split one product too finely (at two
# threads the gain on the attention alone was 4-8%), keep the fused kernel; bf16 too (the loop was 30% slower).
LOOP_MIN_LENGTH, LOOP_MAX_THREADS = 128, 2


def looped_attention_fits(q) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-2] >= LOOP_MIN_LENGTH and onednn(q.dtype)
            and torch.get_num_threads() <= LOOP_MAX_THREADS)  # (the compile check first: no graph break)


def looped_attention(q, k, v, keep_probs: bool = False):
    """softmax(q k^T / sqrt(Dh)) v over (..., L, Dh), one matrix at a time; with what a backward needs: q scaled,
    k, v (all (n, L, Dh)) and, if kept, the probabilities."""
    out_shape = (*q.shape[:-1], v.shape[-1])
    q = (q * q.shape[-1] ** -0.5).flatten(0, -3)  # the copy out of the strided qkv, scaled on the way
    k, v = (t.contiguous().flatten(0, -3) for t in (k, v))
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    probs = q.new_empty(*q.shape[:-1], k.shape[-2]) if keep_probs else q.new_empty(1, q.shape[-2], k.shape[-2])
    for i in range(len(q)):
        p = probs[i if keep_probs else 0]
        torch.softmax(mm_t(q[i], k[i]), -1, out=p)
        out[i] = mm_t(p, v[i].t())
    return out.view(out_shape), (q, k, v, probs)


class LoopedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, saved = looped_attention(q, k, v, keep_probs=True)
        ctx.save_for_backward(*saved)
        ctx.shapes = q.shape, k.shape, v.shape
        return out

    @staticmethod
    def backward(ctx, g):  # s = q_scaled k^T, p = softmax(s), out = p v
        q, k, v, probs = ctx.saved_tensors
        g = g.reshape(len(q), *g.shape[-2:])
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for i in range(len(q)):
            p = probs[i]
            dv[i] = mm_t(p.t(), g[i].t())                                              # p^T g
            ds = torch._softmax_backward_data(mm_t(g[i], v[i]), p, -1, p.dtype)        # (g v^T) through softmax
            dq[i] = mm_t(ds, k[i].t())                                                 # ds k
            dk[i] = mm_t(ds.t(), q[i].t())                                             # ds^T q_scaled
        dq *= q.shape[-1] ** -0.5
        return tuple(d.view(shape) for d, shape in zip((dq, dk, dv), ctx.shapes, strict=True))


# kernels.c: bf16 and fp32 kernels for x86 CPUs with AVX-512 BF16, compiled on first use with the system's C compiler
# (cc, or $CC; about a second) into ~/.cache/latte and loaded through ctypes; they run on torch's OpenMP threads. Where
# the CPU or the compiler does not fit, the paths above run. Attention computes a (sequence, head) matrix at a time in
# registers and the L1/L2 caches, with a polynomial exponential, reading q, k and v in place in the qkv projection and
# writing the output in the order the out projection reads: spatial attention of Latte-S/2 (96 matrices of 256 x 64) 4.7
# ms against 8.5 ms for the products written out, forward and backward 17 against 23 ms, and more exact (the scores stay
# fp32). Under autograd it keeps the probabilities, as the written-out products do. In fp32 (any x86 CPU with what
# kernels.c needs), the same with fmadd: spatial 10.3 against 15.6 ms for the oneDNN loop at one thread, 5.4 against 12
# at two (forward and backward 34 against 49 ms, 19 against 40-44), temporal 2.3 against 3.6 ms, 0.7 against 4.4 for the
# fused kernel; a training step 3% faster at one thread, 11% at two, a forward 6% and 11% (A/B of alternating steps).
NATIVE_CPU = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= CPU_FLAGS  # what kernels.c needs
NATIVE_ATTENTION = NATIVE_CPU  # bf16
NATIVE_ATTENTION_F32 = NATIVE_CPU
# On a CPU with AMX tiles, where ATen's bf16 products run on the tiles and vdpbf16ps at half the speed of fp32's fmadd
# (a 2-vCPU Xeon), kernels.c keeps only bf16 rows of up to 32 (temporal attention), whose products are too small for
# the tiles: Latte-S/2's temporal layer 1.6 and 3.6 ms forward and backward against 2.6 and 6.7 ms written out; its
# spatial one (rows of 256) 13.5 and 24.7 ms against 9.8 and 14.2.
AMX_NATIVE_LENGTH = 32 if CPU_AMX else None
NATIVE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                "-mavx512bf16")
NATIVE = {}  # "lib": the loaded library once built, or None where building failed


def native_attention_fits(q, k, v) -> bool:
    native = {torch.bfloat16: NATIVE_ATTENTION and (AMX_NATIVE_LENGTH is None or q.shape[-2] <= AMX_NATIVE_LENGTH),
              torch.float32: NATIVE_ATTENTION_F32}
    return (native.get(q.dtype, False) and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype
            and q.dim() == 4 and q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride()
            and q.stride(-1) == 1 and q.shape[-2] % 16 == 0 and q.shape[-1] % 2 == 0 and native_ready())


def native_ready() -> bool:
    """kernels.c built and loaded, and nothing watching torch's ops that would miss its calls: torch.compile, or a
    dispatch mode such as FlopCounterMode (which then counts torch's products in their place)."""
    return not torch.compiler.is_compiling() and not dispatch_modes() and native_kernel() is not None


dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)  # how many are active (torch's own count)


def native_kernel():
    """kernels.c as a loaded library, built into the user's cache folder on first use; None where it cannot be."""
    if "lib" not in NATIVE:
        NATIVE["lib"] = None
        source = Path(__file__).with_name("kernels.c")
        compiler = shutil.which(os.environ.get("CC", "cc"))
        digest = hashlib.sha256(source.read_bytes() + " ".join(NATIVE_FLAGS).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latte"
        path = cache / f"kernels-{digest}.so"
        built = path.exists()
        try:
            if not built:
                if compiler is None:
                    return None
                cache.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # several processes may build at once
                try:
                    subprocess.run([compiler, *NATIVE_FLAGS, "-o", str(tmp), str(source)], check=True,
                                   capture_output=True, timeout=300)
                    os.replace(tmp, path)
                    for old in cache.glob("kernels-*.so"):  # earlier versions' builds
                        if old != path:
                            old.unlink(missing_ok=True)
                finally:
                    tmp.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(path))
            ptr, long, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
            for dtype in ("bf16", "f32"):
                getattr(lib, f"attention_{dtype}").argtypes = [ptr] * 5 + [long] * 2 + [int_] * 2 + [long] * 6 + [
                    ctypes.c_float, int_]
                getattr(lib, f"attention_{dtype}_backward").argtypes = [ptr] * 9 + [long] * 2 + [int_] * 2 + [
                    long] * 12 + [ctypes.c_float, int_]
            lib.gelu.argtypes = [ptr] * 3 + [long, int_, int_]
            lib.norm_modulate.argtypes = [ptr, long, long, int_, int_, ptr, ptr, ctypes.c_float, ptr, ptr, ptr, int_,
                                          int_]
            lib.norm_modulate_backward.argtypes = [ptr, long, long, int_, int_] + [ptr] * 7 + [int_, int_]
            lib.matmul_tn.argtypes = [ptr, long] * 3 + [long] * 3 + [int_, ptr, int_]
            lib.matmul_tn_amx.argtypes = [ptr, long] * 3 + [long] * 3 + [ptr, int_]
            lib.sums_bf16.argtypes = [ptr, long, long, long, ptr, int_]
            lib.gated.argtypes = [ptr, long, ptr, int_, long, long, int_, long, long, long, ptr, ptr, int_, int_]
            lib.gated_backward.argtypes = [ptr] * 3 + [int_, long, long, int_, long, long, long, ptr, ptr, int_, int_]
        except (OSError, subprocess.SubprocessError, AttributeError):  # AttributeError: a build without a function
            if built:  # a damaged build from before: made again next time
                path.unlink(missing_ok=True)
            return None
        NATIVE["lib"] = lib
        NATIVE["amx"] = CPU_AMX and lib.amx_ready() == 1  # (Linux lets a process use the tiles once it asks)
    return NATIVE["lib"]


def native_call(fn, *args):  # every kernels.c function takes the thread count last and returns 0, or 2 out of memory
    profiled = getattr(torch.autograd.profiler, "_is_profiler_enabled", False)  # then each an op: "kernels.c gelu"
    with torch.profiler.record_function(f"kernels.c {fn.__name__}") if profiled else contextlib.nullcontext():
        if fn(*args, torch.get_num_threads()):  # (ctypes lets go of the GIL while it runs)
            raise MemoryError("kernels.c could not allocate its buffers")


def native_function(name: str, dtype, suffix: str = ""):  # kernels.c's function for dtype, as attention_bf16
    return getattr(NATIVE["lib"], f"{name}_{'f32' if dtype == torch.float32 else 'bf16'}{suffix}")


def native_attention(q, k, v, probs=None, out=None):
    """q, k, v (S, h, L, Dh) bf16 or fp32 views with the same strides -> (S, h, L, Dh), by default a view of an
    (S, L, h, Dh) tensor, else written into out (any strides, the last 1); probs, (S, h, L, L) or None, receives the
    probabilities."""
    S, h, L, Dh = q.shape
    out = q.new_empty(S, L, h, Dh).transpose(1, 2) if out is None else out
    native_call(native_function("attention", q.dtype), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                None if probs is None else probs.data_ptr(), S, h, L, Dh, *q.stride()[:3], *out.stride()[:3],
                Dh ** -0.5)
    return out


def native_attention_backward(q, k, v, out, probs, g, dq, dk, dv):  # into dq, dk, dv (strides shared, the last 1)
    S, h, L, Dh = q.shape
    native_call(native_function("attention", q.dtype, "_backward"),
                *(t.data_ptr() for t in (q, k, v, out, probs, g, dq, dk, dv)), S, h, L, Dh,
                *(t.stride(i) for t in (q, out, g, dq) for i in range(3)), Dh ** -0.5)


class NativeAttention(torch.autograd.Function):
    """Inputs q, k, v, or one packed qkv (3, S, h, L, Dh) whose gradient comes back in its layout."""

    @staticmethod
    def forward(ctx, *qkv):
        q, k, v = qkv[0].unbind(0) if len(qkv) == 1 else qkv
        probs = q.new_empty(*q.shape[:-1], q.shape[-2])                              # S h L L
        out = native_attention(q, k, v, probs)
        ctx.save_for_backward(*qkv, out, probs)
        return out

    @staticmethod
    def backward(ctx, g):
        *qkv, out, probs = ctx.saved_tensors
        q, k, v = qkv[0].unbind(0) if len(qkv) == 1 else qkv
        S, h, L, Dh = q.shape
        g = g if g.stride(-1) == 1 else g.contiguous()
        # (empty_like keeps a dense qkv's strides, and lays one with gaps out anew)
        grads = torch.empty_like(qkv[0]) if len(qkv) == 1 else q.new_empty(3, S, L, h, Dh).transpose(2, 3)
        dq, dk, dv = grads.unbind(0)
        native_attention_backward(q, k, v, out, probs, g, dq, dk, dv)
        return (grads,) if len(qkv) == 1 else (dq, dk, dv)


def split_heads(t) -> list:
    """Variant 4's halves of t (B, F, N, h, Dh) as views (S, h/2, L, Dh), two per clip: the first h/2 heads with the
    N tokens of a frame as rows (S = F), then the others with the F frames at a position as rows (S = N)."""
    half = t.shape[-2] // 2
    return [view for clip in t for view in (clip[:, :, :half].transpose(1, 2), clip[:, :, half:].permute(1, 2, 0, 3))]


def split_head_forward(qkv, keep: bool):
    """(out, probs): qkv (B, F, N, 3, h, Dh) -> out (B, F, N, h, Dh), each half written into it in place; probs, the
    halves' probabilities where keep."""
    out, probs = qkv.new_empty(qkv.shape[:3] + qkv.shape[4:]), []
    for q, k, v, o in zip(*(split_heads(qkv.select(3, i)) for i in range(3)), split_heads(out), strict=True):
        probs.append(q.new_empty(*q.shape[:-1], q.shape[-2]) if keep else None)
        native_attention(q, k, v, probs[-1], out=o)
    return out, probs


class SplitHeadAttention(torch.autograd.Function):
    """Variant 4's attention by kernels.c: the output and qkv's gradient each written whole, the halves in place
    (apart, the halves are joined by a cat each way: a training step of variant 4 0.6-1.3% faster in fp32 without
    them, 0.2-1.7% in bf16, A/B)."""

    @staticmethod
    def forward(ctx, qkv):
        out, probs = split_head_forward(qkv, keep=True)
        ctx.save_for_backward(qkv, out, *probs)
        return out

    @staticmethod
    def backward(ctx, g):
        qkv, out, *probs = ctx.saved_tensors
        grad = torch.empty_like(qkv)
        q, k, v, dq, dk, dv = (split_heads(t.select(3, i)) for t in (qkv, grad) for i in range(3))
        for args in zip(q, k, v, split_heads(out), probs, split_heads(g.contiguous()), dq, dk, dv, strict=True):
            native_attention_backward(*args)
        return grad


def split_head_attention(qkv):
    """Variant 4's attention, qkv (B, F, N, 3, h, Dh) from the qkv projection -> (B, F, N, h, Dh): half the heads
    over the tokens of a frame, half over the frames at a position, by kernels.c (split_head_attention_fits)."""
    if torch.is_grad_enabled() and qkv.requires_grad:
        return SplitHeadAttention.apply(qkv)
    return split_head_forward(qkv, keep=False)[0]


def split_head_attention_fits(qkv) -> bool:
    if not (qkv.dim() == 6 and qkv.shape[-2] % 2 == 0 and qkv.is_contiguous() and qkv.shape[0] > 0):
        return False
    q, k, v = (split_heads(qkv[:1].select(3, i)) for i in range(3))  # the first clip's two halves stand for all
    return all(native_attention_fits(*half) for half in zip(q, k, v, strict=True))


# ------------------------------------------------------------------------------------------------- linear

class Linear(torch.nn.Linear):
    """nn.Linear whose products run through oneDNN on the CPU in fp32 and bf16, which measured faster there than
    ATen's: the bias rides in the matmul's epilogue (bf16 addmm adds it in a pass of its own: 5-10% slower), and
    fp32 ATen calls MKL, which ran this AMD CPU's matmuls at 65-85% of oneDNN's speed. The input gradient goes
    through oneDNN too, and the weight gradient (weight_grad, below) through kernels.c, else oneDNN in fp32 (g^T x
    at 1.7-1.9x MKL's speed: a training step 15-19% faster) and ATen in bf16 (5-20% faster than oneDNN there)."""

    def forward(self, x):
        dtype = cpu_dtype(x)
        if not onednn(dtype):
            return super().forward(x)
        if torch.is_grad_enabled():
            return OneDnnLinear.apply(x.to(dtype), self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), *inference_weights(self, dtype), "none", [], "")


FROZEN = contextvars.ContextVar("frozen_weights", default=None)  # inside frozen_weights(): {layer: (key, w, b)}


@contextlib.contextmanager
def frozen_weights():
    """For sampling, where the weights do not change: inside, a Linear called without autograd casts its weight
    once and keeps it reordered into oneDNN's blocked layout (2-7% faster matmuls than the plain layout, measured
    in both dtypes, and no cast per call), until the weight changes in place (optimiser steps, load_state_dict,
    copy_ under no_grad; a change through .data goes unseen) or the block ends. The copies belong to the thread
    that opened the block."""
    token = FROZEN.set({} if FROZEN.get() is None else FROZEN.get())
    try:
        yield
    finally:
        FROZEN.reset(token)


def inference_weights(layer: torch.nn.Linear, dtype):  # (weight, bias) in dtype for a call without autograd
    w, b = layer.weight, layer.bias
    frozen = FROZEN.get()
    if frozen is None or any(t is not None and t.is_inference() for t in (w, b)):  # (these keep no _version)
        return w.to(dtype), None if b is None else b.to(dtype)
    key = (dtype, w.data_ptr(), w._version, None if b is None else b._version)  # in-place updates move _version
    if layer not in frozen or frozen[layer][0] != key:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype))
        frozen[layer] = key, packed, None if b is None else b.detach().to(dtype)
    return frozen[layer][1:]


class OneDnnLinear(torch.autograd.Function):
    """x w^T + b with x in the dtype to compute in and w, b the layer's own (cast here, not by autograd: the weight's
    and bias's gradients come back in their dtype, without a round trip through bf16)."""

    @staticmethod
    def forward(ctx, x, w, b):
        w = w.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.ops.mkldnn._linear_pointwise(x, w, None if b is None else b.to(x.dtype), "none", [], "")

    @staticmethod
    def backward(ctx, g):  # g (..., out): x's gradient g w, w's g^T x, b's the sum of g
        x, w = ctx.saved_tensors
        g = g.reshape(-1, g.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ w if MKL_FP32 and g.dtype == torch.float32 else mm_t(g, w.t())).view(x.shape)
        bias = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            gw, gb = weight_grad(g, x.reshape(-1, x.shape[-1]), bias)
        elif bias:
            gb = g.sum(0)
        return gx, gw, gb


# kernels.c's weight gradient reads g and x in place (oneDNN's fp32 one takes both transposed: two copies, at two
# threads a third of its time; ATen's bf16 one ran at ~80% of the peak in a training step). Latte-S/2's four of a
# block in a training step: fp32 65 against 77 ms at one thread, 32 against 43 ms at two; bf16 33.5 against 35.6
# ms; training steps 4% (fp32, one thread), 7-9% (fp32, two) and 0.6-1.6% (bf16) faster (A/B of alternating steps).
# With larger results it fell behind (each block of tokens reads and writes the fp32 result again): Latte-XL/2's fc1
# and fc2 (4608 x 1152) in bf16 took 62 against ATen's 49-53 ms at two threads, and with only its qkv and proj
# (3456 x 1152, 1152 x 1152; faster alone) a bf16 training step was still 3% slower. Latte-S/2's are at most 0.6 Mi.
# On a CPU with AMX tiles kernels.c's vdpbf16ps ran at half its own fp32 speed (a 2-vCPU Xeon: 0.14-0.16 TFLOP/s;
# ATen's bf16 product on the tiles 0.8-1.2, Latte-S/2's four of a block 12-16 against 96 ms): there bf16 runs on the
# tiles instead, in kernels.c's matmul_tn_amx (AMX_WEIGHT_GRAD): the narrower of g and x laid out transposed in
# tiles, the other as pairs of rows, fp32 results and the bias's sums in the same pass, and no limit on the result's
# size. The four of a block there 11.6 and 19.5 ms against ATen's 16.0 and 25.5 (two runs, 40 rounds each; paired
# ratios 0.73, 0.74), Latte-XL/2's 0.73-0.87 of ATen's time; a bf16 training step of variant 1 7% faster (A/B of
# alternating steps, 10 of 16 pairs). Where the tiles' kernel cannot build, bf16 goes to ATen on such CPUs.
NATIVE_WEIGHT_GRAD = ((torch.float32,) if CPU_AMX else (torch.float32, torch.bfloat16)) if NATIVE_CPU else ()
WEIGHT_GRAD_MAX = 1 << 20  # values of the result (matmul_tn)
AMX_WEIGHT_GRAD = CPU_AMX


def weight_grad(g, x, bias: bool = False):
    """(g^T x, g's column sums if bias else None) for g (T, out) and x (T, in): a linear layer's weight and bias
    gradients, by kernels.c (fp32 results, the sums in the same pass; in bf16 on the AMX tiles where the CPU has
    them), oneDNN (fp32, but for MKL on Intel CPUs) or ATen (bf16, where it was faster than oneDNN; the sums by
    column_sums)."""
    fits = (g.dtype == x.dtype and g.device.type == "cpu" and len(g) and g.stride(1) == x.stride(1) == 1
            and native_ready())
    if fits and g.dtype == torch.bfloat16 and AMX_WEIGHT_GRAD and NATIVE["amx"]:
        fn, args = NATIVE["lib"].matmul_tn_amx, ()
    elif fits and g.dtype in NATIVE_WEIGHT_GRAD and g.shape[1] * x.shape[1] <= WEIGHT_GRAD_MAX:
        fn, args = NATIVE["lib"].matmul_tn, (g.dtype == torch.float32,)
    else:
        w = mm_t(g.t(), x.t()) if x.dtype in ONEDNN_WEIGHT_GRAD else g.t() @ x
        return w, column_sums(g) if bias else None
    w = g.new_empty(g.shape[1], x.shape[1], dtype=torch.float32)
    sums = g.new_empty(g.shape[1], dtype=torch.float32) if bias else None
    native_call(fn, g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), *w.shape, len(g),
                *args, None if sums is None else sums.data_ptr())
    return w, sums


def column_sums(g):
    """g.sum(0) for g (T, out): in bf16, kernels.c's sums in fp32 where it runs (ATen's, rounded to bf16, took 1.4
    against 0.9 ms for the four of a Latte-S/2 block on a 2-vCPU Xeon with AMX tiles), else ATen's."""
    if not (NATIVE_CPU and g.dtype == torch.bfloat16 and g.device.type == "cpu" and len(g) and g.stride(1) == 1
            and native_ready()):
        return g.sum(0)
    sums = g.new_empty(g.shape[1], dtype=torch.float32)
    native_call(NATIVE["lib"].sums_bf16, g.data_ptr(), g.stride(0), *g.shape, sums.data_ptr())
    return sums


# -------------------------------------------------------------------------------------------------- adaLN

# kernels.c, in bf16 and fp32: adaLN's LayerNorm and modulation (and under autocast the cast to bf16) as one pass and
# its backward as one, and the gated residual's backward as one (g passes on to x; g gate to the branch, in its
# layout; the sum of g branch to the gate), in place of several ATen passes with fp32 temporaries each.
NATIVE_ADALN = NATIVE_CPU


def adaln_fits(x, mod, branch=None) -> bool:
    """Whether kernels.c takes this sub-layer: x (B, F, N, D), bf16 (the residual stream under autocast) or fp32,
    with each sample's rows contiguous, mod (B, 1, 1, D) of x's dtype; a branch of x's dtype with contiguous rows."""
    B, F, N, D = x.shape if x.dim() == 4 else (0,) * 4
    return (NATIVE_ADALN and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
            and cpu_dtype(x) == x.dtype and x.dim() == 4 and x.stride()[1:] == (N * D, D, 1)
            and mod.shape == (B, 1, 1, D) and mod.dtype == x.dtype
            and (branch is None or (branch.dtype == x.dtype and branch.shape == x.shape and branch.stride(3) == 1))
            and native_ready())


def norm_modulate(x, shift, scale, eps: float):
    """LayerNorm(x) (1 + scale) + shift (a LayerNorm without affine weights), for x that adaln_fits."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, shift, scale)):
        return NormModulate.apply(x, shift, scale, eps)
    return NormModulate.forward(None, x, shift, scale, eps)


class NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        B, F, N, D = x.shape
        dtype = shift.dtype
        shift, scale = (t.reshape(B, D).float().contiguous() for t in (shift, scale))
        y = x.new_empty(x.shape)
        mean, rstd = (x.new_empty(B * F * N, dtype=torch.float32) if ctx else None for _ in range(2))
        native_call(NATIVE["lib"].norm_modulate, x.data_ptr(), x.stride(0), F * N, B, D, shift.data_ptr(),
                    scale.data_ptr(), eps, y.data_ptr(), *(None if t is None else t.data_ptr() for t in (mean, rstd)),
                    x.dtype == torch.float32)
        if ctx:
            ctx.save_for_backward(x, scale, mean, rstd)
            ctx.dtype = dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        B, F, N, D = x.shape
        dy = dy.to(x.dtype).contiguous()
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dscale, dshift = (x.new_empty(B, D, dtype=torch.float32) for _ in range(2))
        native_call(NATIVE["lib"].norm_modulate_backward, x.data_ptr(), x.stride(0), F * N, B, D,
                    *(t.data_ptr() for t in (scale, mean, rstd, dy, dx, dscale, dshift)), x.dtype == torch.float32)
        return dx, dshift.view(B, 1, 1, D).to(ctx.dtype), dscale.view(B, 1, 1, D).to(ctx.dtype), None


def gated_residual(x, gate, branch):
    """x + gate branch, for x, gate and branch that adaln_fits."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, branch)):
        return GatedResidual.apply(x, gate, branch)
    return GatedResidual.forward(None, x, gate, branch)


class GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, branch):
        B, F, N, D = x.shape
        gate32, y = gate.reshape(B, D).float().contiguous(), x.new_empty(x.shape)
        native_call(NATIVE["lib"].gated, x.data_ptr(), x.stride(0), branch.data_ptr(), B, F, N, D,
                    *branch.stride()[:3], gate32.data_ptr(), y.data_ptr(), x.dtype == torch.float32)
        if ctx:
            ctx.save_for_backward(gate, branch)
        return y

    @staticmethod
    def backward(ctx, g):
        gate, branch = ctx.saved_tensors
        B, F, N, D = branch.shape
        g, gate32 = g.to(branch.dtype).contiguous(), gate.reshape(B, D).float().contiguous()
        dbranch, dgate = torch.empty_like(branch), g.new_empty(B, D, dtype=torch.float32)
        if dbranch.stride() != branch.stride():  # a branch with gaps: kernels.c reads and writes one layout
            branch = branch.contiguous()
            dbranch = torch.empty_like(branch)
        native_call(NATIVE["lib"].gated_backward, g.data_ptr(), branch.data_ptr(), dbranch.data_ptr(), B, F, N, D,
                    *branch.stride()[:3], gate32.data_ptr(), dgate.data_ptr(), branch.dtype == torch.float32)
        return g, dgate.view(B, 1, 1, D).to(gate.dtype), dbranch


# --------------------------------------------------------------------------------------------------- GELU

def linear_gelu(fc1: torch.nn.Linear, x):
    """Fn.gelu(fc1(x), approximate="tanh"). ATen's tanh-GELU takes longer than the fc1 matmul on the CPU (~6x in
    bf16), so: without autograd, oneDNN applies the same GELU in the matmul's epilogue (with autograd, computing
    fc1 twice, fused and plainly for the backward, cost as much as it saved); in training, kernels.c's passes or
    two compiled ones (training_gelu)."""
    dtype = cpu_dtype(x)
    if FUSED_GELU and not torch.is_grad_enabled() and onednn(dtype):
        w, b = inference_weights(fc1, dtype)  # (torch.compile makes its own fused kernel)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, b, "gelu", [], "tanh")
    if dtype in GELU_DTYPES and torch.is_grad_enabled():
        return training_gelu(fc1(x))
    return Fn.gelu(fc1(x), approximate="tanh")


# Training on the CPU: ATen's tanh-GELU kernels run far below the memory's speed there (in bf16 12-13 ms each way on
# a 4096x1536 tensor, as long as the fc1 matmul; in fp32 11-12 ms), so torch.compile writes one vectorised pass each
# way, in the form 0.5 h (1 + tanh u) = h sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3): a training step of
# Latte-S/2 ran 7.7% faster in bf16, 1.2-3.5% in fp32 (A/B of alternating steps).
GELU_C = 2 * math.sqrt(2 / math.pi)  # 2u = h (GELU_C + GELU_C 0.044715 h^2)


def sigmoid_2u(x):
    return torch.sigmoid(x * (GELU_C + GELU_C * 0.044715 * x * x))


def gelu_forward(h):
    x = h.float()
    return (x * sigmoid_2u(x)).to(h.dtype)


def gelu_backward(g, h):  # d/dh h s(2u) = s + h s (1 - s) d(2u)/dh
    x = h.float()
    s = sigmoid_2u(x)
    return (g.float() * (s + x * s * (1 - s) * (GELU_C + 3 * GELU_C * 0.044715 * x * x))).to(h.dtype)


class CompiledGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return COMPILED_GELU[0](h)

    @staticmethod
    def backward(ctx, g):
        return COMPILED_GELU[1](g, ctx.saved_tensors[0])


COMPILED_GELU = None  # (forward, backward) once compiled; False where compiling failed


# On a CPU with AVX-512 BF16, kernels.c's GELU passes, whose exponential is a polynomial (the compiled ones call a
# libm-accurate one). bf16: 1.4 and 1.8 ms against 2.9 and 3.4 ms on a 4096x1536 tensor out of the caches, a training
# step 3% faster (A/B). fp32, its results written past the caches (streaming stores: fc2, or fc1's backward, reads
# the 25 MB from memory anyway): 0.64-0.98 and 0.84-1.28 ms against 1.4 and 1.8-1.9 ms compiled (0.75-1.15 and
# 1.03-1.68 with plain stores) at two threads; a training step 0.8-2.3% faster at two threads, 1.6% at one (A/B).
# (Streaming bf16's 12.5 MB, which fc2 then finds in L3, made a step 0.5-0.8% slower.)
NATIVE_GELU = NATIVE_CPU


def native_gelu(h, g=None):
    """GELU(h), or with g the gradient g GELU'(h), for contiguous fp32 or bf16 h."""
    y = torch.empty_like(h)
    g = None if g is None else g.to(h.dtype).contiguous()
    native_call(NATIVE["lib"].gelu, h.data_ptr(), None if g is None else g.data_ptr(), y.data_ptr(), h.numel(),
                h.dtype == torch.float32)
    return y


class NativeGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return native_gelu(h)

    @staticmethod
    def backward(ctx, g):
        return native_gelu(ctx.saved_tensors[0], g)


def training_gelu(h):
    global COMPILED_GELU
    if torch.compiler.is_compiling():  # inside a compiled model the compiler fuses ATen's GELU itself
        return Fn.gelu(h, approximate="tanh")
    if NATIVE_GELU and h.device.type == "cpu" and h.dtype in (torch.float32, torch.bfloat16) and h.is_contiguous() \
            and native_ready():
        return NativeGelu.apply(h)
    if COMPILED_GELU is None:
        try:  # compile both now, on this shape, so that a missing compiler shows here and not mid-backward
            COMPILED_GELU = tuple(torch.compile(f, dynamic=True) for f in (gelu_forward, gelu_backward))
            # the trial run in the modes CompiledGelu calls them in (else each compiles again): an input that
            # requires grad, no autograd, the forward under the caller's autocast, the backward without
            w = h.detach().requires_grad_(h.requires_grad)
            with torch.no_grad():
                y = COMPILED_GELU[0](w)
                with torch.autocast("cpu", enabled=False):
                    COMPILED_GELU[1](y, w)
        except Exception:  # noqa: BLE001 - any failure of the compiler leaves the (same) ATen function
            COMPILED_GELU = False
    return CompiledGelu.apply(h) if COMPILED_GELU else Fn.gelu(h, approximate="tanh")


# ------------------------------------------------------------------------------------------ FLOP counting

def count_cpu_kernel_flops():
    """torch's FlopCounterMode counts the fused CUDA attention kernels but not the CPU one that attention()
    reaches: give it the same count, q k^T and a v at 2 FLOPs per multiply-add (the backward recomputes q k^T and
    takes 4 more products, the gradients of a, v, q and k), so that the counter checks Latte.flops on any device.
    Likewise the oneDNN linear + GELU of linear_gelu()."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if FUSED_GELU and torch.ops.mkldnn._linear_pointwise not in flop_registry:
        register_flop_formula(torch.ops.mkldnn._linear_pointwise)(
            lambda x, w, *args, out_shape=None, **kwargs: 2 * math.prod(x[:-1]) * x[-1] * w[0])
    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        return
    if ops._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
        register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu)(
            lambda q, k, v, *args, out_shape=None, **kwargs: 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1]))
    if ops._scaled_dot_product_flash_attention_for_cpu_backward not in flop_registry:
        register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu_backward)(
            lambda g, q, k, v, *args, out_shape=None, **kwargs: 2 * math.prod(q[:-1]) * k[-2] * (3 * q[-1] + 2 * v[-1]))


count_cpu_kernel_flops()
