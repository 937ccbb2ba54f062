// Matrix-vector products for decode on x86 CPUs with AVX2 + FMA: weight-only int8 and int4, bf16
// and fp32 weights.
//
// Decode at small batch is bound by reading the weights; int8 reads a quarter of fp32's bytes and
// int4 an eighth (plus its group scales). Each output row n (int4: each block of 8 rows, kept
// interleaved) streams its weights from memory once and multiplies them into register accumulators for several input rows at a time (a row of
// weights stays in L1 for the next block of x rows), M <= MAX_ROWS. Rows of W are split across
// OpenMP threads, and each thread walks its share as up to 4 runs in lockstep (below).
//
// The int8 and int4 kernels multiply in integers: x is first quantized to int8 in blocks of 32
// (one fp32 scale per block, round to nearest), then each block of 32 products is one
// maddubs + madd (u8 x s8 -> s16 pairs -> s32) and one FMA by the block's scales. Widening every
// weight to fp32 instead made the GEMV compute-bound at about half the bandwidth bound.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 16
// How far ahead of its loads a GEMV asks for weight bytes (_mm_prefetch). One core streaming
// from DRAM on its own keeps too few reads in flight; asking 4 KiB ahead (the next rows of a
// small matrix) took the int8 GEMV from 7-9 to 11 GB/s on a model-sized stream of matrices.
#define PREFETCH_BYTES 4096
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PREFETCH_BYTES, _MM_HINT_T0)

// Weight rows read together: a thread's rows are cut into STREAMS(M) equal runs walked in lockstep
// (rows n, n + Q, n + 2Q, n + 3Q, then n + 1, ...). Reads from 4 places at once keep more DRAM
// pages busy than one sequential stream: one core's bf16 GEMV over a model's matrices went from
// 8.0-9.2 to 10.1-11.2 GB/s (same run, alternating). Each x row costs accumulators for every
// stream, so streams and x rows per block share a budget of accumulator pairs: 4 for the integer
// kernels (S * MB <= 4), 8 for the float ones, which give each pair one accumulator beyond 4.
#define STREAMS(M) ((M) == 1 ? 4 : (M) == 2 ? 2 : 1)
// The float kernels' streams as the integer ones': S * MB <= 4 for every M, so every output is
// summed in one order (two accumulators a pair) whatever the rows: a row's result does not depend
// on the rows beside it (the speculative verify step's rows equal the one-token step's).
#define FLOAT_STREAMS(M) STREAMS(M)

// Runs ROWS(n, stride, S) for S in {4, 2, 1} (a literal, at most MAX_S) over rows [0, N) of W,
// each call owning rows n + i * stride, i < S, and every row exactly once across the threads.
#define FOR_ROW_STREAMS(N, STREAMS_M, MAX_S, threads, ROWS)                              \
    _Pragma("omp parallel num_threads(threads)") {                                       \
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();               \
        const int64_t lo = (N) * t / T, hi = (N) * (t + 1) / T;                          \
        const int64_t streams = (STREAMS_M) < (MAX_S) ? (STREAMS_M) : (MAX_S);           \
        const int64_t Q = (hi - lo) / streams;                                           \
        for (int64_t n = lo; n < lo + Q; n++) {                                          \
            if ((MAX_S) >= 4 && streams == 4) {                                          \
                ROWS(n, Q, 4)                                                            \
            } else if ((MAX_S) >= 2 && streams == 2) {                                   \
                ROWS(n, Q, 2)                                                            \
            } else {                                                                     \
                ROWS(n, Q, 1)                                                            \
            }                                                                            \
        }                                                                                \
        for (int64_t n = lo + streams * Q; n < hi; n++) ROWS(n, 0, 1)                    \
    }

// Runs BLOCK(m0, MB) over rows [0, M) of x in blocks of PAIRS / S rows, at most 4 (MB a literal,
// S * MB <= PAIRS, so each call inlines with its accumulators in registers).
#define FOR_ROW_BLOCKS(M, S, PAIRS, BLOCK)                                               \
    for (int64_t m0 = 0, step = (PAIRS) / (S) < 4 ? (PAIRS) / (S) : 4; m0 < (M); m0 += step) { \
        const int64_t mb = (M) - m0 < step ? (M) - m0 : step;                            \
        if (step == 1 || mb == 1) BLOCK(m0, 1);                                          \
        else if (step == 2 || mb == 2) BLOCK(m0, 2);                                     \
        else if (mb == 3) BLOCK(m0, 3);                                                  \
        else BLOCK(m0, 4);                                                               \
    }

// The S weight rows a ROWS call owns: row n + i * stride of w (rows of `row_len` elements).
#define STREAM_ROWS(type, w, n, stride, S, row_len) \
    const type *wr[S];                              \
    for (int i = 0; i < (S); i++) wr[i] = (w) + ((n) + i * (stride)) * (row_len)

