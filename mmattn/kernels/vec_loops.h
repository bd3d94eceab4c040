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
template <typename T>
inline T lanes_sum(const Vec<T>& v, int64_t n) {
  const auto kept = n == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, n);
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; },
                                    kept);
}

template <typename T>
inline T sum(const T* data, int64_t size) {
  Vec<T> acc(T(0));
  for_each_vec<T>(size, [&](int64_t p, int64_t n) {
    const auto v = Vec<T>::loadu(data + p, n);
    acc = acc + (n == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, n));
  });
  return lanes_sum(acc, Vec<T>::size());
}

template <typename T>
inline T dot_product(const T* a, const T* b, int64_t size) {
  Vec<T> acc(T(0));
  for_each_vec<T>(size, [&](int64_t p, int64_t n) {
    const auto v = Vec<T>::loadu(a + p, n) * Vec<T>::loadu(b + p, n);
    acc = acc + (n == Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, n));
  });
  return lanes_sum(acc, Vec<T>::size());
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
