// Per-(sample, channel) gates (mmattn/blocks/_channel_gate.py): one pass each where PyTorch
// needs two or three.
//
// Forward: SE and ECA after bn3, with the frozen BN folded in, compute
// identity + g * (src * scale + shift) = src * a + b + identity with a = g * scale and
// b = g * shift per (n, c): an affine map, then the add, in PyTorch.
// Without autograd, se_inference and eca_inference are the whole block (the pool, the gate and
// that pass) in one call, and cgd_inference is CGD followed by a frozen bn1 (its pools in one
// pass, channel_pools, which CGD's autograd path and CBAM use too).
// With autograd, se_norm_residual and eca_norm_residual are the same call that also returns
// what their backward needs (the spatial means of src and g), and their _backward ops are the
// whole backward in one call: the gradients of src, of the BN's scale and shift and of the
// gate's weights, from two passes over the map.
// On the other autograd paths, the gate's gradient needs, per (n, c), the sums over H x W of
// grad * x and of grad: channel_grad_sums reads them in one pass where PyTorch writes the
// product out and sums twice, and se_gate_backward, eca_gate_backward and cgd_gate_backward
// go on from there to the gate's input and weights.
#include "gates.h"
#include "pools.h"

namespace mmattn {
namespace {

// out = src * a[n, c] + b[n, c] (+ identity), with a and b (N, C). out may be src itself.
void channel_affine_residual(const at::Tensor& src, const at::Tensor& a, const at::Tensor& b,
                             const std::optional<at::Tensor>& identity, at::Tensor& out) {
  check_nchw("channel_affine_residual", {src, out});
  if (identity.has_value()) check_nchw("channel_affine_residual", {*identity});
  const int64_t rows = src.size(0) * src.size(1), hw = src.size(2) * src.size(3);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "channel_affine_residual", [&] {
    using T = scalar_t;
    const T* xs = src.const_data_ptr<T>();
    const T* as = a.const_data_ptr<T>();
    const T* bs = b.const_data_ptr<T>();
    const T* ids = identity.has_value() ? identity->const_data_ptr<T>() : nullptr;
    T* outs = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const Vec<T> av(as[row]), bv(bs[row]);
        const T* x = xs + row * hw;
        T* o = outs + row * hw;
        if (ids == nullptr) {
          for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
            store_n(at::vec::fmadd(load_n(x + p, n), av, bv), o + p, n);
          });
          continue;
        }
        const T* id = ids + row * hw;
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          store_n(at::vec::fmadd(load_n(x + p, n), av, bv) + load_n(id + p, n), o + p, n);
        });
      }
    });
  });
}

// (sum over H x W of grad * x, sum over H x W of grad), each (N, C), in one pass.
std::tuple<at::Tensor, at::Tensor> channel_grad_sums(const at::Tensor& grad, const at::Tensor& x) {
  check_nchw("channel_grad_sums", {grad, x});
  const int64_t rows = x.size(0) * x.size(1), hw = x.size(2) * x.size(3);
  auto by_x = at::empty({x.size(0), x.size(1)}, x.options());
  auto by_one = at::empty_like(by_x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_grad_sums", [&] {
    using T = scalar_t;
    const T* gs = grad.const_data_ptr<T>();
    const T* xs = x.const_data_ptr<T>();
    T* by_xs = by_x.data_ptr<T>();
    T* by_ones = by_one.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* g = gs + row * hw;
        const T* v = xs + row * hw;
        by_xs[row] = dot_product(g, v, hw);
        by_ones[row] = sum(g, hw);  // grad's row is still in L1/L2 from the dot product
      }
    });
  });
  return {by_x, by_one};
}

// The gate ops take (N, C) contiguous means and the weights of the block's modules.
void check_mlp(const char* op, const at::Tensor& mean, const at::Tensor& w1,
               const at::Tensor& w2) {
  const int64_t channels = mean.size(1);
  TORCH_CHECK(mean.dim() == 2 && mean.is_contiguous() && w1.is_contiguous() &&
                  w2.is_contiguous() && w1.size(1) == channels && w2.size(0) == channels &&
                  w2.size(1) == w1.size(0),
              op, ": means ", mean.sizes(), " and weights ", w1.sizes(), ", ", w2.sizes(),
              " do not fit an MLP C -> hidden -> C");
}

void check_eca(const char* op, const at::Tensor& mean, const at::Tensor& weight) {
  TORCH_CHECK(mean.dim() == 2 && mean.is_contiguous() && weight.is_contiguous() &&
                  weight.numel() % 2 == 1,
              op, ": expects contiguous (N, C) means and a (1, 1, k) weight with odd k, got ",
              mean.sizes(), " and ", weight.sizes());
}

