/* Fused dequantize-GEMV and row dequantization for quantkit's packed integer weights on CPU.
 *
 * Weights: W[n,k] = s[n,g] * (q[n,k] - z[n,g]) with g = k / group_size (in the layout's own column order).
 * Codes are stored row by row, 32 columns per block:
 *   bits == 4: 16 bytes per block; byte j holds column 2j in its low nibble and column 2j+1 in its high nibble
 *              (quantkit's native little-endian packing).
 *   bits == 8: 32 bytes per block, one code per byte.
 * The activations passed in are "block-ordered": for 4-bit, within each block of 32 the even columns come
 * first (0,2,..,30) then the odd ones (1,3,..,31), so that low nibbles pair with x[0..15] and high nibbles
 * with x[16..31]. For 8-bit the order is the natural one. Scales are IEEE half floats, zero points bytes.
 *
 * y[m,n] = sum_g s[n,g] * (sum_{k in g} x[m,k] q[n,k]) - sum_g s[n,g] z[n,g] xsum[m,g].
 *
 * FP4 (E2M1) weights use the same 4-bit packing and block order: W[n,k] = e2m1(q[n,k]) * s[n, k / scale_block]
 * where a code's bit 3 is the sign and bits 0-2 index 0, 0.5, 1, 1.5, 2, 3, 4, 6. Scales are IEEE halves or
 * bytes decoded through a 256-entry table (E8M0, E4M3), divided by a global scale when one is given.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define BLOCK 32

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal half: normalise */
            int e = -1;
            do { e++; mantissa <<= 1; } while ((mantissa & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mantissa & 0x3FFu) << 13);
        }
    } else if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* Scale number i: scales are IEEE halves when half_scales is set, else float32. */
static inline float scale_at(const void *scales, int half_scales, int64_t i) {
    return half_scales ? half_to_float(((const uint16_t *)scales)[i]) : ((const float *)scales)[i];
}

/* Sum of the activations of every group: xsum[m*groups + g]. */
static void group_sums(const float *x, int64_t m_rows, int64_t k, int64_t group_size, float *xsum) {
    int64_t groups = (k + group_size - 1) / group_size;
    for (int64_t m = 0; m < m_rows; m++)
        for (int64_t g = 0; g < groups; g++) {
            int64_t end = (g + 1) * group_size < k ? (g + 1) * group_size : k;
            float s = 0.f;
            for (int64_t c = g * group_size; c < end; c++) s += x[m * k + c];
            xsum[m * groups + g] = s;
        }
}

#ifdef __AVX2__
/* Byte j of a 16-byte block (broadcast to both 128-bit lanes) into 32-bit lane j, for j in [0,8) or [8,16). */
#define SPREAD_BYTES(base)                                                                                   \
    _mm256_setr_epi8(base, -1, -1, -1, base + 1, -1, -1, -1, base + 2, -1, -1, -1, base + 3, -1, -1, -1,    \
                     base + 4, -1, -1, -1, base + 5, -1, -1, -1, base + 6, -1, -1, -1, base + 7, -1, -1, -1)

/* The 32 codes of one block as four float vectors, in the block order described above. BITS is a
 * compile-time constant after inlining, so each width gets its own loop. */
static inline __attribute__((always_inline)) void load_block(const uint8_t *p, const int BITS, __m256 w[4]) {
    if (BITS == 4) {
        const __m256i low_nibble = _mm256_set1_epi32(0x0F);
        __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
        __m256i first = _mm256_shuffle_epi8(v, SPREAD_BYTES(0)), second = _mm256_shuffle_epi8(v, SPREAD_BYTES(8));
        w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(first, low_nibble));
        w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(second, low_nibble));
        w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(first, 4));
        w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(second, 4));
    } else {
        for (int i = 0; i < 4; i++)
            w[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * i))));
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One weight row against MT activation rows; MT and BITS are compile-time constants after inlining. */
static inline __attribute__((always_inline)) void row_tile(
    const uint8_t *codes, const void *scales, const uint8_t *zeros, const float *x, const float *xsum,
    int half_scales, int64_t k, int64_t groups, int64_t group_size, int64_t n_out, float *y, const int BITS,
    const int MT) {
    const int64_t block_bytes = BITS * BLOCK / 8;
    const int64_t blocks_per_group = group_size / BLOCK;
    /* Independent accumulator chains: four for a single activation row, two per row otherwise. */
    const int NA = MT == 1 ? 4 : 2;
    __m256 total[4];
    float zero_term[4];
    for (int t = 0; t < MT; t++) { total[t] = _mm256_setzero_ps(); zero_term[t] = 0.f; }
    for (int64_t g = 0; g < groups; g++) {
        __m256 acc[4][4];
        for (int t = 0; t < MT; t++)
            for (int a = 0; a < NA; a++) acc[t][a] = _mm256_setzero_ps();
        int64_t first = g * blocks_per_group, last = first + blocks_per_group;
        if (last * BLOCK > k) last = k / BLOCK;
        for (int64_t b = first; b < last; b++) {
            __m256 w[4];
            load_block(codes + b * block_bytes, BITS, w);
            for (int t = 0; t < MT; t++) {
                const float *xp = x + t * k + b * BLOCK;
                for (int i = 0; i < 4; i++)
                    acc[t][i % NA] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xp + 8 * i), acc[t][i % NA]);
            }
        }
        float s = scale_at(scales, half_scales, g);
        float sz = s * (float)zeros[g];
        __m256 sv = _mm256_set1_ps(s);
        for (int t = 0; t < MT; t++) {
            __m256 sum = acc[t][0];
            for (int a = 1; a < NA; a++) sum = _mm256_add_ps(sum, acc[t][a]);
            total[t] = _mm256_fmadd_ps(sv, sum, total[t]);
            zero_term[t] += sz * xsum[t * groups + g];
        }
    }
    for (int t = 0; t < MT; t++) y[t * n_out] = hsum(total[t]) - zero_term[t];
}

