"""Attention as small compiled CPU kernels: decoding's one new query per row over the row's own cached keys, and
an encoder's attention within sequences packed without padding (with the residual add and layer norm after it).

While `sampling.Cascade` decodes, each row's new token attends to the row's own tokens (its turn and its reply so
far) and to its group's shared context. The shared part is a real matrix product (a group's queries against one
context) and runs well in PyTorch's flash kernel; the own part does not: 160 rows x 3 key/value heads are 480
tiny problems of 3 queries over about 100 keys each, and the flash kernel's fixed cost per problem makes it take
about 3 ms per layer and step where reading those keys and values from memory takes 0.4 ms. `own_attention` does
the same sums directly: per (row, key/value head), the query heads' scores with AVX-512 bf16 dot products (float32
accumulation, as the flash kernel's bf16 matrix products), a float32 softmax, and the values summed in float32; it
merges in the shared part's result by the two log-sum-exps (as `Cascade` merges them after the flash kernel), and
returns the output in bf16.

`packed_attention` and `add_layer_norm` serve `packed_encoder`, which embeds questions with MiniLM in bf16 with no
padding: 12 heads of 32 dimensions over about 50 tokens per question are again many small problems, which
PyTorch's attention runs at a few percent of the machine's bf16 rate and only over padded batches.

The kernels are compiled on first use with the C compiler `$CC` (else `cc` on the PATH) for the CPU they run on
(`-march=native`), in a temporary folder that is removed once the library is loaded, and they run on the OpenMP
threads PyTorch already uses: the library links libgomp, which resolves to the copy torch has loaded, so
`torch.set_num_threads` governs both. Where there is no compiler, the CPU has no AVX-512 bf16 instructions, the
library cannot be loaded, or loading it mapped an OpenMP runtime besides the one already loaded, `kernel()` is None:
`Cascade` keeps the flash kernel (the same attention, rounded differently: the flash kernel returns bf16 outputs),
and `models.Bf16Embedder` encodes under bf16 autocast. The timings above are from a timing script run on a 2-core
AMD EPYC (AVX-512 bf16): the flash kernel 2.7-3.4 ms, `own_attention` 1.0-1.3 ms, for 160 rows over 60-108 keys;
the memory read is 12 MB at about 30 GB/s."""
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
#include <stdlib.h>
#include <string.h>
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

/* e^x for x <= 0, in float32: x log2(e) split into a whole number w, applied by scalef, and a fraction f in
   [-1/2, 1/2], whose 2^f is the degree-7 Taylor polynomial of e^(f ln 2) (its own error under 1e-8). The rounding
   of x log2(e) dominates: relative error under 1e-6 on [-10, 0], 4e-6 near -87. Below -87 it returns e^-87, about
   1.6e-38, just above the smallest normal float32 (a softmax weight that small beside the largest, 1, is 0 to
   float32's precision anyway). A NaN stays NaN. */
static inline __m512 exp_nonpositive(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-87.f), x), _mm512_set1_ps(1.44269504088896341f));
    __m512 w = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, w), _mm512_set1_ps(0.693147180559945309f));
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, w);
}

/* r[c] <- column c of the 16 x 16 matrix of 32-bit words whose row i is r[i] */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; k++) {
            t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0xdd);
        }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
    }
}

/* Attention within sequences packed one after another (an encoder's, every token attending to every token of its
   sequence). qkv: (tokens, stride) bf16, each token's queries, keys and values at columns [0, heads*dim),
   [heads*dim, 2*heads*dim), [2*heads*dim, 3*heads*dim), as one fused projection writes them; sequence s is tokens
   [starts[s], starts[s+1]), at least one. out: (tokens, out_stride) bf16, heads*dim columns written, rounded to
   nearest even. dim a multiple of 32. The sequences are shared out among the OpenMP threads; each thread lays out
   a sequence's keys and values once for all its heads, in buffers sized by the longest sequence. Scores by dpbf16
   (bf16 products, float32 sums), softmax and the values' sums in float32. Returns 0, or 1 if a thread's buffers
   could not be allocated (then nothing is computed). */
