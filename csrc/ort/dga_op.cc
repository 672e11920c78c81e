// ONNX Runtime custom-op library: ai.dga::DynamicGroupAttention (version 1) on the CPU and,
// when built with DGA_WITH_CUDA, on the CUDA execution provider (the session's compute stream).
//
// Nothing from ONNX Runtime is linked: the C API comes from the OrtApiBase that
// RegisterCustomOps receives, at the API version of the headers this file was built against.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "dga_cpu.h"
#ifdef DGA_WITH_CUDA
#include "dga_cuda.h"
#endif

#define DGA_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* DOMAIN = "ai.dga";
constexpr const char* OP_TYPE = "DynamicGroupAttention";

// The shortest decimal that rounds to the float32 ``x``, as a double (what the exporter started from).
inline double shortest_decimal(float x) {
  char buf[32];
  for (int digits = 1; digits < 10; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, static_cast<double>(x));
    if (std::strtof(buf, nullptr) == x) break;
  }
  return std::strtod(buf, nullptr);
}

// The node's attribute ``name``, or nothing when the node lacks it.
template <typename T>
std::optional<T> attribute(const OrtKernelInfo* info, const char* name) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
    return std::nullopt;
  }
}

template <typename T>
T attribute_or(const OrtKernelInfo* info, const char* name, T fallback) {
  return attribute<T>(info, name).value_or(fallback);
}

