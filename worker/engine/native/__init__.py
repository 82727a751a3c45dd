"""Native CPU kernels, compiled on the machine that runs them, at first use.

`paged_decode.c`: decode attention read in place from the paged KV pool (see its header). On
CPU the pure-torch path gathers every decoding row's keys and values out of the pool into a
padded tensor before two batched matmuls attend over it; that copy, the padding and the
matmuls' tiny shapes (a few query heads per KV head) cost about as much as the model's linear
layers at 32 rows. The kernel reads each row's own blocks once. The same file's prefill
kernel attends a prompt chunk causally over its row's blocks in place, tiled as flash attention
is (SDPA's CPU kernel ran at ~10 GFLOP/s on the demo model's 256-512-token chunks: 1.3-1.6x
slower, one thread).

`layer_ops.c`: the fast path's small per-layer ops (residual add + RMSNorm, the SiLU-gated
product, rotary in place), each one pass over its rows, rounding step by step as transformers'
modules do, bit for bit (`load_layer_ops()`, `LayerOps`). `bf16.h`: the conversions both share.

Why plain C through ctypes and not a torch C++ extension: it compiles in about a second with
the C compiler alone (a torch extension includes torch's headers and takes a minute or more,
and needs ninja), and the call releases the GIL. It is compiled with -fopenmp after torch is
loaded, so its `libgomp.so.1` resolves to the one torch already loaded: its parallel loop runs
on torch's own OpenMP threads instead of a second team fighting them for the cores. And with
-march=native, for the CPU it runs on: the build is cached per source, compiler and CPU.

No compiler or a failed build: `load()` / `load_layer_ops()` is None (logged); a dtype or head
size it does not take (it takes bfloat16 and float32, heads up to 512): `DecodeKernel.takes()` /
`LayerOps.takes()` is False. Either way the engine keeps the pure-torch path. The setting
CHATQUEUE_NATIVE_KERNELS=false turns it off, CHATQUEUE_KERNEL_CACHE_DIR says where builds are
kept.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from worker.errors import NativeBuildError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
# -ffast-math when compiling only (vectorised reductions, and glibc's vector expf, which it
# declares only under __FAST_MATH__). Never when linking: GCC before 13 then links crtfastmath.o
# even into a shared library, whose constructor turns on flush-to-zero and denormals-are-zero
# for the whole process -- every float in torch and Python after it (the tests caught it).
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")


def cache_dirs() -> list[Path]:
    """Where builds are kept by default, in order of preference: $XDG_CACHE_HOME (or
    ~/.cache)/chatqueue/kernels, then a folder of this user's in the temp directory (a
    read-only home, as in the compose services)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return [Path(base) / "chatqueue" / "kernels",
            Path(tempfile.gettempdir()) / f"chatqueue-kernels-{os.getuid()}"]


