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
      const int64_t thr = kth_largest(s + lo, m, glob, a);
      long above = 0;
      for (long t = lo; t < hi; ++t) above += s[t] > thr;
      long ties = glob - above;      /* equal to the threshold: the earliest ones */
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
