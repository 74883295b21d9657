// LayerNorm over the last dimension of a contiguous float32 or bfloat16 tensor, for inference on CPU (bfloat16:
// computed in float32 with float32 weight and bias, rounded once, as aten's mixed-dtype LayerNorm).
//
// aten's CPU kernel spends most of its time per row on DiNAT's short rows (64-512 channels, tens of thousands of
// rows); here 16 rows at a time are read once from memory into L1 and normalized there: the mean, then the
// variance of the centred values (as aten, two passes, not the one-pass sum of squares), then
// (x - mean) * rstd * weight + bias.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "bfloat16_avx512.h"
#include "sum_lanes_avx512.h"

namespace {

using dinat_simd::kSlot;
using dinat_simd::load16;
using dinat_simd::store16;
using dinat_simd::sum_each;

constexpr int64_t kBlockRows = 16;

// lane r of `values`, in every lane
__attribute__((target("avx512f"))) inline __m512 lane(__m512 values, int r) {
  return _mm512_permutexvar_ps(_mm512_set1_epi32(r), values);
}

// Normalizes `count` (at most kBlockRows) consecutive rows. Their sums, then their squared deviations, are reduced
// across the rows together (one transpose-and-add tree instead of two horizontal sums per row), and their
// reciprocal standard deviations take one vector square root and division. In and Out: float, or uint16_t holding
// bfloat16.
template <typename In, typename Out>
__attribute__((target("avx512f"))) void normalize_block_avx512(const In* x, const float* weight, const float* bias,
                                                               Out* y, int64_t channels, int count, float eps) {
  const __m512 inverse_channels = _mm512_set1_ps(1.0f / static_cast<float>(channels));
  __m512 partial[kBlockRows];
  for (int r = 0; r < kBlockRows; ++r) {
    const In* in = x + r * channels;
    __m512 sum = _mm512_setzero_ps();
    if (r < count)
      for (int64_t c = 0; c < channels; c += 16) sum = _mm512_add_ps(sum, load16(in + c));
    partial[kSlot[r]] = sum;
  }
  const __m512 means = _mm512_mul_ps(sum_each(partial), inverse_channels);
  for (int r = 0; r < kBlockRows; ++r) {
    const In* in = x + r * channels;
    const __m512 row_mean = lane(means, r);
    __m512 squares = _mm512_setzero_ps();
    if (r < count)
      for (int64_t c = 0; c < channels; c += 16) {
        const __m512 centred = _mm512_sub_ps(load16(in + c), row_mean);
        squares = _mm512_fmadd_ps(centred, centred, squares);
      }
    partial[kSlot[r]] = squares;
  }
  const __m512 variance = _mm512_mul_ps(sum_each(partial), inverse_channels);
  const __m512 rstds = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                     _mm512_sqrt_ps(_mm512_add_ps(variance, _mm512_set1_ps(eps))));
  for (int r = 0; r < count; ++r) {
    const In* in = x + r * channels;
    Out* out = y + r * channels;
    const __m512 row_mean = lane(means, r), row_rstd = lane(rstds, r);
    for (int64_t c = 0; c < channels; c += 16) {
      const __m512 normalized = _mm512_mul_ps(_mm512_sub_ps(load16(in + c), row_mean), row_rstd);
      store16(out + c, _mm512_fmadd_ps(normalized, _mm512_loadu_ps(weight + c), _mm512_loadu_ps(bias + c)));
    }
  }
}

}  // namespace

namespace dinat {

// layer_norm_rows runs rows whose channel count is a positive multiple of this: 16 (one AVX-512 vector) on an
// AVX-512 CPU, 0 (never) elsewhere.
int64_t layer_norm_rows_channel_multiple() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 ? 16 : 0;
}

bool layer_norm_rows_supported(int64_t channels) {
  const int64_t multiple = layer_norm_rows_channel_multiple();
  return multiple > 0 && channels > 0 && channels % multiple == 0;
}

torch::Tensor layer_norm_rows(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                              double eps) {
  const int64_t channels = x.size(-1);
  const bool bfloat16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat || bfloat16) && x.is_contiguous(),
              "layer_norm_rows: expected a contiguous float32 or bfloat16 CPU tensor");
  TORCH_CHECK(weight.numel() == channels && bias.numel() == channels && weight.is_contiguous() && bias.is_contiguous()
                  && weight.scalar_type() == torch::kFloat && bias.scalar_type() == torch::kFloat,
              "layer_norm_rows: weight and bias must be contiguous float32 with one value per channel");
  TORCH_CHECK(layer_norm_rows_supported(channels), "layer_norm_rows: needs AVX-512 and channels a multiple of 16");
  auto y = torch::empty_like(x);
  const int64_t rows = channels == 0 ? 0 : x.numel() / channels;
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  // blocks of kBlockRows rows (the last one may be short); threads split whole blocks
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  auto normalize = [&](const auto* xp, auto* yp) {
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t offset = block * kBlockRows * channels;
        const int count = static_cast<int>(std::min(kBlockRows, rows - block * kBlockRows));
        normalize_block_avx512(xp + offset, wp, bp, yp + offset, channels, count, static_cast<float>(eps));
      }
    });
  };
  if (bfloat16)
    normalize(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(y.data_ptr()));
  else
    normalize(x.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

}  // namespace dinat
