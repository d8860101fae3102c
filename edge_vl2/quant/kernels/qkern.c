/* qkern: few-row (decode) CPU kernels over edge-vl2's canonical quantized formats, read in place.
 *
 * Formats (edge_vl2/quant/formats.py, the ONNX MatMulNBits layout), no repacking:
 *   INT4: qweight uint8 [E][N][K/2] (element 2j low nibble, 2j+1 high nibble), fp16 scales [E][N][K/g], optional
 *         packed zero points uint8 [E][N][ceil(K/g/2)] (else zero point 8).
 *   INT8: qweight int8 [E][N][K], fp16 scales [E][N] (per channel) or [E][N][K/g].
 * Two activation modes:
 *   mode 0 (int8 activations): activations rounded to int8 per block of 32 (fp32 scale amax/127, round to nearest
 *           even), integer dot products (_mm256_maddubs_epi16, or vpdpbusd on the AVX-VNNI tier); INT4 codes stay
 *           unsigned 0..15 and the zero point is taken out with a per-group term s_w * z * sum_b(d_b * sum(q_b)).
 *           For INT4 the activation block is stored permuted (even elements first, then odd) so the low / high
 *           nibbles of 16 weight bytes line up with it without shuffling the weights.
 *   mode 1 (fp32 activations): codes converted to fp32 and FMA'd with the fp32 activations (exact weight-only).
 * ISA tiers, chosen at run time (one binary for every x86-64; the AVX2 functions carry `target` attributes):
 *   0 scalar (fp32, any CPU; mode ignored), 1 AVX2+FMA+F16C, 2 = 1 plus AVX-VNNI for the INT4 int8 dot products.
 *   qk_set_isa caps the tier (tests run every tier; EDGE_VL2_CPU_ISA in the Python wrapper).
 * Threads: OpenMP (the process's libgomp: torch's, when torch is loaded first); see QK_CHUNK for how rows are split.
 * Not reentrant across Python threads calling into one process's OpenMP pool at once.
 * Called through ctypes (edge_vl2/quant/kernels/qkern.py): no Python or torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QK_X86 1
#endif

#define QK_BLK 32
/* qk_linear(_many): threads take output rows QK_CHUNK at a time from a shared counter (OpenMP dynamic schedule)
 * rather than a fixed half each, so a thread the shared host deschedules leaves its rows to the one that runs. The MoE
 * step keeps a static partition (contiguous halves of each matrix): measured at 2 threads on the 2-core box, dynamic
 * 64-row chunks made it 11 % slower (12.9 vs 11.6 ms per token over 11 layers: each thread's stream restarts every
 * chunk). Either way each output row is computed by one thread, in one order: results do not depend on the threads. */
#define QK_CHUNK 64

/* rows per chunk of an n-row weight in qk_linear_many: QK_CHUNK, or more for tall weights (an lm_head's 129,280
 * rows: 64 chunks of 2,048, not 2,020 trips to the shared counter); a function of n alone, never of the threads */
static inline int64_t chunk_rows(int64_t n) {
    int64_t c = (n + 63) / 64;
    c = (c + QK_CHUNK - 1) / QK_CHUNK * QK_CHUNK;
    return c > QK_CHUNK ? c : QK_CHUNK;
}

typedef struct {
    int32_t bits;  /* 4 or 8 */
    int32_t n, k;  /* out, in */
    int32_t g;     /* group size; INT8: 0 = per channel */
    int32_t has_zp;
    int32_t pad_;
    const uint8_t *qw;
    const uint16_t *sc;
    const uint8_t *zp;
    int64_t qw_es, sc_es, zp_es; /* per-expert strides, in elements of each tensor */
} qk_mat;

/* ---------------------------------------------------------------- dispatch */

static int g_isa = -1; /* tier in force: 0 scalar, 1 AVX2+FMA+F16C, 2 AVX2 + AVX-VNNI */
/* software prefetch distance ahead of the weight row being read: far enough to cover DRAM latency at the ~8 GB/s one
 * core streams (measured: 16 KiB gave the best linear GB/s on the 2-core build machine, 4-64 KiB within 5 %) */
#define PF 16384

static int detect_isa(void) {
#ifdef QK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return __builtin_cpu_supports("avxvnni") ? 2 : 1;
#endif
    return 0;
}

/* the best tier this CPU has */
int qk_best_isa(void) { return detect_isa(); }

int qk_isa(void) {
    if (g_isa < 0) g_isa = detect_isa();
    return g_isa;
}

/* cap the tier (tests, EDGE_VL2_CPU_ISA); returns the tier in force (never above what the CPU has) */
int qk_set_isa(int isa) {
    int best = detect_isa();
    g_isa = isa < 0 ? 0 : (isa < best ? isa : best);
    return g_isa;
}

/* the layout of qk_mat; the wrapper checks it before the first call */
int qk_abi(void) { return (int)sizeof(qk_mat) * 100 + 2; }

/* ---------------------------------------------------------------- helpers */

static inline float h2f_scalar(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            man &= 0x3ff;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int zp_at(const qk_mat *w, const uint8_t *zrow, int grp) {
    if (!w->has_zp) return w->bits == 4 ? 8 : 0;
    uint8_t b = zrow[grp >> 1];
    return (grp & 1) ? (b >> 4) : (b & 15);
}

static inline int n_groups(const qk_mat *w) { return w->g ? w->k / w->g : 1; }
static inline int64_t row_bytes(const qk_mat *w) { return w->bits == 4 ? w->k / 2 : w->k; }
static inline int64_t zrow_len(const qk_mat *w) { return (n_groups(w) + 1) / 2; }

/* activations prepared for one weight format: fp32 (mode 1 / scalar), or int8 blocks + scales (mode 0) */
typedef struct {
    int k;
    int layout;    /* 0 natural; 1 INT4 per 32-block [even16, odd16]; 2 INT4 per 64 [A_even, B_even, A_odd, B_odd];
                      3 the same bytes as 2, for INT4 g32 (each block of the pair its own group) */
    float *xf;     /* [k] fp32 (permuted when perm) */
    int8_t *xq;    /* [k] int8 (permuted when perm) */
    float *xd;     /* [k/32] block scales */
    float *xds;    /* [k/32] d * sum(q) per block (zero-point correction) */
    float *xs;     /* [k/32] sum of fp32 x per block (fp32 zero-point correction) */
    float *xdv;    /* [k/64][8] layout 2: (dA x4, dB x4) per pair of blocks */
} qk_act;

static size_t act_bytes(int k) { return (size_t)k * 4 + (size_t)k + 3 * (size_t)(k / QK_BLK) * 4 + (size_t)(k / 64) * 32 + 64 * 6; }

static void act_init(qk_act *a, int k, char *mem) {
    uintptr_t p = ((uintptr_t)mem + 63) & ~(uintptr_t)63;
    a->k = k;
    a->xf = (float *)p; p += (size_t)k * 4; p = (p + 63) & ~(uintptr_t)63;
    a->xq = (int8_t *)p; p += (size_t)k; p = (p + 63) & ~(uintptr_t)63;
    a->xd = (float *)p; p += (size_t)(k / QK_BLK) * 4; p = (p + 63) & ~(uintptr_t)63;
    a->xds = (float *)p; p += (size_t)(k / QK_BLK) * 4; p = (p + 63) & ~(uintptr_t)63;
    a->xs = (float *)p; p += (size_t)(k / QK_BLK) * 4; p = (p + 63) & ~(uintptr_t)63;
    a->xdv = (float *)p;
}

/* the activation layout a weight format reads in a mode */
static int act_layout(const qk_mat *w, int mode) {
    if (w->bits != 4) return 0;
    if (mode == 0 && w->g % 64 == 0) return 2;
    if (mode == 0 && w->g == 32 && w->k % 64 == 0) return 3; /* g32: the pair kernel with a scale per half */
    return 1;
}

#ifdef QK_X86
static void act_prepare_q8_avx2(qk_act *a, const float *x, int layout);
#endif

/* x (fp32, natural order) -> a, in `layout` (act_layout) for `mode` */
static void act_prepare(qk_act *a, const float *x, int layout, int mode) {
    int k = a->k, nb = k / QK_BLK;
    a->layout = layout;
#ifdef QK_X86
    if (mode == 0 && g_isa >= 1) {
        act_prepare_q8_avx2(a, x, layout);
        return;
    }
#endif
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK_BLK;
        float *xf = a->xf + b * QK_BLK;
        float s = 0.f, amax = 0.f;
        for (int j = 0; j < QK_BLK; j++) {
            int src;
            if (layout == 1) src = j < 16 ? 2 * j : 2 * (j - 16) + 1;
            else if (layout >= 2) { /* position j of this block's 32 slots in the pair layout, see below */
                src = j < 16 ? 2 * j : 2 * (j - 16) + 1;
            } else src = j;
            float v = xb[src];
            xf[j] = v;
            s += v;
            float av = fabsf(v);
            amax = av > amax ? av : amax;
        }
        a->xs[b] = s;
        if (mode == 0) {
            float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int isum = 0;
            for (int j = 0; j < QK_BLK; j++) {
                int q = (int)lrintf(xf[j] * id);
                a->xq[b * QK_BLK + j] = (int8_t)q;
                isum += q;
            }
            a->xd[b] = d;
            a->xds[b] = d * (float)isum;
        }
    }
    if (layout >= 2 && mode == 0) { /* per pair (A, B): [A_even, B_even, A_odd, B_odd] */
        int8_t tmp[64];
        for (int p = 0; p < nb / 2; p++) {
            int8_t *q = a->xq + p * 64;
            memcpy(tmp, q, 64); /* now [A_even, A_odd, B_even, B_odd] */
            memcpy(q + 16, tmp + 32, 16);
            memcpy(q + 32, tmp + 16, 16);
            for (int j = 0; j < 4; j++) {
                a->xdv[p * 8 + j] = a->xd[2 * p];
                a->xdv[p * 8 + 4 + j] = a->xd[2 * p + 1];
            }
        }
    }
}

