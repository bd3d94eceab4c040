// The small gate functions of the channel-attention blocks, on (rows, C) descriptors.
//
// Without autograd the kernels compute a block's gate between their passes over the feature map
// instead of handing it to a dozen small PyTorch ops: right after such a pass has flushed the
// caches, each small op costs several times what it costs warm, so in a network the gates took
// about as long as a pass. These are the PyTorch modules' forward math (nn.Linear, nn.ReLU,
// torch.sigmoid, a zero-padded 1-D convolution), summed in another order.
#pragma once

#include "vec_loops.h"

namespace mmattn {

// torch.relu's value: NaN stays NaN.
template <typename T>
inline T relu(T v) {
  return v > T(0) || std::isnan(v) ? v : T(0);
}

template <typename T>
inline T scalar_sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// out (rows, out_features) = in (rows, in_features) w^T + b, as nn.Linear with weight w
// (out_features, in_features); relu applied if asked. Each weight row is read once for all rows.
template <typename T>
void linear(const T* in, int64_t rows, int64_t in_features, const T* w, const T* b,
            int64_t out_features, bool with_relu, T* out) {
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const T* weights = w + o * in_features;
      for (int64_t r = 0; r < rows; ++r) {
        const T v = dot_product(weights, in + r * in_features, in_features) + b[o];
        out[r * out_features + o] = with_relu ? relu(v) : v;
      }
    }
  });
}

// The two-layer MLP with a ReLU between, nn.Sequential(Linear, ReLU, Linear), on `rows` vectors.
template <typename T>
std::vector<T> relu_mlp(const T* in, int64_t rows, int64_t channels, const T* w1, const T* b1,
                        int64_t hidden, const T* w2, const T* b2) {
  std::vector<T> middle(rows * hidden), out(rows * channels);
  linear(in, rows, channels, w1, b1, hidden, true, middle.data());
  linear(middle.data(), rows, hidden, w2, b2, channels, false, out.data());
  return out;
}

// Backward of relu_mlp on `rows` vectors `in`, for the gradient d_out (rows, C) of its output:
// writes d_in (rows, C) and the weights' and biases' gradients (summed over the rows).
template <typename T>
void relu_mlp_backward(const T* in, const T* d_out, int64_t rows, int64_t channels, const T* w1,
                       const T* b1, int64_t hidden, const T* w2, T* d_in, T* d_w1, T* d_b1,
                       T* d_w2, T* d_b2) {
  std::vector<T> h(rows * hidden);  // the hidden layer again
  linear(in, rows, channels, w1, b1, hidden, true, h.data());
  // The second layer: d b2, d w2 = d_out^T h, and d h = d_out w2, through the ReLU (h > 0).
  at::parallel_for(0, channels, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      d_b2[c] = T(0);
      std::fill(d_w2 + c * hidden, d_w2 + (c + 1) * hidden, T(0));
      for (int64_t r = 0; r < rows; ++r) {
        d_b2[c] += d_out[r * channels + c];
        axpy(d_out[r * channels + c], h.data() + r * hidden, d_w2 + c * hidden, hidden);
      }
    }
  });
  std::vector<T> dh(rows * hidden, T(0));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = dh.data() + r * hidden;
      for (int64_t c = 0; c < channels; ++c) {
        axpy(d_out[r * channels + c], w2 + c * hidden, row, hidden);
      }
      for (int64_t j = 0; j < hidden; ++j) {
        if (!(h[r * hidden + j] > T(0))) row[j] = T(0);
      }
    }
  });
  // The first layer: d b1, d w1 = dh^T in, and d in = dh w1.
  at::parallel_for(0, hidden, 4, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      d_b1[j] = T(0);
      std::fill(d_w1 + j * channels, d_w1 + (j + 1) * channels, T(0));
      for (int64_t r = 0; r < rows; ++r) {
        d_b1[j] += dh[r * hidden + j];
        axpy(dh[r * hidden + j], in + r * channels, d_w1 + j * channels, channels);
      }
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::fill(d_in + r * channels, d_in + (r + 1) * channels, T(0));
      for (int64_t j = 0; j < hidden; ++j) {
        axpy(dh[r * hidden + j], w1 + j * channels, d_in + r * channels, channels);
      }
    }
  });
}

// out[r, c] = sum over j < k of w[j] * in[r, c + j - k / 2], zero outside 0 <= c < channels: a
// 1-D convolution along the channels with one input and one output channel (ECA's, no bias).
template <typename T>
void channel_conv(const T* in, int64_t rows, int64_t channels, const T* w, int64_t k, T* out) {
  const int64_t pad = k / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const T* v = in + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      T total(0);
      for (int64_t j = std::max<int64_t>(0, pad - c); j < std::min(k, channels + pad - c); ++j) {
        total += w[j] * v[c + j - pad];
      }
      out[r * channels + c] = total;
    }
  }
}

}  // namespace mmattn
