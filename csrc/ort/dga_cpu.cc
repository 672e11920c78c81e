// CPU DGA: steps 1-3 per (b, kv head), step 4 per (b, query head), step 5 per (b, query head,
// block of BLOCK query rows) over the block's candidate keys: the visible focus prefix, the
// complete-group prefix and the raw non-focus tokens some row of the block needs. Each block is
// two small GEMMs (S = Q·Kcᵀ, O = P·Vc) with a 6×16 register tile and an exact row softmax.
#include "dga_cpu.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace dga {
namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int64_t BLOCK = 64;  // query rows per work item
constexpr int64_t TILE_M = 6, TILE_N = 16;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
v8 load8(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// C[M×N] = A[M×K]·B[K×N], row-major with leading dims; M % TILE_M == 0, N % TILE_N == 0.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc) {
  for (int64_t j = 0; j < N; j += TILE_N)
    for (int64_t i = 0; i < M; i += TILE_M) {
      v8 acc[TILE_M][2] = {};
      for (int64_t kk = 0; kk < K; ++kk) {
        const v8 b0 = load8(B + kk * ldb + j), b1 = load8(B + kk * ldb + j + 8);
        for (int r = 0; r < TILE_M; ++r) {
          const v8 a = splat(A[(i + r) * lda + kk]);
          acc[r][0] += a * b0;
          acc[r][1] += a * b1;
        }
      }
      for (int r = 0; r < TILE_M; ++r) {
        store8(C + (i + r) * ldc + j, acc[r][0]);
        store8(C + (i + r) * ldc + j + 8, acc[r][1]);
      }
    }
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); exactly 0 below -87, so -inf gives 0.
v8 exp8(v8 x) {
  const v8i dead = x < -87.0f;
  x = dead ? splat(-87.0f) : x;
  const v8 t = x * 1.44269504088896341f + 0.5f;
  v8i n = __builtin_convertvector(t, v8i);
  v8 nf = __builtin_convertvector(n, v8);
  const v8i over = nf > t;
  n -= over & 1;
  nf = __builtin_convertvector(n, v8);
  const v8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v8 pow2;
  const v8i bits = (n + 127) << 23;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return dead ? v8{} : p * pow2;
}

// row[0:n) (n % 8 == 0) <- exp(row - max); returns the sum, 0 when every entry is -inf.
float softmax_numerators(float* row, int64_t n) {
  v8 mx = splat(NEG_INF);
  for (int64_t c = 0; c < n; c += 8) {
    const v8 x = load8(row + c);
    mx = x > mx ? x : mx;
  }
  float m = NEG_INF;
  for (int l = 0; l < 8; ++l) m = std::max(m, mx[l]);
  if (m == NEG_INF) {
    std::fill(row, row + n, 0.0f);
    return 0.0f;
  }
  v8 sum = {};
  for (int64_t c = 0; c < n; c += 8) {
    const v8 e = exp8(load8(row + c) - m);
    store8(row + c, e);
    sum += e;
  }
  float s = 0.0f;
  for (int l = 0; l < 8; ++l) s += sum[l];
  return s;
}

// Steps 1-3 for one (b, kv head): focus and non-focus positions (increasing) and their rows.
struct Selection {
  std::vector<int64_t> focus, nonfocus, anchors;
  std::vector<float> kf, vf, kn, vn;  // [n_f, D], [n_f, Dv], [Nn, D], [Nn, Dv]
};

void gather_rows(const float* x, int64_t width, const std::vector<int64_t>& idx, std::vector<float>& out) {
  out.resize(idx.size() * width);
  for (size_t t = 0; t < idx.size(); ++t) std::memcpy(&out[t * width], x + idx[t] * width, width * sizeof(float));
}