// y[m, n + i * stride] = out[i][m] (+ bias) for the S rows a ROWS call owned.
static inline void store_rows(float *y, float (*out)[MAX_ROWS], const float *bias, int64_t n, int64_t stride, int S,
                              int64_t M, int64_t N) {
    for (int i = 0; i < S; i++) {
        const int64_t r = n + i * stride;
        for (int64_t m = 0; m < M; m++) y[m * N + r] = out[i][m] + (bias ? bias[r] : 0.0f);
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

// x (M, K) fp32 -> xq (M, K) int8 and xs (M, G) fp32, G = ceil(K / 32): x[m, k] ~ xq[m, k] * xs[m, k / 32].
// With xsum non-NULL it also gets the fp32 sum of each block of x (the int4 kernel's minimum term).
static void quantize_rows_q8(const float *x, int8_t *xq, float *xs, float *xsum, int64_t M, int64_t K) {
    const int64_t G = (K + 31) / 32, full = K / 32;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < full; g++) {  // whole blocks, 32 floats in four vectors
            const float *xb = x + m * K + g * 32;
            __m256 v[4], a = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(xb + 8 * j), a = _mm256_max_ps(a, _mm256_and_ps(v[j], magnitude));
            const float amax = hmax(a);
            const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m256i i[4];  // round to nearest even, as lrintf
            for (int j = 0; j < 4; j++) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
            const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            _mm256_storeu_si256((__m256i *)(xq + m * K + g * 32), _mm256_permutevar8x32_epi32(bytes, order));
            xs[m * G + g] = amax / 127.0f;
            if (xsum) xsum[m * G + g] = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
        }
        for (int64_t g = full; g < G; g++) {  // a last partial block
            const float *xb = x + m * K + g * 32;
            const int64_t n = K - g * 32 < 32 ? K - g * 32 : 32;
            float amax = 0.0f, sum = 0.0f;
            for (int64_t j = 0; j < n; j++) {
                amax = fmaxf(amax, fabsf(xb[j]));
                sum += xb[j];
            }
            const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int64_t j = 0; j < n; j++) xq[m * K + g * 32 + j] = (int8_t)lrintf(xb[j] * inv);
            xs[m * G + g] = scale;
            if (xsum) xsum[m * G + g] = sum;
        }
    }
}

// 8 int32 lanes, each the sum of 4 of the 32 products u[j] * s[j] (u unsigned 0..255, s signed).
// With AVX512-VNNI (built with QK_VNNI where the host has it) one vpdpbusd gives the same sums
// (the pair sums never saturate: see rows_i8), where AVX2 needs maddubs and madd.
#ifdef QK_VNNI
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}
#else
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#endif

// S int8 weight rows against MB quantized rows of x (S, MB compile-time constants after
// inlining); out[i][m0 + m] gets row i's dot with x row m. maddubs multiplies unsigned by signed
// bytes, so |w| meets x with w's sign moved onto it; the pair sums stay below 2 * 127 * 127 and
// cannot saturate. Two accumulators per pair (even and odd blocks) keep the FMA chains from
// waiting on each other.
static inline __attribute__((always_inline)) void rows_i8(const int8_t *xq, const float *xs, const int8_t *const *wr,
                                                          float (*out)[MAX_ROWS], int64_t m0, int64_t K, const int S,
                                                          const int MB) {
    const int64_t G = (K + 31) / 32, full = K / 32;
    __m256 a0[4][4], a1[4][4];
    for (int i = 0; i < S; i++)
        for (int m = 0; m < MB; m++) a0[i][m] = a1[i][m] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= full; g += 2) {
        for (int i = 0; i < S; i++) {
            PREFETCH(wr[i] + g * 32);
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(wr[i] + g * 32));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(wr[i] + g * 32 + 32));
            __m256i u0 = _mm256_sign_epi8(w0, w0), u1 = _mm256_sign_epi8(w1, w1);
            for (int m = 0; m < MB; m++) {
                const int8_t *xg = xq + m * K + g * 32;
                __m256i d0 = dot_u8s8(u0, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xg), w0));
                __m256i d1 = dot_u8s8(u1, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xg + 32)), w1));
                a0[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_broadcast_ss(xs + m * G + g), a0[i][m]);
                a1[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_broadcast_ss(xs + m * G + g + 1), a1[i][m]);
            }
        }
    }
    for (int i = 0; i < S; i++)
        for (int m = 0; m < MB; m++) {
            float total = hsum(_mm256_add_ps(a0[i][m], a1[i][m]));
            for (int64_t h = g; h < G; h++) {  // an odd last block, then a partial one
                int32_t d = 0;
                for (int64_t j = h * 32; j < K && j < h * 32 + 32; j++) d += (int32_t)xq[m * K + j] * wr[i][j];
                total += (float)d * xs[m * G + h];
            }
            out[i][m0 + m] = total;
        }
}

// Scratch for x quantized once per call: xq (M, K) int8, then xs and xsum (M, G) fp32 each.
static void *quantized_x(const float *x, int64_t M, int64_t K, int with_sum, int8_t **xq, float **xs, float **xsum) {
    const int64_t G = (K + 31) / 32;
    const int64_t q_bytes = (M * K + 63) / 64 * 64;
    char *buf = malloc(q_bytes + 2 * M * G * sizeof(float));
    if (!buf) return NULL;
    *xq = (int8_t *)buf;
    *xs = (float *)(buf + q_bytes);
    *xsum = with_sum ? *xs + M * G : NULL;
    quantize_rows_q8(x, *xq, *xs, *xsum, M, K);
    return buf;
}

int qk_int8_gemv_f32(const float *x, const int8_t *w, const float *s, const float *bias, float *y,
                     int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 1 || M > MAX_ROWS) return -1;
    int8_t *xq;
    float *xs, *unused;
    void *buf = quantized_x(x, M, K, 0, &xq, &xs, &unused);
    if (!buf) return -2;
    const int64_t G = (K + 31) / 32;
#define BLOCK(m0, MB) rows_i8(xq + (m0) * K, xs + (m0) * G, wr, out, m0, K, S_, MB)
#define ROWS(n, stride, S)                                                               \
    {                                                                                    \
        enum { S_ = S };                                                                 \
        STREAM_ROWS(int8_t, w, n, stride, S, K);                                         \
        float out[4][MAX_ROWS];                                                          \
        FOR_ROW_BLOCKS(M, S, 4, BLOCK)                                                   \
        for (int i = 0; i < S; i++)                                                      \
            for (int64_t m = 0; m < M; m++) out[i][m] *= s[(n) + i * (stride)];          \
        store_rows(y, out, bias, n, stride, S, M, N);                                    \
    }
    FOR_ROW_STREAMS(N, STREAMS(M), 4, threads, ROWS)
#undef ROWS
#undef BLOCK
    free(buf);
    return 0;
}

