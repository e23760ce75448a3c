/* Fused dequantize-GEMV and row dequantization for quantkit's packed weights on CPU.
 *
 * One source, compiled once per instruction set (see cpu_isa.py): the AVX-512 and AVX2 sections are chosen by
 * the compiler's own macros, and a build without them runs the portable scalar code.
 *
 * Integer weights: W[n, p] = s[n, g] * (q[n, p] - z[n, g]), g = p / group_size, where p is a weight's
 * position in the kernel's order (the caller permutes the activations to match). Codes are stored row by
 * row, 32 positions per block:
 *   bits == 4: 16 bytes per block; byte j holds position j in its low nibble and position j + 16 in its high
 *              nibble.
 *   bits == 8: 32 bytes per block, one code per byte.
 * group_size is 16 (two groups a block: positions 0-15 and 16-31) or a multiple of 32. Scales are IEEE halves,
 * float32 or bytes (E8M0: 2^(b - 127); E4M3: decoded exactly as the half with bits ((b & 0x80) << 8) |
 * ((b & 0x7F) << 7), times 256), zero points bytes, float32 or one constant. The int8-activation kernels also
 * take 4-bit codes through a 16-entry table (the integer each nibble stands for) and a divisor of every scale:
 * so FP4 runs as integers, E2M1 value v as the code 2v + 12 with zero point 12 and scale block_scale / 2
 * (/ global scale).
 *
 * SpQR's outliers are a sparse correction added after the dense product (qk_csr_add).
 *
 * Two products: exact float activations, y[m, n] = sum_g s * (sum_{p in g} x q - z * xsum[m, g]); and int8
 * activations (qk_gemv_q8), where every block of 32 activations is first rounded to d * xq with xq in
 * [-127, 127], d = max|x| / 127, so that the block's dot product is one integer sum (VNNI dpbusd, or AVX2
 * maddubs/madd, as llama.cpp's Q4_0 x Q8_0).
 *
 * FP4 (E2M1) weights use the same 4-bit packing: W[n, p] = e2m1(q[n, p]) * s[n, p / scale_block], a code's
 * bit 3 the sign and bits 0-2 indexing 0, 0.5, 1, 1.5, 2, 3, 4, 6; scales IEEE halves or bytes decoded through
 * a 256-entry table (E8M0, E4M3), divided by a global scale when one is given. scale_block is 16 or a
 * multiple of 32.
 *
 * Row dequantization writes float32 or bfloat16 (round to nearest even), for prefill GEMMs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 32

/* The instruction set this build was compiled for, so the loader can check it got the library it asked for. */
const char *qk_isa(void) {
#if defined(__AVX512BF16__)
    return "avx512bf16";
#elif defined(__AVX512VNNI__)
    return "avx512vnni";
#elif defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "portable";
#endif
}

enum { QK_E8M0 = 1, QK_E4M3 = 2, QK_SPQR = 3 }; /* scale formats other than halves and float32 */

/* SpQR's statistics of one tile of 16 rows and one group (scale_format QK_SPQR, the tiled kernel only): the
 * rows' 3-bit (up to 4-bit) first-level codes and the second-level scale and zero they share (float16 values,
 * held as float32 so that they load as broadcast operands), decoded as the reference does in float32:
 * s = max(scale_scale * (code - scale_zero), min_scale) and z = zero_scale * (code - zero_zero). */
typedef struct {
    uint8_t codes[16]; /* row i: scale code | zero code << 4 */
    float scale_scale, scale_zero, zero_scale, zero_zero;
} qk_spqr_stats;

/* An integer weight matrix as the kernels read it (the layout above). */
typedef struct {
    const uint8_t *codes; /* [n, k * bits / 8] */
    const void *scales;   /* [n, groups]: bytes of format scale_format when set, else IEEE halves when half_scales,
                             else float32; QK_SPQR: [tiles, groups] qk_spqr_stats */
    const void *zeros;    /* [n, groups]: float32 when float_zeros, else bytes; QK_SPQR: the scales' records; NULL:
                             every one is zero_point */
    int64_t n, k, group_size;
    int32_t bits, half_scales, float_zeros, scale_format;
    const uint8_t *code_table; /* 4-bit codes, int8-activation kernels: the code of each nibble; NULL: itself */
    float zero_point;          /* the zero point of every group when zeros is NULL */
    float scale_divisor;       /* int8-activation kernels: every scale is divided by it when > 0 */
    float min_scale;           /* QK_SPQR: the smallest first-level scale */
} qk_weight;

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

static inline int64_t weight_groups(const qk_weight *w) { return (w->k + w->group_size - 1) / w->group_size; }

/* The IEEE half whose exponent and mantissa bits are those of E4M3 byte b: its value is b's / 256. */
static inline uint16_t e4m3_half_bits(uint8_t b) { return (uint16_t)(((b & 0x80u) << 8) | ((b & 0x7Fu) << 7)); }