// identity + g * x for x = src * scale + shift, with g (N, C) = gate(the spatial means of x): a
// pass for the means, the gate (gate(means, g) fills g), and channel_affine_residual's pass.
// Returns the spatial means of src and g, each (N, C): what backward needs besides src.
template <typename Gate>
std::tuple<at::Tensor, at::Tensor> folded_gate_residual(
    const char* op, const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& identity, at::Tensor& out, const Gate& gate) {
  check_nchw(op, {src, identity, out});
  check_folded_bn(op, src, scale, shift);
  const int64_t channels = src.size(1), rows = src.size(0) * channels;
  const int64_t hw = src.size(2) * src.size(3);
  auto src_means = at::empty({src.size(0), channels}, src.options());
  auto g = at::empty_like(src_means), a = at::empty_like(g), b = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "folded_gate_residual", [&] {
    using T = scalar_t;
    const T* xs = src.const_data_ptr<T>();
    const T* s = scale.const_data_ptr<T>();
    const T* t = shift.const_data_ptr<T>();
    T* src_mean = src_means.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        src_mean[row] = sum(xs + row * hw, hw) / static_cast<T>(hw);
      }
    });
    std::vector<T> mean(rows);  // of x
    for (int64_t row = 0; row < rows; ++row) {
      mean[row] = src_mean[row] * s[row % channels] + t[row % channels];
    }
    T* gs = g.data_ptr<T>();
    gate(mean.data(), gs);
    T* as = a.data_ptr<T>();
    T* bs = b.data_ptr<T>();
    for (int64_t row = 0; row < rows; ++row) {
      as[row] = gs[row] * s[row % channels];
      bs[row] = gs[row] * t[row % channels];
    }
  });
  channel_affine_residual(src, a, b, identity, out);
  return {src_means, g};
}

// Backward of folded_gate_residual with autograd (the training ops below), given the gradient
// of its output, src, the spatial means of src and g it returned, and gate_backward(d_gate,
// means of x), which returns [d_means of x, the gate weights' gradients...]. Returns [src's,
// scale's, shift's gradients, then the weights']; the identity's is the output's. Two passes
// over the feature map: the sums over H x W of grad * src and of grad, then src's gradient
// grad * g * scale + (d mean of src) / (H * W).
template <typename GateBackward>
std::vector<at::Tensor> folded_gate_residual_backward(
    const char* op, const at::Tensor& grad, const at::Tensor& src, const at::Tensor& src_means,
    const at::Tensor& g, const at::Tensor& scale, const at::Tensor& shift,
    const GateBackward& gate_backward) {
  check_nchw(op, {grad, src});
  check_folded_bn(op, src, scale, shift);
  TORCH_CHECK(src_means.is_contiguous() && g.is_contiguous() &&
                  src_means.sizes() == g.sizes() && g.size(0) == src.size(0) &&
                  g.size(1) == src.size(1),
              op, ": the saved means and gate are (N, C) = (", src.size(0), ", ", src.size(1),
              "), got ", src_means.sizes(), " and ", g.sizes());
  const auto [by_src, by_one] = channel_grad_sums(grad, src);
  const int64_t channels = src.size(1), rows = src.size(0) * channels;
  const int64_t hw = src.size(2) * src.size(3);
  auto means = at::empty_like(g), d_gate = at::empty_like(g);
  auto d_scale = at::zeros_like(scale), d_shift = at::zeros_like(shift);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "folded_gate_residual_backward", [&] {
    using T = scalar_t;
    const T* s = scale.const_data_ptr<T>();
    const T* t = shift.const_data_ptr<T>();
    const T* src_mean = src_means.const_data_ptr<T>();
    const T* gs = g.const_data_ptr<T>();
    const T* by_x = by_src.const_data_ptr<T>();
    const T* by_1 = by_one.const_data_ptr<T>();
    T* mean = means.data_ptr<T>();
    T* dg = d_gate.data_ptr<T>();
    T* ds = d_scale.data_ptr<T>();
    T* dt = d_shift.data_ptr<T>();
    // out = identity + g * (src * s + t): through the product directly, and g's gradient
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t c = row % channels;
      mean[row] = src_mean[row] * s[c] + t[c];  // as forward computed it
      dg[row] = by_x[row] * s[c] + by_1[row] * t[c];
      ds[c] += gs[row] * by_x[row];
      dt[c] += gs[row] * by_1[row];
    }
  });
  auto grads = gate_backward(d_gate, means);
  auto a = at::empty_like(g), b = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "folded_gate_residual_backward", [&] {
    using T = scalar_t;
    const T* s = scale.const_data_ptr<T>();
    const T* src_mean = src_means.const_data_ptr<T>();
    const T* gs = g.const_data_ptr<T>();
    const T* dm = grads[0].template const_data_ptr<T>();
    T* ds = d_scale.data_ptr<T>();
    T* dt = d_shift.data_ptr<T>();
    T* as = a.data_ptr<T>();
    T* bs = b.data_ptr<T>();
    // ... and through the means of x = mean of src * s + t
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t c = row % channels;
      ds[c] += dm[row] * src_mean[row];
      dt[c] += dm[row];
      as[row] = gs[row] * s[c];
      bs[row] = dm[row] * s[c] / static_cast<T>(hw);
    }
  });
  auto d_src = at::empty_like(src);
  channel_affine_residual(grad, a, b, std::nullopt, d_src);
  grads[0] = d_src;
  grads.insert(grads.begin() + 1, {d_scale, d_shift});
  return grads;
}

