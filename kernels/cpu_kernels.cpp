// CPU twins of the Triton kernels (lens_kernels/triton_logprob.py): one fused pass per row.
//
// The chunked torch path (torch_logprob.py) issues several small ops per chunk of rows; each op
// re-reads the chunk and every op boundary is a Python/GIL hand-off, which on an
// oversubscribed machine costs a scheduler wake-up. Here each kernel is ONE call: rows are
// handed out dynamically (see for_rows), and each row is read from memory once and then
// processed from L1/L2 with at::vec (AVX2: 8 floats, Sleef's exp2/log2, the same functions
// torch.exp2/torch.log2 use).
//
//   row_stats       (m, s, t, w) per row: m = max x, s = Σ 2^((x−m)·log2e), t = target x,
//                   w = Σ e·(x−m), x = logit/T (the packed stats lens_kernels.tp merges).
//                   With store = true (fp32 only) the logits row is overwritten with e.
//   row_grad        (a·(onehot − p) + b·p·(μ − x))/T from the logits and lse (recompute).
//   row_grad_stored the same from a row holding e, with p = e·c (c = exp(m − lse) per row).
//
// Columns ≥ n_valid are excluded (and get zero gradient); rows whose coefficients are all 0
// are zero-filled without being read. Float64 references: lens_kernels/reference.py.
#include <torch/extension.h>

#include <ATen/Parallel.h>   // at::get_num_threads
#include <ATen/cpu/vec/vec.h>

#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <thread>

namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t W = fVec::size();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kUnderflow = 200.0f;   // exp(−200) == 0 in fp32: keeps (−inf)·0 out of sums
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline fVec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else {
    float tmp[W];
    for (int64_t i = 0; i < W; ++i) tmp[i] = static_cast<float>(p[i]);
    return fVec::loadu(tmp);
  }
}

