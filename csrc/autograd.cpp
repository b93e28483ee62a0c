// The autograd formulas of the dense and the convolutional stacks, in C++, for
// the Autograd key.
//
// A training step through a small stack (B, d, N) = (1024, 4, 64) spends about
// as long in its kernels as a Python autograd wrapper spends around them (and a
// one-layer conv stage at 7x7 spends a tenth of its step there), so the
// formulas live here: a module call goes from the dispatcher straight into
// an autograd Node, whose backward calls the matching backward op
// below autograd. The conv ops (conv_*) share the dense ops' schemas and
// formulas; they differ only in reading incoming gradients in any layout (no
// contiguous copy of a broadcast gradient). Python is entered only where it is needed:
//
// - a backward that must itself be differentiable (create_graph=True, or a
//   transform over the backward: batched gradients, vectorized jacobians)
//   recomputes through stablenets_ext.reference, by calling back the function
//   ops.py hands to set_reference_vjp (the backward ops have no derivative);
// - torch.func transforms and forward-mode AD are refused by name (the
//   functional layer routes them to the reference before any op runs).
//
// The reversible backward compares the initial pair it rebuilt with the one the
// forward saw and warns when reversibility was lost. On the CPU that is one
// pass over 2 x B x d numbers, every call; on CUDA the error is reduced on the
// device and read back through an event, never a host sync, on one call in
// kCudaCheckEvery (flush_reversibility_checks() waits for the pending ones).
// Nothing is read back while tracing (torch.compile, export, opcheck, make_fx)
// or during CUDA graph capture.
#include <Python.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <atomic>
#include <cmath>
#include <deque>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef STABLENETS_WITH_CUDA
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace stablenets {
namespace autograd {

using at::Tensor;
using torch::autograd::variable_list;

// ------------------------------------------------------------------ modes

// What torch._C._are_functorch_transforms_active() reads.
bool transforms_active() {
  auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// A dual tensor of torch.autograd.forward_ad (level 0, the only one Python opens).
bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

// torch._vmap_internals' batching, which gradcheck's batched-gradient check and
// autograd.grad(is_grads_batched=True) use and which sets no functorch level.
bool legacy_batched(const Tensor& t) { return t.defined() && at::isBatchedTensor(t); }

// Real numbers on this process's memory: not traced (fake, functional or proxy
// tensors, a dispatch mode), not meta, not under CUDA graph capture. Only then
// may a value be read back.
bool readable(const Tensor& t) {
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  constexpr auto traced = c10::DispatchKeySet({c10::DispatchKey::Python,
                                               c10::DispatchKey::PythonTLSSnapshot,
                                               c10::DispatchKey::Functionalize});
  if (t.key_set().has_any(traced) || t.is_meta()) return false;
#ifdef STABLENETS_WITH_CUDA
  if (t.is_cuda() &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return false;
  }
#endif
  return true;
}

// arch: the stack ("resnet", ..., "conv_verlet"), whose forward op is refused.
void refuse_transforms(const char* arch, std::initializer_list<const Tensor*> tensors) {
  bool refuse = transforms_active();
  for (const Tensor* t : tensors) refuse = refuse || has_tangent(*t);
  TORCH_CHECK(!refuse, "stablenets::", arch, "_forward",
              ": the fused ops support reverse-mode autograd only, not torch.func transforms "
              "(grad, jacrev, jacfwd, hessian, vmap, jvp) or forward-mode AD. Call the stack "
              "through stablenets_ext.functional or the modules, which run the reference "
              "implementation under these, or use stablenets_ext.reference.");
}

bool any_requires_grad(std::initializer_list<const Tensor*> tensors) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const Tensor* t : tensors) {
    if (t->requires_grad()) return true;
  }
  return false;
}

// create_graph=True, or a transform over the backward itself: the backward ops
// serve neither, the reference's autograd serves both.
bool differentiable_backward_wanted(const variable_list& grads) {
  if (c10::GradMode::is_enabled() || transforms_active()) return true;
  for (const Tensor& g : grads) {
    if (legacy_batched(g) || has_tangent(g)) return true;
  }
  return false;
}

// ---------------------------------------------------- the reference callback

PyObject* g_reference_vjp = nullptr;  // owned; set once by ops.py

// The gradients of the reference stack with respect to `inputs` (those marked
// in `needs`), as differentiable functions of inputs and grads.
variable_list reference_vjp(const char* arch, const variable_list& inputs,
                            const variable_list& grads, double step, double gamma,
                            const std::string& act, const std::vector<bool>& needs) {
  pybind11::gil_scoped_acquire gil;
  TORCH_CHECK(g_reference_vjp != nullptr,
              "stablenets: double backward needs stablenets_ext.ops, which was not imported");
  // An undefined gradient (an output nobody used) reaches Python as None.
  std::vector<std::optional<Tensor>> gs;
  for (const Tensor& g : grads) gs.emplace_back(g.defined() ? std::optional<Tensor>(g) : std::nullopt);
  auto fn = pybind11::reinterpret_borrow<pybind11::object>(g_reference_vjp);
  pybind11::object out = fn(std::string(arch), inputs, gs, step, gamma, act, needs);
  auto got = out.cast<std::vector<std::optional<Tensor>>>();
  variable_list res;
  for (auto& g : got) res.push_back(g.has_value() ? *g : Tensor());
  return res;
}

// ------------------------------------------------------------ reversibility

constexpr int64_t kCudaCheckEvery = 16;

std::string lost_message(const std::string& arch, double err, double tol) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1e (> %.1e)", err, tol);
  return "stablenets " + arch + " reversible backward: the initial state rebuilt by running the "
         "stack in reverse is off by a relative error of " + buf + ", so reversibility was lost "
         "(step too large, weights unstable, or too deep for the dtype) and the gradients are "
         "inaccurate. Use reversible=False to differentiate with stored states.";
}