static inline float byte_scale(int format, uint8_t b) {
    if (format == QK_E4M3) return half_to_float(e4m3_half_bits(b)) * 256.f;
    uint32_t bits = (uint32_t)b << 23; /* E8M0: 2^(b - 127) (b = 0 reads as 0) */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float scale_at(const qk_weight *w, int64_t i) {
    if (w->scale_format) return byte_scale(w->scale_format, ((const uint8_t *)w->scales)[i]);
    return w->half_scales ? half_to_float(((const uint16_t *)w->scales)[i]) : ((const float *)w->scales)[i];
}

static inline float zero_at(const qk_weight *w, int64_t i) {
    if (!w->zeros) return w->zero_point;
    return w->float_zeros ? ((const float *)w->zeros)[i] : (float)((const uint8_t *)w->zeros)[i];
}

/* An int8-activation kernel's output from its sum over scaled products: divided by scale_divisor if set. */
static inline float unscaled(const qk_weight *w, float y) { return w->scale_divisor > 0.f ? y / w->scale_divisor : y; }

static int geometry_fits(const qk_weight *w) {
    return w->k % BLOCK == 0 && (w->group_size == 16 || (w->group_size > 0 && w->group_size % BLOCK == 0));
}

/* Codes the tiled kernel reads: 3-bit (its own layout), 4-bit (through a table or not) and 8-bit. */
static int tiled_codes_fit(const qk_weight *w) {
    return (w->bits == 3 && !w->code_table) || w->bits == 4 || (w->bits == 8 && !w->code_table);
}

/* The row int8-activation kernels take 4- and 8-bit codes whose geometry fits and statistics are per row. */
static int weight_fits(const qk_weight *w) {
    return geometry_fits(w) && (w->bits == 4 || (w->bits == 8 && !w->code_table)) && w->scale_format != QK_SPQR;
}

/* The float kernels and row dequantization also need the codes to be the integers and no divisor. */
static int plain_weight_fits(const qk_weight *w) {
    return weight_fits(w) && !w->code_table && !(w->scale_divisor > 0.f);
}

/* Code at position j (0-31) of a block. */
static inline int code_at(const uint8_t *block, int bits, int j) {
    return bits == 8 ? block[j] : (j < 16 ? block[j] & 0x0F : block[j - 16] >> 4);
}

/* The integer that code j of a block stands for (through the weight's code table). */
static inline int mapped_code_at(const qk_weight *w, const uint8_t *block, int j) {
    int code = code_at(block, w->bits, j);
    return w->code_table ? w->code_table[code] : code;
}

/* Sum of the activations of every group: xsum[m * groups + g]. */
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

/* float32 to bfloat16, rounding to nearest even (finite values). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* Store the 32 floats of one block as float32, or as bfloat16 when bf16 is set. */
static inline void store_block(const float *values, void *out, int64_t at, int bf16) {
    if (!bf16) {
        memcpy((float *)out + at, values, BLOCK * sizeof(float));
        return;
    }
    uint16_t *o = (uint16_t *)out + at;
#if defined(__AVX512BF16__)
    __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(values + 16), _mm512_loadu_ps(values));
    _mm512_storeu_si512((void *)o, (__m512i)pair);
#elif defined(__AVX512F__)
    for (int h = 0; h < 2; h++) {
        __m512i bits = _mm512_castps_si512(_mm512_loadu_ps(values + 16 * h));
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
        _mm256_storeu_si256((__m256i *)(o + 16 * h), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
    }
#elif defined(__AVX2__)
    for (int h = 0; h < 2; h++) {
        __m256i a = _mm256_castps_si256(_mm256_loadu_ps(values + 16 * h));
        __m256i b = _mm256_castps_si256(_mm256_loadu_ps(values + 16 * h + 8));
        const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
        a = _mm256_srli_epi32(_mm256_add_epi32(a, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(a, 16), one), bias)), 16);
        b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16), one), bias)), 16);
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
        _mm256_storeu_si256((__m256i *)(o + 16 * h), packed);
    }
#else
    for (int j = 0; j < BLOCK; j++) o[j] = float_to_bf16(values[j]);
#endif
}

/* ------------------------------------------------------------------ exact float activations */

#if defined(__AVX2__)
/* Sum of the eight lanes. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif

#if defined(__AVX512F__)
/* The 32 codes of one block as two float vectors: positions 0-15 and 16-31. */
static inline __attribute__((always_inline)) void load_codes(const uint8_t *p, const int BITS, __m512 *low, __m512 *high) {
    if (BITS == 4) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
        *low = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
        *high = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    } else {
        *low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
        *high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    }
}

/* One weight row against MT activation rows; MT, BITS and GS (the group size, 0 when not a literal) are
 * compile-time constants after inlining. */
static inline __attribute__((always_inline)) void row_tile(const qk_weight *w, int64_t r, const float *x, const float *xsum,
                                                           float *y, const int BITS, const int MT, const int64_t GS) {
    const int64_t group_size = GS ? GS : w->group_size, groups = weight_groups(w), k = w->k;
    const uint8_t *codes = w->codes + r * (k * BITS / 8);
    __m512 total[4];
    float zero_term[4] = {0.f, 0.f, 0.f, 0.f};
    for (int t = 0; t < MT; t++) total[t] = _mm512_setzero_ps();
    if (group_size == 16) {
        for (int64_t b = 0; b < k / BLOCK; b++) {
            __m512 low, high;
            load_codes(codes + b * BLOCK * BITS / 8, BITS, &low, &high);
            float s0 = scale_at(w, r * groups + 2 * b), s1 = scale_at(w, r * groups + 2 * b + 1);
            float sz0 = s0 * zero_at(w, r * groups + 2 * b), sz1 = s1 * zero_at(w, r * groups + 2 * b + 1);
            for (int t = 0; t < MT; t++) {
                const float *xp = x + t * k + b * BLOCK;
                total[t] = _mm512_fmadd_ps(_mm512_set1_ps(s0), _mm512_mul_ps(low, _mm512_loadu_ps(xp)), total[t]);
                total[t] = _mm512_fmadd_ps(_mm512_set1_ps(s1), _mm512_mul_ps(high, _mm512_loadu_ps(xp + 16)), total[t]);
                zero_term[t] += sz0 * xsum[t * groups + 2 * b] + sz1 * xsum[t * groups + 2 * b + 1];
            }
        }
    } else {
        const int64_t blocks_per_group = group_size / BLOCK;
        for (int64_t g = 0; g < groups; g++) {
            __m512 acc[4][2];
            for (int t = 0; t < MT; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
            int64_t first = g * blocks_per_group, last = first + blocks_per_group;
            if (last * BLOCK > k) last = k / BLOCK;
            for (int64_t b = first; b < last; b++) {
                __m512 low, high;
                load_codes(codes + b * BLOCK * BITS / 8, BITS, &low, &high);
                for (int t = 0; t < MT; t++) {
                    const float *xp = x + t * k + b * BLOCK;
                    acc[t][0] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xp), acc[t][0]);
                    acc[t][1] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xp + 16), acc[t][1]);
                }
            }
            float s = scale_at(w, r * groups + g), sz = s * zero_at(w, r * groups + g);
            for (int t = 0; t < MT; t++) {
                total[t] = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_add_ps(acc[t][0], acc[t][1]), total[t]);
                zero_term[t] += sz * xsum[t * groups + g];
            }
        }
    }
    for (int t = 0; t < MT; t++) y[t * w->n] = _mm512_reduce_add_ps(total[t]) - zero_term[t];
}
#elif defined(__AVX2__)
/* The 32 codes of one block as four float vectors of eight positions each. */
static inline __attribute__((always_inline)) void load_codes(const uint8_t *p, const int BITS, __m256 v[4]) {
    if (BITS == 4) {
        __m128i packed = _mm_loadu_si128((const __m128i *)p);
        __m128i low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
        __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
        v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low));
        v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8)));
        v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high));
        v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8)));
    } else {
        for (int i = 0; i < 4; i++)
            v[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * i))));
    }
}