/* ---------------------------------------------------------------- scalar rows (fp32) */

/* y[r] = dot(W[row0 + r], x) for r in [0, nrows): x natural order fp32 */
static void rows_scalar(const qk_mat *w, int e, int row0, int nrows, const float *x, float *y) {
    int k = w->k, g = w->g, ng = n_groups(w);
    for (int r = 0; r < nrows; r++) {
        int64_t row = row0 + r;
        const uint8_t *qrow = w->qw + e * w->qw_es + row * row_bytes(w);
        const uint16_t *srow = w->sc + e * w->sc_es + row * ng;
        const uint8_t *zrow = w->has_zp ? w->zp + e * w->zp_es + row * zrow_len(w) : NULL;
        float acc = 0.f;
        if (w->bits == 4) {
            for (int grp = 0; grp < ng; grp++) {
                float s = h2f_scalar(srow[grp]), z = (float)zp_at(w, zrow, grp), ga = 0.f;
                for (int j = grp * g; j < (grp + 1) * g; j++) {
                    int code = (qrow[j >> 1] >> ((j & 1) * 4)) & 15;
                    ga += ((float)code - z) * x[j];
                }
                acc += s * ga;
            }
        } else {
            const int8_t *q = (const int8_t *)qrow;
            if (g == 0) {
                for (int j = 0; j < k; j++) acc += (float)q[j] * x[j];
                acc *= h2f_scalar(srow[0]);
            } else {
                for (int grp = 0; grp < ng; grp++) {
                    float ga = 0.f;
                    for (int j = grp * g; j < (grp + 1) * g; j++) ga += (float)q[j] * x[j];
                    acc += h2f_scalar(srow[grp]) * ga;
                }
            }
        }
        y[r] = acc;
    }
}

/* ---------------------------------------------------------------- AVX2 rows */
#ifdef QK_X86
#define AVX2_FN __attribute__((target("avx2,fma,f16c"))) static inline
#define VNNI_FN __attribute__((target("avx2,fma,f16c,avxvnni"))) static inline

AVX2_FN float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_FN __m256i unpack16(const uint8_t *p, __m256i m4) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    __m128i hi = _mm_srli_epi16(raw, 4);
    return _mm256_and_si256(_mm256_set_m128i(hi, raw), m4);
}

/* the 32 bytes of a pair of 32-blocks (layouts 2 and 3) -> low nibbles (A_even, B_even) and high ones (A_odd, B_odd) */
AVX2_FN void unpack_pair(const uint8_t *p, __m256i m4, __m256i *lo, __m256i *hi) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *lo = _mm256_and_si256(v, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
}

AVX2_FN float f16(uint16_t h) { return _cvtsh_ss(h); }

/* exp(x) for x in [-88, 88], Cephes-style range reduction + degree-5 polynomial (rel. err ~2e-7) */
AVX2_FN __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* out[i] = silu(g[i]) * u[i] */
__attribute__((target("avx2,fma,f16c"))) static void swiglu_avx2(const float *g, const float *u, float *out, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(u + i)), den));
    }
    for (; i < n; i++) out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

/* mode-0 activation preparation: int8 per 32-block (round to nearest even, as lrintf), in the layout asked for */
__attribute__((target("avx2,fma,f16c"))) static void act_prepare_q8_avx2(qk_act *a, const float *x, int layout) {
    int nb = a->k / QK_BLK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i eo = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    __m256i prev = _mm256_setzero_si256();
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK_BLK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4), d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        __m256 idv = _mm256_set1_ps(id);
        __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, idv)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, idv));
        __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, idv)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, idv));
        __m256i isv = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
        __m128i is4 = _mm_add_epi32(_mm256_castsi256_si128(isv), _mm256_extracti128_si256(isv, 1));
        is4 = _mm_hadd_epi32(is4, is4);
        is4 = _mm_hadd_epi32(is4, is4);
        __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        q = _mm256_permutevar8x32_epi32(q, fix); /* natural order */
        if (layout >= 1) q = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q, eo), 0xD8); /* [even16, odd16] */
        a->xd[b] = d;
        a->xds[b] = d * (float)_mm_cvtsi128_si32(is4);
        if (layout >= 2) {
            if (b & 1) { /* pair (prev = A, q = B) -> [A_even, B_even], [A_odd, B_odd] */
                int p = b >> 1;
                _mm256_store_si256((__m256i *)(a->xq + p * 64), _mm256_permute2x128_si256(prev, q, 0x20));
                _mm256_store_si256((__m256i *)(a->xq + p * 64 + 32), _mm256_permute2x128_si256(prev, q, 0x31));
                __m256 dv = _mm256_setr_ps(a->xd[b - 1], a->xd[b - 1], a->xd[b - 1], a->xd[b - 1], d, d, d, d);
                _mm256_store_ps(a->xdv + p * 8, dv);
            } else prev = q;
        } else _mm256_store_si256((__m256i *)(a->xq + b * QK_BLK), q);
    }
}

/* The frame every INT4 row kernel shares: R rows' pointers and accumulators; per group a partial sum ga[r]
 * (scaled by the group's weight scale at its end) and the zero-point term sw * z * (the group's activation sum SG) */
#define Q4_ROWS_BEGIN(R)                                                                                             \
    const uint8_t *q[4];                                                                                             \
    const uint16_t *s[4];                                                                                            \
    const uint8_t *z[4];                                                                                             \
    __m256 acc[4];                                                                                                   \
    float corr[4];                                                                                                   \
    for (int r = 0; r < R; r++) {                                                                                    \
        int64_t row = row0 + r;                                                                                      \
        q[r] = w->qw + e * w->qw_es + row * (k / 2);                                                                 \
        s[r] = w->sc + e * w->sc_es + row * ng;                                                                      \
        z[r] = w->has_zp ? w->zp + e * w->zp_es + row * zrl : NULL;                                                  \
        acc[r] = _mm256_setzero_ps();                                                                                \
        corr[r] = 0.f;                                                                                               \
    }