// The node's attributes (dga_compile/onnx/_schema.py): a missing DGAConfig field takes DGAConfig's
// default (dga::Params' defaults, tests/test_ort_native.py checks they agree), is_causal 0; scale is required.
dga::Params read_params(const OrtKernelInfo* info) {
  dga::Params p;
  // The float32 attribute read back as its shortest decimal (0.1f -> 0.1), the Python float γ.
  p.focus_ratio = shortest_decimal(attribute_or<float>(info, "focus_ratio", static_cast<float>(p.focus_ratio)));
  p.group_size = attribute_or<int64_t>(info, "group_size", p.group_size);
  p.num_probe = attribute_or<int64_t>(info, "num_probe", p.num_probe);
  p.window = attribute_or<int64_t>(info, "window", p.window);
  p.group_bias = attribute_or<float>(info, "group_bias", p.group_bias);
  p.min_seq_len = attribute_or<int64_t>(info, "min_seq_len", p.min_seq_len);
  p.sinks = attribute_or<int64_t>(info, "sinks", p.sinks);
  p.expand_mass = shortest_decimal(attribute_or<float>(info, "expand_mass", static_cast<float>(p.expand_mass)));
  p.expand_bias = attribute_or<float>(info, "expand_bias", p.expand_bias);
  p.query_block = attribute_or<int64_t>(info, "query_block", p.query_block);
  p.expand_max = shortest_decimal(attribute_or<float>(info, "expand_max", static_cast<float>(p.expand_max)));
  p.is_causal = attribute_or<int64_t>(info, "is_causal", 0) != 0;
  const std::optional<float> scale = attribute<float>(info, "scale");
  if (!scale)
    ORT_CXX_API_THROW("ai.dga.DynamicGroupAttention: the scale attribute is required (the exporter writes it; "
                      "use 1/sqrt(D) for SDPA's default)", ORT_INVALID_ARGUMENT);
  p.scale = *scale;
  if (!(p.focus_ratio >= 0.0 && p.focus_ratio <= 1.0) || p.group_size < 1 || p.num_probe < 1 ||
      p.window < 0 || !(p.group_bias >= 0.0f && std::isfinite(p.group_bias)) || p.min_seq_len < 0 || p.sinks < 0 ||
      !(p.expand_mass >= 0.0 && p.expand_mass < 1.0) || !(p.expand_bias >= 0.0f && std::isfinite(p.expand_bias)) ||
      p.query_block < 1 || !(p.expand_max > 0.0 && p.expand_max <= 1.0))
    ORT_CXX_API_THROW("ai.dga.DynamicGroupAttention: attributes out of range (focus_ratio=" +
                          std::to_string(p.focus_ratio) + " in [0,1], group_size=" + std::to_string(p.group_size) +
                          " >= 1, num_probe=" + std::to_string(p.num_probe) + " >= 1, window=" +
                          std::to_string(p.window) + " >= 0, group_bias=" + std::to_string(p.group_bias) +
                          " finite >= 0, min_seq_len=" + std::to_string(p.min_seq_len) + " >= 0, sinks=" +
                          std::to_string(p.sinks) + " >= 0, expand_mass=" + std::to_string(p.expand_mass) +
                          " in [0,1), expand_bias=" + std::to_string(p.expand_bias) + " finite >= 0, query_block=" +
                          std::to_string(p.query_block) + " >= 1, expand_max=" + std::to_string(p.expand_max) +
                          " in (0,1]); see DGAConfig",
                      ORT_INVALID_ARGUMENT);
  return p;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

void fail(const std::string& msg) { ORT_CXX_API_THROW("ai.dga.DynamicGroupAttention: " + msg, ORT_INVALID_ARGUMENT); }

// The call's shapes and mask broadcast, checked; mask_shape receives the mask's dims.
dga::Problem make_problem(const Ort::KernelContext& ctx, const dga::Params& p, int64_t mask_shape[4]) {
  auto shape = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); };
  const auto qs = shape(0), ks = shape(1), vs = shape(2);
  if (qs.size() != 4 || ks.size() != 4 || vs.size() != 4)
    fail("q, k, v must be rank 4 [B, H, N, D], got " + shape_str(qs) + ", " + shape_str(ks) + ", " + shape_str(vs));
  dga::Problem pr;
  pr.B = qs[0], pr.Hq = qs[1], pr.Hkv = ks[1], pr.Nq = qs[2], pr.Nk = ks[2], pr.D = qs[3], pr.Dv = vs[3];
  pr.p = p;
  if (ks[0] != pr.B || vs[0] != pr.B || ks[3] != pr.D || vs[1] != pr.Hkv || vs[2] != pr.Nk)
    fail("shapes do not agree: q " + shape_str(qs) + ", k " + shape_str(ks) + ", v " + shape_str(vs) +
         " (want q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv])");
  if (pr.Hkv < 1 || pr.Hq % pr.Hkv != 0)
    fail("Hq=" + std::to_string(pr.Hq) + " is not a multiple of Hkv=" + std::to_string(pr.Hkv));
  const size_t n_inputs = ctx.GetInputCount();
  const OrtValue* mask = n_inputs > 3 ? static_cast<const OrtValue*>(ctx.GetInput(3)) : nullptr;
  if (mask == nullptr) return pr;
  const auto ms = shape(3);
  const int64_t full[4] = {pr.B, pr.Hq, pr.Nq, pr.Nk};
  if (ms.size() != 4) fail("attn_mask must be rank 4, broadcastable to [B, Hq, Nq, Nk], got " + shape_str(ms));
  int64_t stride = 1;
  for (int d = 3; d >= 0; --d) {
    if (ms[d] != 1 && ms[d] != full[d])
      fail("attn_mask of shape " + shape_str(ms) + " does not broadcast to [B, Hq, Nq, Nk] = " +
           shape_str({full, full + 4}));
    pr.mask_stride[d] = ms[d] == 1 ? 0 : stride;
    mask_shape[d] = ms[d];
    stride *= ms[d];
  }
  pr.mask = ctx.GetInput(3).GetTensorData<bool>();
  return pr;
}

template <typename F>
OrtStatusPtr guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