static inline __attribute__((always_inline)) void row_tile(const qk_weight *w, int64_t r, const float *x, const float *xsum,
                                                           float *y, const int BITS, const int MT, const int64_t GS) {
    const int64_t group_size = GS ? GS : w->group_size, groups = weight_groups(w), k = w->k;
    const uint8_t *codes = w->codes + r * (k * BITS / 8);
    __m256 total[4];
    float zero_term[4] = {0.f, 0.f, 0.f, 0.f};
    for (int t = 0; t < MT; t++) total[t] = _mm256_setzero_ps();
    if (group_size == 16) {
        for (int64_t b = 0; b < k / BLOCK; b++) {
            __m256 v[4];
            load_codes(codes + b * BLOCK * BITS / 8, BITS, v);
            float s0 = scale_at(w, r * groups + 2 * b), s1 = scale_at(w, r * groups + 2 * b + 1);
            float sz0 = s0 * zero_at(w, r * groups + 2 * b), sz1 = s1 * zero_at(w, r * groups + 2 * b + 1);
            for (int t = 0; t < MT; t++) {
                const float *xp = x + t * k + b * BLOCK;
                __m256 first = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xp + 8), _mm256_mul_ps(v[0], _mm256_loadu_ps(xp)));
                __m256 second = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xp + 24), _mm256_mul_ps(v[2], _mm256_loadu_ps(xp + 16)));
                total[t] = _mm256_fmadd_ps(_mm256_set1_ps(s0), first, total[t]);
                total[t] = _mm256_fmadd_ps(_mm256_set1_ps(s1), second, total[t]);
                zero_term[t] += sz0 * xsum[t * groups + 2 * b] + sz1 * xsum[t * groups + 2 * b + 1];
            }
        }
    } else {
        const int NA = MT == 1 ? 4 : 2; /* independent accumulator chains */
        const int64_t blocks_per_group = group_size / BLOCK;
        for (int64_t g = 0; g < groups; g++) {
            __m256 acc[4][4];
            for (int t = 0; t < MT; t++)
                for (int a = 0; a < NA; a++) acc[t][a] = _mm256_setzero_ps();
            int64_t first = g * blocks_per_group, last = first + blocks_per_group;
            if (last * BLOCK > k) last = k / BLOCK;
            for (int64_t b = first; b < last; b++) {
                __m256 v[4];
                load_codes(codes + b * BLOCK * BITS / 8, BITS, v);
                for (int t = 0; t < MT; t++) {
                    const float *xp = x + t * k + b * BLOCK;
                    for (int i = 0; i < 4; i++)
                        acc[t][i % NA] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xp + 8 * i), acc[t][i % NA]);
                }
            }
            float s = scale_at(w, r * groups + g), sz = s * zero_at(w, r * groups + g);
            for (int t = 0; t < MT; t++) {
                __m256 sum = acc[t][0];
                for (int a = 1; a < NA; a++) sum = _mm256_add_ps(sum, acc[t][a]);
                total[t] = _mm256_fmadd_ps(_mm256_set1_ps(s), sum, total[t]);
                zero_term[t] += sz * xsum[t * groups + g];
            }
        }
    }
    for (int t = 0; t < MT; t++) y[t * w->n] = hsum(total[t]) - zero_term[t];
}
#endif

#if defined(__AVX2__)
/* All activation rows against weight row r, in tiles of up to four rows. */
static inline __attribute__((always_inline)) void row_all(const qk_weight *w, int64_t r, const float *x, const float *xsum,
                                                          int64_t m_rows, float *y, const int BITS, const int64_t GS) {
    const int64_t groups = weight_groups(w), k = w->k;
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4) row_tile(w, r, x + m * k, xsum + m * groups, y + m * w->n, BITS, 4, GS);
    const float *xr = x + m * k, *xs = xsum + m * groups;
    switch (m_rows - m) {
        case 3: row_tile(w, r, xr, xs, y + m * w->n, BITS, 3, GS); break;
        case 2: row_tile(w, r, xr, xs, y + m * w->n, BITS, 2, GS); break;
        case 1: row_tile(w, r, xr, xs, y + m * w->n, BITS, 1, GS); break;
        default: break;
    }
}
#endif

#if !defined(__AVX2__)
static void row_scalar(const qk_weight *w, int64_t r, const float *x, const float *xsum, int64_t m_rows, float *y) {
    const int64_t groups = weight_groups(w), k = w->k, block_bytes = w->bits * BLOCK / 8;
    const uint8_t *codes = w->codes + r * (k * w->bits / 8);
    for (int64_t t = 0; t < m_rows; t++) {
        float total = 0.f;
        for (int64_t g = 0; g < groups; g++) {
            int64_t end = (g + 1) * w->group_size < k ? (g + 1) * w->group_size : k;
            float acc = 0.f;
            for (int64_t c = g * w->group_size; c < end; c++)
                acc += x[t * k + c] * (float)code_at(codes + (c / BLOCK) * block_bytes, w->bits, (int)(c % BLOCK));
            total += scale_at(w, r * groups + g) * (acc - zero_at(w, r * groups + g) * xsum[t * groups + g]);
        }
        y[t * w->n] = total;
    }
}
#endif

