// The extension's entry points: the CPU kernels of the dinat:: operators, registered with torch's dispatcher, so
// that eager code and compiled graphs both reach them without a Python frame (their schemas, fake versions and
// autograd formulas are defined in Python: ops/cpp_backend.py, ops/layer_norm.py, ops/linear.py), and one Python
// function.

#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace dinat {
std::vector<torch::Tensor> forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const c10::optional<torch::Tensor>& rpb, int64_t kernel_h, int64_t kernel_w,
                                   int64_t dil_h, int64_t dil_w, double scale, bool keep_probabilities);
std::vector<torch::Tensor> backward(const torch::Tensor& grad_out, const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, const torch::Tensor& probs, int64_t kernel_h,
                                    int64_t kernel_w, int64_t dil_h, int64_t dil_w, double scale, bool want_rpb);
int64_t layer_norm_rows_channel_multiple();
torch::Tensor layer_norm_rows(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                              double eps);
}  // namespace dinat

namespace {

using Pair = c10::IntArrayRef;
using TensorPair = std::tuple<torch::Tensor, torch::Tensor>;

// The attention kernel reads float32, float64 and bfloat16 (which it widens as it reads); other dtypes go in as
// float32. It needs each head's channels contiguous.
torch::Tensor readable(const torch::Tensor& t, c10::ScalarType dtype) {
  torch::Tensor converted = t.to(dtype);
  return converted.stride(-1) == 1 ? converted : converted.contiguous();
}

c10::ScalarType read_dtype(c10::ScalarType dtype) {
  const bool kernel_reads = dtype == torch::kFloat || dtype == torch::kDouble || dtype == torch::kBFloat16;
  return kernel_reads ? dtype : torch::kFloat;
}

void check_pairs(Pair kernel_size, Pair dilation) {
  TORCH_CHECK(kernel_size.size() == 2 && dilation.size() == 2, "na2d_cpp: kernel_size and dilation are pairs");
}

// q, k, v as (B, heads, H, W, D) views of a packed (B, H, W, 3, heads, D) projection
std::vector<torch::Tensor> unpack(const torch::Tensor& qkv) { return qkv.permute({3, 0, 4, 1, 2, 5}).unbind(0); }

TensorPair na2d(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                const c10::optional<torch::Tensor>& rpb, Pair kernel_size, Pair dilation, double scale,
                bool keep_probabilities) {
  check_pairs(kernel_size, dilation);
  const c10::ScalarType dtype = read_dtype(q.scalar_type());
  auto out = dinat::forward(readable(q, dtype), readable(k, dtype), readable(v, dtype), rpb, kernel_size[0],
                            kernel_size[1], dilation[0], dilation[1], scale, keep_probabilities);
  // the output in the inputs' dtype (float16 is computed in float32); the probabilities stay in the compute dtype
  return {out[0].to(q.scalar_type()), out[1]};
}

// (grad_qkv as (3, B, heads, H, W, D) viewing a (B, H, W, 3, heads, D) tensor, grad_rpb or an empty tensor)
TensorPair na2d_backward(const torch::Tensor& grad_out, const torch::Tensor& q, const torch::Tensor& k,
                         const torch::Tensor& v, const torch::Tensor& probs, Pair kernel_size, Pair dilation,
                         double scale, bool want_rpb) {
  check_pairs(kernel_size, dilation);
  const c10::ScalarType dtype = probs.scalar_type();
  auto grads = dinat::backward(readable(grad_out, dtype), readable(q, dtype), readable(k, dtype), readable(v, dtype),
                               probs, kernel_size[0], kernel_size[1], dilation[0], dilation[1], scale, want_rpb);
  return {grads[0], grads[1]};
}

TensorPair na2d_packed(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& rpb, Pair kernel_size,
                       Pair dilation, double scale, bool keep_probabilities) {
  const auto qkv_views = unpack(qkv);
  return na2d(qkv_views[0], qkv_views[1], qkv_views[2], rpb, kernel_size, dilation, scale, keep_probabilities);
}

// grad_qkv in the packed projection's own (B, H, W, 3, heads, D) layout: contiguous, no copy
TensorPair na2d_packed_backward(const torch::Tensor& grad_out, const torch::Tensor& qkv, const torch::Tensor& probs,
                                Pair kernel_size, Pair dilation, double scale, bool want_rpb) {
  const auto qkv_views = unpack(qkv);
  auto [grad_qkv, grad_rpb] = na2d_backward(grad_out, qkv_views[0], qkv_views[1], qkv_views[2], probs, kernel_size,
                                            dilation, scale, want_rpb);
  return {grad_qkv.permute({1, 3, 4, 0, 2, 5}), grad_rpb};
}

torch::Tensor layer_norm_rows(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                              double eps) {
  return dinat::layer_norm_rows(x.contiguous(), weight.contiguous(), bias.contiguous(), eps);
}

// oneDNN's linear with its epilogue (bias, then GELU or a residual add) applied while the output tile is in cache
torch::Tensor linear_epilogue(const torch::Tensor& x, const torch::Tensor& weight,
                              const c10::optional<torch::Tensor>& bias, bool gelu,
                              const c10::optional<torch::Tensor>& residual) {
  torch::jit::Stack stack;
  if (residual.has_value()) {
    static const auto binary =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
    stack = {x.contiguous(), residual->contiguous(), weight.contiguous(), bias, std::string("add")};
    binary.callBoxed(&stack);
  } else {
    static const auto unary = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    // GELU's algorithm "none" is the exact (erf) one
    stack = {x.contiguous(), weight.contiguous(), bias, std::string(gelu ? "gelu" : "none"),
             c10::List<c10::optional<c10::Scalar>>(), c10::optional<std::string>(gelu ? "none" : "")};
    unary.callBoxed(&stack);
  }
  return stack[0].toTensor();
}

}  // namespace

TORCH_LIBRARY_IMPL(dinat, CPU, m) {
  m.impl("na2d_cpp", &na2d);
  m.impl("na2d_cpp_backward", &na2d_backward);
  m.impl("na2d_cpp_packed", &na2d_packed);
  m.impl("na2d_cpp_packed_backward", &na2d_packed_backward);
  m.impl("layer_norm_rows", &layer_norm_rows);
  m.impl("linear_epilogue", &linear_epilogue);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_norm_channel_multiple", &dinat::layer_norm_rows_channel_multiple,
        "layer_norm_rows runs rows of a positive multiple of this many channels (0: on no rows, this CPU lacks "
        "AVX-512)");
}