// SE with its default ReLU and sigmoid, g = sigmoid(w2 relu(w1 mean + b1) + b2), after a frozen
// BN: folded_gate_residual.
std::tuple<at::Tensor, at::Tensor> se_norm_residual_into(
    const char* op, const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& identity, at::Tensor& out, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2) {
  const int64_t batch = src.size(0), channels = src.size(1), hidden = w1.size(0);
  TORCH_CHECK(w1.is_contiguous() && w2.is_contiguous() && w1.size(1) == channels &&
                  w2.size(0) == channels && w2.size(1) == hidden,
              op, ": weights ", w1.sizes(), " and ", w2.sizes(), " do not fit ", channels,
              " channels");
  return folded_gate_residual(op, src, scale, shift, identity, out, [&](auto* mean, auto* gate) {
    using T = std::remove_pointer_t<decltype(gate)>;
    const auto logits = relu_mlp(static_cast<const T*>(mean), batch, channels,
                                 w1.const_data_ptr<T>(), b1.const_data_ptr<T>(), hidden,
                                 w2.const_data_ptr<T>(), b2.const_data_ptr<T>());
    for (int64_t i = 0; i < batch * channels; ++i) gate[i] = scalar_sigmoid(logits[i]);
  });
}

void se_inference(const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
                  const at::Tensor& identity, at::Tensor& out, const at::Tensor& w1,
                  const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  se_norm_residual_into("se_inference", src, scale, shift, identity, out, w1, b1, w2, b2);
}

// ECA, g = sigmoid(the 1-D convolution of the means along the channels, weight (1, 1, k)),
// after a frozen BN: folded_gate_residual.
std::tuple<at::Tensor, at::Tensor> eca_norm_residual_into(
    const char* op, const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& identity, at::Tensor& out, const at::Tensor& weight) {
  const int64_t batch = src.size(0), channels = src.size(1), k = weight.size(-1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == k && k % 2 == 1,
              op, ": expects a (1, 1, k) weight with odd k, got ", weight.sizes());
  return folded_gate_residual(op, src, scale, shift, identity, out, [&](auto* mean, auto* gate) {
    using T = std::remove_pointer_t<decltype(gate)>;
    channel_conv(static_cast<const T*>(mean), batch, channels, weight.const_data_ptr<T>(), k,
                 gate);
    for (int64_t i = 0; i < batch * channels; ++i) gate[i] = scalar_sigmoid(gate[i]);
  });
}

void eca_inference(const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
                   const at::Tensor& identity, at::Tensor& out, const at::Tensor& weight) {
  eca_norm_residual_into("eca_inference", src, scale, shift, identity, out, weight);
}

// SE's gate with its default ReLU and sigmoid, sigmoid(w2 relu(w1 mean + b1) + b2), (N, C).
// peak is unused (SE pools means only); it keeps the gate ops' common signature.
at::Tensor se_gate(const at::Tensor& mean, const std::optional<at::Tensor>& peak,
                   const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                   const at::Tensor& b2) {
  const int64_t batch = mean.size(0), channels = mean.size(1), hidden = w1.size(0);
  check_mlp("se_gate", mean, w1, w2);
  auto out = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "se_gate", [&] {
    using T = scalar_t;
    const auto logits = relu_mlp(mean.const_data_ptr<T>(), batch, channels,
                                 w1.const_data_ptr<T>(), b1.const_data_ptr<T>(), hidden,
                                 w2.const_data_ptr<T>(), b2.const_data_ptr<T>());
    T* g = out.data_ptr<T>();
    for (int64_t i = 0; i < batch * channels; ++i) g[i] = scalar_sigmoid(logits[i]);
  });
  return out;
}

