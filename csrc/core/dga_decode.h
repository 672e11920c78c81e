// Decode attention over a DGA cache's slots (docs/dga.md, "Decoding"), split-K on the CPU.
// Semantics: dga_compile/decode_reference.py::slot_attention.
#pragma once

#include <cstdint>

#include "dga_cpu.h"

namespace dga {

// One run of slots for every (batch row, kv head): keys [len, D] and values [len, Dv] rows (the
// last dim contiguous, the others strided) and one log-weight λ per slot (-inf: no slot).
struct SlotRun {
  const float* k = nullptr;
  const float* v = nullptr;
  const float* lam = nullptr;
  int64_t len = 0;
  int64_t k_stride[3] = {0, 0, 0};  // batch, head, slot (elements)
  int64_t v_stride[3] = {0, 0, 0};
  int64_t lam_stride[3] = {0, 0, 0};
};

// q [B, Hq, Nq, D] (strided, last dim contiguous); query head h reads kv head h / (Hq / Hkv).
// The last Nq slots of `recent` are the step's own tokens: query t sees those up to itself.
struct DecodeProblem {
  int64_t B = 0, Hq = 0, Hkv = 0, Nq = 0, D = 0, Dv = 0;
  float scale = 1.0f;
  const float* q = nullptr;
  int64_t q_stride[3] = {0, 0, 0};  // batch, head, query
  SlotRun packed, recent;
};

// out [B, Hq, Nq, Dv] (contiguous, written whole) = softmax_s(scale·q·k_s + λ_s)·v_s over
// packed ∪ recent; rows with no slot give 0. Work items: (batch row, kv head, run of slots).
void decode_attention_cpu(const DecodeProblem& pr, float* out, const ParallelFor& parallel_for);

}  // namespace dga