void warn_if_lost(const std::string& arch, double err, double tol) {
  if (!(err <= tol)) TORCH_WARN(lost_message(arch, std::isfinite(err) ? err : INFINITY, tol));
}

// sqrt(eps): half the digits (ops.REBUILD_TOLERANCE, which the conv stacks use).
double tolerance(at::ScalarType dtype) {
  double tol = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "stablenets_tolerance", [&] {
    tol = std::sqrt(static_cast<double>(std::numeric_limits<scalar_t>::epsilon()));
  });
  return tol;
}

// || rebuilt - seen || / || seen || over the pair, accumulated in double.
double rebuild_error_cpu(const Tensor& ra, const Tensor& rb, const Tensor& sa, const Tensor& sb) {
  double num = 0, den = 0;
  for (auto [r, s] : {std::pair<const Tensor&, const Tensor&>{ra, sa}, {rb, sb}}) {
    Tensor rc = r.contiguous(), sc = s.contiguous();
    const int64_t n = sc.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "stablenets_rebuild", [&] {
      const scalar_t* rp = rc.const_data_ptr<scalar_t>();
      const scalar_t* sp = sc.const_data_ptr<scalar_t>();
      // A vectorised reduction (the order of the sums is free): this runs on every
      // CPU reversible backward, 2 x B x d numbers.
      _Pragma("omp simd reduction(+ : num, den)")  // (#pragma cannot sit in a macro argument)
      for (int64_t i = 0; i < n; ++i) {
        const double sv = static_cast<double>(sp[i]);
        const double dv = static_cast<double>(rp[i]) - sv;
        num += dv * dv;
        den += sv * sv;
      }
    });
  }
  return std::sqrt(num / std::max(den, std::numeric_limits<double>::min()));
}

#ifdef STABLENETS_WITH_CUDA
struct PendingCheck {
  std::string arch;
  double tol;
  Tensor host;  // pinned, filled by the copy the event follows
  c10::cuda::CUDAEvent done;
};
std::mutex g_pending_mutex;
std::deque<PendingCheck> g_pending;
std::atomic<int64_t> g_cuda_calls{0};

// Warn for the finished checks (all of them, waiting, with `wait`).
void poll_pending(bool wait) {
  std::vector<std::tuple<std::string, double, double>> lost;
  {
    std::lock_guard<std::mutex> lock(g_pending_mutex);
    while (!g_pending.empty()) {
      PendingCheck& p = g_pending.front();
      if (wait) {
        p.done.synchronize();
      } else if (!p.done.query()) {
        break;
      }
      lost.emplace_back(p.arch, p.host.item<double>(), p.tol);
      g_pending.pop_front();
    }
  }
  for (auto& [arch, err, tol] : lost) warn_if_lost(arch, err, tol);
}