/* All rows of activations against one weight row, in tiles of up to four rows. */
static inline __attribute__((always_inline)) void row_all(
    const uint8_t *c, const void *s, const uint8_t *z, const float *x, const float *xsum, int half_scales,
    int64_t m_rows, int64_t k, int64_t groups, int64_t group_size, int64_t n, float *y, const int BITS) {
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4)
        row_tile(c, s, z, x + m * k, xsum + m * groups, half_scales, k, groups, group_size, n, y + m * n, BITS, 4);
    const float *xr = x + m * k, *xs = xsum + m * groups;
    switch (m_rows - m) {
        case 3: row_tile(c, s, z, xr, xs, half_scales, k, groups, group_size, n, y + m * n, BITS, 3); break;
        case 2: row_tile(c, s, z, xr, xs, half_scales, k, groups, group_size, n, y + m * n, BITS, 2); break;
        case 1: row_tile(c, s, z, xr, xs, half_scales, k, groups, group_size, n, y + m * n, BITS, 1); break;
        default: break;
    }
}
#else
static void row_tile_scalar(
    const uint8_t *codes, const void *scales, const uint8_t *zeros, const float *x, const float *xsum,
    int half_scales, int64_t k, int64_t groups, int64_t group_size, int bits, int64_t n_out, float *y,
    int MT) {
    const int64_t block_bytes = bits * BLOCK / 8;
    for (int t = 0; t < MT; t++) {
        float total = 0.f, zero_term = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            int64_t end = (g + 1) * group_size < k ? (g + 1) * group_size : k;
            float acc = 0.f;
            for (int64_t c = g * group_size; c < end; c++) {
                const uint8_t *p = codes + (c / BLOCK) * block_bytes;
                int64_t j = c % BLOCK;
                int q = bits == 8 ? p[j] : (j < 16 ? p[j] & 0x0F : p[j - 16] >> 4);
                acc += x[t * k + c] * (float)q;
            }
            float s = scale_at(scales, half_scales, g);
            total += s * acc;
            zero_term += s * (float)zeros[g] * xsum[t * groups + g];
        }
        y[t * n_out] = total - zero_term;
    }
}
#endif

/* Block scale i of an FP4 row: a half, or a byte through lut; divided by global when global > 0. */
static inline float fp4_scale(const void *scales, const float *lut, float global, int64_t i) {
    float s = lut ? lut[((const uint8_t *)scales)[i]] : half_to_float(((const uint16_t *)scales)[i]);
    return global > 0.f ? s / global : s;
}

