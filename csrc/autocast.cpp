// torch.autocast for every stablenets op, as AutocastCPU / AutocastCUDA kernels.
//
// One boxed kernel serves every op (dense and conv, forward and backward,
// stored and reversible); it casts the op's floating tensor arguments, then
// calls the op again with that autocast key excluded:
//
// - forward ops: to the autocast dtype ("lower precision" policy), so a stack
//   takes what the layers before it hand over (an nn.Linear under autocast
//   returns bfloat16 from float32 inputs) and returns the autocast dtype, as
//   nn.Linear and nn.Conv2d do. at::autocast::cached_cast reuses the cast of a
//   leaf parameter within one autocast region, as ATen's own ops do (tensors of
//   1 MiB and more go through stablenets::cpu_cast on the CPU, see cast());
// - backward ops: to the widest dtype among them ("promote"; nothing is cast
//   when they agree, as they do when autograd calls them);
// - the reversible forward (a leapfrog/Verlet forward with store=False while
//   gradients are wanted), whose final pair is what the backward rebuilds every
//   state from: run in float32, only the returned tensors cast down.
//
// Every op on the CPU takes float32 parameters with bfloat16/float16 activations
// and returns float32 parameter gradients: there `weight` and `bias` are never
// cast, and a backward op promotes only its other tensors among themselves. The
// conv ops cast the kernels while laying them out (conv_stack.h); the narrow dense
// stacks read the parameters as float32 anyway and sum their gradients in float32;
// the wide ones cast the weight for their bfloat16 GEMMs into the kernels' block
// cache and sum the bias gradient in float32 (csrc/cpu/tile.h). That saves a
// training step the autograd nodes of two casts per stack, and the parameters'
// gradients round once (the bias gradient of a wide stack not at all). On CUDA
// the parameters are cast as above.
//
// float64 tensors are left alone, as autocast leaves them (a float64 stack
// under autocast then refuses the cast parameters by name, as F.linear would).
//
// These kernels serve eager calls. torch.compile and torch.export trace with
// the Python dispatcher, which runs the same policy from
// stablenets_ext/autocast.py (OpOverload.py_impl); python_tests/test_amp.py
// checks that both agree.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <string_view>

namespace stablenets {
namespace autocast {

bool ends_with(std::string_view s, std::string_view tail) {
  return s.size() >= tail.size() && s.substr(s.size() - tail.size()) == tail;
}

// Floating point but not float64: what autocast casts (device checked by cached_cast).
bool eligible(const at::Tensor& t) {
  return t.defined() && t.is_floating_point() && t.scalar_type() != at::kDouble;
}

int bits(at::ScalarType t) { return static_cast<int>(c10::elementSize(t)) * 8; }

// Tensors at least this large are cast on the CPU with stablenets::cpu_cast (the CPU
// kernels' block cache, csrc/cpu/block_cache.cpp), whose gradient is cast back the
// same way: through .to() a training step's large weight cast and its float32
// gradient were fresh blocks, page-faulted in every step. The Python policy
// (stablenets_ext/autocast.py, _CACHED_CAST_MIN_BYTES) draws the same line.
constexpr int64_t kCachedCastMinBytes = int64_t{1} << 20;

at::Tensor cast(const at::Tensor& t, at::ScalarType to, c10::DeviceType dev) {
  if (dev == c10::DeviceType::CPU && t.is_cpu() &&
      t.numel() * static_cast<int64_t>(c10::elementSize(to)) >= kCachedCastMinBytes) {
    // Looked up per call (only large tensors come here): the op lives in the CPU
    // kernel library, which is loaded after this one.
    auto handle = c10::Dispatcher::singleton().findSchema({"stablenets::cpu_cast", ""});
    if (handle) return handle->typed<at::Tensor(const at::Tensor&, at::ScalarType)>().call(t, to);
  }
  return at::autocast::cached_cast(to, t, dev);
}

bool is_param(const c10::FunctionSchema& schema, size_t i) {
  const std::string& n = schema.arguments()[i].name();
  return n == "weight" || n == "bias";
}

// On the CPU every op's float32 weight and bias pass uncast (see the top).
bool float32_params(c10::DeviceType dev) { return dev == c10::DeviceType::CPU; }

// leapfrog/verlet forwards (dense or conv): the ones with a reversible mode.
bool pair_forward(std::string_view name) {
  return ends_with(name, "leapfrog_forward") || ends_with(name, "verlet_forward");
}

template <c10::DeviceType Dev, c10::DispatchKey Key>
void kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const std::string_view name = schema.name();
  const size_t n_args = schema.arguments().size();
  auto args_begin = stack->end() - static_cast<std::ptrdiff_t>(n_args);