// Weight-only int4, groups of 32 inputs with a scale and a minimum each (fp16, so a group is 20
// bytes, 5 bits a weight):
//   w[n, k] = q[n, k] * scale[n, g] + min[n, g],  g = k / 32,  q in 0..15
// y[m, n] = sum_g scale[n, g] * xs[m, g] * (q[n, g] . xq[m, g]) + sum_g min[n, g] * xsum[m, g] (+ bias[n]).
//
// Rows are kept in blocks of 8 (N padded with zero rows to a multiple of 8), interleaved so that
// one 32-byte vector holds 4 consecutive weights of each of the block's rows: a product with 4
// bytes of x broadcast to every lane leaves each row's sum in its own lane, and the block's 8
// outputs come out as one vector, each group's 8 scales as one FMA, with no horizontal sums.
// Block b, group g is 128 bytes; byte 32j + 4r + t holds q[8b + r, 32g + 4j + t] in its low
// nibble and q[8b + r, 32g + 16 + 4j + t] in its high nibble (j < 4, r < 8, t < 4). scales and
// mins are (N/8, G, 8): a block's 8 rows' values for group g side by side. Per group and block:
// 4 loads, 8 maddubs (unsigned q by signed x into s16 pairs, summed in s16: at most
// 8 * 2 * 15 * 127 = 30480, no saturation), one madd to s32 and two FMAs. Rows one at a time
// (a broadcast scale and a horizontal sum per row) did over twice the work per byte and read at
// half the bandwidth bound; this layout took the default model's int4 GEMVs 1.35-1.8x faster at
// batch 1 and 2x at batch 8.
#define Q4_BLOCK_BYTES(K) (4 * (K))  // 8 rows of K / 2 bytes

// S blocks of 8 rows (block ids blk[i]) against MB quantized rows of x (S, MB compile-time
// constants after inlining); out[i][m0 + m] gets the 8 rows' dots with x row m.
static inline __attribute__((always_inline)) void blocks_q4(const int8_t *xq, const float *xs, const float *xsum,
                                                            const uint8_t *q, const uint16_t *scales,
                                                            const uint16_t *mins, const int64_t *blk,
                                                            __m256 (*out)[MAX_ROWS], int64_t m0, int64_t K,
                                                            const int S, const int MB) {
    const int64_t G = K / 32;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const uint8_t *qb[4];
    const uint16_t *sb[4], *mb[4];
    for (int i = 0; i < S; i++)
        qb[i] = q + blk[i] * Q4_BLOCK_BYTES(K), sb[i] = scales + blk[i] * G * 8, mb[i] = mins + blk[i] * G * 8;
    __m256 acc[4][4];
    for (int i = 0; i < S; i++)
        for (int m = 0; m < MB; m++) acc[i][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        for (int i = 0; i < S; i++) {
            const uint8_t *p = qb[i] + g * 128;
            PREFETCH(p);
            PREFETCH(p + 64);
            if (!(g & 3)) PREFETCH(sb[i] + g * 8), PREFETCH(mb[i] + g * 8);  // one line per 4 groups
            __m256i s16[4];
            for (int m = 0; m < MB; m++) s16[m] = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * j));
                const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                for (int m = 0; m < MB; m++) {
                    const int8_t *xg = xq + m * K + g * 32 + 4 * j;
                    int32_t a, b;
                    memcpy(&a, xg, 4);
                    memcpy(&b, xg + 16, 4);
                    s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a)));
                    s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(b)));
                }
            }
            const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb[i] + g * 8)));
            const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mb[i] + g * 8)));
            for (int m = 0; m < MB; m++) {
                const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[m], _mm256_set1_epi16(1)));
                acc[i][m] = _mm256_fmadd_ps(d, _mm256_mul_ps(sc, _mm256_broadcast_ss(xs + m * G + g)), acc[i][m]);
                acc[i][m] = _mm256_fmadd_ps(mn, _mm256_broadcast_ss(xsum + m * G + g), acc[i][m]);
            }
        }
    }
    for (int i = 0; i < S; i++)
        for (int m = 0; m < MB; m++) out[i][m0 + m] = acc[i][m];
}

int qk_int4_gemv_f32(const float *x, const uint8_t *q, const uint16_t *scales, const uint16_t *mins, const float *bias,
                     float *y, int64_t M, int64_t N, int64_t K, int threads) {
    if (M < 1 || M > MAX_ROWS || K % 32) return -1;
    int8_t *xq;
    float *xs, *xsum;
    void *buf = quantized_x(x, M, K, 1, &xq, &xs, &xsum);
    if (!buf) return -2;
    const int64_t G = K / 32;
#define BLOCK(m0, MB) blocks_q4(xq + (m0) * K, xs + (m0) * G, xsum + (m0) * G, q, scales, mins, blk, out, m0, K, S_, MB)
#define ROWS(n, stride, S)                                                               \
    {                                                                                    \
        enum { S_ = S };                                                                 \
        int64_t blk[S];                                                                  \
        for (int i = 0; i < S; i++) blk[i] = (n) + i * (stride);                         \
        __m256 out[4][MAX_ROWS];                                                         \
        FOR_ROW_BLOCKS(M, S, 4, BLOCK)                                                   \
        for (int i = 0; i < S; i++)                                                      \
            for (int64_t m = 0; m < M; m++) {                                            \
                float v[8];                                                              \
                _mm256_storeu_ps(v, out[i][m]);                                          \
                for (int64_t r = 0, n0 = blk[i] * 8; r < 8 && n0 + r < N; r++)           \
                    y[m * N + n0 + r] = v[r] + (bias ? bias[n0 + r] : 0.0f);             \
            }                                                                            \
    }
    FOR_ROW_STREAMS((N + 7) / 8, STREAMS(M), 2, threads, ROWS)  // 4 runs of blocks: no faster
#undef ROWS
#undef BLOCK
    free(buf);
    return 0;
}

// bf16 weights are the top 16 bits of an fp32: widened in registers by a shift, so CPUs without
// native bf16 arithmetic read bf16 checkpoints at bf16's bandwidth and compute in fp32.
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