// Gradients of se_gate: [mean's (N, C), an empty one for peak, w1's, b1's, w2's, b2's].
std::vector<at::Tensor> se_gate_backward(const at::Tensor& grad, const at::Tensor& mean,
                                         const std::optional<at::Tensor>& peak,
                                         const at::Tensor& w1, const at::Tensor& b1,
                                         const at::Tensor& w2, const at::Tensor& b2) {
  const int64_t batch = mean.size(0), channels = mean.size(1), hidden = w1.size(0);
  check_mlp("se_gate_backward", mean, w1, w2);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == mean.sizes(),
              "se_gate_backward: expects a contiguous gradient of shape ", mean.sizes());
  auto d_mean = at::empty_like(mean);
  auto d_w1 = at::empty_like(w1), d_b1 = at::empty_like(b1);
  auto d_w2 = at::empty_like(w2), d_b2 = at::empty_like(b2);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "se_gate_backward", [&] {
    using T = scalar_t;
    const T* m = mean.const_data_ptr<T>();
    // d logits = grad * g * (1 - g), with the logits computed again.
    auto dl = relu_mlp(m, batch, channels, w1.const_data_ptr<T>(), b1.const_data_ptr<T>(),
                       hidden, w2.const_data_ptr<T>(), b2.const_data_ptr<T>());
    const T* gr = grad.const_data_ptr<T>();
    for (int64_t i = 0; i < batch * channels; ++i) {
      const T g = scalar_sigmoid(dl[i]);
      dl[i] = gr[i] * g * (T(1) - g);
    }
    relu_mlp_backward(m, dl.data(), batch, channels, w1.const_data_ptr<T>(),
                      b1.const_data_ptr<T>(), hidden, w2.const_data_ptr<T>(),
                      d_mean.data_ptr<T>(), d_w1.data_ptr<T>(), d_b1.data_ptr<T>(),
                      d_w2.data_ptr<T>(), d_b2.data_ptr<T>());
  });
  return {d_mean, at::empty({0}, mean.options()), d_w1, d_b1, d_w2, d_b2};
}

// ECA's gate: sigmoid of the 1-D convolution of the means along the channels (weight (1, 1, k)).
at::Tensor eca_gate(const at::Tensor& mean, const std::optional<at::Tensor>& peak,
                    const at::Tensor& weight) {
  check_eca("eca_gate", mean, weight);
  auto out = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "eca_gate", [&] {
    using T = scalar_t;
    T* g = out.data_ptr<T>();
    channel_conv(mean.const_data_ptr<T>(), mean.size(0), mean.size(1),
                 weight.const_data_ptr<T>(), weight.numel(), g);
    for (int64_t i = 0; i < out.numel(); ++i) g[i] = scalar_sigmoid(g[i]);
  });
  return out;
}

// Gradients of eca_gate: [mean's (N, C), an empty one for peak, weight's (1, 1, k)].
std::vector<at::Tensor> eca_gate_backward(const at::Tensor& grad, const at::Tensor& mean,
                                          const std::optional<at::Tensor>& peak,
                                          const at::Tensor& weight) {
  check_eca("eca_gate_backward", mean, weight);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == mean.sizes(),
              "eca_gate_backward: expects a contiguous gradient of shape ", mean.sizes());
  const int64_t rows = mean.size(0), channels = mean.size(1), k = weight.numel(), pad = k / 2;
  auto d_mean = at::zeros_like(mean);
  auto d_weight = at::zeros_like(weight);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "eca_gate_backward", [&] {
    using T = scalar_t;
    const T* m = mean.const_data_ptr<T>();
    const T* w = weight.const_data_ptr<T>();
    std::vector<T> dl(rows * channels);
    channel_conv(m, rows, channels, w, k, dl.data());  // the logits, then their gradient
    const T* gr = grad.const_data_ptr<T>();
    for (int64_t i = 0; i < rows * channels; ++i) {
      const T g = scalar_sigmoid(dl[i]);
      dl[i] = gr[i] * g * (T(1) - g);
    }
    // logit[r, c] = sum_j w[j] m[r, c + j - pad]
    T* dm = d_mean.data_ptr<T>();
    T* dw = d_weight.data_ptr<T>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < channels; ++c) {
        const T d = dl[r * channels + c];
        for (int64_t j = std::max<int64_t>(0, pad - c); j < std::min(k, channels + pad - c);
             ++j) {
          dw[j] += d * m[r * channels + c + j - pad];
          dm[r * channels + c + j - pad] += d * w[j];
        }
      }
    }
  });
  return {d_mean, at::empty({0}, mean.options()), d_weight};
}