#define Q4_GROUP_BEGIN(R)                                                                                            \
    __m256 ga[4];                                                                                                    \
    for (int r = 0; r < R; r++) ga[r] = _mm256_setzero_ps();
#define Q4_GROUP_END(R, SG)                                                                                          \
    for (int r = 0; r < R; r++) {                                                                                    \
        float sw = f16(s[r][grp]);                                                                                   \
        acc[r] = _mm256_fmadd_ps(ga[r], _mm256_set1_ps(sw), acc[r]);                                                 \
        corr[r] += sw * (float)(z[r] ? zp_at(w, z[r], grp) : 8) * (SG);                                              \
    }
#define Q4_ROWS_END(R)                                                                                               \
    for (int r = 0; r < R; r++) y[r] = hsum8(acc[r]) - corr[r];

/* INT4, int8 activations (layout 1, any group of 32k): R rows at once (R = 1..4) */
#define Q4I8_BODY(R)                                                                                                 \
    {                                                                                                                \
        const __m256i m4 = _mm256_set1_epi8(15);                                                                     \
        const __m256i ones = _mm256_set1_epi16(1);                                                                   \
        Q4_ROWS_BEGIN(R)                                                                                             \
        for (int grp = 0; grp < ng; grp++) {                                                                         \
            Q4_GROUP_BEGIN(R)                                                                                        \
            float sg = 0.f;                                                                                          \
            for (int b = grp * bpg; b < (grp + 1) * bpg; b++) {                                                      \
                __m256i av = _mm256_load_si256((const __m256i *)(a->xq + b * QK_BLK));                               \
                __m256 dv = _mm256_broadcast_ss(a->xd + b);                                                          \
                sg += a->xds[b];                                                                                     \
                for (int r = 0; r < R; r++) {                                                                        \
                    __m256i wv = unpack16(q[r] + b * 16, m4);                                                        \
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), ones);                               \
                    ga[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv, ga[r]);                                       \
                }                                                                                                    \
            }                                                                                                        \
            Q4_GROUP_END(R, sg)                                                                                      \
        }                                                                                                            \
        Q4_ROWS_END(R)                                                                                               \
    }

/* 32 int8 x 32 uint4 products per 32-bit lane group: AVX2 (maddubs, the int16 sums <= 4 * 15 * 127 cannot
 * saturate) or AVX-VNNI (vpdpbusd) */
#define DOT_AVX2(lo, hi, alo, ahi) \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, alo), _mm256_maddubs_epi16(hi, ahi)), ones)
#define DOT_VNNI(lo, hi, alo, ahi) \
    _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, alo), hi, ahi)

/* INT4, int8 activations (layout 2), two 32-blocks (32 weight bytes) per step: one 256-bit load, both nibble halves,
 * one cvt / fma per pair. Needs g % 64 == 0. */
#define Q4I8P_BODY(R, DOT)                                                                                           \
    {                                                                                                                \
        const __m256i m4 = _mm256_set1_epi8(15);                                                                     \
        const __m256i ones = _mm256_set1_epi16(1);                                                                   \
        (void)ones;                                                                                                  \
        const int ppg = bpg / 2;                                                                                     \
        Q4_ROWS_BEGIN(R)                                                                                             \
        for (int grp = 0; grp < ng; grp++) {                                                                         \
            Q4_GROUP_BEGIN(R)                                                                                        \
            float sg = 0.f;                                                                                          \
            for (int p = grp * ppg; p < (grp + 1) * ppg; p++) {                                                      \
                __m256i alo = _mm256_load_si256((const __m256i *)(a->xq + p * 64));                                  \
                __m256i ahi = _mm256_load_si256((const __m256i *)(a->xq + p * 64 + 32));                             \
                __m256 dv = _mm256_load_ps(a->xdv + p * 8);                                                          \
                sg += a->xds[2 * p] + a->xds[2 * p + 1];                                                             \
                for (int r = 0; r < R; r++) {                                                                        \
                    if (!(p & 1)) _mm_prefetch((const char *)(q[r] + p * 32 + PF), _MM_HINT_T0);                     \
                    __m256i lo, hi;                                                                                  \
                    unpack_pair(q[r] + p * 32, m4, &lo, &hi);                                                        \
                    ga[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(lo, hi, alo, ahi)), dv, ga[r]);                   \
                }                                                                                                    \
            }                                                                                                        \
            Q4_GROUP_END(R, sg)                                                                                      \
        }                                                                                                            \
        Q4_ROWS_END(R)                                                                                               \
    }

VNNI_FN void q4i8pv_rows1(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                          int64_t zrl) Q4I8P_BODY(1, DOT_VNNI)
VNNI_FN void q4i8pv_rows4(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                          int64_t zrl) Q4I8P_BODY(4, DOT_VNNI)

AVX2_FN void q4i8p_rows1(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                         int64_t zrl) Q4I8P_BODY(1, DOT_AVX2)
AVX2_FN void q4i8p_rows4(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                         int64_t zrl) Q4I8P_BODY(4, DOT_AVX2)

/* INT4 g32, int8 activations (layout 3 = the bytes of layout 2): as Q4I8P, but the pair's two blocks are two groups,
 * so the weight scales enter per half of the vector (lanes 0-3 block A, 4-7 block B, as the activation scales do)
 * and the zero-point term per block. Without it g32 ran the one-block kernel at half the speed of g64 (1.01 vs
 * 0.50 ms for an 8192 x 1280 weight on one AVX2 thread). */
#define Q4I8P32_BODY(R, DOT)                                                                                         \
    {                                                                                                                \
        const __m256i m4 = _mm256_set1_epi8(15);                                                                     \
        const __m256i ones = _mm256_set1_epi16(1);                                                                   \
        (void)ones;                                                                                                  \
        (void)bpg;                                                                                                   \
        Q4_ROWS_BEGIN(R)                                                                                             \
        for (int p = 0; p < ng / 2; p++) {                                                                           \
            __m256i alo = _mm256_load_si256((const __m256i *)(a->xq + p * 64));                                      \
            __m256i ahi = _mm256_load_si256((const __m256i *)(a->xq + p * 64 + 32));                                 \
            __m256 dv = _mm256_load_ps(a->xdv + p * 8);                                                              \
            float sga = a->xds[2 * p], sgb = a->xds[2 * p + 1];                                                      \
            for (int r = 0; r < R; r++) {                                                                            \
                if (!(p & 1)) _mm_prefetch((const char *)(q[r] + p * 32 + PF), _MM_HINT_T0);                         \
                __m256i lo, hi;                                                                                      \
                unpack_pair(q[r] + p * 32, m4, &lo, &hi);                                                            \
                float swa = f16(s[r][2 * p]), swb = f16(s[r][2 * p + 1]);                                            \
                __m256 sv = _mm256_mul_ps(dv, _mm256_set_m128(_mm_set1_ps(swb), _mm_set1_ps(swa)));                  \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(lo, hi, alo, ahi)), sv, acc[r]);                     \
                corr[r] += swa * (float)(z[r] ? zp_at(w, z[r], 2 * p) : 8) * sga                                     \
                         + swb * (float)(z[r] ? zp_at(w, z[r], 2 * p + 1) : 8) * sgb;                                \
            }                                                                                                        \
        }                                                                                                            \
        Q4_ROWS_END(R)                                                                                               \
    }

VNNI_FN void q4i8p32v_rows1(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                            int64_t zrl) Q4I8P32_BODY(1, DOT_VNNI)
VNNI_FN void q4i8p32v_rows4(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                            int64_t zrl) Q4I8P32_BODY(4, DOT_VNNI)
AVX2_FN void q4i8p32_rows1(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                           int64_t zrl) Q4I8P32_BODY(1, DOT_AVX2)
AVX2_FN void q4i8p32_rows4(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                           int64_t zrl) Q4I8P32_BODY(4, DOT_AVX2)

