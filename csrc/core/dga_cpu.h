// Multithreaded CPU kernel of the blocked DGA algorithm (docs/dga.md, "Cost").
#pragma once

#include <cstddef>
#include <functional>

#include "dga_problem.h"

namespace dga {

// Runs body(i) for every i in [0, total), possibly in parallel (ORT's intra-op thread pool).
using ParallelFor = std::function<void(size_t total, const std::function<void(size_t)>& body)>;

// Whether the local window applies: is_causal, or the mask hides every j > i (dga_compile._validation.causal_like).
bool window_applies_cpu(const Problem& pr, const int64_t mask_shape[4]);

// out [B, Hq, Nq, Dv] = DGA(q, k, v) in float32; `window` from window_applies_cpu().
void attention_cpu(const Problem& pr, bool window, const float* q, const float* k, const float* v,
                   float* out, const ParallelFor& parallel_for);

}  // namespace dga