// Training, with autograd (blocks/_channel_gate.py's _KernelNormGate): identity + g * x for
// x = src * scale + shift into a new tensor, returned with the spatial means of src and g for
// backward, and the backward. se_norm_residual_backward returns the gradients of src, scale,
// shift, w1, b1, w2, b2; eca_norm_residual_backward those of src, scale, shift and the weight.
std::vector<at::Tensor> se_norm_residual(const at::Tensor& src, const at::Tensor& scale,
                                         const at::Tensor& shift, const at::Tensor& identity,
                                         const at::Tensor& w1, const at::Tensor& b1,
                                         const at::Tensor& w2, const at::Tensor& b2) {
  auto out = at::empty_like(src);
  auto [src_means, g] =
      se_norm_residual_into("se_norm_residual", src, scale, shift, identity, out, w1, b1, w2, b2);
  return {out, src_means, g};
}

std::vector<at::Tensor> se_norm_residual_backward(
    const at::Tensor& grad, const at::Tensor& src, const at::Tensor& src_means,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  return folded_gate_residual_backward(
      "se_norm_residual_backward", grad, src, src_means, gate, scale, shift,
      [&](const at::Tensor& d_gate, const at::Tensor& means) {
        auto grads = se_gate_backward(d_gate, means, std::nullopt, w1, b1, w2, b2);
        grads.erase(grads.begin() + 1);  // the unused peak's
        return grads;
      });
}

std::vector<at::Tensor> eca_norm_residual(const at::Tensor& src, const at::Tensor& scale,
                                          const at::Tensor& shift, const at::Tensor& identity,
                                          const at::Tensor& weight) {
  auto out = at::empty_like(src);
  auto [src_means, g] =
      eca_norm_residual_into("eca_norm_residual", src, scale, shift, identity, out, weight);
  return {out, src_means, g};
}

std::vector<at::Tensor> eca_norm_residual_backward(
    const at::Tensor& grad, const at::Tensor& src, const at::Tensor& src_means,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight) {
  return folded_gate_residual_backward(
      "eca_norm_residual_backward", grad, src, src_means, gate, scale, shift,
      [&](const at::Tensor& d_gate, const at::Tensor& means) {
        auto grads = eca_gate_backward(d_gate, means, std::nullopt, weight);
        grads.erase(grads.begin() + 1);  // the unused peak's
        return grads;
      });
}

// CGD's gate (mmattn/blocks/cgd.py) for one sample, 1 + gate per channel. Cascade (w1 given):
// with p = softmax(mean) over the channels, psi = tanh(p (mean . w0) + bias0),
// phi = tanh(p (max . w1) + bias1), gate = tanh(psi (phi . w2) + bias2); plain:
// gate = tanh(mean (mean . w0)). Weights and biases are read as C values each.
template <typename T>
struct CgdGate {
  const T *w0, *w1, *w2, *bias0, *bias1, *bias2;  // w1 == nullptr: plain
  int64_t channels;
  // The intermediate values of the last sample, for backward.
  std::vector<T> p, psi, phi;
  T by_w0 = 0, by_w1 = 0, by_w2 = 0;

  CgdGate(const at::Tensor& w0_t, const std::optional<at::Tensor>& w1_t,
          const std::optional<at::Tensor>& w2_t, const std::optional<at::Tensor>& b0_t,
          const std::optional<at::Tensor>& b1_t, const std::optional<at::Tensor>& b2_t)
      : w0(w0_t.const_data_ptr<T>()),
        w1(w1_t.has_value() ? w1_t->const_data_ptr<T>() : nullptr),
        w2(w2_t.has_value() ? w2_t->const_data_ptr<T>() : nullptr),
        bias0(b0_t.has_value() ? b0_t->const_data_ptr<T>() : nullptr),
        bias1(b1_t.has_value() ? b1_t->const_data_ptr<T>() : nullptr),
        bias2(b2_t.has_value() ? b2_t->const_data_ptr<T>() : nullptr),
        channels(w0_t.numel()),
        p(channels),
        psi(channels),
        phi(channels) {
    TORCH_CHECK(w1 == nullptr || (w2 != nullptr && bias0 != nullptr && bias1 != nullptr &&
                                  bias2 != nullptr),
                "CGD kernels: w1, w2 and the three biases come together (cascade) or not at "
                "all (plain)");
  }

