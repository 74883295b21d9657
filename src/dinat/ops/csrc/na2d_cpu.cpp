// Fused 2-D (dilated) neighborhood attention on CPU: forward and backward, with relative positional bias.
//
// No halo copies and no gathered (queries x keys) tensors: a query's scores live in a small local buffer, and the
// softmax and the weighted sum of values follow at once. q, k, v and the output may have any strides as long as
// head_dim is contiguous, so the views of a packed qkv projection are read in place and the output is written in
// the layout the output projection reads. The window rule (docs/semantics.md, dinat/ops/plan.py) is computed
// once per call, per axis. Four code paths, each checked against the reference by tests/test_cpp_backend.py:
//   - float32 forward and backward on AVX-512 CPUs, head_dim 16/32/48/64, where each dilation group is exactly one
//     window of at most 64 keys: dense products per group (`forward_groups`, `backward_groups`);
//   - the other float32 forwards on AVX-512 CPUs with such a head_dim and kernel width 3..13: 16 queries per
//     vector (`forward_heads_lanes`);
//   - the other float32 calls on AVX-512 CPUs with such a head_dim and at most 256 keys, and other backwards:
//     one query at a time, its keys' dot products summed 16 at a time (`forward_rows_avx512`,
//     `backward_heads_avx512`);
//   - everything else (float64, other head_dims, CPUs without AVX-512): plain loops.
// bfloat16 q, k, v (autocast) return a bfloat16 output. The first two paths read them in place: on CPUs with
// AVX512-BF16 they multiply them as bfloat16 pairs (`group_attention_pairs`, `forward_tile_pairs`, for head_dims
// 32 and 64), elsewhere they widen them to float32 as they gather them. The others get a float32 copy first.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include "bfloat16_avx512.h"
#include "sum_lanes_avx512.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using dinat_simd::kSlot;
using dinat_simd::load16;
using dinat_simd::store16;
using dinat_simd::sum_each;

// keys[i * K + t]: position of the t-th key in the window of query i; rel[i * K + t]: its RPB index
struct AxisWindows {
  std::vector<int64_t> keys, rel;
  int64_t dilation;
  std::vector<int64_t> order;  // positions group by group: neighbours in this order share most of their keys
  AxisWindows(int64_t length, int64_t kernel, int64_t dilation)
      : keys(length * kernel), rel(length * kernel), dilation(dilation) {
    for (int64_t group = 0; group < dilation; ++group)
      for (int64_t i = group; i < length; i += dilation) order.push_back(i);
    for (int64_t i = 0; i < length; ++i) {
      const int64_t group = i % dilation, pos = i / dilation;
      const int64_t group_length = (length - group + dilation - 1) / dilation;
      const int64_t start = std::min(std::max(pos - kernel / 2, int64_t(0)), group_length - kernel);
      for (int64_t t = 0; t < kernel; ++t) {
        keys[i * kernel + t] = group + dilation * (start + t);
        rel[i * kernel + t] = start + t - pos + kernel - 1;
      }
    }
  }
};

struct View5 {  // a (batch, heads, height, width, head_dim) tensor with a contiguous last dimension
  int64_t s0, s1, s2, s3;
  explicit View5(const torch::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  int64_t at(int64_t b, int64_t h, int64_t y, int64_t x) const { return b * s0 + h * s1 + y * s2 + x * s3; }
};

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) sum += a[e] * b[e];
  return sum;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) y[e] += alpha * x[e];
}

// ---- float32 on AVX-512, head_dim a multiple of 16 (at most 64): vector dot products, exp and sums ----------

constexpr int64_t kMaxWindow = 256;  // kernel_h * kernel_w of the fast path, rounded up to 16 lanes

#define DINAT_AVX512 __attribute__((target("avx512f")))

// exp for x <= 0 (scores minus their maximum): Cephes' polynomial, about 1 ulp; exactly 0 below -87, so that
// no denormal numbers (slow on most CPUs) reach the softmax
DINAT_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 representable = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(representable, p, n);
}

// out[n] = x . rows[n] for n < count (count <= kMaxWindow), lanes up to the next multiple of 16 zero; x is
// `Chunks` vectors, already loaded
template <int Chunks>
DINAT_AVX512 inline __m512 dot_lanes(const __m512* x, const float* row) {
  __m512 sum = _mm512_mul_ps(x[0], _mm512_loadu_ps(row));
  for (int c = 1; c < Chunks; ++c) sum = _mm512_fmadd_ps(x[c], _mm512_loadu_ps(row + 16 * c), sum);
  return sum;
}

template <int Chunks>
DINAT_AVX512 inline void dots(const __m512* x, const float* const* rows, int64_t count, float* out) {
  __m512 part[16];
  int64_t g = 0;
  for (; g + 16 <= count; g += 16) {
    for (int t = 0; t < 16; ++t) part[kSlot[t]] = dot_lanes<Chunks>(x, rows[g + t]);
    _mm512_storeu_ps(out + g, sum_each(part));
  }
  if (g < count) {
    for (int t = 0; t < 16; ++t) part[t] = _mm512_setzero_ps();
    for (int64_t t = 0; t < count - g; ++t) part[kSlot[t]] = dot_lanes<Chunks>(x, rows[g + t]);
    _mm512_storeu_ps(out + g, sum_each(part));
  }
}

// acc += sum_n weights[n] * rows[n], with four partial sums to hide the FMA latency
template <int Chunks>
DINAT_AVX512 inline void weighted_sum(const float* weights, const float* const* rows, int64_t count, __m512* acc) {
  __m512 part[4][Chunks];
  for (int u = 0; u < 4; ++u)
    for (int c = 0; c < Chunks; ++c) part[u][c] = _mm512_setzero_ps();
  int64_t n = 0;
  for (; n + 4 <= count; n += 4)
    for (int u = 0; u < 4; ++u) {
      const __m512 w = _mm512_set1_ps(weights[n + u]);
      for (int c = 0; c < Chunks; ++c)
        part[u][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(rows[n + u] + 16 * c), part[u][c]);
    }
  for (; n < count; ++n) {
    const __m512 w = _mm512_set1_ps(weights[n]);
    for (int c = 0; c < Chunks; ++c) part[0][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(rows[n] + 16 * c), part[0][c]);
  }
  for (int c = 0; c < Chunks; ++c)
    acc[c] = _mm512_add_ps(_mm512_add_ps(part[0][c], part[1][c]), _mm512_add_ps(part[2][c], part[3][c]));
}

template <int Chunks>
DINAT_AVX512 inline void load(const float* p, __m512* x, float scale = 1.0f) {
  for (int c = 0; c < Chunks; ++c) x[c] = _mm512_mul_ps(_mm512_loadu_ps(p + 16 * c), _mm512_set1_ps(scale));
}

struct Geometry {
  int64_t batch, heads, height, width, dim, kernel_h, kernel_w, window, rpb_w, rpb_hw;
  Geometry(const torch::Tensor& q, int64_t kh, int64_t kw)
      : batch(q.size(0)), heads(q.size(1)), height(q.size(2)), width(q.size(3)), dim(q.size(4)), kernel_h(kh),
        kernel_w(kw), window(kh * kw), rpb_w(2 * kw - 1), rpb_hw((2 * kh - 1) * (2 * kw - 1)) {}
};

// the keys (and values) of one query's window, in row-major order, and their biases
struct QueryWindow {
  alignas(64) const float* keys[kMaxWindow];
  alignas(64) const float* values[kMaxWindow];
  alignas(64) float bias[kMaxWindow];
};

template <int Chunks>
DINAT_AVX512 void forward_rows_avx512(const Geometry& g, const AxisWindows& rows, const AxisWindows& cols,
                                      const float* qp, const View5& qs, const float* kp, const View5& ks,
                                      const float* vp, const View5& vs, const float* bp, float* op, const View5& os,
                                      float* pp, float scale, int64_t begin, int64_t end) {
  QueryWindow w;
  alignas(64) float scores[kMaxWindow];
  const int64_t padded = (g.window + 15) / 16 * 16;
  std::fill_n(w.bias, g.window, 0.0f);
  for (int64_t n = g.window; n < padded; ++n) w.bias[n] = -std::numeric_limits<float>::infinity();
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / (g.heads * g.height), h = (task / g.height) % g.heads, i = task % g.height;
    const float* key_base = kp + b * ks.s0 + h * ks.s1;
    const float* value_base = vp + b * vs.s0 + h * vs.s1;
    const float* bias = bp != nullptr ? bp + h * g.rpb_hw : nullptr;
    const int64_t* row_keys = &rows.keys[i * g.kernel_h];
    const int64_t* row_rel = &rows.rel[i * g.kernel_h];
    for (int64_t j = 0; j < g.width; ++j) {
      // a window's keys along a row are evenly spaced (the dilation), and their biases adjacent
      const int64_t first_col = cols.keys[j * g.kernel_w], first_rel = cols.rel[j * g.kernel_w];
      const int64_t key_step = cols.dilation * ks.s3, value_step = cols.dilation * vs.s3;
      for (int64_t a = 0, n = 0; a < g.kernel_h; ++a) {
        const float* key = key_base + row_keys[a] * ks.s2 + first_col * ks.s3;
        const float* value = value_base + row_keys[a] * vs.s2 + first_col * vs.s3;
        for (int64_t c = 0; c < g.kernel_w; ++c, ++n, key += key_step, value += value_step) {
          w.keys[n] = key;
          w.values[n] = value;
        }
        if (bias != nullptr) std::copy_n(bias + row_rel[a] * g.rpb_w + first_rel, g.kernel_w, w.bias + a * g.kernel_w);
      }
      __m512 query[Chunks];
      load<Chunks>(qp + b * qs.s0 + h * qs.s1 + i * qs.s2 + j * qs.s3, query, scale);
      dots<Chunks>(query, w.keys, g.window, scores);
      __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t n = 0; n < padded; n += 16) {
        const __m512 s = _mm512_add_ps(_mm512_load_ps(scores + n), _mm512_load_ps(w.bias + n));
        _mm512_store_ps(scores + n, s);
        top = _mm512_max_ps(top, s);
      }
      const __m512 maximum = _mm512_set1_ps(_mm512_reduce_max_ps(top));
      __m512 total = _mm512_setzero_ps();
      for (int64_t n = 0; n < padded; n += 16) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores + n), maximum));
        _mm512_store_ps(scores + n, e);
        total = _mm512_add_ps(total, e);
      }
      const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
      for (int64_t n = 0; n < padded; n += 16)
        _mm512_store_ps(scores + n, _mm512_mul_ps(_mm512_load_ps(scores + n), inverse));
      __m512 acc[Chunks];
      weighted_sum<Chunks>(scores, w.values, g.window, acc);
      float* out = op + b * os.s0 + h * os.s1 + i * os.s2 + j * os.s3;
      for (int c = 0; c < Chunks; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
      if (pp != nullptr) std::copy(scores, scores + g.window, pp + (task * g.width + j) * g.window);
    }
  }
}

