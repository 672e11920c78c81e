// CUDA DGA, on the stream ONNX Runtime gives the kernel. Steps as in dga_cpu.cc:
//   scores   one block per (probe row, b, kv head): masked softmax over keys, atomically summed
//   rank     one thread per key: focus iff fewer than n_f keys come before it (score desc, position asc)
//   compact  one block per (b, kv head): focus / non-focus position lists by a block scan
//   aggregate one warp per (group, b, query head): K̄, V̄
//   complete (masked calls only) one thread per (b, query head, row, group)
//   attend   one warp per query row: focus prefix, complete groups, raw tokens, online softmax
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <algorithm>
#include <string>
#include <vector>

#include "dga_cuda.h"

namespace dga {
namespace {

constexpr int THREADS = 256;
constexpr int WARP = 32;
constexpr int ROWS_PER_BLOCK = 4;  // warps per attend block
constexpr int MAX_DV_PER_LANE = 8;  // Dv <= 256
constexpr float NEG_INF = -__builtin_huge_valf();

struct Dev {
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv, rep, r, n_f, Nn, G, m, w;
  const bool* mask;
  int64_t ms[4];
  bool causal, window, dga;
  float scale, group_logit;
};

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ bool visible(const Dev& P, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (P.causal && j > i) return false;
  return P.mask == nullptr || P.mask[b * P.ms[0] + h * P.ms[1] + i * P.ms[2] + j * P.ms[3]];
}

__device__ float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

__device__ float warp_max(float x) {
  for (int o = WARP / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// max(a, b) that propagates NaN (fmaxf drops it): a NaN logit makes its row NaN, as in SDPA.
__device__ float nan_max(float a, float b) { return a != a || b != b ? __int_as_float(0x7fc00000) : fmaxf(a, b); }

__device__ float warp_nan_max(float x) {
  for (int o = WARP / 2; o > 0; o /= 2) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ float warp_sum(float x) {
  for (int o = WARP / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Number of entries <= x in the increasing a[0:n).
__device__ int64_t count_le(const int* a, int64_t n, int64_t x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] <= x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Sets *found when the mask lets some i see a j > i (then it does not stand for causality).
__global__ void future_visible_kernel(Dev P, int64_t s0, int64_t s1, int64_t s2, int64_t s3, int* found) {
  const int64_t total = s0 * s1 * s2 * s3;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % s3, i = e / s3 % s2, h = e / (s3 * s2) % s1, b = e / (s3 * s2 * s1);
    if (j > i && P.mask[b * P.ms[0] + h * P.ms[1] + i * P.ms[2] + j * P.ms[3]]) atomicOr(found, 1);
  }
}

// Step 1. grid (rep·r, B·Hkv): score[bg, j] += softmax_j(scale·q[h,p]·k[j] | Visible(p, j)), a NaN
// probability counted as 0 (the reference's nan_to_num: the focus choice stays well defined).
__global__ void scores_kernel(Dev P, const float* q, const float* k, float* score) {
  using Reduce = cub::BlockReduce<float, THREADS>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float shared;
  const int64_t bg = blockIdx.y, b = bg / P.Hkv, g = bg % P.Hkv;
  const int64_t h = g * P.rep + blockIdx.x / P.r, i = P.Nq - P.r + blockIdx.x % P.r;
  const float* qr = q + ((b * P.Hq + h) * P.Nq + i) * P.D;
  const float* kb = k + bg * P.Nk * P.D;
  float mx = NEG_INF;
  for (int64_t j = threadIdx.x; j < P.Nk; j += THREADS)
    if (visible(P, b, h, i, j)) mx = fmaxf(mx, P.scale * dot(qr, kb + j * P.D, P.D));
  mx = Reduce(tmp).Reduce(mx, MaxOp());
  if (threadIdx.x == 0) shared = mx;
  __syncthreads();
  mx = shared;
  if (mx == NEG_INF) return;
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < P.Nk; j += THREADS)
    if (visible(P, b, h, i, j)) sum += __expf(P.scale * dot(qr, kb + j * P.D, P.D) - mx);
  __syncthreads();
  sum = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) shared = sum;
  __syncthreads();
  sum = shared;
  for (int64_t j = threadIdx.x; j < P.Nk; j += THREADS) {
    if (!visible(P, b, h, i, j)) continue;
    const float p = __expf(P.scale * dot(qr, kb + j * P.D, P.D) - mx) / sum;
    if (!isnan(p)) atomicAdd(score + bg * P.Nk + j, p);
  }
}

// Step 2. grid (⌈Nk/THREADS⌉, B·Hkv): key j is focus iff fewer than n_f keys rank before it.
__global__ void rank_kernel(Dev P, const float* score, unsigned char* is_focus) {
  __shared__ float tile[THREADS];
  const int64_t bg = blockIdx.y, j = blockIdx.x * int64_t(THREADS) + threadIdx.x;
  const float* s = score + bg * P.Nk;
  const float sj = j < P.Nk ? s[j] : 0.0f;
  int64_t before = 0;
  for (int64_t base = 0; base < P.Nk; base += THREADS) {
    __syncthreads();
    if (base + threadIdx.x < P.Nk) tile[threadIdx.x] = s[base + threadIdx.x];
    __syncthreads();
    for (int64_t t = 0; t < THREADS && base + t < P.Nk; ++t)
      before += tile[t] > sj || (tile[t] == sj && base + t < j);
  }
  if (j < P.Nk) is_focus[bg * P.Nk + j] = before < P.n_f;
}

// Step 2-3. grid (B·Hkv), block THREADS: increasing focus / non-focus position lists.
__global__ void compact_kernel(Dev P, const unsigned char* is_focus, int* focus, int* nonfocus) {
  using Scan = cub::BlockScan<int, THREADS>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t bg = blockIdx.x;
  int64_t n_focus = 0, n_other = 0;
  for (int64_t base = 0; base < P.Nk; base += THREADS) {
    const int64_t j = base + threadIdx.x;
    const int flag = j < P.Nk && is_focus[bg * P.Nk + j];
    int before, total;
    Scan(tmp).ExclusiveSum(flag, before, total);
    if (j < P.Nk) {
      if (flag) focus[bg * P.n_f + n_focus + before] = static_cast<int>(j);
      else nonfocus[bg * P.Nn + n_other + (threadIdx.x - before)] = static_cast<int>(j);
    }
    n_focus += total;
    n_other += min(int64_t(THREADS), P.Nk - base) - total;
    __syncthreads();
  }
}

// Step 4. grid (G, B·Hq), one warp: w = softmax_t(scale·q[h, a(g)]·k[member t]); K̄, V̄ = Σ w·k, Σ w·v.
__global__ void aggregate_kernel(Dev P, const float* q, const float* k, const float* v, const int* nonfocus,
                                 float* kbar, float* vbar) {
  extern __shared__ float w[];  // [m]
  const int64_t bh = blockIdx.y, b = bh / P.Hq, h = bh % P.Hq, bg = b * P.Hkv + h / P.rep, gi = blockIdx.x;
  const int* members = nonfocus + bg * P.Nn + gi * P.m;
  const float* qa = q + (bh * P.Nq + members[P.m - 1]) * P.D;
  float mx = NEG_INF;
  for (int64_t t = threadIdx.x; t < P.m; t += WARP) {
    w[t] = P.scale * dot(qa, k + (bg * P.Nk + members[t]) * P.D, P.D);
    mx = fmaxf(mx, w[t]);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int64_t t = threadIdx.x; t < P.m; t += WARP) sum += (w[t] = __expf(w[t] - mx));
  sum = warp_sum(sum);
  __syncwarp();
  for (int64_t d = threadIdx.x; d < P.D; d += WARP) {
    float acc = 0.0f;
    for (int64_t t = 0; t < P.m; ++t) acc += w[t] * k[(bg * P.Nk + members[t]) * P.D + d];
    kbar[(bh * P.G + gi) * P.D + d] = acc / sum;
  }
  for (int64_t d = threadIdx.x; d < P.Dv; d += WARP) {
    float acc = 0.0f;
    for (int64_t t = 0; t < P.m; ++t) acc += w[t] * v[(bg * P.Nk + members[t]) * P.Dv + d];
    vbar[(bh * P.G + gi) * P.Dv + d] = acc / sum;
  }
}

__device__ bool window_ok(const Dev& P, int anchor, int64_t i) { return !P.window || anchor <= i - P.w; }

// Masked calls: complete[bh, i, g] = every member visible to row i, and the window allows g.
__global__ void complete_kernel(Dev P, const int* nonfocus, unsigned char* complete) {
  const int64_t total = P.B * P.Hq * P.Nq * P.G;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t gi = e % P.G, i = e / P.G % P.Nq, bh = e / (P.G * P.Nq), b = bh / P.Hq, h = bh % P.Hq;
    const int* members = nonfocus + (b * P.Hkv + h / P.rep) * P.Nn + gi * P.m;
    bool ok = window_ok(P, members[P.m - 1], i);
    for (int64_t t = 0; ok && t < P.m; ++t) ok = visible(P, b, h, i, members[t]);
    complete[e] = ok;
  }
}

// Step 5. grid (⌈Nq/ROWS_PER_BLOCK⌉, B·Hq), one warp per row; dense when !P.dga. Non-finite inputs
// as in SDPA: a NaN logit or value the row sees makes it NaN; a row that sees no key is 0.
__global__ void attend_kernel(Dev P, const float* q, const float* k, const float* v, const int* focus,
                              const int* nonfocus, const float* kbar, const float* vbar,
                              const unsigned char* complete, float* out) {
  extern __shared__ float qs[];  // [ROWS_PER_BLOCK, D]
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
  const int64_t bh = blockIdx.y, b = bh / P.Hq, h = bh % P.Hq, bg = b * P.Hkv + h / P.rep;
  const int64_t i = blockIdx.x * int64_t(ROWS_PER_BLOCK) + warp;
  if (i >= P.Nq) return;
  float* qr = qs + warp * P.D;
  for (int64_t d = lane; d < P.D; d += WARP) qr[d] = q[(bh * P.Nq + i) * P.D + d];
  __syncwarp();
  const float* kb = k + bg * P.Nk * P.D;
  const float* vb = v + bg * P.Nk * P.Dv;
  const int* F = focus + bg * P.n_f;
  const int* NF = nonfocus + bg * P.Nn;
  auto group_complete = [&](int64_t gi) {
    return complete ? complete[(bh * P.Nq + i) * P.G + gi] != 0 : window_ok(P, NF[gi * P.m + P.m - 1], i);
  };
  // Segments of candidate indices: 0 focus / dense keys, 1 groups, 2 raw non-focus tokens.
  int64_t len[3] = {0, 0, 0}, start2 = 0;
  if (!P.dga) {
    len[0] = P.causal ? min(i + 1, P.Nk) : P.Nk;
  } else {
    len[0] = P.window ? count_le(F, P.n_f, i) : P.n_f;
    len[1] = P.G;
    if (P.window) {  // anchors increase: groups past the window are never complete
      int64_t lo = 0, hi = P.G;
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (window_ok(P, NF[mid * P.m + P.m - 1], i)) lo = mid + 1; else hi = mid;
      }
      len[1] = lo;
    }
    len[2] = P.window ? count_le(NF, P.Nn, i) : P.Nn;
    if (P.mask == nullptr) start2 = len[1] * P.m;  // unmasked: complete groups are a prefix
  }
  float acc[MAX_DV_PER_LANE] = {};
  float run_max = NEG_INF, run_sum = 0.0f;
  for (int seg = 0; seg < 3; ++seg) {
    for (int64_t base = seg == 2 ? start2 : 0; base < len[seg]; base += WARP) {
      const int64_t c = base + lane;
      bool ok = false;
      const float *kr = nullptr, *vr = nullptr;
      float bias = 0.0f;
      if (c < len[seg]) {
        if (!P.dga) {
          ok = visible(P, b, h, i, c), kr = kb + c * P.D, vr = vb + c * P.Dv;
        } else if (seg == 0) {
          ok = visible(P, b, h, i, F[c]), kr = kb + F[c] * P.D, vr = vb + F[c] * P.Dv;
        } else if (seg == 1) {
          ok = group_complete(c), kr = kbar + (bh * P.G + c) * P.D, vr = vbar + (bh * P.G + c) * P.Dv;
          bias = P.group_logit;
        } else {
          ok = visible(P, b, h, i, NF[c]) && !(c < P.G * P.m && group_complete(c / P.m));
          kr = kb + NF[c] * P.D, vr = vb + NF[c] * P.Dv;
        }
      }
      const float logit = ok ? P.scale * dot(qr, kr, P.D) + bias : NEG_INF;
      const float new_max = nan_max(run_max, warp_nan_max(logit));  // NaN from here on: the row is NaN
      if (new_max == NEG_INF) continue;
      const float corr = run_max == NEG_INF ? 0.0f : __expf(run_max - new_max);
      const float p = ok ? __expf(logit - new_max) : 0.0f;
      run_sum = run_sum * corr + warp_sum(p);
      for (int u = 0; u < MAX_DV_PER_LANE; ++u) acc[u] *= corr;
      for (int t = 0; t < WARP; ++t) {
        const float pt = __shfl_sync(0xffffffffu, p, t);
        const float* vt = reinterpret_cast<const float*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(vr), t));
        if (pt == 0.0f) continue;
        for (int u = 0; u < MAX_DV_PER_LANE; ++u) {
          const int64_t d = lane + u * WARP;
          if (d < P.Dv) acc[u] += pt * vt[d];
        }
      }
      run_max = new_max;
    }
  }
  const float inv = run_sum > 0.0f ? 1.0f / run_sum : 0.0f;
  for (int u = 0; u < MAX_DV_PER_LANE; ++u) {
    const int64_t d = lane + u * WARP;
    if (d < P.Dv) out[(bh * P.Nq + i) * P.Dv + d] = acc[u] * inv;
  }
}