  // out[c] = 1 + gate[c] for a sample's (C, ) mean and max (max unused when plain).
  void forward(const T* mean, const T* peak, T* out) {
    by_w0 = dot_product(mean, w0, channels);
    if (w1 == nullptr) {
      for (int64_t c = 0; c < channels; ++c) out[c] = T(1) + std::tanh(mean[c] * by_w0);
      return;
    }
    const T top = *std::max_element(mean, mean + channels);
    T total(0);
    for (int64_t c = 0; c < channels; ++c) total += p[c] = std::exp(mean[c] - top);
    by_w1 = dot_product(peak, w1, channels);
    for (int64_t c = 0; c < channels; ++c) {
      p[c] /= total;
      psi[c] = std::tanh(p[c] * by_w0 + bias0[c]);
      phi[c] = std::tanh(p[c] * by_w1 + bias1[c]);
    }
    by_w2 = dot_product(phi.data(), w2, channels);
    for (int64_t c = 0; c < channels; ++c) out[c] = T(1) + std::tanh(psi[c] * by_w2 + bias2[c]);
  }

  // Backward of forward() for the sample it last ran on, given the gradient of its output:
  // writes the mean's and max's gradients and adds the weights' and biases' (C, ) each.
  void backward(const T* grad, const T* mean, const T* peak, T* d_mean, T* d_peak, T* d_w0,
                T* d_w1, T* d_w2, T* d_bias0, T* d_bias1, T* d_bias2) {
    if (w1 == nullptr) {
      // out = 1 + tanh(z), z = mean * (mean . w0)
      T by_mean(0);
      for (int64_t c = 0; c < channels; ++c) {
        const T g = std::tanh(mean[c] * by_w0);
        d_mean[c] = grad[c] * (T(1) - g * g);  // dz for now
        by_mean += d_mean[c] * mean[c];
      }
      for (int64_t c = 0; c < channels; ++c) {
        d_mean[c] = d_mean[c] * by_w0 + by_mean * w0[c];
        d_w0[c] += by_mean * mean[c];
      }
      return;
    }
    // dz (z = psi * by_w2 + bias2), then through psi and phi to u and v (psi = tanh(u),
    // phi = tanh(v), u = p by_w0 + bias0, v = p by_w1 + bias1), then to p and the pools.
    std::vector<T> du(channels), dv(channels);
    T d_by_w2(0);
    for (int64_t c = 0; c < channels; ++c) {
      const T g = std::tanh(psi[c] * by_w2 + bias2[c]);
      const T dz = grad[c] * (T(1) - g * g);
      d_bias2[c] += dz;
      d_by_w2 += dz * psi[c];
      du[c] = dz * by_w2 * (T(1) - psi[c] * psi[c]);
    }
    T d_by_w0(0), d_by_w1(0);
    for (int64_t c = 0; c < channels; ++c) {
      d_w2[c] += d_by_w2 * phi[c];
      dv[c] = d_by_w2 * w2[c] * (T(1) - phi[c] * phi[c]);
      d_bias0[c] += du[c];
      d_bias1[c] += dv[c];
      d_by_w0 += du[c] * p[c];
      d_by_w1 += dv[c] * p[c];
    }
    // dp = du by_w0 + dv by_w1; through the softmax: p * (dp - sum(dp * p)).
    T dp_dot_p(0);
    for (int64_t c = 0; c < channels; ++c) dp_dot_p += (du[c] * by_w0 + dv[c] * by_w1) * p[c];
    for (int64_t c = 0; c < channels; ++c) {
      const T dp = du[c] * by_w0 + dv[c] * by_w1;
      d_mean[c] = d_by_w0 * w0[c] + p[c] * (dp - dp_dot_p);
      d_peak[c] = d_by_w1 * w1[c];
      d_w0[c] += d_by_w0 * mean[c];
      d_w1[c] += d_by_w1 * peak[c];
    }
  }
};

// CGD's (N, C) 1 + gate from its (N, C) pools (peak unused when plain).
at::Tensor cgd_gate(const at::Tensor& mean, const std::optional<at::Tensor>& peak,
                    const at::Tensor& w0, const std::optional<at::Tensor>& w1,
                    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& bias0,
                    const std::optional<at::Tensor>& bias1,
                    const std::optional<at::Tensor>& bias2) {
  const int64_t batch = mean.size(0), channels = mean.size(1);
  TORCH_CHECK(mean.is_contiguous() && w0.numel() == channels &&
                  (!w1.has_value() || (peak.has_value() && peak->is_contiguous())),
              "cgd_gate: expects contiguous (N, C) pools and C weights, got ", mean.sizes(),
              " and ", w0.sizes());
  auto out = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cgd_gate", [&] {
    using T = scalar_t;
    CgdGate<T> gate(w0, w1, w2, bias0, bias1, bias2);
    for (int64_t n = 0; n < batch; ++n) {
      gate.forward(mean.const_data_ptr<T>() + n * channels,
                   w1.has_value() ? peak->const_data_ptr<T>() + n * channels : nullptr,
                   out.data_ptr<T>() + n * channels);
    }
  });
  return out;
}