// one key of a query's window in the backward: grad_q += grad_score * key, and the key's and value's gradients
// (read, add, write): grad_k += grad_score * scale * q, grad_v += p * grad_out
template <int Chunks>
DINAT_AVX512 inline void key_value_gradients(float grad_score, float prob, const float* key, float* grad_key,
                                             float* grad_value, const __m512* scaled_query, const __m512* grad_out,
                                             __m512* grad_query) {
  const __m512 s = _mm512_set1_ps(grad_score), p = _mm512_set1_ps(prob);
  for (int c = 0; c < Chunks; ++c) {
    grad_query[c] = _mm512_fmadd_ps(s, _mm512_loadu_ps(key + 16 * c), grad_query[c]);
    _mm512_storeu_ps(grad_key + 16 * c, _mm512_fmadd_ps(s, scaled_query[c], _mm512_loadu_ps(grad_key + 16 * c)));
    _mm512_storeu_ps(grad_value + 16 * c, _mm512_fmadd_ps(p, grad_out[c], _mm512_loadu_ps(grad_value + 16 * c)));
  }
}

template <int Chunks>
DINAT_AVX512 void backward_heads_avx512(const Geometry& g, const AxisWindows& rows, const AxisWindows& cols,
                                        const float* gp, const View5& gs, const float* qp, const View5& qs,
                                        const float* kp, const View5& ks, const float* vp, const View5& vs,
                                        const float* pp, float* dqp, const View5& dqs, float* dkp, const View5& dks,
                                        float* dvp, const View5& dvs, float* grad_rpb, float scale, int64_t begin,
                                        int64_t end) {
  alignas(64) const float* values[kMaxWindow];  // the dot products take pointers; the rest walks window rows
  alignas(64) float grad_scores[kMaxWindow];
  alignas(64) float probs[kMaxWindow];
  const int64_t key_step = cols.dilation * ks.s3, value_step = cols.dilation * vs.s3;
  const int64_t grad_key_step = cols.dilation * dks.s3, grad_value_step = cols.dilation * dvs.s3;
  const int64_t padded = (g.window + 15) / 16 * 16;
  std::fill_n(probs, padded, 0.0f);
  // a window row's RPB gradients are kernel_w adjacent floats: one masked vector add
  const __mmask16 bias_lanes = static_cast<__mmask16>((1u << g.kernel_w) - 1);
  const bool vector_bias = g.kernel_w <= 16;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / g.heads, h = task % g.heads;
    const float* key_base = kp + b * ks.s0 + h * ks.s1;
    const float* value_base = vp + b * vs.s0 + h * vs.s1;
    float* grad_key_base = dkp + b * dks.s0 + h * dks.s1;
    float* grad_value_base = dvp + b * dvs.s0 + h * dvs.s1;
    float* bias_grad = grad_rpb != nullptr ? grad_rpb + task * g.rpb_hw : nullptr;
    for (const int64_t i : rows.order) {
      const int64_t* row_keys = &rows.keys[i * g.kernel_h];
      const int64_t* row_rel = &rows.rel[i * g.kernel_h];
      for (const int64_t j : cols.order) {
        const int64_t first_col = cols.keys[j * g.kernel_w], first_rel = cols.rel[j * g.kernel_w];
        for (int64_t a = 0, n = 0; a < g.kernel_h; ++a) {
          const float* value = value_base + row_keys[a] * vs.s2 + first_col * vs.s3;
          for (int64_t c = 0; c < g.kernel_w; ++c, ++n, value += value_step) values[n] = value;
        }
        const float* go = gp + b * gs.s0 + h * gs.s1 + i * gs.s2 + j * gs.s3;
        const float* query = qp + b * qs.s0 + h * qs.s1 + i * qs.s2 + j * qs.s3;
        std::copy_n(pp + ((task * g.height + i) * g.width + j) * g.window, g.window, probs);
        __m512 grad_out[Chunks], scaled_query[Chunks];
        load<Chunks>(go, grad_out);
        load<Chunks>(query, scaled_query, scale);
        dots<Chunks>(grad_out, values, g.window, grad_scores);  // grad_p = grad_out . v
        // softmax backward, 16 scores at a time: grad_score = p * (grad_p - sum(p * grad_p))
        __m512 weighted = _mm512_setzero_ps();
        for (int64_t n = 0; n < padded; n += 16)
          weighted = _mm512_fmadd_ps(_mm512_load_ps(probs + n), _mm512_load_ps(grad_scores + n), weighted);
        const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(weighted));
        for (int64_t n = 0; n < padded; n += 16)
          _mm512_store_ps(grad_scores + n, _mm512_mul_ps(_mm512_load_ps(probs + n),
                                                         _mm512_sub_ps(_mm512_load_ps(grad_scores + n), total)));
        if (bias_grad != nullptr) {
          for (int64_t a = 0; a < g.kernel_h; ++a) {
            float* bias_row = bias_grad + row_rel[a] * g.rpb_w + first_rel;
            const float* row_scores = grad_scores + a * g.kernel_w;
            if (vector_bias) {
              _mm512_mask_storeu_ps(bias_row, bias_lanes,
                                    _mm512_add_ps(_mm512_maskz_loadu_ps(bias_lanes, bias_row),
                                                  _mm512_maskz_loadu_ps(bias_lanes, row_scores)));
            } else {
              for (int64_t c = 0; c < g.kernel_w; ++c) bias_row[c] += row_scores[c];
            }
          }
        }
        // two partial sums of grad_q (a window row's keys alternate between them), so that consecutive keys' FMAs
        // do not wait on each other
        __m512 even[Chunks], odd[Chunks];
        for (int c = 0; c < Chunks; ++c) even[c] = odd[c] = _mm512_setzero_ps();
        for (int64_t a = 0; a < g.kernel_h; ++a) {
          const float* key = key_base + row_keys[a] * ks.s2 + first_col * ks.s3;
          float* grad_key = grad_key_base + row_keys[a] * dks.s2 + first_col * dks.s3;
          float* grad_value = grad_value_base + row_keys[a] * dvs.s2 + first_col * dvs.s3;
          const float* row_scores = grad_scores + a * g.kernel_w;
          const float* row_probs = probs + a * g.kernel_w;
          int64_t c = 0;
          for (; c + 1 < g.kernel_w; c += 2) {
            key_value_gradients<Chunks>(row_scores[c], row_probs[c], key + c * key_step, grad_key + c * grad_key_step,
                                        grad_value + c * grad_value_step, scaled_query, grad_out, even);
            key_value_gradients<Chunks>(row_scores[c + 1], row_probs[c + 1], key + (c + 1) * key_step,
                                        grad_key + (c + 1) * grad_key_step, grad_value + (c + 1) * grad_value_step,
                                        scaled_query, grad_out, odd);
          }
          if (c < g.kernel_w)
            key_value_gradients<Chunks>(row_scores[c], row_probs[c], key + c * key_step, grad_key + c * grad_key_step,
                                        grad_value + c * grad_value_step, scaled_query, grad_out, even);
        }
        __m512 grad_query[Chunks];
        for (int c = 0; c < Chunks; ++c)
          grad_query[c] = _mm512_mul_ps(_mm512_add_ps(even[c], odd[c]), _mm512_set1_ps(scale));
        float* dq = dqp + b * dqs.s0 + h * dqs.s1 + i * dqs.s2 + j * dqs.s3;
        for (int c = 0; c < Chunks; ++c)
          _mm512_storeu_ps(dq + 16 * c, grad_query[c]);
      }
    }
  }
}

template <typename Fn>
bool with_chunks(int64_t dim, Fn&& fn) {
  switch (dim) {
    case 16: fn(std::integral_constant<int, 1>()); return true;
    case 32: fn(std::integral_constant<int, 2>()); return true;
    case 48: fn(std::integral_constant<int, 3>()); return true;
    case 64: fn(std::integral_constant<int, 4>()); return true;
    default: return false;
  }
}

// an AVX-512 CPU, a head_dim of whole vectors up to 64 and at most kMaxWindow keys
bool vector_shape(const torch::Tensor& q, int64_t window) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  const int64_t dim = q.size(4);
  return avx512 && window <= kMaxWindow && dim % 16 == 0 && dim <= 64;
}

bool fast_path(const torch::Tensor& q, int64_t window) {
  return q.scalar_type() == torch::kFloat && vector_shape(q, window);
}

// ---- float32 forward on AVX-512 with 16 queries per vector ------------------------------------------------
// Lanes are up to 16 queries of one row. Per (batch, head), each key and value row is copied once into a
// transposed layout, [channel][column] with the columns of each dilation group side by side, so that for one channel
// the keys of the lanes' windows lie within 32 adjacent floats: two loads and a permute give the key of window
// column c of every lane (even where the lanes' windows are consecutive: unaligned loads that cross a cache line
// measured twice as slow here), and scores, softmax and the weighted sum of values are vectors over the lanes,
// without horizontal sums.

struct LaneTile {
  int64_t count;                      // lanes in use
  int64_t base;                       // transposed column of the first lane's first key
  alignas(64) int32_t start[16];      // each lane's window start, relative to base
  alignas(64) int32_t rel[16];        // each lane's RPB column of its window's first key
  int64_t column[16];                 // each lane's query column in the map
};

// the lanes of a row: each group's queries in order, groups side by side, cut where 16 lanes are full or the
// next lane's window would not fit in the 32 floats (+ kernel_w - 1) that one permute reads
std::vector<LaneTile> lane_tiles(int64_t width, int64_t kernel_w, int64_t dilation, std::vector<int64_t>& position) {
  std::vector<LaneTile> tiles;
  position.assign(width, 0);
  int64_t group_start = 0;
  LaneTile tile{};
  auto flush = [&] {
    if (tile.count > 0) tiles.push_back(tile);
    tile = LaneTile{};
  };
  for (int64_t group = 0; group < dilation; ++group) {
    const int64_t length = (width - group + dilation - 1) / dilation;
    for (int64_t p = 0; p < length; ++p) {
      const int64_t start = std::min(std::max(p - kernel_w / 2, int64_t(0)), length - kernel_w);
      const int64_t window_start = group_start + start;
      if (tile.count == 16 || (tile.count > 0 && window_start - tile.base + kernel_w - 1 >= 32)) flush();
      if (tile.count == 0) {
        tile.base = window_start;
      }
      const int64_t lane = tile.count++;
      tile.start[lane] = static_cast<int32_t>(window_start - tile.base);
      tile.rel[lane] = static_cast<int32_t>(start - p + kernel_w - 1);
      tile.column[lane] = group + p * dilation;
      position[group + p * dilation] = group_start + p;
    }
    group_start += length;
  }
  flush();
  for (auto& t : tiles)
    for (int64_t lane = t.count; lane < 16; ++lane) {  // unused lanes repeat the last one
      t.start[lane] = t.start[t.count - 1];
      t.rel[lane] = t.rel[t.count - 1];
      t.column[lane] = t.column[t.count - 1];
    }
  return tiles;
}