static inline float e2m1_value(int code) {
    static const float magnitudes[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    return (code & 8) ? -magnitudes[code & 7] : magnitudes[code & 7];
}

#ifdef __AVX2__
/* The 32 FP4 values of one block, in block order, each multiplied by its block scale. */
static inline __attribute__((always_inline)) void load_fp4_block(
    const uint8_t *p, const void *scales, const float *lut, float global, int64_t b, int64_t scale_block,
    __m256 w[4]) {
    const __m256 table = _mm256_setr_ps(0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f);
    const __m256i seven = _mm256_set1_epi32(7), eight = _mm256_set1_epi32(8);
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    __m256i first = _mm256_shuffle_epi8(v, SPREAD_BYTES(0)), second = _mm256_shuffle_epi8(v, SPREAD_BYTES(8));
    __m256i codes[4] = {_mm256_and_si256(first, _mm256_set1_epi32(15)), _mm256_and_si256(second, _mm256_set1_epi32(15)),
                        _mm256_srli_epi32(first, 4), _mm256_srli_epi32(second, 4)};
    /* Positions 0-7 and 16-23 hold columns 0-15 of the block, 8-15 and 24-31 columns 16-31. */
    float s_low, s_high;
    if (scale_block == 16) {
        s_low = fp4_scale(scales, lut, global, 2 * b);
        s_high = fp4_scale(scales, lut, global, 2 * b + 1);
    } else {
        s_low = s_high = fp4_scale(scales, lut, global, b * BLOCK / scale_block);
    }
    for (int i = 0; i < 4; i++) {
        __m256 magnitude = _mm256_permutevar8x32_ps(table, _mm256_and_si256(codes[i], seven));
        __m256i sign = _mm256_slli_epi32(_mm256_and_si256(codes[i], eight), 28);
        __m256 value = _mm256_xor_ps(magnitude, _mm256_castsi256_ps(sign));
        w[i] = _mm256_mul_ps(value, _mm256_set1_ps(i % 2 ? s_high : s_low));
    }
}

/* One FP4 weight row against MT activation rows. */
static inline __attribute__((always_inline)) void fp4_row_tile(
    const uint8_t *codes, const void *scales, const float *lut, float global, const float *x, int64_t k,
    int64_t scale_block, int64_t n_out, float *y, const int MT) {
    const int NA = MT == 1 ? 4 : 2;
    __m256 acc[4][4];
    for (int t = 0; t < MT; t++)
        for (int a = 0; a < NA; a++) acc[t][a] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / BLOCK; b++) {
        __m256 w[4];
        load_fp4_block(codes + b * 16, scales, lut, global, b, scale_block, w);
        for (int t = 0; t < MT; t++) {
            const float *xp = x + t * k + b * BLOCK;
            for (int i = 0; i < 4; i++)
                acc[t][i % NA] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xp + 8 * i), acc[t][i % NA]);
        }
    }
    for (int t = 0; t < MT; t++) {
        __m256 sum = acc[t][0];
        for (int a = 1; a < NA; a++) sum = _mm256_add_ps(sum, acc[t][a]);
        y[t * n_out] = hsum(sum);
    }
}
#endif

/* Column c (in block order) of an FP4 row, scaled. */
static inline float fp4_weight(const uint8_t *codes, const void *scales, const float *lut, float global, int64_t c,
                               int64_t scale_block) {
    int64_t b = c / BLOCK, j = c % BLOCK;
    int64_t column = b * BLOCK + (j < 16 ? 2 * j : 2 * (j - 16) + 1);
    int q = j < 16 ? codes[b * 16 + j] & 0x0F : codes[b * 16 + j - 16] >> 4;
    return e2m1_value(q) * fp4_scale(scales, lut, global, column / scale_block);
}

/* y[m_rows, n] = x[m_rows, k] @ W.T for FP4 rows and block-ordered x; k a multiple of 32, scale_block 16 or a
 * multiple of 32. lut: 256 floats for byte scales, NULL for half scales; global <= 0: no global scale. */
int qk_fp4_gemv(const float *x, int64_t m_rows, int64_t k, const uint8_t *codes, const void *scales,
                const float *lut, float global, int64_t n, int64_t scale_block, float *y, int threads) {
    if (k % BLOCK || (scale_block != 16 && scale_block % BLOCK)) return 1;
    int64_t groups = (k + scale_block - 1) / scale_block; /* the last block may be partial */
    size_t scale_bytes = lut ? 1 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *c = codes + r * (k / 2);
        const void *s = (const uint8_t *)scales + (size_t)(r * groups) * scale_bytes;
#ifdef __AVX2__
        int64_t m = 0;
        for (; m + 4 <= m_rows; m += 4) fp4_row_tile(c, s, lut, global, x + m * k, k, scale_block, n, y + m * n + r, 4);
        switch (m_rows - m) {
            case 3: fp4_row_tile(c, s, lut, global, x + m * k, k, scale_block, n, y + m * n + r, 3); break;
            case 2: fp4_row_tile(c, s, lut, global, x + m * k, k, scale_block, n, y + m * n + r, 2); break;
            case 1: fp4_row_tile(c, s, lut, global, x + m * k, k, scale_block, n, y + m * n + r, 1); break;
            default: break;
        }
#else
        for (int64_t m = 0; m < m_rows; m++) {
            float acc = 0.f;
            for (int64_t col = 0; col < k; col++) acc += x[m * k + col] * fp4_weight(c, s, lut, global, col, scale_block);
            y[m * n + r] = acc;
        }
#endif
    }
    return 0;
}