// Weights k..k+7 of a fp32 or bf16 row as fp32, asking for the row's next cache line when k starts one.
static inline __attribute__((always_inline)) __m256 weights8(const void *row, int64_t k, const int W_BF16) {
    if (W_BF16) {
        const uint16_t *r = (const uint16_t *)row + k;
        if (!(k & 31)) PREFETCH(r);  // one line per 32 weights
        return bf16x8(r);
    }
    const float *r = (const float *)row + k;
    if (!(k & 15)) PREFETCH(r);
    return _mm256_loadu_ps(r);
}

// S fp32 or bf16 weight rows (W_BF16 0 or 1) against MB rows of fp32 x, as rows_i8. torch's GEMM
// reads fp32 weights well for one row but is ~3x slower per call for a handful of rows on AVX2;
// here each weight row is read once for all rows.
static inline __attribute__((always_inline)) void rows_float(const float *x, const void *const *wr,
                                                             float (*out)[MAX_ROWS], int64_t m0, int64_t K,
                                                             const int W_BF16, const int S, const int MB) {
    __m256 a0[4][4], a1[4][4];
    for (int i = 0; i < S; i++)
        for (int m = 0; m < MB; m++) a0[i][m] = a1[i][m] = _mm256_setzero_ps();
    int64_t k = 0;
    if (S * MB > 4)  // one accumulator a pair, 8 weights a step: each row's 8 widened once for MB rows of x
        for (; k + 8 <= K; k += 8) {
            __m256 w[4];
            for (int i = 0; i < S; i++) w[i] = weights8(wr[i], k, W_BF16);
            for (int m = 0; m < MB; m++) {
                const __m256 xm = _mm256_loadu_ps(x + m * K + k);
                for (int i = 0; i < S; i++) a0[i][m] = _mm256_fmadd_ps(w[i], xm, a0[i][m]);
            }
        }
    for (; k + 16 <= K; k += 16) {
        for (int i = 0; i < S; i++) {
            const __m256 w0 = weights8(wr[i], k, W_BF16), w1 = weights8(wr[i], k + 8, W_BF16);
            for (int m = 0; m < MB; m++) {
                a0[i][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), a0[i][m]);
                a1[i][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), a1[i][m]);
            }
        }
    }
    for (int i = 0; i < S; i++)
        for (int m = 0; m < MB; m++) {
            float total = hsum(_mm256_add_ps(a0[i][m], a1[i][m]));
            for (int64_t j = k; j < K; j++)
                total += x[m * K + j] * (W_BF16 ? bf16_to_f32(((const uint16_t *)wr[i])[j]) : ((const float *)wr[i])[j]);
            out[i][m0 + m] = total;
        }
}

// y = x W^T (+ bias) for fp32 or bf16 W (N, K): the body of both entry points below, expanded in
// each so that W_BF16 is a constant inside its parallel region.
#define BLOCK(m0, MB) rows_float(x + (m0) * K, wr, out, m0, K, W_BF16, S_, MB)
#define ROWS(n, stride, S)                                                               \
    {                                                                                    \
        enum { S_ = S };                                                                 \
        STREAM_ROWS(void, (const char *)w, n, stride, S, K * (W_BF16 ? 2 : 4));          \
        float out[4][MAX_ROWS];                                                          \
        FOR_ROW_BLOCKS(M, S, 8, BLOCK)                                                   \
        store_rows(y, out, bias, n, stride, S, M, N);                                    \
    }
#define FLOAT_GEMV(bf16)                                                                 \
    enum { W_BF16 = bf16 };                                                              \
    if (M < 1 || M > MAX_ROWS) return -1;                                                \
    FOR_ROW_STREAMS(N, FLOAT_STREAMS(M), 4, threads, ROWS)                               \
    return 0;

int qk_f32_gemv(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                int threads) {
    FLOAT_GEMV(0)
}

int qk_bf16_gemv(const float *x, const uint16_t *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                 int threads) {
    FLOAT_GEMV(1)
}
#undef FLOAT_GEMV
#undef ROWS
#undef BLOCK

// The weights back in fp32, for prefill's GEMM: w (N, K) int8 with per-row scales s, or packed
// Dequantized weights are written as fp32, or as bf16 (out_bf16: rounded to nearest even) for a
// bf16 GEMM on CPUs that multiply bf16 natively: half the bytes written and no second pass.
static inline __m128i bf16_round4(__m128 v) {  // 4 floats -> 4 bf16 in the low 64 bits
    __m128i b = _mm_castps_si128(v);
    const __m128i odd = _mm_and_si128(_mm_srli_epi32(b, 16), _mm_set1_epi32(1));
    b = _mm_srli_epi32(_mm_add_epi32(b, _mm_add_epi32(odd, _mm_set1_epi32(0x7FFF))), 16);
    return _mm_packus_epi32(b, b);
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

static inline void store4(void *out, int64_t at, __m128 v, int out_bf16) {
    if (out_bf16) _mm_storel_epi64((__m128i *)((uint16_t *)out + at), bf16_round4(v));
    else _mm_storeu_ps((float *)out + at, v);
}

// A row of int8 weights times its scale into bf16, 16 at a time, with AVX512-BF16's conversion
// (round to nearest even, as bf16_round4) on CPUs that have it: the dequantization ahead of a
// bf16 prefill GEMM ran 1.3 ms for the default model's gate/up matrix with the AVX2 loop, ~13% of
// the GEMM it feeds. Returns how far it got; the caller does the tail.
__attribute__((target("avx512f,avx512bf16"))) static int64_t int8_row_bf16(const int8_t *wr, float s, uint16_t *o,
                                                                           int64_t K) {
    const __m512 scale = _mm512_set1_ps(s);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wr + k)));
        _mm256_storeu_si256((__m256i *)(o + k), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(v), scale)));
    }
    return k;
}