// Runs body(i) for i in [0, total) on ORT's intra-op thread pool. An exception must not leave a
// work item (ORT's pool threads do not expect one: the run hangs or terminates): the first one
// (e.g. std::bad_alloc) is kept, the remaining items are skipped, and it is rethrown here, in the
// kernel's thread, where guarded() turns it into an ORT error.
void parallel_for_on_ort(const Ort::KernelContext& ctx, size_t total, const std::function<void(size_t)>& body) {
  struct Work {
    const std::function<void(size_t)>& body;
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex error_mutex;
  } work{body};
  auto trampoline = [](void* data, size_t i) {
    Work& w = *static_cast<Work*>(data);
    if (w.failed.load(std::memory_order_relaxed)) return;
    try {
      w.body(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(w.error_mutex);
      if (!w.error) w.error = std::current_exception();
      w.failed = true;
    }
  };
  ctx.ParallelFor(trampoline, total, 0, &work);
  if (work.error) std::rethrow_exception(work.error);
}

// The CPU kernel: ORT's intra-op thread pool runs the work items.
struct Cpu {
  static void run(const Ort::KernelContext& ctx, dga::Problem& pr, const int64_t mask_shape[4], const float* q,
                  const float* k, const float* v, float* out) {
    // The exporter passes an all-true [1, 1, 1, 1] mask for "no mask": take the unmasked path.
    if (pr.mask != nullptr && mask_shape[0] * mask_shape[1] * mask_shape[2] * mask_shape[3] == 1 && pr.mask[0])
      pr.mask = nullptr;
    dga::ParallelFor parallel_for = [&](size_t total, const std::function<void(size_t)>& body) {
      parallel_for_on_ort(ctx, total, body);
    };
    dga::attention_cpu(pr, dga::window_applies_cpu(pr, mask_shape), q, k, v, out, parallel_for);
  }
};

#ifdef DGA_WITH_CUDA
// The CUDA kernel: everything on the session's compute stream. It has no sinks and no step 5′ yet.
struct Cuda {
  static void run(const Ort::KernelContext& ctx, dga::Problem& pr, const int64_t mask_shape[4], const float* q,
                  const float* k, const float* v, float* out) {
    if (pr.dga_applies() && (pr.p.sinks > 0 || pr.expanding()))
      ORT_CXX_API_THROW("ai.dga.DynamicGroupAttention (CUDA): NYI: sinks=" + std::to_string(pr.p.sinks) +
                            " and expand_mass=" + std::to_string(pr.p.expand_mass) +
                            " (the CUDA kernel computes sinks=0, expand_mass=0 only); run this node on the "
                            "CPUExecutionProvider",
                        ORT_NOT_IMPLEMENTED);
    const std::string err = dga::attention_cuda(pr, mask_shape, q, k, v, out, ctx.GetGPUComputeStream());
    if (!err.empty()) ORT_CXX_API_THROW("ai.dga.DynamicGroupAttention (CUDA): " + err, ORT_RUNTIME_EXCEPTION);
  }
};
#endif

// The ONNX element type of T.
template <typename T> constexpr ONNXTensorElementDataType element_type_of();
template <> constexpr ONNXTensorElementDataType element_type_of<float>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
template <> constexpr ONNXTensorElementDataType element_type_of<Ort::Float16_t>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; }
template <> constexpr ONNXTensorElementDataType element_type_of<Ort::BFloat16_t>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16; }
template <> constexpr ONNXTensorElementDataType element_type_of<double>() { return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE; }

float to_float(float x) { return x; }
float to_float(double x) { return static_cast<float>(x); }
template <typename H> float to_float(H x) { return x.ToFloat(); }

// Other element types run in float32: widened on entry, narrowed on exit.
template <typename T>
std::vector<float> widen(const T* x, size_t n) {
  std::vector<float> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = to_float(x[i]);
  return r;
}