AVX2_FN void q4i8_rows1(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                        int64_t zrl) Q4I8_BODY(1)
AVX2_FN void q4i8_rows4(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                        int64_t zrl) Q4I8_BODY(4)


/* INT4 pair kernel for C activation rows at once (small batches): 2 weight rows x C activations, the weight unpacked
 * once per pair and reused C times; the block scale is folded per pair (dv * s_w), so no per-group accumulators. */
#define Q4I8PT_BODY(C, DOT)                                                                                          \
    {                                                                                                                \
        const __m256i m4 = _mm256_set1_epi8(15);                                                                     \
        const __m256i ones = _mm256_set1_epi16(1);                                                                   \
        (void)ones;                                                                                                  \
        const int pf = PF, ppg = bpg / 2;                                                                          \
        const uint8_t *q0 = w->qw + e * w->qw_es + row0 * (k / 2), *q1 = q0 + k / 2;                                 \
        const uint16_t *s0 = w->sc + e * w->sc_es + row0 * ng, *s1 = s0 + ng;                                        \
        const uint8_t *z0 = w->has_zp ? w->zp + e * w->zp_es + row0 * zrl : NULL, *z1 = z0 ? z0 + zrl : NULL;        \
        __m256 acc0[C], acc1[C];                                                                                     \
        float corr0[C], corr1[C];                                                                                    \
        for (int c = 0; c < C; c++) {                                                                                \
            acc0[c] = acc1[c] = _mm256_setzero_ps();                                                                 \
            corr0[c] = corr1[c] = 0.f;                                                                               \
        }                                                                                                            \
        for (int grp = 0; grp < ng; grp++) {                                                                         \
            float sw0 = f16(s0[grp]), sw1 = f16(s1[grp]);                                                            \
            __m256 w0 = _mm256_set1_ps(sw0), w1 = _mm256_set1_ps(sw1);                                               \
            float zz0 = sw0 * (float)(z0 ? zp_at(w, z0, grp) : 8), zz1 = sw1 * (float)(z1 ? zp_at(w, z1, grp) : 8);   \
            for (int p = grp * ppg; p < (grp + 1) * ppg; p++) {                                                      \
                if (pf && !(p & 1)) {                                                                                \
                    _mm_prefetch((const char *)(q0 + p * 32 + pf), _MM_HINT_T0);                                     \
                    _mm_prefetch((const char *)(q1 + p * 32 + pf), _MM_HINT_T0);                                     \
                }                                                                                                    \
                __m256i lo0, hi0, lo1, hi1;                                                                          \
                unpack_pair(q0 + p * 32, m4, &lo0, &hi0);                                                            \
                unpack_pair(q1 + p * 32, m4, &lo1, &hi1);                                                            \
                for (int c = 0; c < C; c++) {                                                                        \
                    const qk_act *a = acts[c];                                                                       \
                    __m256i alo = _mm256_load_si256((const __m256i *)(a->xq + p * 64));                              \
                    __m256i ahi = _mm256_load_si256((const __m256i *)(a->xq + p * 64 + 32));                         \
                    __m256 dv = _mm256_load_ps(a->xdv + p * 8);                                                      \
                    acc0[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(lo0, hi0, alo, ahi)), _mm256_mul_ps(dv, w0),    \
                                              acc0[c]);                                                              \
                    acc1[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(lo1, hi1, alo, ahi)), _mm256_mul_ps(dv, w1),    \
                                              acc1[c]);                                                              \
                }                                                                                                    \
            }                                                                                                        \
            for (int c = 0; c < C; c++) {                                                                            \
                float sg = 0.f;                                                                                      \
                for (int b = grp * bpg; b < (grp + 1) * bpg; b++) sg += acts[c]->xds[b];                             \
                corr0[c] += zz0 * sg;                                                                                \
                corr1[c] += zz1 * sg;                                                                                \
            }                                                                                                        \
        }                                                                                                            \
        for (int c = 0; c < C; c++) {                                                                                \
            ys[c][0] = hsum8(acc0[c]) - corr0[c];                                                                    \
            ys[c][1] = hsum8(acc1[c]) - corr1[c];                                                                    \
        }                                                                                                            \
    }
#define TILE_ARGS const qk_mat *w, int e, int64_t row0, const qk_act *const *acts, float *const *ys, int k, int ng, \
                  int bpg, int64_t zrl
AVX2_FN void q4i8pt2(TILE_ARGS) Q4I8PT_BODY(2, DOT_AVX2)
AVX2_FN void q4i8pt3(TILE_ARGS) Q4I8PT_BODY(3, DOT_AVX2)
AVX2_FN void q4i8pt4(TILE_ARGS) Q4I8PT_BODY(4, DOT_AVX2)
VNNI_FN void q4i8ptv2(TILE_ARGS) Q4I8PT_BODY(2, DOT_VNNI)
VNNI_FN void q4i8ptv3(TILE_ARGS) Q4I8PT_BODY(3, DOT_VNNI)
VNNI_FN void q4i8ptv4(TILE_ARGS) Q4I8PT_BODY(4, DOT_VNNI)

/* INT4, fp32 activations (weight-only): R rows */
#define Q4F_BODY(R)                                                                                                  \
    {                                                                                                                \
        const __m256i m4 = _mm256_set1_epi8(15);                                                                     \
        Q4_ROWS_BEGIN(R)                                                                                             \
        for (int grp = 0; grp < ng; grp++) {                                                                         \
            Q4_GROUP_BEGIN(R)                                                                                        \
            float xsg = 0.f;                                                                                         \
            for (int b = grp * bpg; b < (grp + 1) * bpg; b++) {                                                      \
                const float *xf = a->xf + b * QK_BLK;                                                                \
                __m256 x0 = _mm256_load_ps(xf), x1 = _mm256_load_ps(xf + 8);                                         \
                __m256 x2 = _mm256_load_ps(xf + 16), x3 = _mm256_load_ps(xf + 24);                                   \
                xsg += a->xs[b];                                                                                     \
                for (int r = 0; r < R; r++) {                                                                        \
                    if (!(b & 3)) _mm_prefetch((const char *)(q[r] + b * 16 + PF), _MM_HINT_T0);                     \
                    __m256i wv = unpack16(q[r] + b * 16, m4);                                                        \
                    __m128i lo = _mm256_castsi256_si128(wv), hi = _mm256_extracti128_si256(wv, 1);                   \
                    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));                                        \
                    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));                     \
                    __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));                                        \
                    __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));                     \
                    __m256 t = _mm256_fmadd_ps(w0, x0, _mm256_mul_ps(w1, x1));                                       \
                    t = _mm256_fmadd_ps(w2, x2, t);                                                                  \
                    ga[r] = _mm256_add_ps(ga[r], _mm256_fmadd_ps(w3, x3, t));                                        \
                }                                                                                                    \
            }                                                                                                        \
            Q4_GROUP_END(R, xsg)                                                                                     \
        }                                                                                                            \
        Q4_ROWS_END(R)                                                                                               \
    }

AVX2_FN void q4f_rows1(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                       int64_t zrl) Q4F_BODY(1)
AVX2_FN void q4f_rows4(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg,
                       int64_t zrl) Q4F_BODY(4)