int qk_int8_dequant(const int8_t *w, const float *s, void *out, int64_t N, int64_t K, int out_bf16, int threads) {
    const int native_bf16 = out_bf16 && __builtin_cpu_supports("avx512bf16");
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const __m256 scale = _mm256_set1_ps(s[n]);
        const int8_t *wr = w + n * K;
        int64_t k = native_bf16 ? int8_row_bf16(wr, s[n], (uint16_t *)out + n * K, K) : 0;
        for (; k + 8 <= K; k += 8) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wr + k)));
            const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale);
            store4(out, n * K + k, _mm256_castps256_ps128(f), out_bf16);
            store4(out, n * K + k + 4, _mm256_extractf128_ps(f, 1), out_bf16);
        }
        for (; k < K; k++) {
            const float f = (float)wr[k] * s[n];
            if (out_bf16) ((uint16_t *)out)[n * K + k] = f32_to_bf16(f);
            else ((float *)out)[n * K + k] = f;
        }
    }
    return 0;
}

int qk_int4_dequant(const uint8_t *q, const uint16_t *scales, const uint16_t *mins, void *out, int64_t N, int64_t K,
                    int out_bf16, int threads) {
    if (K % 32) return -1;
    const int64_t G = K / 32, NB = (N + 7) / 8;
    const __m128i low4 = _mm_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t b = 0; b < NB; b++) {
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *p = q + b * Q4_BLOCK_BYTES(K) + g * 128;
            const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + (b * G + g) * 8)));
            const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + (b * G + g) * 8)));
            for (int64_t pair = 0; pair < 4; pair++) {  // rows 2 pair and 2 pair + 1: 8 bytes of each load
                const int64_t r = 8 * b + 2 * pair;
                const __m256i lanes = _mm256_setr_epi32(2 * pair, 2 * pair, 2 * pair, 2 * pair, 2 * pair + 1,
                                                        2 * pair + 1, 2 * pair + 1, 2 * pair + 1);
                const __m256 s = _mm256_permutevar8x32_ps(sc, lanes), m = _mm256_permutevar8x32_ps(mn, lanes);
                for (int64_t j = 0; j < 4; j++) {
                    const __m128i v = _mm_loadl_epi64((const __m128i *)(p + 32 * j + 8 * pair));
                    const __m128i halves[2] = {_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4)};
                    for (int h = 0; h < 2; h++) {  // inputs 4j + t, then 16 + 4j + t
                        const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h])), s, m);
                        const int64_t k = g * 32 + 16 * h + 4 * j;
                        if (r < N) store4(out, r * K + k, _mm256_castps256_ps128(w), out_bf16);
                        if (r + 1 < N) store4(out, (r + 1) * K + k, _mm256_extractf128_ps(w, 1), out_bf16);
                    }
                }
            }
        }
    }
    return 0;
}

// e^x for x <= 0 in fp32 (softmax after subtracting the maximum): x = n ln2 + r, |r| <= ln2/2,
// e^r by its degree-6 Taylor polynomial (relative error < 2e-7), times 2^n through the exponent.
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below this e^x is 0 in fp32 anyway
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for exactness
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// The 8 sums of a[0..7]'s lanes, as one vector.
static inline __m256 hsum8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// A KV cache holds fp32 or bf16 (KV_BF16, widened in registers): element i of one from `base`.
static inline __attribute__((always_inline)) const void *kv_at(const void *base, int64_t i, const int KV_BF16) {
    return KV_BF16 ? (const void *)((const uint16_t *)base + i) : (const void *)((const float *)base + i);
}

static inline __attribute__((always_inline)) __m256 kv8(const void *base, int64_t i, const int KV_BF16) {
    return KV_BF16 ? bf16x8((const uint16_t *)base + i) : _mm256_loadu_ps((const float *)base + i);
}

// row[s] = q . k_s * scale (or -inf where masked) for s < S; keys 8 at a time into one vector.
static inline __attribute__((always_inline)) void scores_row(const float *qr, const void *kb, int64_t ss,
                                                             const uint8_t *mb, float *row, int64_t S, int64_t D,
                                                             float scale, const int KV_BF16) {
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qd = _mm256_loadu_ps(qr + d);
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qd, kv8(kb, (s + j) * ss + d, KV_BF16), acc[j]);
        }
        _mm256_storeu_ps(row + s, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
    }
    for (; s < S; s++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), kv8(kb, s * ss + d, KV_BF16), acc);
        row[s] = hsum(acc) * scale;
    }
    if (mb)
        for (s = 0; s < S; s++)
            if (!mb[s]) row[s] = -INFINITY;
}

// The largest of m and row[0..S) (NaN entries ignored, as `row[s] > m ? row[s] : m`).
static inline float row_max(const float *row, int64_t S, float m) {
    __m256 v = _mm256_set1_ps(m);
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) v = _mm256_max_ps(_mm256_loadu_ps(row + s), v);
    m = hmax(v);
    for (; s < S; s++) m = row[s] > m ? row[s] : m;
    return m;
}

// o = o * carry + sum_s p[s] v_s over S rows of v, ND = D / 8 (a literal where it is inlined).
static inline __attribute__((always_inline)) void weighted_values(const float *p, const void *vb, int64_t ss,
                                                                  int64_t S, const int64_t ND, float carry, float *o,
                                                                  const int KV_BF16) {
    __m256 acc[32];
    const __m256 c = _mm256_set1_ps(carry);
    for (int64_t d = 0; d < ND; d++) acc[d] = _mm256_mul_ps(_mm256_loadu_ps(o + 8 * d), c);
    for (int64_t s = 0; s < S; s++) {
        const __m256 w = _mm256_set1_ps(p[s]);
        for (int64_t d = 0; d < ND; d++) acc[d] = _mm256_fmadd_ps(w, kv8(vb, s * ss + 8 * d, KV_BF16), acc[d]);
    }
    for (int64_t d = 0; d < ND; d++) _mm256_storeu_ps(o + 8 * d, acc[d]);
}