def build(source: Path = SOURCE, out_dir: Path | None = None,
          compile_flags: tuple[str, ...] = COMPILE_FLAGS) -> Path:
    """The shared library of `source`, compiled unless a build for this source, compiler and
    CPU is cached (in `out_dir`, else the first of `cache_dirs()` that can be written). Raises
    NativeBuildError.

    A library is only built in, and loaded from, a folder owned by this user that nobody else
    can write (created 0700): whoever can write there could plant a library this process then
    runs."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeBuildError("no C compiler (cc or gcc) on PATH")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"{compiler} --version failed: {exc}") from exc
    key = hashlib.sha256()
    flags = " ".join((*compile_flags, "|", *LINK_FLAGS)).encode()
    headers = [path.read_bytes() for path in sorted(SOURCE.parent.glob("*.h"))]  # included
    for part in (source.read_bytes(), *headers, version.encode(), flags, _cpu_flags()):
        key.update(part)
    name = f"{source.stem}-{key.hexdigest()[:16]}.so"
    errors = []
    for folder in [out_dir] if out_dir is not None else cache_dirs():
        try:
            return _compile(compiler, source, folder, name, compile_flags)
        except OSError as exc:
            errors.append(f"{folder}: {exc}")
    raise NativeBuildError(f"no folder to build in: {'; '.join(errors)}")


def _compile(compiler: str, source: Path, out_dir: Path, name: str,
             compile_flags: tuple[str, ...]) -> Path:
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(out_dir)
    target = out_dir / name
    if target.is_file():
        _check_private(target)
        return target
    # Compile to a private name, then rename: workers starting together never load half a file.
    fd, partial = tempfile.mkstemp(dir=out_dir, prefix=f".{source.stem}-", suffix=".so")
    os.close(fd)
    obj = partial.removesuffix(".so") + ".o"
    try:
        for command in ([compiler, *compile_flags, "-I", str(SOURCE.parent), "-o", obj,
                         str(source)],
                        [compiler, *LINK_FLAGS, "-o", partial, obj, "-lm"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise NativeBuildError(
                    f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
        Path(obj).unlink(missing_ok=True)
    return target


def _check_private(path: Path) -> None:
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{path} is not private to this user (owner uid {info.st_uid}, mode "
                      f"{info.st_mode & 0o777:o}): another user could plant a library there")


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return b""


_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # q, its row and head strides
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # key pool, value pool, slots
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,  # block tables, their row stride, lengths
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # out, its row and head strides
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # rows, heads, kv heads
    ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int,  # dim, block, scale, threads
]
_PREFILL_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # q, its row and head strides
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # key pool, value pool, slots
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # the row's block table, start, tokens
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # out, its row and head strides
    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # heads, kv heads, dim
    ctypes.c_int64, ctypes.c_float, ctypes.c_int,  # block, scale, threads
]
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
MAX_HEAD_DIM = 512  # as MAX_DIM in paged_decode.c


class DecodeKernel:
    """The loaded attention kernels: decode rows (`__call__`) and a prefill chunk (`prefill`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._functions: dict[torch.dtype, ctypes._CFunctionType] = {}
        self._prefill: dict[torch.dtype, ctypes._CFunctionType] = {}
        for dtype, suffix in _SUFFIX.items():
            for table, name, argtypes in (
                    (self._functions, "decode", _ARGTYPES),
                    (self._prefill, "prefill", _PREFILL_ARGTYPES)):
                function = getattr(library, f"chatqueue_{name}_attention_{suffix}")
                function.argtypes = argtypes
                function.restype = ctypes.c_int
                table[dtype] = function

    @staticmethod
    def takes(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
        return device.type == "cpu" and dtype in _SUFFIX and head_dim <= MAX_HEAD_DIM

    def __call__(self, q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor,
                 tables: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
                 block_size: int, scale: float) -> None:
        """out[r] = attention of q[r] ([rows, heads, dim]) over row r's first lengths[r]
        positions, read from the pools ([kv_heads, slots, dim]) through tables[r] ([rows,
        blocks], int32). Raises ValueError on what the kernel does not take."""
        rows, heads, dim = q.shape
        kv_heads, slots, _ = key_pool.shape
        if q.stride(2) != 1:  # rows and heads may be strided; each head's vector must not be
            q = q.contiguous()
        function = self._functions.get(q.dtype)
        if (function is None or out.stride(2) != 1
                or not key_pool.is_contiguous() or not value_pool.is_contiguous()
                or tables.dtype != torch.int32 or lengths.dtype != torch.int32
                or not tables.is_contiguous() or not lengths.is_contiguous()
                or key_pool.dtype != q.dtype or value_pool.dtype != q.dtype
                or out.dtype != q.dtype):
            raise ValueError("decode_attention: layouts or dtypes the kernel does not take")
        status = function(
            q.data_ptr(), q.stride(0), q.stride(1), key_pool.data_ptr(), value_pool.data_ptr(),
            slots, tables.data_ptr(), tables.stride(0), lengths.data_ptr(), out.data_ptr(),
            out.stride(0), out.stride(1), rows, heads, kv_heads, dim, block_size, scale,
            torch.get_num_threads())
        if status != 0:
            raise ValueError(f"decode_attention refused rows={rows} heads={heads} "
                             f"kv_heads={kv_heads} dim={dim} block_size={block_size}")

    def prefill(self, q: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor,
                table: torch.Tensor, start: int, out: torch.Tensor, block_size: int,
                scale: float) -> None:
        """out[t] = causal attention of q[t] ([tokens, heads, dim]), the row's position
        start + t, over its positions 0..start + t, read from the pools through `table` (the
        row's blocks, int32), where the chunk's own keys and values already are. Raises
        ValueError on what the kernel does not take."""
        tokens, heads, dim = q.shape
        kv_heads, slots, _ = key_pool.shape
        if q.stride(2) != 1:
            q = q.contiguous()
        function = self._prefill.get(q.dtype)
        if (function is None or out.stride(2) != 1 or out.shape[0] != tokens
                or not key_pool.is_contiguous() or not value_pool.is_contiguous()
                or table.dtype != torch.int32 or not table.is_contiguous()
                or table.numel() * block_size < start + tokens
                or key_pool.dtype != q.dtype or value_pool.dtype != q.dtype
                or out.dtype != q.dtype):
            raise ValueError("prefill_attention: layouts or dtypes the kernel does not take")
        status = function(
            q.data_ptr(), q.stride(0), q.stride(1), key_pool.data_ptr(), value_pool.data_ptr(),
            slots, table.data_ptr(), start, tokens, out.data_ptr(), out.stride(0),
            out.stride(1), heads, kv_heads, dim, block_size, scale, torch.get_num_threads())
        if status != 0:
            raise ValueError(f"prefill_attention refused tokens={tokens} heads={heads} "
                             f"kv_heads={kv_heads} dim={dim} block_size={block_size}")


@functools.cache
def load(cache_dir: Path | None = None) -> DecodeKernel | None:
    """The kernel, built (into `cache_dir`, default `cache_dirs()`) and loaded once per
    process; None, logged, when it cannot be."""
    try:
        return DecodeKernel(ctypes.CDLL(str(build(out_dir=cache_dir))))
    except (NativeBuildError, OSError) as exc:
        log.warning("native CPU attention kernel unavailable, using the torch path: %s", exc)
        return None


LAYER_OPS_SOURCE = SOURCE.with_name("layer_ops.c")
# IEEE float math, as torch's separate ops round (see layer_ops.c): no -ffast-math (it reorders
# sums and divides by reciprocals), no contraction of a * b + c into one FMA.
LAYER_OPS_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp",
                   "-fPIC", "-c")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_LAYER_OP_ARGTYPES = {
    # x, its row stride, delta (or NULL), its row stride, weight, out, its row stride, rows,
    # cols, eps, torch's float vector width, threads
    "add_rms_norm": [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_float,
                     _I64, ctypes.c_int],
    # gate_up, its row stride, out, its row stride, rows, cols (of each half), threads
    "silu_mul": [_PTR, _I64, _PTR, _I64, _I64, _I64, ctypes.c_int],
    # x, its token stride, cos, sin, their row stride, tokens, heads, dim, threads
    "rotary": [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_int],
}


class LayerOps:
    """The fast path's small per-layer operations fused (layer_ops.c), each one pass over its
    rows with transformers' roundings. Inputs are [rows, cols] tensors of one dtype (bfloat16
    or float32) on CPU whose last dimension is contiguous; `takes()` says which dtypes."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._functions: dict[tuple[str, torch.dtype], ctypes._CFunctionType] = {}
        self.lanes = 8
        for name, argtypes in _LAYER_OP_ARGTYPES.items():
            for dtype, suffix in _SUFFIX.items():
                function = getattr(library, f"chatqueue_{name}_{suffix}")
                function.argtypes = argtypes
                function.restype = ctypes.c_int if name == "add_rms_norm" else None
                self._functions[name, dtype] = function
        self.lanes = self._sum_lanes()

    def _sum_lanes(self) -> int:
        """The vector width in which torch's CPU sum adds a row here (the norm's mean of squares
        adds in that order, see layer_ops.c): the width whose norms equal F.rms_norm's on random
        float32 rows, where the order shows in the last bits. 8 on the AVX-512 machines seen;
        found, not assumed, since it is torch's build and the CPU that decide it."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(16, 960, generator=generator) * 3
        weight = torch.ones(960)
        expected = weight * torch.nn.functional.rms_norm(x, (960,), eps=1e-5)
        for lanes in (8, 16, 4, 32):
            self.lanes = lanes
            if torch.equal(self.rms_norm(x, weight, 1e-5), expected):
                return lanes
        log.warning("fused RMSNorm: no vector width reproduces torch's sums; its norms may "
                    "differ from transformers' in the last bit")
        return 8

    @staticmethod
    def takes(dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype in _SUFFIX

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> torch.Tensor:
        """weight * RMSNorm(x) as transformers' LlamaRMSNorm rounds it; with `delta`, first
        x += delta in place (the residual add before the norm), as `x = x + delta` rounds."""
        rows, cols = x.shape
        _check_rows("rms_norm", x, weight.unsqueeze(0), *(() if delta is None else (delta,)))
        if weight.shape != (cols,) or (delta is not None and delta.shape != x.shape):
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} or delta of another "
                             f"shape than x {tuple(x.shape)}")
        out = torch.empty_like(x)
        status = self._functions["add_rms_norm", x.dtype](
            x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
            0 if delta is None else delta.stride(0), weight.data_ptr(), out.data_ptr(),
            out.stride(0), rows, cols, eps, self.lanes, torch.get_num_threads())
        if status != 0:
            raise ValueError(f"rms_norm refused rows={rows} cols={cols} (at most 65536 cols)")
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up = [gate | up] on each row, as transformers' MLP rounds."""
        rows, width = gate_up.shape
        _check_rows("silu_mul", gate_up)
        if width % 2:
            raise ValueError(f"silu_mul: gate_up has an odd width {width}")
        out = gate_up.new_empty(rows, width // 2)
        self._functions["silu_mul", gate_up.dtype](
            gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), rows,
            width // 2, torch.get_num_threads())
        return out

    def rotary_(self, x: torch.Tensor, heads: int, cos: torch.Tensor,
                sin: torch.Tensor) -> None:
        """In place, transformers' apply_rotary_pos_emb on x[:, :heads] (x: [tokens, >= heads,
        dim], each token's heads contiguous), with cos/sin: [tokens, dim]."""
        tokens, all_heads, dim = x.shape
        if (x.stride(2) != 1 or x.stride(1) != dim or heads > all_heads or dim % 2
                or cos.shape != (tokens, dim) or sin.shape != (tokens, dim)
                or cos.stride() != sin.stride()):
            raise ValueError(f"rotary: x {tuple(x.shape)} (strides {x.stride()}), cos "
                             f"{tuple(cos.shape)}, sin {tuple(sin.shape)}: layouts it does "
                             "not take")
        _check_rows("rotary", x.view(tokens, all_heads * dim), cos, sin)
        self._functions["rotary", x.dtype](
            x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0), tokens,
            heads, dim, torch.get_num_threads())


def _check_rows(op: str, first: torch.Tensor, *others: torch.Tensor) -> None:
    for tensor in (first, *others):
        if (tensor.dim() != 2 or tensor.stride(1) != 1 or tensor.dtype != first.dtype
                or tensor.dtype not in _SUFFIX or tensor.device.type != "cpu"):
            raise ValueError(f"{op}: a {tensor.dtype} tensor {tuple(tensor.shape)} with "
                             f"strides {tensor.stride()} on {tensor.device}: it takes rows of "
                             "bfloat16 or float32 on CPU, each contiguous, of one dtype")


@functools.cache
def load_layer_ops(cache_dir: Path | None = None) -> LayerOps | None:
    """The fused layer operations, built and loaded once per process; None, logged, when they
    cannot be."""
    try:
        return LayerOps(ctypes.CDLL(str(build(LAYER_OPS_SOURCE, cache_dir, LAYER_OPS_FLAGS))))
    except (NativeBuildError, OSError) as exc:
        log.warning("native CPU layer operations unavailable, using torch's: %s", exc)
        return None
