"""Attention of one new query per row over the row's own cached keys, as a small compiled CPU kernel.

While `sampling.Cascade` decodes, each row's new token attends to the row's own tokens (its turn and its reply so
far) and to its group's shared context. The shared part is a real matrix product (a group's queries against one
context) and runs well in PyTorch's flash kernel; the own part does not: 160 rows x 3 key/value heads are 480
tiny problems of 3 queries over about 100 keys each, and the flash kernel's fixed cost per problem makes it take
about 3 ms per layer and step where reading those keys and values from memory takes 0.4 ms. This kernel does the
same sums directly: per (row, key/value head), the query heads' scores with AVX-512 bf16 dot products (float32
accumulation, as the flash kernel's bf16 matrix products), a float32 softmax, and the values summed in float32; it
merges in the shared part's result by the two log-sum-exps (as `Cascade` merges them after the flash kernel), and
returns the output in bf16.

It is compiled on first use with the C compiler `$CC` (else `cc` on the PATH) for the CPU it runs on
(`-march=native`), in a temporary folder that is removed once the library is loaded, and it runs on the OpenMP
threads PyTorch already uses: it links libgomp, which resolves to the copy torch has loaded, so
`torch.set_num_threads` governs both. Where there is no compiler, the CPU has no AVX-512 bf16 instructions, the
library cannot be loaded, or loading it mapped an OpenMP runtime besides the one already loaded, `kernel()` is None and
`Cascade` keeps the flash kernel: the same attention, rounded differently (the flash kernel returns bf16 outputs).
The timings above are from a timing script run on a 2-core AMD EPYC (AVX-512 bf16): the flash kernel 2.7-3.4 ms,
this kernel 1.0-1.3 ms, for 160 rows over 60-108 keys; the memory read is 12 MB at about 30 GB/s."""
from __future__ import annotations

import ctypes
import functools
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

MAX_PER = 8       # query heads per key/value head the kernel holds in registers
MAX_DIM = 256     # head dimension, a multiple of 32
MAX_SCORES = 1 << 16   # per x keys: the scores live on the stack of an OpenMP thread

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <omp.h>
#include <immintrin.h>
#ifndef __AVX512BF16__
#error "no AVX-512 bf16 instructions on this CPU"
#endif

int threads(void) { return omp_get_max_threads(); }

/* q: (rows, kv, per, dim) bf16, contiguous; k, v: (rows, kv, width, dim) bf16, contiguous, the first n keys read;
   seen: (rows, seen_stride) bytes, nonzero where a row's key is attended to; o_sh, lse_sh: the attention over the
   rest of each row's keys, (rows, kv, per, dim) bf16 and (rows, kv, per) float32, merged in by the log-sum-exps
   (NULL: none). out: (rows, kv, per, dim) bf16, rounded to nearest even. per <= 8, dim a multiple of 32 and <= 256;
   every row sees at least one key. */
