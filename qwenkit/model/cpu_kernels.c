// Weight-only int8 matrix-vector products for decode on x86 CPUs with AVX2 + FMA.
//
// y[m, n] = s[n] * sum_k x[m, k] * w[n, k] (+ bias[n])   x: fp32 (M, K), w: int8 (N, K), s: fp32 (N)
//
// Decode at small batch is bound by reading the weights; int8 reads a quarter of fp32's bytes.
// Each output row n streams its K weights from memory once, widens 16 of them at a time to fp32
// and multiplies them into register accumulators for up to 4 input rows at a time (a row of
// weights stays in L1 for the next 4), M <= MAX_ROWS. Rows are split across OpenMP threads.
#include <immintrin.h>
#include <stdint.h>

#define MAX_ROWS 16

// Runs BLOCK(m0, MB) over rows [0, M) of x in blocks of 4 (MB a literal 1..4, so each call inlines
// with its accumulators in registers).
#define FOR_ROW_BLOCKS(M, BLOCK)                                      \
    for (int64_t m0 = 0; m0 < (M); m0 += 4) {                         \
        switch ((M) - m0 >= 4 ? 4 : (M) - m0) {                       \
            case 4: BLOCK(m0, 4); break;                              \
            case 3: BLOCK(m0, 3); break;                              \
            case 2: BLOCK(m0, 2); break;                              \
            default: BLOCK(m0, 1); break;                             \
        }                                                             \
    }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// One weight row against MB (1..4, a compile-time constant after inlining) rows of x: two
// independent accumulators per x row, all in registers, so the FMA chains never wait on memory.
static inline __attribute__((always_inline)) void row_block(const float *x, const int8_t *wr, float *out,
                                                            int64_t K, const int MB) {
    __m256 a0[4], a1[4];
    for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m128i b = _mm_loadu_si128((const __m128i *)(wr + k));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
        for (int m = 0; m < MB; m++) {
            a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
            a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);
        }
    }
    for (int m = 0; m < MB; m++) {
        float total = hsum(_mm256_add_ps(a0[m], a1[m]));
        for (int64_t j = k; j < K; j++) total += x[m * K + j] * (float)wr[j];
        out[m] = total;
    }
}

int qk_int8_gemv_f32(const float *x, const int8_t *w, const float *s, const float *bias, float *y,
                     int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 1 || M > MAX_ROWS) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;  // re-read from L1 by every block of 4 x rows
        float out[MAX_ROWS];
#define BLOCK(m0, MB) row_block(x + (m0) * K, wr, out + (m0), K, MB)
        FOR_ROW_BLOCKS(M, BLOCK)
#undef BLOCK
        for (int64_t m = 0; m < M; m++) y[m * N + n] = out[m] * s[n] + (bias ? bias[n] : 0.0f);
    }
    return 0;
}

// Weight-only int4, groups of 32 inputs with a scale and a minimum each:
//   w[n, k] = q[n, k] * scale[n, g] + min[n, g],  g = k / 32,  q in 0..15
// q is packed 16 bytes per group: byte j holds q[32g + j] (low nibble) and q[32g + 16 + j] (high).
// y[m, n] = sum_g scale[n, g] * (q[n, g] . x[m, g]) + sum_g min[n, g] * xsum[m, g] (+ bias[n]),
// where xsum[m, g] is the sum of x[m] over group g (the caller passes it, computed once per call).
static inline __attribute__((always_inline)) void row_block_q4(const float *x, const float *xsum,
                                                               const uint8_t *qr, const float *sr,
                                                               const float *mr, float *out, int64_t K,
                                                               const int MB) {
    const int64_t G = K / 32;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256 acc[4];
    for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m128i b = _mm_loadu_si128((const __m128i *)(qr + g * 16));
        __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        __m256 scale = _mm256_set1_ps(sr[g]);
        for (int m = 0; m < MB; m++) {
            const float *xg = x + m * K + g * 32;
            __m256 p = _mm256_mul_ps(q0, _mm256_loadu_ps(xg));
            p = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xg + 8), p);
            p = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xg + 16), p);
            p = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xg + 24), p);
            acc[m] = _mm256_fmadd_ps(scale, p, acc[m]);
        }
    }
    for (int m = 0; m < MB; m++) {
        float total = hsum(acc[m]);
        for (int64_t g = 0; g < G; g++) total += mr[g] * xsum[m * G + g];
        out[m] = total;
    }
}

int qk_int4_gemv_f32(const float *x, const float *xsum, const uint8_t *q, const float *scales, const float *mins,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 1 || M > MAX_ROWS || K % 32) return -1;
    const int64_t G = K / 32;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qr = q + n * (K / 2);
        const float *sr = scales + n * G, *mr = mins + n * G;
        float out[MAX_ROWS];
#define BLOCK(m0, MB) row_block_q4(x + (m0) * K, xsum + (m0) * G, qr, sr, mr, out + (m0), K, MB)
        FOR_ROW_BLOCKS(M, BLOCK)
#undef BLOCK
        for (int64_t m = 0; m < M; m++) y[m * N + n] = out[m] + (bias ? bias[n] : 0.0f);
    }
    return 0;
}

// fp32 weights, 2..16 rows of x: torch's GEMM reads the weights well for one row but is ~3x
// slower per call for a handful of rows on AVX2; here each weight row is read once for all rows.
static inline __attribute__((always_inline)) void row_block_f32(const float *x, const float *wr, float *out,
                                                                int64_t K, const int MB) {
    __m256 a0[4], a1[4];
    for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0 = _mm256_loadu_ps(wr + k), w1 = _mm256_loadu_ps(wr + k + 8);
        for (int m = 0; m < MB; m++) {
            a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[m]);
            a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[m]);
        }
    }
    for (int m = 0; m < MB; m++) {
        float total = hsum(_mm256_add_ps(a0[m], a1[m]));
        for (int64_t j = k; j < K; j++) total += x[m * K + j] * wr[j];
        out[m] = total;
    }
}

int qk_f32_gemv(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                int threads) {
    if (M < 1 || M > MAX_ROWS) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *wr = w + n * K;
        float out[MAX_ROWS];
#define BLOCK(m0, MB) row_block_f32(x + (m0) * K, wr, out + (m0), K, MB)
        FOR_ROW_BLOCKS(M, BLOCK)
#undef BLOCK
        for (int64_t m = 0; m < M; m++) y[m * N + n] = out[m] + (bias ? bias[n] : 0.0f);
    }
    return 0;
}
