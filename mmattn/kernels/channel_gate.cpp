// A per-(sample, channel) gate with a frozen BN folded in, plus the residual, in one pass.
//
// SE and ECA after bn3 compute identity + g * (src * scale + shift) = src * a + b + identity
// with a = g * scale and b = g * shift per (n, c) (mmattn/blocks/_channel_gate.py). PyTorch
// needs two passes for it (the affine map, then the add); this is one.
#include "vec_loops.h"

namespace mmattn {
namespace {

// out = src * a[n, c] + b[n, c] + identity, with a and b (N, C). out may be src itself.
void channel_affine_residual(const at::Tensor& src, const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& identity, at::Tensor& out) {
  check_nchw("channel_affine_residual", {src, identity, out});
  const int64_t rows = src.size(0) * src.size(1), hw = src.size(2) * src.size(3);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "channel_affine_residual", [&] {
    using T = scalar_t;
    const T* xs = src.const_data_ptr<T>();
    const T* as = a.const_data_ptr<T>();
    const T* bs = b.const_data_ptr<T>();
    const T* ids = identity.const_data_ptr<T>();
    T* outs = out.data_ptr<T>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const Vec<T> av(as[row]), bv(bs[row]);
        const T* x = xs + row * hw;
        const T* id = ids + row * hw;
        T* o = outs + row * hw;
        for_each_vec<T>(hw, [&](int64_t p, int64_t n) {
          (at::vec::fmadd(Vec<T>::loadu(x + p, n), av, bv) + Vec<T>::loadu(id + p, n))
              .store(o + p, n);
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmattn, m) {
  m.def("channel_affine_residual(Tensor src, Tensor a, Tensor b, Tensor identity, "
        "Tensor(a!) out) -> ()",
        &channel_affine_residual);
}

}  // namespace mmattn
