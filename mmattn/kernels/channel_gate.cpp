// Per-(sample, channel) gates (mmattn/blocks/_channel_gate.py): one pass each where PyTorch
// needs two or three.
//
// Forward: SE and ECA after bn3, with the frozen BN folded in, compute
// identity + g * (src * scale + shift) = src * a + b + identity with a = g * scale and
// b = g * shift per (n, c): an affine map, then the add, in PyTorch.
// Without autograd, se_inference and eca_inference are the whole block (the pool, the gate and
// that pass) in one call, and cgd_inference is CGD followed by a frozen bn1 (its pools in one
// pass, channel_pools, which CGD's autograd path and CBAM use too).
// Backward: the gate's gradient needs, per (n, c), the sums over H x W of grad * x and of grad:
// a product written out and two sums, in PyTorch.
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
            at::vec::fmadd(Vec<T>::loadu(x + p, n), av, bv).store(o + p, n);
          });
          continue;
        }
        const T* id = ids + row * hw;
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          (at::vec::fmadd(Vec<T>::loadu(x + p, n), av, bv) + Vec<T>::loadu(id + p, n))
              .store(o + p, n);
        });
      }
    });
  });
}

// identity + g * x for x = src * scale + shift, with g (N, C) = gate(the spatial means of x): a
// pass for the means, the gate (gate(means, g) fills g), and channel_affine_residual's pass.
template <typename Gate>
void folded_gate_residual(const char* op, const at::Tensor& src, const at::Tensor& scale,
                          const at::Tensor& shift, const at::Tensor& identity, at::Tensor& out,
                          const Gate& gate) {
  check_nchw(op, {src, identity, out});
  const int64_t channels = src.size(1), rows = src.size(0) * channels;
  const int64_t hw = src.size(2) * src.size(3);
  auto means = at::empty({src.size(0), channels}, src.options());
  auto a = at::empty_like(means), b = at::empty_like(means);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "folded_gate_residual", [&] {
    using T = scalar_t;
    const T* xs = src.const_data_ptr<T>();
    const T* s = scale.const_data_ptr<T>();
    const T* t = shift.const_data_ptr<T>();
    T* mean = means.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % channels;
        mean[row] = sum(xs + row * hw, hw) / static_cast<T>(hw) * s[c] + t[c];
      }
    });
    T* g = a.data_ptr<T>();
    gate(mean, g);
    T* bs = b.data_ptr<T>();
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t c = row % channels;
      bs[row] = g[row] * t[c];
      g[row] = g[row] * s[c];  // a = g * scale, written over g
    }
  });
  channel_affine_residual(src, a, b, identity, out);
}

// SE with its default ReLU and sigmoid: g = sigmoid(w2 relu(w1 mean + b1) + b2).
void se_inference(const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
                  const at::Tensor& identity, at::Tensor& out, const at::Tensor& w1,
                  const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  const int64_t batch = src.size(0), channels = src.size(1), hidden = w1.size(0);
  TORCH_CHECK(w1.is_contiguous() && w2.is_contiguous() && w1.size(1) == channels &&
                  w2.size(0) == channels && w2.size(1) == hidden,
              "se_inference: weights ", w1.sizes(), " and ", w2.sizes(), " do not fit ",
              channels, " channels");
  folded_gate_residual("se_inference", src, scale, shift, identity, out, [&](auto* mean,
                                                                              auto* gate) {
    using T = std::remove_pointer_t<decltype(gate)>;
    const auto logits = relu_mlp(static_cast<const T*>(mean), batch, channels,
                                 w1.const_data_ptr<T>(), b1.const_data_ptr<T>(), hidden,
                                 w2.const_data_ptr<T>(), b2.const_data_ptr<T>());
    for (int64_t i = 0; i < batch * channels; ++i) gate[i] = scalar_sigmoid(logits[i]);
  });
}

// ECA: g = sigmoid(the 1-D convolution of the means along the channels, weight (1, 1, k)).
void eca_inference(const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
                   const at::Tensor& identity, at::Tensor& out, const at::Tensor& weight) {
  const int64_t batch = src.size(0), channels = src.size(1), k = weight.size(-1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == k && k % 2 == 1,
              "eca_inference: expects a (1, 1, k) weight with odd k, got ", weight.sizes());
  folded_gate_residual("eca_inference", src, scale, shift, identity, out, [&](auto* mean,
                                                                               auto* gate) {
    using T = std::remove_pointer_t<decltype(gate)>;
    channel_conv(static_cast<const T*>(mean), batch, channels, weight.const_data_ptr<T>(), k,
                 gate);
    for (int64_t i = 0; i < batch * channels; ++i) gate[i] = scalar_sigmoid(gate[i]);
  });
}

