// CBAM on the CPU: out = x * channel[c] * spatial[p] (+ identity) with the pools and gradients
// computed in as few passes over x as the math allows.
//
// Forward: one pass for x's spatial mean and max per channel (the channel gate's input), one
// for the channel-wise max and mean of x * channel per position (the spatial gate's input), one
// for the output; x * channel is never stored. The two gates themselves (an MLP and a 7x7 conv
// on small tensors) stay in PyTorch. Backward: one pass for the gates' gradients, one for what
// the spatial pools send back to the channel gate, one for x's gradient. The math is
// mmattn/blocks/cbam.py's.
#include "vec_loops.h"

namespace mmattn {
namespace {

// Positions per task when a pass walks the channels of a block of positions: the running
// buffers (a few times this many values) stay in L1.
constexpr int64_t kPositions = 1024;

// (N, C) spatial mean and max of x, and with_argmax the first position of each max.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cbam_channel_pools(const at::Tensor& x,
                                                                  bool with_argmax) {
  check_nchw("cbam_channel_pools", {x});
  const int64_t rows = x.size(0) * x.size(1), hw = x.size(2) * x.size(3);
  auto means = at::empty({x.size(0), x.size(1)}, x.options());
  auto maxima = at::empty_like(means);
  auto argmax = at::empty(with_argmax ? means.sizes() : at::IntArrayRef{0},
                          x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_channel_pools", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    T* mean = means.data_ptr<T>();
    T* peak = maxima.data_ptr<T>();
    int64_t* index = with_argmax ? argmax.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* xr = xs + row * hw;
        // Two pairs of accumulators, so that each add and max waits on the one before last.
        Vec<T> total(T(0)), total2(T(0)), top(xr[0]), top2(xr[0]);
        constexpr int64_t width = Vec<T>::size();
        int64_t p = 0;
        for (; p + 2 * width <= hw; p += 2 * width) {
          const auto v = Vec<T>::loadu(xr + p), v2 = Vec<T>::loadu(xr + p + width);
          total = total + v;
          total2 = total2 + v2;
          top = at::vec::maximum(top, v);
          top2 = at::vec::maximum(top2, v2);
        }
        for (; p < hw; p += width) {
          const int64_t n = std::min(width, hw - p);
          const auto v = Vec<T>::loadu(xr + p, n);
          total = total + first_lanes(v, n);
          top = at::vec::maximum(top, Vec<T>::set(top, v, n));
        }
        total = total + total2;
        top = at::vec::maximum(top, top2);
        mean[row] = lanes_sum(total, Vec<T>::size()) / static_cast<T>(hw);
        const T best = at::vec::vec_reduce_all<T>(
            [](const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }, top);
        peak[row] = best;
        if (index != nullptr) {
          // The row was just read: finding the first maximum reads it from cache.
          index[row] = std::find(xr, xr + hw, best) - xr;
        }
      }
    });
  });
  return {means, maxima, argmax};
}

// (N, 2, H, W): per position, the max and the mean over the channels of x * channel, and
// with_argmax the channel of each max (N, 1, H, W).
std::tuple<at::Tensor, at::Tensor> cbam_spatial_pools(const at::Tensor& x,
                                                      const at::Tensor& channel,
                                                      bool with_argmax) {
  check_nchw("cbam_spatial_pools", {x});
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t blocks = (hw + kPositions - 1) / kPositions;
  auto pooled = at::empty({batch, 2, x.size(2), x.size(3)}, x.options());
  auto argmax = at::empty(with_argmax ? at::IntArrayRef{batch, 1, x.size(2), x.size(3)}
                                      : at::IntArrayRef{0},
                          x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_spatial_pools", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    const T* gate_all = channel.const_data_ptr<T>();
    T* out = pooled.data_ptr<T>();
    int64_t* index_all = with_argmax ? argmax.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      // The channel of each running max is carried as a T (exact below 2^24 channels).
      std::vector<T> top(kPositions), total(kPositions), where(kPositions);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, start = (task % blocks) * kPositions;
        const int64_t size = std::min(kPositions, hw - start);
        const T* xn = xs + n * channels * hw + start;
        const T* gate = gate_all + n * channels;
        // Channel 0 starts the running max, its channel and the sum; then up to four channels
        // at a time update them, so the buffers are read and written once per four channels.
        for_each_vec<T>(size, [&](int64_t p, int64_t k) {
          const auto v = Vec<T>::loadu(xn + p, k) * Vec<T>(gate[0]);
          v.store(top.data() + p, k);
          v.store(total.data() + p, k);
          Vec<T>(T(0)).store(where.data() + p, k);
        });
        for (int64_t c0 = 1; c0 < channels; c0 += 4) {
          const int64_t step = std::min<int64_t>(4, channels - c0);
          for_each_vec<T>(size, [&](int64_t p, int64_t k) {
            auto best = Vec<T>::loadu(top.data() + p, k);
            auto best_c = Vec<T>::loadu(where.data() + p, k);
            auto sum = Vec<T>::loadu(total.data() + p, k);
            for (int64_t c = c0; c < c0 + step; ++c) {
              const auto v = Vec<T>::loadu(xn + c * hw + p, k) * Vec<T>(gate[c]);
              const auto higher = v > best;  // strict: ties keep the first channel
              best = Vec<T>::blendv(best, v, higher);
              best_c = Vec<T>::blendv(best_c, Vec<T>(static_cast<T>(c)), higher);
              sum = sum + v;
            }
            best.store(top.data() + p, k);
            best_c.store(where.data() + p, k);
            sum.store(total.data() + p, k);
          });
        }
        T* max_out = out + n * 2 * hw + start;
        T* mean_out = max_out + hw;
        const Vec<T> channels_v(static_cast<T>(channels));
        for_each_vec<T>(size, [&](int64_t p, int64_t k) {
          Vec<T>::loadu(top.data() + p, k).store(max_out + p, k);
          (Vec<T>::loadu(total.data() + p, k) / channels_v).store(mean_out + p, k);
        });
        if (index_all != nullptr) {
          int64_t* index = index_all + n * hw + start;
          for (int64_t p = 0; p < size; ++p) index[p] = static_cast<int64_t>(where[p]);
        }
      }
    });
  });
  return {pooled, argmax};
}

