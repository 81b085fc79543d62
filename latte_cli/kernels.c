/* CPU kernels for kernels.py, on x86 with AVX-512 BF16, in bf16 and fp32: attention (softmax(q k^T scale) v and its
 * backward), the tanh-GELU's two passes, adaLN's (LayerNorm + modulation, the gated residual's backward) and the
 * linear layers' weight gradients (and, on CPUs with AMX tiles, bf16 ones on the tiles: at the end of this file).
 * Built on first use and loaded through ctypes; the same functions as torch's.
 *
 * Attention runs one (sequence, head) matrix at a time, in registers and the L1/L2 caches. Every product is one
 * micro-kernel, vdpbf16ps: 16 fp32 lanes, each adding the dot product of a pair of bf16. Its B operand is a register
 * of 16 such pairs, its A operand one pair broadcast, so each product's operands are first laid out as pairs along
 * the dimension it sums over: "pairs" (the 32-bit words of a row, transposed: k for q k^T) or "interleaved" (two rows
 * zipped: v for p v). Forward, per tile of query rows: the scores against every key in fp32, their exponentials with
 * a polynomial 2^x, probabilities rounded to bf16, p v. Backward: dp = g v^T, ds = p (dp - delta) with delta =
 * rowsum(p dp) = rowsum(g out), dq = ds k, dv = p^T g, dk = ds^T q. q, k, v, the output and the gradients are read
 * and written in place through their strides (the columns of one qkv projection). In fp32 the same products with
 * fmadd, a value where bf16 has a pair: k and v transposed, the other operands read in place.
 * Shapes: L rows (keys, queries), a multiple of 16; Dh head width, even. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

#define ROWS 8  /* rows of a tile as wide as L: 8 rows x 32 columns = 16 accumulators */
#define NARROW_ROWS 4  /* rows of a tile as wide as Dh: 4 rows x 64 columns = 16 accumulators */
#define AHEAD 8  /* rows (or 64-byte lines) to prefetch ahead in the passes over rows */

/* 2^x: 2^frac by a polynomial, then scalef. Of degree 5 (9e-8 relative error), or coarse, for results rounded to
 * bf16 (2e-3): of degree 3 (8e-5), two multiply-adds fewer */
static inline __m512 pow2(__m512 x, int coarse) {
    x = _mm512_max_ps(_mm512_set1_ps(-126.f), x);  /* (a NaN stays NaN: max returns its second operand) */
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n), p;
    if (coarse) {
        p = _mm512_set1_ps(7.7907160e-2f);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.2623319e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9577710e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9992783e-1f));
    } else {
        p = _mm512_set1_ps(1.8775767e-3f);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9893397e-3f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5826318e-2f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4015361e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315308e-1f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999994e-1f));
    }
    return _mm512_scalef_ps(p, n);
}

static inline __m512bh pair_at(const bf16 *x) {  /* x[0], x[1] in every lane */
    int32_t w;
    memcpy(&w, x, 4);
    return (__m512bh)_mm512_set1_epi32(w);
}

static inline __mmask16 lanes_mask(int n) { return (__mmask16)((1u << (n < 16 ? n : 16)) - 1); }

/* c[r][0 : 16 NZ] = sum over kp < K2 of pair(a + r ar + kp ak) . (the 16 NZ pairs at b + kp bk), for R rows; the
 * last register reads `lanes` pairs. Strides in bf16 elements. In fp32 (f32 = 1), a value for a pair: the same sums
 * with fmadd, a and b fp32 and strides in their elements (no layout in pairs: b's rows are any fp32 rows). */