/* y[m_rows, n] = x[m_rows, k] @ W.T with x in the kernel's position order. */
int qk_gemv(const qk_weight *w, const float *x, int64_t m_rows, float *y, int threads) {
    if (!plain_weight_fits(w)) return 1;
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(m_rows * weight_groups(w)));
    if (!xsum) return 2;
    group_sums(x, m_rows, w->k, w->group_size, xsum);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < w->n; r++) {
#if defined(__AVX2__)
/* Common group sizes as literals, so that each gets a fully unrolled group loop. */
#define ROW_ALL_GROUPS(BITS)                                              \
    switch (w->group_size) {                                              \
        case 16: row_all(w, r, x, xsum, m_rows, y + r, BITS, 16); break;  \
        case 32: row_all(w, r, x, xsum, m_rows, y + r, BITS, 32); break;  \
        case 64: row_all(w, r, x, xsum, m_rows, y + r, BITS, 64); break;  \
        case 128: row_all(w, r, x, xsum, m_rows, y + r, BITS, 128); break; \
        default: row_all(w, r, x, xsum, m_rows, y + r, BITS, 0); break;   \
    }
        if (w->bits == 4) {
            ROW_ALL_GROUPS(4)
        } else {
            ROW_ALL_GROUPS(8)
        }
#else
        row_scalar(w, r, x, xsum, m_rows, y + r);
#endif
    }
    free(xsum);
    return 0;
}

/* ------------------------------------------------------------------ int8 activations */

/* GROUPS(BITS, MAPPED) for the codes of w, BITS and MAPPED (a code table) as literals. */
#define BY_CODES(w, GROUPS)   \
    if ((w)->bits == 8) {     \
        GROUPS(8, 0)          \
    } else if ((w)->code_table) { \
        GROUPS(4, 1)          \
    } else {                  \
        GROUPS(4, 0)          \
    }

/* Activations rounded per block of 32: xq[m, k] int8, d[m, k / 32], and xsum[m, g] = sum_{p in g} d * xq. */
static void quantize_activations(const float *x, int64_t m_rows, int64_t k, int64_t group_size, int8_t *xq, float *d,
                                 float *xsum) {
    const int64_t blocks = k / BLOCK, groups = (k + group_size - 1) / group_size;
    for (int64_t m = 0; m < m_rows; m++) {
        for (int64_t g = 0; g < groups; g++) xsum[m * groups + g] = 0.f;
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + m * k + b * BLOCK;
            float amax = 0.f;
            for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
            float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
            d[m * blocks + b] = scale;
            int sums[2] = {0, 0};
            for (int j = 0; j < BLOCK; j++) {
                int q = (int)nearbyintf(xb[j] * inverse);
                xq[m * k + b * BLOCK + j] = (int8_t)q;
                sums[j / 16] += q;
            }
            if (group_size == 16) {
                xsum[m * groups + 2 * b] = scale * (float)sums[0];
                xsum[m * groups + 2 * b + 1] = scale * (float)sums[1];
            } else {
                xsum[m * groups + b * BLOCK / group_size] += scale * (float)(sums[0] + sums[1]);
            }
        }
    }
}

#if defined(__AVX2__)
/* Integer dot products of one weight block with one activation block: eight int32 lanes, lanes 0-3 covering
 * positions 0-15 and lanes 4-7 positions 16-31. MAPPED: 4-bit codes go through the 16-byte table. */
static inline __attribute__((always_inline)) __m256i block_dot(const uint8_t *p, const int8_t *xq, const int BITS,
                                                               const int MAPPED, __m128i table) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)xq);
    if (BITS == 4) {
        __m128i packed = _mm_loadu_si128((const __m128i *)p);
        __m128i low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
        __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
        if (MAPPED) low = _mm_shuffle_epi8(table, low), high = _mm_shuffle_epi8(table, high);
        __m256i codes = _mm256_set_m128i(high, low);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        return _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, xv);
#else
        /* codes up to 24 (FP4's table): 24 * 127 * 2 fits int16, maddubs cannot saturate */
        return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1));
#endif
    }
    __m256i codes = _mm256_loadu_si256((const __m256i *)p);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, xv);
#else
    /* 255 * 127 * 2 would saturate maddubs: widen to int16 and use madd instead */
    __m256i first = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes)),
                                      _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv)));
    __m256i second = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes, 1)),
                                       _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1)));
    /* lanes of first cover positions 0-15, of second 16-31: fold each into four lanes */
    __m256i lo = _mm256_hadd_epi32(first, second); /* [f0+f1, f2+f3, s0+s1, s2+s3 | f4+f5, f6+f7, s4+s5, s6+s7] */
    return _mm256_permutevar8x32_epi32(lo, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
#endif
}

static inline __attribute__((always_inline)) void row_q8(const qk_weight *w, int64_t r, const int8_t *xq, const float *d,
                                                         const float *xsum, int64_t m_rows, float *y, const int BITS,
                                                         const int MAPPED, const int64_t GS) {
    const int64_t group_size = GS ? GS : w->group_size, groups = weight_groups(w), k = w->k, blocks = k / BLOCK;
    const uint8_t *codes = w->codes + r * (k * BITS / 8);
    const __m128i table = MAPPED ? _mm_loadu_si128((const __m128i *)w->code_table) : _mm_setzero_si128();
    for (int64_t t = 0; t < m_rows; t++) {
        __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        float zero_term = 0.f;
        const float *dt = d + t * blocks;
        if (group_size == 16) {
            for (int64_t b = 0; b < blocks; b++) {
                __m256i dot = block_dot(codes + b * BLOCK * BITS / 8, xq + t * k + b * BLOCK, BITS, MAPPED, table);
                float s0 = scale_at(w, r * groups + 2 * b), s1 = scale_at(w, r * groups + 2 * b + 1);
                __m256 scale = _mm256_set_m128(_mm_set1_ps(s1 * dt[b]), _mm_set1_ps(s0 * dt[b]));
                total[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, total[b & 1]);
                zero_term += s0 * zero_at(w, r * groups + 2 * b) * xsum[t * groups + 2 * b] +
                             s1 * zero_at(w, r * groups + 2 * b + 1) * xsum[t * groups + 2 * b + 1];
            }
        } else {
            const int64_t blocks_per_group = group_size / BLOCK;
            for (int64_t g = 0; g < groups; g++) {
                float s = scale_at(w, r * groups + g);
                int64_t first = g * blocks_per_group, last = first + blocks_per_group;
                if (last > blocks) last = blocks;
                for (int64_t b = first; b < last; b++) {
                    __m256i dot = block_dot(codes + b * BLOCK * BITS / 8, xq + t * k + b * BLOCK, BITS, MAPPED, table);
                    total[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s * dt[b]), total[b & 1]);
                }
                zero_term += s * zero_at(w, r * groups + g) * xsum[t * groups + g];
            }
        }
        y[t * w->n] = unscaled(w, hsum(_mm256_add_ps(total[0], total[1])) - zero_term);
    }
}
#endif