// m[r] lane c -> m[c] lane r (a 16x16 transpose in registers)
DINAT_AVX512 inline void transpose16(__m512* m) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(m[2 * i], m[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(m[2 * i], m[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    m[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    m[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    m[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    m[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(m[8 * i + j], m[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(m[8 * i + j], m[8 * i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    m[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    m[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// ---- bfloat16 pair products, on CPUs with AVX512-BF16 (the group and 16-queries paths) ----------------------
// vdpbf16ps multiplies 16 pairs of bfloat16 and adds both products of each pair to a float32 sum: a pair of
// multiply-adds per lane, where the float32 paths widen the bfloat16 inputs and do one. The scores are sums of
// the exact products of q and k in float32, the softmax runs in float32, and the values are weighted with the
// probabilities rounded to bfloat16 (a relative error of at most 2^-9 each, the precision of the bfloat16 values
// they weight). Operands hold a pair of bfloat16 in one uint32, the first in its low half.
#define DINAT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// head_dims of whole 32-value (one vector of pairs) chunks, on a CPU with the instructions
bool pair_products_fit(int64_t dim) {
  static const bool instructions = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return instructions && dim % 32 == 0;
}

// 16 rows of 2 * pairs bfloat16 -> out[p * stride + l]: pair p of row l, for p < pairs (a multiple of 16)
DINAT_AVX512_BF16 inline void transpose_pair_rows(const uint16_t* const* rows, int64_t pairs, uint32_t* out,
                                                  int64_t stride) {
  for (int64_t chunk = 0; chunk < pairs; chunk += 16) {
    __m512 m[16];
    for (int l = 0; l < 16; ++l) m[l] = _mm512_castsi512_ps(_mm512_loadu_si512(rows[l] + 2 * chunk));
    transpose16(m);
    for (int e = 0; e < 16; ++e) _mm512_storeu_ps(reinterpret_cast<float*>(out + (chunk + e) * stride), m[e]);
  }
}

// float32 bits rounded to nearest even at bit 16 (as torch rounds to bfloat16): the upper half is the bfloat16
DINAT_AVX512 inline __m512i rounded_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
}

// per lane, the pair (first, second) of float32 values rounded to bfloat16 (no NaN: these are probabilities)
DINAT_AVX512 inline __m512i round_to_pairs(__m512 first, __m512 second) {
  return _mm512_or_si512(_mm512_srli_epi32(rounded_bits(first), 16),
                         _mm512_and_si512(rounded_bits(second), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// rows[l] (16 pointers to `dim` values, Src float32 or bfloat16) -> out[e * 16 + l] for e < dim, as float32,
// each row times `scale`
template <typename Src>
DINAT_AVX512 inline void gather_transposed(const Src* const* rows, int64_t dim, float scale, float* out,
                                           int64_t out_stride) {
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t chunk = 0; chunk < dim; chunk += 16) {
    __m512 m[16];
    for (int l = 0; l < 16; ++l) m[l] = _mm512_mul_ps(load16(rows[l] + chunk), factor);
    transpose16(m);
    for (int e = 0; e < 16; ++e) _mm512_storeu_ps(out + (chunk + e) * out_stride, m[e]);
  }
}

// acc[c] = sum_e query_t[e] * (keys of channel e, window column c)
template <int KernelW>
DINAT_AVX512 inline void window_row_scores(const float* query_t, const float* keys, int64_t stride, int64_t dim,
                                           const __m512i* index, __m512* acc) {
  for (int c = 0; c < KernelW; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t e = 0; e < dim; ++e, keys += stride) {
    const __m512 q = _mm512_load_ps(query_t + 16 * e);
    const __m512 lo = _mm512_loadu_ps(keys), hi = _mm512_loadu_ps(keys + 16);
    for (int c = 0; c < KernelW; ++c) acc[c] = _mm512_fmadd_ps(q, _mm512_permutex2var_ps(lo, index[c], hi), acc[c]);
  }
}

// out_t[e] += sum_c probs[c] * (values of channel e, window column c) for eight channels at once (eight
// independent sums keep the FMA unit busy)
constexpr int kValueChannels = 8;
template <int KernelW>
DINAT_AVX512 inline void window_row_values(const float* probs, const float* values, int64_t stride,
                                           const __m512i* index, __m512* acc) {
  for (int u = 0; u < kValueChannels; ++u, values += stride) {
    const __m512 lo = _mm512_loadu_ps(values), hi = _mm512_loadu_ps(values + 16);
    for (int c = 0; c < KernelW; ++c)
      acc[u] = _mm512_fmadd_ps(_mm512_load_ps(probs + 16 * c), _mm512_permutex2var_ps(lo, index[c], hi), acc[u]);
  }
}

// the scores of window row a (acc) plus its RPB row (bias: rows of 32 floats, or none) -> scores; top: their
// running maximum
template <int KernelW>
DINAT_AVX512 inline void store_window_row_scores(__m512* acc, const float* bias, int64_t rel_row,
                                                 const __m512i* rel_index, float* scores, __m512& top) {
  if (bias != nullptr) {
    const float* bias_row = bias + rel_row * 32;
    const __m512 lo = _mm512_loadu_ps(bias_row), hi = _mm512_loadu_ps(bias_row + 16);
    for (int c = 0; c < KernelW; ++c) acc[c] = _mm512_add_ps(acc[c], _mm512_permutex2var_ps(lo, rel_index[c], hi));
  }
  for (int c = 0; c < KernelW; ++c) {
    _mm512_store_ps(scores + 16 * c, acc[c]);
    top = _mm512_max_ps(top, acc[c]);
  }
}

// scores[16 n + l] for n < window -> the softmax over n of each lane l; top: each lane's maximum
DINAT_AVX512 inline void normalize_lanes(float* scores, int64_t window, __m512 top) {
  __m512 total = _mm512_setzero_ps();
  for (int64_t n = 0; n < window; ++n) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores + 16 * n), top));
    _mm512_store_ps(scores + 16 * n, e);
    total = _mm512_add_ps(total, e);
  }
  const __m512 inverse = _mm512_div_ps(_mm512_set1_ps(1.0f), total);
  for (int64_t n = 0; n < window; ++n)
    _mm512_store_ps(scores + 16 * n, _mm512_mul_ps(_mm512_load_ps(scores + 16 * n), inverse));
}

// index[c] / rel_index[c]: each lane's window column c in the transposed rows / in a padded RPB row
template <int KernelW>
DINAT_AVX512 inline void lane_indices(const LaneTile& tile, __m512i* index, __m512i* rel_index) {
  const __m512i start = _mm512_load_si512(tile.start), rel = _mm512_load_si512(tile.rel);
  for (int c = 0; c < KernelW; ++c) {
    index[c] = _mm512_add_epi32(start, _mm512_set1_epi32(c));
    rel_index[c] = _mm512_add_epi32(rel, _mm512_set1_epi32(c));
  }
}

// key_rows[a] / value_rows[a]: the transposed keys / values of window row a, [channel][column]
template <int KernelW>
DINAT_AVX512 void forward_tile(const Geometry& g, const LaneTile& tile, const float* const* key_rows,
                               const float* const* value_rows, const int64_t* row_rel, int64_t padded_width,
                               const float* bias, const float* query_t, float* scores, float* out_t) {
  __m512i index[KernelW], rel_index[KernelW];
  lane_indices<KernelW>(tile, index, rel_index);
  const int64_t channel_stride = padded_width;
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t a = 0; a < g.kernel_h; ++a) {
    __m512 acc[KernelW];
    window_row_scores<KernelW>(query_t, key_rows[a] + tile.base, channel_stride, g.dim, index, acc);
    store_window_row_scores<KernelW>(acc, bias, row_rel[a], rel_index, scores + 16 * a * KernelW, top);
  }
  normalize_lanes(scores, g.kernel_h * KernelW, top);
  for (int64_t e = 0; e < g.dim; e += kValueChannels) {
    __m512 acc[kValueChannels];
    for (int u = 0; u < kValueChannels; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t a = 0; a < g.kernel_h; ++a)
      window_row_values<KernelW>(scores + 16 * a * KernelW, value_rows[a] + e * channel_stride + tile.base,
                                 channel_stride, index, acc);
    for (int u = 0; u < kValueChannels; ++u) _mm512_store_ps(out_t + 16 * (e + u), acc[u]);
  }
}

// ---- the 16-queries path with bfloat16 pair products ------------------------------------------------------
// A key slot holds [channel pair][column]. A value slot holds, for each channel and column x, the pair (value at x,
// value at x + 1): one permute gives every lane the values of its window columns c and c + 1, wherever its
// window starts. An odd window's last column pairs with its left neighbour, weighted 0.

// row (count widened bfloat16, zero in its last 16) -> row[x] = the pair (row[x], row[x + 1]), in place
DINAT_AVX512 inline void neighbour_pairs(float* row, int64_t count) {
  const __m512i upper = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t x = 0; x + 16 < count; x += 16) {
    const __m512i here = _mm512_castps_si512(_mm512_loadu_ps(row + x));
    const __m512i next = _mm512_castps_si512(_mm512_loadu_ps(row + x + 1));
    _mm512_storeu_ps(row + x, _mm512_castsi512_ps(_mm512_or_si512(_mm512_srli_epi32(here, 16),
                                                                  _mm512_and_si512(next, upper))));
  }
}

// acc[c] = sum_p query_t[p] . (keys of channel pair p, window column c)
template <int KernelW>
DINAT_AVX512_BF16 inline void window_row_scores_pairs(const uint32_t* query_t, const uint32_t* keys, int64_t stride,
                                                      int64_t pairs, const __m512i* index, __m512* acc) {
  for (int c = 0; c < KernelW; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p, keys += stride) {
    const __m512bh q = (__m512bh)_mm512_load_si512(query_t + 16 * p);
    const __m512i lo = _mm512_loadu_si512(keys), hi = _mm512_loadu_si512(keys + 16);
    for (int c = 0; c < KernelW; ++c)
      acc[c] = _mm512_dpbf16_ps(acc[c], q, (__m512bh)_mm512_permutex2var_epi32(lo, index[c], hi));
  }
}

// the first window column of column pair i: (2i, 2i + 1), and (K - 2, K - 1) for an odd window's last
template <int KernelW>
constexpr int pair_column(int i) { return 2 * i + 1 < KernelW ? 2 * i : KernelW - 2; }

// out_t[e] += sum_i prob_pairs[i] . (value pair of channel e at column pair_column(i)), for eight channels
template <int KernelW>
DINAT_AVX512_BF16 inline void window_row_values_pairs(const uint32_t* prob_pairs, const uint32_t* values,
                                                      int64_t stride, const __m512i* index, __m512* acc) {
  for (int u = 0; u < kValueChannels; ++u, values += stride) {
    const __m512i lo = _mm512_loadu_si512(values), hi = _mm512_loadu_si512(values + 16);
    for (int i = 0; i < (KernelW + 1) / 2; ++i)
      acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_load_si512(prob_pairs + 16 * i),
                                (__m512bh)_mm512_permutex2var_epi32(lo, index[pair_column<KernelW>(i)], hi));
  }
}

// forward_tile on bfloat16 pairs: query_t[16 p + l] is channel pair p of lane l's query (unscaled); key_rows and
// value_rows are slots of pairs as above
template <int KernelW>
DINAT_AVX512_BF16 void forward_tile_pairs(const Geometry& g, const LaneTile& tile, const uint32_t* const* key_rows,
                                          const uint32_t* const* value_rows, const int64_t* row_rel,
                                          int64_t padded_width, const float* bias, const uint32_t* query_t,
                                          float scale, float* scores, uint32_t* prob_pairs, float* out_t) {
  constexpr int kPairs = (KernelW + 1) / 2;
  __m512i index[KernelW], rel_index[KernelW];
  lane_indices<KernelW>(tile, index, rel_index);
  const __m512 factor = _mm512_set1_ps(scale);
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t a = 0; a < g.kernel_h; ++a) {
    __m512 acc[KernelW];
    window_row_scores_pairs<KernelW>(query_t, key_rows[a] + tile.base, padded_width, g.dim / 2, index, acc);
    for (int c = 0; c < KernelW; ++c) acc[c] = _mm512_mul_ps(acc[c], factor);
    store_window_row_scores<KernelW>(acc, bias, row_rel[a], rel_index, scores + 16 * a * KernelW, top);
  }
  normalize_lanes(scores, g.kernel_h * KernelW, top);
  for (int64_t a = 0; a < g.kernel_h; ++a) {
    const float* row = scores + 16 * a * KernelW;
    for (int i = 0; i < kPairs; ++i) {
      const int c = pair_column<KernelW>(i);
      const __m512 first = 2 * i + 1 < KernelW ? _mm512_load_ps(row + 16 * c) : _mm512_setzero_ps();
      _mm512_store_si512(prob_pairs + 16 * (a * kPairs + i), round_to_pairs(first, _mm512_load_ps(row + 16 * (c + 1))));
    }
  }
  for (int64_t e = 0; e < g.dim; e += kValueChannels) {
    __m512 acc[kValueChannels];
    for (int u = 0; u < kValueChannels; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t a = 0; a < g.kernel_h; ++a)
      window_row_values_pairs<KernelW>(prob_pairs + 16 * a * kPairs, value_rows[a] + e * padded_width + tile.base,
                                       padded_width, index, acc);
    for (int u = 0; u < kValueChannels; ++u) _mm512_store_ps(out_t + 16 * (e + u), acc[u]);
  }
}

// the inverse of gather_transposed: in[e * 16 + l] for e < count -> row of lane l (at base + column * stride),
// for the lanes in `used`, as Out (float32, or bfloat16 where count is a multiple of 16)
template <typename Out>
DINAT_AVX512 inline void scatter_transposed(const float* in, int64_t count, const LaneTile& tile, Out* base,
                                            int64_t stride, __mmask16 used) {
  for (int64_t chunk = 0; chunk < count; chunk += 16) {
    const int64_t width = std::min<int64_t>(16, count - chunk);
    const __mmask16 part = static_cast<__mmask16>((1u << width) - 1);
    __m512 m[16];
    for (int e = 0; e < 16; ++e) m[e] = e < width ? _mm512_load_ps(in + (chunk + e) * 16) : _mm512_setzero_ps();
    transpose16(m);
    for (int l = 0; l < 16; ++l)
      if ((used >> l) & 1) {
        if constexpr (std::is_same_v<Out, float>)
          _mm512_mask_storeu_ps(base + tile.column[l] * stride + chunk, part, m[l]);
        else
          store16(base + tile.column[l] * stride + chunk, m[l]);
      }
  }
}

template <int KernelW, typename Src>
DINAT_AVX512 void forward_heads_lanes(const Geometry& g, const AxisWindows& rows, const std::vector<LaneTile>& tiles,
                                      const std::vector<int64_t>& position, const Src* qp, const View5& qs,
                                      const Src* kp, const View5& ks, const Src* vp, const View5& vs,
                                      const float* bp, Src* op, const View5& os, float* pp, float scale,
                                      int64_t begin, int64_t end) {
  const int64_t padded_width = g.width + 32;  // the permute's 32-float reads stay inside a row
  // Transposed key and value rows live in a ring of kernel_h slots: rows are visited group by group, so that
  // the next row's window shares all but one key row with this one, and the ring stays in L2 (the whole map
  // transposed would not, at DiNAT's first stage).
  const int64_t row_floats = g.dim * padded_width;
  std::vector<float> keys_t(g.kernel_h * row_floats, 0.0f), values_t(keys_t.size(), 0.0f);
  std::vector<int64_t> slot_row(g.kernel_h);
  std::vector<float> bias(bp != nullptr ? (2 * g.kernel_h - 1) * 32 : 0, 0.0f);
  std::vector<Src> zeros(g.dim, Src(0));
  std::vector<int64_t> column_at(g.width);
  for (int64_t x = 0; x < g.width; ++x) column_at[position[x]] = x;
  alignas(64) float query_t[64 * 16];
  alignas(64) float out_t[64 * 16];
  std::vector<float> scores_storage(kMaxWindow * 16 + 16);
  float* scores = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scores_storage.data()) + 63) & ~uintptr_t(63));
  std::vector<const float*> key_rows(g.kernel_h), value_rows(g.kernel_h);
  // bfloat16 pair products (forward_tile_pairs): the slots hold pairs, the query is transposed as pairs
  const bool pairs = std::is_same_v<Src, uint16_t> && pair_products_fit(g.dim);
  alignas(64) uint32_t query_pairs[32 * 16];
  std::vector<uint32_t> prob_pairs_storage(pairs ? kMaxWindow * 16 + 16 : 0);
  uint32_t* prob_pairs =
      reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(prob_pairs_storage.data()) + 63) & ~uintptr_t(63));
  std::vector<const uint32_t*> key_pairs(g.kernel_h), value_pairs(g.kernel_h);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / g.heads, h = task % g.heads;
    std::fill(slot_row.begin(), slot_row.end(), int64_t(-1));
    // key and value row r transposed into its slot, 16 columns at a time (columns past the row's end read a row
    // of zeros); rows of one window fall in distinct slots, since they are consecutive within their group
    auto transposed_row = [&](int64_t r) {
      const int64_t slot = (r / rows.dilation) % g.kernel_h;
      float* key_slot = keys_t.data() + slot * row_floats;
      float* value_slot = values_t.data() + slot * row_floats;
      if (slot_row[slot] != r) {
        slot_row[slot] = r;
        for (int64_t first = 0; first < g.width; first += 16) {
          const Src* key_src[16];
          const Src* value_src[16];
          for (int64_t l = 0; l < 16; ++l) {
            const bool inside = first + l < g.width;
            const int64_t x = inside ? column_at[first + l] : 0;
            key_src[l] = inside ? kp + b * ks.s0 + h * ks.s1 + r * ks.s2 + x * ks.s3 : zeros.data();
            value_src[l] = inside ? vp + b * vs.s0 + h * vs.s1 + r * vs.s2 + x * vs.s3 : zeros.data();
          }
          if constexpr (std::is_same_v<Src, uint16_t>) {
            if (pairs) {
              transpose_pair_rows(key_src, g.dim / 2, reinterpret_cast<uint32_t*>(key_slot) + first, padded_width);
              gather_transposed(value_src, g.dim, 1.0f, value_slot + first, padded_width);
              continue;
            }
          }
          gather_transposed(key_src, g.dim, 1.0f, key_slot + first, padded_width);
          gather_transposed(value_src, g.dim, 1.0f, value_slot + first, padded_width);
        }
        if (pairs)
          for (int64_t e = 0; e < g.dim; ++e) neighbour_pairs(value_slot + e * padded_width, padded_width);
      }
      return std::make_pair(static_cast<const float*>(key_slot), static_cast<const float*>(value_slot));
    };
    if (bp != nullptr)
      for (int64_t row = 0; row < 2 * g.kernel_h - 1; ++row)
        std::copy_n(bp + h * g.rpb_hw + row * g.rpb_w, g.rpb_w, bias.data() + row * 32);
    for (const int64_t i : rows.order) {
      const int64_t* row_keys = &rows.keys[i * g.kernel_h];
      const int64_t* row_rel = &rows.rel[i * g.kernel_h];
      for (int64_t a = 0; a < g.kernel_h; ++a) {
        std::tie(key_rows[a], value_rows[a]) = transposed_row(row_keys[a]);
        key_pairs[a] = reinterpret_cast<const uint32_t*>(key_rows[a]);
        value_pairs[a] = reinterpret_cast<const uint32_t*>(value_rows[a]);
      }
      for (const LaneTile& tile : tiles) {
        const Src* query_rows[16];
        for (int64_t lane = 0; lane < 16; ++lane)
          query_rows[lane] = qp + b * qs.s0 + h * qs.s1 + i * qs.s2 + tile.column[lane] * qs.s3;
        const float* bias_h = bp != nullptr ? bias.data() : nullptr;
        if constexpr (std::is_same_v<Src, uint16_t>) {
          if (pairs) {
            transpose_pair_rows(query_rows, g.dim / 2, query_pairs, 16);
            forward_tile_pairs<KernelW>(g, tile, key_pairs.data(), value_pairs.data(), row_rel, padded_width, bias_h,
                                        query_pairs, scale, scores, prob_pairs, out_t);
          }
        }
        if (!pairs) {
          gather_transposed(query_rows, g.dim, scale, query_t, 16);
          forward_tile<KernelW>(g, tile, key_rows.data(), value_rows.data(), row_rel, padded_width, bias_h, query_t,
                                scores, out_t);
        }
        const __mmask16 used = static_cast<__mmask16>((1u << tile.count) - 1);
        scatter_transposed(out_t, g.dim, tile, op + b * os.s0 + h * os.s1 + i * os.s2, os.s3, used);
        if (pp != nullptr)
          scatter_transposed(scores, g.window, tile, pp + ((b * g.heads + h) * g.height + i) * g.width * g.window,
                             g.window, used);
      }
    }
  }
}

template <typename Fn>
bool with_kernel_width(int64_t kernel_w, Fn&& fn) {
  switch (kernel_w) {
    case 3: fn(std::integral_constant<int, 3>()); return true;
    case 5: fn(std::integral_constant<int, 5>()); return true;
    case 7: fn(std::integral_constant<int, 7>()); return true;
    case 9: fn(std::integral_constant<int, 9>()); return true;
    case 11: fn(std::integral_constant<int, 11>()); return true;
    case 13: fn(std::integral_constant<int, 13>()); return true;
    default: return false;
  }
}

// ---- float32 on AVX-512 where each dilation group is exactly one window ------------------------------------
// When height == kernel_h * dil_h and width == kernel_w * dil_w, every query of a dilation group sees the whole
// group (at 224x224: all of DiNAT's dilated layers, and every layer of the last stage). Attention within a group
// is then dense, (window x head_dim) by (head_dim x window), and runs as small register-blocked matrix products
// on copies in L1, a few times faster than one window per query. Same arithmetic, summed in another order.

constexpr int64_t kMaxGroupWindow = 64;  // at most four vectors per score row

bool whole_groups(const Geometry& g, int64_t dil_h, int64_t dil_w) {
  return g.height == g.kernel_h * dil_h && g.width == g.kernel_w * dil_w && g.window <= kMaxGroupWindow;
}

// rows of a register tile: Width accumulators per row, at most 28 of the 32 vector registers
template <int Width>
constexpr int kTileRows = Width == 4 ? 6 : 7;

// c[r][:] = init[r][:] (or 0) + sum_e a[r * lda + e] * b[e][:] for Rows rows; b, c and init rows are Width vectors
template <int Width, int Rows>
DINAT_AVX512 inline void panel_tile(const float* a, int64_t lda, const float* b, int64_t depth, const float* init,
                                   float* c) {
  constexpr int64_t ld = 16 * Width;
  __m512 acc[Rows][Width];
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < Width; ++j)
      acc[r][j] = init != nullptr ? _mm512_load_ps(init + r * ld + 16 * j) : _mm512_setzero_ps();
  for (int64_t e = 0; e < depth; ++e) {
    __m512 row[Width];
    for (int j = 0; j < Width; ++j) row[j] = _mm512_load_ps(b + e * ld + 16 * j);
    for (int r = 0; r < Rows; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + e]);
      for (int j = 0; j < Width; ++j) acc[r][j] = _mm512_fmadd_ps(x, row[j], acc[r][j]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < Width; ++j) _mm512_store_ps(c + r * ld + 16 * j, acc[r][j]);
}

