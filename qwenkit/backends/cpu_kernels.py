"""The C kernels of `cpu_kernels.c`, built once with the system C compiler and called through ctypes.

No torch headers and no build system: one `cc -O3 -mavx2 -mfma -fopenmp -shared` of one file
(about a second), cached under `$QWENKIT_HOME/kernels/` by a hash of the source and flags, written
atomically. On a CPU with AVX512-VNNI the int8 dot products build as one `vpdpbusd` each instead
of AVX2's maddubs + madd (`build_flags`): the same integers, so the same results bit for bit
(tested), and a speculative verify call of 8 rows on the default model 13% faster. Where there is no compiler, no AVX2, or QWENKIT_CPU_KERNELS=0, `kernels()` is None and
callers use torch's own ops; `why_unavailable()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-lm"]
VNNI_FLAGS = ["-mavx512vnni", "-mavx512vl", "-DQK_VNNI"]  # the int8 dot products in one instruction
MAX_ROWS = 16  # rows of x one int8 GEMV call takes (the C side's MAX_ROWS)
_why: list[str] = []


def why_unavailable() -> str | None:
    kernels()
    return _why[0] if _why else None


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    if os.environ.get("QWENKIT_CPU_KERNELS", "1") == "0":
        _why.append("disabled by QWENKIT_CPU_KERNELS=0")
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _why.append(f"CPU capability {torch.backends.cpu.get_cpu_capability()} lacks AVX2")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _why.append("no C compiler (cc/gcc) on PATH")
        return None
    for flags in dict.fromkeys(map(tuple, (build_flags(), FLAGS))):  # a compiler without VNNI flags: AVX2's
        try:
            return load(_build(compiler, list(flags)))
        except (OSError, subprocess.CalledProcessError) as e:
            error = e
    _why.append(f"building {SOURCE.name} failed: {error}")
    return None


def load(path: Path) -> ctypes.CDLL:
    """A built library with its functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    lib.qk_int8_gemv_f32.restype = lib.qk_int4_gemv_f32.restype = ctypes.c_int
    lib.qk_int8_gemv_f32.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.qk_int4_gemv_f32.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.qk_f32_gemv.restype = lib.qk_int8_dequant.restype = lib.qk_int4_dequant.restype = ctypes.c_int
    lib.qk_int8_dequant.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2
    lib.qk_int4_dequant.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2
    lib.qk_f32_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.qk_bf16_gemv.restype = ctypes.c_int
    lib.qk_bf16_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.qk_attend_one.restype = lib.qk_rms_norm.restype = lib.qk_silu_mul.restype = lib.qk_rope.restype = ctypes.c_int
    lib.qk_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    lib.qk_silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.qk_decode_layers.restype = ctypes.c_int
    lib.qk_decode_layers.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 6
                                     + [ctypes.c_float] + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
                                     + [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 3
                                     + [ctypes.c_int64, ctypes.c_int])
    lib.qk_verify_layers.restype = ctypes.c_int
    lib.qk_verify_layers.argtypes = lib.qk_decode_layers.argtypes[:18] + [ctypes.c_int]
    lib.qk_rope.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]
    lib.qk_attend_one.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_int64]
                                  + [ctypes.c_float, ctypes.c_int])
    lib.qk_attend_one_bf16.restype, lib.qk_attend_one_bf16.argtypes = ctypes.c_int, lib.qk_attend_one.argtypes
    return lib