static inline __attribute__((always_inline)) void tile(int R, int NZ, int lanes, int K2, const void *a, long ar,
                                                       long ak, const void *b, long bk, float *c, long cr, int f32,
                                                       int add) {  /* add: to c's values */
    __m512 acc[ROWS][4];
    for (int r = 0; r < R; r++)
        for (int z = 0; z < NZ; z++) acc[r][z] = add ? _mm512_loadu_ps(c + r * cr + 16 * z) : _mm512_setzero_ps();
    for (int kp = 0; kp < K2; kp++) {
        __m512i bz[4];
        for (int z = 0; z < NZ; z++) {
            const int32_t *bw = (const int32_t *)((const char *)b + (kp * bk + (f32 ? 16 : 32) * z) * (f32 ? 4 : 2));
            bz[z] = z == NZ - 1 && lanes < 16 ? _mm512_maskz_loadu_epi32(lanes_mask(lanes), bw)
                                              : _mm512_loadu_si512(bw);
        }
        for (int r = 0; r < R; r++) {
            if (f32) {
                __m512 x = _mm512_set1_ps(((const float *)a)[r * ar + kp * ak]);
                for (int z = 0; z < NZ; z++) acc[r][z] = _mm512_fmadd_ps(x, _mm512_castsi512_ps(bz[z]), acc[r][z]);
            } else {
                __m512bh x = pair_at((const bf16 *)a + r * ar + kp * ak);
                for (int z = 0; z < NZ; z++) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], x, (__m512bh)bz[z]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int z = 0; z < NZ; z++) _mm512_storeu_ps(c + r * cr + 16 * z, acc[r][z]);
}

/* C (M x N, fp32, row stride cr, rows padded to a multiple of 16) (+)= A B over K2 pairs (fp32: values), B's rows
 * bk apart: wide (N = L) in tiles of ROWS x 32, else (N = Dh) NARROW_ROWS x 64; the full tiles with constant sizes */
static inline __attribute__((always_inline)) void tiles(int f32, int wide, int add, int M, int N, int K2,
                                                        const void *a, long ar, long ak, const void *b, long bk,
                                                        float *c, long cr) {
    int R = wide ? ROWS : NARROW_ROWS, NZ = wide ? 2 : 4;
    for (int i = 0; i < M; i += R)
        for (int j = 0; j < N; j += 16 * NZ) {
            int rows = M - i < R ? M - i : R, cols = N - j < 16 * NZ ? N - j : 16 * NZ;
            int nz = (cols + 15) / 16, lanes = cols - 16 * (nz - 1);
            const void *ai = (const char *)a + i * ar * (f32 ? 4 : 2), *bj = (const char *)b + j * 4;
            float *cij = c + i * cr + j;
            if (rows < R)  /* (never with M a multiple of 16, as L is) */
                tile(rows, nz, lanes, K2, ai, ar, ak, bj, bk, cij, cr, f32, add);
            else if (wide && nz == 2) tile(ROWS, 2, lanes, K2, ai, ar, ak, bj, bk, cij, cr, f32, add);
            else if (wide) tile(ROWS, 1, lanes, K2, ai, ar, ak, bj, bk, cij, cr, f32, add);
            else if (nz == 4) tile(NARROW_ROWS, 4, lanes, K2, ai, ar, ak, bj, bk, cij, cr, f32, add);
            else if (nz == 3) tile(NARROW_ROWS, 3, lanes, K2, ai, ar, ak, bj, bk, cij, cr, f32, add);
            else if (nz == 2) tile(NARROW_ROWS, 2, lanes, K2, ai, ar, ak, bj, bk, cij, cr, f32, add);
            else tile(NARROW_ROWS, 1, lanes, K2, ai, ar, ak, bj, bk, cij, cr, f32, add);
        }
}

/* C = A B as above. In fp32 over all L rows of A (the backward's products), K in blocks of K_BLOCK, so that B's
 * block stays in L1 while every tile passes over it: a whole B of 256 x 64 fp32 did not fit, and tiles whose A runs
 * down columns (p^T, ds^T) lost their lines of A to it too. Latte-S/2's fp32 spatial backward (96 matrices of 256 x
 * 64, two threads) 9.7 against 10.6 ms; in a training step of variant 3, 106 against 116 ms of its 18 attention
 * backwards (`latte bench --profile`). A forward's products, over ROWS rows of A, reuse no block; in bf16 B's pairs
 * fit in L1 whole. */
#define K_BLOCK 64
static inline __attribute__((always_inline)) void product_as(int f32, int wide, int M, int N, int K2, const void *a,
                                                             long ar, long ak, const void *b, long bk, float *c,
                                                             long cr) {
    int kb = f32 && M > ROWS ? K_BLOCK : K2, es = f32 ? 4 : 2;
    tiles(f32, wide, 0, M, N, K2 < kb ? K2 : kb, a, ar, ak, b, bk, c, cr);
    for (int k0 = kb; k0 < K2; k0 += kb)
        tiles(f32, wide, 1, M, N, K2 - k0 < kb ? K2 - k0 : kb, (const char *)a + k0 * ak * es, ar, ak,
              (const char *)b + k0 * bk * es, bk, c, cr);
}

static void product(int wide, int M, int N, int K2, const bf16 *a, long ar, long ak, const bf16 *b, long bk,
                    float *c, long cr) {
    product_as(0, wide, M, N, K2, a, ar, ak, b, bk, c, cr);
}

static void product_f32(int wide, int M, int N, int K, const float *a, long ar, long ak, const float *b, long bk,
                        float *c, long cr) {
    product_as(1, wide, M, N, K, a, ar, ak, b, bk, c, cr);
}

/* the 16 x 16 transpose of 32-bit words in r, in place: unpacks and 128-bit shuffles */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
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
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

/* dst[w][j] = the w-th pair of row j of src (rows rs apart), for L rows and W pairs: 16 x 16 transposes of
 * 32-bit words */
static void to_pairs(const bf16 *src, long rs, int L, int W, bf16 *dst) {
    for (int j0 = 0; j0 < L; j0 += 16)
        for (int w0 = 0; w0 < W; w0 += 16) {
            int words = W - w0 < 16 ? W - w0 : 16;
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = _mm512_maskz_loadu_epi32(lanes_mask(words), src + (j0 + i) * rs + 2 * w0);
            transpose16(r);
            for (int w = 0; w < words; w++) _mm512_storeu_si512(dst + ((long)(w0 + w) * L + j0) * 2, r[w]);
        }
}

/* the lanes of two registers x, y (x's 0..31, y's 32..63) that interleave their first 16 bf16: x0 y0 x1 y1 ... */
static inline __m512i pair_order(void) {
    return _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
}

/* the pairs (x[j], y[j]) of 16 bf16 each, as 16 words */
static inline __m512i zip16(__m256i x, __m256i y) {
    return _mm512_permutex2var_epi16(_mm512_castsi256_si512(x), pair_order(), _mm512_castsi256_si512(y));
}

/* dst[p][0:n] = the pairs (src[2p][j], src[2p+1][j]) for j < n <= 32 columns and p < rows / 2, rows rs apart (an
 * odd last row pairs with zeros), dst's rows of pairs ds bf16 apart */
static void zip_rows(const bf16 *src, long rs, int rows, int n, bf16 *dst, long ds) {
    const __m512i lo = pair_order();
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    __mmask32 m = n >= 32 ? ~0u : (1u << n) - 1;
    __mmask32 m_lo = n >= 16 ? ~0u : (1u << 2 * n) - 1, m_hi = n >= 32 ? ~0u : n > 16 ? (1u << 2 * (n - 16)) - 1 : 0;
    for (int p = 0; 2 * p < rows; p++) {
        __m512i x = _mm512_maskz_loadu_epi16(m, src + 2L * p * rs);
        __m512i y = 2 * p + 1 < rows ? _mm512_maskz_loadu_epi16(m, src + (2L * p + 1) * rs) : _mm512_setzero_si512();
        _mm512_mask_storeu_epi16(dst + p * ds, m_lo, _mm512_permutex2var_epi16(x, lo, y));
        _mm512_mask_storeu_epi16(dst + p * ds + 32, m_hi, _mm512_permutex2var_epi16(x, hi, y));
    }
}

/* dst[rp][c] = (src[2rp][c], src[2rp+1][c]) for `rows` rows rs apart and `cols` columns */
static void interleave(const bf16 *src, long rs, int rows, int cols, bf16 *dst) {
    for (int c = 0; c < cols; c += 32)
        zip_rows(src + c, rs, rows, cols - c < 32 ? cols - c : 32, dst + 2 * c, 2L * cols);
}

/* Loads and stores of bf16 or fp32 values (f32 = 1) as fp32 registers, n <= 16 of them. */
static inline __m512 load16_bf16(const bf16 *x) {  /* 16 bf16 as fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

static inline __m512 load_bf16(const bf16 *x, int n) {  /* up to 16 bf16 as fp32 */
    __m256i h = _mm256_maskz_loadu_epi16(lanes_mask(n), x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load_f32(const float *x, int n) {
    return n >= 16 ? _mm512_loadu_ps(x) : _mm512_maskz_loadu_ps(lanes_mask(n), x);
}

static inline __m512 load_as_f32(const void *p, long i, int n, int f32) {
    if (f32) return load_f32((const float *)p + i, n);
    return n >= 16 ? load16_bf16((const bf16 *)p + i) : load_bf16((const bf16 *)p + i, n);
}

static inline void store_from_f32(void *p, long i, int n, int f32, __m512 v) {
    if (f32 && n >= 16) _mm512_storeu_ps((float *)p + i, v);
    else if (f32) _mm512_mask_storeu_ps((float *)p + i, lanes_mask(n), v);
    else if (n >= 16) _mm256_storeu_si256((__m256i *)((bf16 *)p + i), (__m256i)_mm512_cvtneps_pbh(v));
    else _mm256_mask_storeu_epi16((bf16 *)p + i, lanes_mask(n), (__m256i)_mm512_cvtneps_pbh(v));
}

/* out[r][0:n] = c[r][0:n] * scale[r * step] for R rows, stored as bf16 or fp32 */
static void store_rows(int R, int n, const float *c, long cr, const float *scale, int step, void *out, long os,
                       int f32) {
    for (int r = 0; r < R; r++) {
        __m512 s = _mm512_set1_ps(scale[r * step]);
        for (int j = 0; j < n; j += 16)
            store_from_f32(out, r * os + j, n - j, f32, _mm512_mul_ps(_mm512_loadu_ps(c + r * cr + j), s));
    }
}

/* ask for the cache lines of n bytes at p, a few rows ahead of their use: the hardware prefetcher alone left these
 * row-by-row passes waiting on memory (the backward of norm_modulate 2.5x slower on data out of the caches) */
static inline void prefetch(const void *p, long n) {
    for (long i = 0; i < n; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
}

static inline int padded(int n) { return (n + 15) / 16 * 16; }

typedef struct {  /* one thread's buffers */
    bf16 *pairs, *inter, *p, *ds;
    float *c, *narrow;
} scratch;

static int scratch_init(scratch *s, int L, int Dh) {
    size_t LD = (size_t)L * padded(Dh);
    s->pairs = malloc(sizeof(bf16) * 3 * LD);  /* k as pairs (forward) or v as pairs, q, k interleaved */
    s->inter = malloc(sizeof(bf16) * LD);  /* v interleaved (forward) or g interleaved */
    s->p = malloc(sizeof(bf16) * (size_t)ROWS * L);  /* a tile's probabilities, where none are kept */
    s->ds = malloc(sizeof(bf16) * 2 * (size_t)L * L);  /* ds, and p or ds interleaved (backward) */
    s->c = malloc(sizeof(float) * (size_t)ROWS * L);
    s->narrow = malloc(sizeof(float) * (size_t)L * padded(Dh));
    return s->pairs && s->inter && s->p && s->ds && s->c && s->narrow;
}

static void scratch_free(scratch *s) {
    free(s->pairs), free(s->inter), free(s->p), free(s->ds), free(s->c), free(s->narrow);
}

/* R rows of L scores (fp32, in place, rows L apart) -> the exponentials 2^((s - max) scale log2(e)); inv[r] = 1 / the
 * sum of row r's. coarse: for probabilities rounded to bf16. Pass by pass over all R rows, not row by row: a row's
 * passes wait on each other (its maximum, its sum), the rows do not (8 rows of 256: 16% faster) */
static inline __attribute__((always_inline)) void exp_rows(float *c, int R, int L, float scale, int coarse,
                                                           float *inv) {
    const float k = scale * 1.4426950408889634f;  /* e^(x scale) = 2^(x k) */
    float top[ROWS];
    for (int r = 0; r < R; r++) {
        __m512 m = _mm512_loadu_ps(c + (long)r * L);
        for (int j = 16; j < L; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(c + (long)r * L + j));
        top[r] = _mm512_reduce_max_ps(m) * k;
    }
    for (int r = 0; r < R; r++) {
        float *cr = c + (long)r * L;
        __m512 mk = _mm512_set1_ps(top[r]), kk = _mm512_set1_ps(k), sum = _mm512_setzero_ps();
        for (int j = 0; j < L; j += 16) {
            __m512 e = pow2(_mm512_fmsub_ps(_mm512_loadu_ps(cr + j), kk, mk), coarse);
            sum = _mm512_add_ps(sum, e);
            _mm512_storeu_ps(cr + j, e);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
}

/* The backward's delta = rowsum(p dp) for a row of p and dp = g v^T: as g . out, a sum of Dh products, where that
 * is the shorter (the rows of out, read only then, missed the caches in temporal attention: its backward in a
 * training step 15% faster without them) */
static inline float row_delta(const void *p, const float *dp, const void *g, const void *out, int L, int Dh,
                              int f32) {
    __m512 acc = _mm512_setzero_ps();
    if (L <= Dh)
        for (int j = 0; j < L; j += 16) acc = _mm512_fmadd_ps(load_as_f32(p, j, 16, f32), _mm512_loadu_ps(dp + j), acc);
    else
        for (int d = 0; d < Dh; d += 16)
            acc = _mm512_fmadd_ps(load_as_f32(g, d, Dh - d, f32), load_as_f32(out, d, Dh - d, f32), acc);
    return _mm512_reduce_add_ps(acc);
}

/* In the backward, the next ROWS rows' probabilities (and out's, where row_delta reads them) while the product for
 * rows i0... runs: the ds pass had waited on them (a spatial backward 10% faster). (A macro for both dtypes: as an
 * inline function it measured 10% slower.) */
#define NEXT_ROWS_AHEAD                                                          \
    if (i0 + ROWS < L)                                                           \
        for (int r = i0 + ROWS; r < i0 + 2 * ROWS; r++) {                        \
            prefetch(probs + (long)r * L, (long)L * sizeof(*probs));             \
            if (L > Dh) prefetch(out + r * os, (long)Dh * sizeof(*out));         \
        }

/* probs: NULL (no autograd: unnormalised probabilities, divided out at the end) or L x L, normalised, kept */
static void forward_matrix(const bf16 *q, const bf16 *k, const bf16 *v, long rs, bf16 *out, long os, bf16 *probs,
                           int L, int Dh, float scale, scratch *s) {
    bf16 *kp = s->pairs, *vi = s->inter;
    to_pairs(k, rs, L, Dh / 2, kp);
    interleave(v, rs, L, Dh, vi);
    float inv[ROWS], one = 1.f;
    for (int i0 = 0; i0 < L; i0 += ROWS) {
        int R = L - i0 < ROWS ? L - i0 : ROWS;
        product(1, R, L, Dh / 2, q + i0 * rs, rs, 2, kp, 2L * L, s->c, L);  /* scores */
        bf16 *p = probs ? probs + (long)i0 * L : s->p;
        exp_rows(s->c, R, L, scale, 1, inv);  /* probabilities, the kept ones normalised */
        store_rows(R, L, s->c, L, probs ? inv : &one, probs ? 1 : 0, p, L, 0);
        product(0, R, Dh, L / 2, p, L, 2, vi, 2L * Dh, s->narrow, padded(Dh));  /* p v */
        store_rows(R, Dh, s->narrow, padded(Dh), probs ? &one : inv, probs ? 0 : 1, out + (long)i0 * os, os, 0);
    }
}

static void backward_matrix(const bf16 *q, const bf16 *k, const bf16 *v, long rs, const bf16 *out, long os,
                            const bf16 *probs, const bf16 *g, long gs, bf16 *dq, bf16 *dk, bf16 *dv, long ds_, int L,
                            int Dh, float scale, scratch *s) {
    size_t LD = (size_t)L * padded(Dh);
    bf16 *vp = s->pairs, *qi = s->pairs + LD, *ki = s->pairs + 2 * LD, *gi = s->inter;
    bf16 *ds = s->ds, *ti = s->ds + (size_t)L * L;
    to_pairs(v, rs, L, Dh / 2, vp);
    interleave(q, rs, L, Dh, qi);
    interleave(k, rs, L, Dh, ki);
    interleave(g, gs, L, Dh, gi);
    for (int i0 = 0; i0 < L; i0 += ROWS) {  /* dp = g v^T, then ds = p (dp - delta), delta = rowsum(p dp) = g . out */
        NEXT_ROWS_AHEAD;
        product(1, ROWS, L, Dh / 2, g + i0 * gs, gs, 2, vp, 2L * L, s->c, L);
        for (int r = 0; r < ROWS; r++) {
            long i = i0 + r;
            float *dp = s->c + (long)r * L;
            __m512 delta = _mm512_set1_ps(row_delta(probs + i * L, dp, g + i * gs, out + i * os, L, Dh, 0));
            for (int j = 0; j < L; j += 16) {
                __m512 x = _mm512_sub_ps(_mm512_loadu_ps(dp + j), delta);
                x = _mm512_mul_ps(load_bf16(probs + i * L + j, 16), x);
                _mm256_storeu_si256((__m256i *)(ds + i * L + j), (__m256i)_mm512_cvtneps_pbh(x));
            }
        }
    }
    int np = padded(Dh);
    float one = 1.f;
    product(0, L, Dh, L / 2, ds, L, 2, ki, 2L * Dh, s->narrow, np);  /* dq = ds k scale */
    store_rows(L, Dh, s->narrow, np, &scale, 0, dq, ds_, 0);
    /* dv = p^T g and dk = ds^T q scale: A's pairs run down the columns of p and ds, so interleave their rows */
    interleave(probs, L, L, L, ti);
    product(0, L, Dh, L / 2, ti, 2, 2L * L, gi, 2L * Dh, s->narrow, np);
    store_rows(L, Dh, s->narrow, np, &one, 0, dv, ds_, 0);
    interleave(ds, L, L, L, ti);
    product(0, L, Dh, L / 2, ti, 2, 2L * L, qi, 2L * Dh, s->narrow, np);
    store_rows(L, Dh, s->narrow, np, &scale, 0, dk, ds_, 0);
}

/* fp32: the same, with fmadd for vdpbf16ps: k and v transposed (for q k^T and g v^T) and the rest read in place,
 * as rows of B (p v, ds k, p^T g, ds^T q) or broadcast down columns of A (p^T, ds^T); scores, exponentials and the
 * kept probabilities in one L x L buffer */
static void forward_matrix_f32(const float *q, const float *k, const float *v, long rs, float *out, long os,
                               float *probs, int L, int Dh, float scale, scratch *s) {
    float *kt = (float *)s->pairs, inv[ROWS], one = 1.f;
    to_pairs((const bf16 *)k, 2 * rs, L, Dh, (bf16 *)kt);  /* (its 32-bit words transposed) */
    for (int i0 = 0; i0 < L; i0 += ROWS) {
        int R = L - i0 < ROWS ? L - i0 : ROWS;
        float *p = probs ? probs + (long)i0 * L : s->c;
        product_f32(1, R, L, Dh, q + i0 * rs, rs, 1, kt, L, p, L);  /* scores */
        exp_rows(p, R, L, scale, 0, inv);
        if (probs) store_rows(R, L, p, L, inv, 1, p, L, 1);
        product_f32(0, R, Dh, L, p, L, 1, v, rs, s->narrow, padded(Dh));  /* p v */
        store_rows(R, Dh, s->narrow, padded(Dh), probs ? &one : inv, probs ? 0 : 1, out + (long)i0 * os, os, 1);
    }
}

static void backward_matrix_f32(const float *q, const float *k, const float *v, long rs, const float *out, long os,
                                const float *probs, const float *g, long gs, float *dq, float *dk, float *dv,
                                long ds_, int L, int Dh, float scale, scratch *s) {
    float *vt = (float *)s->pairs, *ds = (float *)s->ds, one = 1.f;
    to_pairs((const bf16 *)v, 2 * rs, L, Dh, (bf16 *)vt);
    for (int i0 = 0; i0 < L; i0 += ROWS) {  /* dp = g v^T, then ds = p (dp - delta), delta = rowsum(p dp) = g . out */
        NEXT_ROWS_AHEAD;
        product_f32(1, ROWS, L, Dh, g + i0 * gs, gs, 1, vt, L, s->c, L);
        for (int r = 0; r < ROWS; r++) {
            long i = i0 + r;
            __m512 delta = _mm512_set1_ps(row_delta(probs + i * L, s->c + r * L, g + i * gs, out + i * os, L, Dh, 1));
            for (int j = 0; j < L; j += 16) {
                __m512 centred = _mm512_sub_ps(_mm512_loadu_ps(s->c + r * L + j), delta);  /* dp - delta */
                _mm512_storeu_ps(ds + i * L + j, _mm512_mul_ps(_mm512_loadu_ps(probs + i * L + j), centred));
            }
        }
    }
    int np = padded(Dh);
    product_f32(0, L, Dh, L, ds, L, 1, k, rs, s->narrow, np);  /* dq = ds k scale */
    store_rows(L, Dh, s->narrow, np, &scale, 0, dq, ds_, 1);
    product_f32(0, L, Dh, L, probs, 1, L, g, gs, s->narrow, np);  /* dv = p^T g */
    store_rows(L, Dh, s->narrow, np, &one, 0, dv, ds_, 1);
    product_f32(0, L, Dh, L, ds, 1, L, q, rs, s->narrow, np);  /* dk = ds^T q scale */
    store_rows(L, Dh, s->narrow, np, &scale, 0, dk, ds_, 1);
}

/* a matrix's L rows (rs apart, of `bytes`) at p + at, for the next matrix while this one computes: temporal
 * attention's rows lie N tokens apart (its forward took 1.9 ms a layer in a training step, 0.8 ms on data in the
 * caches); q, k and v: a bf16 training step 1% faster at one thread, 3% at two, a forward 0.7% and 1.5%. l2: into
 * L2 only, for the same head's matrix at the next position, n_heads matrices ahead (temporal forward 8-14% and
 * backward 3-7% faster in a training step). Called three times in a row below: one function calling it for q, k
 * and v made the temporal forward 25% slower */
static void prefetch_rows(const void *p, long at, long rs, int L, int bytes, int es, int l2) {
    for (long r = 0; r < L; r++)
        for (int i = 0; i < bytes; i += 64)
            if (l2) _mm_prefetch((const char *)p + (at + r * rs) * es + i, _MM_HINT_T1);
            else _mm_prefetch((const char *)p + (at + r * rs) * es + i, _MM_HINT_T0);
}

/* All n_seq x n_heads matrices, split over `threads` OpenMP threads (torch's own, where this library binds to the
 * libgomp torch loaded). Strides in elements, the last dimension contiguous: q, k, v share (seq, head, row); out
 * and dq, dk, dv share theirs; probs is (matrices, L, L). Returns 0, 1 for shapes it does not take, 2 when out of
 * memory. */
#define EACH_MATRIX(ahead, body)                                                               \
    if (L < 16 || L % 16 || Dh < 2 || Dh % 2) return 1;                                        \
    int failed = 0, es = sizeof(*q);                                                           \
    _Pragma("omp parallel num_threads(threads) reduction(| : failed)") {                       \
        scratch s;                                                                             \
        failed = !scratch_init(&s, L, Dh);                                                     \
        _Pragma("omp for schedule(static)") for (long m = 0; m < n_seq * n_heads; m++) {       \
            if (failed) continue;                                                              \
            long seq = m / n_heads, head = m % n_heads, at = seq * s_seq + head * s_head;      \
            if (m + 1 < n_seq * n_heads) {                                                     \
                long seq1 = (m + 1) / n_heads, head1 = (m + 1) % n_heads;                      \
                long at1 = seq1 * s_seq + head1 * s_head;                                      \
                prefetch_rows(q, at1, s_row, L, Dh * es, es, 0);                               \
                prefetch_rows(k, at1, s_row, L, Dh * es, es, 0);                               \
                prefetch_rows(v, at1, s_row, L, Dh * es, es, 0);                               \
                ahead;                                                                         \
            }                                                                                  \
            if (m + n_heads < n_seq * n_heads) { /* this head at the next position, into L2 */ \
                prefetch_rows(q, at + s_seq, s_row, L, Dh * es, es, 1);                        \
                prefetch_rows(k, at + s_seq, s_row, L, Dh * es, es, 1);                        \
                prefetch_rows(v, at + s_seq, s_row, L, Dh * es, es, 1);                        \
            }                                                                                  \
            body;                                                                              \
        }                                                                                      \
        scratch_free(&s);                                                                      \
    }                                                                                          \
    return failed ? 2 : 0;

/* the backward also reads g's rows, and out's where row_delta takes them (g . out: without this, half the time of
 * its passes outside the products went waiting on out's rows) */
#define OUT_AND_G_AHEAD                                                                      \
    if (L > Dh) prefetch_rows(out, seq1 * o_seq + head1 * o_head, o_row, L, Dh * es, es, 0); \
    prefetch_rows(g, seq1 * g_seq + head1 * g_head, g_row, L, Dh * es, es, 0)

/* the entry points, attention_bf16 (and _backward) and attention_f32, for elements of type T */
#define ATTENTION(name, T, forward, backward)                                                                        \
    int name(const T *q, const T *k, const T *v, T *out, T *probs, long n_seq, long n_heads, int L, int Dh,        \
             long s_seq, long s_head, long s_row, long o_seq, long o_head, long o_row, float scale, int threads) { \
        EACH_MATRIX(, forward(q + at, k + at, v + at, s_row, out + seq * o_seq + head * o_head, o_row,             \
                              probs ? probs + m * L * L : NULL, L, Dh, scale, &s))                                  \
    }                                                                                                              \
    int name##_backward(const T *q, const T *k, const T *v, const T *out, const T *probs, const T *g, T *dq,       \
                        T *dk, T *dv, long n_seq, long n_heads, int L, int Dh, long s_seq, long s_head,            \
                        long s_row, long o_seq, long o_head, long o_row, long g_seq, long g_head, long g_row,      \
                        long d_seq, long d_head, long d_row, float scale, int threads) {                           \
        EACH_MATRIX(OUT_AND_G_AHEAD, long d = seq * d_seq + head * d_head;                                         \
                    backward(q + at, k + at, v + at, s_row, out + seq * o_seq + head * o_head, o_row,              \
                             probs + m * L * L, g + seq * g_seq + head * g_head, g_row, dq + d, dk + d, dv + d,    \
                             d_row, L, Dh, scale, &s))                                                            \
    }

ATTENTION(attention_bf16, bf16, forward_matrix, backward_matrix)
ATTENTION(attention_f32, float, forward_matrix_f32, backward_matrix_f32)

/* The tanh-GELU in the form h sigmoid(2u), 2u = h (C + C 0.044715 h^2), C = 2 sqrt(2/pi), over n contiguous values:
 * y = GELU(h), or with g, y = g GELU'(h) = g (s + h s (1 - s) (C + 3 C 0.044715 h^2)). fp32 results go past the
 * caches (streaming stores), where y is aligned. */
int gelu(const void *h, const void *g, void *y, long n, int f32, int threads) {
    const float C = 1.5957691216057308f, C3 = C * 0.044715f, L2E = -1.4426950408889634f;  /* e^-2u = 2^(2u L2E) */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i0 = 0; i0 < n; i0 += 4096) {
        for (long i = i0; i < n && i < i0 + 4096; i += 16) {
            int lanes = n - i < 16 ? n - i : 16;
            __m512 x = load_as_f32(h, i, lanes, f32), x2 = _mm512_mul_ps(x, x);
            __m512 z = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_set1_ps(C3 * L2E), x2, _mm512_set1_ps(C * L2E)));
            __m512 t = _mm512_min_ps(_mm512_set1_ps(126.f), z);  /* -2u log2(e) */
            __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), pow2(t, !f32));  /* 1 + e^-2u, finite (NaN stays NaN) */
            __m512 sg = _mm512_rcp14_ps(d);  /* sigmoid(2u) = 1 / (1 + e^-2u) (2^-14), in fp32 with a Newton step */
            if (f32) sg = _mm512_mul_ps(sg, _mm512_fnmadd_ps(d, sg, _mm512_set1_ps(2.f)));
            __m512 out;
            if (g) {
                __m512 dz = _mm512_fmadd_ps(_mm512_set1_ps(3 * C3), x2, _mm512_set1_ps(C));
                __m512 ds = _mm512_mul_ps(_mm512_mul_ps(x, sg), _mm512_sub_ps(_mm512_set1_ps(1.f), sg));
                out = _mm512_mul_ps(load_as_f32(g, i, lanes, f32), _mm512_fmadd_ps(ds, dz, sg));
            } else {
                out = _mm512_mul_ps(x, sg);
            }
            if (f32 && lanes == 16 && !((uintptr_t)y & 63)) _mm512_stream_ps((float *)y + i, out);
            else store_from_f32(y, i, lanes, f32, out);
        }
        _mm_sfence();  /* this thread's streaming stores visible before the loop's closing barrier */
    }
    return 0;
}