// out[r][:] = alpha * sum_n a[r * lda + n] * b[n][:] for Rows rows; b rows are Width vectors, out rows anywhere
// (float32 or bfloat16)
template <int Width, int Rows, typename Out>
DINAT_AVX512 inline void rows_tile(const float* a, int64_t lda, const float* b, int64_t depth, float alpha,
                                  Out* const* out) {
  constexpr int64_t ld = 16 * Width;
  __m512 acc[Rows][Width];
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < Width; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t n = 0; n < depth; ++n) {
    __m512 row[Width];
    for (int j = 0; j < Width; ++j) row[j] = _mm512_load_ps(b + n * ld + 16 * j);
    for (int r = 0; r < Rows; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + n]);
      for (int j = 0; j < Width; ++j) acc[r][j] = _mm512_fmadd_ps(x, row[j], acc[r][j]);
    }
  }
  const __m512 factor = _mm512_set1_ps(alpha);
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < Width; ++j) store16(out[r] + 16 * j, _mm512_mul_ps(acc[r][j], factor));
}

// calls tile(integral_constant<Rows>, first_row) over `rows` rows in tiles of kTileRows<Width>
template <int Width, typename Fn>
DINAT_AVX512 inline void over_tiles(int64_t rows, Fn&& tile) {
  constexpr int full = kTileRows<Width>;
  int64_t r = 0;
  for (; r + full <= rows; r += full) tile(std::integral_constant<int, full>(), r);
  switch (rows - r) {
    case 1: tile(std::integral_constant<int, 1>(), r); break;
    case 2: tile(std::integral_constant<int, 2>(), r); break;
    case 3: tile(std::integral_constant<int, 3>(), r); break;
    case 4: tile(std::integral_constant<int, 4>(), r); break;
    case 5: tile(std::integral_constant<int, 5>(), r); break;
    case 6: tile(std::integral_constant<int, 6>(), r); break;
    default: break;
  }
}