#define ATTEND_CHUNK 32  // keys per pass: their K and V (8 KiB each at D = 64) stay in L1 for all heads
                          // (64, a full 32 KiB L1, ran 1.4x slower)

// Where a cache keeps row b's key (or value) for position j, in floats from a layer's base (plus
// h * sh for K/V head h): a static cache (tables NULL) at b * sb + j * ss; a paged pool at slot
// tables[b, j / block_size] * block_size + j % block_size, times ss.
typedef struct {
    int64_t sb, sh, ss;
    const int64_t *tables;  // (B, n_blocks) block ids, or NULL
    int64_t n_blocks, block_size;
} qk_layout;

static inline int64_t slot_offset(const qk_layout *L, int64_t b, int64_t j) {
    if (!L->tables) return b * L->sb + j * L->ss;
    return (L->tables[b * L->n_blocks + j / L->block_size] * L->block_size + j % L->block_size) * L->ss;
}

// How many of positions j, j + 1, ... (at most `most`) sit ss apart from j's slot: all of them in
// a static cache, the rest of j's block in a paged one.
static inline int64_t run_length(const qk_layout *L, int64_t j, int64_t most) {
    const int64_t left = L->tables ? L->block_size - j % L->block_size : most;
    return left < most ? left : most;
}

// Attention of one new token per row over its cached keys and values (decode), grouped-query:
// q (B, H, D) contiguous; k, v a layer's cache, read in place where `layout` says (the same for k
// and v; D contiguous), positions [0, S) of each row; mask NULL (every position visible) or bytes
// (B, S) with row stride mask_sb; out (B, H, D). The keys go by in chunks (at most ATTEND_CHUNK,
// never across a paged block), each scored and summed into the output for all H / Hkv query heads
// that share them while it is in cache (softmax kept online: a running maximum and sum per head).
// A head that sees no position gets zeros. Returns -1 on an unsupported shape.
static inline __attribute__((always_inline)) int attend_one(
        const float *q, const void *k, const void *v, const uint8_t *mask, float *out, int64_t B, int64_t H,
        int64_t Hkv, int64_t S, int64_t D, const qk_layout *layout, int64_t mask_sb, float scale, int threads,
        const int KV_BF16) {
    if (Hkv < 1 || H % Hkv || D % 8 || D > 256 || S < 1) return -1;
    const int64_t G = H / Hkv, ss = layout->ss;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kv = 0; kv < Hkv; kv++) {
            const void *kh = kv_at(k, kv * layout->sh, KV_BF16), *vh = kv_at(v, kv * layout->sh, KV_BF16);
            const uint8_t *mb = mask ? mask + b * mask_sb : NULL;
            const int64_t h0 = b * H + kv * G;
            float row[ATTEND_CHUNK], top[G], total[G];
            float *o = out + h0 * D;  // accumulates unnormalised until the last chunk
            for (int64_t i = 0; i < G * D; i++) o[i] = 0.0f;
            for (int64_t g = 0; g < G; g++) top[g] = -INFINITY, total[g] = 0.0f;
            // The row's own length (past its last visible position), not the batch's longest:
            // the chunks, and so every sum, are then the same whatever the row is batched with.
            int64_t Sb = S;
            while (mb && Sb > 0 && !mb[Sb - 1]) Sb--;
            int64_t n = Sb ? run_length(layout, 0, Sb < ATTEND_CHUNK ? Sb : ATTEND_CHUNK) : 0;
            int64_t at = slot_offset(layout, b, 0);
            for (int64_t c0 = 0; c0 < Sb;) {
                const void *kc = kv_at(kh, at, KV_BF16), *vc = kv_at(vh, at, KV_BF16);
                // Ask for the next chunk now: reading the cache cold, one line at a time, ran at
                // a quarter of the bandwidth.
                const int64_t c1 = c0 + n, left = Sb - c1;
                const int64_t n1 = left > 0 ? run_length(layout, c1, left < ATTEND_CHUNK ? left : ATTEND_CHUNK) : 0;
                const int64_t at1 = n1 ? slot_offset(layout, b, c1) : 0;
                for (int64_t g = 0; g < G; g++) {
                    // Each head asks for its share of the next chunk: all of it at once stalled
                    // the loads waiting for free miss buffers.
                    for (int64_t s = g * n1 / G; s < (g + 1) * n1 / G; s++)
                        for (int64_t d = 0; d < D; d += 16) {
                            _mm_prefetch((const char *)kv_at(kh, at1 + s * ss + d, KV_BF16), _MM_HINT_T0);
                            _mm_prefetch((const char *)kv_at(vh, at1 + s * ss + d, KV_BF16), _MM_HINT_T0);
                        }
                    scores_row(q + (h0 + g) * D, kc, ss, mb ? mb + c0 : NULL, row, n, D, scale, KV_BF16);
                    const float m = row_max(row, n, top[g]);
                    if (m == -INFINITY) continue;  // nothing visible yet
                    const float carry = expf(top[g] - m);  // rescales what earlier chunks summed
                    const __m256 t = _mm256_set1_ps(m);
                    __m256 sum = _mm256_setzero_ps();
                    int64_t s = 0;
                    for (; s + 8 <= n; s += 8) {
                        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(row + s), t));
                        _mm256_storeu_ps(row + s, e);
                        sum = _mm256_add_ps(sum, e);
                    }
                    float part = hsum(sum);
                    for (; s < n; s++) part += (row[s] = expf(row[s] - m));
                    total[g] = total[g] * carry + part;
                    top[g] = m;
                    float *og = o + g * D;
                    if (D == 64) weighted_values(row, vc, ss, n, 8, carry, og, KV_BF16);
                    else if (D == 128) weighted_values(row, vc, ss, n, 16, carry, og, KV_BF16);
                    else weighted_values(row, vc, ss, n, D / 8, carry, og, KV_BF16);
                }
                c0 = c1, n = n1, at = at1;
            }
            for (int64_t g = 0; g < G; g++) {
                const float inv = total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
                for (int64_t d = 0; d < D; d++) o[g * D + d] *= inv;
            }
        }
    }
    return 0;
}

