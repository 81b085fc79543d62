/* softmax(q k^T * scale) v in bf16 on x86 CPUs with AVX-512 BF16, one (sequence, head) matrix at a time, for
 * attention without autograd (sampling). Built and loaded by kernels.py; the same function as torch's attention.
 *
 * Per matrix: k and v are repacked so that vdpbf16ps (16 lanes, each the dot product of a pair of bf16) reads
 * them a register at a time; then for each tile of query rows: the scores of the tile against every key in fp32
 * registers (to an L1 buffer), their exponentials with a polynomial 2^x, unnormalised probabilities rounded to
 * bf16, and p v, divided by the row sums on the way out. q, k and v are read in place through their strides (the
 * columns of one qkv projection), and the output is written in place through its own.
 * Shapes: L rows (keys, queries), Dh head width; L a multiple of 16, Dh even. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

#define ROWS 12  /* query rows per score tile: 12 rows x 32 keys = 24 fp32 accumulators */
#define PV_ROWS 4  /* rows per p v tile: 4 rows x 64 columns = 16 accumulators */

static inline __m512 exp2_nonpositive(__m512 x) {  /* 2^x for x <= 0: 2^frac by a degree-5 polynomial, then scalef */
    x = _mm512_max_ps(_mm512_set1_ps(-126.f), x);  /* (a NaN stays NaN: max returns its second operand) */
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.8775767e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.9893397e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5826318e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4015361e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315308e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.9999994e-1f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512bh pair(const bf16 *x) {  /* x[0], x[1] in every lane */
    int32_t w;
    memcpy(&w, x, 4);
    return (__m512bh)_mm512_set1_epi32(w);
}

/* scores s[r][j] = q[r] . k[j] for R rows and 16 KZ keys from key j0; kp[dp][j] holds k[j][2dp:2dp+2] */
static inline __attribute__((always_inline)) void score_tile(int R, int KZ, const bf16 *q, long rs, const bf16 *kp,
                                                             int L, int Dh, int j0, float *s) {
    __m512 acc[ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int dp = 0; dp < Dh / 2; dp++) {
        const bf16 *kr = kp + ((long)dp * L + j0) * 2;
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(kr), b1 = b0;
        if (KZ == 2) b1 = (__m512bh)_mm512_loadu_si512(kr + 32);
        for (int r = 0; r < R; r++) {
            __m512bh a = pair(q + r * rs + 2 * dp);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            if (KZ == 2) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(s + (long)r * L + j0, acc[r][0]);
        if (KZ == 2) _mm512_storeu_ps(s + (long)r * L + j0 + 16, acc[r][1]);
    }
}

static void scores(int R, const bf16 *q, long rs, const bf16 *kp, int L, int Dh, float *s) {
    for (int j0 = 0; j0 < L; j0 += 32) {
        int kz = L - j0 >= 32 ? 2 : 1;
        if (R == ROWS && kz == 2) score_tile(ROWS, 2, q, rs, kp, L, Dh, j0, s);
        else if (R == ROWS) score_tile(ROWS, 1, q, rs, kp, L, Dh, j0, s);
        else if (kz == 2) score_tile(R, 2, q, rs, kp, L, Dh, j0, s);  /* the last few rows */
        else score_tile(R, 1, q, rs, kp, L, Dh, j0, s);
    }
}

/* out[r] = (p[r] v) / sums[r] for R <= PV_ROWS rows; vp[jp][d] holds (v[2jp][d], v[2jp+1][d]) */
static void pv_tile(int R, const bf16 *p, const bf16 *vp, int L, int Dh, const float *inv, bf16 *out, long os) {
    for (int d0 = 0; d0 < Dh; d0 += 64) {
        int width = Dh - d0 < 64 ? Dh - d0 : 64;
        __m512 acc[PV_ROWS][4];
        for (int r = 0; r < PV_ROWS; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
        if (width == 64 && R == PV_ROWS) {
            for (int jp = 0; jp < L / 2; jp++) {
                const bf16 *vr = vp + ((long)jp * Dh + d0) * 2;
                __m512bh b0 = (__m512bh)_mm512_loadu_si512(vr), b1 = (__m512bh)_mm512_loadu_si512(vr + 32);
                __m512bh b2 = (__m512bh)_mm512_loadu_si512(vr + 64), b3 = (__m512bh)_mm512_loadu_si512(vr + 96);
                for (int r = 0; r < PV_ROWS; r++) {
                    __m512bh a = pair(p + (long)r * L + 2 * jp);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
                    acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
                    acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
                }
            }
        } else {  /* a narrower last column block (Dh = 72: 64 + 8) or the last rows: masked loads */
            for (int jp = 0; jp < L / 2; jp++) {
                const bf16 *vr = vp + ((long)jp * Dh + d0) * 2;
                for (int c = 0; c < 4 && 16 * c < width; c++) {
                    int lanes = width - 16 * c < 16 ? width - 16 * c : 16;
                    __m512bh b = (__m512bh)_mm512_maskz_loadu_epi32((__mmask16)((1u << lanes) - 1), vr + 32 * c);
                    for (int r = 0; r < R; r++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pair(p + (long)r * L + 2 * jp), b);
                }
            }
        }
        for (int r = 0; r < R; r++) {
            __m512 sc = _mm512_set1_ps(inv[r]);
            for (int c = 0; c < 4 && 16 * c < width; c++) {
                int lanes = width - 16 * c < 16 ? width - 16 * c : 16;
                __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], sc));
                _mm256_mask_storeu_epi16(out + r * os + d0 + 16 * c, (__mmask16)((1u << lanes) - 1), (__m256i)o);
            }
        }
    }
}

