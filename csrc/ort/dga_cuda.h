// CUDA DGA kernel (same semantics as dga_cpu.h), run on the ORT session's compute stream.
#pragma once

#include <string>

#include "dga_problem.h"

namespace dga {

// out = DGA(q, k, v) with every pointer on the device; mask_shape: the mask's dims (if any).
// Returns "" on success, else the CUDA error.
std::string attention_cuda(const Problem& pr, const int64_t mask_shape[4], const float* q, const float* k,
                           const float* v, float* out, void* stream);

}  // namespace dga
