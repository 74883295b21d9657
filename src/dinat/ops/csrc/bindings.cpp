// The extension module's Python functions: the neighborhood-attention kernel (na2d_cpu.cpp) and the inference
// LayerNorm (layer_norm_cpu.cpp).

#include <torch/extension.h>

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &dinat::forward, "fused neighborhood attention, forward");
  m.def("backward", &dinat::backward, "fused neighborhood attention, backward");
  m.def("layer_norm_channel_multiple", &dinat::layer_norm_rows_channel_multiple,
        "layer_norm runs rows of a positive multiple of this many channels (0: on no rows, this CPU lacks AVX-512)");
  m.def("layer_norm", &dinat::layer_norm_rows,
        "LayerNorm over the last dimension of float32 or bfloat16 rows, float32 weight and bias, for inference");
}
