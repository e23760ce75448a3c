/* The float32 steps of one decode token outside the linears, for quantkit's lean decoder
 * (quantkit/runtime/decode.py): RMSNorm, and a layer's attention for one new token (per-head q/k norm, rotary
 * embedding, the KV cache write and softmax attention over the cached positions). Each replaces several torch
 * calls whose dispatch costs more than their arithmetic at decode sizes.
 *
 * Compiled into the same library as cpu_qgemm.c, once per instruction set; plain C loops with fixed-width
 * partial sums, which the compiler vectorises for the build's registers. Same arithmetic as transformers'
 * float32 forward, up to the order of the sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Sixteen floats in GCC's generic vectors: one zmm on AVX-512 builds, two ymm on AVX2, four xmm elsewhere. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
#define LANES 16

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* The sum of the lanes, halving the vector at each step. */
static inline float sum16(v16 v) {
    v8 eight = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 four = __builtin_shufflevector(eight, eight, 0, 1, 2, 3) + __builtin_shufflevector(eight, eight, 4, 5, 6, 7);
    return (four[0] + four[2]) + (four[1] + four[3]);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    v16 partial = {0.f};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) partial += load16(a + j) * load16(b + j);
    float total = sum16(partial);
    for (; j < n; j++) total += a[j] * b[j];
    return total;
}

/* e^x for x <= 0, sixteen at a time (x below -87 gives e^-87): x = n ln2 + r with |r| <= ln2 / 2, e^r by a
 * degree-7 polynomial (Cephes' expf coefficients, about 1 ulp), 2^n assembled in the exponent bits. */
static inline v16 exp16(v16 x) {
    const v16 zero = {0.f}, lowest = zero - 87.f, magic = zero + 12582912.f; /* 1.5 * 2^23: adding it rounds */
    i16 low = x < lowest, x_bits, lowest_bits;
    memcpy(&x_bits, &x, sizeof x);
    memcpy(&lowest_bits, &lowest, sizeof lowest);
    x_bits = (low & lowest_bits) | (~low & x_bits);
    memcpy(&x, &x_bits, sizeof x);
    v16 n = (x * 1.44269504088896341f + magic) - magic;
    v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    i16 bits = (__builtin_convertvector(n, i16) + 127) << 23;
    v16 scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* out = w * (x / sqrt(mean(x^2) + eps)) over n values (out may be x). */
static inline void rms_norm_row(const float *x, const float *w, int64_t n, float eps, float *out) {
    float inverse = 1.f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t j = 0; j < n; j++) out[j] = w[j] * (x[j] * inverse);
}

/* out[r] = RMSNorm(x[r]) with weight w, for rows r < rows of n values. */
int qk_rms_norm(const float *x, const float *w, int64_t rows, int64_t n, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * n, w, n, eps, out + r * n);
    return 0;
}

/* Rotary embedding of one head in place, transformers' half-split layout: x * cos + rotate_half(x) * sin,
 * rotate_half(x) = (-x[d/2:], x[:d/2]). */
static inline void rope(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float first = x[i], second = x[i + half];
        x[i] = first * cos[i] - second * sin[i];
        x[i + half] = second * cos[i + half] + first * sin[i + half];
    }
}

/* s[t] = scale * (q . k[t]) for rows k[t] of d values, q held in registers when d is CHUNKS * 16. */
static inline __attribute__((always_inline)) void dots_rows(const float *q, const float *k, int64_t rows, int64_t d,
                                                            float scale, float *s, const int CHUNKS) {
    if (CHUNKS) {
        v16 qv[8];
        for (int c = 0; c < CHUNKS; c++) qv[c] = load16(q + LANES * c);
        for (int64_t t = 0; t < rows; t++) {
            v16 acc = qv[0] * load16(k + t * d);
            for (int c = 1; c < CHUNKS; c++) acc += qv[c] * load16(k + t * d + LANES * c);
            s[t] = scale * sum16(acc);
        }
        return;
    }
    for (int64_t t = 0; t < rows; t++) s[t] = scale * dot(q, k + t * d, d);
}

static void row_dots(const float *q, const float *k, int64_t rows, int64_t d, float scale, float *s) {
    switch (d) {
        case 64: dots_rows(q, k, rows, d, scale, s, 4); break;
        case 128: dots_rows(q, k, rows, d, scale, s, 8); break;
        default: dots_rows(q, k, rows, d, scale, s, 0); break;
    }
}

