// BAM's gating step, out = x * (1 + sigmoid(channel[n, c] * spatial[n, p])) (mmattn/blocks/
// bam.py), one pass over the feature map forward and one backward.
//
// PyTorch forms the (N, C, H, W) gate as a tensor: the broadcast product, the sigmoid and the
// gated add forward (three passes, the gate kept for backward), and backward writes the gated
// add's two gradients, the sigmoid's and the product's, then sums the last over H x W and over
// the channels (about eight passes). Here backward computes the gate again from the (N, C) and
// (N, H x W) maps, which is cheaper than writing and reading it.
#include "vec_loops.h"

namespace mmattn {
namespace {

// Positions per backward task: the spatial gradient of a chunk of one sample stays in L1 while
// the task walks the channels.
constexpr int64_t kChunk = 512;

void check_maps(const char* op, const at::Tensor& x, const at::Tensor& channel,
                const at::Tensor& spatial) {
  TORCH_CHECK(channel.is_contiguous() && spatial.is_contiguous() &&
                  channel.scalar_type() == x.scalar_type() &&
                  spatial.scalar_type() == x.scalar_type() &&
                  channel.numel() == x.size(0) * x.size(1) &&
                  spatial.numel() == x.size(0) * x.size(2) * x.size(3),
              op, ": expects contiguous (N, C) channel and (N, 1, H, W) spatial maps of x's "
              "dtype for x ", x.sizes(), ", got ", channel.sizes(), " and ", spatial.sizes());
}

// out = x + x * sigmoid(channel * spatial), the sum and product rounded as torch.addcmul(x, x,
// gate) rounds; in float32 the exponential is exp_u20 (within 20 ULP of exp), which is where
// the pass spends its time.
void bam_apply(const at::Tensor& x, const at::Tensor& channel, const at::Tensor& spatial,
               at::Tensor& out) {
  check_nchw("bam_apply", {x, out});
  check_maps("bam_apply", x, channel, spatial);
  const int64_t channels = x.size(1), rows = x.size(0) * channels;
  const int64_t hw = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bam_apply", [&] {
    using T = scalar_t;
    const T* xs = x.const_data_ptr<T>();
    const T* cs = channel.const_data_ptr<T>();
    const T* ss = spatial.const_data_ptr<T>();
    T* outs = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const Vec<T> c(cs[row]);
        const T* s = ss + (row / channels) * hw;
        const T* v = xs + row * hw;
        T* o = outs + row * hw;
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          const auto xv = load_n(v + p, n);
          store_n(xv + xv * sigmoid_u20(c * load_n(s + p, n)), o + p, n);
        });
      }
    });
  });
}

// Gradients of bam_apply: x's (N, C, H, W) through the gated add only, channel's (N, C) and
// spatial's (N, 1, H, W). With g = sigmoid(z), z = channel * spatial:
// d x = grad * (1 + g), d z = grad * x * g * (1 - g), d channel = sum over H x W of d z *
// spatial, d spatial = sum over the channels of d z * channel. One task per (sample, chunk of
// positions) walks every channel; the channel sums of the chunks are added at the end.
std::vector<at::Tensor> bam_apply_backward(const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& channel,
                                           const at::Tensor& spatial) {
  check_nchw("bam_apply_backward", {grad, x});
  check_maps("bam_apply_backward", x, channel, spatial);
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  auto d_x = at::empty_like(x);
  auto d_spatial = at::empty_like(spatial);
  auto partial = at::empty({batch, chunks, channels}, x.options());  // d channel per chunk
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bam_apply_backward", [&] {
    using T = scalar_t;
    const T* gs = grad.const_data_ptr<T>();
    const T* xs = x.const_data_ptr<T>();
    const T* cs = channel.const_data_ptr<T>();
    const T* ss = spatial.const_data_ptr<T>();
    T* dxs = d_x.data_ptr<T>();
    T* dss = d_spatial.data_ptr<T>();
    T* parts = partial.data_ptr<T>();
    const Vec<T> one(T(1));
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / chunks, first = (task % chunks) * kChunk;
        const int64_t size = std::min(kChunk, hw - first);
        const T* s = ss + n * hw + first;
        T* ds = dss + n * hw + first;
        std::fill(ds, ds + size, T(0));
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t offset = (n * channels + c) * hw + first;
          const Vec<T> cv(cs[n * channels + c]);
          Vec<T> by_spatial(T(0));
          for_each_vec<T>(size, [&](int64_t p, int64_t width) {
            const auto sv = load_n(s + p, width);
            const auto g = sigmoid_u20(cv * sv);
            const auto gv = load_n(gs + offset + p, width);
            store_n(gv + gv * g, dxs + offset + p, width);
            const auto dz = gv * load_n(xs + offset + p, width) * (one - g) * g;
            by_spatial = by_spatial + first_lanes(dz * sv, width);
            store_n(at::vec::fmadd(dz, cv, load_n(ds + p, width)), ds + p, width);
          });
          parts[(n * chunks + task % chunks) * channels + c] =
              lanes_sum(by_spatial, Vec<T>::size());
        }
      }
    });
  });
  return {d_x, partial.sum(1), d_spatial};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  m.def("bam_apply(Tensor x, Tensor channel, Tensor spatial, Tensor(a!) out) -> ()", &bam_apply);
  m.def("bam_apply_backward(Tensor grad, Tensor x, Tensor channel, Tensor spatial) -> Tensor[]",
        &bam_apply_backward);
}

}  // namespace mmattn