int packed_attention(const uint16_t *qkv, long stride, const long *starts, long seqs, long heads, long dim,
                      float scale, uint16_t *out, long out_stride) {
    long longest = 0;
    for (long s = 0; s < seqs; s++) longest = starts[s + 1] - starts[s] > longest ? starts[s + 1] - starts[s] : longest;
    long width = (longest + 15) / 16 * 16, pairs = dim / 2, lanes = dim / 16;
    int failed = 0;
#pragma omp parallel
    {
        /* per sequence, all heads: keys as pairs, kt[(h * pairs + c) * width + j] = k[j][h][2c, 2c+1] (the layout
           dpbf16 multiplies 16 keys at a time in); values widened to float32, vf[(h * width + j) * dim + d] */
        uint32_t *kt = aligned_alloc(64, heads * pairs * width * 4);
        float *vf = aligned_alloc(64, heads * width * dim * 4), *sc = aligned_alloc(64, 4 * width * 4);
        if (!kt || !vf || !sc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        int skip;
#pragma omp atomic read
        skip = failed;
#pragma omp for schedule(dynamic, 1)
        for (long s = 0; s < seqs; s++) {
            if (skip) continue;
            long t0 = starts[s], n = starts[s + 1] - t0, blocks = (n + 15) / 16;
            for (long b = 0; b < blocks; b++)   /* keys: 16 x 16 blocks of pairs transposed in registers */
                for (long hc = 0; hc < heads * pairs; hc += 16) {
                    __m512i r[16];
                    for (long i = 0; i < 16; i++)
                        r[i] = 16 * b + i < n ? _mm512_loadu_si512(qkv + (t0 + 16 * b + i) * stride + heads * dim + 2 * hc)
                                              : _mm512_setzero_si512();
                    transpose16(r);
                    for (long c = 0; c < 16; c++) _mm512_store_si512(kt + (hc + c) * width + 16 * b, r[c]);
                }
            for (long j = 0; j < blocks * 16; j++)   /* values widened to float32; rows past n zero */
                for (long h = 0; h < heads; h++)
                    for (long c = 0; c < lanes; c++) {
                        __m512 x = _mm512_setzero_ps();
                        if (j < n)
                            x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                    (const __m256i *)(qkv + (t0 + j) * stride + (2 * heads + h) * dim + 16 * c))), 16));
                        _mm512_store_ps(vf + (h * width + j) * dim + 16 * c, x);
                    }
            for (long h = 0; h < heads; h++)
                for (long i0 = 0; i0 < n; i0 += 4) {   /* four queries at a time: independent sums in flight */
                    long nq = n - i0 < 4 ? n - i0 : 4;
                    const uint16_t *q[4];
                    for (long r = 0; r < 4; r++) q[r] = qkv + (t0 + i0 + (r < nq ? r : 0)) * stride + h * dim;
                    const uint32_t *kh = kt + h * pairs * width;
                    for (long b = 0; b < blocks; b += 2) {   /* scores of 4 queries x 32 keys */
                        long b1 = b + 1 < blocks ? b + 1 : b;
                        __m512 a[4][2];
                        for (long r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
                        for (long c = 0; c < pairs; c++) {
                            __m512bh k0 = (__m512bh)_mm512_load_si512(kh + c * width + 16 * b);
                            __m512bh k1 = (__m512bh)_mm512_load_si512(kh + c * width + 16 * b1);
                            for (long r = 0; r < 4; r++) {
                                int two;   /* a query's dimensions 2c and 2c + 1 */
                                memcpy(&two, q[r] + 2 * c, 4);
                                __m512bh x = (__m512bh)_mm512_set1_epi32(two);
                                a[r][0] = _mm512_dpbf16_ps(a[r][0], x, k0);
                                a[r][1] = _mm512_dpbf16_ps(a[r][1], x, k1);
                            }
                        }
                        for (long r = 0; r < 4; r++) {
                            _mm512_store_ps(sc + r * width + 16 * b, _mm512_mul_ps(a[r][0], _mm512_set1_ps(scale)));
                            _mm512_store_ps(sc + r * width + 16 * b1, _mm512_mul_ps(a[r][1], _mm512_set1_ps(scale)));
                        }
                    }
                    float inv[4];
                    __mmask16 last = (__mmask16)((1u << (n - (blocks - 1) * 16)) - 1);
                    for (long r = 0; r < 4; r++) {   /* softmax numerators in float32; keys past n get 0 */
                        float *row = sc + r * width;
                        __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
                        for (long b = 0; b < blocks; b++)
                            top = _mm512_mask_max_ps(top, b + 1 < blocks ? 0xffff : last, top, _mm512_load_ps(row + 16 * b));
                        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
                        for (long b = 0; b < blocks; b++) {
                            __m512 e = _mm512_maskz_mov_ps(b + 1 < blocks ? 0xffff : last,
                                                           exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(row + 16 * b), m)));
                            _mm512_store_ps(row + 16 * b, e);
                            total = _mm512_add_ps(total, e);
                        }
                        inv[r] = 1.f / _mm512_reduce_add_ps(total);
                    }
                    const float *vh = vf + h * width * dim;
                    for (long c = 0; c < lanes; c++) {   /* 16 dimensions of 4 outputs, even and odd keys apart */
                        __m512 acc[4][2];
                        for (long r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
                        for (long j = 0; j < n; j += 2) {   /* key n, if read, has value 0 and weight 0 */
                            __m512 x0 = _mm512_load_ps(vh + j * dim + 16 * c), x1 = _mm512_load_ps(vh + (j + 1) * dim + 16 * c);
                            for (long r = 0; r < 4; r++) {
                                acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(sc[r * width + j]), x0, acc[r][0]);
                                acc[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(sc[r * width + j + 1]), x1, acc[r][1]);
                            }
                        }
                        for (long r = 0; r < nq; r++)
                            _mm256_storeu_si256((__m256i *)(out + (t0 + i0 + r) * out_stride + h * dim + 16 * c),
                                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(
                                                    _mm512_add_ps(acc[r][0], acc[r][1]), _mm512_set1_ps(inv[r]))));
                    }
                }
        }
        free(kt); free(vf); free(sc);
    }
    return failed;
}