/* INT8 weights, int8 activations: R rows. Per channel (g == 0) or per group. */
#define Q8I8_BODY(R)                                                                                                 \
    {                                                                                                                \
        const __m256i ones = _mm256_set1_epi16(1);                                                                   \
        const int pf = PF;                                                                                         \
        const int8_t *q[4];                                                                                          \
        const uint16_t *s[4];                                                                                        \
        __m256 acc[4];                                                                                               \
        for (int r = 0; r < R; r++) {                                                                                \
            int64_t row = row0 + r;                                                                                  \
            q[r] = (const int8_t *)w->qw + e * w->qw_es + row * k;                                                   \
            s[r] = w->sc + e * w->sc_es + row * ng;                                                                  \
            acc[r] = _mm256_setzero_ps();                                                                            \
        }                                                                                                            \
        for (int grp = 0; grp < ng; grp++) {                                                                         \
            __m256 ga[4];                                                                                            \
            for (int r = 0; r < R; r++) ga[r] = _mm256_setzero_ps();                                                 \
            for (int b = grp * bpg; b < (grp + 1) * bpg; b++) {                                                      \
                __m256i av = _mm256_load_si256((const __m256i *)(a->xq + b * QK_BLK));                               \
                __m256 dv = _mm256_broadcast_ss(a->xd + b);                                                          \
                for (int r = 0; r < R; r++) {                                                                        \
                    if (pf && (b & 1)) _mm_prefetch((const char *)(q[r] + b * QK_BLK + pf), _MM_HINT_T0);           \
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(q[r] + b * QK_BLK));                           \
                    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv));            \
                    p = _mm256_madd_epi16(p, ones);                                                                  \
                    ga[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv, ga[r]);                                       \
                }                                                                                                    \
            }                                                                                                        \
            for (int r = 0; r < R; r++) acc[r] = _mm256_fmadd_ps(ga[r], _mm256_set1_ps(f16(s[r][grp])), acc[r]);    \
        }                                                                                                            \
        for (int r = 0; r < R; r++) y[r] = hsum8(acc[r]);                                                            \
    }

AVX2_FN void q8i8_rows1(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg)
    Q8I8_BODY(1)
AVX2_FN void q8i8_rows4(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg)
    Q8I8_BODY(4)

/* INT8 weights, fp32 activations */
AVX2_FN void q8f_rows1(const qk_mat *w, int e, int64_t row0, const qk_act *a, float *y, int k, int ng, int bpg) {
    const int8_t *q = (const int8_t *)w->qw + e * w->qw_es + row0 * k;
    const uint16_t *s = w->sc + e * w->sc_es + row0 * ng;
    __m256 acc = _mm256_setzero_ps();
    for (int grp = 0; grp < ng; grp++) {
        __m256 ga0 = _mm256_setzero_ps(), ga1 = _mm256_setzero_ps();
        for (int j = grp * bpg * QK_BLK; j < (grp + 1) * bpg * QK_BLK; j += 16) {
            __m128i wv = _mm_loadu_si128((const __m128i *)(q + j));
            ga0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(wv)), _mm256_load_ps(a->xf + j), ga0);
            ga1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(wv, 8))),
                                  _mm256_load_ps(a->xf + j + 8), ga1);
        }
        acc = _mm256_fmadd_ps(_mm256_add_ps(ga0, ga1), _mm256_set1_ps(f16(s[grp])), acc);
    }
    y[0] = hsum8(acc);
}
#endif /* QK_X86 */

