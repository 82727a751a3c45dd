/* The decoder layer's small operations, fused, on CPU: the fast path's (worker/engine/
 * fast_path.py) RMSNorm with the residual add before it, the SiLU-gated product, and rotary
 * embedding applied in place.
 *
 * torch runs each of these as several elementwise ops, each a pass over memory, in bfloat16
 * each converting to float32 and back; F.rms_norm on bfloat16 takes the composite path (an
 * upcast copy, pow, mean, rsqrt, multiply, downcast). On a 512-token prefill step of the demo
 * model they cost more than half as much as the layer's matmuls. Here each is one pass, rows
 * split over torch's OpenMP threads.
 *
 * Rounding is transformers', step by step: in bfloat16 every intermediate that transformers
 * keeps as a bfloat16 tensor is rounded here too (x + delta; the normalised row before the
 * weight multiplies it; silu(gate) before the product; each rotary product before their sum),
 * and float32 math in between. Built without contraction of a * b + c into one FMA
 * (-ffp-contract=off, worker/engine/native/__init__.py), which would round differently from
 * torch's separate ops in float32, nor division by a reciprocal (-fno-reciprocal-math).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* exp(x) in float32 within 2 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-5
 * polynomial for exp(r), scaled by 2^n through the exponent bits). Inlined, so loops over it
 * vectorise without a call per vector. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Per-type element access: load to float, store from float, and round a float to what a
 * tensor of the type would hold (bfloat16: to the nearest bfloat16; float32: itself). */
#define LOAD_bf16(p) bf16_to_float(p)
#define STORE_bf16(f) float_to_bf16(f)
#define ROUND_bf16(f) bf16_to_float(float_to_bf16(f))
#define LOAD_f32(p) (p)
#define STORE_f32(f) (f)
#define ROUND_f32(f) (f)

/* Below this many elements an op runs on the calling thread. The engine calls from a thread of
 * its own, and there a parallel region costs 30-80 us more than on the main thread (measured:
 * a 32 x 576 norm 50-100 us on two threads against 17-27 on one, right after a oneDNN matmul);
 * a decode step's ops (32-64 rows) are done in that time on one thread. Prefill chunks (a few
 * hundred rows) split. */
#define PARALLEL_MIN 262144

/* sum(v[0..n)) added in the order torch's CPU sum kernel adds a contiguous row
 * (aten/src/ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum):
 * `lanes`-wide vectors, four accumulators side by side, cascaded in levels every 2^level_power
 * groups; the leftover vectors into the first; the four summed; then the scalar tail, then
 * each lane in turn. Reproduced so that the mean of squares, and with it every bfloat16 the
 * norm rounds, is torch's to the bit (summed in another order, one element in a few thousand
 * rounded one step apart, and the demo model's greedy outputs parted after a few tokens). */
#define MAX_LANES 32
#define LEVELS 4
#define ILP 4
static inline __attribute__((always_inline)) float row_sum_body(const float *v, int64_t n,
                                                                 const int64_t lanes) {
    int64_t vectors = n / lanes, groups = vectors / ILP;
    int64_t log2 = 0;
    while (((int64_t)1 << log2) < groups) log2++;
    int64_t level_power = log2 / LEVELS > 4 ? log2 / LEVELS : 4;
    int64_t level_step = (int64_t)1 << level_power, level_mask = level_step - 1;
    float acc[LEVELS][ILP][MAX_LANES];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + level_step <= groups) {
        for (int64_t j = 0; j < level_step; j++, i++)
            for (int64_t k = 0; k < ILP; k++)
                for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += v[(i * ILP + k) * lanes + l];
        for (int64_t j = 1; j < LEVELS; j++) {
            for (int64_t k = 0; k < ILP; k++)
                for (int64_t l = 0; l < lanes; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (level_mask << (j * level_power))) != 0) break;
        }
    }
    for (; i < groups; i++)
        for (int64_t k = 0; k < ILP; k++)
            for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += v[(i * ILP + k) * lanes + l];
    for (int64_t j = 1; j < LEVELS; j++)
        for (int64_t k = 0; k < ILP; k++)
            for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t r = groups * ILP; r < vectors; r++)
        for (int64_t l = 0; l < lanes; l++) acc[0][0][l] += v[r * lanes + l];
    for (int64_t k = 1; k < ILP; k++)
        for (int64_t l = 0; l < lanes; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t c = vectors * lanes; c < n; c++) total += v[c];
    for (int64_t l = 0; l < lanes; l++) total += acc[0][0][l];
    return total;
}