/* out[j] = norm * sum_t p[t] v[t, j] for rows v[t] of d values: the accumulators of CHUNKS * 16 values stay
 * in registers (CHUNKS 0: any d, through memory). */
static inline __attribute__((always_inline)) void weighted_rows(const float *p, const float *v, int64_t rows, int64_t d,
                                                                float norm, float *out, const int CHUNKS) {
    if (CHUNKS) {
        v16 acc[8];
        for (int c = 0; c < CHUNKS; c++) acc[c] = (v16){0.f};
        for (int64_t t = 0; t < rows; t++)
            for (int c = 0; c < CHUNKS; c++) acc[c] += p[t] * load16(v + t * d + LANES * c);
        for (int c = 0; c < CHUNKS; c++) store16(out + LANES * c, acc[c] * norm);
        return;
    }
    for (int64_t j = 0; j < d; j++) out[j] = 0.f;
    for (int64_t t = 0; t < rows; t++)
        for (int64_t j = 0; j < d; j++) out[j] += p[t] * v[t * d + j];
    for (int64_t j = 0; j < d; j++) out[j] *= norm;
}

static void weighted_sum(const float *p, const float *v, int64_t rows, int64_t d, float norm, float *out) {
    switch (d) {
        case 64: weighted_rows(p, v, rows, d, norm, out, 4); break;
        case 128: weighted_rows(p, v, rows, d, norm, out, 8); break;
        default: weighted_rows(p, v, rows, d, norm, out, 0); break;
    }
}

/* One new token's attention in one layer. qkv: the token's projections [(heads + 2 kv_heads) * d] (queries,
 * keys, values), modified in place by the norms and the rotation. q_norm/k_norm: per-head RMSNorm weights [d]
 * or NULL. cos/sin: the rotary tables' row for position pos [d]. keys/values: the layer's caches
 * [kv_heads, max_len, d], which receive this token's key and value at pos. out [heads * d]: per query head,
 * softmax(scale * q K[:pos+1]^T) V[:pos+1], head h reading key/value head h / (heads / kv_heads). */
int qk_attend_decode(float *qkv, int64_t heads, int64_t kv_heads, int64_t d, const float *q_norm,
                     const float *k_norm, float eps, const float *cos, const float *sin, float *keys, float *values,
                     int64_t max_len, int64_t pos, float scale, float *out) {
    if (pos >= max_len || heads % kv_heads) return 1;
    float *q = qkv, *k = qkv + heads * d;
    const float *v = k + kv_heads * d;
    for (int64_t h = 0; h < heads + kv_heads; h++) { /* query heads, then key heads */
        float *x = q + h * d;
        const float *norm = h < heads ? q_norm : k_norm;
        if (norm) rms_norm_row(x, norm, d, eps, x);
        rope(x, cos, sin, d);
    }
    for (int64_t g = 0; g < kv_heads; g++)
        for (int64_t j = 0; j < d; j++) {
            keys[(g * max_len + pos) * d + j] = k[g * d + j];
            values[(g * max_len + pos) * d + j] = v[g * d + j];
        }
    const int64_t positions = pos + 1, group = heads / kv_heads;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(positions * heads));
    if (!scores) return 2;
#pragma omp parallel for schedule(static) if (positions * heads * d > (1 << 20))
    for (int64_t h = 0; h < heads; h++) {
        const float *qh = q + h * d, *kh = keys + (h / group) * max_len * d, *vh = values + (h / group) * max_len * d;
        float *s = scores + h * positions, *o = out + h * d, peak = -INFINITY;
        row_dots(qh, kh, positions, d, scale, s);
        for (int64_t t = 0; t < positions; t++) peak = s[t] > peak ? s[t] : peak;
        v16 partial = {0.f};
        int64_t t = 0;
        for (; t + LANES <= positions; t += LANES) {
            v16 e = exp16(load16(s + t) - peak);
            store16(s + t, e);
            partial += e;
        }
        float total = sum16(partial);
        for (; t < positions; t++) total += s[t] = expf(s[t] - peak);
        weighted_sum(s, vh, positions, d, 1.f / total, o);
    }
    free(scores);
    return 0;
}

