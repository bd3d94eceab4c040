// CBAM on the CPU: out = x * channel[c] * spatial[p] (+ identity) with the pools and gradients
// computed in as few passes over x as the math allows.
//
// Forward: one pass for x's spatial mean and max per channel (the channel gate's input), one
// for the channel-wise max and mean of x * channel per position (the spatial gate's input), one
// for the output; x * channel is never stored. With autograd the two gates themselves (an MLP
// and a 7x7 conv on small tensors) stay in PyTorch; without it, cbam_inference computes them
// here too, so that the whole block is one call. Backward: one pass for the gates' gradients,
// one for what the spatial pools send back to the channel gate, one for x's gradient. The math
// is mmattn/blocks/cbam.py's.
#include "gates.h"
#include "pools.h"

namespace mmattn {
namespace {

// Positions per task when a pass walks the channels of a block of positions: the running
// buffers (a few times this many values) stay in L1.
constexpr int64_t kPositions = 1024;

// (N, 2, H, W): per position, the max and the mean over the channels of x * channel, and the
// channel of each max (N, 1, H, W), as x's dtype (exact below 2^24 channels).
std::tuple<at::Tensor, at::Tensor> cbam_spatial_pools(const at::Tensor& x,
                                                      const std::optional<at::Tensor>& scale,
                                                      const std::optional<at::Tensor>& shift,
                                                      const at::Tensor& channel) {
  check_nchw("cbam_spatial_pools", {x});
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t blocks = (hw + kPositions - 1) / kPositions;
  auto pooled = at::empty({batch, 2, x.size(2), x.size(3)}, x.options());
  auto argmax = at::empty({batch, 1, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_spatial_pools", [&] {
    using T = scalar_t;
    const Input<T> in("cbam_spatial_pools", x, scale, shift);
    const T* gate_all = channel.const_data_ptr<T>();
    T* out = pooled.data_ptr<T>();
    T* where_all = argmax.data_ptr<T>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> top(kPositions), total(kPositions);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, start = (task % blocks) * kPositions;
        const int64_t size = std::min(kPositions, hw - start);
        const int64_t offset = n * channels * hw + start;
        const T* gate = gate_all + n * channels;
        T* where = where_all + n * hw + start;
        // Channel 0 starts the running max, its channel and the sum; then up to four channels
        // at a time update them, so the buffers are read and written once per four channels.
        for_each_vec<T>(size, [&](int64_t p, int64_t k) {
          const auto v = in.load(offset + p, 0, k) * Vec<T>(gate[0]);
          store_n(v, top.data() + p, k);
          store_n(v, total.data() + p, k);
          store_n(Vec<T>(T(0)), where + p, k);
        });
        for (int64_t c0 = 1; c0 < channels; c0 += 4) {
          const int64_t step = std::min<int64_t>(4, channels - c0);
          for_each_vec<T>(size, [&](int64_t p, int64_t k) {
            auto best = load_n(top.data() + p, k);
            auto best_c = load_n(where + p, k);
            auto sum = load_n(total.data() + p, k);
            for (int64_t c = c0; c < c0 + step; ++c) {
              const auto v = in.load(offset + c * hw + p, c, k) * Vec<T>(gate[c]);
              const auto higher = v > best;  // strict: ties keep the first channel
              best = Vec<T>::blendv(best, v, higher);
              best_c = Vec<T>::blendv(best_c, Vec<T>(static_cast<T>(c)), higher);
              sum = sum + v;
            }
            store_n(best, top.data() + p, k);
            store_n(best_c, where + p, k);
            store_n(sum, total.data() + p, k);
          });
        }
        T* max_out = out + n * 2 * hw + start;
        T* mean_out = max_out + hw;
        const Vec<T> channels_v(static_cast<T>(channels));
        for_each_vec<T>(size, [&](int64_t p, int64_t k) {
          store_n(load_n(top.data() + p, k), max_out + p, k);
          store_n(load_n(total.data() + p, k) / channels_v, mean_out + p, k);
        });
      }
    });
  });
  return {pooled, argmax};
}