/* A copy per common width, whose lane loops then have a constant trip count: whole vectors. */
static float torch_row_sum(const float *v, int64_t n, int64_t lanes) {
    switch (lanes) {
    case 8: return row_sum_body(v, n, 8);
    case 16: return row_sum_body(v, n, 16);
    default: return row_sum_body(v, n, lanes);
    }
}

/* out[r] = weight * round(x[r] * rsqrt(mean(x[r]^2) + eps)), and first, when `delta` is given,
 * x[r] = round(x[r] + delta[r]) in place (the residual add before the norm). Rows strided;
 * `lanes`: the vector width of torch's CPU sum here (LayerOps finds it at load: 8 so far).
 * Each thread squares a row into `squares` (MAX_COLS floats) to sum it in torch's order. */
#define MAX_COLS 65536
#define DEFINE_RMS_NORM(S, T)                                                                   \
int chatqueue_add_rms_norm_##S(T *x, int64_t x_row, const T *delta, int64_t delta_row,          \
                               const T *weight, T *out, int64_t out_row, int64_t rows,          \
                               int64_t cols, float eps, int64_t lanes, int threads) {           \
    if (cols > MAX_COLS || lanes < 1 || lanes > MAX_LANES) return -1;                           \
    int failed = 0;                                                                             \
    _Pragma("omp parallel num_threads(threads) if(rows * cols >= PARALLEL_MIN)")                \
    {                                                                                           \
        float *squares = malloc((size_t)cols * sizeof(float));                                  \
        _Pragma("omp for")                                                                      \
        for (int64_t r = 0; r < rows; r++) {                                                    \
            if (squares == NULL) {                                                              \
                _Pragma("omp atomic write")                                                     \
                failed = 1;                                                                     \
                continue;                                                                       \
            }                                                                                   \
            T *xr = x + r * x_row;                                                              \
            if (delta != NULL) {                                                                \
                const T *dr = delta + r * delta_row;                                            \
                _Pragma("omp simd")                                                             \
                for (int64_t c = 0; c < cols; c++)                                              \
                    xr[c] = STORE_##S(LOAD_##S(xr[c]) + LOAD_##S(dr[c]));                       \
            }                                                                                   \
            _Pragma("omp simd")                                                                 \
            for (int64_t c = 0; c < cols; c++) {                                                \
                float v = LOAD_##S(xr[c]);                                                      \
                squares[c] = v * v;                                                             \
            }                                                                                   \
            float mean = torch_row_sum(squares, cols, lanes) / (float)cols;                     \
            float inv = 1.0f / sqrtf(mean + eps);                                               \
            T *o = out + r * out_row;                                                           \
            _Pragma("omp simd")                                                                 \
            for (int64_t c = 0; c < cols; c++)                                                  \
                o[c] = STORE_##S(LOAD_##S(weight[c]) * ROUND_##S(LOAD_##S(xr[c]) * inv));       \
        }                                                                                       \
        free(squares);                                                                          \
    }                                                                                           \
    return failed ? -1 : 0;                                                                     \
}

DEFINE_RMS_NORM(bf16, uint16_t)
DEFINE_RMS_NORM(f32, float)

/* out[r] = round(round(silu(gu[r, :cols])) * gu[r, cols:]): the gate and up projections side by
 * side in one row, as the fast path's fused gate_up linear writes them.
 *
 * SiLU in float32 is a few ulp off torch's (its exp is Sleef's), and bfloat16 gates (a few hundred
 * distinct values near each magnitude) then rounded to another bfloat16 than torch's in ~3% of
 * elements. So in bfloat16 a value within NEAR float32 ulps of a rounding midpoint is computed
 * again in double, correctly rounded (computing all in double costs 5x). */
