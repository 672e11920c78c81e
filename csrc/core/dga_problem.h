// One DynamicGroupAttention call, independent of ONNX Runtime and of the device.
// Semantics: docs/dga.md (the spec), dga_compile/reference.py (the spec in code).
#pragma once

#include <cmath>
#include <cstdint>

namespace dga {

// DGAConfig's numeric fields, as the node's attributes carry them.
struct Params {
  double focus_ratio = 0.1;  // as the Python float γ (ONNX: from its float32 attribute)
  int64_t group_size = 16;
  int64_t num_probe = 128;
  int64_t window = 256;
  float group_bias = 0.25f;
  int64_t min_seq_len = 1024;
  int64_t sinks = 0;          // s: the first s positions are always focus
  double expand_mass = 0.0;   // τ of step 5′ (0: off); as the Python float (ONNX: from float32)
  float expand_bias = 1.0f;   // βe: step 5′'s estimate adds βe·log m to group logits
  int64_t query_block = 64;   // b: step 5′'s query blocks [0, b), [b, 2b), …
  double expand_max = 1.0;    // step 5′'s dense ceiling, a share of the last row's complete groups
  bool is_causal = false;
  float scale = 0.0f;  // <= 0: 1/sqrt(D)
};

// q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], out [B, Hq, Nq, Dv], all contiguous.
// mask: nullptr or bool broadcast to [B, Hq, Nq, Nk] through mask_stride (0 on broadcast dims).
struct Problem {
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv;
  const bool* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  Params p;

  float scale() const { return p.scale > 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(D)); }
  // dga_applies(): self-attention prefill of at least min_seq_len keys; else exact dense attention.
  bool dga_applies() const { return Nq == Nk && Nk >= (p.min_seq_len > 1 ? p.min_seq_len : 1); }
  // ceil(γ·Nk), the focus keys chosen by score, as selection.num_focus computes it: γ·Nk rounded
  // to 9 decimals first.
  int64_t num_scored() const {
    double x = std::round(p.focus_ratio * static_cast<double>(Nk) * 1e9) / 1e9;
    int64_t n = static_cast<int64_t>(std::ceil(x));
    return n < Nk ? n : Nk;
  }
  // n_f = min(Nk, sinks + ceil(γ·Nk)).
  int64_t num_focus() const { return p.sinks < Nk - num_scored() ? p.sinks + num_scored() : Nk; }
  bool expanding() const { return p.expand_mass > 0.0; }
  const bool* mask_row(int64_t b, int64_t h, int64_t i) const {
    return mask + b * mask_stride[0] + h * mask_stride[1] + i * mask_stride[2];
  }
  // Visible(i, j) on a mask row from mask_row().
  bool visible(const bool* row, int64_t i, int64_t j) const {
    return (!p.is_causal || j <= i) && (row == nullptr || row[j * mask_stride[3]]);
  }
};

}  // namespace dga