// out = x * channel[c] * spatial[p] (+ identity), the products rounded in that order so that a
// gate fused into the residual add gives the bits of the block followed by the add. out may be
// x itself.
void cbam_apply(const at::Tensor& x, const at::Tensor& channel, const at::Tensor& spatial,
                const std::optional<at::Tensor>& identity, at::Tensor& out) {
  check_nchw("cbam_apply", {x, out});
  if (identity.has_value()) check_nchw("cbam_apply", {*identity});
  const int64_t channels = x.size(1), hw = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_apply", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    const T* gate = channel.const_data_ptr<T>();
    const T* spatial_all = spatial.const_data_ptr<T>();
    const T* ids = identity.has_value() ? identity->const_data_ptr<T>() : nullptr;
    T* outs = out.data_ptr<T>();
    at::parallel_for(0, x.size(0) * channels, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const Vec<T> g(gate[row]);
        const T* sp = spatial_all + (row / channels) * hw;
        const T* xr = xs + row * hw;
        T* o = outs + row * hw;
        const T* id = ids != nullptr ? ids + row * hw : nullptr;
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          auto v = Vec<T>::loadu(xr + p, n) * g * Vec<T>::loadu(sp + p, n);
          if (id != nullptr) v = v + Vec<T>::loadu(id + p, n);
          v.store(o + p, n);
        });
      }
    });
  });
}

// Gradients of out = x * channel * spatial reaching the two gates: (N, C) sums over the
// positions of grad * x * spatial, and (N, 1, H, W) sums over the channels of grad * x * channel.
std::tuple<at::Tensor, at::Tensor> cbam_gate_grads(const at::Tensor& grad, const at::Tensor& x,
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
    const T* xs = x.const_data_ptr<T>();
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
          const T* xc = xs + offset + c * hw;
          const Vec<T> g(gate_all[n * channels + c]);
          Vec<T> to_channel(T(0));
          for_each_vec<T>(size, [&](int64_t p, int64_t k) {
            const auto t = Vec<T>::loadu(gc + p, k) * Vec<T>::loadu(xc + p, k);
            const auto s = t * Vec<T>::loadu(sp + p, k);
            to_channel = to_channel + (k == Vec<T>::size() ? s : Vec<T>::set(Vec<T>(T(0)), s, k));
            at::vec::fmadd(t, g, Vec<T>::loadu(dsp + p, k)).store(dsp + p, k);
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
at::Tensor cbam_pool_channel_grad(const at::Tensor& x, const at::Tensor& grad_pooled,
                                  const at::Tensor& argmax) {
  check_nchw("cbam_pool_channel_grad", {x, grad_pooled});
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t blocks = (hw + kPositions - 1) / kPositions;
  auto partial = at::empty({batch, blocks, channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cbam_pool_channel_grad", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    const T* gp_all = grad_pooled.const_data_ptr<T>();
    const int64_t* index_all = argmax.const_data_ptr<int64_t>();
    T* part = partial.data_ptr<T>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> per_mean(kPositions);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, start = (task % blocks) * kPositions;
        const int64_t size = std::min(kPositions, hw - start);
        const T* xn = xs + n * channels * hw + start;
        const T* grad_max = gp_all + n * 2 * hw + start;
        const T* grad_mean = grad_max + hw;
        const int64_t* index = index_all + n * hw + start;
        const Vec<T> channels_v(static_cast<T>(channels));
        for_each_vec<T>(size, [&](int64_t p, int64_t k) {
          (Vec<T>::loadu(grad_mean + p, k) / channels_v).store(per_mean.data() + p, k);
        });
        T* out = part + task * channels;
        for (int64_t c = 0; c < channels; ++c) {
          out[c] = dot_product(xn + c * hw, per_mean.data(), size);
        }
        for (int64_t p = 0; p < size; ++p) out[index[p]] += grad_max[p] * xn[index[p] * hw + p];
      }
    });
  });
  return partial.sum(1);
}

