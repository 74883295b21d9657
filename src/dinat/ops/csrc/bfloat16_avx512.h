// 16 float32 values at a time from and to float32 or bfloat16 memory, on AVX-512F alone (no bfloat16
// instructions needed). bfloat16 is held as its raw bits in uint16_t.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace dinat_simd {

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// bfloat16 is the upper half of a float32: widening is exact
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx512f"))) inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }

// rounded to nearest even, as torch rounds float32 to bfloat16; a NaN becomes torch's quiet NaN 0x7fc0
__attribute__((target("avx512f"))) inline void store16(uint16_t* p, __m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}

}  // namespace dinat_simd