/* adaLN around each sub-layer of a block (S-AdaLN): x holds B samples of `rows` rows of D, each sample's rows
 * contiguous, samples xs apart; shift, scale, gate (B, D) fp32. */

/* y = LayerNorm(x) (1 + scale) + shift, y contiguous; mean and rstd (per row) kept where given */
int norm_modulate(const void *x, long xs, long rows, int B, int D, const float *shift, const float *scale, float eps,
                  void *y, float *mean, float *rstd, int f32, int threads) {
    int es = f32 ? 4 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < B * rows; r++) {
        long b = r / rows, xr = b * xs + (r % rows) * D;  /* the row's first element */
        const float *sh = shift + b * D, *sc = scale + b * D;
        prefetch((const char *)x + (xr + AHEAD * D) * es, (long)D * es);
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) acc = _mm512_add_ps(acc, load_as_f32(x, xr + d, D - d, f32));
        float mu = _mm512_reduce_add_ps(acc) / D;
        __m512 m = _mm512_set1_ps(mu);
        acc = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) {  /* the variance about the mean: a second pass over the row, in L1 */
            __m512 c = _mm512_maskz_sub_ps(lanes_mask(D - d), load_as_f32(x, xr + d, D - d, f32), m);
            acc = _mm512_fmadd_ps(c, c, acc);
        }
        float rs = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / D + eps);
        if (mean) mean[r] = mu, rstd[r] = rs;
        __m512 s = _mm512_set1_ps(rs);
        for (int d = 0; d < D; d += 16) {
            __m512 n = _mm512_mul_ps(_mm512_sub_ps(load_as_f32(x, xr + d, D - d, f32), m), s);
            __m512 one_scale = _mm512_add_ps(load_f32(sc + d, D - d), _mm512_set1_ps(1.f));
            __m512 o = _mm512_fmadd_ps(n, one_scale, load_f32(sh + d, D - d));
            store_from_f32(y, r * D + d, D - d, f32, o);
        }
    }
    return 0;
}