// out = x * channel[c] * spatial[p] (+ identity), the products rounded in that order so that a
// gate fused into the residual add gives the bits of the block followed by the add. out may be
// x (or the BN's input) itself.
void cbam_apply(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                const std::optional<at::Tensor>& shift, const at::Tensor& channel,
                const at::Tensor& spatial, const std::optional<at::Tensor>& identity,
                at::Tensor& out) {
  check_nchw("cbam_apply", {x, out});
  if (identity.has_value()) check_nchw("cbam_apply", {*identity});
  const int64_t channels = x.size(1), hw = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_apply", [&] {
    using T = scalar_t;
    const Input<T> in("cbam_apply", x, scale, shift);
    const T* gate = channel.const_data_ptr<T>();
    const T* spatial_all = spatial.const_data_ptr<T>();
    const T* ids = identity.has_value() ? identity->const_data_ptr<T>() : nullptr;
    T* outs = out.data_ptr<T>();
    at::parallel_for(0, x.size(0) * channels, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % channels;
        const Vec<T> g(gate[row]);
        const T* sp = spatial_all + (row / channels) * hw;
        T* o = outs + row * hw;
        const T* id = ids != nullptr ? ids + row * hw : nullptr;
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          auto v = in.load(row * hw + p, c, n) * g * load_n(sp + p, n);
          if (id != nullptr) v = v + load_n(id + p, n);
          store_n(v, o + p, n);
        });
      }
    });
  });
}

// Gradients of out = x * channel * spatial reaching the two gates: (N, C) sums over the
// positions of grad * x * spatial, and (N, 1, H, W) sums over the channels of grad * x * channel.
std::tuple<at::Tensor, at::Tensor> cbam_gate_grads(const at::Tensor& grad, const at::Tensor& x,
                                                   const std::optional<at::Tensor>& scale,
                                                   const std::optional<at::Tensor>& shift,
                                                   const at::Tensor& channel,
                                                   const at::Tensor& spatial) {
  check_nchw("cbam_gate_grads", {grad, x});
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t blocks = (hw + kPositions - 1) / kPositions;
  // One (N, C) partial sum per block of positions, added up at the end.
  auto partial = at::empty({batch, blocks, channels}, x.options());
  auto grad_spatial = at::empty({batch, 1, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_gate_grads", [&] {
    using T = scalar_t;
    const T* gs = grad.const_data_ptr<T>();
    const Input<T> in("cbam_gate_grads", x, scale, shift);
    const T* gate_all = channel.const_data_ptr<T>();
    const T* spatial_all = spatial.const_data_ptr<T>();
    T* part = partial.data_ptr<T>();
    T* dsp_all = grad_spatial.data_ptr<T>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, start = (task % blocks) * kPositions;
        const int64_t size = std::min(kPositions, hw - start);
        const int64_t offset = n * channels * hw + start;
        const T* sp = spatial_all + n * hw + start;
        T* dsp = dsp_all + n * hw + start;
        std::fill(dsp, dsp + size, T(0));
        for (int64_t c = 0; c < channels; ++c) {
          const T* gc = gs + offset + c * hw;
          const Vec<T> g(gate_all[n * channels + c]);
          Vec<T> to_channel(T(0));
          for_each_vec<T>(size, [&](int64_t p, int64_t k) {
            const auto t = load_n(gc + p, k) * in.load(offset + c * hw + p, c, k);
            to_channel = to_channel + first_lanes(t * load_n(sp + p, k), k);
            store_n(at::vec::fmadd(t, g, load_n(dsp + p, k)), dsp + p, k);
          });
          part[task * channels + c] = lanes_sum(to_channel, Vec<T>::size());
        }
      }
    });
  });
  return {partial.sum(1), grad_spatial};
}

