// Reading a block's input x, and x's spatial mean and max per channel in one pass: the input of
// the channel gates that pool both (CBAM's, CGD's cascade).
#pragma once

#include "vec_loops.h"

namespace mmattn {

// One factor (scale or shift) of a frozen BN folded into op's read of x (N, C, H, W): a
// contiguous (C, ) CPU tensor of x's dtype.
inline void check_folded_bn_factor(const char* op, const at::Tensor& x, const at::Tensor& f) {
  TORCH_CHECK(f.dim() == 1 && f.numel() == x.size(1) && f.is_contiguous() &&
                  f.scalar_type() == x.scalar_type() && f.device().is_cpu(),
              op, ": a folded BN's scale and shift are contiguous (C, ) = (", x.size(1),
              ", ) CPU ", x.scalar_type(), " tensors, got ", f.sizes(), " ", f.scalar_type(),
              " on ", f.device());
}

// A frozen BN folded into op's read of x: both its scale and shift, or neither.
inline void check_folded_bn(const char* op, const at::Tensor& x,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(scale.has_value() == shift.has_value(), op,
              ": a folded BN takes both scale and shift, or neither");
  if (!scale.has_value()) return;
  check_folded_bn_factor(op, x, *scale);
  check_folded_bn_factor(op, x, *shift);
}

// The block's input x, read from x itself or, with a frozen BN folded in, computed from the
// BN's input as src * scale[c] + shift[c] (scale and shift are (C, )).
template <typename T>
struct Input {
  const T* data;
  const T* scale;  // nullptr: data is x
  const T* shift;

  Input(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& scale_t,
        const std::optional<at::Tensor>& shift_t) {
    check_folded_bn(op, x, scale_t, shift_t);  // before the factors' pointers are taken
    data = x.const_data_ptr<T>();
    scale = scale_t.has_value() ? scale_t->const_data_ptr<T>() : nullptr;
    shift = shift_t.has_value() ? shift_t->const_data_ptr<T>() : nullptr;
  }

  // x at data[offset + p .. + n) of channel c.
  Vec<T> load(int64_t offset, int64_t c, int64_t n) const {
    const auto v = load_n(data + offset, n);
    return scale == nullptr ? v : at::vec::fmadd(v, Vec<T>(scale[c]), Vec<T>(shift[c]));
  }
};

// (N, C) spatial mean and max of x, and with_argmax the first position of each max (N, C).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_pools(
    const at::Tensor& x, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, bool with_argmax) {
  check_nchw("channel_pools", {x});
  const int64_t channels = x.size(1), rows = x.size(0) * channels, hw = x.size(2) * x.size(3);
  auto means = at::empty({x.size(0), channels}, x.options());
  auto maxima = at::empty_like(means);
  auto argmax = at::empty(with_argmax ? means.sizes() : at::IntArrayRef{0},
                          x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_pools", [&] {
    using T = scalar_t;
    const Input<T> in("channel_pools", x, scale, shift);
    T* mean = means.data_ptr<T>();
    T* peak = maxima.data_ptr<T>();
    int64_t* index = with_argmax ? argmax.data_ptr<int64_t>() : nullptr;
    constexpr int64_t width = Vec<T>::size();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t c = row % channels;
        // Per lane: the sum, the max and the first position of the max (as a T, exact below
        // 2^24 positions). A partial last vector leaves the lanes it does not fill alone.
        Vec<T> total(T(0)), top(-std::numeric_limits<T>::infinity()), where(T(0));
        const auto lane = Vec<T>::arange(T(0), T(1));
        for (int64_t p = 0; p < hw; p += width) {
          const int64_t n = std::min(width, hw - p);
          auto v = in.load(row * hw + p, c, n);
          if (n < width) v = Vec<T>::set(top, v, n);
          total = total + first_lanes(v, n);
          if (index != nullptr) {
            const auto higher = v > top;  // strict: ties keep the first position
            where = Vec<T>::blendv(where, lane + Vec<T>(static_cast<T>(p)), higher);
          }
          top = at::vec::maximum(top, v);
        }
        mean[row] = lanes_sum(total, width) / static_cast<T>(hw);
        const T best = at::vec::vec_reduce_all<T>(
            [](const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }, top);
        peak[row] = best;
        if (index != nullptr) {
          __at_align__ T tops[width], wheres[width];
          top.store(tops);
          where.store(wheres);
          int64_t first_best = hw;
          for (int64_t l = 0; l < width; ++l) {
            if (tops[l] == best) first_best = std::min(first_best, static_cast<int64_t>(wheres[l]));
          }
          index[row] = first_best;
        }
      }
    });
  });
  return {means, maxima, argmax};
}

}  // namespace mmattn