/* The backward of norm_modulate: with n = (x - mean) rstd and dn = dy (1 + scale), dx = rstd (dn - mean(dn) -
 * n mean(dn n)) (dy, dx contiguous), dscale = the sum of dy n over a sample's rows, dshift that of dy. */
int norm_modulate_backward(const void *x, long xs, long rows, int B, int D, const float *scale, const float *mean,
                           const float *rstd, const void *dy, void *dx, float *dscale, float *dshift, int f32,
                           int threads) {
    int failed = 0, es = f32 ? 4 : 2;
    memset(dscale, 0, sizeof(float) * B * D), memset(dshift, 0, sizeof(float) * B * D);
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *ps = calloc(2 * (size_t)B * D, sizeof(float)), *pb = ps + (size_t)B * D;  /* this thread's sums */
        failed = !ps;
#pragma omp for schedule(static)
        for (long r = 0; r < B * rows; r++) {
            if (failed) continue;
            long b = r / rows, xr = b * xs + (r % rows) * D, gr = r * D;
            const float *sc = scale + b * D;
            prefetch((const char *)x + (xr + AHEAD * D) * es, (long)D * es);
            prefetch((const char *)dy + (gr + AHEAD * D) * es, (long)D * es);
            __m512 m = _mm512_set1_ps(mean[r]), s = _mm512_set1_ps(rstd[r]), a = _mm512_setzero_ps(), c = a;
            for (int d = 0; d < D; d += 16) {
                int k = D - d;
                __m512 n = _mm512_mul_ps(_mm512_sub_ps(load_as_f32(x, xr + d, k, f32), m), s);
                __m512 g = load_as_f32(dy, gr + d, k, f32);
                __m512 dn = _mm512_mul_ps(g, _mm512_add_ps(load_f32(sc + d, k), _mm512_set1_ps(1.f)));
                a = _mm512_add_ps(a, dn), c = _mm512_fmadd_ps(dn, n, c);
                _mm512_mask_storeu_ps(ps + b * D + d, lanes_mask(k),
                                      _mm512_fmadd_ps(g, n, load_f32(ps + b * D + d, k)));
                _mm512_mask_storeu_ps(pb + b * D + d, lanes_mask(k), _mm512_add_ps(g, load_f32(pb + b * D + d, k)));
            }
            __m512 ma = _mm512_set1_ps(_mm512_reduce_add_ps(a) / D), mc = _mm512_set1_ps(_mm512_reduce_add_ps(c) / D);
            for (int d = 0; d < D; d += 16) {
                int k = D - d;
                __m512 n = _mm512_mul_ps(_mm512_sub_ps(load_as_f32(x, xr + d, k, f32), m), s);
                __m512 dn = _mm512_mul_ps(load_as_f32(dy, gr + d, k, f32),
                                          _mm512_add_ps(load_f32(sc + d, k), _mm512_set1_ps(1.f)));
                store_from_f32(dx, gr + d, k, f32, _mm512_mul_ps(s, _mm512_fnmadd_ps(n, mc, _mm512_sub_ps(dn, ma))));
            }
        }
#pragma omp critical
        if (ps)
            for (long i = 0; i < (long)B * D; i++) dscale[i] += ps[i], dshift[i] += pb[i];
        free(ps);
    }
    return failed;
}