// What the spatial pools of x * channel send back to the channel gate, (N, C): the sum over the
// positions of x times the mean's gradient / C, plus x at each position's max channel times the
// max's gradient. grad_pooled is (N, 2, H, W) as the pools are: max first.
at::Tensor cbam_pool_channel_grad(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& shift,
                                  const at::Tensor& grad_pooled, const at::Tensor& argmax) {
  check_nchw("cbam_pool_channel_grad", {x, grad_pooled});
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t blocks = (hw + kPositions - 1) / kPositions;
  auto partial = at::empty({batch, blocks, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_pool_channel_grad", [&] {
    using T = scalar_t;
    const Input<T> in("cbam_pool_channel_grad", x, scale, shift);
    const T* gp_all = grad_pooled.const_data_ptr<T>();
    const T* where_all = argmax.const_data_ptr<T>();
    T* part = partial.data_ptr<T>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> per_mean(kPositions);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, start = (task % blocks) * kPositions;
        const int64_t size = std::min(kPositions, hw - start);
        const int64_t offset = n * channels * hw + start;
        const T* grad_max = gp_all + n * 2 * hw + start;
        const T* grad_mean = grad_max + hw;
        const T* where = where_all + n * hw + start;
        const Vec<T> channels_v(static_cast<T>(channels));
        for_each_vec<T>(size, [&](int64_t p, int64_t k) {
          store_n(load_n(grad_mean + p, k) / channels_v, per_mean.data() + p, k);
        });
        T* out = part + task * channels;
        for (int64_t c = 0; c < channels; ++c) {
          out[c] = accumulate<T>(size, [&](int64_t p, int64_t k) {
            return in.load(offset + c * hw + p, c, k) * load_n(per_mean.data() + p, k);
          });
        }
        for (int64_t p = 0; p < size; ++p) {
          const auto c = static_cast<int64_t>(where[p]);
          out[c] += grad_max[p] * lanes_sum(in.load(offset + c * hw + p, c, 1), 1);
        }
      }
    });
  });
  return partial.sum(1);
}

// x's gradient: channel * (grad * spatial + the spatial pools' gradient) + the channel pools'
// gradient (grad_mean / (H * W) everywhere, grad_max at each channel's max position). With a
// frozen BN folded in (x = src * scale + shift), src's gradient (x's times scale) and the
// per-channel sums of x's gradient times src and of x's gradient, (C, ) each, for scale and shift.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_input_grad(
    const at::Tensor& grad, const std::optional<at::Tensor>& src,
    const std::optional<at::Tensor>& scale, const at::Tensor& channel,
    const at::Tensor& spatial, const at::Tensor& grad_pooled, const at::Tensor& pool_argmax,
    const at::Tensor& grad_mean, const at::Tensor& grad_max, const at::Tensor& max_argmax) {
  check_nchw("cbam_input_grad", {grad, grad_pooled});
  TORCH_CHECK(src.has_value() == scale.has_value(),
              "cbam_input_grad: a folded BN takes both src and scale, or neither");
  if (src.has_value()) {
    check_nchw("cbam_input_grad", {grad, *src});
    TORCH_CHECK(src->sizes() == grad.sizes(), "cbam_input_grad: src is grad's size ",
                grad.sizes(), ", got ", src->sizes());
    check_folded_bn_factor("cbam_input_grad", grad, *scale);  // shift is not in x's gradient
  }
  const int64_t batch = grad.size(0), channels = grad.size(1), hw = grad.size(2) * grad.size(3);
  const bool folded = scale.has_value();
  auto grad_x = at::empty_like(grad);
  auto by_src = at::zeros(folded ? at::IntArrayRef{batch, channels} : at::IntArrayRef{0},
                          grad.options());
  auto by_one = at::zeros_like(by_src);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "cbam_input_grad", [&] {
    using T = scalar_t;
    const T* gs = grad.const_data_ptr<T>();
    const T* src_all = folded ? src->const_data_ptr<T>() : nullptr;
    const T* scale_all = folded ? scale->const_data_ptr<T>() : nullptr;
    const T* gate = channel.const_data_ptr<T>();
    const T* spatial_all = spatial.const_data_ptr<T>();
    const T* gp_all = grad_pooled.const_data_ptr<T>();
    const T* where_all = pool_argmax.const_data_ptr<T>();
    const T* gmean = grad_mean.const_data_ptr<T>();
    const T* gmax = grad_max.const_data_ptr<T>();
    const int64_t* max_index = max_argmax.const_data_ptr<int64_t>();
    T* gx = grad_x.data_ptr<T>();
    T* by_src_all = folded ? by_src.data_ptr<T>() : nullptr;
    T* by_one_all = folded ? by_one.data_ptr<T>() : nullptr;
    const T positions = static_cast<T>(hw);
    const Vec<T> inv_c(T(1) / static_cast<T>(channels));
    at::parallel_for(0, batch * channels, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / channels, c = row % channels;
        const Vec<T> g(gate[row]), spread(gmean[row] / positions), c_v(static_cast<T>(c));
        const Vec<T> to_src(folded ? scale_all[c] : T(1));
        const T* sp = spatial_all + n * hw;
        const T* pool_max = gp_all + n * 2 * hw;
        const T* pool_mean = pool_max + hw;
        const T* where = where_all + n * hw;
        const T* gr = gs + row * hw;
        const T* sr = folded ? src_all + row * hw : nullptr;
        T* out = gx + row * hw;
        Vec<T> sum_src(T(0)), sum_one(T(0));
        for_each_vec<T>(hw, [&](int64_t p, int64_t k) {
          // The gradient reaching x * channel: the output's, the mean pool's, and the max
          // pool's where this channel is the position's max.
          const auto at_max = load_n(where + p, k) == c_v;
          const auto from_max = Vec<T>::blendv(Vec<T>(T(0)), load_n(pool_max + p, k),
                                               at_max);
          const auto inner = at::vec::fmadd(load_n(gr + p, k), load_n(sp + p, k),
                                            at::vec::fmadd(load_n(pool_mean + p, k),
                                                           inv_c, from_max));
          const auto dx = at::vec::fmadd(inner, g, spread);
          if (folded) {
            sum_src = sum_src + first_lanes(dx * load_n(sr + p, k), k);
            sum_one = sum_one + first_lanes(dx, k);
          }
          store_n(dx * to_src, out + p, k);
        });
        // The channel max pool's gradient, at the channel's max position.
        const int64_t at = max_index[row];
        out[at] += gmax[row] * (folded ? scale_all[c] : T(1));
        if (folded) {
          by_src_all[row] = lanes_sum(sum_src, Vec<T>::size()) + gmax[row] * sr[at];
          by_one_all[row] = lanes_sum(sum_one, Vec<T>::size()) + gmax[row];
        }
      }
    });
  });
  return {grad_x, folded ? by_src.sum(0) : by_src, folded ? by_one.sum(0) : by_one};
}

