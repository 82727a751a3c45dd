/* Decode attention read in place from the paged KV pool, on CPU.
 *
 * One query token per row; row r's context is its first lengths[r] positions, position p at
 * slot tables[r][p / block_size] * block_size + p % block_size of a pool laid out head-major,
 * [kv_heads, num_slots, dim]. For each (row, KV head): the group of query heads that share the
 * KV head scores every position (each key loaded once for the whole group), a float32 softmax,
 * then the weighted sum of the values. Nothing is gathered or padded: each row reads only its
 * own blocks, once for keys and once for values.
 *
 * Built at run time (worker/engine/native/__init__.py) with -fopenmp against the libgomp that
 * torch already loaded, so the (row, KV head) units run on torch's own OpenMP thread team.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIM 512

static inline float bf16_to_float(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void load_bf16(const uint16_t *src, float *dst, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(src[i]);
}

static inline void load_f32(const float *src, float *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static inline void store_bf16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = float_to_bf16(src[i]);
}

static inline void store_f32(const float *src, float *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

/* One (row, KV head) unit. scores: [group * length] scratch.
 * Always inlined into a copy per common head size (below), so that the loops over `dim` have a
 * constant trip count and unroll into whole vector registers. */
#define DEFINE_UNIT(NAME, T, LOAD, STORE)                                                       \
static inline __attribute__((always_inline)) void NAME##_body(                                  \
        const T *q, int64_t q_row, int64_t q_head, const T *k_pool, const T *v_pool,            \
        int64_t num_slots, const int32_t *table, int64_t length, T *out, int64_t out_row,       \
        int64_t out_head, int64_t row, int64_t kv_head, int64_t group, const int64_t dim,       \
        int64_t block_size, float scale, float *scores) {                                       \
    float qf[group][dim];                                                                       \
    float kf[dim];                                                                              \
    for (int64_t g = 0; g < group; g++) {                                                       \
        LOAD(q + row * q_row + (kv_head * group + g) * q_head, qf[g], dim);                     \
        for (int64_t d = 0; d < dim; d++) qf[g][d] *= scale;                                    \
    }                                                                                           \
    const T *keys = k_pool + kv_head * num_slots * dim;                                         \
    const T *values = v_pool + kv_head * num_slots * dim;                                       \
    int64_t blocks = (length + block_size - 1) / block_size;                                    \
    for (int64_t b = 0, p = 0; b < blocks; b++) {                                               \
        const T *k = keys + (int64_t)table[b] * block_size * dim;                               \
        int64_t n = length - p < block_size ? length - p : block_size;                          \
        for (int64_t o = 0; o < n; o++, p++, k += dim) {                                        \
            LOAD(k, kf, dim);                                                                   \
            for (int64_t g = 0; g < group; g++) {                                               \
                float s = 0.0f;                                                                 \
                _Pragma("omp simd reduction(+:s)")                                              \
                for (int64_t d = 0; d < dim; d++) s += qf[g][d] * kf[d];                        \
                scores[g * length + p] = s;                                                     \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    float total[group];                                                                         \
    for (int64_t g = 0; g < group; g++) {                                                       \
        float *s = scores + g * length;                                                         \
        float top = -INFINITY;                                                                  \
        for (int64_t p = 0; p < length; p++) top = s[p] > top ? s[p] : top;                     \
        float sum = 0.0f;                                                                       \
        _Pragma("omp simd reduction(+:sum)")                                                    \
        for (int64_t p = 0; p < length; p++) {                                                  \
            s[p] = expf(s[p] - top);                                                            \
            sum += s[p];                                                                        \
        }                                                                                       \
        total[g] = sum;                                                                         \
    }                                                                                           \
    /* One query head at a time: its dim accumulators stay in registers, and the row's values   \
     * (a few KiB per KV head) are read again from cache for the next head of the group. */     \
    for (int64_t g = 0; g < group; g++) {                                                       \
        const float *w = scores + g * length;                                                   \
        float a[dim];                                                                           \
        for (int64_t d = 0; d < dim; d++) a[d] = 0.0f;                                          \
        for (int64_t b = 0, p = 0; b < blocks; b++) {                                           \
            const T *v = values + (int64_t)table[b] * block_size * dim;                         \
            int64_t n = length - p < block_size ? length - p : block_size;                      \
            for (int64_t o = 0; o < n; o++, p++, v += dim) {                                    \
                LOAD(v, kf, dim);                                                               \
                float wp = w[p];                                                                \
                _Pragma("omp simd")                                                             \
                for (int64_t d = 0; d < dim; d++) a[d] += wp * kf[d];                           \
            }                                                                                   \
        }                                                                                       \
        float inv = 1.0f / total[g];                                                            \
        for (int64_t d = 0; d < dim; d++) a[d] *= inv;                                          \
        STORE(a, out + row * out_row + (kv_head * group + g) * out_head, dim);                  \
    }                                                                                           \
}                                                                                               \
static void NAME(const T *q, int64_t q_row, int64_t q_head, const T *k_pool, const T *v_pool,   \
                 int64_t num_slots, const int32_t *table, int64_t length, T *out,               \
                 int64_t out_row, int64_t out_head, int64_t row, int64_t kv_head,               \
                 int64_t group, int64_t dim, int64_t block_size, float scale,                   \
                 float *scores) {                                                               \
    switch (dim) {                                                                              \
    case 64:                                                                                    \
        NAME##_body(q, q_row, q_head, k_pool, v_pool, num_slots, table, length, out, out_row,   \
                    out_head, row, kv_head, group, 64, block_size, scale, scores);              \
        break;                                                                                  \
    case 128:                                                                                   \
        NAME##_body(q, q_row, q_head, k_pool, v_pool, num_slots, table, length, out, out_row,   \
                    out_head, row, kv_head, group, 128, block_size, scale, scores);             \
        break;                                                                                  \
    default:                                                                                    \
        NAME##_body(q, q_row, q_head, k_pool, v_pool, num_slots, table, length, out, out_row,   \
                    out_head, row, kv_head, group, dim, block_size, scale, scores);             \
    }                                                                                           \
}

