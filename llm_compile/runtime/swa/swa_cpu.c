/* Sparse window attention's two CPU kernels, compiled and loaded by llm_compile/runtime/swa/native.py:
 * sketch_logits (here) and sparse_attend (below).
 *
 * sketch_logits, the key sketch's logits (issue 15): q . k~ for every sketched token, read from the
 * packed codes, with no float copy of the keys (llm_compile/runtime/swa/sketch.py has the layout).
 *
 *   packed [BH, NBc, D, PB] uint8   byte j of channel d in block i holds the codes of tokens
 *                                   i*BLK + j + s*PB (s = 0 .. 8/bits - 1) at bits s*bits
 *   step, mn [BH, NBc, D] float16   k[t, d] ~ mn[i, d] + code[t, d] * step[i, d]
 *   q [B, H*G, D] float32           G query heads per KV head
 *   out [B, H*G, ldo] float32       out[.., i*BLK + t] = scale * q . k~[t], for the first nb blocks
 *
 * Per block and query head: w[d] = q[d] * step[i, d], base = q . mn[i], and w is quantised to
 * int8 over its channels (the rule of KeySketch.quantized_weights in sketch.py, which every path
 * follows: amax = max_d |w[d]|, wq[d] = rint(w[d] * (127 / amax)), sw = amax / 127); then
 *   logit[t] = scale * (sw * sum_d wq[d] * code[t, d] + base).
 * The sum is of small integers (|wq| <= 127, code < 2^bits, D terms: exact in float32 while
 * D * 127 * (2^bits - 1) < 2^24), so every way of adding it gives the same number:
 *   - AVX-512 VNNI (runtime check; tile_vnni): 16 tokens x 4 channels per byte permute, one
 *     vpdpbusd (64 u8 x s8 products) per head and bit field;
 *   - AVX-512 / AVX2 (tile_avx512 / tile_avx2): 16 tokens of one channel widened to floats and
 *     multiply-added into per-head accumulators;
 *   - scalar (block_generic).
 * The reduction over d is vertical (no horizontal sums) in all of them.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SK_AVX2 1
#include <immintrin.h>
#endif

static float half_to_float(uint16_t h) {
#ifdef SK_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) { bits = sign; }
    else {                                         /* subnormal: normalise */
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

/* acc[g * BLK + t] += sum_d w[g * D + d] * code[t, d], for one block. */
static void block_generic(const uint8_t* p, const float* w, float* acc, int G, int D, int PB, int bits) {
  const int per = 8 / bits, blk = PB * per;
  const unsigned mask = (1u << bits) - 1u;
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) {
      const uint8_t* pd = p + d * PB;
      const float wd = w[g * D + d];
      for (int s = 0; s < per; ++s) {
        float* a = acc + g * blk + s * PB;
        for (int j = 0; j < PB; ++j) a[j] += wd * (float)((pd[j] >> (s * bits)) & mask);
      }
    }
}

#ifdef SK_AVX2
/* The codes of 16 tokens (bytes j0.. of channel d, shift sh) as 16 bytes: a 16-bit shift then the
 * byte mask (bits shifted in from the neighbour byte are masked). */
static inline __m128i codes16(const uint8_t* p, int d, int PB, int j0, __m128i sh, __m128i mask) {
  return _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i*)(p + d * PB + j0)), sh), mask);
}

/* The same for PB a multiple of 16, written straight to the output rows: o[g][t] = scale * (sw[g] *
 * sum + base[g]). Tiles of 16 tokens (16 bytes of a channel, one shift s) for NG <= 4 query heads;
 * NG is a constant after inlining, so the 2 * NG accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_avx2(const uint8_t* p, const float* w, const float* sw,
                                                            const float* base, float* const* o, float scale,
                                                            const int NG, int D, int PB, int bits) {
  const int per = 8 / bits;
  const __m128i mask = _mm_set1_epi8((char)((1u << bits) - 1u));
  for (int j0 = 0; j0 < PB; j0 += 16)
    for (int s = 0; s < per; ++s) {
      const __m128i sh = _mm_cvtsi32_si128(s * bits);
      __m256 a0[4], a1[4];
      for (int g = 0; g < NG; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
      for (int d = 0; d < D; ++d) {
        const __m128i y = codes16(p, d, PB, j0, sh, mask);
        __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(y));
        __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(y, 8)));
        for (int g = 0; g < NG; ++g) {
          const __m256 wv = _mm256_broadcast_ss(w + g * D + d);
          a0[g] = _mm256_fmadd_ps(wv, c0, a0[g]);
          a1[g] = _mm256_fmadd_ps(wv, c1, a1[g]);
        }
      }
      const __m256 sc = _mm256_set1_ps(scale);
      for (int g = 0; g < NG; ++g) {
        const __m256 bg = _mm256_set1_ps(base[g]), sg = _mm256_set1_ps(sw[g]);
        float* dst = o[g] + s * PB + j0;
        _mm256_storeu_ps(dst, _mm256_mul_ps(sc, _mm256_fmadd_ps(a0[g], sg, bg)));
        _mm256_storeu_ps(dst + 8, _mm256_mul_ps(sc, _mm256_fmadd_ps(a1[g], sg, bg)));
      }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The same with 16-token vectors (one widening and one conversion per channel and tile instead of
 * five AVX2 instructions; one multiply-add per head): same sums in the same order, same floats. */