// ---------------------------------------------------------------------------------------------
// Without autograd: both gates computed here, between the passes (see gates.h for why).

// out (N, H, W) = the k x k convolution of the (N, 2, H, W) pools to one map, zero padding k / 2,
// stride 1, no bias: CBAM's spatial conv.
template <typename T>
void spatial_conv(const T* pooled, int64_t batch, int64_t height, int64_t width,
                  const T* weight, int64_t k, T* out) {
  const int64_t pad = k / 2;
  at::parallel_for(0, batch * height, 4, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / height, y = task % height;
      T* row = out + task * width;
      std::fill(row, row + width, T(0));
      for (int64_t c = 0; c < 2; ++c) {
        for (int64_t ky = 0; ky < k; ++ky) {
          const int64_t iy = y + ky - pad;
          if (iy < 0 || iy >= height) continue;
          const T* in = pooled + ((n * 2 + c) * height + iy) * width;
          for (int64_t kx = 0; kx < k; ++kx) {
            // out[x] += w * in[x + dx] for the x whose input is inside the map.
            const int64_t dx = kx - pad;
            const int64_t first = std::max<int64_t>(0, -dx), last = std::min(width, width - dx);
            if (first < last) {
              axpy(weight[(c * k + ky) * k + kx], in + first + dx, row + first, last - first);
            }
          }
        }
      }
    }
  });
}

// CBAM's spatial BN in eval mode as a * v + b, as torch computes it:
// (v - mean) / sqrt(var + eps) * weight + bias.
template <typename T>
struct EvalNorm {
  T mean, inv_std, weight, a, b;

  EvalNorm(const at::Tensor& mean_t, const at::Tensor& var_t,
           const std::optional<at::Tensor>& weight_t, const std::optional<at::Tensor>& bias_t,
           double eps)
      : mean(mean_t.const_data_ptr<T>()[0]),
        inv_std(T(1) / std::sqrt(var_t.const_data_ptr<T>()[0] + static_cast<T>(eps))),
        weight(weight_t.has_value() ? weight_t->const_data_ptr<T>()[0] : T(1)),
        a(inv_std * weight),
        b((bias_t.has_value() ? bias_t->const_data_ptr<T>()[0] : T(0)) - mean * a) {}
};

void check_spatial(const char* op, const at::Tensor& pooled, const at::Tensor& weight) {
  check_nchw(op, {pooled, weight});
  TORCH_CHECK(pooled.size(1) == 2 && weight.size(0) == 1 && weight.size(1) == 2 &&
                  weight.size(2) == weight.size(3) && weight.size(3) % 2 == 1,
              op, ": expects (N, 2, H, W) pools and a (1, 2, k, k) weight with odd k, got ",
              pooled.sizes(), " and ", weight.sizes());
}

