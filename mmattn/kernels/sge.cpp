// Spatial Group-wise Enhance on the CPU, one (sample, group) slab at a time.
//
// A slab is the C / G channels x H * W positions of one group of one sample, contiguous in an
// NCHW tensor and small enough to stay in the core's cache (50 KB at ResNet-50's stage 1 in
// float32). Every pass SGE needs over a slab (its mean vector, the positions' scores, the gate
// and the product; in backward the gradients) then reads main memory once, where PyTorch's
// eager ops read the whole feature map once per op. The math is mmattn/blocks/sge.py's.
//
// With a frozen BN folded in (inference), the forward kernel reads the BN's input and computes
// the BN's output for one slab into a buffer (see Input), so the BN's own pass over the map, a
// read and a write, disappears.
#include "pools.h"

namespace mmattn {
namespace {

// score[p] = sum over the channels c of centre[c] * x[c][p], and with grad, dot[p] = sum of
// grad[c][p] * x[c][p]: fused multiply-adds in the channels' order, as a row-by-row update of
// score would make them. Four vectors of positions (two with grad) are summed in registers over
// all channels before they are stored, so a channel costs the loads of x (and grad) alone.
template <typename T>
void channel_sums(const T* x, const T* grad, const T* centre, int64_t cg, int64_t hw, T* score,
                  T* dot) {
  constexpr int64_t width = Vec<T>::size();
  const int64_t block = (grad == nullptr ? 4 : 2) * width;
  int64_t p = 0;
  for (; p + block <= hw; p += block) {
    Vec<T> s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
    for (int64_t c = 0; c < cg; ++c) {
      const Vec<T> k(centre[c]);
      const T* xc = x + c * hw + p;
      const auto x0 = Vec<T>::loadu(xc), x1 = Vec<T>::loadu(xc + width);
      if (grad == nullptr) {
        s0 = at::vec::fmadd(k, x0, s0);
        s1 = at::vec::fmadd(k, x1, s1);
        s2 = at::vec::fmadd(k, Vec<T>::loadu(xc + 2 * width), s2);
        s3 = at::vec::fmadd(k, Vec<T>::loadu(xc + 3 * width), s3);
      } else {
        const T* gc = grad + c * hw + p;
        s0 = at::vec::fmadd(k, x0, s0);
        s1 = at::vec::fmadd(k, x1, s1);
        s2 = at::vec::fmadd(Vec<T>::loadu(gc), x0, s2);
        s3 = at::vec::fmadd(Vec<T>::loadu(gc + width), x1, s3);
      }
    }
    s0.store(score + p);
    s1.store(score + p + width);
    if (grad == nullptr) {
      s2.store(score + p + 2 * width);
      s3.store(score + p + 3 * width);
    } else {
      s2.store(dot + p);
      s3.store(dot + p + width);
    }
  }
  for (; p < hw; p += width) {
    const int64_t n = std::min(width, hw - p);
    Vec<T> s(T(0)), d(T(0));
    for (int64_t c = 0; c < cg; ++c) {
      const auto xv = load_n(x + c * hw + p, n);
      s = at::vec::fmadd(Vec<T>(centre[c]), xv, s);
      if (grad != nullptr) d = at::vec::fmadd(load_n(grad + c * hw + p, n), xv, d);
    }
    store_n(s, score + p, n);
    if (grad != nullptr) store_n(d, dot + p, n);
  }
}

// The gate of one slab: writes the centre (mean over the positions, cg values) and the gate
// (hw values), and returns the scores' mean and unbiased standard deviation.
template <typename T>
std::pair<T, T> slab_gate(const T* x, int64_t cg, int64_t hw, T weight, T bias, double eps,
                          T* centre, T* gate) {
  for (int64_t c = 0; c < cg; ++c) {
    centre[c] = sum(x + c * hw, hw) / static_cast<T>(hw);
  }
  // gate holds the scores (each position's dot product with the centre), then the gate.
  channel_sums<T>(x, nullptr, centre, cg, hw, gate, nullptr);
  const T mean = sum(gate, hw) / static_cast<T>(hw);
  Vec<T> squares_v(T(0));
  for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
    const auto centred = load_n(gate + p, n) - Vec<T>(mean);
    store_n(centred, gate + p, n);
    squares_v = squares_v + first_lanes(centred * centred, n);
  });
  const T squares = lanes_sum(squares_v, Vec<T>::size());
  // A lone position has no spread: its normalised score is 0, as in the eager path.
  const T std = std::sqrt(squares / static_cast<T>(std::max<int64_t>(hw - 1, 1)));
  const Vec<T> scale(weight / (std + static_cast<T>(eps)));
  const Vec<T> shift(bias);
  for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
    store_n(sigmoid(load_n(gate + p, n) * scale + shift), gate + p, n);
  });
  return {mean, std};
}