/* y[0:nrows] = W[e][row0 : row0+nrows] @ x; `a` prepared for w's format; xnat = natural-order fp32 x (scalar) */
static void mat_rows(const qk_mat *w, int e, int64_t row0, int64_t nrows, const qk_act *a, const float *xnat,
                     float *y, int mode) {
#ifdef QK_X86
    if (g_isa >= 1) {
        int k = w->k, ng = n_groups(w), bpg = (w->g ? w->g : k) / QK_BLK;
        int64_t zrl = zrow_len(w), r = 0;
        if (w->bits == 4) {
            if (mode == 0 && a->layout == 2 && g_isa == 2) {
                for (; r + 4 <= nrows; r += 4) q4i8pv_rows4(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
                for (; r < nrows; r++) q4i8pv_rows1(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
            } else if (mode == 0 && a->layout == 2) {
                for (; r + 4 <= nrows; r += 4) q4i8p_rows4(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
                for (; r < nrows; r++) q4i8p_rows1(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
            } else if (mode == 0 && a->layout == 3 && g_isa == 2) {
                for (; r + 4 <= nrows; r += 4) q4i8p32v_rows4(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
                for (; r < nrows; r++) q4i8p32v_rows1(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
            } else if (mode == 0 && a->layout == 3) {
                for (; r + 4 <= nrows; r += 4) q4i8p32_rows4(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
                for (; r < nrows; r++) q4i8p32_rows1(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
            } else if (mode == 0) {
                for (; r + 4 <= nrows; r += 4) q4i8_rows4(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
                for (; r < nrows; r++) q4i8_rows1(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
            } else {
                for (; r + 4 <= nrows; r += 4) q4f_rows4(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
                for (; r < nrows; r++) q4f_rows1(w, e, row0 + r, a, y + r, k, ng, bpg, zrl);
            }
        } else {
            if (mode == 0) {
                for (; r + 4 <= nrows; r += 4) q8i8_rows4(w, e, row0 + r, a, y + r, k, ng, bpg);
                for (; r < nrows; r++) q8i8_rows1(w, e, row0 + r, a, y + r, k, ng, bpg);
            } else {
                for (; r < nrows; r++) q8f_rows1(w, e, row0 + r, a, y + r, k, ng, bpg);
            }
        }
        return;
    }
#endif
    rows_scalar(w, e, (int)row0, (int)nrows, xnat, y);
}


/* ys[c][0:nrows] = W[e][row0 : row0+nrows] @ x_c for c < C (C activations of one weight): the INT4 pair path
 * reads each weight row once for up to 4 activations; other formats loop over the activations. */
static void mat_rows_multi(const qk_mat *w, int e, int64_t row0, int64_t nrows, const qk_act *const *acts,
                           const float *const *xnat, float *const *ys, int C, int mode) {
#ifdef QK_X86
    if (g_isa >= 1 && w->bits == 4 && mode == 0 && acts[0]->layout == 2 && C >= 2) {
        int k = w->k, ng = n_groups(w), bpg = w->g / QK_BLK;
        int64_t zrl = zrow_len(w);
        for (int c0 = 0; c0 < C; c0 += 4) {
            int cc = C - c0 < 4 ? C - c0 : 4;
            if (cc == 1) {
                mat_rows(w, e, row0, nrows, acts[c0], xnat[c0], ys[c0], mode);
                continue;
            }
            int64_t r = 0;
            for (; r + 2 <= nrows; r += 2) {
                float *yy[4];
                for (int c = 0; c < cc; c++) yy[c] = ys[c0 + c] + r;
                const qk_act *const *aa = acts + c0;
                if (g_isa == 2) {
                    if (cc == 2) q4i8ptv2(w, e, row0 + r, aa, yy, k, ng, bpg, zrl);
                    else if (cc == 3) q4i8ptv3(w, e, row0 + r, aa, yy, k, ng, bpg, zrl);
                    else q4i8ptv4(w, e, row0 + r, aa, yy, k, ng, bpg, zrl);
                } else {
                    if (cc == 2) q4i8pt2(w, e, row0 + r, aa, yy, k, ng, bpg, zrl);
                    else if (cc == 3) q4i8pt3(w, e, row0 + r, aa, yy, k, ng, bpg, zrl);
                    else q4i8pt4(w, e, row0 + r, aa, yy, k, ng, bpg, zrl);
                }
            }
            for (int c = 0; c < cc && r < nrows; c++)
                mat_rows(w, e, row0 + r, nrows - r, acts[c0 + c], xnat[c0 + c], ys[c0 + c] + r, mode);
        }
        return;
    }
#endif
    for (int c = 0; c < C; c++) mat_rows(w, e, row0, nrows, acts[c], xnat[c], ys[c], mode);
}


/* software-prefetch the first `bytes` of W[e]'s rows [lo, hi) (and their scales): issued one matrix ahead in the
 * MoE step, so each of the ~14 matrices of a layer does not start with a cold, un-prefetched stretch */
static void prefetch_rows(const qk_mat *w, int e, int64_t lo, int64_t hi, int64_t bytes) {
#ifdef QK_X86
    if (g_isa < 1 || hi <= lo || bytes <= 0) return;
    int64_t rb = row_bytes(w), span = (hi - lo) * rb;
    const char *base = (const char *)w->qw + e * w->qw_es + lo * rb;
    if (bytes > span) bytes = span;
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(base + off, _MM_HINT_T0);
    const char *sb = (const char *)(w->sc + e * w->sc_es + lo * n_groups(w));
    int64_t sbytes = (hi - lo) * n_groups(w) * 2;
    if (sbytes > bytes / 16) sbytes = bytes / 16;
    for (int64_t off = 0; off < sbytes; off += 64) _mm_prefetch(sb + off, _MM_HINT_T0);
#else
    (void)w; (void)e; (void)lo; (void)hi; (void)bytes;
#endif
}

static int mat_ok(const qk_mat *w) {
    if (w->k % QK_BLK) return 0;
    if (w->bits == 4) return w->g >= QK_BLK && w->g % QK_BLK == 0 && w->k % w->g == 0;
    if (w->bits == 8) return w->g == 0 || (w->g % QK_BLK == 0 && w->k % w->g == 0);
    return 0;
}

/* this thread's index and the team size inside an OpenMP parallel region (0 of 1 without OpenMP) */
static inline void team(int *t, int *T) {
#ifdef _OPENMP
    *t = omp_get_thread_num();
    *T = omp_get_num_threads();
#else
    *t = 0;
    *T = 1;
#endif
}

static inline void part(int64_t n, int nt, int t, int64_t *lo, int64_t *hi) {
    /* contiguous ranges, multiples of 4 rows except the last */
    int64_t quads = (n + 3) / 4, per = quads / nt, rem = quads % nt;
    int64_t q0 = t * per + (t < rem ? t : rem), q1 = q0 + per + (t < rem ? 1 : 0);
    *lo = q0 * 4 < n ? q0 * 4 : n;
    *hi = q1 * 4 < n ? q1 * 4 : n;
}

#ifdef QK_X86
__attribute__((target("avx2"))) static void bf16_row_avx2(const uint16_t *p, int k, float *dst) {
    int j = 0;
    for (; j + 8 <= k; j += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + j)));
        _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; j < k; j++) dst[j] = bf2f(p[j]);
}
#endif

static void load_row_f32(const void *x, int xbf16, int64_t off, int k, float *dst) {
#ifdef QK_X86
    if (xbf16 && g_isa >= 1) {
        bf16_row_avx2((const uint16_t *)x + off, k, dst);
        return;
    }
#endif
    if (xbf16) {
        const uint16_t *p = (const uint16_t *)x + off;
        for (int j = 0; j < k; j++) dst[j] = bf2f(p[j]);
    } else memcpy(dst, (const float *)x + off, (size_t)k * 4);
}

/* ---------------------------------------------------------------- public: linear */

/* y[M, N1 + ... + Nw] (fp32) = x[M, K] (fp32 or bf16) @ [W1[e]; ...; Ww[e]]^T: several weights of one input (a
 * layer's q, k, v projections) in one call, the activations prepared once. The weights must share K and the
 * activation layout. Returns 0, -1 an unsupported format, -2 out of memory, -3 weights that do not share K. */
int qk_linear_many(const qk_mat *const *ws, int nw, int e, const void *x, int xbf16, int m, float *y, int nthreads,
                   int mode) {
    if (qk_isa() < 0 || nw < 1) return -1;
    int k = ws[0]->k, layout = act_layout(ws[0], mode);
    int64_t ntot = 0, nchunks = 0;
    for (int i = 0; i < nw; i++) {
        if (!mat_ok(ws[i])) return -1;
        if (ws[i]->k != k || act_layout(ws[i], mode) != layout) return -3;
        ntot += ws[i]->n;
        nchunks += (ws[i]->n + chunk_rows(ws[i]->n) - 1) / chunk_rows(ws[i]->n);
    }
    size_t ab = act_bytes(k);
    char *mem = (char *)malloc((size_t)m * (ab + (size_t)k * 4 + 64));
    qk_act *acts = (qk_act *)malloc(sizeof(qk_act) * m);
    float **xnat = (float **)malloc(sizeof(float *) * m);
    int *cw = (int *)malloc(sizeof(int) * nchunks);          /* chunk -> its weight */
    int64_t *cr = (int64_t *)malloc(sizeof(int64_t) * nchunks), *off = (int64_t *)malloc(sizeof(int64_t) * nw);
    if (!mem || !acts || !xnat || !cw || !cr || !off) {
        free(mem); free(acts); free(xnat); free(cw); free(cr); free(off);
        return -2;
    }
    for (int i = 0, c = 0; i < nw; i++) {
        off[i] = i ? off[i - 1] + ws[i - 1]->n : 0;
        for (int64_t r = 0; r < ws[i]->n; r += chunk_rows(ws[i]->n), c++) { cw[c] = i; cr[c] = r; }
    }
    for (int i = 0; i < m; i++) {
        char *base = mem + (size_t)i * (ab + (size_t)k * 4 + 64);
        act_init(&acts[i], k, base);
        xnat[i] = (float *)(((uintptr_t)(base + ab) + 63) & ~(uintptr_t)63);
        load_row_f32(x, xbf16, (int64_t)i * k, k, xnat[i]);
        if (g_isa >= 1) act_prepare(&acts[i], xnat[i], layout, mode);
    }
    /* rows in chunks so a chunk of weights stays in cache across the m activation rows; the chunks are handed out
     * dynamically (see QK_CHUNK) */
    const int64_t CH = 16;
    int nt = nthreads < 1 ? 1 : nthreads;
    (void)nt; /* unused without OpenMP */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *tmp = (float *)malloc(sizeof(float) * CH * m);
        const qk_act **ap = (const qk_act **)malloc(sizeof(void *) * m);
        const float **xp = (const float **)malloc(sizeof(void *) * m);
        float **yp = (float **)malloc(sizeof(void *) * m);
        for (int i = 0; i < m; i++) { ap[i] = &acts[i]; xp[i] = xnat[i]; yp[i] = tmp + (int64_t)i * CH; }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < nchunks; c++) {
            const qk_mat *w = ws[cw[c]];
            int64_t hi = cr[c] + chunk_rows(w->n) < w->n ? cr[c] + chunk_rows(w->n) : w->n;
            for (int64_t r0 = cr[c]; r0 < hi; r0 += CH) {
                int64_t nr = hi - r0 < CH ? hi - r0 : CH;
                mat_rows_multi(w, e, r0, nr, ap, xp, yp, m, mode);
                for (int i = 0; i < m; i++) memcpy(y + (int64_t)i * ntot + off[cw[c]] + r0, yp[i], (size_t)nr * 4);
            }
        }
        free(yp); free(xp); free(ap); free(tmp);
    }
    free(off); free(cr); free(cw);
    free(xnat);
    free(acts);
    free(mem);
    return 0;
}

/* y[M, N] (fp32) = x[M, K] (fp32 or bf16) @ W[e]^T. Returns 0, or -1 for an unsupported shape. */
int qk_linear(const qk_mat *w, int e, const void *x, int xbf16, int m, float *y, int nthreads, int mode) {
    return qk_linear_many(&w, 1, e, x, xbf16, m, y, nthreads, mode);
}

/* ---------------------------------------------------------------- public: dequantize rows */

static void dequant_row_scalar(const qk_mat *w, int e, int64_t row, float *out) {
    int k = w->k, g = w->g ? w->g : k, ng = n_groups(w);
    const uint8_t *qrow = w->qw + e * w->qw_es + row * row_bytes(w);
    const uint16_t *srow = w->sc + e * w->sc_es + row * ng;
    const uint8_t *zrow = w->has_zp ? w->zp + e * w->zp_es + row * zrow_len(w) : NULL;
    for (int grp = 0; grp < ng; grp++) {
        float s = h2f_scalar(srow[grp]);
        if (w->bits == 4) {
            float z = (float)zp_at(w, zrow, grp);
            for (int j = grp * g; j < (grp + 1) * g; j++)
                out[j] = ((float)((qrow[j >> 1] >> ((j & 1) * 4)) & 15) - z) * s;
        } else {
            for (int j = grp * g; j < (grp + 1) * g; j++) out[j] = (float)((const int8_t *)qrow)[j] * s;
        }
    }
}

#ifdef QK_X86
/* (code - z) * s for 32 codes in natural order, from 16 packed bytes */
__attribute__((target("avx2,fma,f16c"))) static void dequant_row_avx2(const qk_mat *w, int e, int64_t row, float *out) {
    int k = w->k, g = w->g ? w->g : k, ng = n_groups(w);
    const uint8_t *qrow = w->qw + e * w->qw_es + row * row_bytes(w);
    const uint16_t *srow = w->sc + e * w->sc_es + row * ng;
    const uint8_t *zrow = w->has_zp ? w->zp + e * w->zp_es + row * zrow_len(w) : NULL;
    const __m128i m4 = _mm_set1_epi8(15);
    for (int grp = 0; grp < ng; grp++) {
        float s = _cvtsh_ss(srow[grp]);
        __m256 sv = _mm256_set1_ps(s);
        if (w->bits == 4) {
            __m256 off = _mm256_set1_ps(-s * (float)zp_at(w, zrow, grp));
            for (int j = grp * g; j < (grp + 1) * g; j += 32) {
                __m128i raw = _mm_loadu_si128((const __m128i *)(qrow + j / 2));
                __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
                __m128i a = _mm_unpacklo_epi8(lo, hi), b = _mm_unpackhi_epi8(lo, hi); /* elements 0..15, 16..31 */
                __m128i parts[4] = {a, _mm_srli_si128(a, 8), b, _mm_srli_si128(b, 8)};
                for (int p = 0; p < 4; p++) {
                    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
                    _mm256_storeu_ps(out + j + 8 * p, _mm256_fmadd_ps(v, sv, off));
                }
            }
        } else {
            const int8_t *q = (const int8_t *)qrow;
            for (int j = grp * g; j < (grp + 1) * g; j += 16) {
                __m128i raw = _mm_loadu_si128((const __m128i *)(q + j));
                _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), sv));
                _mm256_storeu_ps(out + j + 8,
                                 _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))), sv));
            }
        }
    }
}
#endif