/* h <- LayerNorm(h + o) row by row, in float32 (h: (rows, width) float32, o: (rows, width) bf16, width a multiple
   of 16), and x <- h rounded to bf16 (nearest even): the residual stream and the next matrix product's input. */
void add_layer_norm(float *h, const uint16_t *o, long rows, long width, const float *gamma, const float *beta,
                    float eps, uint16_t *x) {
#pragma omp parallel for schedule(static)
    for (long i = 0; i < rows; i++) {
        float *hr = h + i * width;
        const uint16_t *orow = o + i * width;
        __m512 sum = _mm512_setzero_ps();
        for (long c = 0; c < width; c += 16) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(hr + c), _mm512_castsi512_ps(_mm512_slli_epi32(
                           _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(orow + c))), 16)));
            _mm512_storeu_ps(hr + c, v);
            sum = _mm512_add_ps(sum, v);
        }
        __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / width), sq = _mm512_setzero_ps();
        for (long c = 0; c < width; c += 16) {
            __m512 d = _mm512_sub_ps(_mm512_loadu_ps(hr + c), mean);
            sq = _mm512_fmadd_ps(d, d, sq);
        }
        __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(sq) / width + eps));
        for (long c = 0; c < width; c += 16) {
            __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(hr + c), mean), inv),
                                       _mm512_loadu_ps(gamma + c), _mm512_loadu_ps(beta + c));
            _mm512_storeu_ps(hr + c, y);
            _mm256_storeu_si256((__m256i *)(x + i * width + c), (__m256i)_mm512_cvtneps_pbh(y));
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
            src, lib = Path(d) / "cpu_attention.c", Path(d) / "cpu_attention.so"
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
    so.packed_attention.restype = ctypes.c_int
    so.packed_attention.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p] + [ctypes.c_long] * 3
                                    + [ctypes.c_float, ctypes.c_void_p, ctypes.c_long])
    so.add_layer_norm.restype = None
    so.add_layer_norm.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 2 + [
        ctypes.c_float, ctypes.c_void_p]
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