#define SK_TILE tile_avx512
static inline __attribute__((always_inline)) void tile_avx512(const uint8_t* p, const float* w, const float* sw,
                                                              const float* base, float* const* o, float scale,
                                                              const int NG, int D, int PB, int bits) {
  const int per = 8 / bits;
  const __m128i mask = _mm_set1_epi8((char)((1u << bits) - 1u));
  for (int j0 = 0; j0 < PB; j0 += 16)
    for (int s = 0; s < per; ++s) {
      const __m128i sh = _mm_cvtsi32_si128(s * bits);
      __m512 a[4];
      for (int g = 0; g < NG; ++g) a[g] = _mm512_setzero_ps();
      for (int d = 0; d < D; ++d) {
        const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes16(p, d, PB, j0, sh, mask)));
        for (int g = 0; g < NG; ++g) a[g] = _mm512_fmadd_ps(_mm512_set1_ps(w[g * D + d]), c, a[g]);
      }
      const __m512 sc = _mm512_set1_ps(scale);
      for (int g = 0; g < NG; ++g)
        _mm512_storeu_ps(o[g] + s * PB + j0,
                         _mm512_mul_ps(sc, _mm512_fmadd_ps(a[g], _mm512_set1_ps(sw[g]), _mm512_set1_ps(base[g]))));
    }
}

/* The same sums in int32 with AVX-512 VNNI (vpdpbusd: per 32-bit lane, 4 u8 x s8 products added),
 * for PB a multiple of 16 and D of 4: per 16-byte column j0 and 4 channels d..d+3, the 4 x 16 code
 * bytes are permuted (vpermb) so that lane j holds byte j of the 4 channels; for each bit field s
 * the codes are shifted and masked, and one vpdpbusd per head adds the 4 channels' products with
 * the head's int8 weights wq[g][d..d+3] (broadcast) into lane j = token j0 + j + s * PB. Integer
 * sums: equal to the float tiles' (exact). Compiled for VNNI/VBMI whatever the build's flags; called
 * only where the CPU has them (sk_vnni()). */
#define SK_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi")))
static inline __attribute__((always_inline)) SK_VNNI_TARGET void tile_vnni(
    const uint8_t* p, const int32_t* wq4, const float* sw, const float* base, float* const* o, float scale,
    const int NG, const int PER, int D, int PB) {
  const int bits = 8 / PER;
  static const uint8_t ix[64] = {   /* byte 4j + c <- byte 16c + j */
      0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53,
      6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
      12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
  const __m512i mask = _mm512_set1_epi8((char)((1u << bits) - 1u)), perm = _mm512_loadu_si512(ix);
  for (int j0 = 0; j0 < PB; j0 += 16) {
    __m512i acc[8][4];
    for (int s = 0; s < PER; ++s)
      for (int g = 0; g < NG; ++g) acc[s][g] = _mm512_setzero_si512();
    for (int d = 0; d < D; d += 4) {
      __m512i x;
      if (PB == 16) {
        x = _mm512_loadu_si512(p + d * 16);
      } else {
        x = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(p + d * PB + j0)));
        x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i*)(p + (d + 1) * PB + j0)), 1);
        x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i*)(p + (d + 2) * PB + j0)), 2);
        x = _mm512_inserti32x4(x, _mm_loadu_si128((const __m128i*)(p + (d + 3) * PB + j0)), 3);
      }
      x = _mm512_permutexvar_epi8(perm, x);
      for (int s = 0; s < PER; ++s) {
        const __m512i c = _mm512_and_si512(_mm512_srl_epi16(x, _mm_cvtsi32_si128(s * bits)), mask);
        for (int g = 0; g < NG; ++g)
          acc[s][g] = _mm512_dpbusd_epi32(acc[s][g], c, _mm512_set1_epi32(wq4[g * (D / 4) + d / 4]));
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int s = 0; s < PER; ++s)
      for (int g = 0; g < NG; ++g)
        _mm512_storeu_ps(o[g] + s * PB + j0,
                         _mm512_mul_ps(sc, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[s][g]), _mm512_set1_ps(sw[g]),
                                                           _mm512_set1_ps(base[g]))));
  }
}