/* The gated residual y = x + gate branch, y contiguous (B, F, N, D), x's rows contiguous in each sample (samples xs
 * apart), branch strided as below (temporal attention's comes in its own (B, N, F) order) */
int gated(const void *x, long xs, const void *branch, int B, long F, long N, int D, long s0, long s1, long s2,
          const float *gate, void *y, int f32, int threads) {
    int es = f32 ? 4 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < B * F * N; r++) {
        long b = r / (F * N), xr = b * xs + r % (F * N) * D, at = b * s0 + (r / N % F) * s1 + r % N * s2;
        prefetch((const char *)x + (xr + AHEAD * D) * es, (long)D * es);
        prefetch((const char *)branch + (at + AHEAD * s2) * es, (long)D * es);
        for (int d = 0; d < D; d += 16) {
            int k = D - d;
            __m512 sum = _mm512_fmadd_ps(load_f32(gate + b * D + d, k), load_as_f32(branch, at + d, k, f32),
                                         load_as_f32(x, xr + d, k, f32));
            store_from_f32(y, r * D + d, k, f32, sum);
        }
    }
    return 0;
}

/* The backward of the gated residual x + gate branch: dbranch = g gate, dgate = the sum of g branch over a sample's
 * rows. g is contiguous (B, F, N, D); branch and dbranch share strides (b, f, n), D contiguous. */