int qk_attend_one(const float *q, const float *k, const float *v, const uint8_t *mask, float *out, int64_t B,
                  int64_t H, int64_t Hkv, int64_t S, int64_t D, const qk_layout *layout, int64_t mask_sb, float scale,
                  int threads) {
    return attend_one(q, k, v, mask, out, B, H, Hkv, S, D, layout, mask_sb, scale, threads, 0);
}

// The same over a bf16 cache (a bf16 model's): q and out stay fp32.
int qk_attend_one_bf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, float *out,
                       int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D, const qk_layout *layout,
                       int64_t mask_sb, float scale, int threads) {
    return attend_one(q, k, v, mask, out, B, H, Hkv, S, D, layout, mask_sb, scale, threads, 1);
}

// The small per-token operations of a decode step, each one pass over its rows. torch spends
// 10-25 us a call on these at one token (dispatch, temporaries), more than the arithmetic.

// out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), rows of n floats (RMSNorm in fp32).
int qk_rms_norm(const float *x, const float *w, float *out, int64_t rows, int64_t n, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(xr + i), acc);
        float total = hsum(acc);
        for (; i < n; i++) total += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(total / (float)n + eps);
        const __m256 v = _mm256_set1_ps(inv);
        for (i = 0; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), v)));
        for (; i < n; i++) o[i] = w[i] * (xr[i] * inv);
    }
    return 0;
}

// e^x in fp32 for any x (clamped to the finite range).
static inline __m256 exp_any(__m256 x) {
    return exp_neg(_mm256_min_ps(x, _mm256_set1_ps(88.0f)));
}

// out[r, i] = silu(gu[r, i]) * gu[r, I + i]: SwiGLU on the fused gate/up projection's rows of 2I.
int qk_silu_mul(const float *gu, float *out, int64_t rows, int64_t I, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * I, *u = g + I;
        float *o = out + r * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = exp_any(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    return 0;
}

// RoPE, the half-split convention: for each of `rows` rows of x (stride row_stride floats) and
// each of its `heads` heads of D floats, x1 = x[:D/2], x2 = x[D/2:] become x1 cos1 - x2 sin1 and
// x2 cos2 + x1 sin2 in out (rows of heads * D, contiguous), with cos, sin rows of D (row r's at
// r % cs_rows).
int qk_rope(const float *x, float *out, const float *cos, const float *sin, int64_t rows, int64_t heads, int64_t D,
            int64_t row_stride, int64_t cs_rows, int threads) {
    if (D % 2) return -1;
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + (r % cs_rows) * D, *s = sin + (r % cs_rows) * D;
        for (int64_t h = 0; h < heads; h++) {
            const float *x1 = x + r * row_stride + h * D, *x2 = x1 + half;
            float *o1 = out + (r * heads + h) * D, *o2 = o1 + half;
            int64_t i = 0;
            for (; i + 8 <= half; i += 8) {
                const __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
                _mm256_storeu_ps(o1 + i, _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + i)),
                                                       _mm256_mul_ps(b, _mm256_loadu_ps(s + i))));
                _mm256_storeu_ps(o2 + i, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half + i)),
                                                       _mm256_mul_ps(a, _mm256_loadu_ps(s + half + i))));
            }
            for (; i < half; i++) {
                o1[i] = x1[i] * c[i] - x2[i] * s[i];
                o2[i] = x2[i] * c[half + i] + x1[i] * s[half + i];
            }
        }
    }
    return 0;
}

// ---- A whole decode step's layers in one call ---------------------------------------------------
// Per token, a 0.5B model's decode step runs ~100 GEMVs and ~250 small operations; called one by
// one from Python each costs 5-30 us of interpreter and dispatch time, 10-15 ms a step in all,
// more than a fifth of an int8 step. Here the layers run back to back in C, through the same
// GEMVs and kernels as above, on a static KV cache.

enum { QK_F32 = 0, QK_BF16 = 1, QK_INT8 = 2, QK_INT4 = 3 };

typedef struct {
    int64_t kind, N, K;
    const void *w;       // (N, K) fp32 / bf16 / int8, or int4 in 8-row blocks (N/8, 4K)
    const void *scales;  // int8: fp32 (N,); int4: fp16 (N/8, K/32, 8)
    const void *mins;    // int4: fp16 (N/8, K/32, 8)
    const float *bias;   // (N,) or NULL
} qk_linear;

typedef struct {
    const float *ln1, *ln2, *q_norm, *k_norm;  // q_norm, k_norm NULL without QK-norm
    qk_linear qkv, o, gate_up, down;
} qk_layer;

static int linear(const qk_linear *l, const float *x, float *y, int64_t M, int threads) {
    switch (l->kind) {
        case QK_F32: return qk_f32_gemv(x, l->w, l->bias, y, M, l->N, l->K, threads);
        case QK_BF16: return qk_bf16_gemv(x, l->w, l->bias, y, M, l->N, l->K, threads);
        case QK_INT8: return qk_int8_gemv_f32(x, l->w, l->scales, l->bias, y, M, l->N, l->K, threads);
        case QK_INT4: return qk_int4_gemv_f32(x, l->w, l->scales, l->mins, l->bias, y, M, l->N, l->K, threads);
    }
    return -1;
}

static inline void add_rows(float *x, const float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(d + i)));
    for (; i < n; i++) x[i] += d[i];
}

