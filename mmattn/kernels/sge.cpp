// Spatial Group-wise Enhance on the CPU, one (sample, group) slab at a time.
//
// A slab is the C / G channels x H * W positions of one group of one sample, contiguous in an
// NCHW tensor and small enough to stay in the core's cache (50 KB at ResNet-50's stage 1 in
// float32). Every pass SGE needs over a slab (its mean vector, the positions' scores, the gate
// and the product; in backward the gradients) then reads main memory once, where PyTorch's
// eager ops read the whole feature map once per op. The math is mmattn/blocks/sge.py's.
#include "vec_loops.h"

namespace mmattn {
namespace {

// The gate of one slab: writes the centre (mean over the positions, cg values) and the gate
// (hw values), and returns the scores' mean and unbiased standard deviation.
template <typename T>
std::pair<T, T> slab_gate(const T* x, int64_t cg, int64_t hw, T weight, T bias, double eps,
                          T* centre, T* gate) {
  for (int64_t c = 0; c < cg; ++c) {
    centre[c] = sum(x + c * hw, hw) / static_cast<T>(hw);
  }
  // gate holds the scores (each position's dot product with the centre), then the gate.
  std::fill(gate, gate + hw, T(0));
  for (int64_t c = 0; c < cg; ++c) {
    axpy(centre[c], x + c * hw, gate, hw);
  }
  const T mean = sum(gate, hw) / static_cast<T>(hw);
  Vec<T> squares_v(T(0));
  for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
    const auto centred = Vec<T>::loadu(gate + p, n) - Vec<T>(mean);
    centred.store(gate + p, n);
    squares_v = squares_v + first_lanes(centred * centred, n);
  });
  const T squares = lanes_sum(squares_v, Vec<T>::size());
  // A lone position has no spread: its normalised score is 0, as in the eager path.
  const T std = std::sqrt(squares / static_cast<T>(std::max<int64_t>(hw - 1, 1)));
  const Vec<T> scale(weight / (std + static_cast<T>(eps)));
  const Vec<T> shift(bias);
  for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
    sigmoid(Vec<T>::loadu(gate + p, n) * scale + shift).store(gate + p, n);
  });
  return {mean, std};
}

// out = x * gate (+ identity) per slab; out may be x itself. Returns the per-slab centres
// (N, G, C / G) and the scores' means and standard deviations (N, G) that backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sge_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& identity, at::Tensor& out, int64_t groups, double eps) {
  check_nchw("sge_forward", {x, out});
  if (identity.has_value()) check_nchw("sge_forward", {*identity});
  const int64_t batch = x.size(0), cg = x.size(1) / groups, hw = x.size(2) * x.size(3);
  auto centres = at::empty({batch, groups, cg}, x.options());
  auto means = at::empty({batch, groups}, x.options());
  auto stds = at::empty({batch, groups}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sge_forward", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    const T* ids = identity.has_value() ? identity->const_data_ptr<T>() : nullptr;
    T* outs = out.data_ptr<T>();
    const T* w = weight.const_data_ptr<T>();
    const T* b = bias.const_data_ptr<T>();
    T* centre = centres.data_ptr<T>();
    T* mean = means.data_ptr<T>();
    T* std = stds.data_ptr<T>();
    at::parallel_for(0, batch * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> gate(hw);
      for (int64_t slab = begin; slab < end; ++slab) {
        const int64_t g = slab % groups, offset = slab * cg * hw;
        std::tie(mean[slab], std[slab]) =
            slab_gate(xs + offset, cg, hw, w[g], b[g], eps, centre + slab * cg, gate.data());
        for (int64_t c = 0; c < cg; ++c) {
          const int64_t row = offset + c * hw;
          if (ids != nullptr) {
            multiply_add(xs + row, gate.data(), ids + row, outs + row, hw);
          } else {
            multiply(xs + row, gate.data(), outs + row, hw);
          }
        }
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

        std::fill(score.begin(), score.end(), T(0));
        std::fill(dot.begin(), dot.end(), T(0));
        for (int64_t c = 0; c < cg; ++c) {
          const Vec<T> centre_c(centre[c]);
          const T* xc = xg + c * hw;
          const T* dc = dg + c * hw;
          for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
            const auto xv = Vec<T>::loadu(xc + p, n);
            at::vec::fmadd(centre_c, xv, Vec<T>::loadu(score.data() + p, n))
                .store(score.data() + p, n);
            at::vec::fmadd(Vec<T>::loadu(dc + p, n), xv, Vec<T>::loadu(dot.data() + p, n))
                .store(dot.data() + p, n);
          });
        }
        // out = x * gate: the gate's gradient is dot; through the sigmoid it is dot * g(1-g).
        // normed = centred / denom feeds weight's gradient, bias's takes the logit's gradient,
        // and the denominator's gradient needs sum(logit gradient * weight * centred).
        Vec<T> grad_w(T(0)), grad_b(T(0)), grad_denom_v(T(0));
        const Vec<T> one(T(1)), wv(w), bv(b), denom_v(denom), mean_v(mean);
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          const auto centred = Vec<T>::loadu(score.data() + p, n) - mean_v;
          const auto normed = centred / denom_v;
          const auto g = sigmoid(normed * wv + bv);
          const auto grad_logit =
              first_lanes(Vec<T>::loadu(dot.data() + p, n) * g * (one - g), n);
          grad_w = grad_w + grad_logit * normed;
          grad_b = grad_b + grad_logit;
          const auto grad_normed = grad_logit * wv;
          grad_denom_v = grad_denom_v + grad_normed * centred;
          centred.store(score.data() + p, n);
          g.store(gate.data() + p, n);
          grad_normed.store(dot.data() + p, n);
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
          const auto grad_score = Vec<T>::loadu(dot.data() + p, n) / denom_v +
                                  to_score * Vec<T>::loadu(score.data() + p, n);
          grad_score.store(dot.data() + p, n);
          grad_score_sum = grad_score_sum + first_lanes(grad_score, n);
        });
        // The scores were centred: their gradient loses its mean.
        const Vec<T> grad_score_mean(lanes_sum(grad_score_sum, Vec<T>::size()) / positions);
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          (Vec<T>::loadu(dot.data() + p, n) - grad_score_mean).store(dot.data() + p, n);
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
            const auto from_score = at::vec::fmadd(centre_c, Vec<T>::loadu(dot.data() + p, n),
                                                   spread);
            at::vec::fmadd(Vec<T>::loadu(dc + p, n), Vec<T>::loadu(gate.data() + p, n),
                           from_score)
                .store(out + p, n);
          });
        }
      }
    });
  });
  return {grad_x, grad_weight.sum(0), grad_bias.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  m.def("sge_forward(Tensor x, Tensor weight, Tensor bias, Tensor? identity, Tensor(a!) out, "
        "int groups, float eps) -> (Tensor, Tensor, Tensor)",
        &sge_forward);
  m.def("sge_backward(Tensor x, Tensor grad, Tensor centres, Tensor means, Tensor stds, "
        "Tensor weight, Tensor bias, int groups, float eps, bool need_grad_x) "
        "-> (Tensor, Tensor, Tensor)",
        &sge_backward);
}

}  // namespace mmattn