// Gradients of cgd_gate: the pools' (N, C) each (the max's empty when plain) and the weights'
// and biases' (C, ) each (empty when plain, except w0's).
std::vector<at::Tensor> cgd_gate_backward(
    const at::Tensor& grad, const at::Tensor& mean, const std::optional<at::Tensor>& peak,
    const at::Tensor& w0, const std::optional<at::Tensor>& w1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& bias0,
    const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2) {
  const int64_t batch = mean.size(0), channels = mean.size(1);
  const bool cascade = w1.has_value();
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == mean.sizes(),
              "cgd_gate_backward: expects a contiguous gradient of the gate's shape ",
              mean.sizes(), ", got ", grad.sizes());
  auto d_mean = at::empty_like(mean);
  auto d_peak = at::empty({cascade ? batch : 0, channels}, mean.options());
  auto d_w0 = at::zeros({channels}, mean.options());
  auto d_w1 = at::zeros({cascade ? channels : 0}, mean.options()), d_w2 = at::zeros_like(d_w1);
  auto d_b0 = at::zeros_like(d_w1), d_b1 = at::zeros_like(d_w1), d_b2 = at::zeros_like(d_w1);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cgd_gate_backward", [&] {
    using T = scalar_t;
    CgdGate<T> gate(w0, w1, w2, bias0, bias1, bias2);
    std::vector<T> unused(channels);
    for (int64_t n = 0; n < batch; ++n) {
      const T* m = mean.const_data_ptr<T>() + n * channels;
      const T* k = cascade ? peak->const_data_ptr<T>() + n * channels : nullptr;
      gate.forward(m, k, unused.data());  // the intermediate values
      gate.backward(grad.const_data_ptr<T>() + n * channels, m, k,
                    d_mean.data_ptr<T>() + n * channels,
                    cascade ? d_peak.data_ptr<T>() + n * channels : nullptr, d_w0.data_ptr<T>(),
                    d_w1.data_ptr<T>(), d_w2.data_ptr<T>(), d_b0.data_ptr<T>(),
                    d_b1.data_ptr<T>(), d_b2.data_ptr<T>());
    }
  });
  return {d_mean, d_peak, d_w0, d_w1, d_w2, d_b0, d_b1, d_b2};
}

// CGD between conv1 and a frozen bn1: out = g * src * scale + shift with g = 1 + gate(the
// spatial means (and maxima) of src), in two passes: the pools (mean and max together), and
// the output.
void cgd_inference(const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
                   at::Tensor& out, const at::Tensor& w0, const std::optional<at::Tensor>& w1,
                   const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& bias0,
                   const std::optional<at::Tensor>& bias1,
                   const std::optional<at::Tensor>& bias2) {
  check_nchw("cgd_inference", {src, out});
  check_folded_bn("cgd_inference", src, scale, shift);
  auto [means, maxima, unused] = channel_pools(src, std::nullopt, std::nullopt, false);
  auto a = cgd_gate(means, maxima, w0, w1, w2, bias0, bias1, bias2);  // g, then g * scale
  auto b = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "cgd_inference", [&] {
    using T = scalar_t;
    const T* s = scale.const_data_ptr<T>();
    const T* t = shift.const_data_ptr<T>();
    T* as = a.data_ptr<T>();
    T* bs = b.data_ptr<T>();
    const int64_t channels = src.size(1);
    for (int64_t row = 0; row < a.numel(); ++row) {
      as[row] *= s[row % channels];
      bs[row] = t[row % channels];
    }
  });
  channel_affine_residual(src, a, b, std::nullopt, out);
}