void check_cuda(const std::string& arch, const Tensor& ra, const Tensor& rb, const Tensor& sa,
                const Tensor& sb) {
  poll_pending(false);
  if (g_cuda_calls.fetch_add(1) % kCudaCheckEvery != 0) return;
  at::NoGradGuard no_grad;
  auto sq = [](const Tensor& t) { return t.to(at::kDouble).square().sum(); };
  Tensor num = sq(ra - sa) + sq(rb - sb);
  Tensor den = sq(sa) + sq(sb);
  Tensor err = (num / den.clamp_min(std::numeric_limits<double>::min())).sqrt().reshape({1});
  Tensor host = at::empty({1}, err.options().device(at::kCPU).pinned_memory(true));
  host.copy_(err, /*non_blocking=*/true);
  PendingCheck p{arch, tolerance(sa.scalar_type()), host, c10::cuda::CUDAEvent()};
  p.done.record(c10::cuda::getCurrentCUDAStream(sa.device().index()));
  std::lock_guard<std::mutex> lock(g_pending_mutex);
  g_pending.push_back(std::move(p));
}
#endif

void check_rebuilt(const std::string& arch, const Tensor& ra, const Tensor& rb, const Tensor& sa,
                   const Tensor& sb) {
  if (!readable(sa) || !readable(ra)) return;
  if (sa.is_cpu()) {
    warn_if_lost(arch, rebuild_error_cpu(ra, rb, sa, sb), tolerance(sa.scalar_type()));
    return;
  }
#ifdef STABLENETS_WITH_CUDA
  if (sa.is_cuda()) check_cuda(arch, ra, rb, sa, sb);
#endif
}

void flush_checks() {
#ifdef STABLENETS_WITH_CUDA
  poll_pending(true);
#endif
}

// ------------------------------------------------------------------- ops

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<Sig>();
}

using T2 = std::tuple<Tensor, Tensor>;
using T3 = std::tuple<Tensor, Tensor, Tensor>;
using T4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using T6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Str = c10::string_view;
using TR = const Tensor&;

using ResnetFwd = T2(TR, TR, TR, double, Str, bool);
using ResnetBwd = T3(TR, TR, TR, TR, double, Str);
using AntiFwd = T2(TR, TR, TR, double, double, Str, bool);
using AntiBwd = T3(TR, TR, TR, TR, double, double, Str);
using TwoFwd = T3(TR, TR, TR, TR, double, Str, bool);
using TwoBwd = T4(TR, TR, TR, TR, TR, double, Str);
using TwoRev = T6(TR, TR, TR, TR, TR, TR, double, Str);

// Looked up once: the schemas are registered by the time an autograd kernel runs.
// prefix "" names the dense ops, "conv_" the convolutional ones.
struct Ops {
  explicit Ops(const std::string& prefix)
      : resnet_fwd(op<ResnetFwd>(name(prefix, "resnet_forward"))),
        resnet_bwd(op<ResnetBwd>(name(prefix, "resnet_backward"))),
        anti_fwd(op<AntiFwd>(name(prefix, "antisymmetric_forward"))),
        anti_bwd(op<AntiBwd>(name(prefix, "antisymmetric_backward"))),
        leap_fwd(op<TwoFwd>(name(prefix, "leapfrog_forward"))),
        leap_bwd(op<TwoBwd>(name(prefix, "leapfrog_backward"))),
        leap_rev(op<TwoRev>(name(prefix, "leapfrog_backward_reversible"))),
        verlet_fwd(op<TwoFwd>(name(prefix, "verlet_forward"))),
        verlet_bwd(op<TwoBwd>(name(prefix, "verlet_backward"))),
        verlet_rev(op<TwoRev>(name(prefix, "verlet_backward_reversible"))) {}
  static std::string name(const std::string& prefix, const char* op) {
    return "stablenets::" + prefix + op;
  }
  c10::TypedOperatorHandle<ResnetFwd> resnet_fwd;
  c10::TypedOperatorHandle<ResnetBwd> resnet_bwd;
  c10::TypedOperatorHandle<AntiFwd> anti_fwd;
  c10::TypedOperatorHandle<AntiBwd> anti_bwd;
  c10::TypedOperatorHandle<TwoFwd> leap_fwd;
  c10::TypedOperatorHandle<TwoBwd> leap_bwd;
  c10::TypedOperatorHandle<TwoRev> leap_rev;
  c10::TypedOperatorHandle<TwoFwd> verlet_fwd;
  c10::TypedOperatorHandle<TwoBwd> verlet_bwd;
  c10::TypedOperatorHandle<TwoRev> verlet_rev;
};

const Ops& ops(bool conv) {
  static const Ops dense(""), convs("conv_");
  return conv ? convs : dense;
}