/* Rows [row_begin, row_end) of FP4 weights as float32, columns in block order. */
int qk_fp4_dequant_rows(const uint8_t *codes, const void *scales, const float *lut, float global, int64_t k,
                        int64_t scale_block, int64_t row_begin, int64_t row_end, float *out, int threads) {
    if (k % BLOCK || (scale_block != 16 && scale_block % BLOCK)) return 1;
    int64_t groups = (k + scale_block - 1) / scale_block; /* the last block may be partial */
    size_t scale_bytes = lut ? 1 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = row_begin; r < row_end; r++) {
        const uint8_t *c = codes + r * (k / 2);
        const void *s = (const uint8_t *)scales + (size_t)(r * groups) * scale_bytes;
        float *o = out + (r - row_begin) * k;
#ifdef __AVX2__
        for (int64_t b = 0; b < k / BLOCK; b++) {
            __m256 w[4];
            load_fp4_block(c + b * 16, s, lut, global, b, scale_block, w);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + b * BLOCK + 8 * i, w[i]);
        }
#else
        for (int64_t col = 0; col < k; col++) o[col] = fp4_weight(c, s, lut, global, col, scale_block);
#endif
    }
    return 0;
}

/* y[m_rows, n] = x[m_rows, k] @ W.T for block-ordered x; k and group_size multiples of 32. */
int qk_gemv(const float *x, int64_t m_rows, int64_t k, const uint8_t *codes, const void *scales,
            int half_scales, const uint8_t *zeros, int64_t n, int64_t group_size, int bits, float *y,
            int threads) {
    if ((bits != 4 && bits != 8) || k % BLOCK || group_size % BLOCK) return 1;
    int64_t groups = (k + group_size - 1) / group_size;
    int64_t row_bytes = k * bits / 8;
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(m_rows * groups));
    if (!xsum) return 2;
    group_sums(x, m_rows, k, group_size, xsum);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *c = codes + r * row_bytes;
        const void *s = half_scales ? (const void *)((const uint16_t *)scales + r * groups)
                                    : (const void *)((const float *)scales + r * groups);
        const uint8_t *z = zeros + r * groups;
#ifdef __AVX2__
/* Common group sizes as literals, so that each gets a fully unrolled group loop. */
#define ROW_ALL(BITS, GROUP_SIZE) row_all(c, s, z, x, xsum, half_scales, m_rows, k, groups, GROUP_SIZE, n, y + r, BITS)
#define ROW_ALL_GROUPS(BITS)                                     \
    switch (group_size) {                                        \
        case 32: ROW_ALL(BITS, 32); break;                       \
        case 64: ROW_ALL(BITS, 64); break;                       \
        case 128: ROW_ALL(BITS, 128); break;                     \
        default: ROW_ALL(BITS, group_size); break;               \
    }
        if (bits == 4) {
            ROW_ALL_GROUPS(4)
        } else {
            ROW_ALL_GROUPS(8)
        }
#else
        row_tile_scalar(c, s, z, x, xsum, half_scales, k, groups, group_size, bits, n, y + r, (int)m_rows);
#endif
    }
    free(xsum);
    return 0;
}

/* Rows [row_begin, row_end) of W as float32, columns in block order (the order qk_gemv expects of x). */
int qk_dequant_rows(const uint8_t *codes, const void *scales, int half_scales, const uint8_t *zeros, int64_t k,
                    int64_t group_size, int bits, int64_t row_begin, int64_t row_end, float *out, int threads) {
    if ((bits != 4 && bits != 8) || k % BLOCK || group_size % BLOCK) return 1;
    int64_t groups = (k + group_size - 1) / group_size;
    int64_t row_bytes = k * bits / 8, block_bytes = bits * BLOCK / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = row_begin; r < row_end; r++) {
        float *o = out + (r - row_begin) * k;
        for (int64_t b = 0; b < k / BLOCK; b++) {
            int64_t g = b * BLOCK / group_size;
            float s = scale_at(scales, half_scales, r * groups + g);
            float z = (float)zeros[r * groups + g];
            const uint8_t *p = codes + r * row_bytes + b * block_bytes;
#ifdef __AVX2__
            __m256 w[4], sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
            if (bits == 4)
                load_block(p, 4, w);
            else
                load_block(p, 8, w);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + b * BLOCK + 8 * i, _mm256_mul_ps(sv, _mm256_sub_ps(w[i], zv)));
#else
            for (int j = 0; j < BLOCK; j++) {
                int q = bits == 8 ? p[j] : (j < 16 ? p[j] & 0x0F : p[j - 16] >> 4);
                o[b * BLOCK + j] = s * ((float)q - z);
            }
#endif
        }
    }
    return 0;
}