template <typename T>
inline void store_f(T* p, const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    float tmp[W];
    v.store(tmp);
    for (int64_t i = 0; i < W; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

inline float hsum(const fVec& v) {
  float tmp[W];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < W; ++i) s += tmp[i];
  return s;
}

inline float hmax(const fVec& v) {
  float tmp[W];
  v.store(tmp);
  float m = tmp[0];
  for (int64_t i = 1; i < W; ++i) m = std::max(m, tmp[i]);
  return m;
}

// Rows are handed out one at a time (an atomic counter) to the calling thread and
// torch.get_num_threads() − 1 helper threads started for this call. The caller returns as
// soon as every row is done: a helper that the (shared, oversubscribed) machine has not
// scheduled yet finds no row left and exits on its own, so nobody waits for it — unlike an
// OpenMP region, whose end waits for every thread of the team (and whose idle threads spin,
// taking the cores from the small ops that follow).
struct RowQueue {
  explicit RowQueue(int64_t n, std::function<void(int64_t)> fn) : rows(n), f(std::move(fn)) {}
  const int64_t rows;
  std::function<void(int64_t)> f;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  void drain() {
    for (int64_t r; (r = next.fetch_add(1)) < rows;) {
      f(r);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename F>
void for_rows(int64_t rows, const F& f) {
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), rows) - 1;
  if (helpers <= 0) {
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
  auto queue = std::make_shared<RowQueue>(rows, std::function<void(int64_t)>(f));
  for (int64_t i = 0; i < helpers; ++i) std::thread([queue] { queue->drain(); }).detach();
  queue->drain();
  while (queue->done.load(std::memory_order_acquire) < rows) std::this_thread::yield();
}

template <typename T>
void stats_row(T* x, int64_t n, float inv_t, int64_t local_t, bool entropy, bool store,
               float* out) {
  fVec vmax(kNegInf);
  int64_t j = 0;
  for (; j + W <= n; j += W) vmax = at::vec::maximum(vmax, load_f(x + j));
  float m = hmax(vmax);
  for (; j < n; ++j) m = std::max(m, static_cast<float>(x[j]));
  m *= inv_t;                                  // max(x/T) = max(x)/T: rounding is monotonic
  const float t = (local_t >= 0 && local_t < n) ? static_cast<float>(x[local_t]) * inv_t : 0.f;
  const float shift = std::isinf(m) ? 0.f : m;  // an all −inf row: every e is 0
  const fVec vshift(shift), vinv(inv_t), vlog2e(kLog2e), vlow(-kUnderflow);
  fVec vs(0.f), vw(0.f);
  float s = 0.f, w = 0.f;
  for (j = 0; j + W <= n; j += W) {
    fVec d = at::vec::maximum(load_f(x + j) * vinv - vshift, vlow);
    fVec e = (d * vlog2e).exp2();
    vs = vs + e;
    if (entropy) vw = at::vec::fmadd(e, d, vw);
    if (store) store_f(x + j, e);
  }
  for (; j < n; ++j) {
    const float d = std::max(static_cast<float>(x[j]) * inv_t - shift, -kUnderflow);
    const float e = std::exp2(d * kLog2e);
    s += e;
    if (entropy) w += e * d;
    if (store) x[j] = static_cast<T>(e);
  }
  out[0] = m;
  out[1] = s + hsum(vs);
  out[2] = t;
  out[3] = entropy ? w + hsum(vw) : 0.f;
}

template <typename T>
void grad_row(const T* x, T* g, int64_t n, int64_t cols, float inv_t, int64_t local_t, float lse,
              float a, float b, float mean, bool entropy) {
  const bool own = local_t >= 0 && local_t < n;
  const float x_t = own ? static_cast<float>(x[local_t]) * inv_t : 0.f;   // before overwrite
  const fVec vinv(inv_t), vlse(lse), vlog2e(kLog2e), vlow(lse - kUnderflow), va(-a), vb(b),
      vmean(mean);
  auto value = [&](float xv) {
    if (entropy) xv = std::max(xv, lse - kUnderflow);
    const float p = std::exp2((xv - lse) * kLog2e);
    return (entropy ? -a * p + b * p * (mean - xv) : -a * p) * inv_t;
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    fVec xv = load_f(x + j) * vinv;
    if (entropy) xv = at::vec::maximum(xv, vlow);
    const fVec p = ((xv - vlse) * vlog2e).exp2();
    fVec gv = p * va;
    if (entropy) gv = at::vec::fmadd(vb * p, vmean - xv, gv);
    store_f(g + j, gv * vinv);
  }
  for (; j < n; ++j) g[j] = static_cast<T>(value(static_cast<float>(x[j]) * inv_t));
  if (own) g[local_t] = static_cast<T>(value(x_t) + a * inv_t);
  for (j = n; j < cols; ++j) g[j] = static_cast<T>(0.f);
}

void grad_stored_row(float* e, int64_t n, int64_t cols, float inv_t, int64_t local_t, float c,
                     float a, float b, float mean_minus_shift, bool entropy) {
  const float k = c * inv_t;
  int64_t j = 0;
  if (!entropy) {
    const fVec vk(-a * k);
    for (; j + W <= n; j += W) (fVec::loadu(e + j) * vk).store(e + j);
    for (; j < n; ++j) e[j] *= -a * k;
  } else {
    // g = e·c·(b·(μ − m) − a − b·ln2·log2 e)/T
    const fVec vk(k), vc0(b * mean_minus_shift - a), vc1(-b * kLn2),
        vtiny(std::numeric_limits<float>::min());
    for (; j + W <= n; j += W) {
      const fVec ev = fVec::loadu(e + j);
      const fVec lg = at::vec::maximum(ev, vtiny).log2();
      (ev * vk * at::vec::fmadd(vc1, lg, vc0)).store(e + j);
    }
    for (; j < n; ++j) {
      const float lg = std::log2(std::max(e[j], std::numeric_limits<float>::min()));
      e[j] = e[j] * k * (b * mean_minus_shift - a - b * kLn2 * lg);
    }
  }
  if (local_t >= 0 && local_t < n) e[local_t] += a * inv_t;
  for (j = n; j < cols; ++j) e[j] = 0.f;
}

void check_rows(const torch::Tensor& x, const torch::Tensor& per_row, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "lens_kernels cpu: ", what,
              " must be a 2-D row view with unit column stride");
  TORCH_CHECK(per_row.numel() == x.size(0), "lens_kernels cpu: one ", what, " entry per row");
}

}  // namespace

torch::Tensor row_stats(torch::Tensor x, torch::Tensor targets, torch::Tensor active,
                        int64_t vocab_start, int64_t n_valid, double inv_temperature,
                        bool with_entropy, bool store) {
  check_rows(x, targets, "targets");
  TORCH_CHECK(!store || x.scalar_type() == at::kFloat, "store needs fp32 logits");
  const int64_t rows = x.size(0), stride = x.stride(0);
  auto stats = torch::empty({rows, 4}, x.options().dtype(at::kFloat));
  const int64_t* tg = targets.data_ptr<int64_t>();
  const int8_t* act = active.data_ptr<int8_t>();
  float* out = stats.data_ptr<float>();
  const float inv_t = static_cast<float>(inv_temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "row_stats", [&] {
    scalar_t* base = x.data_ptr<scalar_t>();
    for_rows(rows, [&](int64_t r) {
      float* o = out + 4 * r;
      if (!act[r] || n_valid == 0) {
        o[0] = kNegInf, o[1] = 0.f, o[2] = 0.f, o[3] = 0.f;
        return;
      }
      stats_row(base + r * stride, n_valid, inv_t, tg[r] - vocab_start, with_entropy, store, o);
    });
  });
  return stats;
}

void row_grad(torch::Tensor x, torch::Tensor grad, torch::Tensor targets, torch::Tensor lse,
              torch::Tensor coef, torch::Tensor ent_coef, torch::Tensor mean, int64_t vocab_start,
              int64_t n_valid, double inv_temperature) {
  check_rows(x, targets, "targets");
  check_rows(grad, coef, "coef");
  const bool entropy = ent_coef.numel() > 0;
  const int64_t rows = x.size(0), cols = x.size(1), sx = x.stride(0), sg = grad.stride(0);
  const int64_t* tg = targets.data_ptr<int64_t>();
  const float *ls = lse.data_ptr<float>(), *a = coef.data_ptr<float>();
  const float* b = entropy ? ent_coef.data_ptr<float>() : nullptr;
  const float* mu = entropy ? mean.data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(inv_temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "row_grad", [&] {
    const scalar_t* xb = x.data_ptr<scalar_t>();
    scalar_t* gb = grad.data_ptr<scalar_t>();
    for_rows(rows, [&](int64_t r) {
      const float br = entropy ? b[r] : 0.f;
      scalar_t* g = gb + r * sg;
      if ((a[r] == 0.f && br == 0.f) || n_valid == 0) {
        std::fill(g, g + cols, static_cast<scalar_t>(0.f));
        return;
      }
      grad_row(xb + r * sx, g, n_valid, cols, inv_t, tg[r] - vocab_start, ls[r], a[r], br,
               entropy ? mu[r] : 0.f, entropy);
    });
  });
}

void row_grad_stored(torch::Tensor e, torch::Tensor targets, torch::Tensor scale,
                     torch::Tensor shift, torch::Tensor coef, torch::Tensor ent_coef,
                     torch::Tensor mean, int64_t vocab_start, int64_t n_valid,
                     double inv_temperature) {
  check_rows(e, targets, "targets");
  TORCH_CHECK(e.scalar_type() == at::kFloat, "the stored-exp buffer is fp32");
  const bool entropy = ent_coef.numel() > 0;
  const int64_t rows = e.size(0), cols = e.size(1), se = e.stride(0);
  const int64_t* tg = targets.data_ptr<int64_t>();
  const float *c = scale.data_ptr<float>(), *m = shift.data_ptr<float>(), *a = coef.data_ptr<float>();
  const float* b = entropy ? ent_coef.data_ptr<float>() : nullptr;
  const float* mu = entropy ? mean.data_ptr<float>() : nullptr;
  float* base = e.data_ptr<float>();
  const float inv_t = static_cast<float>(inv_temperature);
  for_rows(rows, [&](int64_t r) {
    const float br = entropy ? b[r] : 0.f;
    float* row = base + r * se;
    if ((a[r] == 0.f && br == 0.f) || n_valid == 0) {
      std::fill(row, row + cols, 0.f);
      return;
    }
    grad_stored_row(row, n_valid, cols, inv_t, tg[r] - vocab_start, c[r], a[r], br,
                    entropy ? mu[r] - m[r] : 0.f, entropy);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using guard = py::call_guard<py::gil_scoped_release>;
  m.def("row_stats", &row_stats, guard());
  m.def("row_grad", &row_grad, guard());
  m.def("row_grad_stored", &row_grad_stored, guard());
}