// Which stack a call is: bit 0 the second of the pair (antisymmetric after
// resnet, verlet after leapfrog), bit 1 the conv ops. One integer in the saved
// tuple instead of two flags.
constexpr int64_t kSecond = 1, kConv = 2;

const char* arch_name(int64_t kind, bool two) {
  static const char* names[2][4] = {{"resnet", "antisymmetric", "conv_resnet", "conv_antisymmetric"},
                                    {"leapfrog", "verlet", "conv_leapfrog", "conv_verlet"}};
  return names[two][kind];
}

// The incoming gradient as the backward op takes it: the dense ops read
// contiguous memory; the conv ops read any layout (a broadcast gradient from
// .sum() is not materialised). An output nobody used gets zeros.
Tensor incoming(const Tensor& g, const Tensor& like, bool conv) {
  if (g.defined()) return conv ? g : g.contiguous();
  if (conv) return at::zeros({}, like.options()).expand(like.sizes());
  return at::zeros_like(like);
}

// ----------------------------------------- resnet / antisymmetric: one state

// kind & kSecond: the antisymmetric stack (with its gamma), else the ResNet stack.
T2 one_forward_op(int64_t kind, TR y, TR w, TR b, double step, double gamma, Str act, bool store) {
  at::AutoDispatchBelowADInplaceOrView below;
  const Ops& o = ops(kind & kConv);
  if (!(kind & kSecond)) return o.resnet_fwd.call(y, w, b, step, act, store);
  return o.anti_fwd.call(y, w, b, step, gamma, act, store);
}

// The backward nodes are plain autograd Nodes, as PyTorch's own generated
// formulas are, rather than torch::autograd::Function: no saved_data map, no
// per-call wrapping of the outputs (a few microseconds of every step of a small
// stack).
using torch::autograd::SavedVariable;

// Node ownership changed across torch releases (std::shared_ptr with a custom
// deleter up to ~2.11, c10::intrusive_ptr in 2.14): make the node the way this
// torch's Node wants, chosen at compile time.
template <class N, bool Intrusive = std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>>
struct NodeMaker;
template <class N>
struct NodeMaker<N, true> {
  static auto make() { return c10::make_intrusive<N>(); }
};
template <class N>
struct NodeMaker<N, false> {
  static auto make() { return std::shared_ptr<N>(new N()); }
};

struct OneStateBackward final : public torch::autograd::Node {
  SavedVariable states_, y_, w_, b_;
  int64_t kind_ = 0;
  double step_ = 0, gamma_ = 0;
  std::string act_;
  bool store_ = true;

  std::string name() const override {
    return std::string("stablenets::") + arch_name(kind_, false) + "_forward StateBackward";
  }
  void release_variables() override {
    states_.reset_data();
    y_.reset_data();
    w_.reset_data();
    b_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const bool anti = kind_ & kSecond, conv = kind_ & kConv;
    const char* arch = arch_name(kind_, false);
    TORCH_CHECK(store_, "stablenets::", arch,
                "_forward ran with store=False, so it kept no states for the backward; call it "
                "with store=True when gradients are needed");
    const Tensor states = states_.unpack(), y = y_.unpack(), w = w_.unpack(), b = b_.unpack();
    Tensor g = incoming(grads[0], y, conv);
    variable_list res(3);
    if (differentiable_backward_wanted({g})) {
      // Every input that requires grad, not only those this backward is asked for:
      // the gradients are functions of all of them (a gradient penalty on y alone
      // still differentiates through the weights).
      std::vector<bool> needs{y.requires_grad(), w.requires_grad(), b.requires_grad()};
      auto r = reference_vjp(arch, {y, w, b}, {g}, step_, gamma_, act_, needs);
      std::copy(r.begin(), r.end(), res.begin());
      return res;
    }
    at::AutoDispatchBelowADInplaceOrView below;
    const Ops& o = ops(conv);
    T3 out = anti ? o.anti_bwd.call(g, states, w, b, step_, gamma_, act_)
                  : o.resnet_bwd.call(g, states, w, b, step_, act_);
    std::tie(res[0], res[1], res[2]) = std::move(out);
    return res;
  }
};