// x (B, hidden) is the residual stream of one new token per row, updated in place through the
// layers. cos, sin: (cs_rows, D) with row b's at b % cs_rows. k_cache, v_cache: layer 0 of the
// cache, a layer every layer_stride floats, positions where `layout` says (a static cache or a
// paged pool). Row b's new K/V go to its position pos[b]; attention reads positions [0, S),
// S = max(pos) + 1, under mask (bytes (mask_rows, S), row b's at b % mask_rows) or all of them
// when mask is NULL (every row then at the same position). The caller checks that every pos[b]
// has a slot.
//
// own_length (the verify step's form, qk_verify_layers): row b attends positions [0, pos[b]] alone,
// unmasked, each row in its own attention call. The rows are then successive tokens of one
// sequence (layout sb = 0: every row reads and writes the same cache row) and each row's
// arithmetic is the one-token step's at its position (the attention stops each row at its own
// last visible position, so this equals one masked call; it needs no (B, S) mask built).
static int decode_layers(const qk_layer *layers, int64_t n_layers, float *x, int64_t B, int64_t hidden, int64_t H,
                         int64_t Hkv, int64_t D, int64_t I, float eps, const float *cos, const float *sin,
                         int64_t cs_rows, float *k_cache, float *v_cache, int64_t layer_stride,
                         const qk_layout *layout, const int64_t *pos, const uint8_t *mask, int64_t mask_rows,
                         int own_length, int threads) {
    if (B < 1 || B > MAX_ROWS) return -1;
    int64_t S = 0;
    for (int64_t b = 0; b < B; b++) S = pos[b] + 1 > S ? pos[b] + 1 : S;
    const int64_t QKV = (H + 2 * Hkv) * D;
    const int64_t sizes[] = {B * hidden, B * QKV, B * H * D, B * H * D, B * 2 * I, B * I};
    int64_t total = 0;
    for (int i = 0; i < 6; i++) total += sizes[i];
    float *buf = malloc(sizeof(float) * total);
    if (!buf) return -2;
    float *h = buf, *qkv = h + sizes[0], *q = qkv + sizes[1], *att = q + sizes[2], *gu = att + sizes[3], *act = gu + sizes[4];
    int rc = 0;
    for (int64_t l = 0; l < n_layers && rc == 0; l++) {
        const qk_layer *L = layers + l;
        float *kl = k_cache + l * layer_stride, *vl = v_cache + l * layer_stride;
        qk_rms_norm(x, L->ln1, h, B, hidden, eps, 1);
        if ((rc = linear(&L->qkv, h, qkv, B, threads))) break;
        if (L->q_norm)
            for (int64_t b = 0; b < B; b++) {
                qk_rms_norm(qkv + b * QKV, L->q_norm, qkv + b * QKV, H, D, eps, 1);
                qk_rms_norm(qkv + b * QKV + H * D, L->k_norm, qkv + b * QKV + H * D, Hkv, D, eps, 1);
            }
        qk_rope(qkv, q, cos, sin, B, H, D, QKV, cs_rows, 1);
        for (int64_t b = 0; b < B; b++) {
            float k_new[Hkv * D];
            qk_rope(qkv + b * QKV + H * D, k_new, cos + (b % cs_rows) * D, sin + (b % cs_rows) * D, 1, Hkv, D, 0, 1, 1);
            const int64_t at = slot_offset(layout, b, pos[b]);
            for (int64_t g = 0; g < Hkv; g++) {
                float *kc = kl + at + g * layout->sh, *vc = vl + at + g * layout->sh;
                for (int64_t d = 0; d < D; d++) {
                    kc[d] = k_new[g * D + d];
                    vc[d] = qkv[b * QKV + (H + Hkv + g) * D + d];
                }
            }
        }
        const float scale = (float)(1.0 / sqrt((double)D));
        if (own_length) {
            for (int64_t b = 0; b < B && rc == 0; b++)
                rc = qk_attend_one(q + b * H * D, kl, vl, NULL, att + b * H * D, 1, H, Hkv, pos[b] + 1, D, layout, 0,
                                   scale, threads);
            if (rc) break;
        } else if ((rc = qk_attend_one(q, kl, vl, mask, att, B, H, Hkv, S, D, layout, mask_rows == 1 ? 0 : S, scale,
                                       threads)))
            break;
        if ((rc = linear(&L->o, att, h, B, threads))) break;
        add_rows(x, h, B * hidden);
        qk_rms_norm(x, L->ln2, h, B, hidden, eps, 1);
        if ((rc = linear(&L->gate_up, h, gu, B, threads))) break;
        qk_silu_mul(gu, act, B, I, 1);
        if ((rc = linear(&L->down, act, h, B, threads))) break;
        add_rows(x, h, B * hidden);
    }
    free(buf);
    return rc;
}

int qk_decode_layers(const qk_layer *layers, int64_t n_layers, float *x, int64_t B, int64_t hidden, int64_t H,
                     int64_t Hkv, int64_t D, int64_t I, float eps, const float *cos, const float *sin, int64_t cs_rows,
                     float *k_cache, float *v_cache, int64_t layer_stride, const qk_layout *layout, const int64_t *pos,
                     const uint8_t *mask, int64_t mask_rows, int threads) {
    return decode_layers(layers, n_layers, x, B, hidden, H, Hkv, D, I, eps, cos, sin, cs_rows, k_cache, v_cache,
                         layer_stride, layout, pos, mask, mask_rows, 0, threads);
}

// The speculative verify step: B successive tokens of one sequence at positions pos[0..B) (see
// own_length above), each row computed exactly as the one-token step computes it, the weights
// read once for all rows.
int qk_verify_layers(const qk_layer *layers, int64_t n_layers, float *x, int64_t B, int64_t hidden, int64_t H,
                     int64_t Hkv, int64_t D, int64_t I, float eps, const float *cos, const float *sin, int64_t cs_rows,
                     float *k_cache, float *v_cache, int64_t layer_stride, const qk_layout *layout, const int64_t *pos,
                     int threads) {
    return decode_layers(layers, n_layers, x, B, hidden, H, Hkv, D, I, eps, cos, sin, cs_rows, k_cache, v_cache,
                         layer_stride, layout, pos, NULL, 1, 1, threads);
}