// relu(src * scale[c] + shift[c]) at every stride-th row and column, (N, C, ceil(H / stride),
// ceil(W / stride)): GSoP's rectified, subsampled input with a frozen bn3 folded in, in one pass
// (PyTorch: the BN's pass, then the strided ReLU's).
at::Tensor channel_affine_relu(const at::Tensor& src, const at::Tensor& scale,
                               const at::Tensor& shift, int64_t stride) {
  check_nchw("channel_affine_relu", {src});
  check_folded_bn("channel_affine_relu", src, scale, shift);
  TORCH_CHECK(stride >= 1, "channel_affine_relu: stride must be positive, got ", stride);
  const int64_t channels = src.size(1), height = src.size(2), width = src.size(3);
  const int64_t out_h = (height + stride - 1) / stride, out_w = (width + stride - 1) / stride;
  auto out = at::empty({src.size(0), channels, out_h, out_w}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "channel_affine_relu", [&] {
    using T = scalar_t;
    const T* xs = src.const_data_ptr<T>();
    const T* s = scale.const_data_ptr<T>();
    const T* t = shift.const_data_ptr<T>();
    T* outs = out.data_ptr<T>();
    at::parallel_for(0, src.size(0) * channels, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % channels;
        const T* x = xs + row * height * width;
        T* o = outs + row * out_h * out_w;
        if (stride == 1) {
          const Vec<T> sv(s[c]), tv(t[c]), zero(T(0));
          for_each_vec<T>(height * width, [&](int64_t p, int64_t n) {
            store_n(at::vec::clamp_min(at::vec::fmadd(load_n(x + p, n), sv, tv), zero), o + p, n);
          });
          continue;
        }
        for (int64_t i = 0; i < out_h; ++i) {
          const T* in = x + i * stride * width;
          for (int64_t j = 0; j < out_w; ++j) {
            o[i * out_w + j] = relu(std::fma(in[j * stride], s[c], t[c]));
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  // scale, shift: a frozen BN folded in; x is then the BN's input (see pools.h's Input).
  m.def("channel_pools(Tensor x, Tensor? scale, Tensor? shift, bool with_argmax) "
        "-> (Tensor, Tensor, Tensor)",
        &channel_pools);
  m.def("channel_grad_sums(Tensor grad, Tensor x) -> (Tensor, Tensor)", &channel_grad_sums);
  m.def("channel_affine_relu(Tensor src, Tensor scale, Tensor shift, int stride) -> Tensor",
        &channel_affine_relu);
  m.def("se_gate(Tensor mean, Tensor? peak, Tensor w1, Tensor b1, Tensor w2, Tensor b2) "
        "-> Tensor",
        &se_gate);
  m.def("se_gate_backward(Tensor grad, Tensor mean, Tensor? peak, Tensor w1, Tensor b1, "
        "Tensor w2, Tensor b2) -> Tensor[]",
        &se_gate_backward);
  m.def("eca_gate(Tensor mean, Tensor? peak, Tensor weight) -> Tensor", &eca_gate);
  m.def("eca_gate_backward(Tensor grad, Tensor mean, Tensor? peak, Tensor weight) -> Tensor[]",
        &eca_gate_backward);
  m.def("cgd_gate(Tensor mean, Tensor? peak, Tensor w0, Tensor? w1, Tensor? w2, Tensor? bias0, "
        "Tensor? bias1, Tensor? bias2) -> Tensor",
        &cgd_gate);
  m.def("cgd_gate_backward(Tensor grad, Tensor mean, Tensor? peak, Tensor w0, Tensor? w1, "
        "Tensor? w2, Tensor? bias0, Tensor? bias1, Tensor? bias2) -> Tensor[]",
        &cgd_gate_backward);
  m.def("cgd_inference(Tensor src, Tensor scale, Tensor shift, Tensor(a!) out, Tensor w0, "
        "Tensor? w1, Tensor? w2, Tensor? bias0, Tensor? bias1, Tensor? bias2) -> ()",
        &cgd_inference);
  m.def("se_inference(Tensor src, Tensor scale, Tensor shift, Tensor identity, Tensor(a!) out, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> ()",
        &se_inference);
  m.def("eca_inference(Tensor src, Tensor scale, Tensor shift, Tensor identity, "
        "Tensor(a!) out, Tensor weight) -> ()",
        &eca_inference);
  m.def("se_norm_residual(Tensor src, Tensor scale, Tensor shift, Tensor identity, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2) -> Tensor[]",
        &se_norm_residual);
  m.def("se_norm_residual_backward(Tensor grad, Tensor src, Tensor src_means, Tensor gate, "
        "Tensor scale, Tensor shift, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor[]",
        &se_norm_residual_backward);
  m.def("eca_norm_residual(Tensor src, Tensor scale, Tensor shift, Tensor identity, "
        "Tensor weight) -> Tensor[]",
        &eca_norm_residual);
  m.def("eca_norm_residual_backward(Tensor grad, Tensor src, Tensor src_means, Tensor gate, "
        "Tensor scale, Tensor shift, Tensor weight) -> Tensor[]",
        &eca_norm_residual_backward);
  m.def("channel_affine_residual(Tensor src, Tensor a, Tensor b, Tensor? identity, "
        "Tensor(a!) out) -> ()",
        &channel_affine_residual);
}

}  // namespace mmattn