T2 one_autograd(int64_t kind, TR y, TR w, TR b, double step, double gamma, Str act, bool store) {
  refuse_transforms(arch_name(kind, false), {&y, &w, &b});
  auto [out, states] = one_forward_op(kind, y, w, b, step, gamma, act, store);
  if (!any_requires_grad({&y, &w, &b})) return {out, states};
  auto node = NodeMaker<OneStateBackward>::make();
  node->set_next_edges(torch::autograd::collect_next_edges(y, w, b));
  // The states are what the backward reads, not a result to differentiate: they
  // get no history (so no gradient of their size is ever made).
  node->states_ = SavedVariable(states, false);
  node->y_ = SavedVariable(y, false);
  node->w_ = SavedVariable(w, false);
  node->b_ = SavedVariable(b, false);
  node->kind_ = kind;
  node->step_ = step;
  node->gamma_ = gamma;
  node->act_ = std::string(act);
  node->store_ = store;
  torch::autograd::set_history(out, node);
  return {out, states};
}

template <int64_t Kind>
T2 resnet_forward(TR y, TR w, TR b, double step, Str act, bool store) {
  return one_autograd(Kind, y, w, b, step, 0.0, act, store);
}

template <int64_t Kind>
T2 antisymmetric_forward(TR y, TR w, TR b, double step, double gamma, Str act, bool store) {
  return one_autograd(Kind | kSecond, y, w, b, step, gamma, act, store);
}

// ------------------------------------------------ leapfrog / verlet: a pair

T3 two_forward_op(int64_t kind, TR y, TR other, TR w, TR b, double step, Str act, bool store) {
  at::AutoDispatchBelowADInplaceOrView below;
  const Ops& o = ops(kind & kConv);
  return ((kind & kSecond) ? o.verlet_fwd : o.leap_fwd).call(y, other, w, b, step, act, store);
}

// Without stored states the backward runs the integrator in reverse from the
// final pair and checks the pair it arrives at against the inputs.
struct TwoStateBackward final : public torch::autograd::Node {
  SavedVariable y_, other_, w_, b_, states_, ya_, yb_;  // states (stored) or the final pair
  int64_t kind_ = 0;
  double step_ = 0;
  std::string act_;
  bool store_ = true;

  std::string name() const override {
    return std::string("stablenets::") + arch_name(kind_, true) + "_forward StateBackward";
  }
  void release_variables() override {
    for (SavedVariable* v : {&y_, &other_, &w_, &b_, &states_, &ya_, &yb_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const bool verlet = kind_ & kSecond, conv = kind_ & kConv;
    const char* arch = arch_name(kind_, true);
    const Tensor y0 = y_.unpack(), other0 = other_.unpack(), w = w_.unpack(), b = b_.unpack();
    variable_list res(4);
    if (differentiable_backward_wanted({grads[0], grads[1]})) {
      std::vector<bool> needs;  // as for OneStateBackward
      for (const Tensor* t : {&y0, &other0, &w, &b}) needs.push_back(t->requires_grad());
      auto r = reference_vjp(arch, {y0, other0, w, b}, {grads[0], grads[1]}, step_, 0.0, act_,
                             needs);
      std::copy(r.begin(), r.end(), res.begin());
      return res;
    }
    Tensor ga = incoming(grads[0], y0, conv);
    Tensor gb = incoming(grads[1], y0, conv);
    at::AutoDispatchBelowADInplaceOrView below;
    const Ops& o = ops(conv);
    if (store_) {
      std::tie(res[0], res[1], res[2], res[3]) =
          (verlet ? o.verlet_bwd : o.leap_bwd).call(ga, gb, states_.unpack(), w, b, step_, act_);
      return res;
    }
    // the final pair is this node's own output: unpacked against this node
    const auto self = getptr();
    Tensor ra, rb;
    std::tie(res[0], res[1], res[2], res[3], ra, rb) =
        (verlet ? o.verlet_rev : o.leap_rev)
            .call(ga, gb, ya_.unpack(self), yb_.unpack(self), w, b, step_, act_);
    check_rebuilt(arch, ra, rb, y0, other0);
    return res;
  }
};

T3 two_autograd(int64_t kind, TR y, TR other, TR w, TR b, double step, Str act, bool store) {
  refuse_transforms(arch_name(kind, true), {&y, &other, &w, &b});
  auto [ya, yb, states] = two_forward_op(kind, y, other, w, b, step, act, store);
  if (!any_requires_grad({&y, &other, &w, &b})) return {ya, yb, states};
  auto node = NodeMaker<TwoStateBackward>::make();
  node->set_next_edges(torch::autograd::collect_next_edges(y, other, w, b));
  node->y_ = SavedVariable(y, false);
  node->other_ = SavedVariable(other, false);
  node->w_ = SavedVariable(w, false);
  node->b_ = SavedVariable(b, false);
  node->kind_ = kind;
  node->step_ = step;
  node->act_ = std::string(act);
  node->store_ = store;
  torch::autograd::set_history(ya, node);
  torch::autograd::set_history(yb, node);
  if (store) {
    node->states_ = SavedVariable(states, false);  // no history, as for OneStateBackward
  } else {
    node->ya_ = SavedVariable(ya, true);
    node->yb_ = SavedVariable(yb, true);
  }
  return {ya, yb, states};
}

template <int64_t Kind>
T3 leapfrog_forward(TR y, TR y_prev, TR w, TR b, double step, Str act, bool store) {
  return two_autograd(Kind, y, y_prev, w, b, step, act, store);
}

template <int64_t Kind>
T3 verlet_forward(TR y, TR z, TR w, TR b, double step, Str act, bool store) {
  return two_autograd(Kind | kSecond, y, z, w, b, step, act, store);
}

// --------------------------------------------------- the backward ops: none

// The backward ops have no derivative of their own (a backward run with
// create_graph=True recomputes through the reference instead): refuse, naming
// the op, rather than return results that are silently constant.
void not_differentiable(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const auto n = op.schema().arguments().size();
  bool refuse = transforms_active();
  const bool grad = c10::GradMode::is_enabled();
  for (const c10::IValue& v : torch::jit::last(*stack, n)) {
    if (!v.isTensor()) continue;
    const Tensor& t = v.toTensor();
    refuse = refuse || has_tangent(t) || legacy_batched(t) || (grad && t.requires_grad());
  }
  TORCH_CHECK(!refuse, op.schema().name(),
              " is not differentiable (and serves no torch.func transform or forward-mode AD). "
              "Differentiate the forward op instead: its backward supports create_graph=True; or "
              "use stablenets_ext.reference.");
  at::AutoDispatchBelowADInplaceOrView below;
  op.callBoxed(stack);
}

}  // namespace autograd
}  // namespace stablenets