int gated_backward(const void *g, const void *branch, void *dbranch, int B, long F, long N, int D, long s0, long s1,
                   long s2, const float *gate, float *dgate, int f32, int threads) {
    int failed = 0, es = f32 ? 4 : 2;
    memset(dgate, 0, sizeof(float) * B * D);
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *pg = calloc((size_t)B * D, sizeof(float));  /* this thread's sums */
        failed = !pg;
#pragma omp for schedule(static)
        for (long r = 0; r < B * F * N; r++) {
            if (failed) continue;
            long b = r / (F * N), at = b * s0 + (r / N % F) * s1 + r % N * s2;
            prefetch((const char *)g + (r + AHEAD) * D * es, (long)D * es);
            prefetch((const char *)branch + (at + AHEAD * s2) * es, (long)D * es);
            for (int d = 0; d < D; d += 16) {
                int k = D - d;
                __m512 gr = load_as_f32(g, r * D + d, k, f32);
                __m512 sum = _mm512_fmadd_ps(gr, load_as_f32(branch, at + d, k, f32), load_f32(pg + b * D + d, k));
                _mm512_mask_storeu_ps(pg + b * D + d, lanes_mask(k), sum);
                store_from_f32(dbranch, at + d, k, f32, _mm512_mul_ps(gr, load_f32(gate + b * D + d, k)));
            }
        }
#pragma omp critical
        if (pg)
            for (long i = 0; i < (long)B * D; i++) dgate[i] += pg[i];
        free(pg);
    }
    return failed;
}

/* A linear layer's weight gradient, c = a^T b (M x N, fp32) over the K rows of a (K x M) and b (K x N), where a is
 * the output's gradient and b the input, both as autograd holds them (rows of tokens): the products through oneDNN
 * would first copy both transposed. A tile of MR rows x 32 columns of c adds, for each k, a[k][m] broadcast times 32
 * values of b's row k (in bf16, for each pair of k, the pair of a's broadcast times 32 pairs of b's, vdpbf16ps). a
 * is read a block of KC x MC at a time from L2, in place in fp32 and laid out as pairs in bf16; b as a panel of KC x
 * 32 copied into L1. The work is blocks of c (MC rows x 32 columns), shared among the threads. sum, if not NULL: a's
 * column sums as well (the bias's gradient), each taken by the block of c at its first 32 columns from the rows of
 * a that block brings into cache. */
#define MR 12
#define KC 128  /* (of fp32: 256 of bf16) */
#define MC 480

