// Vectorised loops over short contiguous rows, shared by the kernels.
//
// ATen's Vectorized<T> compiles to the SIMD width the build targets (kernels/__init__.py passes
// the flags of torch's own CPU capability). Rows are walked one vector at a time; the last,
// partial vector is loaded and stored with a count, and sums mask its unused lanes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace mmattn {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Calls f(p, n) for p = 0, W, 2W, ... with n = min(W, size - p) valid lanes.
template <typename T, typename F>
inline void for_each_vec(int64_t size, const F& f) {
  constexpr int64_t width = Vec<T>::size();
  for (int64_t p = 0; p < size; p += width) f(p, std::min(width, size - p));
}

// The sum of the first n lanes of v.
// v with the lanes from n on set to 0.
template <typename T>
inline Vec<T> first_lanes(const Vec<T>& v, int64_t n) {
  return n == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, n);
}

template <typename T>
inline T lanes_sum(const Vec<T>& v, int64_t n) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; },
                                    first_lanes(v, n));
}

// The sum over p < size of load(p, n), a vector of n valid lanes, in four independent
// accumulators (a single one would wait on the previous add at every step).
template <typename T, typename Load>
inline T accumulate(int64_t size, const Load& load) {
  constexpr int64_t width = Vec<T>::size();
  Vec<T> acc0(T(0)), acc1(T(0)), acc2(T(0)), acc3(T(0));
  int64_t p = 0;
  for (; p + 4 * width <= size; p += 4 * width) {
    acc0 = acc0 + load(p, width);
    acc1 = acc1 + load(p + width, width);
    acc2 = acc2 + load(p + 2 * width, width);
    acc3 = acc3 + load(p + 3 * width, width);
  }
  for (; p < size; p += width) {
    const int64_t n = std::min(width, size - p);
    acc0 = acc0 + first_lanes(load(p, n), n);
  }
  return lanes_sum((acc0 + acc1) + (acc2 + acc3), width);
}

template <typename T>
inline T sum(const T* data, int64_t size) {
  return accumulate<T>(size, [&](int64_t p, int64_t n) { return Vec<T>::loadu(data + p, n); });
}

template <typename T>
inline T dot_product(const T* a, const T* b, int64_t size) {
  return accumulate<T>(size, [&](int64_t p, int64_t n) {
    return Vec<T>::loadu(a + p, n) * Vec<T>::loadu(b + p, n);
  });
}

// out += a * x
template <typename T>
inline void axpy(T a, const T* x, T* out, int64_t size) {
  const Vec<T> av(a);
  for_each_vec<T>(size, [&](int64_t p, int64_t n) {
    at::vec::fmadd(av, Vec<T>::loadu(x + p, n), Vec<T>::loadu(out + p, n)).store(out + p, n);
  });
}

// out = x * gate (out may be x)
template <typename T>
inline void multiply(const T* x, const T* gate, T* out, int64_t size) {
  for_each_vec<T>(size, [&](int64_t p, int64_t n) {
    (Vec<T>::loadu(x + p, n) * Vec<T>::loadu(gate + p, n)).store(out + p, n);
  });
}

// out = x * gate + add (out may be x), rounded twice like a product then a sum, so that a
// gate fused into the residual add gives the bits of the block followed by the add.
template <typename T>
inline void multiply_add(const T* x, const T* gate, const T* add, T* out, int64_t size) {
  for_each_vec<T>(size, [&](int64_t p, int64_t n) {
    (Vec<T>::loadu(x + p, n) * Vec<T>::loadu(gate + p, n) + Vec<T>::loadu(add + p, n))
        .store(out + p, n);
  });
}

// 1 / (1 + exp(-v)), as torch.sigmoid computes it on the CPU.
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& v) {
  const Vec<T> one(T(1));
  return one / (one + v.neg().exp());
}

// The kernels take contiguous 4-d tensors of one floating dtype on the CPU; the Python side
// only calls them for such tensors, so this guards against misuse, not user input.
inline void check_nchw(const char* op, std::initializer_list<at::Tensor> tensors) {
  const auto dtype = tensors.begin()->scalar_type();
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous() &&
                    t.scalar_type() == dtype,
                op, ": expects contiguous 4-d CPU tensors of one dtype, got ", t.sizes(), " ",
                t.scalar_type(), " on ", t.device());
  }
}

}  // namespace mmattn