void own_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *seen, long seen_stride,
                   long rows, long kv, long per, long dim, long width, long n, float scale, const uint16_t *o_sh,
                   const float *lse_sh, uint16_t *out) {
#pragma omp parallel for schedule(static)
    for (long rh = 0; rh < rows * kv; rh++) {
        const uint16_t *K = k + rh * width * dim, *V = v + rh * width * dim;
        const uint8_t *s = seen + (rh / kv) * seen_stride;
        long pairs = dim / 32, lanes = dim / 16;
        float sc[per][n], m[8], sum[8];
        __m512bh qv[8][8];
        __m512 acc[8][16];
        for (long p = 0; p < per; p++)
            for (long c = 0; c < pairs; c++)
                qv[p][c] = (__m512bh)_mm512_loadu_si512(q + (rh * per + p) * dim + 32 * c);
        for (long j = 0; j < n; j++) {   /* scores: each key read once for all query heads */
            if (!s[j]) { for (long p = 0; p < per; p++) sc[p][j] = -INFINITY; continue; }
            __m512bh kc[8];
            for (long c = 0; c < pairs; c++) kc[c] = (__m512bh)_mm512_loadu_si512(K + j * dim + 32 * c);
            for (long p = 0; p < per; p++) {
                __m512 a = _mm512_setzero_ps();
                for (long c = 0; c < pairs; c++) a = _mm512_dpbf16_ps(a, qv[p][c], kc[c]);
                sc[p][j] = _mm512_reduce_add_ps(a) * scale;
            }
        }
        for (long p = 0; p < per; p++) {
            m[p] = -INFINITY; sum[p] = 0.f;
            for (long j = 0; j < n; j++) m[p] = sc[p][j] > m[p] ? sc[p][j] : m[p];
            for (long c = 0; c < lanes; c++) acc[p][c] = _mm512_setzero_ps();
        }
        for (long j = 0; j < n; j++) {   /* values: each read once, widened to float32, for all query heads */
            if (!s[j]) continue;
            float e[8];
            for (long p = 0; p < per; p++) { e[p] = expf(sc[p][j] - m[p]); sum[p] += e[p]; }
            for (long c = 0; c < lanes; c++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(V + j * dim + 16 * c));
                __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                for (long p = 0; p < per; p++) acc[p][c] = _mm512_fmadd_ps(_mm512_set1_ps(e[p]), x, acc[p][c]);
            }
        }
        for (long p = 0; p < per; p++) {
            long at = (rh * per + p) * dim;
            /* the shared part's share of the softmax over all keys: e^lse_sh / (e^lse + e^lse_sh) */
            float share = o_sh ? 1.f / (1.f + expf(m[p] + logf(sum[p]) - lse_sh[rh * per + p])) : 0.f;
            __m512 own = _mm512_set1_ps((1.f - share) / sum[p]), other = _mm512_set1_ps(share);
            for (long c = 0; c < lanes; c++) {
                __m512 x = _mm512_mul_ps(acc[p][c], own);
                if (o_sh) {
                    __m256i raw = _mm256_loadu_si256((const __m256i *)(o_sh + at + 16 * c));
                    __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                    x = _mm512_fmadd_ps(other, y, x);
                }
                _mm256_storeu_si256((__m256i *)(out + at + 16 * c), (__m256i)_mm512_cvtneps_pbh(x));
            }
        }
    }
}
"""


BUILT: str | None = None   # the compiler that built the kernel in this process (run manifests record it)


@functools.cache
def kernel():
    """The compiled library (ctypes), or None where it cannot be built or loaded here (no C compiler, no AVX-512
    bf16, not Linux x86-64, a temporary folder that cannot hold programs) or would not run on torch's OpenMP
    threads (a compiler with another OpenMP runtime)."""
    global BUILT
    try:
        named = os.environ.get("CC")
        compiler = shlex.split(named) if named else [shutil.which("cc") or shutil.which("gcc")]
    except ValueError:   # quoting that does not parse: no compiler named
        return None
    if not compiler[0] or os.uname().machine != "x86_64" or not torch.backends.openmp.is_available():
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="persona_em_attention_") as d:
            src, lib = Path(d) / "own_attention.c", Path(d) / "own_attention.so"
            src.write_text(SOURCE)
            run = subprocess.run([*compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o",
                                  str(lib), "-lm"], capture_output=True, text=True)
            if run.returncode != 0:
                return None
            before = openmp_runtimes()
            so = ctypes.CDLL(str(lib))   # mapped: the file can go with its folder
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return None
    if openmp_runtimes() - before:   # a runtime of its own: a second thread pool competing with torch's for the cores
        return None
    so.own_attention.restype = None
    so.own_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 7 + [ctypes.c_float] + [ctypes.c_void_p] * 3
    so.threads.restype = ctypes.c_int
    BUILT = f"{version[0] if version else ' '.join(compiler)} -O3 -march=native"
    return so


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process (Linux; elsewhere none are listed)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    names = ("libgomp", "libomp", "libiomp")
    return {line.split()[-1] for line in maps if any(n in line.rsplit("/", 1)[-1] for n in names)}


def fits(dtype: torch.dtype, device: torch.device, per: int, dim: int, keys: int) -> bool:
    """Whether the kernel runs attention in `dtype` on `device` with `per` query heads per key/value head of `dim`
    dimensions over at most `keys` keys: bf16 on a CPU where it could be built, within its sizes. Otherwise the
    caller runs the flash kernel."""
    return dtype == torch.bfloat16 and device.type == "cpu" and within_limits(per, dim, keys) and kernel() is not None


def within_limits(per: int, dim: int, keys: int) -> bool:
    """Whether the kernel's fixed-size arrays hold `per` query heads of `dim` dimensions over `keys` keys."""
    return 1 <= per <= MAX_PER and 0 < dim <= MAX_DIM and dim % 32 == 0 and 1 <= keys <= MAX_SCORES // per


def own_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float,
                  shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Each row's queries q (rows, kv heads, per, dim) over its keys and values k, v (rows, kv heads, n, dim: the
    first n positions of contiguous buffers), the positions where `seen` (rows, n, bool, rows contiguous) is False
    left out, merged with `shared`, the same queries' attention over other keys (output (rows, kv heads, per, dim)
    bf16, log-sum-exp (rows, kv heads, per) float32), if any: the output (rows, kv heads, per, dim), bf16. Every
    row must see at least one key (the kernel checks no mask; `fits` says whether it runs here)."""
    rows, kv, per, dim = q.shape
    n = k.shape[2]
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16 and all(x.device.type == "cpu" for x in (q, k, v, seen))
            and within_limits(per, dim, n)):
        raise ValueError(f"the kernel takes bf16 queries, keys and values on a CPU, 1 to {MAX_PER} query heads per "
                         f"key/value head of a multiple of 32 up to {MAX_DIM} dimensions, and 1 to "
                         f"{MAX_SCORES // max(per, 1)} keys; got {q.dtype}/{k.dtype}/{v.dtype} on {q.device}, {per} "
                         f"heads of {dim}, {n} keys")
    width = k.stride(1) // dim
    for x in (k, v):
        if x.shape != (rows, kv, n, dim) or x.stride() != (kv * width * dim, width * dim, dim, 1):
            raise ValueError(f"keys and values must be the first {n} positions of contiguous (rows, kv heads, "
                             f"width, dim) buffers, got shape {tuple(x.shape)}, strides {x.stride()}")
    if seen.dtype != torch.bool or seen.shape != (rows, n) or seen.stride(1) != 1:
        raise ValueError(f"seen must be bool (rows, keys) with contiguous rows, got {seen.dtype} {tuple(seen.shape)}")
    q = q.contiguous()
    o_sh, lse_sh = (None, None) if shared is None else (shared[0].contiguous(), shared[1].float().contiguous())
    if o_sh is not None and (o_sh.shape != q.shape or o_sh.dtype != torch.bfloat16 or lse_sh.shape != q.shape[:3]):
        raise ValueError(f"the shared part must be bf16 {tuple(q.shape)} and its log-sum-exp {tuple(q.shape[:3])}")
    out = torch.empty(rows, kv, per, dim, dtype=torch.bfloat16)
    kernel().own_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), seen.data_ptr(), seen.stride(0), rows, kv, per,
                           dim, width, n, scale, None if o_sh is None else o_sh.data_ptr(),
                           None if lse_sh is None else lse_sh.data_ptr(), out.data_ptr())
    return out