  at::ScalarType target = at::ScalarType::Undefined;
  at::ScalarType outputs_to = at::ScalarType::Undefined;
  const bool keep_params = float32_params(Dev);
  if (ends_with(name, "_forward")) {
    target = at::autocast::get_autocast_dtype(Dev);
    // The last argument of every forward is `store`.
    if (pair_forward(name) && !stack->back().toBool() && c10::GradMode::is_enabled()) {
      bool wants_grad = false;
      for (auto it = args_begin; it != stack->end(); ++it) {
        if (it->isTensor() && it->toTensor().requires_grad()) wants_grad = true;
      }
      if (wants_grad) {
        outputs_to = target;
        target = at::kFloat;
      }
    }
  } else {
    for (auto it = args_begin; it != stack->end(); ++it) {
      if (!it->isTensor() || !eligible(it->toTensor())) continue;
      if (keep_params && is_param(schema, static_cast<size_t>(it - args_begin))) continue;
      const at::ScalarType t = it->toTensor().scalar_type();
      if (target == at::ScalarType::Undefined || bits(t) > bits(target)) target = t;
    }
  }
  // a reversible forward (target float32) casts its parameters like the rest
  const bool skip_params = keep_params && target != at::kFloat;
  if (target != at::ScalarType::Undefined) {
    for (auto it = args_begin; it != stack->end(); ++it) {
      if (!it->isTensor()) continue;
      if (skip_params && is_param(schema, static_cast<size_t>(it - args_begin))) continue;
      const at::Tensor& t = it->toTensor();
      if (eligible(t) && t.scalar_type() != target) *it = cast(t, target, Dev);
    }
  }
  {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
    op.callBoxed(stack);
  }
  if (outputs_to != at::ScalarType::Undefined) {
    const size_t n_out = schema.returns().size();
    for (auto it = stack->end() - static_cast<std::ptrdiff_t>(n_out); it != stack->end(); ++it) {
      if (it->isTensor() && eligible(it->toTensor())) *it = it->toTensor().to(outputs_to);
    }
  }
}

constexpr const char* kOps[] = {
    "resnet_forward", "resnet_backward", "antisymmetric_forward", "antisymmetric_backward",
    "leapfrog_forward", "leapfrog_backward", "leapfrog_backward_reversible", "verlet_forward",
    "verlet_backward", "verlet_backward_reversible"};

template <c10::DeviceType Dev, c10::DispatchKey Key>
void register_all(torch::Library& m) {
  for (const char* prefix : {"", "conv_"}) {
    for (const char* name : kOps) {
      const std::string full = std::string(prefix) + name;
      m.impl(full.c_str(), torch::CppFunction::makeFromBoxedFunction<&kernel<Dev, Key>>());
    }
  }
}

}  // namespace autocast
}  // namespace stablenets

TORCH_LIBRARY_IMPL(stablenets, AutocastCPU, m) {
  namespace A = stablenets::autocast;
  A::register_all<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>(m);
}

TORCH_LIBRARY_IMPL(stablenets, AutocastCUDA, m) {
  namespace A = stablenets::autocast;
  A::register_all<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>(m);
}