// Step 1: s[j] = Σ_{h∈g} Σ_{p∈P} softmax_j(scale·q[h,p]·k[j] | Visible(p, j)); step 2: top n_f, ties by position.
void select(const Problem& pr, int64_t b, int64_t g, const float* q, const float* k, const float* v, Selection& sel) {
  const int64_t D = pr.D, Dv = pr.Dv, Nk = pr.Nk, rep = pr.Hq / pr.Hkv;
  const int64_t r = std::min(pr.p.num_probe, pr.Nq), rows = rep * r;
  const int64_t rows_pad = round_up(rows, TILE_M), nk_pad = round_up(Nk, TILE_N);
  const float* kb = k + (b * pr.Hkv + g) * Nk * D;
  std::vector<float> probes(rows_pad * D, 0.0f), kt(D * nk_pad, 0.0f), logits(rows_pad * nk_pad);
  for (int64_t hh = 0; hh < rep; ++hh)
    std::memcpy(&probes[hh * r * D], q + ((b * pr.Hq + g * rep + hh) * pr.Nq + pr.Nq - r) * D, r * D * sizeof(float));
  for (int64_t j = 0; j < Nk; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * nk_pad + j] = kb[j * D + d];
  gemm(rows_pad, nk_pad, D, probes.data(), D, kt.data(), nk_pad, logits.data(), nk_pad);
  std::vector<float> score(Nk, 0.0f);
  const float scale = pr.scale();
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t h = g * rep + row / r, i = pr.Nq - r + row % r;
    const bool* mrow = pr.mask ? pr.mask_row(b, h, i) : nullptr;
    float* lg = &logits[row * nk_pad];
    for (int64_t j = 0; j < nk_pad; ++j) lg[j] = j < Nk && pr.visible(mrow, i, j) ? scale * lg[j] : NEG_INF;
    const float sum = softmax_numerators(lg, nk_pad);
    if (sum > 0.0f)
      for (int64_t j = 0; j < Nk; ++j) score[j] += lg[j] / sum;
  }
  const int64_t n_f = pr.num_focus();
  std::vector<int64_t> order(Nk);
  std::iota(order.begin(), order.end(), 0);
  auto before = [&](int64_t a, int64_t c) { return score[a] > score[c] || (score[a] == score[c] && a < c); };
  std::nth_element(order.begin(), order.begin() + n_f, order.end(), before);
  std::vector<char> is_focus(Nk, 0);
  for (int64_t t = 0; t < n_f; ++t) is_focus[order[t]] = 1;
  sel.focus.clear();
  sel.nonfocus.clear();
  for (int64_t j = 0; j < Nk; ++j) (is_focus[j] ? sel.focus : sel.nonfocus).push_back(j);
  const int64_t m = pr.p.group_size, G = static_cast<int64_t>(sel.nonfocus.size()) / m;
  sel.anchors.resize(G);
  for (int64_t gi = 0; gi < G; ++gi) sel.anchors[gi] = sel.nonfocus[gi * m + m - 1];
  const float* vb = v + (b * pr.Hkv + g) * Nk * Dv;
  gather_rows(kb, D, sel.focus, sel.kf);
  gather_rows(vb, Dv, sel.focus, sel.vf);
  gather_rows(kb, D, sel.nonfocus, sel.kn);
  gather_rows(vb, Dv, sel.nonfocus, sel.vn);
}

// Step 4 for one query head: w = softmax_{j∈g}(scale·q[a(g)]·k[j]); K̄ = Σ w·k[j], V̄ = Σ w·v[j].
void aggregate(const Problem& pr, const float* qh, const Selection& sel, std::vector<float>& kbar, std::vector<float>& vbar) {
  const int64_t D = pr.D, Dv = pr.Dv, m = pr.p.group_size, G = static_cast<int64_t>(sel.anchors.size());
  const float scale = pr.scale();
  kbar.assign(G * D, 0.0f);
  vbar.assign(G * Dv, 0.0f);
  std::vector<float> w(m);
  for (int64_t gi = 0; gi < G; ++gi) {
    const float* qa = qh + sel.anchors[gi] * D;
    float mx = NEG_INF;
    for (int64_t t = 0; t < m; ++t) {
      const float* kr = &sel.kn[(gi * m + t) * D];
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qa[d] * kr[d];
      w[t] = scale * dot;
      mx = std::max(mx, w[t]);
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < m; ++t) sum += (w[t] = std::exp(w[t] - mx));
    for (int64_t t = 0; t < m; ++t) {
      const float wt = w[t] / sum;
      for (int64_t d = 0; d < D; ++d) kbar[gi * D + d] += wt * sel.kn[(gi * m + t) * D + d];
      for (int64_t d = 0; d < Dv; ++d) vbar[gi * Dv + d] += wt * sel.vn[(gi * m + t) * Dv + d];
    }
  }
}

// The keys one query block may use: rows of k/v with an additive bias, and per (row, key) permission.
struct Candidates {
  std::vector<const float*> krow, vrow;
  std::vector<float> bias;
  std::vector<char> ok;  // [BLOCK, L]
  void clear() { krow.clear(); vrow.clear(); bias.clear(); }
  void add(const float* kr, const float* vr, float b) { krow.push_back(kr); vrow.push_back(vr); bias.push_back(b); }
  int64_t size() const { return static_cast<int64_t>(krow.size()); }
};