/* the rows of c's tile, c[r][0:32] (+)= a^T b over K (K2 pairs in bf16); mask m0, m1: c's columns */
static inline __attribute__((always_inline)) void tn_tile(int R, int K, const void *a, long as, const void *b,
                                                          float *c, long cs, int add, __mmask16 m0, __mmask16 m1,
                                                          int f32) {
    __m512 acc[MR][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    if (f32)
        for (int k = 0; k < K; k++) {
            const float *ak = (const float *)a + k * as, *bk = (const float *)b + 32 * k;
            __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16);
            _mm_prefetch((const char *)(ak + 8 * as), _MM_HINT_T0);  /* a's rows lie as apart: 8 ahead */
            _mm_prefetch((const char *)(ak + 8 * as + R - 1), _MM_HINT_T0);
            for (int r = 0; r < R; r++) {
                __m512 x = _mm512_set1_ps(ak[r]);
                acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
            }
        }
    else
        for (int kp = 0; kp < K; kp++) {  /* a: pairs, as apart; b: 32 pairs a row */
            const bf16 *ak = (const bf16 *)a + 2 * kp * as, *bk = (const bf16 *)b + 64 * kp;
            __m512bh b0 = (__m512bh)_mm512_load_si512(bk), b1 = (__m512bh)_mm512_load_si512(bk + 32);
            for (int r = 0; r < R; r++) {
                __m512bh x = pair_at(ak + 2 * r);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
            }
        }
    for (int r = 0; r < R; r++) {
        float *cr = c + r * cs;
        if (add) {
            acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_maskz_loadu_ps(m0, cr));
            acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_maskz_loadu_ps(m1, cr + 16));
        }
        _mm512_mask_storeu_ps(cr, m0, acc[r][0]);
        _mm512_mask_storeu_ps(cr + 16, m1, acc[r][1]);
    }
}

/* sum[0:n] (+)= the sums over K rows (rs apart) of x's first n columns, in fp32, each in the rows' order (a block's
 * sum first, then added: as close as ATen's) */
static void column_sums(const void *x, long rs, int K, long n, float *sum, int add, int f32) {
    for (long j = 0; j < n; j += 64) {  /* four sums at a time */
        __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int w[4];
        for (int v = 0; v < 4; v++) w[v] = n - j - 16 * v < 0 ? 0 : n - j - 16 * v < 16 ? n - j - 16 * v : 16;
        for (int k = 0; k < K; k++)
            for (int v = 0; v < 4; v++) s[v] = _mm512_add_ps(s[v], load_as_f32(x, k * rs + j + 16 * v, w[v], f32));
        for (int v = 0; v < 4; v++)
            _mm512_mask_storeu_ps(sum + j + 16 * v, lanes_mask(w[v]),
                                  add ? _mm512_add_ps(s[v], load_f32(sum + j + 16 * v, w[v])) : s[v]);
    }
}

int matmul_tn(const void *a, long as, const void *b, long bs, float *c, long cs, long M, long N, long K, int f32,
              float *sum, int threads) {
    long panels = (N + 31) / 32, blocks = (M + MC - 1) / MC, kc_max = f32 ? KC : 2 * KC;
    while (blocks * panels < 2L * threads && blocks * MR < M) blocks++;  /* enough work for every thread */
    long mc = (M + blocks - 1) / blocks, work = blocks * panels;
    mc = (mc + MR - 1) / MR * MR;  /* blocks of the same size in whole tiles (the last may be shorter, or empty) */
    long ma = (mc + 31) / 32 * 32;  /* bf16: a block's row of pairs */
    int failed = 0, es = f32 ? 4 : 2;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        void *panel = aligned_alloc(64, KC * 32 * 4), *block = f32 ? NULL : aligned_alloc(64, KC * ma * 4);
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        failed = !panel || (!f32 && !block);
        for (long k0 = 0; !failed && k0 < K; k0 += kc_max) {  /* (a thread's share is the same at every k0) */
            int kc = K - k0 < kc_max ? K - k0 : kc_max;
            for (long u = work * t / nt, packed = -1; u < work * (t + 1) / nt; u++) {
                long i0 = u / panels * mc, n0 = u % panels * 32, i1 = i0 + mc < M ? i0 + mc : M;
                int cols = N - n0 < 32 ? N - n0 : 32;
                __mmask16 m0 = lanes_mask(cols), m1 = lanes_mask(cols - 16 > 0 ? cols - 16 : 0);
                const char *ak = (const char *)a + (k0 * as + i0) * es, *bk = (const char *)b + (k0 * bs + n0) * es;
                if (f32) {
                    for (int k = 0; k < kc; k++) {
                        const float *row = (const float *)bk + k * bs;
                        _mm512_store_ps((float *)panel + 32 * k, _mm512_maskz_loadu_ps(m0, row));
                        _mm512_store_ps((float *)panel + 32 * k + 16, _mm512_maskz_loadu_ps(m1, row + 16));
                    }
                } else {
                    if (packed != i0)  /* a's block, as pairs: ma pairs a row */
                        for (long j = 0; j < i1 - i0; j += 32)
                            zip_rows((const bf16 *)ak + j, as, kc, i1 - i0 - j < 32 ? i1 - i0 - j : 32,
                                     (bf16 *)block + 2 * j, 2 * ma);
                    packed = i0;
                    zip_rows((const bf16 *)bk, bs, kc, cols, panel, 64);
                }
                if (sum && n0 == 0) column_sums(ak, as, kc, i1 - i0, sum + i0, k0 > 0, f32);
                for (long i = i0; i < i1; i += MR) {
                    const void *ai = f32 ? (const void *)((const float *)ak + (i - i0))
                                         : (const void *)((const bf16 *)block + 2 * (i - i0));
                    long ar = f32 ? as : ma, steps = f32 ? kc : (kc + 1) / 2;
                    float *ci = c + i * cs + n0;
                    if (i1 - i >= MR && f32) tn_tile(MR, steps, ai, ar, panel, ci, cs, k0 > 0, m0, m1, 1);
                    else if (i1 - i >= MR) tn_tile(MR, steps, ai, ar, panel, ci, cs, k0 > 0, m0, m1, 0);
                    else tn_tile(i1 - i, steps, ai, ar, panel, ci, cs, k0 > 0, m0, m1, f32);
                }
            }
        }
        free(panel), free(block);
    }
    return failed ? 2 : 0;
}

/* sum[0:n] = the sums over K rows (rs apart) of bf16 x's first n columns, in fp32: a bias gradient where the
 * product runs elsewhere; threads take blocks of 64 columns */
int sums_bf16(const bf16 *x, long rs, long K, long n, float *sum, int threads) {
    long blocks = (n + 63) / 64;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++)
        column_sums(x + 64 * b, rs, K, n - 64 * b < 64 ? n - 64 * b : 64, sum + 64 * b, 0, 0);
    return 0;
}

/* ---- AMX tiles (where the CPU has them and the compiler knows them): bf16 weight gradients with fp32 results ---- */
#if defined(__has_include)
#if __has_include(<amxtileintrin.h>) && __has_include(<amxbf16intrin.h>)
#define HAVE_AMX 1
#endif
#endif
#ifdef HAVE_AMX
#include <sys/syscall.h>
#include <unistd.h>
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define AMX_KC 512  /* k (rows of a and b) per block: the thread's share of t and p's 32 columns in cache */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* The tile of a^T for columns m0 .. m0 + 16 (n valid) and rows k0 .. k0 + 32 (kn valid) of a (rows as apart): dst
 * [m][0:32] = a[k0 + k][m0 + m] for k < 32, zeros past the edges */
