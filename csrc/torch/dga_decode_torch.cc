// PyTorch binding of the CPU decode kernel (csrc/core/dga_decode.cc): registers
// dga_native::decode_attention_cpu, called by dga_compile.decode_op for float32 CPU caches.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "dga_decode.h"
#include "dga_threads.h"

namespace {

void fill_run(dga::SlotRun& run, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam) {
  run.k = k.const_data_ptr<float>(), run.v = v.const_data_ptr<float>(), run.lam = lam.const_data_ptr<float>();
  run.len = k.size(2);
  for (int d = 0; d < 3; ++d)
    run.k_stride[d] = k.stride(d), run.v_stride[d] = v.stride(d), run.lam_stride[d] = lam.stride(d);
}

// out [B, Hq, n, Dv] (float32, contiguous, written whole) = softmax(scale·q·k + λ)·v over the packed
// slots (pk, pv, pl) and the recent run (rk, rv, rl) whose last n slots are causal (decode_op.py).
void decode_attention_cpu(const at::Tensor& q, const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& pl,
                          const at::Tensor& rk, const at::Tensor& rv, const at::Tensor& rl, at::Tensor& out,
                          double scale) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &pk, &pv, &rk, &rv, &out})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4 && t->stride(3) == 1,
                "dga_native.decode_attention_cpu: q, keys, values, out must be 4-D float32 CPU tensors with a "
                "contiguous last dim, got ", t->scalar_type(), " ", t->sizes(), " strides ", t->strides());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&pl, &rl})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 3,
                "dga_native.decode_attention_cpu: λ must be 3-D float32 CPU tensors, got ", t->scalar_type(), " ",
                t->sizes());
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3), Hkv = pk.size(1), Dv = pv.size(3);
  const auto run_ok = [&](const at::Tensor& k, const at::Tensor& v, const at::Tensor& lam) {
    return k.size(0) == B && k.size(1) == Hkv && k.size(3) == D && v.size(0) == B && v.size(1) == Hkv &&
           v.size(2) == k.size(2) && v.size(3) == Dv && lam.size(0) == B && lam.size(1) == Hkv &&
           lam.size(2) == k.size(2);
  };
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && run_ok(pk, pv, pl) && run_ok(rk, rv, rl) && rk.size(2) >= n &&
                  out.is_contiguous() && out.sizes() == at::IntArrayRef({B, Hq, n, Dv}),
              "dga_native.decode_attention_cpu: want q [B, Hq, n, D], keys [B, Hkv, ·, D], values [B, Hkv, ·, Dv], "
              "λ [B, Hkv, ·], ≥ n recent slots, out [B, Hq, n, Dv] contiguous; got q ", q.sizes(), ", pk ", pk.sizes(),
              ", pv ", pv.sizes(), ", pl ", pl.sizes(), ", rk ", rk.sizes(), ", rv ", rv.sizes(), ", rl ", rl.sizes(),
              ", out ", out.sizes());
  dga::DecodeProblem pr;
  pr.B = B, pr.Hq = Hq, pr.Hkv = Hkv, pr.Nq = n, pr.D = D, pr.Dv = Dv, pr.scale = static_cast<float>(scale);
  pr.q = q.const_data_ptr<float>();
  for (int d = 0; d < 3; ++d) pr.q_stride[d] = q.stride(d);
  fill_run(pr.packed, pk, pv, pl);
  fill_run(pr.recent, rk, rv, rl);
  dga::decode_attention_cpu(pr, out.mutable_data_ptr<float>(), parallel_for);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dga_native, m) {
  m.def("decode_attention_cpu(Tensor q, Tensor pk, Tensor pv, Tensor pl, Tensor rk, Tensor rv, Tensor rl, "
        "Tensor(a!) out, float scale) -> ()");
  m.impl("decode_attention_cpu", c10::DispatchKey::CPU, TORCH_FN(decode_attention_cpu));
}