// Scratch reused by the work items one thread runs.
struct Scratch {
  Candidates cand;
  std::vector<float> qb, kt, vc, s, o;
  std::vector<char> complete, need;
  std::vector<int64_t> raw;
  std::vector<char> mask_all;
  const bool* mask_all_row = nullptr;
};

// Dense attention rows [i0, i1) of head (b, h): every key j visible to some row is a candidate.
void candidates_dense(const Problem& pr, int64_t b, int64_t h, int64_t i0, int64_t i1, const float* kh,
                      const float* vh, Candidates& c) {
  const int64_t jmax = pr.p.is_causal ? std::min(i1, pr.Nk) : pr.Nk;
  c.clear();
  for (int64_t j = 0; j < jmax; ++j) c.add(kh + j * pr.D, vh + j * pr.Dv, 0.0f);
  c.ok.assign((i1 - i0) * jmax, 0);
  for (int64_t i = i0; i < i1; ++i) {
    const bool* mrow = pr.mask ? pr.mask_row(b, h, i) : nullptr;
    for (int64_t j = 0; j < jmax; ++j) c.ok[(i - i0) * jmax + j] = pr.visible(mrow, i, j);
  }
}

int64_t count_le(const std::vector<int64_t>& sorted, int64_t x) {
  return std::upper_bound(sorted.begin(), sorted.end(), x) - sorted.begin();
}

// The block's candidate rows: the focus prefix, the group prefix, then the raw tokens sc.raw.
void emit_candidates(const Problem& pr, const Selection& sel, const std::vector<float>& kbar,
                     const std::vector<float>& vbar, int64_t focus_len, int64_t n_group, int64_t rows, Scratch& sc) {
  const int64_t D = pr.D, Dv = pr.Dv;
  const float group_logit = pr.p.group_bias * std::log(static_cast<float>(pr.p.group_size));
  Candidates& c = sc.cand;
  c.clear();
  for (int64_t t = 0; t < focus_len; ++t) c.add(&sel.kf[t * D], &sel.vf[t * Dv], 0.0f);
  for (int64_t gi = 0; gi < n_group; ++gi) c.add(&kbar[gi * D], &vbar[gi * Dv], group_logit);
  for (int64_t t : sc.raw) c.add(&sel.kn[t * D], &sel.vn[t * Dv], 0.0f);
  c.ok.assign(rows * c.size(), 0);
}

// DGA step 5 candidates without a mask: per row, each kind of candidate is an interval (docs/dga.md,
// "Cost"): causal rows see the focus prefix <= i, the groups with a(g) <= i - w, and the raw
// tokens after those groups up to i; non-causal rows see every focus token, every group, the tail.
void candidates_unmasked(const Problem& pr, bool window, int64_t i0, int64_t i1, const Selection& sel,
                         const std::vector<float>& kbar, const std::vector<float>& vbar, Scratch& sc) {
  const int64_t m = pr.p.group_size, w = pr.p.window, rows = i1 - i0;
  const int64_t Nn = static_cast<int64_t>(sel.nonfocus.size()), G = static_cast<int64_t>(sel.anchors.size());
  const int64_t focus_len = window ? count_le(sel.focus, i1 - 1) : static_cast<int64_t>(sel.focus.size());
  const int64_t n_group = window ? count_le(sel.anchors, i1 - 1 - w) : G;
  const int64_t raw_start = window ? count_le(sel.anchors, i0 - w) * m : G * m;
  const int64_t raw_stop = window ? count_le(sel.nonfocus, i1 - 1) : Nn;
  sc.raw.resize(std::max<int64_t>(raw_stop - raw_start, 0));
  std::iota(sc.raw.begin(), sc.raw.end(), raw_start);
  emit_candidates(pr, sel, kbar, vbar, focus_len, n_group, rows, sc);
  const int64_t L = sc.cand.size(), n_raw = static_cast<int64_t>(sc.raw.size());
  for (int64_t i = i0; i < i1; ++i) {
    char* ok = &sc.cand.ok[(i - i0) * L];
    const int64_t f = window ? count_le(sel.focus, i) : focus_len;
    const int64_t g = window ? count_le(sel.anchors, i - w) : n_group;
    const int64_t r0 = std::min(std::max(g * m - raw_start, int64_t(0)), n_raw);
    const int64_t r1 = window ? count_le(sel.nonfocus, i) - raw_start : n_raw;
    std::memset(ok, 1, f);
    std::memset(ok + focus_len, 1, g);
    if (r1 > r0) std::memset(ok + focus_len + n_group + r0, 1, r1 - r0);
  }
}

