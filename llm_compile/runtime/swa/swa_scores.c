/* The score bookkeeping of a windowed SWA decode step ("alisa"; llm_compile/runtime/swa/state.py),
 * compiled with swa_cpu.c into one library by llm_compile/runtime/swa/native.py. Each replaces a
 * handful of small torch ops (and their allocations) per attention site and step:
 *
 *   score_sub     a ring row leaves the score window: buf[r, idx[r, t]] -= w[r, t]
 *   score_add     a step's weights enter it: per group, the sum of its query heads' weights, each
 *                 quantised to fixed point (round-half-even of w * 2^36, as torch.round), added
 *                 to the scores and stored in the ring row
 *   select_top    the kept tokens: sinks, the `glob` best-scored older tokens in position order
 *                 (ties at the threshold: earliest positions first), the recent window, padding 0
 *   query_select  the kept tokens of a query-aware step ("quest", "recall"; query.py): the
 *                 scorer's logits -> per-head softmax -> sum over the group's heads -> the `nq`
 *                 best tokens, then the `nglob` best history scores among the rest, in position
 *                 order (ties: earliest positions), all in one pass over L2-sized rows
 *
 * Scores are int64 fixed point: every add is undone exactly by the matching sub.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define SQ_AVX2 1
#include <immintrin.h>
#endif

void score_sub(int64_t* buf, long ld, const int32_t* idx, const int64_t* w, long R, long T) {
  for (long r = 0; r < R; ++r) {
    int64_t* s = buf + r * ld;
    const int32_t* ix = idx + r * T;
    const int64_t* wr = w + r * T;
    for (long t = 0; t < T; ++t) s[ix[t]] -= wr[t];
  }
}

/* W [B, G*grp, wld] float32 (first T slots used); IDX [B, G, ild] int64; buf [B*G, ld];
 * ring rows RI [B*G, rw] int32, RW [B*G, rw] int64 (slots T.. zeroed). */
void score_add(int64_t* buf, long ld, const float* W, long wld, const int64_t* IDX, long ild,
               long B, long G, long grp, long T, int32_t* RI, int64_t* RW, long rw) {
  const float fixed = 68719476736.0f; /* 2^36: FIXED_POINT_BITS in state.py */
  for (long r = 0; r < B * G; ++r) {
    const float* w0 = W + r * grp * wld;     /* row r = (b, g): heads g*grp .. of batch b */
    const int64_t* ix = IDX + r * ild;
    int64_t* s = buf + r * ld;
    int32_t* ri = RI + r * rw;
    int64_t* rwv = RW + r * rw;
    for (long t = 0; t < T; ++t) {
      int64_t q = 0;   /* each head quantised, then summed: exact, in any order */
      for (long h = 0; h < grp; ++h) q += (int64_t)rintf(w0[h * wld + t] * fixed);
      s[ix[t]] += q;
      ri[t] = (int32_t)ix[t];
      rwv[t] = q;
    }
    if (rw > T) {
      memset(ri + T, 0, (size_t)(rw - T) * sizeof *ri);
      memset(rwv + T, 0, (size_t)(rw - T) * sizeof *rwv);
    }
  }
}

/* The k-th largest of s[0..m) (1 <= k <= m), by an MSB-first radix select over 8-bit digits of the
 * order-preserving unsigned keys: a histogram pass, then the bin that holds the k-th largest is
 * compacted into `a` (scratch, m long) and refined by the next digit. Branch-free passes; the
 * first digit is the highest one in which the scores differ, so a 46-bit score range of uniform
 * values needs about two passes over the row. */
static inline uint64_t key_of(int64_t v) { return (uint64_t)v ^ 0x8000000000000000ull; }