#if !defined(__AVX2__)
static void row_q8_scalar(const qk_weight *w, int64_t r, const int8_t *xq, const float *d, const float *xsum,
                          int64_t m_rows, float *y) {
    const int64_t groups = weight_groups(w), k = w->k, blocks = k / BLOCK, block_bytes = w->bits * BLOCK / 8;
    const uint8_t *codes = w->codes + r * (k * w->bits / 8);
    const int halves = w->group_size == 16;
    for (int64_t t = 0; t < m_rows; t++) {
        float total = 0.f, zero_term = 0.f;
        for (int64_t b = 0; b < blocks; b++) {
            int32_t dots[2] = {0, 0};
            for (int j = 0; j < BLOCK; j++)
                dots[j / 16] += mapped_code_at(w, codes + b * block_bytes, j) * (int32_t)xq[t * k + b * BLOCK + j];
            if (halves) {
                total += d[t * blocks + b] * (scale_at(w, r * groups + 2 * b) * (float)dots[0] +
                                              scale_at(w, r * groups + 2 * b + 1) * (float)dots[1]);
            } else {
                total += d[t * blocks + b] * scale_at(w, r * groups + b * BLOCK / w->group_size) * (float)(dots[0] + dots[1]);
            }
        }
        for (int64_t g = 0; g < groups; g++)
            zero_term += scale_at(w, r * groups + g) * zero_at(w, r * groups + g) * xsum[t * groups + g];
        y[t * w->n] = unscaled(w, total - zero_term);
    }
}
#endif

/* y[m_rows, n] = q8(x) @ W.T: x (position order) rounded to int8 per block of 32, integer block products. */
int qk_gemv_q8(const qk_weight *w, const float *x, int64_t m_rows, float *y, int threads) {
    if (!weight_fits(w)) return 1;
    int8_t *xq = (int8_t *)malloc((size_t)(m_rows * w->k));
    float *d = (float *)malloc(sizeof(float) * (size_t)(m_rows * (w->k / BLOCK)));
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(m_rows * weight_groups(w)));
    if (!xq || !d || !xsum) {
        free(xq), free(d), free(xsum);
        return 2;
    }
    quantize_activations(x, m_rows, w->k, w->group_size, xq, d, xsum);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < w->n; r++) {
#if defined(__AVX2__)
#define ROW_Q8_GROUPS(BITS, MAPPED)                                                  \
    switch (w->group_size) {                                                         \
        case 16: row_q8(w, r, xq, d, xsum, m_rows, y + r, BITS, MAPPED, 16); break;  \
        case 32: row_q8(w, r, xq, d, xsum, m_rows, y + r, BITS, MAPPED, 32); break;  \
        case 64: row_q8(w, r, xq, d, xsum, m_rows, y + r, BITS, MAPPED, 64); break;  \
        case 128: row_q8(w, r, xq, d, xsum, m_rows, y + r, BITS, MAPPED, 128); break; \
        default: row_q8(w, r, xq, d, xsum, m_rows, y + r, BITS, MAPPED, 0); break;   \
    }
        BY_CODES(w, ROW_Q8_GROUPS)
#else
        row_q8_scalar(w, r, xq, d, xsum, m_rows, y + r);
#endif
    }
    free(xq), free(d), free(xsum);
    return 0;
}

/* ------------------------------------------------------------------ row tiles for int8 decode (AVX-512)
 *
 * The same weights, repacked at load so that one instruction multiplies 16 rows at once: rows are taken 16 at
 * a time (the last tile padded with zero rows), and for each tile and block of 32 positions the codes of its
 * eight octets of positions (8o .. 8o + 7) follow one another:
 *   bits == 4: 64 bytes an octet; bytes 4i .. 4i + 3 belong to row i of the tile, byte q holding position
 *              8o + q in its low nibble and 8o + 4 + q in its high one.
 *   bits == 8: 128 bytes an octet; bytes 4i + q hold position 8o + q of row i, bytes 64 + 4i + q position
 *              8o + 4 + q.
 *   bits == 3: 192 bytes a block, in planes rather than octets: two of 64 bytes with the codes' low two bits
 *              (plane p: byte 4i + q holds, at bit offsets 0, 2, 4 and 6, positions 8o + q and 8o + 4 + q for
 *              o = 2p, then o = 2p + 1) and one of 64 bytes with their third bit (byte 4i + q: bit 2o + h for
 *              position 8o + 4h + q).
 * Scales and zero points are [tiles, groups, 16], or (SpQR with statistics shared by blocks of 16 rows) one
 * qk_spqr_stats record of 32 bytes per tile and group, decoded in registers. Every lane of a dpbusd is then one row, the activations are
 * four bytes broadcast to all lanes, and scales and zero points load as vectors: group statistics cost a few
 * instructions per 16 rows and block, whatever the group size. */

/* Rows a tile holds in this build's tiled layout for codes of this width (0: no tiled kernel for them here):
 * 4-bit codes on AVX-512 (their products fit maddubs' int16 sums), 8-bit ones with VNNI. */
int qk_tile_rows(int bits) {
#if defined(__AVX512VNNI__)
    return bits == 3 || bits == 4 || bits == 8 ? 16 : 0;
#elif defined(__AVX512BW__)
    return bits == 3 || bits == 4 ? 16 : 0;
#else
    (void)bits;
    return 0;
#endif
}

#if defined(__AVX512BW__)
/* Sixteen lanes of acc plus the products of four codes and four activations each. */
static inline __attribute__((always_inline)) __m512i quad_dot(__m512i acc, __m512i codes, const int8_t *x4) {
    int32_t quad;
    memcpy(&quad, x4, sizeof quad);
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(quad));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(codes, _mm512_set1_epi32(quad)), _mm512_set1_epi16(1)));
#endif
}

/* Bits shift and shift + 1 of every byte of v (3-bit tiles' low plane), as integers 0-3. */
static inline __m512i two_bits(__m512i v, int shift) {
    return _mm512_and_si512(_mm512_srli_epi16(v, (unsigned)shift), _mm512_set1_epi8(0x03));
}