/* Head tiles of <= 4 (<= 2 with 1-bit codes: 8 fields x NG accumulators) with NG and PER constants. */
#define SK_VNNI_NG(PER_, MAXG)                                                                      \
  for (int g0 = 0; g0 < G; g0 += MAXG) {                                                          \
    const int ng = G - g0 < MAXG ? G - g0 : MAXG;                                                 \
    const int32_t* w4 = wq4 + g0 * (D / 4);                                                       \
    switch (ng) {                                                                                 \
      case 1: tile_vnni(p, w4, sw + g0, base + g0, o + g0, scale, 1, PER_, D, PB); break;         \
      case 2: tile_vnni(p, w4, sw + g0, base + g0, o + g0, scale, 2, PER_, D, PB); break;         \
      case 3: tile_vnni(p, w4, sw + g0, base + g0, o + g0, scale, 3, PER_, D, PB); break;         \
      default: tile_vnni(p, w4, sw + g0, base + g0, o + g0, scale, 4, PER_, D, PB); break;        \
    }                                                                                             \
  }
static SK_VNNI_TARGET void block_vnni(const uint8_t* p, const int32_t* wq4, const float* sw, const float* base,
                                      float* const* o, float scale, int G, int D, int PB, int bits) {
  switch (bits) {
    case 1: SK_VNNI_NG(8, 2) break;
    case 2: SK_VNNI_NG(4, 4) break;
    case 4: SK_VNNI_NG(2, 4) break;
    default: SK_VNNI_NG(1, 4) break;
  }
}
#define SK_HAS_VNNI 1
#else
#define SK_TILE tile_avx2
#endif

static void block_avx2(const uint8_t* p, const float* w, const float* sw, const float* base, float* const* o,
                       float scale, int G, int D, int PB, int bits) {
  for (int g0 = 0; g0 < G; g0 += 4) {
    const float* wg = w + g0 * D;
    switch (G - g0 < 4 ? G - g0 : 4) {
      case 1: SK_TILE(p, wg, sw + g0, base + g0, o + g0, scale, 1, D, PB, bits); break;
      case 2: SK_TILE(p, wg, sw + g0, base + g0, o + g0, scale, 2, D, PB, bits); break;
      case 3: SK_TILE(p, wg, sw + g0, base + g0, o + g0, scale, 3, D, PB, bits); break;
      default: SK_TILE(p, wg, sw + g0, base + g0, o + g0, scale, 4, D, PB, bits); break;
    }
  }
}
#endif

/* VNNI use: -1 = where the CPU has it (checked once), 0 = never, 1 = where it has it (tests set 0
 * to compare the float tiles with it). */
static int sk_vnni_mode = -1;
void sketch_set_vnni(int mode) { sk_vnni_mode = mode; }
int sketch_vnni_available(void) {
#ifdef SK_HAS_VNNI
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
#else
  return 0;
#endif
}
static int sk_vnni(void) {
  static int avail = -1;
  if (sk_vnni_mode == 0) return 0;
  if (avail < 0) avail = sketch_vnni_available();
  return avail;
}
int sketch_vnni_in_use(void) { return sk_vnni(); }

/* One query head's block weights: w[d] = rint(q[d] * s[d] * r) (int8 values as floats; the module
 * docstring's rule), *sw = amax / 127, *base = q . m in 8 interleaved partial sums (lane d % 8). */
static void head_weights(const float* q, const float* s, const float* m, long D, float* w, float* base,
                         float* sw) {
  float bs[8] = {0.f}, amax = 0.f;
  long d0 = 0;
#ifdef SK_AVX2
  if (D % 8 == 0) {
    __m256 vb = _mm256_setzero_ps(), vm = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (; d0 < D; d0 += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d0), wv = _mm256_mul_ps(qv, _mm256_loadu_ps(s + d0));
      _mm256_storeu_ps(w + d0, wv);
      vb = _mm256_fmadd_ps(qv, _mm256_loadu_ps(m + d0), vb);
      vm = _mm256_max_ps(vm, _mm256_andnot_ps(sign, wv));
    }
    float lanes[8];
    _mm256_storeu_ps(bs, vb);
    _mm256_storeu_ps(lanes, vm);
    for (int l = 0; l < 8; ++l) amax = lanes[l] > amax ? lanes[l] : amax;
  }