DEFINE_UNIT(unit_bf16, uint16_t, load_bf16, store_bf16)
DEFINE_UNIT(unit_f32, float, load_f32, store_f32)

/* Returns 0, or -1 when a shape is out of what this kernel handles (the caller falls back). */
#define DEFINE_ENTRY(NAME, T, UNIT)                                                             \
int NAME(const T *q, int64_t q_row, int64_t q_head, const T *k_pool, const T *v_pool,           \
         int64_t num_slots, const int32_t *tables, int64_t table_row, const int32_t *lengths,   \
         T *out, int64_t out_row, int64_t out_head, int64_t rows, int64_t heads,                \
         int64_t kv_heads, int64_t dim, int64_t block_size, float scale, int threads) {         \
    if (dim > MAX_DIM || kv_heads < 1 || heads % kv_heads != 0 || block_size < 1) return -1;    \
    int64_t group = heads / kv_heads;                                                           \
    int64_t longest = 1;                                                                        \
    for (int64_t r = 0; r < rows; r++) {                                                        \
        if (lengths[r] < 1) return -1;                                                          \
        if (lengths[r] > longest) longest = lengths[r];                                         \
    }                                                                                           \
    int failed = 0;                                                                             \
    _Pragma("omp parallel num_threads(threads)")                                                \
    {                                                                                           \
        float *scores = malloc((size_t)(group * longest) * sizeof(float));                      \
        _Pragma("omp for schedule(dynamic, 1)")                                                 \
        for (int64_t unit = 0; unit < rows * kv_heads; unit++) {                                \
            if (scores == NULL) {                                                               \
                _Pragma("omp atomic write")                                                     \
                failed = 1;                                                                     \
                continue;                                                                       \
            }                                                                                   \
            int64_t row = unit / kv_heads, kv_head = unit % kv_heads;                           \
            UNIT(q, q_row, q_head, k_pool, v_pool, num_slots, tables + row * table_row,         \
                 lengths[row], out, out_row, out_head, row, kv_head, group, dim, block_size,    \
                 scale, scores);                                                                \
        }                                                                                       \
        free(scores);                                                                           \
    }                                                                                           \
    return failed ? -1 : 0;                                                                     \
}

DEFINE_ENTRY(chatqueue_decode_attention_bf16, uint16_t, unit_bf16)
DEFINE_ENTRY(chatqueue_decode_attention_f32, float, unit_f32)