// CBAM's channel gate, sigmoid(mlp(mean) + mlp(max)) (N, C), with the ReLU MLP of nn.Linear
// weights w1 (hidden, C) and w2 (C, hidden); both descriptors through it as one batch of 2N, as
// cbam.py does.
at::Tensor cbam_channel_gate(const at::Tensor& mean, const at::Tensor& peak,
                             const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                             const at::Tensor& b2) {
  const int64_t batch = mean.size(0), channels = mean.size(1), hidden = w1.size(0);
  TORCH_CHECK(w1.is_contiguous() && w2.is_contiguous() && w1.size(1) == channels &&
                  w2.size(0) == channels && w2.size(1) == hidden,
              "cbam_channel_gate: weights ", w1.sizes(), " and ", w2.sizes(), " do not fit ",
              channels, " channels");
  auto gate = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cbam_channel_gate", [&] {
    using T = scalar_t;
    const auto both = at::cat({mean, peak});
    const auto mlp = relu_mlp(both.const_data_ptr<T>(), 2 * batch, channels,
                              w1.const_data_ptr<T>(), b1.const_data_ptr<T>(), hidden,
                              w2.const_data_ptr<T>(), b2.const_data_ptr<T>());
    T* g = gate.data_ptr<T>();
    for (int64_t i = 0; i < batch * channels; ++i) {
      g[i] = scalar_sigmoid(mlp[i] + mlp[batch * channels + i]);
    }
  });
  return gate;
}

// Gradients of cbam_channel_gate: [mean's, max's (N, C) each, w1's, b1's, w2's, b2's].
std::vector<at::Tensor> cbam_channel_gate_backward(const at::Tensor& grad,
                                                   const at::Tensor& mean,
                                                   const at::Tensor& peak, const at::Tensor& w1,
                                                   const at::Tensor& b1, const at::Tensor& w2,
                                                   const at::Tensor& b2) {
  const int64_t batch = mean.size(0), channels = mean.size(1), hidden = w1.size(0);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == mean.sizes(),
              "cbam_channel_gate_backward: expects a contiguous gradient of shape ",
              mean.sizes());
  const auto both = at::cat({mean, peak});
  auto d_both = at::empty_like(both);
  auto d_w1 = at::empty_like(w1), d_b1 = at::empty_like(b1);
  auto d_w2 = at::empty_like(w2), d_b2 = at::empty_like(b2);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "cbam_channel_gate_backward", [&] {
    using T = scalar_t;
    const int64_t size = batch * channels;
    const T* in = both.const_data_ptr<T>();
    auto mlp = relu_mlp(in, 2 * batch, channels, w1.const_data_ptr<T>(), b1.const_data_ptr<T>(),
                        hidden, w2.const_data_ptr<T>(), b2.const_data_ptr<T>());
    // The sigmoid's gradient reaches both MLP outputs alike.
    std::vector<T> d_mlp(2 * size);
    const T* gr = grad.const_data_ptr<T>();
    for (int64_t i = 0; i < size; ++i) {
      const T g = scalar_sigmoid(mlp[i] + mlp[size + i]);
      d_mlp[i] = d_mlp[size + i] = gr[i] * g * (T(1) - g);
    }
    relu_mlp_backward(in, d_mlp.data(), 2 * batch, channels, w1.const_data_ptr<T>(),
                      b1.const_data_ptr<T>(), hidden, w2.const_data_ptr<T>(),
                      d_both.data_ptr<T>(), d_w1.data_ptr<T>(), d_b1.data_ptr<T>(),
                      d_w2.data_ptr<T>(), d_b2.data_ptr<T>());
  });
  auto halves = d_both.chunk(2);
  return {halves[0], halves[1], d_w1, d_b1, d_w2, d_b2};
}