/* Bit `bit` of every byte of v (3-bit tiles' high plane) as 0 or 4. Shifts cross bytes within a 16-bit lane,
 * but only into bits the mask drops. */
static inline __m512i third_bit(__m512i v, int bit) {
    __m512i moved = bit <= 2 ? _mm512_slli_epi16(v, (unsigned)(2 - bit)) : _mm512_srli_epi16(v, (unsigned)(bit - 2));
    return _mm512_and_si512(moved, _mm512_set1_epi8(0x04));
}

/* Sixteen byte scales decoded (as byte_scale does). */
static inline __m512 tile_byte_scales(int format, __m128i bytes) {
    if (format == QK_E8M0) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu8_epi32(bytes), 23));
    __m256i shifted = _mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 7); /* the sign lands on bit 14: carry it to 15 */
    __m256i bits = _mm256_add_epi16(shifted, _mm256_and_si256(shifted, _mm256_set1_epi16(0x4000)));
    return _mm512_mul_ps(_mm512_cvtph_ps(bits), _mm512_set1_ps(256.f));
}

/* One of the statistics of an SpQR record, for its 16 rows: stat_scale * (code - stat_zero), the code in bits
 * shift .. shift + 3 of each code byte. */
static inline __m512 spqr_stat(const qk_spqr_stats *r, int shift, float stat_scale, float stat_zero) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)r->codes));
    __m512 codes = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(bytes, shift), _mm512_set1_epi32(0x0F)));
    return _mm512_mul_ps(_mm512_set1_ps(stat_scale), _mm512_sub_ps(codes, _mm512_set1_ps(stat_zero)));
}

static inline __m512 tile_scales(const qk_weight *w, int64_t i) {
    if (w->scale_format == QK_SPQR) {
        const qk_spqr_stats *r = (const qk_spqr_stats *)w->scales + i;
        return _mm512_max_ps(spqr_stat(r, 0, r->scale_scale, r->scale_zero), _mm512_set1_ps(w->min_scale));
    }
    if (w->scale_format) return tile_byte_scales(w->scale_format, _mm_loadu_si128((const __m128i *)((const uint8_t *)w->scales + 16 * i)));
    return w->half_scales ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w->scales + 16 * i)))
                          : _mm512_loadu_ps((const float *)w->scales + 16 * i);
}

static inline __m512 tile_zeros(const qk_weight *w, int64_t i) {
    if (!w->zeros) return _mm512_set1_ps(w->zero_point);
    if (w->scale_format == QK_SPQR) {
        const qk_spqr_stats *r = (const qk_spqr_stats *)w->zeros + i;
        return spqr_stat(r, 4, r->zero_scale, r->zero_zero);
    }
    return w->float_zeros ? _mm512_loadu_ps((const float *)w->zeros + 16 * i)
                          : _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)w->zeros + 16 * i))));
}

/* Sixteen rows (tile) against MT activation rows; MAPPED: 4-bit codes through the code table. */
static inline __attribute__((always_inline)) void tile_q8(const qk_weight *w, int64_t tile, const int8_t *xq, const float *d,
                                                          const float *xsum, float *y, const int BITS, const int MAPPED,
                                                          const int MT, const int64_t GS) {
    const int64_t group_size = GS ? GS : w->group_size, groups = weight_groups(w), k = w->k, blocks = k / BLOCK;
    const int64_t block_bytes = 64 * BITS, first = tile * groups;
    const uint8_t *codes = w->codes + tile * blocks * block_bytes;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i table = MAPPED ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)w->code_table)) : nibble;
    __m512 total[4], zero_term[4];
    for (int t = 0; t < MT; t++) total[t] = zero_term[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m512i acc[4][2]; /* per activation row: positions 0-15 and 16-31 */
        for (int t = 0; t < MT; t++) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
        for (int o = 0; o < 4; o++) {
            __m512i first_quads, second_quads;
            if (BITS == 4) {
                __m512i v = _mm512_loadu_si512((const void *)(codes + b * block_bytes + 64 * o));
                first_quads = _mm512_and_si512(v, nibble);
                second_quads = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                if (MAPPED) {
                    first_quads = _mm512_shuffle_epi8(table, first_quads);
                    second_quads = _mm512_shuffle_epi8(table, second_quads);
                }
            } else if (BITS == 3) {
                __m512i low = _mm512_loadu_si512((const void *)(codes + b * block_bytes + 64 * (o / 2)));
                __m512i high = _mm512_loadu_si512((const void *)(codes + b * block_bytes + 128));
                first_quads = _mm512_or_si512(two_bits(low, 4 * (o % 2)), third_bit(high, 2 * o));
                second_quads = _mm512_or_si512(two_bits(low, 4 * (o % 2) + 2), third_bit(high, 2 * o + 1));
            } else {
                first_quads = _mm512_loadu_si512((const void *)(codes + b * block_bytes + 128 * o));
                second_quads = _mm512_loadu_si512((const void *)(codes + b * block_bytes + 128 * o + 64));
            }
            for (int t = 0; t < MT; t++) {
                const int8_t *xo = xq + t * k + b * BLOCK + 8 * o;
                acc[t][o / 2] = quad_dot(acc[t][o / 2], first_quads, xo);
                acc[t][o / 2] = quad_dot(acc[t][o / 2], second_quads, xo + 4);
            }
        }
        if (group_size == 16) { /* s * (d * acc - z * xsum) per group, so that its statistics decode once */
            for (int h = 0; h < 2; h++) {
                __m512 s = tile_scales(w, first + 2 * b + h), z = tile_zeros(w, first + 2 * b + h);
                for (int t = 0; t < MT; t++) {
                    __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[t][h]), _mm512_set1_ps(d[t * blocks + b]));
                    __m512 inner = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[t * groups + 2 * b + h]), scaled);
                    total[t] = _mm512_fmadd_ps(s, inner, total[t]);
                }
            }
        } else {
            __m512 s = tile_scales(w, first + b * BLOCK / group_size);
            for (int t = 0; t < MT; t++)
                total[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[t][0], acc[t][1])),
                                           _mm512_mul_ps(s, _mm512_set1_ps(d[t * blocks + b])), total[t]);
        }
    }
    for (int64_t g = 0; group_size != 16 && g < groups; g++) {
        __m512 sz = _mm512_mul_ps(tile_scales(w, first + g), tile_zeros(w, first + g));
        for (int t = 0; t < MT; t++) zero_term[t] = _mm512_fmadd_ps(sz, _mm512_set1_ps(xsum[t * groups + g]), zero_term[t]);
    }
    int64_t rows = w->n - 16 * tile < 16 ? w->n - 16 * tile : 16;
    __mmask16 valid = (__mmask16)((1u << rows) - 1u);
    for (int t = 0; t < MT; t++) {
        __m512 out = _mm512_sub_ps(total[t], zero_term[t]);
        if (w->scale_divisor > 0.f) out = _mm512_div_ps(out, _mm512_set1_ps(w->scale_divisor));
        _mm512_mask_storeu_ps(y + t * w->n + 16 * tile, valid, out);
    }
}