template <int Width>
DINAT_AVX512 void panel_product(const float* a, int64_t lda, int64_t rows, const float* b, int64_t depth,
                                const float* init, float* c) {
  constexpr int64_t ld = 16 * Width;
  over_tiles<Width>(rows, [&](auto tile_rows, int64_t r) {
    panel_tile<Width, decltype(tile_rows)::value>(a + r * lda, lda, b, depth, init != nullptr ? init + r * ld : nullptr,
                                                  c + r * ld);
  });
}

template <int Width, typename Out>
DINAT_AVX512 void rows_product(const float* a, int64_t lda, int64_t rows, const float* b, int64_t depth, float alpha,
                               Out* const* out) {
  over_tiles<Width>(rows, [&](auto tile_rows, int64_t r) {
    rows_tile<Width, decltype(tile_rows)::value>(a + r * lda, lda, b, depth, alpha, out + r);
  });
}

// a (rows x 16 * Blocks) matrix -> its transpose, both with row stride 16 * Blocks, 16x16 blocks in registers
template <int Blocks>
DINAT_AVX512 void transpose_square(const float* in, float* out) {
  constexpr int64_t ld = 16 * Blocks;
  for (int bi = 0; bi < Blocks; ++bi)
    for (int bj = 0; bj < Blocks; ++bj) {
      __m512 m[16];
      for (int l = 0; l < 16; ++l) m[l] = _mm512_load_ps(in + (16 * bi + l) * ld + 16 * bj);
      transpose16(m);
      for (int l = 0; l < 16; ++l) _mm512_store_ps(out + (16 * bj + l) * ld + 16 * bi, m[l]);
    }
}

// each group's token positions (row-major over the group, as the window's keys are ordered) and RPB biases
struct GroupLayout {
  int64_t groups;
  std::vector<int64_t> offset_y, offset_x;  // token t of group (gy, gx) is at (offset_y[t] + gy, offset_x[t] + gx)
  GroupLayout(const Geometry& g, int64_t dil_h, int64_t dil_w) : groups(dil_h * dil_w) {
    for (int64_t t = 0; t < g.window; ++t) {
      offset_y.push_back(t / g.kernel_w * dil_h);
      offset_x.push_back(t % g.kernel_w * dil_w);
    }
  }
};

// `count` floats set to `fill`, 64-byte aligned, from a buffer of the calling thread kept across calls (one per
// slot): fresh allocations of this size would be mapped and page-faulted anew on every call
float* thread_buffer(int slot, int64_t count, float fill) {
  thread_local std::vector<float> storage[2];
  std::vector<float>& buffer = storage[slot];
  if (static_cast<int64_t>(buffer.size()) < count + 16) buffer.resize(count + 16);
  float* data = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
  std::fill_n(data, count, fill);
  return data;
}

// fn(r, n, rel) for every query r and key n of a group (row-major over the group) and their RPB index
template <typename Fn>
void for_query_key_pairs(const Geometry& g, Fn&& fn) {
  for (int64_t qa = 0, r = 0; qa < g.kernel_h; ++qa)
    for (int64_t qc = 0; qc < g.kernel_w; ++qc, ++r)
      for (int64_t ka = 0, n = 0; ka < g.kernel_h; ++ka) {
        const int64_t rel_row = (ka - qa + g.kernel_h - 1) * g.rpb_w + g.kernel_w - 1 - qc;
        for (int64_t kc = 0; kc < g.kernel_w; ++kc, ++n) fn(r, n, rel_row + kc);
      }
}

// bias[h][r][n]: the RPB of query r and key n of a group (0 without RPB), -inf for the padding keys n >= window
const float* group_bias(const Geometry& g, const float* bp, int64_t padded) {
  float* bias = thread_buffer(0, g.heads * g.window * padded, -std::numeric_limits<float>::infinity());
  for (int64_t h = 0; h < g.heads; ++h)
    for_query_key_pairs(g, [&](int64_t r, int64_t n, int64_t rel) {
      bias[(h * g.window + r) * padded + n] = bp != nullptr ? bp[h * g.rpb_hw + rel] : 0.0f;
    });
  return bias;
}

// zero-filled scratch of a worker thread: `count` matrices of 64 x 64 floats
struct Scratch {
  float* data;
  explicit Scratch(int count) : data(thread_buffer(1, count * kMaxGroupWindow * kMaxGroupWindow, 0.0f)) {}
  float* operator[](int i) { return data + i * kMaxGroupWindow * kMaxGroupWindow; }
};

// rows[t] of the group (dim floats each) -> out: row-major [t][dim] (times scale)
template <int Chunks, typename Src>
DINAT_AVX512 inline void gather_rows(const Src* const* rows, int64_t count, float scale, float* out) {
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t t = 0; t < count; ++t)
    for (int c = 0; c < Chunks; ++c)
      _mm512_store_ps(out + t * 16 * Chunks + 16 * c, _mm512_mul_ps(load16(rows[t] + 16 * c), factor));
}

// rows[t] -> out[e][t] (row stride 16 * Width), columns t >= count zero
template <int Width, typename Src>
DINAT_AVX512 inline void gather_columns(const Src* const* rows, int64_t count, int64_t dim, const Src* zeros,
                                        float* out) {
  for (int64_t first = 0; first < 16 * Width; first += 16) {
    const Src* block[16];
    for (int l = 0; l < 16; ++l) block[l] = first + l < count ? rows[first + l] : zeros;
    gather_transposed(block, dim, 1.0f, out + first, 16 * Width);
  }
}

// row (Width vectors of scores, -inf past the window) -> s: its softmax
template <int Width>
DINAT_AVX512 inline void softmax_row(const float* row, __m512 (&s)[Width]) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < Width; ++j) top = _mm512_max_ps(top, s[j] = _mm512_load_ps(row + 16 * j));
  const __m512 maximum = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int j = 0; j < Width; ++j) {
    s[j] = exp_nonpositive(_mm512_sub_ps(s[j], maximum));
    total = _mm512_add_ps(total, s[j]);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int j = 0; j < Width; ++j) s[j] = _mm512_mul_ps(s[j], inverse);
}

