// Sixteen horizontal sums at once, on AVX-512F: a transpose-and-add tree over 16 vectors costs about as much as
// two single horizontal sums.
#pragma once

#include <immintrin.h>

namespace dinat_simd {

__attribute__((target("avx512f"))) inline __m512 add_halves(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
}
__attribute__((target("avx512f"))) inline __m512 add_quarters(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}
__attribute__((target("avx512f"))) inline __m512 add_pairs(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
}

// Sums each of 16 vectors into one lane: lane t holds the sum of the vector in slot kSlot[t] (so a caller puts
// its t-th vector in v[kSlot[t]] to get its sum in lane t).
constexpr int kSlot[16] = {0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15};
__attribute__((target("avx512f"))) inline __m512 sum_each(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = add_halves(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; ++i) b[i] = add_quarters(a[2 * i], a[2 * i + 1]);
  return add_pairs(add_pairs(b[0], b[1]), add_pairs(b[2], b[3]));
}

}  // namespace dinat_simd
