// PyTorch binding of the CPU kernel (csrc/core/dga_cpu.cc): the no-grad float32 forward of the
// op's implementation "cpp". Registers dga_native::attention_cpu; loaded by dga_compile._extension
// (cpp_attention); dga_compile.dispatch runs it only for calls it takes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "dga_cpu.h"
#include "dga_threads.h"

namespace {

// out [B, Hq, N, Dv] (float32, contiguous, written whole) = DGA(q, k, v) for one self-attention
// prefill; mask: None or bool broadcastable to [B, Hq, N, N]; local_window: the spec's window rule
// applies (dga_compile._validation.causal_like).
void attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                   at::Tensor& out, bool is_causal, bool local_window, double scale, double focus_ratio,
                   int64_t group_size, int64_t num_probe, int64_t window, double group_bias, int64_t sinks,
                   double expand_mass, double expand_bias, int64_t query_block, double expand_max) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &out})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4,
                "dga_native.attention_cpu: q, k, v, out must be contiguous 4-D float32 CPU tensors, got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  dga::Problem pr;
  pr.B = q.size(0), pr.Hq = q.size(1), pr.Nq = q.size(2), pr.D = q.size(3);
  pr.Hkv = k.size(1), pr.Nk = k.size(2), pr.Dv = v.size(3);
  TORCH_CHECK(pr.Nq == pr.Nk && k.size(0) == pr.B && k.size(3) == pr.D && v.size(0) == pr.B && v.size(1) == pr.Hkv &&
                  v.size(2) == pr.Nk && pr.Hkv > 0 && pr.Hq % pr.Hkv == 0 &&
                  out.sizes() == at::IntArrayRef({pr.B, pr.Hq, pr.Nq, pr.Dv}),
              "dga_native.attention_cpu: want q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv], out "
              "[B, Hq, N, Dv] with Hq % Hkv == 0; got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), ", out ",
              out.sizes());
  TORCH_CHECK(scale > 0 && focus_ratio >= 0 && focus_ratio <= 1 && group_size >= 1 && num_probe >= 1 && window >= 0 &&
                  group_bias >= 0 && sinks >= 0 && expand_mass >= 0 && expand_mass < 1 && expand_bias >= 0 &&
                  query_block >= 1 && expand_max > 0 && expand_max <= 1,
              "dga_native.attention_cpu: parameters out of range (scale=", scale, ", focus_ratio=", focus_ratio,
              ", group_size=", group_size, ", num_probe=", num_probe, ", window=", window, ", group_bias=",
              group_bias, ", sinks=", sinks, ", expand_mass=", expand_mass, ", expand_bias=", expand_bias,
              ", query_block=", query_block, ", expand_max=", expand_max, "); see DGAConfig");
  pr.p.focus_ratio = focus_ratio, pr.p.group_size = group_size, pr.p.num_probe = num_probe, pr.p.window = window;
  pr.p.group_bias = static_cast<float>(group_bias), pr.p.min_seq_len = 0, pr.p.is_causal = is_causal;
  pr.p.scale = static_cast<float>(scale), pr.p.sinks = sinks, pr.p.expand_mass = expand_mass;
  pr.p.expand_bias = static_cast<float>(expand_bias), pr.p.query_block = query_block, pr.p.expand_max = expand_max;
  at::Tensor visible;  // keeps the expanded mask alive while the kernel reads it
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4,
                "dga_native.attention_cpu: mask must be a 4-D bool tensor, got ", mask->scalar_type(), " ",
                mask->sizes());
    // The kernel scans mask rows as bytes: the key dim must be contiguous or broadcast.
    visible = (mask->stride(3) <= 1 ? *mask : mask->contiguous()).expand({pr.B, pr.Hq, pr.Nq, pr.Nk});
    pr.mask = visible.const_data_ptr<bool>();
    for (int d = 0; d < 4; ++d) pr.mask_stride[d] = visible.stride(d);
  }
  dga::attention_cpu(pr, local_window, q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                     out.mutable_data_ptr<float>(), parallel_for);
}

}  // namespace

TORCH_LIBRARY(dga_native, m) {
  m.def(
      "attention_cpu(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor(a!) out, bool is_causal, bool local_window, "
      "float scale, float focus_ratio, int group_size, int num_probe, int window, float group_bias, int sinks, "
      "float expand_mass, float expand_bias, int query_block, float expand_max) -> ()");
  m.impl("attention_cpu", c10::DispatchKey::CPU, TORCH_FN(attention_cpu));
}