#endif
  for (long d = d0; d < D; ++d) {
    w[d] = q[d] * s[d];
    bs[d & 7] = fmaf(q[d], m[d], bs[d & 7]);
    const float a = fabsf(w[d]);
    amax = a > amax ? a : amax;
  }
  *base = ((bs[0] + bs[1]) + (bs[2] + bs[3])) + ((bs[4] + bs[5]) + (bs[6] + bs[7]));
  *sw = amax / 127.f;
  if (!(amax > 0.f)) {
    memset(w, 0, (size_t)D * sizeof *w);
    return;
  }
  const float r = 127.f / amax;
  d0 = 0;
#ifdef SK_AVX2
  for (; d0 + 8 <= D; d0 += 8)
    _mm256_storeu_ps(w + d0, _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(w + d0), _mm256_set1_ps(r)),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (long d = d0; d < D; ++d) w[d] = rintf(w[d] * r);
}

void sketch_logits(const uint8_t* P, const uint16_t* S, const uint16_t* M, const float* Q, float* O,
                   long B, long H, long G, long D, long NBc, long PB, long bits, long nb, long ldo,
                   float scale, int threads) {
  const long per = 8 / bits, blk = PB * per;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (long job = 0; job < B * H * nb; ++job) {
    const long bh = job / nb, i = job % nb, b = bh / H, h = bh % H;
    float w[G * D], base[G], sw[G], sf[D], mf[D];
    int32_t wq4[G * D / 4 + 1];   /* the int8 weights, 4 channels per int32 (VNNI) */
    float* o[G];
    const uint16_t* s = S + (bh * NBc + i) * D;
    const uint16_t* m = M + (bh * NBc + i) * D;
    const uint8_t* p = P + (bh * NBc + i) * D * PB;
    long d0 = 0;
#ifdef SK_AVX2
    for (; d0 + 8 <= D; d0 += 8) {
      _mm256_storeu_ps(sf + d0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + d0))));
      _mm256_storeu_ps(mf + d0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(m + d0))));
    }
#endif
    for (long d = d0; d < D; ++d) {
      sf[d] = half_to_float(s[d]);
      mf[d] = half_to_float(m[d]);
    }
    for (long g = 0; g < G; ++g) {
      head_weights(Q + (b * H * G + h * G + g) * D, sf, mf, D, w + g * D, base + g, sw + g);
      o[g] = O + (b * H * G + h * G + g) * ldo + i * blk;
    }
#ifdef SK_HAS_VNNI
    if (PB % 16 == 0 && D % 4 == 0 && sk_vnni()) {
      int8_t* w8 = (int8_t*)wq4;
      for (long t = 0; t < G * D; ++t) w8[t] = (int8_t)w[t];
      block_vnni(p, wq4, sw, base, o, scale, (int)G, (int)D, (int)PB, (int)bits);
      continue;
    }
#endif
#ifdef SK_AVX2
    if (PB % 16 == 0) {
      block_avx2(p, w, sw, base, o, scale, (int)G, (int)D, (int)PB, (int)bits);
      continue;
    }
#endif
    float acc[G * blk];
    memset(acc, 0, sizeof acc);
    block_generic(p, w, acc, (int)G, (int)D, (int)PB, (int)bits);
    for (long g = 0; g < G; ++g)
      for (long t = 0; t < blk; ++t) o[g][t] = scale * fmaf(acc[g * blk + t], sw[g], base[g]);
  }
}

/* Attention of one decode query per head over the kept rows of a float32 cache, read in place
 * (no gathered copy): the CPU form of llm_compile/codegen/swa_kernels.py's fused gather/attend.
 *
 *   K [B, H, *, D], V [B, H, *, Dv] float32 with unit row stride D / Dv; (b, h) starts at
 *   b * ks0 + h * ks1 (elements)
 *   idx [B, IG, P] int64 (IG = 1: shared by the heads, or H), sorted positions
 *   bias [B, BH, P] float32 or NULL (BH = 1 or H * G): added to the logits (-inf = masked)
 *   out [B, H*G, Dv] float32; w [B, H*G, P] float32: the softmax weights (a row whose slots are all
 *   masked gets zeros)
 *
 * Per (b, h): one pass over the K rows (each row read once for the G query heads), the softmax,
 * one pass over the V rows; the rows PF slots ahead are prefetched, so the scattered reads of a
 * sparse selection overlap instead of waiting on memory one by one.
 */