// acc[r][j] += sum_p a[r * lda + p] * b[p][16 j .. 16 j + 15] as bfloat16 pairs; b rows are Width vectors
template <int Width, int Rows>
DINAT_AVX512_BF16 inline void pair_products(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t depth,
                                            __m512 (&acc)[Rows][Width]) {
  for (int64_t p = 0; p < depth; ++p) {
    __m512i row[Width];
    for (int j = 0; j < Width; ++j) row[j] = _mm512_load_si512(b + (p * Width + j) * 16);
    for (int r = 0; r < Rows; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + p]));
      for (int j = 0; j < Width; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, (__m512bh)row[j]);
    }
  }
}

// rows[n] (n < count, 2 * pairs bfloat16 each) -> out[p][n] (row stride 16 * Width), columns n >= count zero
template <int Width>
DINAT_AVX512_BF16 inline void transpose_pairs(const uint16_t* const* rows, int64_t count, int64_t pairs,
                                              uint32_t* out) {
  static const uint16_t zero_row[64] = {};
  for (int64_t first = 0; first < 16 * Width; first += 16) {
    const uint16_t* block[16];
    for (int l = 0; l < 16; ++l) block[l] = first + l < count ? rows[first + l] : zero_row;
    transpose_pair_rows(block, pairs, out + first, 16 * Width);
  }
}

// rows[n] (n < count, dim bfloat16 each) -> out[m][c]: the pair (rows[2m][c], rows[2m + 1][c]), a zero row past count
DINAT_AVX512_BF16 inline void interleave_row_pairs(const uint16_t* const* rows, int64_t count, int64_t dim,
                                                   uint32_t* out) {
  alignas(64) static const uint16_t first_half[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(first_half), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t m = 0; 2 * m < count; ++m)
    for (int64_t c = 0; c < dim; c += 32) {
      const __m512i even = _mm512_loadu_si512(rows[2 * m] + c);
      const __m512i odd = 2 * m + 1 < count ? _mm512_loadu_si512(rows[2 * m + 1] + c) : _mm512_setzero_si512();
      _mm512_store_si512(out + m * dim + c, _mm512_permutex2var_epi16(even, low, odd));
      _mm512_store_si512(out + m * dim + c + 16, _mm512_permutex2var_epi16(even, high, odd));
    }
}

// scores[r][:] = scale * (q_r . k) + bias[r][:] for Rows rows; query: pairs uint32 a row, keys_t: pair rows
template <int Width, int Rows>
DINAT_AVX512_BF16 void score_tile(const uint32_t* query, int64_t pairs, const uint32_t* keys_t, const float* bias,
                                  float scale, float* scores) {
  constexpr int64_t padded = 16 * Width;
  __m512 acc[Rows][Width] = {};
  pair_products<Width, Rows>(query, pairs, keys_t, pairs, acc);
  const __m512 factor = _mm512_set1_ps(scale);
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < Width; ++j) {
      const int64_t at = r * padded + 16 * j;
      _mm512_store_ps(scores + at, _mm512_fmadd_ps(acc[r][j], factor, _mm512_load_ps(bias + at)));
    }
}

// out[r][:] = sum_m probs[r] pair m * values pair row m, for Rows rows, rounded to bfloat16
template <int Chunks, int Rows>
DINAT_AVX512_BF16 void value_tile(const uint32_t* probs, int64_t lda, const uint32_t* values, int64_t depth,
                                  uint16_t* const* out) {
  __m512 acc[Rows][Chunks] = {};
  pair_products<Chunks, Rows>(probs, lda, values, depth, acc);
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < Chunks; ++j) store16(out[r] + 16 * j, acc[r][j]);
}

// row of scores -> its softmax in float32 (in place) and rounded to bfloat16 as torch rounds (probs)
template <int Width>
DINAT_AVX512_BF16 void softmax_pairs_row(float* row, uint16_t* probs) {
  __m512 s[Width];
  softmax_row<Width>(row, s);
  for (int j = 0; j < Width; ++j) {
    _mm512_store_ps(row + 16 * j, s[j]);
    store16(probs + 16 * j, s[j]);
  }
}

// one group's attention from bfloat16 rows: out_rows[r] = sum_n softmax_n(scale q_r . k_n + bias[r][n]) v_n;
// keep(r, float32 probabilities of query r) for the backward
template <int Width, int Chunks, typename Keep>
void group_attention_pairs(int64_t window, const uint16_t* const* query_rows, const uint16_t* const* key_rows,
                           const uint16_t* const* value_rows, const float* bias, float scale, Scratch& scratch,
                           Keep&& keep, uint16_t* const* out_rows) {
  constexpr int64_t padded = 16 * Width, pairs = 8 * Chunks;
  uint32_t* query = reinterpret_cast<uint32_t*>(scratch[0]);
  uint32_t* keys_t = reinterpret_cast<uint32_t*>(scratch[1]);
  uint32_t* values = reinterpret_cast<uint32_t*>(scratch[2]);
  float* scores = scratch[3];
  uint16_t* probs = reinterpret_cast<uint16_t*>(scratch[4]);
  for (int64_t r = 0; r < window; ++r) std::memcpy(query + r * pairs, query_rows[r], 4 * pairs);
  transpose_pairs<Width>(key_rows, window, pairs, keys_t);
  interleave_row_pairs(value_rows, window, 16 * Chunks, values);
  over_tiles<Width>(window, [&](auto rows, int64_t first) {
    score_tile<Width, decltype(rows)::value>(query + first * pairs, pairs, keys_t, bias + first * padded, scale,
                                             scores + first * padded);
  });
  for (int64_t r = 0; r < window; ++r) {
    softmax_pairs_row<Width>(scores + r * padded, probs + r * padded);
    keep(r, scores + r * padded);
  }
  const uint32_t* prob_pairs = reinterpret_cast<const uint32_t*>(probs);
  over_tiles<Chunks>(window, [&](auto rows, int64_t first) {
    value_tile<Chunks, decltype(rows)::value>(prob_pairs + first * padded / 2, padded / 2, values, (window + 1) / 2,
                                              out_rows + first);
  });
}

inline void prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

template <int Width, int Chunks, typename Src>
DINAT_AVX512 void forward_groups(const Geometry& g, const GroupLayout& layout, int64_t dil_w, const Src* qp,
                                 const View5& qs, const Src* kp, const View5& ks, const Src* vp, const View5& vs,
                                 const float* bias, Src* op, const View5& os, float* pp, float scale, int64_t begin,
                                 int64_t end) {
  constexpr int64_t padded = 16 * Width, dim = 16 * Chunks;
  const bool bfloat16_pairs = std::is_same_v<Src, uint16_t> && pair_products_fit(dim);
  Scratch scratch(bfloat16_pairs ? 5 : 4);  // the pair products keep their bfloat16 probabilities in a fifth
  float *query = scratch[0], *keys_t = scratch[1], *values = scratch[2], *probs = scratch[3];
  const Src zeros[64] = {};
  const Src *query_rows[kMaxGroupWindow], *key_rows[kMaxGroupWindow], *value_rows[kMaxGroupWindow];
  Src* out_rows[kMaxGroupWindow];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / g.heads, h = task % g.heads;
    const float* bias_h = bias + h * g.window * padded;
    for (int64_t group = 0; group < layout.groups; ++group) {
      const int64_t gy = group / dil_w, gx = group % dil_w;
      for (int64_t t = 0; t < g.window; ++t) {
        const int64_t y = layout.offset_y[t] + gy, x = layout.offset_x[t] + gx;
        query_rows[t] = qp + qs.at(b, h, y, x);
        key_rows[t] = kp + ks.at(b, h, y, x);
        value_rows[t] = vp + vs.at(b, h, y, x);
        out_rows[t] = op + os.at(b, h, y, x);
      }
      // the next group's tokens are scattered over the map and past this core's cache: fetch them meanwhile
      const int64_t next_task = group + 1 < layout.groups ? task : task + 1;
      if (next_task < end) {
        const int64_t next = group + 1 < layout.groups ? group + 1 : 0;
        const int64_t nb = next_task / g.heads, nh = next_task % g.heads, ny = next / dil_w, nx = next % dil_w;
        for (int64_t t = 0; t < g.window; ++t) {
          const int64_t y = layout.offset_y[t] + ny, x = layout.offset_x[t] + nx;
          for (int c = 0; c < Chunks; ++c) {
            prefetch(qp + qs.at(nb, nh, y, x) + 16 * c);
            prefetch(kp + ks.at(nb, nh, y, x) + 16 * c);
            prefetch(vp + vs.at(nb, nh, y, x) + 16 * c);
          }
        }
      }
      const auto keep = [&](int64_t r, const float* row) {  // the probabilities a backward call needs
        if (pp == nullptr) return;
        const int64_t y = layout.offset_y[r] + gy, x = layout.offset_x[r] + gx;
        std::copy_n(row, g.window, pp + (((b * g.heads + h) * g.height + y) * g.width + x) * g.window);
      };
      if constexpr (std::is_same_v<Src, uint16_t>) {
        if (bfloat16_pairs) {
          group_attention_pairs<Width, Chunks>(g.window, query_rows, key_rows, value_rows, bias_h, scale, scratch,
                                               keep, out_rows);
          continue;
        }
      }
      gather_rows<Chunks>(query_rows, g.window, scale, query);
      gather_columns<Width>(key_rows, g.window, dim, zeros, keys_t);
      gather_rows<Chunks>(value_rows, g.window, 1.0f, values);
      panel_product<Width>(query, dim, g.window, keys_t, dim, bias_h, probs);  // scores + bias
      for (int64_t r = 0; r < g.window; ++r) {
        float* row = probs + r * padded;
        __m512 s[Width];
        softmax_row<Width>(row, s);
        for (int j = 0; j < Width; ++j) _mm512_store_ps(row + 16 * j, s[j]);
        keep(r, row);
      }
      rows_product<Chunks>(probs, padded, g.window, values, g.window, 1.0f, out_rows);
    }
  }
}