/* 16 rows of up to 16 bf16 pairs (row stride rs) to up to 16 rows of 16 pairs (stride L pairs): a 16 x 16 transpose
 * of 32-bit words by unpacks and 128-bit shuffles */
static void transpose_pairs(const bf16 *src, long rs, int words, bf16 *dst, int L) {
    __m512i r[16], t[16];
    __mmask16 m = (__mmask16)((1u << words) - 1);
    for (int i = 0; i < 16; i++) r[i] = _mm512_maskz_loadu_epi32(m, src + i * rs);
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
    for (int w = 0; w < words; w++) _mm512_storeu_si512(dst + (long)w * L * 2, r[w]);
}

static void one_matrix(const bf16 *q, const bf16 *k, const bf16 *v, long rs, bf16 *out, long os, int L, int Dh,
                       float scale, bf16 *kp, bf16 *vp, float *s, bf16 *p) {
    /* k as 32-bit pairs, transposed: kp[dp][j] = k[j][2dp:2dp+2] */
    for (int j = 0; j < L; j += 16)
        for (int w = 0; w < Dh / 2; w += 16) transpose_pairs(k + j * rs + 2 * w, rs, Dh / 2 - w < 16 ? Dh / 2 - w : 16,
                                                            kp + ((long)w * L + j) * 2, L);
    /* v two rows interleaved: vp[jp][d] = (v[2jp][d], v[2jp+1][d]) */
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int jp = 0; jp < L / 2; jp++)
        for (int d = 0; d < Dh; d += 32) {
            __mmask32 m = Dh - d >= 32 ? ~0u : (1u << (Dh - d)) - 1;
            __m512i a = _mm512_maskz_loadu_epi16(m, v + 2L * jp * rs + d);
            __m512i b = _mm512_maskz_loadu_epi16(m, v + (2L * jp + 1) * rs + d);
            bf16 *dst = vp + ((long)jp * Dh + d) * 2;
            __mmask32 m2 = Dh - d >= 16 ? ~0u : (1u << (2 * (Dh - d))) - 1;
            _mm512_mask_storeu_epi16(dst, m2, _mm512_permutex2var_epi16(a, lo, b));
            if (Dh - d > 16) {
                __mmask32 m3 = Dh - d >= 32 ? ~0u : (1u << (2 * (Dh - d - 16))) - 1;
                _mm512_mask_storeu_epi16(dst + 32, m3, _mm512_permutex2var_epi16(a, hi, b));
            }
        }
    const float c = scale * 1.4426950408889634f;  /* e^(x scale) = 2^(x c) */
    for (int i0 = 0; i0 < L; i0 += ROWS) {
        int R = L - i0 < ROWS ? L - i0 : ROWS;
        scores(R, q + (long)i0 * rs, rs, kp, L, Dh, s);
        float inv[ROWS];
        for (int r = 0; r < R; r++) {  /* unnormalised probabilities 2^((s - max) c) in bf16, and 1 / their sum */
            const float *sr = s + (long)r * L;
            __m512 m = _mm512_loadu_ps(sr);
            for (int j = 16; j < L; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sr + j));
            __m512 mc = _mm512_set1_ps(_mm512_reduce_max_ps(m) * c), cc = _mm512_set1_ps(c), sum = _mm512_setzero_ps();
            for (int j = 0; j < L; j += 16) {
                __m512 e = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), cc, mc));
                sum = _mm512_add_ps(sum, e);
                _mm256_storeu_si256((__m256i *)(p + (long)r * L + j), (__m256i)_mm512_cvtneps_pbh(e));
            }
            inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        for (int r0 = 0; r0 < R; r0 += PV_ROWS)
            pv_tile(R - r0 < PV_ROWS ? R - r0 : PV_ROWS, p + (long)r0 * L, vp, L, Dh, inv + r0,
                    out + (long)(i0 + r0) * os, os);
    }
}

/* All n_seq x n_heads matrices, split over `threads` OpenMP threads (torch's own, where this library binds to the
 * libgomp torch loaded). Strides in elements: q, k, v share (seq, head, row), the last dimension contiguous; out
 * has its own. Returns 0, 1 for shapes it does not take, 2 when out of memory. */
int attention_bf16(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, long n_seq, long n_heads, int L, int Dh,
                   long s_seq, long s_head, long s_row, long o_seq, long o_head, long o_row, float scale,
                   int threads) {
    if (L < 16 || L % 16 || Dh < 2 || Dh % 2) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        bf16 *kp = malloc(sizeof(bf16) * 2 * (size_t)L * Dh), *p = malloc(sizeof(bf16) * ROWS * (size_t)L);
        float *s = malloc(sizeof(float) * ROWS * (size_t)L);
        failed = !kp || !p || !s;
#pragma omp for schedule(static)
        for (long m = 0; m < n_seq * n_heads; m++) {
            if (failed) continue;
            long seq = m / n_heads, head = m % n_heads, at = seq * s_seq + head * s_head;
            one_matrix(q + at, k + at, v + at, s_row, out + seq * o_seq + head * o_head, o_row, L, Dh, scale,
                       kp, kp + (size_t)L * Dh, s, p);
        }
        free(kp), free(p), free(s);
    }
    return failed ? 2 : 0;
}