#define SILU_CHUNK 1024
#define NEAR 16u
#define DEFINE_SILU_MUL(S, T)                                                                   \
void chatqueue_silu_mul_##S(const T *gate_up, int64_t in_row, T *out, int64_t out_row,          \
                            int64_t rows, int64_t cols, int threads) {                          \
    _Pragma("omp parallel for num_threads(threads) if(rows * cols >= PARALLEL_MIN)")            \
    for (int64_t r = 0; r < rows; r++) {                                                        \
        const T *g = gate_up + r * in_row, *u = g + cols;                                       \
        T *o = out + r * out_row;                                                               \
        float act[SILU_CHUNK];                                                                  \
        uint8_t near[SILU_CHUNK];                                                               \
        for (int64_t c0 = 0; c0 < cols; c0 += SILU_CHUNK) {                                     \
            int64_t n = cols - c0 < SILU_CHUNK ? cols - c0 : SILU_CHUNK;                        \
            _Pragma("omp simd")                                                                 \
            for (int64_t c = 0; c < n; c++) {                                                   \
                float v = LOAD_##S(g[c0 + c]);                                                  \
                float a = v / (1.0f + exp_f32(-v));                                             \
                uint32_t bits;                                                                  \
                memcpy(&bits, &a, sizeof bits);                                                 \
                act[c] = a;                                                                     \
                near[c] = sizeof(T) == 2 && ((bits & 0xffffu) - (0x8000u - NEAR)) < 2 * NEAR;   \
            }                                                                                   \
            /* Flags checked eight at a time: a near value is rare (2 NEAR in 65536). */        \
            for (int64_t c = 0; c < n; c += 8) {                                                \
                uint64_t eight = 0;                                                             \
                memcpy(&eight, near + c, n - c < 8 ? (size_t)(n - c) : 8);                      \
                for (int64_t i = c; eight != 0 && i < c + 8 && i < n; i++, eight >>= 8) {       \
                    if (eight & 0xffu) {                                                        \
                        double v = LOAD_##S(g[c0 + i]);                                         \
                        act[i] = (float)(v / (1.0 + exp(-v)));                                  \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            _Pragma("omp simd")                                                                 \
            for (int64_t c = 0; c < n; c++)                                                     \
                o[c0 + c] = STORE_##S(ROUND_##S(act[c]) * LOAD_##S(u[c0 + c]));                 \
        }                                                                                       \
    }                                                                                           \
}

DEFINE_SILU_MUL(bf16, uint16_t)
DEFINE_SILU_MUL(f32, float)

/* In place, for the first `heads` head vectors of each token (x: [tokens, >= heads, dim],
 * strided tokens, contiguous heads), transformers' rotate_half form:
 *   x = round(round(x * cos) + round(rotate_half(x) * sin)),  rotate_half(x) = (-x2, x1),
 * cos and sin: [tokens, dim] rows (strided), the same for every head of a token. */
#define DEFINE_ROTARY(S, T)                                                                     \
void chatqueue_rotary_##S(T *x, int64_t x_row, const T *cos, const T *sin, int64_t cs_row,      \
                          int64_t tokens, int64_t heads, int64_t dim, int threads) {            \
    int64_t half = dim / 2;                                                                     \
    _Pragma("omp parallel for num_threads(threads) if(tokens * heads * dim >= PARALLEL_MIN)")   \
    for (int64_t t = 0; t < tokens; t++) {                                                      \
        const T *c = cos + t * cs_row, *s = sin + t * cs_row;                                   \
        for (int64_t h = 0; h < heads; h++) {                                                   \
            T *v = x + t * x_row + h * dim;                                                     \
            _Pragma("omp simd")                                                                 \
            for (int64_t i = 0; i < half; i++) {                                                \
                float x1 = LOAD_##S(v[i]), x2 = LOAD_##S(v[i + half]);                          \
                float lo = ROUND_##S(x1 * LOAD_##S(c[i]))                                       \
                           + ROUND_##S(-x2 * LOAD_##S(s[i]));                                   \
                float hi = ROUND_##S(x2 * LOAD_##S(c[i + half]))                                \
                           + ROUND_##S(x1 * LOAD_##S(s[i + half]));                             \
                v[i] = STORE_##S(lo);                                                           \
                v[i + half] = STORE_##S(hi);                                                    \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
}

DEFINE_ROTARY(bf16, uint16_t)
DEFINE_ROTARY(f32, float)