// CBAM's spatial gate sigmoid(bn(conv(pooled))) (N, 1, H, W) with the BN in eval mode.
at::Tensor cbam_spatial_gate(const at::Tensor& pooled, const at::Tensor& weight,
                             const at::Tensor& bn_mean, const at::Tensor& bn_var,
                             const std::optional<at::Tensor>& bn_weight,
                             const std::optional<at::Tensor>& bn_bias, double eps) {
  check_spatial("cbam_spatial_gate", pooled, weight);
  const int64_t batch = pooled.size(0), height = pooled.size(2), width = pooled.size(3);
  auto gate = at::empty({batch, 1, height, width}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "cbam_spatial_gate", [&] {
    using T = scalar_t;
    const EvalNorm<T> norm(bn_mean, bn_var, bn_weight, bn_bias, eps);
    T* g = gate.data_ptr<T>();
    spatial_conv(pooled.const_data_ptr<T>(), batch, height, width, weight.const_data_ptr<T>(),
                 weight.size(3), g);
    const Vec<T> av(norm.a), bv(norm.b);
    for_each_vec<T>(gate.numel(), [&](int64_t p, int64_t n) {
      store_n(sigmoid(at::vec::fmadd(load_n(g + p, n), av, bv)), g + p, n);
    });
  });
  return gate;
}

// Gradients of cbam_spatial_gate: [the pools' (N, 2, H, W), the conv weight's, the BN weight's
// and bias's (1, ) each].
std::vector<at::Tensor> cbam_spatial_gate_backward(
    const at::Tensor& grad, const at::Tensor& pooled, const at::Tensor& weight,
    const at::Tensor& bn_mean, const at::Tensor& bn_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps) {
  check_spatial("cbam_spatial_gate_backward", pooled, weight);
  check_nchw("cbam_spatial_gate_backward", {grad});
  const int64_t batch = pooled.size(0), height = pooled.size(2), width = pooled.size(3);
  const int64_t k = weight.size(3), pad = k / 2, positions = height * width;
  auto d_pooled = at::zeros_like(pooled);
  auto d_weight = at::empty_like(weight);
  auto d_bn_weight = at::zeros({1}, pooled.options()), d_bn_bias = at::zeros({1}, pooled.options());
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "cbam_spatial_gate_backward", [&] {
    using T = scalar_t;
    const EvalNorm<T> norm(bn_mean, bn_var, bn_weight, bn_bias, eps);
    const T* in = pooled.const_data_ptr<T>();
    const T* w = weight.const_data_ptr<T>();
    // The conv's output again; then d conv = grad * s (1 - s) * a, s the gate.
    std::vector<T> d_conv(batch * positions);
    spatial_conv(in, batch, height, width, w, k, d_conv.data());
    const T* gr = grad.const_data_ptr<T>();
    T sum_d_pre(0), sum_d_pre_normed(0);
    for (int64_t i = 0; i < batch * positions; ++i) {
      const T conv = d_conv[i];
      const T s = scalar_sigmoid(norm.a * conv + norm.b);
      const T d_pre = gr[i] * s * (T(1) - s);  // the gradient reaching the BN's output
      sum_d_pre += d_pre;
      sum_d_pre_normed += d_pre * (conv - norm.mean) * norm.inv_std;
      d_conv[i] = d_pre * norm.a;
    }
    d_bn_weight.data_ptr<T>()[0] = sum_d_pre_normed;
    d_bn_bias.data_ptr<T>()[0] = sum_d_pre;
    // d weight[c, ky, kx] = sum over n, y, x of d_conv[n, y, x] * in[n, c, y + ky - pad, x + dx]
    T* dw = d_weight.data_ptr<T>();
    at::parallel_for(0, 2 * k * k, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tap = begin; tap < end; ++tap) {
        const int64_t c = tap / (k * k), ky = tap / k % k, dx = tap % k - pad;
        const int64_t first = std::max<int64_t>(0, -dx), last = std::min(width, width - dx);
        T total(0);
        for (int64_t n = 0; n < batch && first < last; ++n) {
          for (int64_t y = 0; y < height; ++y) {
            const int64_t iy = y + ky - pad;
            if (iy < 0 || iy >= height) continue;
            total += dot_product(d_conv.data() + (n * height + y) * width + first,
                                 in + ((n * 2 + c) * height + iy) * width + first + dx,
                                 last - first);
          }
        }
        dw[tap] = total;
      }
    });
    // d pooled[n, c, iy, x + dx] += weight[c, ky, kx] * d_conv[n, y, x] (the conv's adjoint).
    T* dp = d_pooled.data_ptr<T>();
    at::parallel_for(0, batch * 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / 2, c = task % 2;
        for (int64_t y = 0; y < height; ++y) {
          const T* d_row = d_conv.data() + (n * height + y) * width;
          for (int64_t ky = 0; ky < k; ++ky) {
            const int64_t iy = y + ky - pad;
            if (iy < 0 || iy >= height) continue;
            T* out = dp + ((n * 2 + c) * height + iy) * width;
            for (int64_t kx = 0; kx < k; ++kx) {
              const int64_t dx = kx - pad;
              const int64_t first = std::max<int64_t>(0, -dx), last = std::min(width, width - dx);
              if (first < last) {
                axpy(w[(c * k + ky) * k + kx], d_row + first, out + first + dx, last - first);
              }
            }
          }
        }
      }
    });
  });
  return {d_pooled, d_weight, d_bn_weight, d_bn_bias};
}