static inline __attribute__((always_inline)) void tile_q8_all(const qk_weight *w, int64_t tile, const int8_t *xq, const float *d,
                                                              const float *xsum, int64_t m_rows, float *y, const int BITS,
                                                              const int MAPPED, const int64_t GS) {
    const int64_t groups = weight_groups(w), k = w->k, blocks = k / BLOCK;
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4)
        tile_q8(w, tile, xq + m * k, d + m * blocks, xsum + m * groups, y + m * w->n, BITS, MAPPED, 4, GS);
    const int8_t *xr = xq + m * k;
    const float *dr = d + m * blocks, *xs = xsum + m * groups;
    switch (m_rows - m) {
        case 3: tile_q8(w, tile, xr, dr, xs, y + m * w->n, BITS, MAPPED, 3, GS); break;
        case 2: tile_q8(w, tile, xr, dr, xs, y + m * w->n, BITS, MAPPED, 2, GS); break;
        case 1: tile_q8(w, tile, xr, dr, xs, y + m * w->n, BITS, MAPPED, 1, GS); break;
        default: break;
    }
}
#endif

/* y[m_rows, n] = q8(x) @ W.T for weights in the tiled layout above (builds where qk_tile_rows() is 16). */
int qk_gemv_q8_tiled(const qk_weight *w, const float *x, int64_t m_rows, float *y, int threads) {
#if defined(__AVX512BW__)
    if (!geometry_fits(w) || !tiled_codes_fit(w) || !qk_tile_rows(w->bits)) return 1;
    const int64_t blocks = w->k / BLOCK, tiles = (w->n + 15) / 16;
    int8_t *xq = (int8_t *)malloc((size_t)(m_rows * w->k));
    float *d = (float *)malloc(sizeof(float) * (size_t)(m_rows * blocks));
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(m_rows * weight_groups(w)));
    if (!xq || !d || !xsum) {
        free(xq), free(d), free(xsum);
        return 2;
    }
    quantize_activations(x, m_rows, w->k, w->group_size, xq, d, xsum);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < tiles; tile++) {
#define TILE_GROUPS(BITS, MAPPED)                                                        \
    switch (w->group_size) {                                                             \
        case 16: tile_q8_all(w, tile, xq, d, xsum, m_rows, y, BITS, MAPPED, 16); break;  \
        case 32: tile_q8_all(w, tile, xq, d, xsum, m_rows, y, BITS, MAPPED, 32); break;  \
        case 64: tile_q8_all(w, tile, xq, d, xsum, m_rows, y, BITS, MAPPED, 64); break;  \
        case 128: tile_q8_all(w, tile, xq, d, xsum, m_rows, y, BITS, MAPPED, 128); break; \
        default: tile_q8_all(w, tile, xq, d, xsum, m_rows, y, BITS, MAPPED, 0); break;   \
    }
        if (w->bits == 3) {
            TILE_GROUPS(3, 0)
        } else {
            BY_CODES(w, TILE_GROUPS)
        }
    }
    free(xq), free(d), free(xsum);
    return 0;
#else
    (void)w, (void)x, (void)m_rows, (void)y, (void)threads;
    return 3;
#endif
}

/* ------------------------------------------------------------------ sparse corrections (SpQR's outliers) */

/* y[m_rows, n] += x[m_rows, k] @ D.T for a sparse D in CSR: row r holds deltas[j] at columns[j] (unsigned
 * 16-bit), j in [offsets[r], offsets[r + 1]). */
int qk_csr_add(const int32_t *offsets, const uint16_t *columns, const float *deltas, int64_t n, const float *x,
               int64_t m_rows, int64_t k, float *y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++)
        for (int64_t t = 0; t < m_rows; t++) {
            const float *xt = x + t * k;
            float sum[4] = {0.f, 0.f, 0.f, 0.f}; /* four chains, so that no add waits for the one before */
            int32_t j = offsets[r];
            for (; j + 4 <= offsets[r + 1]; j += 4)
                for (int i = 0; i < 4; i++) sum[i] += deltas[j + i] * xt[columns[j + i]];
            for (; j < offsets[r + 1]; j++) sum[0] += deltas[j] * xt[columns[j]];
            y[t * n + r] += (sum[0] + sum[1]) + (sum[2] + sum[3]);
        }
    return 0;
}

