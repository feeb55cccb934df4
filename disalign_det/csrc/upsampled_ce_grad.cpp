// The backward of disalign_det.modeling.losses.upsampled_cross_entropy on the CPU, in one pass over
// the full-resolution softmax: the gradient with respect to the logits at the head's resolution,
//
//   grad[n, k, l, c] = sum_{o, j} A_H[o, k] A_W[j, l] g[n, o, j] (P[n, o, j, c] - [c = y[n, o, j]])
//
// with A_H (H, h) and A_W (W, w) the 1-D bilinear interpolation matrices (at most two non-zeros a
// row, passed as "taps") and g the per-pixel gradient scale (GRW weight / denominator, 0 where
// ignored). PyTorch composes it from a scaling pass, a scatter and two strided convolutions, each a
// pass over (or a write of) a full-resolution tensor; here each full-resolution row is read once,
// reduced along W into a row of the head's width, then added to its (at most two) head rows.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

void check(const torch::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// prob (N, H, W, C) float32: the softmax of the upsampled logits; labels (N, H, W) int64 in
// [0, C) (anything where scale is 0); scale (N, H, W) float32; row_taps / col_taps (H, 2) / (W, 2)
// int64 head rows / columns and row_weights / col_weights (H, 2) / (W, 2) float32 their weights
// (a tap of weight 0 is skipped). Returns (N, C, h, w) float32, contiguous.
torch::Tensor upsampled_ce_grad(const torch::Tensor& prob, const torch::Tensor& labels,
                                const torch::Tensor& scale, const torch::Tensor& row_taps,
                                const torch::Tensor& row_weights, const torch::Tensor& col_taps,
                                const torch::Tensor& col_weights, int64_t h, int64_t w) {
  check(prob, "prob", at::kFloat, 4);
  check(labels, "labels", at::kLong, 3);
  check(scale, "scale", at::kFloat, 3);
  check(row_taps, "row_taps", at::kLong, 2);
  check(row_weights, "row_weights", at::kFloat, 2);
  check(col_taps, "col_taps", at::kLong, 2);
  check(col_weights, "col_weights", at::kFloat, 2);
  const int64_t N = prob.size(0), H = prob.size(1), W = prob.size(2), C = prob.size(3);
  TORCH_CHECK(labels.sizes() == prob.sizes().slice(0, 3), "labels must be (N, H, W)");
  TORCH_CHECK(scale.sizes() == prob.sizes().slice(0, 3), "scale must be (N, H, W)");
  TORCH_CHECK(row_taps.size(0) == H && row_taps.size(1) == 2, "row_taps must be (H, 2)");
  TORCH_CHECK(col_taps.size(0) == W && col_taps.size(1) == 2, "col_taps must be (W, 2)");
  TORCH_CHECK(row_weights.sizes() == row_taps.sizes(), "row_weights must be (H, 2)");
  TORCH_CHECK(col_weights.sizes() == col_taps.sizes(), "col_weights must be (W, 2)");
  const int64_t* rt = row_taps.data_ptr<int64_t>();
  const int64_t* ct = col_taps.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(rt, rt + 2 * H, [h](int64_t k) { return 0 <= k && k < h; }),
              "row_taps out of [0, h)");
  TORCH_CHECK(std::all_of(ct, ct + 2 * W, [w](int64_t l) { return 0 <= l && l < w; }),
              "col_taps out of [0, w)");
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t pixels = N * H * W;
  TORCH_CHECK(std::all_of(y, y + pixels, [C](int64_t c) { return 0 <= c && c < C; }),
              "labels out of [0, C)");

  auto out = torch::empty({N, C, h, w}, prob.options());
  const float* p = prob.data_ptr<float>();
  const float* g = scale.data_ptr<float>();
  const float* rw = row_weights.data_ptr<float>();
  const float* cw = col_weights.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // A task: one image and a block of its channels (blocks only where there are more threads than
  // images; each channel's sums are taken in the same order whatever the blocks, so the result
  // does not depend on the thread count). Its rows are visited in order and accumulated
  // channels-last (h, w, block) in the task's own buffer, then written out transposed to the
  // logits' layout (C, h, w).
  const int64_t threads = at::get_num_threads();
  int64_t block = C;
  if (threads > N) {  // split the channels into about threads / N blocks of whole cache lines
    const int64_t per_image = (threads + N - 1) / N;
    block = std::max<int64_t>(16, ((C + per_image - 1) / per_image + 15) / 16 * 16);
  }
  const int64_t blocks = (C + block - 1) / block;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(w * block);
    std::vector<float> acc(h * w * block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = task % blocks * block;
      const int64_t cb = std::min(block, C - c0);  // channels c0 .. c0 + cb - 1
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t o = 0; o < H; ++o) {
        std::fill(row.begin(), row.end(), 0.0f);
        bool any = false;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t px = (n * H + o) * W + j;
          if (g[px] == 0.0f) continue;  // ignored pixel (or zero weight): contributes nothing
          any = true;
          const float* src = p + px * C + c0;
          const int64_t label = y[px] - c0;
          for (int t = 0; t < 2; ++t) {
            const float b = cw[2 * j + t] * g[px];
            if (b == 0.0f) continue;
            float* r = row.data() + ct[2 * j + t] * cb;
            for (int64_t c = 0; c < cb; ++c) r[c] += b * src[c];
            if (0 <= label && label < cb) r[label] -= b;
          }
        }
        if (!any) continue;
        for (int t = 0; t < 2; ++t) {
          const float a = rw[2 * o + t];
          if (a == 0.0f) continue;
          float* out_row = acc.data() + rt[2 * o + t] * w * cb;
          const float* r = row.data();
          for (int64_t i = 0; i < w * cb; ++i) out_row[i] += a * r[i];
        }
      }
      float* image = dst + (n * C + c0) * h * w;
      for (int64_t q = 0; q < h * w; ++q) {
        for (int64_t c = 0; c < cb; ++c) image[c * h * w + q] = acc[q * cb + c];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upsampled_ce_grad", &upsampled_ce_grad,
        "gradient of the upsampled cross-entropy with respect to the logits (CPU, float32)");
}
