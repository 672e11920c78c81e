// CPU decode attention over a DGA cache: per (batch row, kv head, run of slots) one work item
// computes, for the Hq/Hkv·Nq query rows that read the kv head, an online softmax over its slots
// (max, sum, unnormalised output); a second pass merges the runs by their maxima. Slots with
// λ = -inf (pending blocks, padding, focus positions in the recent run) cost one compare.
#include "dga_decode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace dga {
namespace {

#ifdef __AVX512F__
constexpr int64_t VW = 16;
#else
constexpr int64_t VW = 8;
#endif
typedef float vec __attribute__((vector_size(VW * 4)));

constexpr int64_t TILE = 32;         // slots per online-softmax update
constexpr int64_t MIN_RUN = 256;     // slots per work item, at least
constexpr int64_t TARGET_ITEMS = 32;  // enough work items for the threads of a small batch
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

vec loadv(const float* p) { vec r; std::memcpy(&r, p, sizeof r); return r; }

float dot(const float* a, const float* b, int64_t n) {
  const int64_t full = n / VW * VW;
  vec acc = {};
  for (int64_t d = 0; d < full; d += VW) acc += loadv(a + d) * loadv(b + d);
  float s = 0.0f;
  for (int l = 0; l < VW; ++l) s += acc[l];
  for (int64_t d = full; d < n; ++d) s += a[d] * b[d];
  return s;
}

// y[0:n) = y·scale + a·x (scale = 1: accumulate).
void scale_axpy(float scale, float a, const float* x, float* y, int64_t n) {
  const int64_t full = n / VW * VW;
  const vec sv = vec{} + scale, av = vec{} + a;
  for (int64_t d = 0; d < full; d += VW) {
    const vec r = loadv(y + d) * sv + av * loadv(x + d);
    std::memcpy(y + d, &r, sizeof r);
  }
  for (int64_t d = full; d < n; ++d) y[d] = y[d] * scale + a * x[d];
}

// Online-softmax state of one query row over the slots seen so far; `nan`: a logit was NaN.
struct RowState {
  float max = NEG_INF, sum = 0.0f;
  bool nan = false;
};

// Slots [s0, s1) of `run` for batch row b, kv head g, into the rows' states; qs [rows, D] holds
// the scaled queries. With `causal_from` ≥ 0, slot u is visible to query t iff u ≤ causal_from + t.
void attend_run(const DecodeProblem& pr, const SlotRun& run, int64_t b, int64_t g, int64_t s0, int64_t s1,
                int64_t causal_from, const float* qs, int64_t rows, RowState* st, float* acc) {
  const int64_t D = pr.D, Dv = pr.Dv;
  const float* kb = run.k + b * run.k_stride[0] + g * run.k_stride[1];
  const float* vb = run.v + b * run.v_stride[0] + g * run.v_stride[1];
  const float* lb = run.lam + b * run.lam_stride[0] + g * run.lam_stride[1];
  std::vector<float> s(rows * TILE);
  for (int64_t u0 = s0; u0 < s1; u0 += TILE) {
    const int64_t n = std::min(TILE, s1 - u0);
    bool any = false;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t u = u0 + j;
      const float lam = lb[u * run.lam_stride[2]];
      const float* kr = kb + u * run.k_stride[2];
      for (int64_t r = 0; r < rows; ++r) {
        const bool hidden = lam == NEG_INF || (causal_from >= 0 && u > causal_from + r % pr.Nq);
        s[r * TILE + j] = hidden ? NEG_INF : dot(qs + r * D, kr, D) + lam;
        any |= !hidden;
      }
    }
    if (!any) continue;
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = &s[r * TILE];
      RowState& row = st[r];
      float tile_max = NEG_INF;
      for (int64_t j = 0; j < n; ++j) {
        tile_max = std::max(tile_max, sr[j]);
        row.nan |= std::isnan(sr[j]);
      }
      if (tile_max == NEG_INF) continue;
      float* ar = acc + r * Dv;
      float rescale = 1.0f;
      if (tile_max > row.max) {
        rescale = row.max == NEG_INF ? 0.0f : std::exp(row.max - tile_max);
        row.sum *= rescale;
        row.max = tile_max;
      }
      for (int64_t j = 0; j < n; ++j) {
        if (sr[j] == NEG_INF) continue;
        const float p = std::exp(sr[j] - row.max);
        row.sum += p;
        scale_axpy(rescale, p, vb + (u0 + j) * run.v_stride[2], ar, Dv);
        rescale = 1.0f;  // the first visible slot rescales what came before
      }
    }
  }
}

}  // namespace

void decode_attention_cpu(const DecodeProblem& pr, float* out, const ParallelFor& parallel_for) {
  const int64_t rep = pr.Hq / pr.Hkv, rows = rep * pr.Nq, Dv = pr.Dv, D = pr.D;
  const int64_t P = pr.packed.len, L = P + pr.recent.len, heads = pr.B * pr.Hkv;
  int64_t runs = std::max<int64_t>(1, std::min((TARGET_ITEMS + heads - 1) / heads, (L + MIN_RUN - 1) / MIN_RUN));
  const int64_t run_len = std::max<int64_t>(1, (L + runs - 1) / runs);
  runs = std::max<int64_t>(1, (L + run_len - 1) / run_len);
  std::vector<RowState> states(heads * runs * rows);
  std::vector<float> accs(heads * runs * rows * Dv, 0.0f);
  parallel_for(heads * runs, [&](size_t item) {
    const int64_t bg = item / runs, run = item % runs, b = bg / pr.Hkv, g = bg % pr.Hkv;
    std::vector<float> qs(rows * D);
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = pr.q + b * pr.q_stride[0] + (g * rep + r / pr.Nq) * pr.q_stride[1] + r % pr.Nq * pr.q_stride[2];
      for (int64_t d = 0; d < D; ++d) qs[r * D + d] = pr.scale * qr[d];
    }
    RowState* st = &states[item * rows];
    float* acc = &accs[item * rows * Dv];
    const int64_t u0 = run * run_len, u1 = std::min(L, u0 + run_len);
    if (u0 < P) attend_run(pr, pr.packed, b, g, u0, std::min(u1, P), -1, qs.data(), rows, st, acc);
    if (u1 > P)
      attend_run(pr, pr.recent, b, g, std::max(u0, P) - P, u1 - P, pr.recent.len - pr.Nq, qs.data(), rows, st, acc);
  });
  parallel_for(heads, [&](size_t bg) {
    const int64_t b = bg / pr.Hkv, g = bg % pr.Hkv;
    for (int64_t r = 0; r < rows; ++r) {
      float top = NEG_INF;
      bool nan = false;
      for (int64_t run = 0; run < runs; ++run) {
        top = std::max(top, states[(bg * runs + run) * rows + r].max);
        nan |= states[(bg * runs + run) * rows + r].nan;
      }
      float* o = out + ((b * pr.Hq + g * rep + r / pr.Nq) * pr.Nq + r % pr.Nq) * Dv;
      std::fill(o, o + Dv, nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
      if (top == NEG_INF || nan) continue;  // no slot: 0, as the reference; a NaN logit: NaN, as SDPA
      float sum = 0.0f;
      for (int64_t run = 0; run < runs; ++run) {
        const RowState& s = states[(bg * runs + run) * rows + r];
        if (s.max == NEG_INF) continue;
        const float w = std::exp(s.max - top);
        sum += w * s.sum;
        scale_axpy(1.0f, w, &accs[((bg * runs + run) * rows + r) * Dv], o, Dv);
      }
      for (int64_t d = 0; d < Dv; ++d) o[d] /= sum;
    }
  });
}

}  // namespace dga