template <int Width, int Chunks>
DINAT_AVX512 void backward_groups(const Geometry& g, const GroupLayout& layout, int64_t dil_w, const float* gp,
                                  const View5& gs, const float* qp, const View5& qs, const float* kp, const View5& ks,
                                  const float* vp, const View5& vs, const float* pp, float* dqp, const View5& dqs,
                                  float* dkp, const View5& dks, float* dvp, const View5& dvs, float* grad_rpb,
                                  float scale, int64_t begin, int64_t end) {
  constexpr int64_t padded = 16 * Width, dim = 16 * Chunks;
  Scratch scratch(9);
  float *grad_out = scratch[0], *values_t = scratch[1], *keys = scratch[2], *queries = scratch[3];
  float *probs = scratch[4], *grad_scores = scratch[5], *grad_scores_t = scratch[6], *probs_t = scratch[7];
  float* bias_sum = scratch[8];
  const float zeros[64] = {};
  const float *go_rows[kMaxGroupWindow], *q_rows[kMaxGroupWindow], *k_rows[kMaxGroupWindow], *v_rows[kMaxGroupWindow];
  float *dq_rows[kMaxGroupWindow], *dk_rows[kMaxGroupWindow], *dv_rows[kMaxGroupWindow];
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / g.heads, h = task % g.heads;
    if (grad_rpb != nullptr) std::fill_n(bias_sum, g.window * padded, 0.0f);
    for (int64_t group = 0; group < layout.groups; ++group) {
      const int64_t gy = group / dil_w, gx = group % dil_w;
      for (int64_t t = 0; t < g.window; ++t) {
        const int64_t y = layout.offset_y[t] + gy, x = layout.offset_x[t] + gx;
        go_rows[t] = gp + gs.at(b, h, y, x);
        q_rows[t] = qp + qs.at(b, h, y, x);
        k_rows[t] = kp + ks.at(b, h, y, x);
        v_rows[t] = vp + vs.at(b, h, y, x);
        dq_rows[t] = dqp + dqs.at(b, h, y, x);
        dk_rows[t] = dkp + dks.at(b, h, y, x);
        dv_rows[t] = dvp + dvs.at(b, h, y, x);
        std::copy_n(pp + (((b * g.heads + h) * g.height + y) * g.width + x) * g.window, g.window, probs + t * padded);
      }
      gather_rows<Chunks>(go_rows, g.window, 1.0f, grad_out);
      gather_rows<Chunks>(q_rows, g.window, 1.0f, queries);
      gather_rows<Chunks>(k_rows, g.window, 1.0f, keys);
      gather_columns<Width>(v_rows, g.window, dim, zeros, values_t);
      panel_product<Width>(grad_out, dim, g.window, values_t, dim, nullptr, grad_scores);  // grad_p = grad_out . v
      // softmax backward: grad_score = p * (grad_p - sum(p * grad_p)); padding keys have p = 0
      for (int64_t r = 0; r < g.window; ++r) {
        float* ds = grad_scores + r * padded;
        const float* p = probs + r * padded;
        __m512 weighted = _mm512_setzero_ps();
        for (int j = 0; j < Width; ++j)
          weighted = _mm512_fmadd_ps(_mm512_load_ps(p + 16 * j), _mm512_load_ps(ds + 16 * j), weighted);
        const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(weighted));
        for (int j = 0; j < Width; ++j) {
          const __m512 d = _mm512_mul_ps(_mm512_load_ps(p + 16 * j), _mm512_sub_ps(_mm512_load_ps(ds + 16 * j), total));
          _mm512_store_ps(ds + 16 * j, d);
          float* sum = bias_sum + r * padded + 16 * j;
          if (grad_rpb != nullptr) _mm512_store_ps(sum, _mm512_add_ps(_mm512_load_ps(sum), d));
        }
      }
      rows_product<Chunks>(grad_scores, padded, g.window, keys, g.window, scale, dq_rows);
      transpose_square<Width>(grad_scores, grad_scores_t);
      transpose_square<Width>(probs, probs_t);
      rows_product<Chunks>(grad_scores_t, padded, g.window, queries, g.window, scale, dk_rows);
      rows_product<Chunks>(probs_t, padded, g.window, grad_out, g.window, 1.0f, dv_rows);
    }
    if (grad_rpb != nullptr) {
      float* bias_grad = grad_rpb + task * g.rpb_hw;
      for_query_key_pairs(g, [&](int64_t r, int64_t n, int64_t rel) { bias_grad[rel] += bias_sum[r * padded + n]; });
    }
  }
}

template <typename Fn>
void with_group_widths(int64_t window, int64_t dim, Fn&& fn) {
  const int64_t width = (window + 15) / 16;
  with_chunks(dim, [&](auto chunks) {
    switch (width) {
      case 1: fn(std::integral_constant<int, 1>(), chunks); break;
      case 2: fn(std::integral_constant<int, 2>(), chunks); break;
      case 3: fn(std::integral_constant<int, 3>(), chunks); break;
      default: fn(std::integral_constant<int, 4>(), chunks); break;
    }
  });
}

// ---- any floating dtype, any head_dim: plain loops -------------------------------------------------------

template <typename T>
void forward_kernel(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                    const c10::optional<torch::Tensor>& rpb, torch::Tensor& out, torch::Tensor* probs,
                    int64_t kernel_h, int64_t kernel_w, int64_t dil_h, int64_t dil_w, double scale_d) {
  const int64_t batch = q.size(0), heads = q.size(1), height = q.size(2), width = q.size(3), dim = q.size(4);
  const int64_t window = kernel_h * kernel_w, rpb_w = 2 * kernel_w - 1, rpb_hw = (2 * kernel_h - 1) * rpb_w;
  const AxisWindows rows(height, kernel_h, dil_h), cols(width, kernel_w, dil_w);
  const View5 qs(q), ks(k), vs(v), os(out);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* bp = rpb.has_value() ? rpb->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  T* pp = probs != nullptr ? probs->data_ptr<T>() : nullptr;
  const T scale = static_cast<T>(scale_d);

  at::parallel_for(0, batch * heads * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(window), acc(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (heads * height), h = (task / height) % heads, i = task % height;
      const T* key_base = kp + b * ks.s0 + h * ks.s1;
      const T* value_base = vp + b * vs.s0 + h * vs.s1;
      const T* bias = bp != nullptr ? bp + h * rpb_hw : nullptr;
      const int64_t* row_keys = &rows.keys[i * kernel_h];
      const int64_t* row_rel = &rows.rel[i * kernel_h];
      for (int64_t j = 0; j < width; ++j) {
        const T* query = qp + b * qs.s0 + h * qs.s1 + i * qs.s2 + j * qs.s3;
        const int64_t* col_keys = &cols.keys[j * kernel_w];
        const int64_t* col_rel = &cols.rel[j * kernel_w];
        T max_score = -std::numeric_limits<T>::infinity();
        for (int64_t a = 0; a < kernel_h; ++a) {
          const T* key_row = key_base + row_keys[a] * ks.s2;
          const T* bias_row = bias != nullptr ? bias + row_rel[a] * rpb_w : nullptr;
          for (int64_t c = 0; c < kernel_w; ++c) {
            T s = dot(query, key_row + col_keys[c] * ks.s3, dim) * scale;
            if (bias_row != nullptr) s += bias_row[col_rel[c]];
            scores[a * kernel_w + c] = s;
            max_score = std::max(max_score, s);
          }
        }
        T total = 0;
        for (int64_t n = 0; n < window; ++n) {
          scores[n] = std::exp(scores[n] - max_score);
          total += scores[n];
        }
        const T inverse = T(1) / total;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t a = 0; a < kernel_h; ++a) {
          const T* value_row = value_base + row_keys[a] * vs.s2;
          for (int64_t c = 0; c < kernel_w; ++c) {
            const int64_t n = a * kernel_w + c;
            scores[n] *= inverse;
            axpy(scores[n], value_row + col_keys[c] * vs.s3, acc.data(), dim);
          }
        }
        std::copy(acc.begin(), acc.end(), op + b * os.s0 + h * os.s1 + i * os.s2 + j * os.s3);
        if (pp != nullptr) std::copy(scores.begin(), scores.end(), pp + ((task * width) + j) * window);
      }
    }
  });
}

template <typename T>
void backward_kernel(const torch::Tensor& grad_out, const torch::Tensor& q, const torch::Tensor& k,
                     const torch::Tensor& v, const torch::Tensor& probs, torch::Tensor& grad_q, torch::Tensor& grad_k,
                     torch::Tensor& grad_v, T* grad_rpb, int64_t kernel_h, int64_t kernel_w, int64_t dil_h,
                     int64_t dil_w, double scale_d) {
  const int64_t batch = q.size(0), heads = q.size(1), height = q.size(2), width = q.size(3), dim = q.size(4);
  const int64_t window = kernel_h * kernel_w, rpb_w = 2 * kernel_w - 1, rpb_hw = (2 * kernel_h - 1) * rpb_w;
  const AxisWindows rows(height, kernel_h, dil_h), cols(width, kernel_w, dil_w);
  const View5 gs(grad_out), qs(q), ks(k), vs(v), dqs(grad_q), dks(grad_k), dvs(grad_v);
  const T* gp = grad_out.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* pp = probs.data_ptr<T>();
  T* dqp = grad_q.data_ptr<T>();
  T* dkp = grad_k.data_ptr<T>();
  T* dvp = grad_v.data_ptr<T>();
  const T scale = static_cast<T>(scale_d);

  // one task per (batch, head): it alone writes that slice of grad_k, grad_v and its own grad_rpb partial sum
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> grad_scores(window), grad_query(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const T* key_base = kp + b * ks.s0 + h * ks.s1;
      const T* value_base = vp + b * vs.s0 + h * vs.s1;
      T* grad_key_base = dkp + b * dks.s0 + h * dks.s1;
      T* grad_value_base = dvp + b * dvs.s0 + h * dvs.s1;
      T* bias_grad = grad_rpb != nullptr ? grad_rpb + task * rpb_hw : nullptr;
      for (int64_t i = 0; i < height; ++i) {
        const int64_t* row_keys = &rows.keys[i * kernel_h];
        const int64_t* row_rel = &rows.rel[i * kernel_h];
        for (int64_t j = 0; j < width; ++j) {
          const T* go = gp + b * gs.s0 + h * gs.s1 + i * gs.s2 + j * gs.s3;
          const T* query = qp + b * qs.s0 + h * qs.s1 + i * qs.s2 + j * qs.s3;
          const T* p = pp + ((task * height + i) * width + j) * window;
          const int64_t* col_keys = &cols.keys[j * kernel_w];
          const int64_t* col_rel = &cols.rel[j * kernel_w];
          // softmax backward: grad_score = p * (grad_p - sum(p * grad_p)), grad_p = grad_out . v
          T weighted = 0;
          for (int64_t a = 0; a < kernel_h; ++a) {
            const T* value_row = value_base + row_keys[a] * vs.s2;
            for (int64_t c = 0; c < kernel_w; ++c) {
              const int64_t n = a * kernel_w + c;
              grad_scores[n] = dot(go, value_row + col_keys[c] * vs.s3, dim);
              weighted += p[n] * grad_scores[n];
            }
          }
          std::fill(grad_query.begin(), grad_query.end(), T(0));
          for (int64_t a = 0; a < kernel_h; ++a) {
            const int64_t row_offset_k = row_keys[a] * ks.s2, row_offset_dk = row_keys[a] * dks.s2;
            const int64_t row_offset_dv = row_keys[a] * dvs.s2;
            for (int64_t c = 0; c < kernel_w; ++c) {
              const int64_t n = a * kernel_w + c;
              const T grad_score = p[n] * (grad_scores[n] - weighted);
              if (bias_grad != nullptr) bias_grad[row_rel[a] * rpb_w + col_rel[c]] += grad_score;
              axpy(grad_score * scale, key_base + row_offset_k + col_keys[c] * ks.s3, grad_query.data(), dim);
              axpy(grad_score * scale, query, grad_key_base + row_offset_dk + col_keys[c] * dks.s3, dim);
              axpy(p[n], go, grad_value_base + row_offset_dv + col_keys[c] * dvs.s3, dim);
            }
          }
          std::copy(grad_query.begin(), grad_query.end(), dqp + b * dqs.s0 + h * dqs.s1 + i * dqs.s2 + j * dqs.s3);
        }
      }
    }
  });
}