// One call: read and check the inputs, allocate the output, run it on Device in float32.
template <typename Device, typename T>
struct Kernel {
  static constexpr ONNXTensorElementDataType element_type = element_type_of<T>();
  dga::Params p;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      int64_t mask_shape[4] = {1, 1, 1, 1};
      dga::Problem pr = make_problem(ctx, p, mask_shape);
      auto out = ctx.GetOutput(0, {pr.B, pr.Hq, pr.Nq, pr.Dv});
      const T *q = ctx.GetInput(0).GetTensorData<T>(), *k = ctx.GetInput(1).GetTensorData<T>();
      const T* v = ctx.GetInput(2).GetTensorData<T>();
      T* o = out.GetTensorMutableData<T>();
      if constexpr (std::is_same<T, float>::value) {
        Device::run(ctx, pr, mask_shape, q, k, v, o);
      } else {
        const size_t nq = pr.B * pr.Hq * pr.Nq * pr.D, nk = pr.B * pr.Hkv * pr.Nk * pr.D;
        const size_t nv = pr.B * pr.Hkv * pr.Nk * pr.Dv, no = pr.B * pr.Hq * pr.Nq * pr.Dv;
        const std::vector<float> q32 = widen(q, nq), k32 = widen(k, nk), v32 = widen(v, nv);
        std::vector<float> o32(no);
        Device::run(ctx, pr, mask_shape, q32.data(), k32.data(), v32.data(), o32.data());
        for (size_t i = 0; i < no; ++i) o[i] = T(o32[i]);
      }
    });
  }
};

// One op class per (execution provider, element type): q, k, v and the output of Kernel's type,
// optional bool attn_mask.
template <typename Kernel>
struct DgaOp : Ort::CustomOpBase<DgaOp<Kernel>, Kernel, true> {
  explicit DgaOp(const char* provider) : provider_(provider) {}

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new Kernel{read_params(info)}; });
  }
  const char* GetName() const { return OP_TYPE; }
  const char* GetExecutionProviderType() const { return provider_; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : Kernel::element_type;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return Kernel::element_type; }

 private:
  const char* provider_;
};

}  // namespace

// The ORT C API version these sources were built against (the headers' ORT_API_VERSION).
DGA_EXPORT int DgaOrtApiVersion() { return ORT_API_VERSION; }

// 1 when the CUDA kernel was compiled in (nvcc was present at build time).
DGA_EXPORT int DgaOrtHasCuda() {
#ifdef DGA_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// 0 when the runtime offers this library's API version; otherwise 1 and a message naming both.
DGA_EXPORT int DgaOrtCheckApi(const OrtApiBase* base, char* message, size_t size) {
  if (base->GetApi(ORT_API_VERSION) != nullptr) return 0;
  std::snprintf(message, size,
                "the ai.dga custom-op library was built against the ONNX Runtime C API version %d "
                "(headers of ONNX Runtime 1.%d) but the loaded ONNX Runtime %s does not provide it; "
                "use ONNX Runtime >= 1.%d or rebuild with its headers: "
                "dga-compile build-ort-op --include-dir DIR (or ORT_INCLUDE_DIR=DIR)",
                ORT_API_VERSION, ORT_API_VERSION, base->GetVersionString(), ORT_API_VERSION);
  return 1;
}

DGA_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  char message[512];
  if (DgaOrtCheckApi(base, message, sizeof message) != 0)
    return base->GetApi(1)->CreateStatus(ORT_FAIL, message);  // version 1 is always served
  Ort::InitApi(base->GetApi(ORT_API_VERSION));
  static const DgaOp<Kernel<Cpu, float>> cpu_op("CPUExecutionProvider");
  static const DgaOp<Kernel<Cpu, Ort::Float16_t>> cpu_op_fp16("CPUExecutionProvider");
  static const DgaOp<Kernel<Cpu, Ort::BFloat16_t>> cpu_op_bf16("CPUExecutionProvider");
  static const DgaOp<Kernel<Cpu, double>> cpu_op_fp64("CPUExecutionProvider");
#ifdef DGA_WITH_CUDA
  static const DgaOp<Kernel<Cuda, float>> cuda_op("CUDAExecutionProvider");
#endif
  static std::mutex lock;
  static std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;  // must outlive every session
  return guarded([&] {
    auto domain = std::make_unique<Ort::CustomOpDomain>(DOMAIN);
    domain->Add(&cpu_op);
    domain->Add(&cpu_op_fp16);
    domain->Add(&cpu_op_bf16);
    domain->Add(&cpu_op_fp64);
#ifdef DGA_WITH_CUDA
    domain->Add(&cuda_op);
#endif
    Ort::UnownedSessionOptions(options).Add(*domain);
    std::lock_guard<std::mutex> guard(lock);
    domains.push_back(std::move(domain));
  });
}