static inline __attribute__((always_inline)) void pack_transposed(const bf16 *a, long as, int n, int kn, bf16 *dst) {
    __m512i r[16];
    __mmask16 m = lanes_mask(n);
    for (int p = 0; p < 16; p++) {
        __m256i x = 2 * p < kn ? _mm256_maskz_loadu_epi16(m, a + 2L * p * as) : _mm256_setzero_si256();
        __m256i y = 2 * p + 1 < kn ? _mm256_maskz_loadu_epi16(m, a + (2L * p + 1) * as) : _mm256_setzero_si256();
        r[p] = zip16(x, y);
    }
    transpose16(r);
    for (int i = 0; i < 16; i++) _mm512_store_si512(dst + 32 * i, r[i]);
}

/* c (M x N, fp32) = a^T b for bf16 a (K x M) and b (K x N), rows as and bs apart: a linear layer's weight gradient
 * on the tiles. The narrower of a and b is laid out transposed (the costlier layout), t, and the other as pairs of
 * rows, p, giving c or its transpose, d = t^T p (R x C). Each thread takes a share of d's rows or columns (the more
 * numerous blocks of 32), keeps it in fp32 in its own buffer, and for each block of AMX_KC rows of a and b lays out
 * its share of t, in 16 x 32 tiles, and of p, 32 columns at a time; d's blocks of 32 x 32 are four accumulator tiles.
 * The share goes to c at the end (transposed, if d is c^T). sum, if not NULL: a's column sums (the bias's gradient),
 * from each block of rows while it is in cache. */
AMX int matmul_tn_amx(const bf16 *a, long as, const bf16 *b, long bs, float *c, long cs, long M, long N, long K,
                      float *sum, int threads) {
    int swap = M > N, failed = 0;
    const bf16 *tm = swap ? b : a, *pm = swap ? a : b;
    long ts = swap ? bs : as, ps = swap ? as : bs, R = swap ? N : M, C = swap ? M : N;
    long rb = (R + 31) / 32, cb = (C + 31) / 32;  /* blocks of 32 */
    int split_r = rb >= cb;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long parts = split_r ? rb : cb, lo = parts * t / nt, hi = parts * (t + 1) / nt;
        long r0 = split_r ? 32 * lo : 0, r1 = split_r ? (32 * hi < R ? 32 * hi : R) : R;
        long c0 = split_r ? 0 : 32 * lo, c1 = split_r ? C : (32 * hi < C ? 32 * hi : C);
        long rt = (r1 - r0 + 31) / 32 * 2, dw = (c1 - c0 + 31) / 32 * 32;  /* t's tiles of 16; d's row in the share */
        long steps = AMX_KC / 32;  /* tiles of 32 k */
        bf16 *tp = aligned_alloc(64, (rt + 2) * steps * 1024), *pp = aligned_alloc(64, 2 * steps * 1024);
        float *d = aligned_alloc(64, (rt * 16 + 16) * dw * 4 + 64);
        long s0 = swap ? c0 : r0, s1 = swap ? c1 : r1;  /* a's columns in the share: their sums, by one thread */
        int sums = sum && (swap ? r0 : c0) == 0;
        failed = !tp || !pp || !d;
        if (!failed && r1 > r0 && c1 > c0) {
            tile_config cfg;
            memset(&cfg, 0, sizeof cfg);
            cfg.palette = 1;
            for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
            _tile_loadconfig(&cfg);
            for (long k0 = 0; k0 < K; k0 += AMX_KC) {
                int kc = K - k0 < AMX_KC ? K - k0 : AMX_KC, ks = (kc + 31) / 32;
                for (int s = 0; s < ks; s++)  /* t's share, transposed: tile (i, s) at tp + (i steps + s) 512 */
                    for (long i = 0; i < rt; i++) {
                        long r = r0 + 16 * i;
                        int n = r1 - r < 16 ? (r1 - r > 0 ? r1 - r : 0) : 16;
                        pack_transposed(tm + (k0 + 32 * s) * ts + r, ts, n, kc - 32 * s < 32 ? kc - 32 * s : 32,
                                        tp + (i * steps + s) * 512);
                    }
                if (sums) column_sums(a + k0 * as + s0, as, kc, s1 - s0, sum + s0, k0 > 0, 0);
                for (long j = c0; j < c1; j += 32) {
                    for (int s = 0; s < ks; s++) {  /* p's columns j .. j + 32 as pairs of rows, 16 rows a step */
                        if (kc - 32 * s < 32)  /* (the pairs past K: zeros) */
                            memset(pp + s * 1024, 0, 2048);
                        zip_rows(pm + (k0 + 32 * s) * ps + j, ps, kc - 32 * s < 32 ? kc - 32 * s : 32,
                                 c1 - j < 32 ? c1 - j : 32, pp + s * 1024, 64);
                    }
                    for (long i = 0; i < rt; i += 2) {
                        float *dt = d + 16 * i * dw + (j - c0);
                        if (k0 == 0) {
                            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                        } else {
                            _tile_loadd(0, dt, dw * 4); _tile_loadd(1, dt + 16, dw * 4);
                            _tile_loadd(2, dt + 16 * dw, dw * 4); _tile_loadd(3, dt + 16 * dw + 16, dw * 4);
                        }
                        for (int s = 0; s < ks; s++) {
                            for (int q = 0; q < 1024; q += 64) {  /* t's tiles two steps on, into L1 */
                                _mm_prefetch((const char *)(tp + (i * steps + s + 2) * 512) + q, _MM_HINT_T0);
                                _mm_prefetch((const char *)(tp + ((i + 1) * steps + s + 2) * 512) + q, _MM_HINT_T0);
                            }
                            _tile_loadd(4, tp + (i * steps + s) * 512, 64);
                            _tile_loadd(5, tp + ((i + 1) * steps + s) * 512, 64);
                            _tile_loadd(6, pp + s * 1024, 128);  /* its first 16 columns, then the next 16 */
                            _tile_loadd(7, pp + s * 1024 + 32, 128);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                        _tile_stored(0, dt, dw * 4); _tile_stored(1, dt + 16, dw * 4);
                        _tile_stored(2, dt + 16 * dw, dw * 4); _tile_stored(3, dt + 16 * dw + 16, dw * 4);
                    }
                }
            }
            _tile_release();
            if (!swap)  /* the share to c */
                for (long r = r0; r < r1; r++)
                    for (long j = c0; j < c1; j += 16)
                        _mm512_mask_storeu_ps(c + r * cs + j, lanes_mask(c1 - j),
                                              _mm512_load_ps(d + (r - r0) * dw + j - c0));
            else
                for (long r = r0; r < r1; r += 16)
                    for (long j = c0; j < c1; j += 16) {
                        __m512i x[16];
                        for (int q = 0; q < 16; q++) x[q] = _mm512_load_si512(d + (r - r0 + q) * dw + j - c0);
                        transpose16(x);
                        for (int q = 0; q < 16 && j + q < c1; q++)
                            _mm512_mask_storeu_ps(c + (j + q) * cs + r, lanes_mask(r1 - r),
                                                  _mm512_castsi512_ps(x[q]));
                    }
        }
        free(tp), free(pp), free(d);
    }
    return failed ? 2 : 0;
}

/* 1 where this process may use the tiles (Linux asks each process to request them), else 0 */
int amx_ready(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#else
int amx_ready(void) { return 0; }
int matmul_tn_amx(const bf16 *a, long as, const bf16 *b, long bs, float *c, long cs, long M, long N, long K,
                  float *sum, int threads) {
    return 2;
}
#endif