// DGA step 5 candidates with a mask: completeness and raw needs are read off the mask rows.
void candidates_masked(const Problem& pr, bool window, int64_t b, int64_t h, int64_t i0, int64_t i1,
                       const Selection& sel, const std::vector<float>& kbar, const std::vector<float>& vbar, Scratch& sc) {
  const int64_t m = pr.p.group_size, w = pr.p.window, rows = i1 - i0;
  const int64_t n_f = static_cast<int64_t>(sel.focus.size()), Nn = static_cast<int64_t>(sel.nonfocus.size());
  const int64_t G = static_cast<int64_t>(sel.anchors.size());
  // A group is complete for row i: every member visible under the mask, and (window) a(g) <= i - w,
  // which under causality also makes every member <= i. Rows sharing a mask row share mask_all.
  sc.complete.assign(rows * G, 0);
  int64_t n_group = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const bool* mrow = pr.mask_row(b, h, i);
    if (mrow != sc.mask_all_row || sc.mask_all.size() != static_cast<size_t>(G)) {
      sc.mask_all.assign(G, 1);
      for (int64_t t = 0; t < G * m; ++t)
        if (!mrow[sel.nonfocus[t] * pr.mask_stride[3]]) sc.mask_all[t / m] = 0;
      sc.mask_all_row = mrow;
    }
    for (int64_t gi = 0; gi < G; ++gi) {
      const bool done = sc.mask_all[gi] && (!window || sel.anchors[gi] <= i - w);
      sc.complete[(i - i0) * G + gi] = done;
      if (done) n_group = std::max(n_group, gi + 1);
    }
  }
  // Raw tokens: visible non-focus tokens outside every group complete for the row.
  auto raw_ok = [&](const bool* mrow, int64_t i, int64_t t) {
    return pr.visible(mrow, i, sel.nonfocus[t]) && !(t < G * m && sc.complete[(i - i0) * G + t / m]);
  };
  sc.need.assign(Nn, 0);
  for (int64_t i = i0; i < i1; ++i) {
    const bool* mrow = pr.mask_row(b, h, i);
    int64_t first = 0;  // groups before the first incomplete one hold no raw token of this row
    while (first < G && sc.complete[(i - i0) * G + first]) ++first;
    for (int64_t t = first * m; t < Nn; ++t) {
      if (window && sel.nonfocus[t] > i) break;  // the future is hidden: positions only grow
      if (t < G * m && sc.complete[(i - i0) * G + t / m]) {
        t += m - 1 - t % m;  // skip the rest of a complete group
        continue;
      }
      if (pr.visible(mrow, i, sel.nonfocus[t])) sc.need[t] = 1;
    }
  }
  sc.raw.clear();
  for (int64_t t = 0; t < Nn; ++t)
    if (sc.need[t]) sc.raw.push_back(t);
  const int64_t focus_len = window ? count_le(sel.focus, i1 - 1) : n_f;
  emit_candidates(pr, sel, kbar, vbar, focus_len, n_group, rows, sc);
  const int64_t L = sc.cand.size();
  for (int64_t i = i0; i < i1; ++i) {
    const bool* mrow = pr.mask_row(b, h, i);
    char* ok = &sc.cand.ok[(i - i0) * L];
    for (int64_t t = 0; t < focus_len; ++t) ok[t] = pr.visible(mrow, i, sel.focus[t]);
    for (int64_t gi = 0; gi < n_group; ++gi) ok[focus_len + gi] = sc.complete[(i - i0) * G + gi];
    for (size_t u = 0; u < sc.raw.size(); ++u) ok[focus_len + n_group + u] = raw_ok(mrow, i, sc.raw[u]);
  }
}