/* out[r, 0:K] (fp32) = rows [row0, row0 + nrows) of W[e], dequantized: the many-row (prefill) path multiplies them
 * with an fp32 GEMM. Returns 0, or -1 for an unsupported format. */
int qk_dequant(const qk_mat *w, int e, int64_t row0, int64_t nrows, float *out, int nthreads) {
    if (qk_isa() < 0 || !mat_ok(w) || row0 < 0 || row0 + nrows > w->n) return -1;
    int nt = nthreads < 1 ? 1 : nthreads;
    (void)nt; /* unused without OpenMP */
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t r = 0; r < nrows; r++) {
#ifdef QK_X86
        if (g_isa >= 1) {
            dequant_row_avx2(w, e, row0 + r, out + r * w->k);
            continue;
        }
#endif
        dequant_row_scalar(w, e, row0 + r, out + r * w->k);
    }
    return 0;
}

/* ---------------------------------------------------------------- public: one MoE step */

static inline float silu(float v) { return v / (1.f + expf(-v)); }

/* one (token, expert) pair of a step, or a token's shared experts */
typedef struct {
    const qk_mat *gate, *up, *dn; /* up NULL: gate holds [gate; up] rows (2 * inter) */
    int e, t, inter, act;          /* act: which prepared activation of token t (0 routed format, 1 shared) */
    float wgt;
} slot_t;

/* the matrix and its local row for row r of a slot's stacked [gate; up] output */
static inline const qk_mat *gu_row(const slot_t *s, int64_t r, int64_t *local) {
    if (s->up && r >= s->inter) { *local = r - s->inter; return s->up; }
    *local = r;
    return s->gate;
}

/* rows [lo, hi) of the slot's stacked [gate; up] output, prefetched ahead of the job that reads them */
static void prefetch_gu(const slot_t *s, int64_t lo, int64_t hi) {
    int64_t l;
    const qk_mat *m = gu_row(s, lo, &l);
    int64_t end = l + (hi - lo);
    prefetch_rows(m, s->e, l, end < m->n ? end : m->n, PF);
}

static int gate_up_ok(const qk_mat *g, const qk_mat *u, int H, int *inter) {
    if (!mat_ok(g) || g->k != H) return 0;
    if (!u) { *inter = g->n / 2; return g->n % 2 == 0; }
    *inter = g->n;
    return mat_ok(u) && u->k == H && u->n == g->n && u->bits == g->bits && u->g == g->g;
}

/* out[T, H] (fp32) = sum_j rw[t, j] * Expert_{ids[t, j]}(x[t]) (+ Shared(x[t]) when sgate is given).
 * Routed: gate/up [E, I, H] (or gate alone [E, 2I, H], gate rows first, up NULL), dn [E, H, I]; shared (expert 0 of
 * each): sgate/sup [Is, H] (or sgate [2Is, H], sup NULL), sdn [H, Is]. x: [T, H] fp32 or bf16. Phases: gate+up of
 * every slot, SiLU(gate) * up, down with the weighted sum; a (matrix, expert) chosen by several tokens is read once.
 * Returns 0, -1 an unsupported format, -2 out of memory, -3 shapes that do not fit. */