// out = x * gate + add (without add: x * gate) over a slab of rows of hw positions, taken as one
// run of size values (out may be x): gate holds hw + W values, gate[q] = gate[q % hw], so the
// gate of a vector that runs from one row into the next is gate[p, p + W) for its first position
// p. The rows then end in no partial vector, whose masked store is slow on some CPUs (AMD's);
// the slab's end still can. The product and the sum are rounded each (no fused multiply-add),
// so that a gate fused into the residual add gives the bits of the block followed by the add.
template <typename T>
void gate_slab(const T* x, const T* gate, const T* add, T* out, int64_t size, int64_t hw) {
  constexpr int64_t width = Vec<T>::size();
  int64_t p = 0;
  for (int64_t i = 0; i < size; i += width) {
    const int64_t n = std::min(width, size - i);
    auto v = load_n(x + i, n) * load_n(gate + p, n);
    if (add != nullptr) v = v + load_n(add + i, n);
    store_n(v, out + i, n);
    p += width;
    while (p >= hw) p -= hw;
  }
}

// out = x * gate (+ identity) per slab; out may be x itself. Returns the per-slab centres
// (N, G, C / G) and the scores' means and standard deviations (N, G) that backward needs.
// With scale and shift (C, ), x is a frozen BN's input and the block's input is
// x * scale + shift.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sge_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& identity, at::Tensor& out, int64_t groups, double eps,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  check_nchw("sge_forward", {x, out});
  if (identity.has_value()) check_nchw("sge_forward", {*identity});
  const int64_t batch = x.size(0), cg = x.size(1) / groups, hw = x.size(2) * x.size(3);
  auto centres = at::empty({batch, groups, cg}, x.options());
  auto means = at::empty({batch, groups}, x.options());
  auto stds = at::empty({batch, groups}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sge_forward", [&] {
    using T = scalar_t;
    const Input<T> in("sge_forward", x, scale, shift);
    const T* ids = identity.has_value() ? identity->const_data_ptr<T>() : nullptr;
    T* outs = out.data_ptr<T>();
    const T* w = weight.const_data_ptr<T>();
    const T* b = bias.const_data_ptr<T>();
    T* centre = centres.data_ptr<T>();
    T* mean = means.data_ptr<T>();
    T* std = stds.data_ptr<T>();
    at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
      // folded: the slab of the block's input, computed from the BN's input. Each row's last
      // vector is stored whole, into the next row (which overwrites it) or the padding at the
      // end: a partial store would cost as much as several whole ones (see gate_slab).
      constexpr int64_t width = Vec<T>::size();
      std::vector<T> gate(hw + width), folded(in.scale != nullptr ? cg * hw + width : 0);
      for (int64_t slab = begin; slab < end; ++slab) {
        const int64_t g = slab % groups, offset = slab * cg * hw;
        const T* xg = in.data + offset;
        if (in.scale != nullptr) {
          for (int64_t c = 0; c < cg; ++c) {
            for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
              in.load(offset + c * hw + p, g * cg + c, n).store(folded.data() + c * hw + p);
            });
          }
          xg = folded.data();
        }
        std::tie(mean[slab], std[slab]) =
            slab_gate(xg, cg, hw, w[g], b[g], eps, centre + slab * cg, gate.data());
        for (int64_t q = hw; q < hw + width; ++q) gate[q] = gate[q - hw];
        gate_slab(xg, gate.data(), ids != nullptr ? ids + offset : nullptr, outs + offset,
                  cg * hw, hw);
      }
    });
  });
  return {centres, means, stds};
}

