// CPU DGA: steps 1-3 per (b, kv head), step 4 per (b, query head), steps 5′ and 5 per (b, query
// head, block of query rows) over the block's candidate keys in segments: the visible focus prefix,
// the complete-group prefix, the raw non-focus tokens some row of the block needs and (step 5′) the
// members of the block's expanded groups. Keys and values sit in panels built once per head (keys
// transposed, zero-padded), so a block copies nothing but its queries and its expanded members:
// S = Q·Kᵀ and O = P·V are register-tiled GEMMs per segment, with an exact row softmax over the
// segments in between. Step 5′'s estimate reuses the block's S (its group columns with βe·log m).
#include "dga_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace dga {
namespace {

// Vectors of VW floats; the GEMM register tile is TILE_M rows × 2 vectors (8×32 with AVX-512, 6×16 with AVX2).
#ifdef __AVX512F__
constexpr int64_t VW = 16, TILE_M = 8;
#else
constexpr int64_t VW = 8, TILE_M = 6;
#endif
typedef float vec __attribute__((vector_size(VW * 4)));
typedef int32_t veci __attribute__((vector_size(VW * 4)));
constexpr int64_t TILE_N = 2 * VW;

constexpr int64_t BLOCK = 64;  // query rows per work item (step 5′: DGAConfig.query_block)
constexpr int64_t PROBE_ROWS = 16 * TILE_M;  // probe rows scored per GEMM
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
vec loadv(const float* p) { vec r; std::memcpy(&r, p, sizeof r); return r; }
void storev(float* p, vec x) { std::memcpy(p, &x, sizeof x); }

// C[M×N] (+)= A[M×K]·B[K×N], row-major with leading dims; M % TILE_M == 0, N % TILE_N == 0.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate = false) {
  for (int64_t j = 0; j < N; j += TILE_N)
    for (int64_t i = 0; i < M; i += TILE_M) {
      vec acc[TILE_M][2] = {};
      for (int64_t kk = 0; kk < K; ++kk) {
        const vec b0 = loadv(B + kk * ldb + j), b1 = loadv(B + kk * ldb + j + VW);
        for (int r = 0; r < TILE_M; ++r) {
          const vec a = vec{} + A[(i + r) * lda + kk];
          acc[r][0] += a * b0;
          acc[r][1] += a * b1;
        }
      }
      for (int r = 0; r < TILE_M; ++r) {
        float* c = C + (i + r) * ldc + j;
        if (accumulate) acc[r][0] += loadv(c), acc[r][1] += loadv(c + VW);
        storev(c, acc[r][0]);
        storev(c + VW, acc[r][1]);
      }
    }
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); exactly 0 below -87, so -inf gives 0.
vec exp_v(vec x) {
  const veci dead = x < -87.0f;
  x = dead ? (vec{} + -87.0f) : x;
  const vec t = x * 1.44269504088896341f + 0.5f;
  veci n = __builtin_convertvector(t, veci);
  vec nf = __builtin_convertvector(n, vec);
  const veci over = nf > t;
  n -= over & 1;
  nf = __builtin_convertvector(n, vec);
  const vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  vec p = (vec{} + 1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vec pow2;
  const veci bits = (n + 127) << 23;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return dead ? vec{} : p * pow2;
}

// row[0:n) (n % VW == 0) <- exp(row - max); returns the sum: 0 when every entry is -inf (no
// candidate), NaN when an entry is NaN or +inf (a non-finite input, never hidden: docs/dga.md).
float softmax_numerators(float* row, int64_t n) {
  vec mx = (vec{} + NEG_INF);
  for (int64_t c = 0; c < n; c += VW) {
    const vec x = loadv(row + c);
    mx = x > mx ? x : mx;  // NaN entries lose every comparison: they reappear through exp below
  }
  float m = NEG_INF;
  for (int l = 0; l < VW; ++l) m = std::max(m, mx[l]);
  if (m == NEG_INF) {
    const bool nan = std::any_of(row, row + n, [](float x) { return std::isnan(x); });
    std::fill(row, row + n, nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
    return nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
  }
  vec sum = {};
  for (int64_t c = 0; c < n; c += VW) {
    const vec e = exp_v(loadv(row + c) - m);
    storev(row + c, e);
    sum += e;
  }
  float s = 0.0f;
  for (int l = 0; l < VW; ++l) s += sum[l];
  return s;
}

int64_t pad_n(int64_t n) { return round_up(n, TILE_N); }

// Rows of k and v gathered for step 5: keys transposed (kt [D, cols]) and values [cols, dv_pad],
// cols = rows + TILE_N, zero beyond the rows and beyond Dv, so a GEMM may read a padded tile of
// any run of rows starting inside the panel.
struct Panel {
  std::vector<float> kt, v;
  int64_t cols = 0;
  // Row t of the panel is key_row(t) [D] / value_row(t) [Dv].
  template <typename K, typename V>
  void assign(int64_t rows, int64_t D, int64_t Dv, const K& key_row, const V& value_row) {
    const int64_t dv_pad = pad_n(Dv);
    cols = rows + TILE_N;
    kt.assign(D * cols, 0.0f);
    v.assign(cols * dv_pad, 0.0f);
    for (int64_t t = 0; t < rows; ++t) {
      const float* kr = key_row(t);
      for (int64_t d = 0; d < D; ++d) kt[d * cols + t] = kr[d];
      std::memcpy(&v[t * dv_pad], value_row(t), Dv * sizeof(float));
    }
  }
};

// Steps 1-3 for one (b, kv head): focus and non-focus positions (increasing) and their panels.
struct Selection {
  std::vector<int64_t> focus, nonfocus, anchors;
  std::vector<int32_t> group_of;  // [Nk]: group index of a grouped position, else -1
  Panel f, n;                     // focus rows, non-focus rows (in non-focus order)
};

void build_panels(const Problem& pr, const float* kb, const float* vb, Selection& sel) {
  auto panel = [&](Panel& p, const std::vector<int64_t>& pos) {
    p.assign(static_cast<int64_t>(pos.size()), pr.D, pr.Dv, [&](int64_t t) { return kb + pos[t] * pr.D; },
             [&](int64_t t) { return vb + pos[t] * pr.Dv; });
  };
  panel(sel.f, sel.focus);
  panel(sel.n, sel.nonfocus);
}

// Step 1: s[j] = Σ_{h∈g} Σ_{p∈P} softmax_j(scale·q[h,p]·k[j] | Visible(p, j)) into score [Nk].
void score_keys(const Problem& pr, int64_t b, int64_t g, const float* q, const float* kb, std::vector<float>& score) {
  const int64_t D = pr.D, Nk = pr.Nk, rep = pr.Hq / pr.Hkv;
  const int64_t r = std::min(pr.p.num_probe, pr.Nq), rows = rep * r, nk_pad = pad_n(Nk);
  std::vector<float> kt(D * nk_pad, 0.0f), probes(PROBE_ROWS * D), logits(PROBE_ROWS * nk_pad);
  for (int64_t j = 0; j < Nk; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * nk_pad + j] = kb[j * D + d];
  const float scale = pr.scale();
  for (int64_t row0 = 0; row0 < rows; row0 += PROBE_ROWS) {  // probe rows (h, p) in chunks
    const int64_t n_rows = std::min(PROBE_ROWS, rows - row0);
    std::fill(probes.begin(), probes.end(), 0.0f);
    for (int64_t row = row0; row < row0 + n_rows; ++row)
      std::memcpy(&probes[(row - row0) * D], q + ((b * pr.Hq + g * rep + row / r) * pr.Nq + pr.Nq - r + row % r) * D,
                  D * sizeof(float));
    gemm(round_up(n_rows, TILE_M), nk_pad, D, probes.data(), D, kt.data(), nk_pad, logits.data(), nk_pad);
    for (int64_t row = row0; row < row0 + n_rows; ++row) {
      const int64_t h = g * rep + row / r, i = pr.Nq - r + row % r;
      const bool* mrow = pr.mask ? pr.mask_row(b, h, i) : nullptr;
      float* lg = &logits[(row - row0) * nk_pad];
      for (int64_t j = 0; j < nk_pad; ++j) lg[j] = j < Nk && pr.visible(mrow, i, j) ? scale * lg[j] : NEG_INF;
      const float sum = softmax_numerators(lg, nk_pad);
      if (sum > 0.0f)
        for (int64_t j = 0; j < Nk; ++j) score[j] += lg[j] / sum;
    }
  }
}

// Steps 1-3: the sinks, then the top ceil(γ·Nk) others by score (ties by position; no scoring when
// none is chosen by score), the non-focus order cut into groups, and the panels.
void select(const Problem& pr, int64_t b, int64_t g, const float* q, const float* k, const float* v, Selection& sel) {
  const int64_t Nk = pr.Nk;
  const float* kb = k + (b * pr.Hkv + g) * Nk * pr.D;
  std::vector<float> score(Nk, 0.0f);
  if (pr.num_scored() > 0) score_keys(pr, b, g, q, kb, score);
  std::fill(score.begin(), score.begin() + std::min(pr.p.sinks, Nk), std::numeric_limits<float>::infinity());
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
  sel.group_of.assign(Nk, -1);
  for (int64_t gi = 0; gi < G; ++gi) {
    sel.anchors[gi] = sel.nonfocus[gi * m + m - 1];
    for (int64_t t = gi * m; t < gi * m + m; ++t) sel.group_of[sel.nonfocus[t]] = static_cast<int32_t>(gi);
  }
  build_panels(pr, kb, v + (b * pr.Hkv + g) * Nk * pr.Dv, sel);
}

// Exact attention as one "selection": every key is a raw non-focus token, no focus, no group.
void select_all(const Problem& pr, int64_t b, int64_t g, const float* k, const float* v, Selection& sel) {
  sel.focus.clear();
  sel.anchors.clear();
  sel.nonfocus.resize(pr.Nk);
  std::iota(sel.nonfocus.begin(), sel.nonfocus.end(), 0);
  build_panels(pr, k + (b * pr.Hkv + g) * pr.Nk * pr.D, v + (b * pr.Hkv + g) * pr.Nk * pr.Dv, sel);
}

// Step 4 for one query head: w = softmax_{j∈g}(scale·q[a(g)]·k[j]); K̄ = Σ w·k[j], V̄ = Σ w·v[j] (a panel).
void aggregate(const Problem& pr, const float* qh, const float* kb, const float* vb, const Selection& sel,
               Panel& groups) {
  const int64_t D = pr.D, Dv = pr.Dv, m = pr.p.group_size, G = static_cast<int64_t>(sel.anchors.size());
  const float scale = pr.scale();
  std::vector<float> kbar(G * D, 0.0f), vbar(G * Dv, 0.0f), w(G > 0 ? m : 0);  // G > 0 implies m <= Nk
  for (int64_t gi = 0; gi < G; ++gi) {
    const float* qa = qh + sel.anchors[gi] * D;
    const int64_t* members = &sel.nonfocus[gi * m];
    float mx = NEG_INF;
    for (int64_t t = 0; t < m; ++t) {
      const float* kr = kb + members[t] * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qa[d] * kr[d];
      w[t] = scale * dot;
      mx = std::max(mx, w[t]);
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < m; ++t) sum += (w[t] = std::exp(w[t] - mx));
    for (int64_t t = 0; t < m; ++t) {
      const float wt = w[t] / sum, *kr = kb + members[t] * D, *vr = vb + members[t] * Dv;
      for (int64_t d = 0; d < D; ++d) kbar[gi * D + d] += wt * kr[d];
      for (int64_t d = 0; d < Dv; ++d) vbar[gi * Dv + d] += wt * vr[d];
    }
  }
  groups.assign(G, D, Dv, [&](int64_t t) { return &kbar[t * D]; }, [&](int64_t t) { return &vbar[t * Dv]; });
}

// One run of candidate keys: `count` consecutive rows of a panel from row `first`, with an additive bias.
struct Segment {
  const Panel* panel = nullptr;
  int64_t first = 0, count = 0;
  float bias = 0.0f;
};

// The segments of a block's candidates, in the order they sit in S.
enum { FOCUS, GROUPS, RAW, EXPANDED, SEGMENTS };

// Scratch reused by the work items one thread runs. The block's candidates are the segments
// focus, groups, raw and expanded (step 5′), laid side by side in S with each padded to TILE_N
// columns; ok[row, column] says whether the row may use that candidate (0 on padding).
struct Scratch {
  Segment seg[SEGMENTS];
  int64_t width = 0;  // Σ pad_n(count)
  std::vector<char> ok, ok_next;
  Panel raw_panel;       // raw tokens of a masked block, gathered
  Panel expanded_panel;  // members of the block's expanded groups, gathered (step 5′)
  std::vector<float> qb, s, s_next, o, sums, estimate;
  std::vector<char> complete, need, in_e;
  std::vector<int64_t> raw, expanded;
  std::vector<char> mask_all;
  const bool* mask_all_row = nullptr;

  int64_t offset(int which) const {
    int64_t off = 0;
    for (int t = 0; t < which; ++t) off += pad_n(seg[t].count);
    return off;
  }
  // ok for the segments 0 … EXPANDED − 1, all 0; no expanded member yet.
  void layout(int64_t rows) {
    seg[EXPANDED] = Segment{};
    width = offset(SEGMENTS);
    ok.assign(rows * width, 0);
  }
};

int64_t count_le(const std::vector<int64_t>& sorted, int64_t x) {
  return std::upper_bound(sorted.begin(), sorted.end(), x) - sorted.begin();
}

// Dense attention rows [i0, i1) (sel from select_all): every key j visible to some row is a candidate.
void candidates_dense(const Problem& pr, int64_t b, int64_t h, int64_t i0, int64_t i1, const Selection& sel,
                      Scratch& sc) {
  const int64_t jmax = pr.p.is_causal ? std::min(i1, pr.Nk) : pr.Nk;
  sc.seg[FOCUS] = sc.seg[GROUPS] = Segment{};
  sc.seg[RAW] = Segment{&sel.n, 0, jmax, 0.0f};
  sc.layout(i1 - i0);
  for (int64_t i = i0; i < i1; ++i) {
    const bool* mrow = pr.mask ? pr.mask_row(b, h, i) : nullptr;
    char* ok = &sc.ok[(i - i0) * sc.width];
    for (int64_t j = 0; j < jmax; ++j) ok[j] = pr.visible(mrow, i, j);
  }
}

// DGA step 5 candidates without a mask: per row, each kind of candidate is an interval (docs/dga.md,
// "Cost"): causal rows see the focus prefix <= i, the groups with a(g) <= i - w, and the raw
// tokens after those groups up to i; non-causal rows see every focus token, every group, the tail.
void candidates_unmasked(const Problem& pr, bool window, int64_t i0, int64_t i1, const Selection& sel,
                         const Panel& groups, float group_logit, Scratch& sc) {
  const int64_t m = pr.p.group_size, w = pr.p.window;
  const int64_t Nn = static_cast<int64_t>(sel.nonfocus.size()), G = static_cast<int64_t>(sel.anchors.size());
  const int64_t focus_len = window ? count_le(sel.focus, i1 - 1) : static_cast<int64_t>(sel.focus.size());
  const int64_t n_group = window ? count_le(sel.anchors, i1 - 1 - w) : G;
  const int64_t raw_start = window ? count_le(sel.anchors, i0 - w) * m : G * m;
  const int64_t raw_stop = window ? count_le(sel.nonfocus, i1 - 1) : Nn;
  const int64_t n_raw = std::max<int64_t>(raw_stop - raw_start, 0);
  sc.seg[FOCUS] = Segment{&sel.f, 0, focus_len, 0.0f};
  sc.seg[GROUPS] = Segment{&groups, 0, n_group, group_logit};
  sc.seg[RAW] = Segment{&sel.n, raw_start, n_raw, 0.0f};
  sc.layout(i1 - i0);
  const int64_t group_at = sc.offset(GROUPS), raw_at = sc.offset(RAW);
  for (int64_t i = i0; i < i1; ++i) {
    char* ok = &sc.ok[(i - i0) * sc.width];
    const int64_t f = window ? count_le(sel.focus, i) : focus_len;
    const int64_t g = window ? count_le(sel.anchors, i - w) : n_group;
    const int64_t r0 = std::min(std::max(g * m - raw_start, int64_t(0)), n_raw);
    const int64_t r1 = window ? count_le(sel.nonfocus, i) - raw_start : n_raw;
    std::memset(ok, 1, f);
    std::memset(ok + group_at, 1, g);
    if (r1 > r0) std::memset(ok + raw_at + r0, 1, r1 - r0);
  }
}

// DGA step 5 candidates with a mask: completeness and raw needs are read off the mask rows.
void candidates_masked(const Problem& pr, bool window, int64_t b, int64_t h, int64_t i0, int64_t i1,
                       const Selection& sel, const Panel& groups, float group_logit, const float* kb,
                       const float* vb, Scratch& sc) {
  const int64_t m = pr.p.group_size, w = pr.p.window, rows = i1 - i0;
  const int64_t n_f = static_cast<int64_t>(sel.focus.size()), Nn = static_cast<int64_t>(sel.nonfocus.size());
  const int64_t G = static_cast<int64_t>(sel.anchors.size());
  // A group is complete for row i: every member visible under the mask, and (window) a(g) <= i - w,
  // which under causality also makes every member <= i. mask_all[g]: no member hidden by the mask
  // row, found by scanning the row for zeros (up to i1 - w under the window: later members belong
  // to groups the window rejects anyway); rows sharing a mask row share it.
  sc.complete.assign(rows * G, 0);
  int64_t n_group = 0;
  const int64_t scan = window ? std::min(std::max(i1 - w, int64_t(0)), pr.Nk) : pr.Nk;
  for (int64_t i = i0; i < i1; ++i) {
    const bool* mrow = pr.mask_row(b, h, i);
    if (mrow != sc.mask_all_row || sc.mask_all.size() != static_cast<size_t>(G)) {
      sc.mask_all.assign(G, 1);
      if (pr.mask_stride[3] == 0) {
        if (scan > 0 && !mrow[0]) std::fill(sc.mask_all.begin(), sc.mask_all.end(), 0);
      } else {
        for (const void* z = mrow; (z = std::memchr(z, 0, mrow + scan - static_cast<const bool*>(z)));) {
          const bool* hidden = static_cast<const bool*>(z);
          if (sel.group_of[hidden - mrow] >= 0) sc.mask_all[sel.group_of[hidden - mrow]] = 0;
          z = hidden + 1;
        }
      }
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
  const int64_t n_raw = static_cast<int64_t>(sc.raw.size());
  sc.raw_panel.assign(n_raw, pr.D, pr.Dv, [&](int64_t u) { return kb + sel.nonfocus[sc.raw[u]] * pr.D; },
                      [&](int64_t u) { return vb + sel.nonfocus[sc.raw[u]] * pr.Dv; });
  const int64_t focus_len = window ? count_le(sel.focus, i1 - 1) : n_f;
  sc.seg[FOCUS] = Segment{&sel.f, 0, focus_len, 0.0f};
  sc.seg[GROUPS] = Segment{&groups, 0, n_group, group_logit};
  sc.seg[RAW] = Segment{&sc.raw_panel, 0, n_raw, 0.0f};
  sc.layout(rows);
  const int64_t group_at = sc.offset(GROUPS), raw_at = sc.offset(RAW);
  for (int64_t i = i0; i < i1; ++i) {
    const bool* mrow = pr.mask_row(b, h, i);
    char* ok = &sc.ok[(i - i0) * sc.width];
    for (int64_t t = 0; t < focus_len; ++t) ok[t] = pr.visible(mrow, i, sel.focus[t]);
    for (int64_t gi = 0; gi < n_group; ++gi) ok[group_at + gi] = sc.complete[(i - i0) * G + gi];
    for (int64_t u = 0; u < n_raw; ++u) ok[raw_at + u] = raw_ok(mrow, i, sc.raw[u]);
  }
}

// S [rows_pad, width] of segments [from, SEGMENTS) = the block's scaled queries (sc.qb, filled
// when from == 0) times their keys; raw logits, no bias.
void scores(const Problem& pr, const float* qh, int64_t i0, int64_t i1, int from, Scratch& sc) {
  const int64_t D = pr.D, rows_pad = round_up(i1 - i0, TILE_M), W = sc.width;
  if (from == 0) {
    const float scale = pr.scale();
    sc.qb.assign(rows_pad * D, 0.0f);
    for (int64_t t = 0; t < (i1 - i0) * D; ++t) sc.qb[t] = scale * qh[i0 * D + t];
    sc.s.resize(rows_pad * W);  // every column is written by one segment's GEMM
  }
  for (int which = from; which < SEGMENTS; ++which) {
    const Segment& g = sc.seg[which];
    if (g.count > 0)
      gemm(rows_pad, pad_n(g.count), D, sc.qb.data(), D, g.panel->kt.data() + g.first, g.panel->cols,
           &sc.s[sc.offset(which)], W);
  }
}

// Σ of the entries of x[0:n) (n % VW == 0) that are >= at: step 5′'s mass above a threshold.
float mass_from(const float* x, int64_t n, float at) {
  vec sum = {};
  for (int64_t c = 0; c < n; c += VW) {
    const vec e = loadv(x + c);
    sum += e >= at ? e : vec{};
  }
  float s = 0.0f;
  for (int l = 0; l < VW; ++l) s += sum[l];
  return s;
}

// Step 5′'s per-row set (selection.tau_sets) on one row's group numerators e[0:n) (n % VW == 0,
// 0 where a group is not a candidate): marks in in_e the shortest run of groups, in decreasing e
// (ties: smaller index), whose mass reaches `target` (the row's group mass less (1 − τ)·Σ of all
// its numerators). The run is every group above the mass θ of its last member, found by
// bisection on θ's bits (e >= 0 orders as its bits), plus the ties at θ in index order.
void mark_tau_set(const float* e, int64_t n, float target, char* in_e) {
  auto bits = [](float x) { int32_t b; std::memcpy(&b, &x, sizeof b); return b; };
  auto value = [](int32_t b) { float x; std::memcpy(&x, &b, sizeof x); return x; };
  int32_t lo = 1, hi = bits(*std::max_element(e, e + n)) + 1;  // mass_from(lo) >= target > mass_from(hi)
  while (hi - lo > 1) {
    const int32_t mid = lo + (hi - lo) / 2;
    (mass_from(e, n, value(mid)) >= target ? lo : hi) = mid;
  }
  const float theta = value(lo);
  float acc = mass_from(e, n, value(lo + 1));
  for (int64_t g = 0; g < n; ++g)
    if (e[g] > theta) {
      in_e[g] = 1;
    } else if (e[g] == theta && acc < target) {
      in_e[g] = 1;
      acc += theta;
    }
}

// Step 5′ for one block (selection.group_mass, tau_sets, block_expansion): from the base
// candidates' S, each row's estimate (group logits with βe·log m) and τ-set, their union E and
// the dense ceiling; then every group of E (every group some row completes, when dense) leaves
// the group segment of the rows it is complete for, and its members join them raw in the
// expanded segment (gathered from kb, vb). Rows whose estimate is not finite add nothing to E.
void expand(const Problem& pr, int64_t rows, const Selection& sel, float expand_logit, const float* kb,
            const float* vb, Scratch& sc) {
  const int64_t m = pr.p.group_size, n_group = sc.seg[GROUPS].count, n_pad = pad_n(n_group);
  const int64_t W = sc.width, group_at = sc.offset(GROUPS);
  const float keep = static_cast<float>(1.0 - pr.p.expand_mass);
  sc.in_e.assign(n_pad, 0);
  sc.estimate.resize(W);
  float* est = sc.estimate.data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* srow = &sc.s[r * W];
    const char* ok = &sc.ok[r * W];
    for (int which = 0, at = 0; which < EXPANDED; at += pad_n(sc.seg[which++].count)) {
      const float bias = which == GROUPS ? expand_logit : sc.seg[which].bias;
      for (int64_t t = at; t < at + pad_n(sc.seg[which].count); ++t) est[t] = ok[t] ? srow[t] + bias : NEG_INF;
    }
    const float sum = softmax_numerators(est, W);
    if (!(sum > 0.0f && std::isfinite(sum)) || n_group == 0) continue;
    const float target = mass_from(est + group_at, n_pad, std::numeric_limits<float>::denorm_min()) - keep * sum;
    if (target > 0.0f) mark_tau_set(est + group_at, n_pad, target, sc.in_e.data());
  }
  const char* last = &sc.ok[(rows - 1) * W + group_at];
  const int64_t n_e = std::count(sc.in_e.begin(), sc.in_e.end(), 1);
  const bool dense = static_cast<float>(n_e) >
                     static_cast<float>(pr.p.expand_max) * static_cast<float>(std::count(last, last + n_group, 1));
  sc.expanded.clear();
  for (int64_t gi = 0; gi < n_group; ++gi) {
    bool used = sc.in_e[gi];
    for (int64_t r = 0; dense && !used && r < rows; ++r) used = sc.ok[r * W + group_at + gi];
    if (used) sc.expanded.push_back(gi);
  }
  if (sc.expanded.empty()) return;
  // The expanded segment: its panel, S and ok laid out again with its columns at the end. Group
  // gi's members are rows gi·m … gi·m + m − 1 of the non-focus panel, so a run of consecutive
  // groups (a dense block's are) is read from it in place; other sets are gathered.
  const int64_t n_x = static_cast<int64_t>(sc.expanded.size()) * m, rows_pad = round_up(rows, TILE_M);
  if (sc.expanded.back() - sc.expanded.front() + 1 == static_cast<int64_t>(sc.expanded.size())) {
    sc.seg[EXPANDED] = Segment{&sel.n, sc.expanded.front() * m, n_x, 0.0f};
  } else {
    auto member = [&](int64_t u) { return sel.nonfocus[sc.expanded[u / m] * m + u % m]; };
    sc.expanded_panel.assign(n_x, pr.D, pr.Dv, [&](int64_t u) { return kb + member(u) * pr.D; },
                             [&](int64_t u) { return vb + member(u) * pr.Dv; });
    sc.seg[EXPANDED] = Segment{&sc.expanded_panel, 0, n_x, 0.0f};
  }
  sc.width = W + pad_n(n_x);
  sc.s_next.resize(rows_pad * sc.width);
  sc.ok_next.assign(rows * sc.width, 0);
  for (int64_t r = 0; r < rows_pad; ++r) std::memcpy(&sc.s_next[r * sc.width], &sc.s[r * W], W * sizeof(float));
  for (int64_t r = 0; r < rows; ++r) {
    char* ok = &sc.ok_next[r * sc.width];
    std::memcpy(ok, &sc.ok[r * W], W);
    for (size_t x = 0; x < sc.expanded.size(); ++x) {
      char& group_ok = ok[group_at + sc.expanded[x]];
      std::memset(ok + W + x * m, group_ok, m);
      group_ok = 0;
    }
  }
  std::swap(sc.s, sc.s_next);
  std::swap(sc.ok, sc.ok_next);
}

// out rows [i0, i1) of one head = softmax(S + bias | ok)·V over the block's segments, S from scores().
void attend(const Problem& pr, int64_t i0, int64_t i1, Scratch& sc, float* outh) {
  const int64_t Dv = pr.Dv, rows = i1 - i0, W = sc.width;
  const int64_t rows_pad = round_up(rows, TILE_M), dv_pad = pad_n(Dv);
  sc.sums.assign(rows_pad, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = &sc.s[r * W];
    const char* ok = &sc.ok[r * W];
    for (int which = 0, at = 0; which < SEGMENTS; at += pad_n(sc.seg[which++].count)) {
      const float bias = sc.seg[which].bias;
      for (int64_t t = at; t < at + pad_n(sc.seg[which].count); ++t) srow[t] = ok[t] ? srow[t] + bias : NEG_INF;
    }
    sc.sums[r] = softmax_numerators(srow, W);
  }
  sc.o.assign(rows_pad * dv_pad, 0.0f);
  for (int which = 0, at = 0, first = 1; which < SEGMENTS; at += pad_n(sc.seg[which++].count)) {
    const Segment& g = sc.seg[which];
    if (g.count > 0)
      gemm(rows_pad, dv_pad, pad_n(g.count), &sc.s[at], W, g.panel->v.data() + g.first * dv_pad, dv_pad,
           sc.o.data(), dv_pad, /*accumulate=*/!std::exchange(first, 0));
  }
  for (int64_t r = 0; r < rows; ++r) {  // a row with no candidate gives 0; a NaN sum stays NaN
    const float sum = sc.sums[r], inv = 1.0f / sum;
    for (int64_t d = 0; d < Dv; ++d) outh[(i0 + r) * Dv + d] = sum == 0.0f ? 0.0f : sc.o[r * dv_pad + d] * inv;
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
  const bool dga = pr.dga_applies(), expanding = dga && pr.expanding();
  const int64_t rep = pr.Hq / pr.Hkv, block = expanding ? std::min(pr.p.query_block, std::max<int64_t>(pr.Nq, 1)) : BLOCK;
  const int64_t n_blocks = (pr.Nq + block - 1) / block;
  const float log_m = std::log(static_cast<float>(pr.p.group_size));
  const float group_logit = pr.p.group_bias * log_m, expand_logit = pr.p.expand_bias * log_m;
  std::vector<Selection> sel(pr.B * pr.Hkv);
  std::vector<Panel> groups(dga ? pr.B * pr.Hq : 0);
  auto kv = [&](const float* x, int64_t bg, int64_t width) { return x + bg * pr.Nk * width; };
  parallel_for(sel.size(), [&](size_t bg) {
    if (dga)
      select(pr, bg / pr.Hkv, bg % pr.Hkv, q, k, v, sel[bg]);
    else
      select_all(pr, bg / pr.Hkv, bg % pr.Hkv, k, v, sel[bg]);
  });
  parallel_for(groups.size(), [&](size_t bh) {
    const size_t bg = bh / pr.Hq * pr.Hkv + bh % pr.Hq / rep;
    aggregate(pr, q + bh * pr.Nq * pr.D, kv(k, bg, pr.D), kv(v, bg, pr.Dv), sel[bg], groups[bh]);
  });
  // Items by head, then block; the last first, since a causal block's cost grows with its position.
  const size_t total = pr.B * pr.Hq * n_blocks;
  parallel_for(total, [&](size_t reversed) {
    thread_local Scratch sc;
    sc.mask_all_row = nullptr;
    sc.mask_all.clear();
    const size_t item = total - 1 - reversed;
    const int64_t bh = item / n_blocks, b = bh / pr.Hq, h = bh % pr.Hq, bg = b * pr.Hkv + h / rep;
    const int64_t i0 = item % n_blocks * block, i1 = std::min(i0 + block, pr.Nq);
    if (!dga)
      candidates_dense(pr, b, h, i0, i1, sel[bg], sc);
    else if (pr.mask == nullptr)
      candidates_unmasked(pr, window, i0, i1, sel[bg], groups[bh], group_logit, sc);
    else
      candidates_masked(pr, window, b, h, i0, i1, sel[bg], groups[bh], group_logit, kv(k, bg, pr.D),
                        kv(v, bg, pr.Dv), sc);
    scores(pr, q + bh * pr.Nq * pr.D, i0, i1, 0, sc);
    if (expanding) {
      expand(pr, i1 - i0, sel[bg], expand_logit, kv(k, bg, pr.D), kv(v, bg, pr.Dv), sc);
      scores(pr, q + bh * pr.Nq * pr.D, i0, i1, EXPANDED, sc);
    }
    attend(pr, i0, i1, sc, out + bh * pr.Nq * pr.Dv);
  });
}

}  // namespace dga