int qk_moe(const qk_mat *gate, const qk_mat *up, const qk_mat *dn, const qk_mat *sgate, const qk_mat *sup,
           const qk_mat *sdn, const void *x, int xbf16, int T, const int64_t *ids, const float *rw, int kslots,
           float *out, int nthreads, int mode) {
    if (qk_isa() < 0) return -1;
    int H = gate->k, I = 0, Is = 0;
    if (!gate_up_ok(gate, up, H, &I) || !mat_ok(dn)) return -1;
    if (sgate && (!gate_up_ok(sgate, sup, H, &Is) || !sdn || !mat_ok(sdn))) return -1;
    if (dn->n != H || dn->k != I || (sgate && (sdn->n != H || sdn->k != Is))) return -3;
    int ns = T * kslots + (sgate ? T : 0);
    int Imax = I > Is ? I : Is;
    size_t abH = act_bytes(H), abI = act_bytes(Imax);
    /* workspace: per token: x fp32 + activations for the routed and shared formats; per slot: gate+up out [2I], the
     * down projection's activation, SiLU * up [I] */
    size_t per_tok = (size_t)H * 4 + 64 + 2 * abH, per_slot = (size_t)2 * Imax * 4 + 64 + abI + (size_t)Imax * 4 + 64;
    char *mem = (char *)malloc((size_t)T * per_tok + (size_t)ns * per_slot + 64);
    slot_t *sl = (slot_t *)malloc(sizeof(slot_t) * ns);
    qk_act *ax = (qk_act *)malloc(sizeof(qk_act) * 2 * T), *ah = (qk_act *)malloc(sizeof(qk_act) * ns);
    float **xn = (float **)malloc(sizeof(float *) * T), **hb = (float **)malloc(sizeof(float *) * ns);
    float **hn = (float **)malloc(sizeof(float *) * ns);
    int *order = (int *)malloc(sizeof(int) * ns), *jstart = (int *)malloc(sizeof(int) * (ns + 1));
    char *done = (char *)calloc(ns, 1);
    if (!mem || !sl || !ax || !ah || !xn || !hb || !hn || !order || !jstart || !done) {
        free(mem); free(sl); free(ax); free(ah); free(xn); free(hb); free(hn); free(order); free(jstart); free(done);
        return -2;
    }
    for (int t = 0; t < T; t++) {
        char *base = mem + (size_t)t * per_tok;
        xn[t] = (float *)(((uintptr_t)base + 63) & ~(uintptr_t)63);
        load_row_f32(x, xbf16, (int64_t)t * H, H, xn[t]);
        act_init(&ax[2 * t], H, base + (size_t)H * 4 + 64);
        act_init(&ax[2 * t + 1], H, base + (size_t)H * 4 + 64 + abH);
        if (g_isa >= 1) {
            act_prepare(&ax[2 * t], xn[t], act_layout(gate, mode), mode);
            if (sgate) act_prepare(&ax[2 * t + 1], xn[t], act_layout(sgate, mode), mode);
        }
        memset(out + (int64_t)t * H, 0, (size_t)H * 4);
    }
    for (int s = 0; s < ns; s++) {
        char *base = mem + (size_t)T * per_tok + (size_t)s * per_slot;
        hb[s] = (float *)(((uintptr_t)base + 63) & ~(uintptr_t)63);
        act_init(&ah[s], Imax, base + (size_t)2 * Imax * 4 + 64);
        hn[s] = (float *)(((uintptr_t)(base + (size_t)2 * Imax * 4 + 64 + abI) + 63) & ~(uintptr_t)63);
        slot_t *p = &sl[s];
        if (s < T * kslots) {
            p->gate = gate; p->up = up; p->dn = dn; p->e = (int)ids[s]; p->t = s / kslots; p->inter = I;
            p->act = 0; p->wgt = rw[s];
        } else {
            p->gate = sgate; p->up = sup; p->dn = sdn; p->e = 0; p->t = s - T * kslots; p->inter = Is;
            p->act = 1; p->wgt = 1.f;
        }
        ah[s].k = p->inter;
    }
    /* jobs: slots grouped by (matrix, expert), so an expert chosen by several tokens is read once per step */
    int nj = 0, pos = 0;
    for (int s = 0; s < ns; s++) {
        if (done[s]) continue;
        jstart[nj++] = pos;
        for (int u = s; u < ns; u++)
            if (!done[u] && sl[u].gate == sl[s].gate && sl[u].e == sl[s].e) { order[pos++] = u; done[u] = 1; }
    }
    jstart[nj] = pos;
    free(done);
    const int64_t CH = 16;
    int nt = nthreads < 1 ? 1 : nthreads;
    (void)nt; /* unused without OpenMP */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int th, TH;
        team(&th, &TH);
        /* 1: gate+up of every job, this thread's share of the rows; a chunk of rows serves all the job's tokens */
        for (int j = 0; j < nj; j++) {
            const slot_t *s0 = &sl[order[jstart[j]]];
            int64_t lo, hi;
            part(2 * s0->inter, TH, th, &lo, &hi);
            { /* the next matrix's start: the next job's gate+up, or the first job's down */
                const slot_t *s1 = &sl[order[jstart[(j + 1) % nj]]];
                int64_t l1, h1;
                if (j + 1 < nj) { part(2 * s1->inter, TH, th, &l1, &h1); if (h1 > l1) prefetch_gu(s1, l1, h1); }
                else { part(H, TH, th, &l1, &h1); prefetch_rows(s1->dn, s1->e, l1, h1, PF); }
            }
            int C = jstart[j + 1] - jstart[j];
            const qk_act *ap[C];
            const float *xp[C];
            float *yp[C];
            for (int64_t r0 = lo, nr; r0 < hi; r0 += nr) {
                nr = hi - r0 < CH ? hi - r0 : CH;
                if (s0->up && r0 < s0->inter && r0 + nr > s0->inter) nr = s0->inter - r0; /* one matrix per chunk */
                for (int u = jstart[j]; u < jstart[j + 1]; u++) {
                    int s = order[u], c = u - jstart[j];
                    ap[c] = &ax[2 * sl[s].t + sl[s].act];
                    xp[c] = xn[sl[s].t];
                    yp[c] = hb[s] + r0;
                }
                int64_t local;
                const qk_mat *m = gu_row(s0, r0, &local);
                mat_rows_multi(m, s0->e, local, nr, ap, xp, yp, C, mode);
            }
        }
#pragma omp barrier
        /* 2: SiLU(gate) * up, prepared for the down projection's format */
        for (int s = th; s < ns; s += TH) {
            int in = sl[s].inter;
#ifdef QK_X86
            if (g_isa >= 1) swiglu_avx2(hb[s], hb[s] + in, hn[s], in);
            else
#endif
                for (int i = 0; i < in; i++) hn[s][i] = silu(hb[s][i]) * hb[s][in + i];
            if (g_isa >= 1) act_prepare(&ah[s], hn[s], act_layout(sl[s].dn, mode), mode);
        }
#pragma omp barrier
        /* 3: down of every job, this thread's rows of the output, weighted sum into each token's row */
        {
            int64_t lo, hi;
            part(H, TH, th, &lo, &hi);
            float *tmp = (float *)malloc(sizeof(float) * CH * ns);
            for (int j = 0; j < nj && tmp; j++) {
                int C = jstart[j + 1] - jstart[j];
                const slot_t *s0 = &sl[order[jstart[j]]];
                const qk_act *ap[C];
                const float *xp[C];
                float *yp[C];
                if (j + 1 < nj) {
                    const slot_t *s1 = &sl[order[jstart[j + 1]]];
                    prefetch_rows(s1->dn, s1->e, lo, hi, PF);
                }
                for (int u = jstart[j]; u < jstart[j + 1]; u++) {
                    int s = order[u], c = u - jstart[j];
                    ap[c] = &ah[s];
                    xp[c] = hn[s];
                    yp[c] = tmp + (int64_t)c * CH;
                }
                for (int64_t r0 = lo; r0 < hi; r0 += CH) {
                    int64_t nr = hi - r0 < CH ? hi - r0 : CH;
                    mat_rows_multi(s0->dn, s0->e, r0, nr, ap, xp, yp, C, mode);
                    for (int u = jstart[j]; u < jstart[j + 1]; u++) {
                        int s = order[u], c = u - jstart[j];
                        float *o = out + (int64_t)sl[s].t * H;
                        for (int64_t r = 0; r < nr; r++) o[r0 + r] += sl[s].wgt * yp[c][r];
                    }
                }
            }
            free(tmp);
        }
    }
    free(order); free(jstart);
    free(hn); free(hb); free(xn); free(ah); free(ax); free(sl); free(mem);
    return 0;
}

/* ---------------------------------------------------------------- measurement helpers */

/* read `bytes` (multiple of 256) with nthreads; returns a checksum so nothing is optimised away */
#ifdef QK_X86
__attribute__((target("avx2"))) static uint64_t read_avx2(const uint8_t *p, size_t bytes) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int pf = PF;
    for (size_t i = 0; i < bytes; i += 128) {
        if (pf) {
            _mm_prefetch((const char *)(p + i + pf), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + i + pf + 64), _MM_HINT_T0);
        }
        a0 = _mm256_xor_si256(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    return (uint64_t)_mm256_extract_epi64(a0, 0) ^ (uint64_t)_mm256_extract_epi64(a0, 3);
}
#endif

uint64_t qk_read(const uint8_t *p, int64_t bytes, int nthreads) {
    uint64_t tot = 0;
    int nt = nthreads < 1 ? 1 : nthreads;
    (void)nt; /* unused without OpenMP */
#pragma omp parallel num_threads(nt) reduction(^ : tot) if (nt > 1)
    {
        int t, T;
        team(&t, &T);
        int64_t chunk = (bytes / T) & ~(int64_t)255, lo = t * chunk, hi = t == T - 1 ? bytes : lo + chunk;
#ifdef QK_X86
        if (qk_isa() >= 1) tot ^= read_avx2(p + lo, (size_t)(hi - lo));
        else
#endif
            for (int64_t i = lo; i < hi; i += 8) tot ^= *(const uint64_t *)(p + i);
    }
    return tot;
}