class Layout(ctypes.Structure):
    """Where a KV cache keeps row b's key (or value) for position j (cpu_kernels.c `qk_layout`), in
    floats from a layer's base, plus h * sh for K/V head h: b * sb + j * ss in a static cache
    (tables None); slot tables[b, j // block_size] * block_size + j % block_size, times ss, in a
    paged pool."""
    _fields_ = [("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("ss", ctypes.c_int64), ("tables", ctypes.c_void_p),
                ("n_blocks", ctypes.c_int64), ("block_size", ctypes.c_int64)]


def build_flags(vnni: bool | None = None) -> list[str]:
    """The compiler flags for this host: VNNI's when the CPU has AVX512-VNNI (`vnni` None), unless
    QWENKIT_VNNI=0; `vnni` True/False forces either build (the tests compare them)."""
    from .host import cpu_features

    if vnni is None:
        vnni = "AVX512-VNNI" in cpu_features() and os.environ.get("QWENKIT_VNNI", "1") != "0"
    return FLAGS + VNNI_FLAGS if vnni else FLAGS


def _build(compiler: str, flags: list[str] | None = None) -> Path:
    from ..paths import qwenkit_home

    flags = build_flags() if flags is None else flags
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    out = qwenkit_home() / "kernels" / f"cpu_kernels-{digest}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, out)  # atomic: a concurrent builder or a kill never leaves half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def takes(x2: torch.Tensor) -> bool:
    """Whether the GEMVs here take x2 (M, K): fp32 on the CPU, no autograd, M <= MAX_ROWS, and
    the kernels built."""
    return (x2.device.type == "cpu" and x2.dtype == torch.float32 and not x2.requires_grad
            and x2.shape[0] <= MAX_ROWS and kernels() is not None)


def fp32_inference(*tensors: torch.Tensor) -> bool:
    """Whether the elementwise kernels below apply: fp32 CPU tensors, autograd off, kernels built."""
    return (not torch.is_grad_enabled() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and kernels() is not None)


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().float().contiguous()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(rc: int, shape_error: str) -> None:
    if rc == -2:
        raise MemoryError("the CPU GEMV could not allocate its quantized copy of x")
    if rc != 0:
        raise ValueError(shape_error)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) fp32 with M <= MAX_ROWS, weight (N, K) int8, scales (N,) fp32 -> (M, N) fp32.
    x is quantized to int8 in blocks of 32 inside the kernel (see cpu_kernels.c)."""
    lib = kernels()
    x = x.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y, bias = torch.empty(M, N, dtype=torch.float32), _bias(bias)
    rc = lib.qk_int8_gemv_f32(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(), M, N, K,
                              torch.get_num_threads())
    _check(rc, f"int8 GEMV takes 1 to {MAX_ROWS} rows, got {M}")
    return y


def pack_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> list[torch.Tensor]:
    """q (N, K) in 0..15 with scales and mins (N, K/32) -> the kernel's layout (cpu_kernels.c): rows
    in blocks of 8 (zero rows pad N to a multiple of 8) interleaved 4 weights at a time, q as
    (N/8, 4K) uint8 (per block and group of 32, byte 32j + 4r + t holds q[r, 4j + t] in its low
    nibble and q[r, 16 + 4j + t] in its high one), scales and mins as (N/8, K/32 * 8)."""
    N, K = q.shape
    pad = -N % 8
    q = _pad_rows(q.to(torch.uint8), pad)
    b = q.reshape(-1, 8, K // 32, 2, 4, 4).permute(0, 2, 4, 1, 5, 3)  # (block, group, j, row, t, half)
    packed = (b[..., 0] | (b[..., 1] << 4)).reshape(-1, 4 * K).contiguous()
    return [packed, *(_pad_rows(p, pad).reshape(-1, 8, K // 32).transpose(1, 2).reshape(-1, K // 4).contiguous()
                      for p in (scales, mins))]


def unpack_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, N: int) -> list[torch.Tensor]:
    """The inverse of pack_int4: q (N, K) uint8 in 0..15, scales and mins (N, K/32)."""
    K = packed.shape[1] // 4
    b = packed.reshape(-1, K // 32, 4, 8, 4)  # (block, group, j, row, t)
    q = torch.stack([b & 0x0F, b >> 4], -1).permute(0, 3, 1, 5, 2, 4).reshape(-1, K)[:N]
    return [q, *(p.reshape(-1, K // 32, 8).transpose(1, 2).reshape(-1, K // 32)[:N] for p in (scales, mins))]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t with `rows` zero rows appended."""
    return torch.cat([t, t.new_zeros(rows, *t.shape[1:])]) if rows else t


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
              bias: torch.Tensor | None, N: int) -> torch.Tensor:
    """x (M, K) fp32, M <= MAX_ROWS; packed, scales, mins from pack_int4 of N rows -> (M, N)."""
    lib = kernels()
    x = x.contiguous()
    M, K = x.shape
    y, bias = torch.empty(M, N, dtype=torch.float32), _bias(bias)
    rc = lib.qk_int4_gemv_f32(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), mins.data_ptr(), _ptr(bias),
                              y.data_ptr(), M, N, K, torch.get_num_threads())
    _check(rc, f"int4 GEMV takes 1 to {MAX_ROWS} rows and K a multiple of 32, got {tuple(x.shape)}")
    return y