#define SK_PF 16   /* rows prefetched ahead */

static void prefetch_row(const float* r, long d) {
  for (long l = 0; l < d; l += 16) __builtin_prefetch(r + l);   /* every 64-byte line */
}

/* logits[g] = q[g] . row for G heads */
static void dot_rows(const float* qh, const float* row, float* lg, long G, long D) {
#ifdef SK_AVX2
  if (D % 8 == 0) {
    for (long g0 = 0; g0 < G; g0 += 4) {
      const long ng = G - g0 < 4 ? G - g0 : 4;
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (long d = 0; d < D; d += 8) {
        const __m256 r = _mm256_loadu_ps(row + d);
        for (long g = 0; g < ng; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + (g0 + g) * D + d), r, a[g]);
      }
      for (long g = 0; g < ng; ++g) {
        __m128 x = _mm_add_ps(_mm256_castps256_ps128(a[g]), _mm256_extractf128_ps(a[g], 1));
        x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
        lg[g0 + g] = _mm_cvtss_f32(x);
      }
    }
    return;
  }
#endif
  for (long g = 0; g < G; ++g) {
    float acc = 0.f;
    for (long d = 0; d < D; ++d) acc += qh[g * D + d] * row[d];
    lg[g] = acc;
  }
}

/* o[g] += w[g] * row for G heads */
static void axpy_rows(const float* w, long wstride, const float* row, float* oh, long G, long Dv) {
#ifdef SK_AVX2
  if (Dv % 8 == 0) {
    for (long d = 0; d < Dv; d += 8) {
      const __m256 r = _mm256_loadu_ps(row + d);
      for (long g = 0; g < G; ++g) {
        float* o = oh + g * Dv + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(w[g * wstride]), r, _mm256_loadu_ps(o)));
      }
    }
    return;
  }
#endif
  for (long g = 0; g < G; ++g)
    for (long d = 0; d < Dv; ++d) oh[g * Dv + d] += w[g * wstride] * row[d];
}

void sparse_attend(const float* Q, const float* K, const float* V, const int64_t* IDX, const float* BIAS,
                   float* OUT, float* W, long B, long H, long G, long D, long Dv, long P, long IG, long BH,
                   long ks0, long ks1, long vs0, long vs1, float scale, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (long bh = 0; bh < B * H; ++bh) {
    const long b = bh / H, h = bh % H;
    const int64_t* ix = IDX + (b * IG + (IG > 1 ? h : 0)) * P;
    const float* kb = K + b * ks0 + h * ks1;
    const float* vb = V + b * vs0 + h * vs1;
    const float* qh = Q + (b * H + h) * G * D;
    float* wh = W + (b * H + h) * G * P;
    float lg[G];
    for (long p = 0; p < SK_PF && p < P; ++p) prefetch_row(kb + ix[p] * D, D);
    for (long p = 0; p < P; ++p) {
      if (p + SK_PF < P) prefetch_row(kb + ix[p + SK_PF] * D, D);
      dot_rows(qh, kb + ix[p] * D, lg, G, D);
      for (long g = 0; g < G; ++g) wh[g * P + p] = lg[g] * scale;
    }
    for (long p = 0; p < SK_PF && p < P; ++p) prefetch_row(vb + ix[p] * Dv, Dv);
    for (long g = 0; g < G; ++g) {
      float* lw = wh + g * P;
      if (BIAS) {
        const float* bs = BIAS + (b * BH + (BH > 1 ? h * G + g : 0)) * P;
        for (long p = 0; p < P; ++p) lw[p] += bs[p];
      }
      float mx = -INFINITY, sum = 0.f;
      for (long p = 0; p < P; ++p) mx = lw[p] > mx ? lw[p] : mx;
      if (mx == -INFINITY) {
        for (long p = 0; p < P; ++p) lw[p] = 0.f;
        continue;
      }
      for (long p = 0; p < P; ++p) { lw[p] = expf(lw[p] - mx); sum += lw[p]; }
      const float inv = 1.f / sum;
      for (long p = 0; p < P; ++p) lw[p] *= inv;
    }
    float* oh = OUT + (b * H + h) * G * Dv;
    for (long i = 0; i < G * Dv; ++i) oh[i] = 0.f;
    for (long p = 0; p < P; ++p) {
      if (p + SK_PF < P) prefetch_row(vb + ix[p + SK_PF] * Dv, Dv);
      axpy_rows(wh + p, P, vb + ix[p] * Dv, oh, G, Dv);
    }
  }
}