// ------------------------------------------------------- Python entry points

namespace {

PyObject* set_reference_vjp(PyObject*, PyObject* fn) {
  if (!PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "set_reference_vjp: expected a callable");
    return nullptr;
  }
  Py_INCREF(fn);
  Py_XDECREF(stablenets::autograd::g_reference_vjp);
  stablenets::autograd::g_reference_vjp = fn;
  Py_RETURN_NONE;
}

PyObject* flush_reversibility_checks(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  {
    pybind11::gil_scoped_release no_gil;
    stablenets::autograd::flush_checks();
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace

// ops.cpp's module: stablenets_ext._C.
PyMethodDef stablenets_module_methods[] = {
    {"set_reference_vjp", set_reference_vjp, METH_O,
     "Set the function a differentiable backward calls: fn(arch, inputs, grads, step, gamma, "
     "activation, needs) -> gradients (None where not needed)."},
    {"flush_reversibility_checks", flush_reversibility_checks, METH_NOARGS,
     "Wait for the pending reversibility checks of CUDA reversible backwards and warn for "
     "those that lost reversibility."},
    {nullptr, nullptr, 0, nullptr}};

TORCH_LIBRARY_IMPL(stablenets, Autograd, m) {
  namespace A = stablenets::autograd;
  m.impl("resnet_forward", &A::resnet_forward<0>);
  m.impl("antisymmetric_forward", &A::antisymmetric_forward<0>);
  m.impl("leapfrog_forward", &A::leapfrog_forward<0>);
  m.impl("verlet_forward", &A::verlet_forward<0>);
  m.impl("conv_resnet_forward", &A::resnet_forward<A::kConv>);
  m.impl("conv_antisymmetric_forward", &A::antisymmetric_forward<A::kConv>);
  m.impl("conv_leapfrog_forward", &A::leapfrog_forward<A::kConv>);
  m.impl("conv_verlet_forward", &A::verlet_forward<A::kConv>);
  for (const char* prefix : {"", "conv_"}) {
    for (const char* name : {"resnet_backward", "antisymmetric_backward", "leapfrog_backward",
                             "leapfrog_backward_reversible", "verlet_backward",
                             "verlet_backward_reversible"}) {
      const std::string op = std::string(prefix) + name;  // copied by the registration
      m.impl(op.c_str(), torch::CppFunction::makeFromBoxedFunction<&A::not_differentiable>());
    }
  }
}