// CGD between conv1 and a frozen bn1: out = g * src * scale + shift with g = 1 + gate(the
// spatial means (and maxima) of src). Cascade (w1 given): with p = softmax(mean) over the
// channels, psi = tanh(p (mean . w0) + bias0), phi = tanh(p (max . w1) + bias1),
// gate = tanh(psi (phi . w2) + bias2); plain: gate = tanh(mean (mean . w0)). Two passes: the
// pools (mean and max together), and the output.
void cgd_inference(const at::Tensor& src, const at::Tensor& scale, const at::Tensor& shift,
                   at::Tensor& out, const at::Tensor& w0, const std::optional<at::Tensor>& w1,
                   const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& bias0,
                   const std::optional<at::Tensor>& bias1,
                   const std::optional<at::Tensor>& bias2) {
  const int64_t batch = src.size(0), channels = src.size(1);
  const bool cascade = w1.has_value();
  TORCH_CHECK(w0.numel() == channels && (!cascade || (w2.has_value() && bias0.has_value() &&
                                                      bias1.has_value() && bias2.has_value())),
              "cgd_inference: expects w0 of ", channels, " values, and w1, w2 and the three "
              "biases together (cascade) or none of them (plain)");
  auto [means, maxima, unused] = channel_pools(src, std::nullopt, std::nullopt, false);
  auto a = at::empty_like(means), b = at::empty_like(means);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "cgd_inference", [&] {
    using T = scalar_t;
    const T* s = scale.const_data_ptr<T>();
    const T* t = shift.const_data_ptr<T>();
    std::vector<T> softmax(channels), psi(channels), phi(channels);
    for (int64_t n = 0; n < batch; ++n) {
      const T* mean = means.const_data_ptr<T>() + n * channels;
      T* as = a.data_ptr<T>() + n * channels;
      T* bs = b.data_ptr<T>() + n * channels;
      const T by_w0 = dot_product(mean, w0.const_data_ptr<T>(), channels);
      if (cascade) {
        const T top = *std::max_element(mean, mean + channels);
        T total(0);
        for (int64_t c = 0; c < channels; ++c) total += softmax[c] = std::exp(mean[c] - top);
        const T* peak = maxima.const_data_ptr<T>() + n * channels;
        const T by_w1 = dot_product(peak, w1->const_data_ptr<T>(), channels);
        for (int64_t c = 0; c < channels; ++c) {
          const T p = softmax[c] / total;
          psi[c] = std::tanh(p * by_w0 + bias0->const_data_ptr<T>()[c]);
          phi[c] = std::tanh(p * by_w1 + bias1->const_data_ptr<T>()[c]);
        }
        const T by_w2 = dot_product(phi.data(), w2->const_data_ptr<T>(), channels);
        for (int64_t c = 0; c < channels; ++c) {
          as[c] = (T(1) + std::tanh(psi[c] * by_w2 + bias2->const_data_ptr<T>()[c])) * s[c];
        }
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          as[c] = (T(1) + std::tanh(mean[c] * by_w0)) * s[c];
        }
      }
      std::copy(t, t + channels, bs);
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
            at::vec::clamp_min(at::vec::fmadd(Vec<T>::loadu(x + p, n), sv, tv), zero)
                .store(o + p, n);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  // scale, shift: a frozen BN folded in; x is then the BN's input (see pools.h's Input).
  m.def("channel_pools(Tensor x, Tensor? scale, Tensor? shift, bool with_argmax) "
        "-> (Tensor, Tensor, Tensor)",
        &channel_pools);
  m.def("channel_grad_sums(Tensor grad, Tensor x) -> (Tensor, Tensor)", &channel_grad_sums);
  m.def("channel_affine_relu(Tensor src, Tensor scale, Tensor shift, int stride) -> Tensor",
        &channel_affine_relu);
  m.def("cgd_inference(Tensor src, Tensor scale, Tensor shift, Tensor(a!) out, Tensor w0, "
        "Tensor? w1, Tensor? w2, Tensor? bias0, Tensor? bias1, Tensor? bias2) -> ()",
        &cgd_inference);
  m.def("se_inference(Tensor src, Tensor scale, Tensor shift, Tensor identity, Tensor(a!) out, "
        "Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> ()",
        &se_inference);
  m.def("eca_inference(Tensor src, Tensor scale, Tensor shift, Tensor identity, "
        "Tensor(a!) out, Tensor weight) -> ()",
        &eca_inference);
  m.def("channel_affine_residual(Tensor src, Tensor a, Tensor b, Tensor? identity, "
        "Tensor(a!) out) -> ()",
        &channel_affine_residual);
}

}  // namespace mmattn
