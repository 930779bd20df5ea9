// One causal decode step of linear attention in one CPU op: both sides' feature maps (ReLU or
// Hedgehog), the LeaP proportion MLPs and their sin/cos re-weighting, the rank-1 state update
// and the normalised read; or, given queries only, the features and the read of a state that
// stays as it is (cross-attention). The math is that of feature_map.py and recurrent.py; fused_step.py
// documents the arguments. Sums are in the inputs' dtype (float32 or float64), as the eager
// step's are.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using Optional = std::optional<torch::Tensor>;

template <typename T>
struct Layer {  // a stacked linear layer: weight_t (2, d_in, d_out), bias (2, 1, d_out), any strides
  const T* weight = nullptr;
  const T* bias = nullptr;
  int64_t w_side = 0, w_in = 0, w_out = 0, b_side = 0, b_out = 0;

  Layer() = default;
  Layer(const torch::Tensor& weight_t, const torch::Tensor& bias_)
      : weight(weight_t.data_ptr<T>()), bias(bias_.data_ptr<T>()),
        w_side(weight_t.stride(0)), w_in(weight_t.stride(1)), w_out(weight_t.stride(2)),
        b_side(bias_.stride(0)), b_out(bias_.stride(2)) {}

  // out = x @ weight_t[side] + bias[side], then relu if asked
  void apply(int side, const T* x, int64_t d_in, int64_t d_out, bool relu, T* out) const {
    for (int64_t o = 0; o < d_out; ++o) out[o] = bias[side * b_side + o * b_out];
    for (int64_t i = 0; i < d_in; ++i) {
      const T xi = x[i];
      const T* row = weight + side * w_side + i * w_in;
      for (int64_t o = 0; o < d_out; ++o) out[o] += xi * row[o * w_out];
    }
    if (relu)
      for (int64_t o = 0; o < d_out; ++o) out[o] = std::max(out[o], T(0));
  }
};

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> fused_step(
    const torch::Tensor& kv, const torch::Tensor& k_sum, const torch::Tensor& u,
    const Optional& v, const Optional& hedgehog_weight, const Optional& hedgehog_bias,
    const Optional& norm_weight, const Optional& norm_bias, double norm_eps,
    const Optional& hidden_weight, const Optional& hidden_bias, const Optional& out_weight,
    const Optional& out_bias, double eps) {
  const bool hedgehog = hedgehog_weight.has_value(), leap = hidden_weight.has_value();
  const bool norm = norm_weight.has_value();
  TORCH_CHECK(kv.dim() == 3 && u.dim() == 3, "fused_step: kv and u must be 3-D");
  const int64_t sides = u.size(0);  // 2: a step (queries and keys), 1: a read (queries)
  const bool update = sides == 2;
  TORCH_CHECK(sides == 1 || sides == 2, "fused_step: u holds queries (1) or queries and keys "
              "(2), got ", sides);
  TORCH_CHECK(update == v.has_value(), "fused_step: values go with keys (u of 2 sides)");
  const int64_t n_rows = kv.size(0), dim = u.size(2), value_dim = kv.size(2);
  const int64_t base_dim = hedgehog ? 2 * dim : dim;  // the features before re-weighting
  const int64_t feature_dim = kv.size(1), hidden_dim = leap ? hidden_weight->size(2) : 0;
  TORCH_CHECK(kv.is_contiguous() && k_sum.is_contiguous(), "fused_step: the state must be "
              "contiguous");
  TORCH_CHECK(u.scalar_type() == kv.scalar_type() &&
              (!update || v->scalar_type() == kv.scalar_type()),
              "fused_step: u, v and the state must share one dtype");
  TORCH_CHECK(feature_dim == (leap ? 2 * base_dim : base_dim), "fused_step: state width ",
              feature_dim, " does not match the feature map's");
  // every shape the loops index by, so a mismatch is an error rather than a stray read
  auto check = [](const torch::Tensor& t, std::vector<int64_t> shape, const char* name) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "fused_step: ", name, " is ", t.sizes(),
                ", expected ", at::IntArrayRef(shape));
  };
  check(u, {sides, n_rows, dim}, "u");
  if (update) check(*v, {n_rows, value_dim}, "v");
  check(k_sum, {n_rows, feature_dim}, "k_sum");
  if (hedgehog) {
    check(*hedgehog_weight, {sides, dim, dim}, "the hedgehog weight");
    check(*hedgehog_bias, {sides, 1, dim}, "the hedgehog bias");
  }
  if (leap) {
    check(*hidden_weight, {sides, dim, hidden_dim}, "the hidden weight");
    check(*hidden_bias, {sides, 1, hidden_dim}, "the hidden bias");
    check(*out_weight, {sides, hidden_dim, 1}, "the out weight");
    check(*out_bias, {sides, 1, 1}, "the out bias");
  }
  if (norm) {
    check(*norm_weight, {sides, 1, dim}, "the norm weight");
    check(*norm_bias, {sides, 1, dim}, "the norm bias");
  }
  // a read leaves the state as it is: the same tensors come back
  auto new_kv = update ? torch::empty_like(kv) : kv;
  auto new_k_sum = update ? torch::empty_like(k_sum) : k_sum;
  auto out = torch::empty({n_rows, value_dim}, kv.options());
  AT_DISPATCH_FLOATING_TYPES(kv.scalar_type(), "fused_step", [&] {
    using T = scalar_t;
    const auto u_a = u.accessor<T, 3>();
    // a read has no values: an empty stand-in keeps the accessor's type
    const torch::Tensor values = update ? *v : torch::empty({0, 0}, kv.options());
    const auto v_a = values.accessor<T, 2>();
    const T* kv_p = kv.data_ptr<T>();
    const T* k_sum_p = k_sum.data_ptr<T>();
    T* new_kv_p = update ? new_kv.data_ptr<T>() : nullptr;
    T* new_k_sum_p = update ? new_k_sum.data_ptr<T>() : nullptr;
    T* out_p = out.data_ptr<T>();
    Layer<T> hedgehog_l{}, hidden_l{}, out_l{};
    if (hedgehog) hedgehog_l = Layer<T>(*hedgehog_weight, *hedgehog_bias);
    if (leap) {
      hidden_l = Layer<T>(*hidden_weight, *hidden_bias);
      out_l = Layer<T>(*out_weight, *out_bias);
    }
    const T half_pi = T(M_PI / 2), hedgehog_scale = std::sqrt(T(2 * dim));
    at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> x(dim), mapped(dim), hidden(std::max<int64_t>(hidden_dim, 1));
      std::vector<T> normed(dim), features(2 * feature_dim), value(value_dim);
      std::vector<T> numerator(value_dim);
      for (int64_t n = begin; n < end; ++n) {
        for (int side = 0; side < sides; ++side) {  // queries, then keys
          T* phi = features.data() + side * feature_dim;
          for (int64_t i = 0; i < dim; ++i) x[i] = u_a[side][n][i];
          if (hedgehog) {  // sqrt(2d) softmax([W x + b, -(W x + b)])
            hedgehog_l.apply(side, x.data(), dim, dim, false, mapped.data());
            T top = 0, total = 0;
            for (int64_t i = 0; i < dim; ++i) top = std::max(top, std::abs(mapped[i]));
            for (int64_t i = 0; i < dim; ++i) {
              phi[i] = std::exp(mapped[i] - top);
              phi[dim + i] = std::exp(-mapped[i] - top);
              total += phi[i] + phi[dim + i];
            }
            for (int64_t i = 0; i < base_dim; ++i) phi[i] *= hedgehog_scale / total;
          } else {
            for (int64_t i = 0; i < dim; ++i) phi[i] = std::max(x[i], T(0));
          }
          if (!leap) continue;
          // the proportion p = sigmoid(W2 relu(W1 LN?(relu(x)) + b1) + b2)
          for (int64_t i = 0; i < dim; ++i) normed[i] = std::max(x[i], T(0));
          if (norm) {
            T mean = 0, var = 0;
            for (int64_t i = 0; i < dim; ++i) mean += normed[i];
            mean /= T(dim);
            for (int64_t i = 0; i < dim; ++i) var += (normed[i] - mean) * (normed[i] - mean);
            const T inv = T(1) / std::sqrt(var / T(dim) + T(norm_eps));
            const auto w = norm_weight->accessor<T, 3>(), b = norm_bias->accessor<T, 3>();
            for (int64_t i = 0; i < dim; ++i)
              normed[i] = (normed[i] - mean) * inv * w[side][0][i] + b[side][0][i];
          }
          hidden_l.apply(side, normed.data(), dim, hidden_dim, true, hidden.data());
          T logit;
          out_l.apply(side, hidden.data(), hidden_dim, 1, false, &logit);
          const T angle = half_pi / (T(1) + std::exp(-logit));
          const T sin_w = std::sin(angle), cos_w = std::cos(angle);
          for (int64_t i = 0; i < base_dim; ++i) {  // [sin(a) phi, cos(a) phi]
            phi[base_dim + i] = cos_w * phi[i];
            phi[i] *= sin_w;
          }
        }
        const T* q = features.data();
        const T* k = features.data() + feature_dim;
        std::fill(numerator.begin(), numerator.end(), T(0));
        T denominator = 0;
        const int64_t state_offset = n * feature_dim * value_dim;
        if (update) {
          for (int64_t c = 0; c < value_dim; ++c) value[c] = v_a[n][c];
          for (int64_t f = 0; f < feature_dim; ++f) {  // S += k^T v, z += k; q S, q . z
            const T* old_row = kv_p + state_offset + f * value_dim;
            T* new_row = new_kv_p + state_offset + f * value_dim;
            const T kf = k[f], qf = q[f];
            for (int64_t c = 0; c < value_dim; ++c) {
              new_row[c] = old_row[c] + kf * value[c];
              numerator[c] += qf * new_row[c];
            }
            const T z = k_sum_p[n * feature_dim + f] + kf;
            new_k_sum_p[n * feature_dim + f] = z;
            denominator += qf * z;
          }
        } else {
          for (int64_t f = 0; f < feature_dim; ++f) {  // q S, q . z
            const T* row = kv_p + state_offset + f * value_dim;
            const T qf = q[f];
            for (int64_t c = 0; c < value_dim; ++c) numerator[c] += qf * row[c];
            denominator += qf * k_sum_p[n * feature_dim + f];
          }
        }
        denominator = std::max(denominator, T(eps));
        for (int64_t c = 0; c < value_dim; ++c)
          out_p[n * value_dim + c] = numerator[c] / denominator;
      }
    });
  });
  return {new_kv, new_k_sum, out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_step", &fused_step, "One fused causal linear-attention decode step (CPU)");
}