static int64_t kth_largest(const int64_t* s, long m, long k, int64_t* a) {
  uint64_t lo = ~0ull, hi = 0;
  for (long t = 0; t < m; ++t) {
    const uint64_t x = key_of(s[t]);
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  if (lo == hi) return s[0];
  int shift = 56;
  while (shift > 0 && ((lo ^ hi) >> shift) == 0) shift -= 8;
  const int64_t* src = s;
  long cnt = m;
  /* the key bits above the current digit, shared by the candidates: first those all keys share */
  uint64_t prefix = shift < 56 ? (lo >> (shift + 8)) << (shift + 8) : 0;
  for (;;) {
    long hist[256] = {0};
    for (long t = 0; t < cnt; ++t) hist[(key_of(src[t]) >> shift) & 255u]++;
    int bin = 255;
    while (hist[bin] < k) k -= hist[bin--];
    prefix |= (uint64_t)bin << shift;
    long c = 0;
    for (long t = 0; t < cnt; ++t) {
      a[c] = src[t];
      c += ((key_of(src[t]) >> shift) & 255u) == (uint64_t)bin;
    }
    if (shift == 0 || c == k) {
      if (shift == 0) return (int64_t)(prefix ^ 0x8000000000000000ull);
      int64_t mn = a[0];   /* all c candidates are taken: the threshold is their minimum */
      for (long t = 1; t < c; ++t) mn = a[t] < mn ? a[t] : mn;
      return mn;
    }
    src = a;
    cnt = c;
    shift -= 8;
  }
}

/* The k-th largest of s[0..m) (1 <= k < m) as the threshold of a top-k pick, and in *ties how
 * many of the values equal to it are taken (the earliest ones: the rest of k after those above). */
static int64_t top_threshold(const int64_t* s, long m, long k, int64_t* a, long* ties) {
  const int64_t thr = kth_largest(s, m, k, a);
  long above = 0;
  for (long t = 0; t < m; ++t) above += s[t] > thr;
  *ties = k - above;
  return thr;
}

/* score [R, ld] int64 (first n valid); out [R, padded] int64. Returns 0, or -1 on no memory. */
int select_top(const int64_t* score, long ld, long R, long n, long sinks, long recent, long glob,
               long padded, int64_t* out, int threads) {
  const long lo = sinks, hi = n - recent, m = hi - lo;
  int64_t* scratch = glob > 0 && glob < m ? malloc((size_t)(threads > 1 ? threads : 1) * (size_t)m * sizeof *scratch) : NULL;
  if (glob > 0 && glob < m && !scratch) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (long r = 0; r < R; ++r) {
    const int64_t* s = score + r * ld;
    int64_t* o = out + r * padded;
    long j = 0;
    for (long t = 0; t < sinks; ++t) o[j++] = t;
    if (glob >= m) {
      for (long t = lo; t < hi; ++t) o[j++] = t;
    } else if (glob > 0) {
#ifdef _OPENMP
      int64_t* a = scratch + (long)omp_get_thread_num() * m;
#else
      int64_t* a = scratch;
#endif
      long ties;                     /* equal to the threshold: the earliest ones */
      const int64_t thr = top_threshold(s + lo, m, glob, a, &ties);
      const long end = j + glob;
      for (long t = lo; t < hi && j < end; ++t) {   /* branch-free: store, then advance if kept */
        const int gt = s[t] > thr, eq = s[t] == thr, tie = eq & (ties > 0);
        o[j] = t;
        j += gt | tie;
        ties -= tie;
      }
    }
    for (long t = hi; t < n; ++t) o[j++] = t;
    while (j < padded) o[j++] = 0;
  }
  free(scratch);
  return 0;
}

/* exp(x) for x <= 0 (softmax numerators), 8 at a time: Cephes' expf (range reduction by ln 2 in
 * two parts, degree-5 polynomial; relative error ~1e-7), inputs below -87.3 give ~1e-38, not 0. */
#ifdef SQ_AVX2
static inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* u[0..m) += softmax(l[0..m)) (numerators exp(l - max), then times 1 / sum; tmp: m floats). A row
 * with no finite logit adds nothing. */
static void softmax_add(const float* l, long m, float* u, float* tmp) {
  float mx = -INFINITY;
  long j = 0;
#ifdef SQ_AVX2
  __m256 v0 = _mm256_set1_ps(-INFINITY), v1 = v0;   /* two chains: max has a 3-cycle latency */
  for (; j + 16 <= m; j += 16) {
    v0 = _mm256_max_ps(v0, _mm256_loadu_ps(l + j));
    v1 = _mm256_max_ps(v1, _mm256_loadu_ps(l + j + 8));
  }
  float part[8];
  _mm256_storeu_ps(part, _mm256_max_ps(v0, v1));
  for (int i = 0; i < 8; ++i) mx = part[i] > mx ? part[i] : mx;
#endif
  for (; j < m; ++j) mx = l[j] > mx ? l[j] : mx;
  if (!(mx > -INFINITY) || m == 0) return;
  float sum = 0.f;
  j = 0;
#ifdef SQ_AVX2
  __m256 vs = _mm256_setzero_ps(), vm = _mm256_set1_ps(mx);
  for (; j + 8 <= m; j += 8) {
    __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(l + j), vm));
    _mm256_storeu_ps(tmp + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  _mm256_storeu_ps(part, vs);
  for (int i = 0; i < 8; ++i) sum += part[i];
#endif
  for (; j < m; ++j) sum += (tmp[j] = expf(l[j] - mx));
  const float inv = 1.0f / sum;
  for (j = 0; j < m; ++j) u[j] += tmp[j] * inv;
}

/* The kept tokens of a query-aware step, per row r = (b, g) of R = B * G:
 *   L [B, Hq, ldl] float32: the scorer's logits over `units` units (sketched tokens, or pages of
 *     `unit` tokens); heads g*Hq/G .. (g+1)*Hq/G - 1 form group g
 *   hist [R, ldh] int64: the history scores (read only when nglob > 0)
 *   out [R, padded] int64: sinks, then among [sinks, n - recent) the `nq` tokens with the largest
 *     group-summed softmax weight of their unit (token t: unit t / unit; none past `units`: 0), then
 *     the `nglob` largest history scores among the others, then the recent window; in position
 *     order, padding 0. Ties at either threshold go to the earliest positions.
 * Returns 0, or -1 on no memory. */
int query_select(const float* L, long ldl, long B, long Hq, long units, long unit, long G,
                 const int64_t* hist, long ldh, long n, long sinks, long recent, long nq, long nglob,
                 long padded, int64_t* out, int threads) {
  const long lo = sinks, hi = n - recent, m = hi - lo, hpg = Hq / G;
  int fail = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1) reduction(|:fail)
  for (long r = 0; r < B * G; ++r) {
    const long b = r / G, g = r % G;
    /* u, tmp: units floats; key, a: m int64; kept: n bytes */
    char* mem = malloc((size_t)units * 2 * sizeof(float) + (size_t)m * 2 * sizeof(int64_t) + (size_t)n);
    if (!mem) { fail = 1; continue; }
    float* u = (float*)mem;
    float* tmp = u + units;
    int64_t* key = (int64_t*)(tmp + units);
    int64_t* a = key + m;
    unsigned char* kept = (unsigned char*)(a + m);
    memset(u, 0, (size_t)units * sizeof *u);
    memset(kept, 0, (size_t)n);
    for (long h = g * hpg; h < (g + 1) * hpg; ++h) softmax_add(L + (b * Hq + h) * ldl, units, u, tmp);
    for (long t = 0; t < sinks; ++t) kept[t] = 1;
    for (long t = hi; t < n; ++t) kept[t] = 1;
    /* the query's pick: keys = the float bits of the weights (>= 0: order-preserving) */
    long q = nq < m ? nq : m;
    if (q >= m) {
      for (long t = lo; t < hi; ++t) kept[t] = 1;
    } else if (q > 0) {
      for (long t = lo, j = lo / unit; t < hi; ++j) {   /* unit by unit: no division per token */
        const long end = (j + 1) * unit < hi ? (j + 1) * unit : hi;
        const float w = j < units ? u[j] : 0.f;
        uint32_t bits;
        memcpy(&bits, &w, sizeof bits);
        for (; t < end; ++t) key[t - lo] = (int64_t)(bits & 0x7fffffffu);   /* -0 and +0 alike */
      }
      long ties;
      const int64_t thr = top_threshold(key, m, q, a, &ties);
      for (long i = 0; i < m; ++i) {
        const int gt = key[i] > thr, tie = (key[i] == thr) & (ties > 0);
        kept[lo + i] = (unsigned char)(gt | tie);
        ties -= tie;
      }
    }
    /* the history's pick among the tokens the query left */
    const long rest = m - q, gl = nglob < rest ? nglob : rest;
    if (gl > 0) {
      const int64_t* s = hist + r * ldh;
      long c = 0;
      for (long t = lo; t < hi; ++t) {   /* compact the untaken scores into key */
        key[c] = s[t];
        c += !kept[t];
      }
      if (gl >= c) {
        for (long t = lo; t < hi; ++t) kept[t] = 1;
      } else {
        long ties;
        const int64_t thr = top_threshold(key, c, gl, a, &ties);
        for (long t = lo; t < hi; ++t) {
          const int free_ = !kept[t], gt = free_ & (s[t] > thr), tie = free_ & (s[t] == thr) & (ties > 0);
          kept[t] |= (unsigned char)(gt | tie);
          ties -= tie;
        }
      }
    }
    int64_t* o = out + r * padded;
    long j = 0;
    for (long t = 0; t < n; ++t) {   /* branch-free: store, advance if kept */
      o[j] = t;
      j += kept[t];
      if (j == padded) break;
    }
    while (j < padded) o[j++] = 0;
    free(mem);
  }
  return fail ? -1 : 0;
}