// out rows [i0, i1) of one head = softmax(scale·Q·Kcᵀ + bias | ok)·Vc over the candidates.
void attend(const Problem& pr, const float* qh, int64_t i0, int64_t i1, Scratch& sc, float* outh) {
  const Candidates& c = sc.cand;
  const int64_t D = pr.D, Dv = pr.Dv, rows = i1 - i0, L = c.size();
  const int64_t rows_pad = round_up(rows, TILE_M), l_pad = round_up(std::max<int64_t>(L, 1), TILE_N);
  const int64_t dv_pad = round_up(Dv, TILE_N);
  sc.qb.assign(rows_pad * D, 0.0f);
  std::memcpy(sc.qb.data(), qh + i0 * D, rows * D * sizeof(float));
  sc.kt.assign(D * l_pad, 0.0f);
  sc.vc.assign(l_pad * dv_pad, 0.0f);
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t d = 0; d < D; ++d) sc.kt[d * l_pad + t] = c.krow[t][d];
    std::memcpy(&sc.vc[t * dv_pad], c.vrow[t], Dv * sizeof(float));
  }
  sc.s.resize(rows_pad * l_pad);
  gemm(rows_pad, l_pad, D, sc.qb.data(), D, sc.kt.data(), l_pad, sc.s.data(), l_pad);
  const float scale = pr.scale();
  std::vector<float> sums(rows_pad, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = &sc.s[r * l_pad];
    const char* ok = &c.ok[r * L];
    for (int64_t t = 0; t < l_pad; ++t) srow[t] = t < L && ok[t] ? scale * srow[t] + c.bias[t] : NEG_INF;
    sums[r] = softmax_numerators(srow, l_pad);
  }
  for (int64_t r = rows; r < rows_pad; ++r) std::fill(&sc.s[r * l_pad], &sc.s[(r + 1) * l_pad], 0.0f);
  sc.o.resize(rows_pad * dv_pad);
  gemm(rows_pad, dv_pad, l_pad, sc.s.data(), l_pad, sc.vc.data(), dv_pad, sc.o.data(), dv_pad);
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f;
    for (int64_t d = 0; d < Dv; ++d) outh[(i0 + r) * Dv + d] = sc.o[r * dv_pad + d] * inv;
  }
}

}  // namespace

bool window_applies_cpu(const Problem& pr, const int64_t mask_shape[4]) {
  if (pr.p.is_causal) return true;
  if (pr.mask == nullptr || mask_shape[2] == 1) return false;
  const int64_t* s = pr.mask_stride;
  for (int64_t b = 0; b < mask_shape[0]; ++b)
    for (int64_t h = 0; h < mask_shape[1]; ++h)
      for (int64_t i = 0; i < mask_shape[2]; ++i)
        for (int64_t j = i + 1; j < mask_shape[3]; ++j)
          if (pr.mask[b * s[0] + h * s[1] + i * s[2] + j * s[3]]) return false;
  return true;
}

void attention_cpu(const Problem& pr, bool window, const float* q, const float* k, const float* v,
                   float* out, const ParallelFor& parallel_for) {
  const int64_t rep = pr.Hq / pr.Hkv, n_blocks = (pr.Nq + BLOCK - 1) / BLOCK;
  const bool dga = pr.dga_applies();
  std::vector<Selection> sel(dga ? pr.B * pr.Hkv : 0);
  std::vector<std::vector<float>> kbar(dga ? pr.B * pr.Hq : 0), vbar(kbar.size());
  if (dga) {
    parallel_for(sel.size(), [&](size_t bg) { select(pr, bg / pr.Hkv, bg % pr.Hkv, q, k, v, sel[bg]); });
    parallel_for(kbar.size(), [&](size_t bh) {
      aggregate(pr, q + bh * pr.Nq * pr.D, sel[bh / pr.Hq * pr.Hkv + bh % pr.Hq / rep], kbar[bh], vbar[bh]);
    });
  }
  parallel_for(pr.B * pr.Hq * n_blocks, [&](size_t item) {
    thread_local Scratch sc;
    sc.mask_all_row = nullptr;
    sc.mask_all.clear();
    const int64_t bh = item / n_blocks, b = bh / pr.Hq, h = bh % pr.Hq, g = h / rep;
    const int64_t i0 = item % n_blocks * BLOCK, i1 = std::min(i0 + BLOCK, pr.Nq);
    const float* qh = q + bh * pr.Nq * pr.D;
    if (dga && pr.mask == nullptr)
      candidates_unmasked(pr, window, i0, i1, sel[b * pr.Hkv + g], kbar[bh], vbar[bh], sc);
    else if (dga)
      candidates_masked(pr, window, b, h, i0, i1, sel[b * pr.Hkv + g], kbar[bh], vbar[bh], sc);
    else
      candidates_dense(pr, b, h, i0, i1, k + (b * pr.Hkv + g) * pr.Nk * pr.D, v + (b * pr.Hkv + g) * pr.Nk * pr.Dv, sc.cand);
    attend(pr, qh, i0, i1, sc, out + bh * pr.Nq * pr.Dv);
  });
}

}  // namespace dga