def f32_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) fp32 with M <= MAX_ROWS, weight (N, K) fp32 or bf16, contiguous -> (M, N) fp32."""
    lib = kernels()
    x = x.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y, bias = torch.empty(M, N, dtype=torch.float32), _bias(bias)
    gemv = lib.qk_bf16_gemv if weight.dtype == torch.bfloat16 else lib.qk_f32_gemv
    rc = gemv(x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), M, N, K, torch.get_num_threads())
    _check(rc, f"the {weight.dtype} GEMV takes 1 to {MAX_ROWS} rows, got {M}")
    return y


def int8_dequant(weight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """weight (N, K) int8, scales (N,) fp32 -> (N, K) in dtype (fp32, or bf16 rounded to nearest
    even) in one multi-threaded pass."""
    out = torch.empty(weight.shape, dtype=dtype)
    kernels().qk_int8_dequant(weight.data_ptr(), scales.data_ptr(), out.data_ptr(), *weight.shape,
                              dtype == torch.bfloat16, torch.get_num_threads())
    return out


def int4_dequant(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, N: int,
                 dtype=torch.float32) -> torch.Tensor:
    """packed, scales, mins from pack_int4 of N rows -> (N, K) in dtype (fp32 or bf16)."""
    K = packed.shape[1] // 4
    out = torch.empty(N, K, dtype=dtype)
    kernels().qk_int4_dequant(packed.data_ptr(), scales.data_ptr(), mins.data_ptr(), out.data_ptr(), N, K,
                              dtype == torch.bfloat16, torch.get_num_threads())
    return out


def _kv_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the attention kernel takes these: fp32 or bf16 (all three alike) on the CPU,
    autograd off, kernels built."""
    return (not torch.is_grad_enabled() and q.dtype == k.dtype == v.dtype in (torch.float32, torch.bfloat16)
            and all(t.device.type == "cpu" for t in (q, k, v)) and kernels() is not None)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Decode attention: q (B, H, 1, D) fp32 or bf16, k and v (B, Hkv, S, D) of q's dtype with D
    contiguous and equal strides, mask None or bool (B or 1, 1, 1, S) -> (B, H, 1, D) =
    SDPA(q, k, v, mask, enable_gqa), summed in fp32. None when the kernel does not apply (another
    dtype or device, autograd, another layout, no kernels built): the caller then uses SDPA."""
    if not _kv_inference(q, k, v) or k.stride() != v.stride() or k.stride(3) != 1:
        return None
    layout = Layout(k.stride(0), k.stride(1), k.stride(2), None, 0, 1)
    return _attend(q, k, v, layout, k.shape[1], k.shape[2], mask)


def attend_paged(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, layout: Layout,
                 mask: torch.Tensor) -> torch.Tensor | None:
    """Decode attention read in place from a paged pool: q (B, H, 1, D) fp32 or bf16; k_pool, v_pool
    (slots, Hkv, D), slot b * block_size + i holding block b's i-th position; `layout` from
    `paged_layout` over the rows' block tables (B, n_blocks) for S positions; mask bool
    (B, 1, 1, S) over positions [0, S). The same result as gathering each row's S positions and
    calling `attend_one`; None where the kernel does not apply (as there)."""
    if not _kv_inference(q, k_pool, v_pool) or k_pool.shape != v_pool.shape or not v_pool.is_contiguous():
        return None
    return _attend(q, k_pool, v_pool, layout, k_pool.shape[1], mask.shape[-1], mask)


def paged_layout(tables: torch.Tensor, block_size: int, pool: torch.Tensor, positions: int) -> Layout | None:
    """The Layout of a paged pool (..., slots, Hkv, D), contiguous, read through tables (B, n_blocks)
    int64; None when positions [0, positions) do not all have a block or a block lies outside the
    pool (the kernels would read or write there). The layout keeps the tables it points into."""
    slots, Hkv, D = pool.shape[-3:]
    if (tables.dtype != torch.int64 or not pool.is_contiguous() or positions > tables.shape[1] * block_size
            or not 0 <= int(tables.min()) <= int(tables.max()) < slots // block_size):
        return None
    tables = tables.contiguous()
    layout = Layout(0, D, Hkv * D, tables.data_ptr(), tables.shape[1], block_size)
    layout.tables_owner = tables
    return layout


def _attend(q, k, v, layout: Layout, Hkv: int, S: int, mask: torch.Tensor | None) -> torch.Tensor | None:
    """qk_attend_one over keys and values where `layout` says (see attend_one, attend_paged)."""
    B, H, T, D = q.shape
    if T != 1 or H % Hkv or D % 8 or D > 256:
        return None
    mask_sb = 0
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape[0] not in (1, B) or mask.shape[1:] != (1, 1, S):
            return None
        mask = mask.reshape(mask.shape[0], S).contiguous()
        mask_sb = S if mask.shape[0] == B else 0  # one mask row for all rows
    q32 = q.float().contiguous()  # (B, H, 1, D): the sums run in fp32 whatever the cache holds
    out = torch.empty(B, H, 1, D, dtype=torch.float32)
    attend = kernels().qk_attend_one_bf16 if k.dtype == torch.bfloat16 else kernels().qk_attend_one
    rc = attend(q32.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(mask), out.data_ptr(), B, H, Hkv, S, D,
                ctypes.byref(layout), mask_sb, D ** -0.5, torch.get_num_threads())
    _check(rc, f"decode attention does not take q {tuple(q.shape)} with {S} keys of {Hkv} heads")
    return out.to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps) for fp32 x (..., n); see `fp32_inference`."""
    x = x.contiguous()
    n = x.shape[-1]
    out = torch.empty_like(x)
    kernels().qk_rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(), x.numel() // n, n, eps,
                          torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for fp32 gate_up (..., 2I) holding [gate | up] -> (..., I)."""
    gate_up = gate_up.contiguous()
    I = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], I, dtype=torch.float32)
    kernels().qk_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * I), I, torch.get_num_threads())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x (B, T, n, D) rotated by cos, sin (1 or B, T, 1, D), the half-split convention, as a new
    contiguous tensor; None when the layout is not one the kernel takes."""
    B, T, n, D = x.shape
    if (x.stride(3) != 1 or x.stride(2) != D or x.stride(0) != T * x.stride(1) or cos.shape != sin.shape
            or cos.shape[0] not in (1, B) or cos.shape[1:] != (T, 1, D) or not cos.is_contiguous()
            or not sin.is_contiguous() or D % 2):
        return None
    out = torch.empty(B, T, n, D, dtype=torch.float32)
    kernels().qk_rope(x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), B * T, n, D, x.stride(1),
                      cos.shape[0] * T, torch.get_num_threads())
    return out
