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

// The n < W values at p as a vector whose other lanes are 0, and the first n lanes of v stored
// at p. ATen's loadu(p, n) and store(p, n) copy through a stack buffer where the instruction set
// has no masked loads in Vectorized (AVX2), which costs as much as several full vectors: a third
// of SGE's time at 14 x 14 positions, whose rows of 196 end in a partial vector. AVX2 has masked
// loads and stores for 32- and 64-bit lanes; AVX512's Vectorized already uses its masks.
#if defined(CPU_CAPABILITY_AVX2)
inline __m256i first_lanes_mask32(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i first_lanes_mask64(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
inline Vec<float> load_partial(const float* p, int64_t n) {
  return _mm256_maskload_ps(p, first_lanes_mask32(n));
}
inline Vec<double> load_partial(const double* p, int64_t n) {
  return _mm256_maskload_pd(p, first_lanes_mask64(n));
}
inline void store_partial(const Vec<float>& v, float* p, int64_t n) {
  _mm256_maskstore_ps(p, first_lanes_mask32(n), v);
}
inline void store_partial(const Vec<double>& v, double* p, int64_t n) {
  _mm256_maskstore_pd(p, first_lanes_mask64(n), v);
}
#else
template <typename T>
inline Vec<T> load_partial(const T* p, int64_t n) {
  return Vec<T>::loadu(p, n);
}
template <typename T>
inline void store_partial(const Vec<T>& v, T* p, int64_t n) {
  v.store(p, n);
}
#endif

// The first n <= W values at p as a vector (the other lanes 0), as Vec<T>::loadu(p, n).
template <typename T>
inline Vec<T> load_n(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : load_partial(p, n);
}

// The first n <= W lanes of v stored at p, as v.store(p, n).
template <typename T>
inline void store_n(const Vec<T>& v, T* p, int64_t n) {
  if (n == Vec<T>::size()) {
    v.store(p);
  } else {
    store_partial(v, p, n);
  }
}

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
  return accumulate<T>(size, [&](int64_t p, int64_t n) { return load_n(data + p, n); });
}

template <typename T>
inline T dot_product(const T* a, const T* b, int64_t size) {
  return accumulate<T>(size, [&](int64_t p, int64_t n) {
    return load_n(a + p, n) * load_n(b + p, n);
  });
}

// out += a * x
template <typename T>
inline void axpy(T a, const T* x, T* out, int64_t size) {
  const Vec<T> av(a);
  for_each_vec<T>(size, [&](int64_t p, int64_t n) {
    store_n(at::vec::fmadd(av, load_n(x + p, n), load_n(out + p, n)), out + p, n);
  });
}

// 1 / (1 + exp(-v)), as torch.sigmoid computes it on the CPU.
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& v) {
  const Vec<T> one(T(1));
  return one / (one + v.neg().exp());
}

// sigmoid with ATen's faster exp (exp_u20: within 20 ULP of exp for float, exp itself for
// double), for kernels whose time is the exponential: BAM's gate has one per element.
template <typename T>
inline Vec<T> sigmoid_u20(const Vec<T>& v) {
  const Vec<T> one(T(1));
  return one / (one + v.neg().exp_u20());
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