def packed_attention(qkv: torch.Tensor, starts: torch.Tensor, heads: int, dim: int, scale: float) -> torch.Tensor:
    """Attention within sequences packed one after another without padding, every token over all of its own
    sequence's tokens (an encoder's attention): `qkv` (tokens, >= 3 x heads x dim) bf16, each row a token's
    queries, keys and values (`heads` heads of `dim` each, as one fused projection writes them), `starts`
    (sequences + 1) int64, where each sequence starts, from 0 to tokens, each at least one token long. The output
    (tokens, heads x dim), bf16. `kernel()` must not be None."""
    tokens = qkv.shape[0] if qkv.dim() == 2 else -1
    if not (qkv.dim() == 2 and qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu" and qkv.stride(1) == 1
            and heads >= 1 and dim > 0 and dim % 32 == 0 and qkv.shape[1] >= 3 * heads * dim):
        raise ValueError(f"qkv must be a CPU bf16 (tokens, >= 3 x heads x dim) matrix with contiguous rows and dim a "
                         f"multiple of 32; got {qkv.dtype} {tuple(qkv.shape)} on {qkv.device}, {heads} heads of {dim}")
    if not (starts.dtype == torch.int64 and starts.device.type == "cpu" and starts.dim() == 1
            and starts.is_contiguous() and len(starts) >= 2 and starts[0] == 0 and starts[-1] == tokens
            and bool((starts.diff() >= 1).all())):
        raise ValueError(f"starts must be a contiguous 1-D CPU int64 tensor of offsets rising from 0 to the {tokens} "
                         f"tokens, each sequence at least one token; got {starts.dtype} {tuple(starts.shape)} on "
                         f"{starts.device}"
                         + (f", first values {starts.reshape(-1)[:8].tolist()}" if starts.device.type == "cpu" else ""))
    out = torch.empty(tokens, heads * dim, dtype=torch.bfloat16)
    if kernel().packed_attention(qkv.data_ptr(), qkv.stride(0), starts.data_ptr(), len(starts) - 1, heads, dim,
                                 scale, out.data_ptr(), out.stride(0)):
        raise MemoryError(f"packed_attention could not allocate its buffers for a longest sequence of "
                          f"{int(starts.diff().max())} tokens and {heads} heads of {dim}")
    return out


def add_layer_norm(h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """A transformer's residual step: `h` <- LayerNorm(h + o) in float32, in place (h (rows, width) float32, o the
    same shape in bf16, `weight` and `bias` (width) float32, width a multiple of 16), and that result rounded to
    bf16 returned, the next matrix product's input: what bf16 autocast computes (its layer norm runs in float32),
    in one call instead of three operators (the sum, the norm, the cast). `kernel()` must not be None."""
    width = h.shape[-1] if h.dim() == 2 else -1
    if not (h.dim() == 2 and h.dtype == torch.float32 and h.is_contiguous() and o.shape == h.shape
            and o.dtype == torch.bfloat16 and o.is_contiguous() and width % 16 == 0
            and all(p.shape == (width,) and p.dtype == torch.float32 and p.is_contiguous() for p in (weight, bias))
            and all(x.device.type == "cpu" for x in (h, o, weight, bias))):
        raise ValueError(f"add_layer_norm takes contiguous CPU h float32 and o bf16 of one (rows, width) shape, width "
                         f"a multiple of 16, and float32 weight and bias (width); got h {h.dtype} {tuple(h.shape)}, "
                         f"o {o.dtype} {tuple(o.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    x = torch.empty(h.shape, dtype=torch.bfloat16)
    kernel().add_layer_norm(h.data_ptr(), o.data_ptr(), h.shape[0], width, weight.data_ptr(), bias.data_ptr(), eps,
                            x.data_ptr())
    return x