// The block without autograd, in one call: out = x * channel * spatial (+ identity), x given as
// the frozen BN's input with scale and shift; the gates as cbam_channel_gate and
// cbam_spatial_gate compute them.
void cbam_inference(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& shift,
                    const std::optional<at::Tensor>& identity, at::Tensor& out,
                    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2, const at::Tensor& conv_weight,
                    const at::Tensor& bn_mean, const at::Tensor& bn_var,
                    const std::optional<at::Tensor>& bn_weight,
                    const std::optional<at::Tensor>& bn_bias, double eps) {
  check_nchw("cbam_inference", {x, out});
  auto [means, maxima, unused] = channel_pools(x, scale, shift, false);
  const auto channel = cbam_channel_gate(means, maxima, w1, b1, w2, b2);
  const auto pooled = std::get<0>(cbam_spatial_pools(x, scale, shift, channel));
  const auto spatial =
      cbam_spatial_gate(pooled, conv_weight, bn_mean, bn_var, bn_weight, bn_bias, eps);
  cbam_apply(x, scale, shift, channel, spatial, identity, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  // scale, shift: a frozen BN folded in; x is then the BN's input (see Input).
  m.def("cbam_spatial_pools(Tensor x, Tensor? scale, Tensor? shift, Tensor channel) "
        "-> (Tensor, Tensor)",
        &cbam_spatial_pools);
  m.def("cbam_apply(Tensor x, Tensor? scale, Tensor? shift, Tensor channel, Tensor spatial, "
        "Tensor? identity, Tensor(a!) out) -> ()",
        &cbam_apply);
  m.def("cbam_gate_grads(Tensor grad, Tensor x, Tensor? scale, Tensor? shift, Tensor channel, "
        "Tensor spatial) -> (Tensor, Tensor)",
        &cbam_gate_grads);
  m.def("cbam_pool_channel_grad(Tensor x, Tensor? scale, Tensor? shift, Tensor grad_pooled, "
        "Tensor argmax) -> Tensor",
        &cbam_pool_channel_grad);
  m.def("cbam_input_grad(Tensor grad, Tensor? src, Tensor? scale, Tensor channel, "
        "Tensor spatial, Tensor grad_pooled, Tensor pool_argmax, Tensor grad_mean, "
        "Tensor grad_max, Tensor max_argmax) -> (Tensor, Tensor, Tensor)",
        &cbam_input_grad);
  m.def("cbam_channel_gate(Tensor mean, Tensor peak, Tensor w1, Tensor b1, Tensor w2, "
        "Tensor b2) -> Tensor",
        &cbam_channel_gate);
  m.def("cbam_channel_gate_backward(Tensor grad, Tensor mean, Tensor peak, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2) -> Tensor[]",
        &cbam_channel_gate_backward);
  m.def("cbam_spatial_gate(Tensor pooled, Tensor weight, Tensor bn_mean, Tensor bn_var, "
        "Tensor? bn_weight, Tensor? bn_bias, float eps) -> Tensor",
        &cbam_spatial_gate);
  m.def("cbam_spatial_gate_backward(Tensor grad, Tensor pooled, Tensor weight, "
        "Tensor bn_mean, Tensor bn_var, Tensor? bn_weight, Tensor? bn_bias, float eps) "
        "-> Tensor[]",
        &cbam_spatial_gate_backward);
  m.def("cbam_inference(Tensor x, Tensor? scale, Tensor? shift, Tensor? identity, "
        "Tensor(a!) out, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor conv_weight, "
        "Tensor bn_mean, Tensor bn_var, Tensor? bn_weight, Tensor? bn_bias, float eps) -> ()",
        &cbam_inference);
}

}  // namespace mmattn