void check_inputs(const std::vector<torch::Tensor>& tensors) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "na2d_cpu: tensors must be on the CPU");
    TORCH_CHECK(t.dim() == 5 && t.stride(4) == 1, "na2d_cpu: expected 5-D tensors with a contiguous last dimension");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), "na2d_cpu: tensors must share one dtype");
  }
}

// The fast forward paths read bfloat16 q, k and v as they gather them (the group path, or 16 queries per vector
// where the kernel width allows it): no float32 copy of the projection.
bool reads_bfloat16(const torch::Tensor& q, const Geometry& g, int64_t dil_h, int64_t dil_w) {
  return q.scalar_type() == torch::kBFloat16 && vector_shape(q, g.window) &&
         (whole_groups(g, dil_h, dil_w) || with_kernel_width(g.kernel_w, [](auto) {}));
}

// The AVX-512 forward paths on raw Src values (float, or uint16_t holding bfloat16); out is Src, probs float32.
template <typename Src>
void forward_fast(const Geometry& g, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const float* bp, int64_t dil_h, int64_t dil_w, float scale, torch::Tensor& out, float* pp) {
  const Src* qp = reinterpret_cast<const Src*>(q.data_ptr());
  const Src* kp = reinterpret_cast<const Src*>(k.data_ptr());
  const Src* vp = reinterpret_cast<const Src*>(v.data_ptr());
  Src* op = reinterpret_cast<Src*>(out.data_ptr());
  const View5 qs(q), ks(k), vs(v), os(out);
  if (whole_groups(g, dil_h, dil_w)) {
    const GroupLayout layout(g, dil_h, dil_w);
    with_group_widths(g.window, g.dim, [&](auto width, auto chunks) {
      const float* group_biases = group_bias(g, bp, 16 * decltype(width)::value);
      at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
        forward_groups<decltype(width)::value, decltype(chunks)::value>(
            g, layout, dil_w, qp, qs, kp, ks, vp, vs, group_biases, op, os, pp, scale, begin, end);
      });
    });
    return;
  }
  const AxisWindows rows(g.height, g.kernel_h, dil_h), cols(g.width, g.kernel_w, dil_w);
  std::vector<int64_t> position;
  const std::vector<LaneTile> tiles = lane_tiles(g.width, g.kernel_w, dil_w, position);
  const bool lanes = with_kernel_width(g.kernel_w, [&](auto width) {
    at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
      forward_heads_lanes<decltype(width)::value>(g, rows, tiles, position, qp, qs, kp, ks, vp, vs, bp, op, os, pp,
                                                  scale, begin, end);
    });
  });
  if (lanes) return;
  if constexpr (std::is_same_v<Src, float>) {
    with_chunks(g.dim, [&](auto chunks) {
      at::parallel_for(0, g.batch * g.heads * g.height, 1, [&](int64_t begin, int64_t end) {
        forward_rows_avx512<decltype(chunks)::value>(g, rows, cols, qp, qs, kp, ks, vp, vs, bp, op, os, pp, scale,
                                                     begin, end);
      });
    });
  } else {
    TORCH_CHECK(false, "na2d_cpu: bfloat16 reaches only the group and lane paths");
  }
}

}  // namespace

namespace dinat {

// Returns (out, probs): out is (B, heads, H, W, D) viewing a (B, H, W, heads, D) tensor; probs is
// (B, heads, H, W, kernel_h * kernel_w) when keep_probabilities, else empty. q, k, v are float32 or float64, or
// bfloat16, which computes in float32 and returns bfloat16 out and float32 probs.
std::vector<torch::Tensor> forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const c10::optional<torch::Tensor>& rpb, int64_t kernel_h, int64_t kernel_w,
                                   int64_t dil_h, int64_t dil_w, double scale, bool keep_probabilities) {
  check_inputs({q, k, v});
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "na2d_cpu: q, k and v must have one shape");
  const Geometry g(q, kernel_h, kernel_w);
  const bool bfloat16 = q.scalar_type() == torch::kBFloat16;
  if (bfloat16 && !reads_bfloat16(q, g, dil_h, dil_w)) {
    auto widened = forward(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat), rpb, kernel_h, kernel_w,
                           dil_h, dil_w, scale, keep_probabilities);
    return {widened[0].to(torch::kBFloat16), widened[1]};
  }
  const auto options = bfloat16 ? q.options().dtype(torch::kFloat) : q.options();
  c10::optional<torch::Tensor> bias;
  if (rpb.has_value()) bias = rpb->to(options.dtype()).contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), height = q.size(2), width = q.size(3);
  auto out = torch::empty({batch, height, width, heads, v.size(4)}, q.options()).permute({0, 3, 1, 2, 4});
  auto probs = keep_probabilities ? torch::empty({batch, heads, height, width, kernel_h * kernel_w}, options)
                                  : torch::empty({0}, options);
  const float* bp = bias.has_value() && bias->scalar_type() == torch::kFloat ? bias->data_ptr<float>() : nullptr;
  float* pp = keep_probabilities && probs.scalar_type() == torch::kFloat ? probs.data_ptr<float>() : nullptr;
  if (bfloat16) {
    forward_fast<uint16_t>(g, q, k, v, bp, dil_h, dil_w, static_cast<float>(scale), out, pp);
    return {out, probs};
  }
  if (fast_path(q, kernel_h * kernel_w)) {
    forward_fast<float>(g, q, k, v, bp, dil_h, dil_w, static_cast<float>(scale), out, pp);
    return {out, probs};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_cpu_forward", [&] {
    forward_kernel<scalar_t>(q, k, v, bias, out, keep_probabilities ? &probs : nullptr, kernel_h, kernel_w, dil_h,
                             dil_w, scale);
  });
  return {out, probs};
}

// Returns (grad_qkv, grad_rpb): grad_qkv is (3, B, heads, H, W, D) viewing a (B, H, W, 3, heads, D) tensor, the
// layout of a packed qkv projection's output; grad_rpb is (heads, 2K-1, 2K-1), or empty without want_rpb.
std::vector<torch::Tensor> backward(const torch::Tensor& grad_out, const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, const torch::Tensor& probs, int64_t kernel_h,
                                    int64_t kernel_w, int64_t dil_h, int64_t dil_w, double scale, bool want_rpb) {
  check_inputs({grad_out, q, k, v});
  const int64_t batch = q.size(0), heads = q.size(1), height = q.size(2), width = q.size(3), dim = q.size(4);
  TORCH_CHECK(probs.is_contiguous() && probs.numel() == batch * heads * height * width * kernel_h * kernel_w,
              "na2d_cpu: probabilities of the forward call are needed");
  const Geometry g(q, kernel_h, kernel_w);
  const bool groups = fast_path(q, g.window) && whole_groups(g, dil_h, dil_w);
  // the per-query paths add into the key and value gradients; the group path writes every element once
  auto grad_qkv = (groups ? torch::empty({batch, height, width, 3, heads, dim}, q.options())
                          : torch::zeros({batch, height, width, 3, heads, dim}, q.options()))
                      .permute({3, 0, 4, 1, 2, 5});
  auto grad_q = grad_qkv[0], grad_k = grad_qkv[1], grad_v = grad_qkv[2];
  auto partial_rpb = want_rpb ? torch::zeros({batch, heads, 2 * kernel_h - 1, 2 * kernel_w - 1}, q.options())
                              : torch::empty({0}, q.options());
  if (groups) {
    const View5 gs(grad_out), qs(q), ks(k), vs(v), dqs(grad_q), dks(grad_k), dvs(grad_v);
    float* rp = want_rpb ? partial_rpb.data_ptr<float>() : nullptr;
    const GroupLayout layout(g, dil_h, dil_w);
    with_group_widths(g.window, g.dim, [&](auto width, auto chunks) {
      at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
        backward_groups<decltype(width)::value, decltype(chunks)::value>(
            g, layout, dil_w, grad_out.data_ptr<float>(), gs, q.data_ptr<float>(), qs, k.data_ptr<float>(), ks,
            v.data_ptr<float>(), vs, probs.data_ptr<float>(), grad_q.data_ptr<float>(), dqs, grad_k.data_ptr<float>(),
            dks, grad_v.data_ptr<float>(), dvs, rp, static_cast<float>(scale), begin, end);
      });
    });
    return {grad_qkv, want_rpb ? partial_rpb.sum(0) : partial_rpb};
  }
  if (fast_path(q, kernel_h * kernel_w)) {
    const AxisWindows rows(g.height, kernel_h, dil_h), cols(g.width, kernel_w, dil_w);
    const View5 gs(grad_out), qs(q), ks(k), vs(v), dqs(grad_q), dks(grad_k), dvs(grad_v);
    float* rp = want_rpb ? partial_rpb.data_ptr<float>() : nullptr;
    with_chunks(g.dim, [&](auto chunks) {
      at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
        backward_heads_avx512<decltype(chunks)::value>(
            g, rows, cols, grad_out.data_ptr<float>(), gs, q.data_ptr<float>(), qs, k.data_ptr<float>(), ks,
            v.data_ptr<float>(), vs, probs.data_ptr<float>(), grad_q.data_ptr<float>(), dqs, grad_k.data_ptr<float>(),
            dks, grad_v.data_ptr<float>(), dvs, rp, static_cast<float>(scale), begin, end);
      });
    });
    return {grad_qkv, want_rpb ? partial_rpb.sum(0) : partial_rpb};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "na2d_cpu_backward", [&] {
    backward_kernel<scalar_t>(grad_out, q, k, v, probs, grad_q, grad_k, grad_v,
                              want_rpb ? partial_rpb.data_ptr<scalar_t>() : nullptr, kernel_h, kernel_w, dil_h,
                              dil_w, scale);
  });
  return {grad_qkv, want_rpb ? partial_rpb.sum(0) : partial_rpb};
}

}  // namespace dinat