// The gradients of out = x * gate: x's (when asked for), and the weight's and bias's (G).
// The scores and the gate are recomputed from x and the forward's centres, means and stds.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sge_backward(
    const at::Tensor& x, const at::Tensor& grad, const at::Tensor& centres,
    const at::Tensor& means, const at::Tensor& stds, const at::Tensor& weight,
    const at::Tensor& bias, int64_t groups, double eps, bool need_grad_x) {
  check_nchw("sge_backward", {x, grad});
  const int64_t batch = x.size(0), cg = x.size(1) / groups, hw = x.size(2) * x.size(3);
  auto grad_x = need_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  // Per-slab sums, added over the samples at the end.
  auto grad_weight = at::empty({batch, groups}, x.options());
  auto grad_bias = at::empty({batch, groups}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sge_backward", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    const T* gs = grad.const_data_ptr<T>();
    T* gx = need_grad_x ? grad_x.data_ptr<T>() : nullptr;
    const T* centre_all = centres.const_data_ptr<T>();
    const T* mean_all = means.const_data_ptr<T>();
    const T* std_all = stds.const_data_ptr<T>();
    const T* w_all = weight.const_data_ptr<T>();
    const T* b_all = bias.const_data_ptr<T>();
    T* gw_all = grad_weight.data_ptr<T>();
    T* gb_all = grad_bias.data_ptr<T>();
    const T positions = static_cast<T>(hw);
    at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
      // score: the centred scores; gate; dot: sum over the channels of grad * x, then the
      // scores' gradient.
      std::vector<T> score(hw), gate(hw), dot(hw), grad_centre(cg);
      for (int64_t slab = begin; slab < end; ++slab) {
        const int64_t offset = slab * cg * hw;
        const T* xg = xs + offset;
        const T* dg = gs + offset;
        const T* centre = centre_all + slab * cg;
        const T w = w_all[slab % groups], b = b_all[slab % groups];
        const T mean = mean_all[slab], std = std_all[slab], denom = std + static_cast<T>(eps);

        channel_sums(xg, dg, centre, cg, hw, score.data(), dot.data());
        // out = x * gate: the gate's gradient is dot; through the sigmoid it is dot * g(1-g).
        // normed = centred / denom feeds weight's gradient, bias's takes the logit's gradient,
        // and the denominator's gradient needs sum(logit gradient * weight * centred).
        Vec<T> grad_w(T(0)), grad_b(T(0)), grad_denom_v(T(0));
        const Vec<T> one(T(1)), wv(w), bv(b), denom_v(denom), mean_v(mean);
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          const auto centred = load_n(score.data() + p, n) - mean_v;
          const auto normed = centred / denom_v;
          const auto g = sigmoid(normed * wv + bv);
          const auto grad_logit =
              first_lanes(load_n(dot.data() + p, n) * g * (one - g), n);
          grad_w = grad_w + grad_logit * normed;
          grad_b = grad_b + grad_logit;
          const auto grad_normed = grad_logit * wv;
          grad_denom_v = grad_denom_v + grad_normed * centred;
          store_n(centred, score.data() + p, n);
          store_n(g, gate.data() + p, n);
          store_n(grad_normed, dot.data() + p, n);
        });
        gw_all[slab] = lanes_sum(grad_w, Vec<T>::size());
        gb_all[slab] = lanes_sum(grad_b, Vec<T>::size());
        const T grad_denom_sum = lanes_sum(grad_denom_v, Vec<T>::size());
        if (!need_grad_x) continue;

        // std = sqrt(sum(centred^2) / (hw - 1)); its gradient is taken as 0 where it is 0.
        const T grad_denom = -grad_denom_sum / (denom * denom);
        const T grad_var = std > 0 ? grad_denom / (2 * std) : T(0);
        const Vec<T> to_score(grad_var * 2 / static_cast<T>(std::max<int64_t>(hw - 1, 1)));
        Vec<T> grad_score_sum(T(0));
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          const auto grad_score = load_n(dot.data() + p, n) / denom_v +
                                  to_score * load_n(score.data() + p, n);
          store_n(grad_score, dot.data() + p, n);
          grad_score_sum = grad_score_sum + first_lanes(grad_score, n);
        });
        // The scores were centred: their gradient loses its mean.
        const Vec<T> grad_score_mean(lanes_sum(grad_score_sum, Vec<T>::size()) / positions);
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          store_n(load_n(dot.data() + p, n) - grad_score_mean, dot.data() + p, n);
        });
        // score = centre . x, centre = mean of x: x's gradient is grad * gate from the product,
        // centre * grad_score from the score, and the centre's gradient spread over positions.
        for (int64_t c = 0; c < cg; ++c) {
          grad_centre[c] = dot_product(xg + c * hw, dot.data(), hw) / positions;
        }
        for (int64_t c = 0; c < cg; ++c) {
          const Vec<T> centre_c(centre[c]), spread(grad_centre[c]);
          const T* dc = dg + c * hw;
          T* out = gx + offset + c * hw;
          for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
            const auto from_score = at::vec::fmadd(centre_c, load_n(dot.data() + p, n),
                                                   spread);
            store_n(at::vec::fmadd(load_n(dc + p, n), load_n(gate.data() + p, n),
                           from_score), out + p, n);
          });
        }
      }
    });
  });
  return {grad_x, grad_weight.sum(0), grad_bias.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  // scale, shift: a frozen BN folded in; x is then the BN's input (see Input).
  m.def("sge_forward(Tensor x, Tensor weight, Tensor bias, Tensor? identity, Tensor(a!) out, "
        "int groups, float eps, Tensor? scale=None, Tensor? shift=None) "
        "-> (Tensor, Tensor, Tensor)",
        &sge_forward);
  m.def("sge_backward(Tensor x, Tensor grad, Tensor centres, Tensor means, Tensor stds, "
        "Tensor weight, Tensor bias, int groups, float eps, bool need_grad_x) "
        "-> (Tensor, Tensor, Tensor)",
        &sge_backward);
}

}  // namespace mmattn