// x's gradient: channel * (grad * spatial + the spatial pools' gradient) + the channel pools'
// gradient (grad_mean / (H * W) everywhere, grad_max at each channel's max position).
at::Tensor cbam_input_grad(const at::Tensor& grad, const at::Tensor& channel,
                           const at::Tensor& spatial, const at::Tensor& grad_pooled,
                           const at::Tensor& pool_argmax, const at::Tensor& grad_mean,
                           const at::Tensor& grad_max, const at::Tensor& max_argmax) {
  check_nchw("cbam_input_grad", {grad, grad_pooled});
  const int64_t batch = grad.size(0), channels = grad.size(1), hw = grad.size(2) * grad.size(3);
  auto grad_x = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "cbam_input_grad", [&] {
    using T = scalar_t;
    const T* gs = grad.const_data_ptr<T>();
    const T* gate = channel.const_data_ptr<T>();
    const T* spatial_all = spatial.const_data_ptr<T>();
    const T* gp_all = grad_pooled.const_data_ptr<T>();
    const int64_t* pool_index = pool_argmax.const_data_ptr<int64_t>();
    const T* gmean = grad_mean.const_data_ptr<T>();
    const T* gmax = grad_max.const_data_ptr<T>();
    const int64_t* max_index = max_argmax.const_data_ptr<int64_t>();
    T* gx = grad_x.data_ptr<T>();
    const T positions = static_cast<T>(hw), inv_channels = T(1) / static_cast<T>(channels);
    at::parallel_for(0, batch * channels, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / channels;
        const Vec<T> g(gate[row]), spread(gmean[row] / positions);
        const T* sp = spatial_all + n * hw;
        const T* pool_mean = gp_all + n * 2 * hw + hw;
        const T* gr = gs + row * hw;
        T* out = gx + row * hw;
        const Vec<T> inv_c(inv_channels);
        for_each_vec<T>(hw, [&](int64_t p, int64_t k) {
          const auto inner = at::vec::fmadd(Vec<T>::loadu(gr + p, k), Vec<T>::loadu(sp + p, k),
                                            Vec<T>::loadu(pool_mean + p, k) * inv_c);
          at::vec::fmadd(inner, g, spread).store(out + p, k);
        });
        out[max_index[row]] += gmax[row];
      }
    });
    // The spatial max's gradient, at each position's max channel.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T* grad_max_pool = gp_all + n * 2 * hw;
        const int64_t* index = pool_index + n * hw;
        for (int64_t p = 0; p < hw; ++p) {
          const int64_t row = n * channels + index[p];
          gx[row * hw + p] += gate[row] * grad_max_pool[p];
        }
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  m.def("cbam_channel_pools(Tensor x, bool with_argmax) -> (Tensor, Tensor, Tensor)",
        &cbam_channel_pools);
  m.def("cbam_spatial_pools(Tensor x, Tensor channel, bool with_argmax) -> (Tensor, Tensor)",
        &cbam_spatial_pools);
  m.def("cbam_apply(Tensor x, Tensor channel, Tensor spatial, Tensor? identity, "
        "Tensor(a!) out) -> ()",
        &cbam_apply);
  m.def("cbam_gate_grads(Tensor grad, Tensor x, Tensor channel, Tensor spatial) "
        "-> (Tensor, Tensor)",
        &cbam_gate_grads);
  m.def("cbam_pool_channel_grad(Tensor x, Tensor grad_pooled, Tensor argmax) -> Tensor",
        &cbam_pool_channel_grad);
  m.def("cbam_input_grad(Tensor grad, Tensor channel, Tensor spatial, Tensor grad_pooled, "
        "Tensor pool_argmax, Tensor grad_mean, Tensor grad_max, Tensor max_argmax) -> Tensor",
        &cbam_input_grad);
}

}  // namespace mmattn
