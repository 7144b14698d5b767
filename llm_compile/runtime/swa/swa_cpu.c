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
 * Per block and query head: w[d] = q[d] * step[i, d] and base = q . mn[i]; then
 * logit[t] = base + sum_d w[d] * code[t, d]. The AVX2 path unpacks 16 tokens of one channel into
 * two float vectors and multiply-adds them into per-head accumulators, so the reduction over d is
 * vertical (no horizontal sums).
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

/* The same for PB a multiple of 16, written straight to the output rows: o[g][t] = scale * (logit
 * sum + base[g]). Tiles of 16 tokens (16 bytes of a channel, one shift s) for NG <= 4 query heads;
 * NG is a constant after inlining, so the 2 * NG accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_avx2(const uint8_t* p, const float* w, const float* base,
                                                            float* const* o, float scale, const int NG,
                                                            int D, int PB, int bits) {
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
        const __m256 bg = _mm256_set1_ps(base[g]);
        float* dst = o[g] + s * PB + j0;
        _mm256_storeu_ps(dst, _mm256_mul_ps(sc, _mm256_add_ps(a0[g], bg)));
        _mm256_storeu_ps(dst + 8, _mm256_mul_ps(sc, _mm256_add_ps(a1[g], bg)));
      }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The same with 16-token vectors (one widening and one conversion per channel and tile instead of
 * five AVX2 instructions; one multiply-add per head): same sums in the same order, same floats. */
#define SK_TILE tile_avx512
static inline __attribute__((always_inline)) void tile_avx512(const uint8_t* p, const float* w, const float* base,
                                                              float* const* o, float scale, const int NG,
                                                              int D, int PB, int bits) {
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
        _mm512_storeu_ps(o[g] + s * PB + j0, _mm512_mul_ps(sc, _mm512_add_ps(a[g], _mm512_set1_ps(base[g]))));
    }
}
#else
#define SK_TILE tile_avx2
#endif

static void block_avx2(const uint8_t* p, const float* w, const float* base, float* const* o, float scale,
                       int G, int D, int PB, int bits) {
  for (int g0 = 0; g0 < G; g0 += 4) {
    const float* wg = w + g0 * D;
    switch (G - g0 < 4 ? G - g0 : 4) {
      case 1: SK_TILE(p, wg, base + g0, o + g0, scale, 1, D, PB, bits); break;
      case 2: SK_TILE(p, wg, base + g0, o + g0, scale, 2, D, PB, bits); break;
      case 3: SK_TILE(p, wg, base + g0, o + g0, scale, 3, D, PB, bits); break;
      default: SK_TILE(p, wg, base + g0, o + g0, scale, 4, D, PB, bits); break;
    }
  }
}
#endif

void sketch_logits(const uint8_t* P, const uint16_t* S, const uint16_t* M, const float* Q, float* O,
                   long B, long H, long G, long D, long NBc, long PB, long bits, long nb, long ldo,
                   float scale, int threads) {
  const long per = 8 / bits, blk = PB * per;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (long job = 0; job < B * H * nb; ++job) {
    const long bh = job / nb, i = job % nb, b = bh / H, h = bh % H;
    float w[G * D], base[G], sf[D], mf[D];
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
      const float* qq = Q + (b * H * G + h * G + g) * D;
      float bs[8] = {0.f};   /* q . mn in 8 interleaved partial sums (no 64-long add chain) */
      for (long d = 0; d < D; ++d) {
        w[g * D + d] = qq[d] * sf[d];
        bs[d & 7] += qq[d] * mf[d];
      }
      base[g] = ((bs[0] + bs[1]) + (bs[2] + bs[3])) + ((bs[4] + bs[5]) + (bs[6] + bs[7]));
      o[g] = O + (b * H * G + h * G + g) * ldo + i * blk;
    }
#ifdef SK_AVX2
    if (PB % 16 == 0) {
      block_avx2(p, w, base, o, scale, (int)G, (int)D, (int)PB, (int)bits);
      continue;
    }
#endif
    float acc[G * blk];
    memset(acc, 0, sizeof acc);
    block_generic(p, w, acc, (int)G, (int)D, (int)PB, (int)bits);
    for (long g = 0; g < G; ++g)
      for (long t = 0; t < blk; ++t) o[g][t] = scale * (acc[g * blk + t] + base[g]);
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