/* Rows [row_begin, row_end) of W, positions in kernel order, as float32 or (bf16 set) bfloat16. */
int qk_dequant_rows(const qk_weight *w, int64_t row_begin, int64_t row_end, void *out, int bf16, int threads) {
    if (!plain_weight_fits(w)) return 1;
    const int64_t groups = weight_groups(w), k = w->k, block_bytes = w->bits * BLOCK / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = row_begin; r < row_end; r++) {
        const uint8_t *codes = w->codes + r * (k * w->bits / 8);
        float values[BLOCK];
        for (int64_t b = 0; b < k / BLOCK; b++) {
            for (int half = 0; half < 2; half++) {
                int64_t g = (b * BLOCK + 16 * half) / w->group_size;
                float s = scale_at(w, r * groups + g), z = zero_at(w, r * groups + g);
#if defined(__AVX512F__)
                __m512 low, high;
                if (w->bits == 4)
                    load_codes(codes + b * block_bytes, 4, &low, &high);
                else
                    load_codes(codes + b * block_bytes, 8, &low, &high);
                __m512 v = half ? high : low;
                _mm512_storeu_ps(values + 16 * half, _mm512_mul_ps(_mm512_set1_ps(s), _mm512_sub_ps(v, _mm512_set1_ps(z))));
#elif defined(__AVX2__)
                __m256 v[4];
                if (w->bits == 4)
                    load_codes(codes + b * block_bytes, 4, v);
                else
                    load_codes(codes + b * block_bytes, 8, v);
                for (int i = 2 * half; i < 2 * half + 2; i++)
                    _mm256_storeu_ps(values + 8 * i, _mm256_mul_ps(_mm256_set1_ps(s), _mm256_sub_ps(v[i], _mm256_set1_ps(z))));
#else
                for (int j = 16 * half; j < 16 * half + 16; j++)
                    values[j] = s * ((float)code_at(codes + b * block_bytes, w->bits, j) - z);
#endif
            }
            store_block(values, out, (r - row_begin) * k + b * BLOCK, bf16);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ FP4 (E2M1) */

/* Block scale i of an FP4 row: a half, or a byte through lut; divided by global when global > 0. */
static inline float fp4_scale(const void *scales, const float *lut, float global, int64_t i) {
    float s = lut ? lut[((const uint8_t *)scales)[i]] : half_to_float(((const uint16_t *)scales)[i]);
    return global > 0.f ? s / global : s;
}

static inline float e2m1_value(int code) {
    static const float magnitudes[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    return (code & 8) ? -magnitudes[code & 7] : magnitudes[code & 7];
}

/* The 32 scaled FP4 values of block b of a row, in position order. FP4 rows keep quantkit's native packing,
 * so position p holds column 2p (p < 16) or 2(p - 16) + 1: positions 0-7 and 16-23 are columns 0-15. */
static inline void fp4_block(const uint8_t *row, const void *scales, const float *lut, float global, int64_t b,
                             int64_t scale_block, float values[BLOCK]) {
    float s_low, s_high;
    if (scale_block == 16) {
        s_low = fp4_scale(scales, lut, global, 2 * b);
        s_high = fp4_scale(scales, lut, global, 2 * b + 1);
    } else {
        s_low = s_high = fp4_scale(scales, lut, global, b * BLOCK / scale_block);
    }
#if defined(__AVX2__)
    const __m256 table = _mm256_setr_ps(0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f);
    __m128i packed = _mm_loadu_si128((const __m128i *)(row + b * 16));
    __m128i nibbles[2] = {_mm_and_si128(packed, _mm_set1_epi8(0x0F)),
                          _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F))};
    for (int i = 0; i < 4; i++) {
        __m256i code = _mm256_cvtepu8_epi32(i % 2 ? _mm_srli_si128(nibbles[i / 2], 8) : nibbles[i / 2]);
        __m256 magnitude = _mm256_permutevar8x32_ps(table, _mm256_and_si256(code, _mm256_set1_epi32(7)));
        __m256i sign = _mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(8)), 28);
        __m256 value = _mm256_xor_ps(magnitude, _mm256_castsi256_ps(sign));
        _mm256_storeu_ps(values + 8 * i, _mm256_mul_ps(value, _mm256_set1_ps(i % 2 ? s_high : s_low)));
    }
#else
    for (int j = 0; j < BLOCK; j++) values[j] = e2m1_value(code_at(row + b * 16, 4, j)) * (j % 16 < 8 ? s_low : s_high);
#endif
}

static inline int fp4_fits(int64_t k, int64_t scale_block) {
    return k % BLOCK == 0 && (scale_block == 16 || (scale_block > 0 && scale_block % BLOCK == 0));
}

/* y[m_rows, n] = x[m_rows, k] @ W.T for FP4 rows and position-ordered x. lut: 256 floats for byte scales,
 * NULL for half scales; global <= 0: no global scale. */
int qk_fp4_gemv(const float *x, int64_t m_rows, int64_t k, const uint8_t *codes, const void *scales,
                const float *lut, float global, int64_t n, int64_t scale_block, float *y, int threads) {
    if (!fp4_fits(k, scale_block)) return 1;
    int64_t groups = (k + scale_block - 1) / scale_block; /* the last block may be partial */
    size_t scale_bytes = lut ? 1 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = codes + r * (k / 2);
        const void *s = (const uint8_t *)scales + (size_t)(r * groups) * scale_bytes;
        for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
            int64_t tile = m_rows - m0 < 4 ? m_rows - m0 : 4;
#if defined(__AVX2__)
            __m256 acc[4][2];
            for (int64_t t = 0; t < tile; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
#else
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
#endif
            for (int64_t b = 0; b < k / BLOCK; b++) {
                float values[BLOCK];
                fp4_block(row, s, lut, global, b, scale_block, values);
                for (int64_t t = 0; t < tile; t++) {
                    const float *xp = x + (m0 + t) * k + b * BLOCK;
#if defined(__AVX2__)
                    for (int i = 0; i < 4; i++)
                        acc[t][i & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(values + 8 * i), _mm256_loadu_ps(xp + 8 * i), acc[t][i & 1]);
#else
                    for (int j = 0; j < BLOCK; j++) acc[t] += values[j] * xp[j];
#endif
                }
            }
            for (int64_t t = 0; t < tile; t++) {
#if defined(__AVX2__)
                y[(m0 + t) * n + r] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
#else
                y[(m0 + t) * n + r] = acc[t];
#endif
            }
        }
    }
    return 0;
}

/* Rows [row_begin, row_end) of FP4 weights, positions in kernel order, as float32 or (bf16 set) bfloat16. */
int qk_fp4_dequant_rows(const uint8_t *codes, const void *scales, const float *lut, float global, int64_t k,
                        int64_t scale_block, int64_t row_begin, int64_t row_end, void *out, int bf16, int threads) {
    if (!fp4_fits(k, scale_block)) return 1;
    int64_t groups = (k + scale_block - 1) / scale_block;
    size_t scale_bytes = lut ? 1 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = row_begin; r < row_end; r++) {
        const uint8_t *row = codes + r * (k / 2);
        const void *s = (const uint8_t *)scales + (size_t)(r * groups) * scale_bytes;
        float values[BLOCK];
        for (int64_t b = 0; b < k / BLOCK; b++) {
            fp4_block(row, s, lut, global, b, scale_block, values);
            store_block(values, out, (r - row_begin) * k + b * BLOCK, bf16);
        }
    }
    return 0;
}