// Device scratch from cudaMallocAsync on the stream, freed on it at scope exit.
struct Scratch {
  cudaStream_t stream;
  std::vector<void*> blocks;
  cudaError_t error = cudaSuccess;
  template <typename T>
  T* get(int64_t n) {
    void* p = nullptr;
    if (n <= 0) return nullptr;
    const cudaError_t e = cudaMallocAsync(&p, n * sizeof(T), stream);
    if (e == cudaSuccess) blocks.push_back(p); else error = e;
    return static_cast<T*>(p);
  }
  ~Scratch() {
    for (void* p : blocks) cudaFreeAsync(p, stream);
  }
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::string attention_cuda(const Problem& pr, const int64_t mask_shape[4], const float* q, const float* k,
                           const float* v, float* out, void* stream_ptr) {
  if (pr.Dv > WARP * MAX_DV_PER_LANE)
    return "NYI: Dv=" + std::to_string(pr.Dv) + " > " + std::to_string(WARP * MAX_DV_PER_LANE);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  Scratch sc{stream};
  Dev P{};
  P.B = pr.B, P.Hq = pr.Hq, P.Hkv = pr.Hkv, P.Nq = pr.Nq, P.Nk = pr.Nk, P.D = pr.D, P.Dv = pr.Dv;
  P.rep = pr.Hq / pr.Hkv, P.r = std::min(pr.p.num_probe, pr.Nq), P.m = pr.p.group_size, P.w = pr.p.window;
  P.mask = pr.mask;
  for (int d = 0; d < 4; ++d) P.ms[d] = pr.mask_stride[d];
  P.causal = pr.p.is_causal, P.dga = pr.dga_applies(), P.scale = pr.scale();
  P.group_logit = pr.p.group_bias * logf(static_cast<float>(P.m));
  P.window = pr.p.is_causal;
  if (!P.window && pr.mask != nullptr && mask_shape[2] != 1 && P.dga) {
    int* found = sc.get<int>(1);
    cudaMemsetAsync(found, 0, sizeof(int), stream);
    future_visible_kernel<<<1024, THREADS, 0, stream>>>(P, mask_shape[0], mask_shape[1], mask_shape[2], mask_shape[3], found);
    int host = 0;
    cudaMemcpyAsync(&host, found, sizeof(int), cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
    P.window = host == 0;
  }
  int *focus = nullptr, *nonfocus = nullptr;
  float *kbar = nullptr, *vbar = nullptr;
  unsigned char* complete = nullptr;
  if (P.dga) {
    P.n_f = pr.num_focus(), P.Nn = pr.Nk - P.n_f, P.G = P.Nn / P.m;
    float* score = sc.get<float>(P.B * P.Hkv * P.Nk);
    unsigned char* is_focus = sc.get<unsigned char>(P.B * P.Hkv * P.Nk);
    focus = sc.get<int>(P.B * P.Hkv * P.n_f);
    nonfocus = sc.get<int>(P.B * P.Hkv * P.Nn);
    kbar = sc.get<float>(P.B * P.Hq * P.G * P.D);
    vbar = sc.get<float>(P.B * P.Hq * P.G * P.Dv);
    if (sc.error != cudaSuccess) return std::string("device scratch: ") + cudaGetErrorString(sc.error);
    cudaMemsetAsync(score, 0, P.B * P.Hkv * P.Nk * sizeof(float), stream);
    scores_kernel<<<dim3(P.rep * P.r, P.B * P.Hkv), THREADS, 0, stream>>>(P, q, k, score);
    rank_kernel<<<dim3(cdiv(P.Nk, THREADS), P.B * P.Hkv), THREADS, 0, stream>>>(P, score, is_focus);
    compact_kernel<<<P.B * P.Hkv, THREADS, 0, stream>>>(P, is_focus, focus, nonfocus);
    if (P.G > 0)
      aggregate_kernel<<<dim3(P.G, P.B * P.Hq), WARP, P.m * sizeof(float), stream>>>(P, q, k, v, nonfocus, kbar, vbar);
    if (pr.mask != nullptr && P.G > 0) {
      complete = sc.get<unsigned char>(P.B * P.Hq * P.Nq * P.G);
      if (sc.error != cudaSuccess) return std::string("device scratch: ") + cudaGetErrorString(sc.error);
      complete_kernel<<<4096, THREADS, 0, stream>>>(P, nonfocus, complete);
    }
  }
  attend_kernel<<<dim3(cdiv(P.Nq, ROWS_PER_BLOCK), P.B * P.Hq), ROWS_PER_BLOCK * WARP,
                  ROWS_PER_BLOCK * P.D * sizeof(float), stream>>>(P, q, k, v, focus, nonfocus, kbar, vbar,
                                                                  complete, out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace dga
