// ctest program: every CPU kernel of stablenets::cpu against naive loops.
//
// The naive loops below are plain C++ over std::vector (no ATen): a forward and
// a hand-written reverse-mode backward per architecture, run in double as the
// reference. Before they judge anything they are checked themselves: every
// gradient entry of a tiny problem against central differences of the naive
// forward. Then, for every architecture, activation, a narrow (d = 3, tile
// path) and a wide (d = 40, GEMM path) width, and float32 and float64:
//   - forward with store=true: outputs and every stored state slot (in the
//     documented (N, S, B, d) layout, or the tile layout narrow kernels may use);
//   - forward with store=false: outputs, and states with 0 layers;
//   - backward from the stored states, and (leapfrog, verlet) the reversible
//     backward from the final pair: gradients of sum(w1*out1 + w2*out2) for
//     random w1, w2 (resnet, antisymmetric: sum(w1*Y_N));
//   - a non-contiguous y and weight;
// and a few argument checks. Errors are max|got - ref| / max|ref|. The
// tolerance for a dtype is judged against the error the same naive loops make
// when run in that dtype (8x that, and never below 100 ulp of the dtype).
//
// Exit status 0 when every check passes; one line per check either way.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "stablenets/kernels.h"

// Narrow stacks may keep their stored states in the kernels' tile layout (see
// csrc/cpu/tile.h): the states are then only meaningful to the matching
// backward. The check below accepts that layout as well as the documented one.
#if __has_include("../cpu/tile.h")
#include "../cpu/tile.h"
constexpr int64_t kTileRows = stablenets::cpu_detail::kTile;
#else
constexpr int64_t kTileRows = 64;
#endif

namespace {

using Vec = std::vector<double>;

// ======================================================================
// Naive reference: plain loops, templated on the arithmetic type R.
// Layouts (row-major): y (B, d), K (N, d, d) with K[j](i, k) = K[(j*d + i)*d + k],
// b (N, d), states (N, S, B, d).
// ======================================================================

enum class NAct { Identity, Tanh, Relu, Sigmoid, Softplus, LeakyRelu, Silu };

NAct parse_act(const std::string& s) {
  if (s == "tanh") return NAct::Tanh;
  if (s == "relu") return NAct::Relu;
  if (s == "sigmoid") return NAct::Sigmoid;
  if (s == "softplus") return NAct::Softplus;
  if (s == "leaky_relu") return NAct::LeakyRelu;
  if (s == "silu") return NAct::Silu;
  return NAct::Identity;
}

template <typename R>
R naive_sigmoid(R p) {
  return R(1) / (R(1) + std::exp(-p));
}

template <typename R>
R act_f(NAct a, R p) {
  if (a == NAct::Tanh) return std::tanh(p);
  if (a == NAct::Relu) return p > R(0) ? p : R(0);
  if (a == NAct::Sigmoid) return naive_sigmoid(p);
  if (a == NAct::Softplus) return std::log(R(1) + std::exp(p));
  if (a == NAct::LeakyRelu) return p > R(0) ? p : R(0.01) * p;
  if (a == NAct::Silu) return p * naive_sigmoid(p);
  return p;
}

template <typename R>
R act_d(NAct a, R p) {
  if (a == NAct::Tanh) {
    const R t = std::tanh(p);
    return R(1) - t * t;
  }
  if (a == NAct::Relu) return p > R(0) ? R(1) : R(0);
  if (a == NAct::Sigmoid) return naive_sigmoid(p) * (R(1) - naive_sigmoid(p));
  if (a == NAct::Softplus) return naive_sigmoid(p);
  if (a == NAct::LeakyRelu) return p > R(0) ? R(1) : R(0.01);
  if (a == NAct::Silu) return naive_sigmoid(p) * (R(1) + p * (R(1) - naive_sigmoid(p)));
  return R(1);
}

struct Problem {
  std::string arch;
  int64_t N = 0, B = 0, d = 0;
  double h = 0.25, gamma = 0.05;
  std::string act;
  Vec y, y2, K, b;  // y2: Y_{-1} (leapfrog) or Z_{-1/2} (verlet); unused otherwise
  Vec w1, w2;       // loss = sum(w1 * out1 + w2 * out2)
};

bool two_state(const std::string& arch) { return arch == "leapfrog" || arch == "verlet"; }
int64_t slots(const std::string& arch) { return arch == "verlet" ? 4 : 2; }

template <typename R>
struct Result {
  std::vector<R> out1, out2, states;   // forward
  std::vector<R> g1, g2, gK, gb;       // backward: d loss / d (y, y2, K, b)
};

template <typename R>
std::vector<R> cast(const Vec& v) {
  return std::vector<R>(v.begin(), v.end());
}

// out(r, i) = sum_k X(r, k) M(i, k) + bias(i)           (X M^T + b), trans=false
// out(r, i) = sum_k X(r, k) M(k, i) + bias(i)           (X M + b),   trans=true
template <typename R>
void affine(const R* X, const R* M, const R* bias, int64_t B, int64_t d, bool trans, R* out) {
  for (int64_t r = 0; r < B; ++r)
    for (int64_t i = 0; i < d; ++i) {
      R s = bias[i];
      for (int64_t k = 0; k < d; ++k) s += X[r * d + k] * (trans ? M[k * d + i] : M[i * d + k]);
      out[r * d + i] = s;
    }
}

// A_j = (K_j - K_j^T - gamma I) / 2
template <typename R>
std::vector<R> antisym(const std::vector<R>& K, int64_t N, int64_t d, R gamma) {
  std::vector<R> A(K.size());
  for (int64_t j = 0; j < N; ++j)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t k = 0; k < d; ++k) {
        const R* Kj = K.data() + j * d * d;
        A[(j * d + i) * d + k] = R(0.5) * (Kj[i * d + k] - Kj[k * d + i] - (i == k ? gamma : R(0)));
      }
  return A;
}

// ---- resnet (also the antisymmetric stack, on A)
template <typename R>
void resnet_naive(const Problem& pb, const std::vector<R>& K, Result<R>& res) {
  const int64_t N = pb.N, B = pb.B, d = pb.d, bd = B * d;
  const NAct a = parse_act(pb.act);
  const R h = R(pb.h);
  const std::vector<R> b = cast<R>(pb.b);
  std::vector<R> Y = cast<R>(pb.y), P(bd);
  res.states.assign(N * 2 * bd, R(0));
  for (int64_t j = 0; j < N; ++j) {
    affine(Y.data(), K.data() + j * d * d, b.data() + j * d, B, d, false, P.data());
    std::copy(Y.begin(), Y.end(), res.states.begin() + (j * 2 + 0) * bd);
    std::copy(P.begin(), P.end(), res.states.begin() + (j * 2 + 1) * bd);
    for (int64_t e = 0; e < bd; ++e) Y[e] += h * act_f(a, P[e]);
  }
  res.out1 = Y;
  // backward of sum(w1 * Y_N)
  std::vector<R> L = cast<R>(pb.w1), G(bd);
  res.gK.assign(N * d * d, R(0));
  res.gb.assign(N * d, R(0));
  for (int64_t j = N - 1; j >= 0; --j) {
    const R* Yj = res.states.data() + (j * 2 + 0) * bd;
    const R* Pj = res.states.data() + (j * 2 + 1) * bd;
    const R* Kj = K.data() + j * d * d;
    for (int64_t e = 0; e < bd; ++e) G[e] = h * L[e] * act_d(a, Pj[e]);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t i = 0; i < d; ++i) {
        res.gb[j * d + i] += G[r * d + i];
        for (int64_t k = 0; k < d; ++k) res.gK[(j * d + i) * d + k] += G[r * d + i] * Yj[r * d + k];
      }
    for (int64_t r = 0; r < B; ++r)
      for (int64_t k = 0; k < d; ++k) {
        R s = R(0);
        for (int64_t i = 0; i < d; ++i) s += G[r * d + i] * Kj[i * d + k];
        L[r * d + k] += s;
      }
  }
  res.g1 = L;
}

template <typename R>
void antisymmetric_naive(const Problem& pb, Result<R>& res) {
  const std::vector<R> A = antisym(cast<R>(pb.K), pb.N, pb.d, R(pb.gamma));
  resnet_naive(pb, A, res);
  // A = (K - K^T - gamma I)/2  =>  dL/dK = (dL/dA - dL/dA^T)/2
  std::vector<R> gA = res.gK;
  const int64_t d = pb.d;
  for (int64_t j = 0; j < pb.N; ++j)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t k = 0; k < d; ++k)
        res.gK[(j * d + i) * d + k] =
            R(0.5) * (gA[(j * d + i) * d + k] - gA[(j * d + k) * d + i]);
}

// ---- leapfrog: Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 act(Y_j K_j^T + b_j) K_j
template <typename R>
void leapfrog_naive(const Problem& pb, Result<R>& res) {
  const int64_t N = pb.N, B = pb.B, d = pb.d, bd = B * d;
  const NAct a = parse_act(pb.act);
  const R h2 = R(pb.h) * R(pb.h);
  const std::vector<R> K = cast<R>(pb.K), b = cast<R>(pb.b);
  std::vector<R> Y = cast<R>(pb.y), Yp = cast<R>(pb.y2), P(bd), Yn(bd);
  res.states.assign(N * 2 * bd, R(0));
  for (int64_t j = 0; j < N; ++j) {
    const R* Kj = K.data() + j * d * d;
    affine(Y.data(), Kj, b.data() + j * d, B, d, false, P.data());
    std::copy(Y.begin(), Y.end(), res.states.begin() + (j * 2 + 0) * bd);
    std::copy(P.begin(), P.end(), res.states.begin() + (j * 2 + 1) * bd);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t k = 0; k < d; ++k) {
        R s = R(0);
        for (int64_t i = 0; i < d; ++i) s += act_f(a, P[r * d + i]) * Kj[i * d + k];
        Yn[r * d + k] = R(2) * Y[r * d + k] - Yp[r * d + k] - h2 * s;
      }
    Yp = Y;
    Y = Yn;
  }
  res.out1 = Y;
  res.out2 = Yp;
  // backward: gA = dL/dY_{j+1} (complete), gB = dL/dY_j (from later steps only)
  std::vector<R> gA = cast<R>(pb.w1), gB = cast<R>(pb.w2), M(bd), G(bd), nA(bd);
  res.gK.assign(N * d * d, R(0));
  res.gb.assign(N * d, R(0));
  for (int64_t j = N - 1; j >= 0; --j) {
    const R* Yj = res.states.data() + (j * 2 + 0) * bd;
    const R* Pj = res.states.data() + (j * 2 + 1) * bd;
    const R* Kj = K.data() + j * d * d;
    R* gKj = res.gK.data() + j * d * d;
    // S = act(P), F = S K, Y_{j+1} = ... - h^2 F
    for (int64_t r = 0; r < B; ++r)
      for (int64_t i = 0; i < d; ++i) {
        R s = R(0);  // dL/dS(r, i) = -h^2 sum_k gA(r, k) K(i, k)
        for (int64_t k = 0; k < d; ++k) s += gA[r * d + k] * Kj[i * d + k];
        M[r * d + i] = -h2 * s;
        G[r * d + i] = M[r * d + i] * act_d(a, Pj[r * d + i]);
      }
    for (int64_t r = 0; r < B; ++r)
      for (int64_t i = 0; i < d; ++i) {
        const R S = act_f(a, Pj[r * d + i]);
        res.gb[j * d + i] += G[r * d + i];
        for (int64_t k = 0; k < d; ++k)
          gKj[i * d + k] += S * (-h2 * gA[r * d + k]) + G[r * d + i] * Yj[r * d + k];
      }
    for (int64_t r = 0; r < B; ++r)
      for (int64_t k = 0; k < d; ++k) {
        R s = R(0);
        for (int64_t i = 0; i < d; ++i) s += G[r * d + i] * Kj[i * d + k];
        nA[r * d + k] = gB[r * d + k] + R(2) * gA[r * d + k] + s;
      }
    for (int64_t e = 0; e < bd; ++e) gB[e] = -gA[e];
    gA = nA;
  }
  res.g1 = gA;
  res.g2 = gB;
}

// ---- verlet: Z <- Z - h act(Y K_j + b_j); Y <- Y + h act(Z K_j^T + b_j)
template <typename R>
void verlet_naive(const Problem& pb, Result<R>& res) {
  const int64_t N = pb.N, B = pb.B, d = pb.d, bd = B * d;
  const NAct a = parse_act(pb.act);
  const R h = R(pb.h);
  const std::vector<R> K = cast<R>(pb.K), b = cast<R>(pb.b);
  std::vector<R> Y = cast<R>(pb.y), Z = cast<R>(pb.y2), P1(bd), P2(bd);
  res.states.assign(N * 4 * bd, R(0));
  for (int64_t j = 0; j < N; ++j) {
    const R* Kj = K.data() + j * d * d;
    const R* bj = b.data() + j * d;
    affine(Y.data(), Kj, bj, B, d, true, P1.data());
    std::copy(Y.begin(), Y.end(), res.states.begin() + (j * 4 + 0) * bd);
    std::copy(P1.begin(), P1.end(), res.states.begin() + (j * 4 + 1) * bd);
    for (int64_t e = 0; e < bd; ++e) Z[e] -= h * act_f(a, P1[e]);
    affine(Z.data(), Kj, bj, B, d, false, P2.data());
    std::copy(Z.begin(), Z.end(), res.states.begin() + (j * 4 + 2) * bd);
    std::copy(P2.begin(), P2.end(), res.states.begin() + (j * 4 + 3) * bd);
    for (int64_t e = 0; e < bd; ++e) Y[e] += h * act_f(a, P2[e]);
  }
  res.out1 = Y;
  res.out2 = Z;
  std::vector<R> gY = cast<R>(pb.w1), gZ = cast<R>(pb.w2), G(bd);
  res.gK.assign(N * d * d, R(0));
  res.gb.assign(N * d, R(0));
  for (int64_t j = N - 1; j >= 0; --j) {
    const R* Yj = res.states.data() + (j * 4 + 0) * bd;
    const R* P1j = res.states.data() + (j * 4 + 1) * bd;
    const R* Zj = res.states.data() + (j * 4 + 2) * bd;
    const R* P2j = res.states.data() + (j * 4 + 3) * bd;
    const R* Kj = K.data() + j * d * d;
    R* gKj = res.gK.data() + j * d * d;
    // Y_{j+1} = Y_j + h act(P2), P2 = Z K^T + b
    for (int64_t e = 0; e < bd; ++e) G[e] = h * gY[e] * act_d(a, P2j[e]);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t i = 0; i < d; ++i) {
        res.gb[j * d + i] += G[r * d + i];
        for (int64_t k = 0; k < d; ++k) gKj[i * d + k] += G[r * d + i] * Zj[r * d + k];
      }
    for (int64_t r = 0; r < B; ++r)
      for (int64_t k = 0; k < d; ++k) {
        R s = R(0);
        for (int64_t i = 0; i < d; ++i) s += G[r * d + i] * Kj[i * d + k];
        gZ[r * d + k] += s;
      }
    // Z_{j+1/2} = Z_{j-1/2} - h act(P1), P1(r, i) = sum_k Y(r, k) K(k, i) + b(i)
    for (int64_t e = 0; e < bd; ++e) G[e] = -h * gZ[e] * act_d(a, P1j[e]);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t i = 0; i < d; ++i) {
        res.gb[j * d + i] += G[r * d + i];
        for (int64_t k = 0; k < d; ++k) gKj[k * d + i] += Yj[r * d + k] * G[r * d + i];
      }
    for (int64_t r = 0; r < B; ++r)
      for (int64_t k = 0; k < d; ++k) {
        R s = R(0);
        for (int64_t i = 0; i < d; ++i) s += G[r * d + i] * Kj[k * d + i];
        gY[r * d + k] += s;
      }
  }
  res.g1 = gY;
  res.g2 = gZ;
}

template <typename R>
Result<R> run_naive(const Problem& pb) {
  Result<R> res;
  if (pb.arch == "resnet") {
    resnet_naive(pb, cast<R>(pb.K), res);
  } else if (pb.arch == "antisymmetric") {
    antisymmetric_naive(pb, res);
  } else if (pb.arch == "leapfrog") {
    leapfrog_naive(pb, res);
  } else {
    verlet_naive(pb, res);
  }
  return res;
}

double naive_loss(const Problem& pb) {
  const Result<double> r = run_naive<double>(pb);
  double s = 0;
  for (size_t e = 0; e < r.out1.size(); ++e) s += pb.w1[e] * r.out1[e];
  for (size_t e = 0; e < r.out2.size(); ++e) s += pb.w2[e] * r.out2[e];
  return s;
}

// ======================================================================
// Problems, tensors, comparisons
// ======================================================================

std::mt19937_64 rng(20171201);

Vec randn(int64_t n, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

Problem make_problem(const std::string& arch, const std::string& act, int64_t N, int64_t B,
                     int64_t d) {
  Problem pb;
  pb.arch = arch;
  pb.act = act;
  pb.N = N;
  pb.B = B;
  pb.d = d;
  pb.y = randn(B * d, 1.0);
  pb.y2 = two_state(arch) ? randn(B * d, arch == "verlet" ? 0.5 : 1.0) : Vec();
  if (arch == "leapfrog")  // Y_{-1} near Y_0: a moderate initial velocity
    for (int64_t e = 0; e < B * d; ++e) pb.y2[e] = pb.y[e] + 0.1 * pb.y2[e];
  pb.K = randn(N * d * d, 1.0 / std::sqrt(double(d)));
  pb.b = randn(N * d, 0.3);
  pb.w1 = randn(B * d, 1.0);
  pb.w2 = two_state(arch) ? randn(B * d, 1.0) : Vec();
  return pb;
}

// Inputs rounded to dtype T, so the reference sees exactly what the kernel sees.
template <typename T>
Problem rounded(Problem pb) {
  for (Vec* v : {&pb.y, &pb.y2, &pb.K, &pb.b, &pb.w1, &pb.w2})
    for (auto& x : *v) x = double(T(x));
  pb.h = double(T(pb.h));
  pb.gamma = double(T(pb.gamma));
  return pb;
}

at::Tensor tensor(const Vec& v, std::vector<int64_t> shape, at::ScalarType dt) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t.to(dt);
}

Vec to_vec(const at::Tensor& t) {
  at::Tensor c = t.to(at::kDouble).contiguous();
  return Vec(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// max|got - ref| / max|ref| (denominator floored at 1e-12); inf on a size mismatch or NaN.
template <typename V>
double rel_err(const Vec& got, const V& ref) {
  if (got.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (size_t e = 0; e < ref.size(); ++e) {
    const double diff = std::fabs(got[e] - double(ref[e]));
    if (std::isnan(diff)) return std::numeric_limits<double>::infinity();
    num = std::max(num, diff);
    den = std::max(den, std::fabs(double(ref[e])));
  }
  return num / std::max(den, 1e-12);
}

template <typename R>
Vec widen(const std::vector<R>& v) {
  return Vec(v.begin(), v.end());
}

int n_checks = 0, n_failed = 0;

void report(bool ok, const std::string& what, const std::string& detail) {
  ++n_checks;
  if (!ok) ++n_failed;
  std::printf("[%s] %-66s %s\n", ok ? " OK " : "FAIL", what.c_str(), detail.c_str());
  std::fflush(stdout);
}

char buf[512];

// Compares one tensor with the double reference; tol from the same naive loops run in T.
void check_close(const std::string& what, const at::Tensor& got, const Vec& ref,
                 double naive_err, double eps) {
  const double tol = std::max(8.0 * naive_err, 100.0 * eps);
  const double err = rel_err(to_vec(got), ref);
  std::snprintf(buf, sizeof buf, "err %.2e  tol %.2e  (naive loop in this dtype: %.2e)", err, tol,
                naive_err);
  report(err <= tol, what, buf);
}

// The states (N, S, B, d) rearranged into the tile layout: per layer and slot,
// rows in blocks of kTileRows (the last one partial), each block feature-major.
Vec tile_layout(const Vec& states, int64_t B, int64_t d) {
  Vec out(states.size());
  const int64_t bd = B * d;
  for (size_t base = 0; base + bd <= states.size(); base += bd)
    for (int64_t row0 = 0; row0 < B; row0 += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, B - row0);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t t = 0; t < rows; ++t)
          out[base + row0 * d + i * rows + t] = states[base + (row0 + t) * d + i];
    }
  return out;
}

// The kernels store activations A = act(P) in the odd slots (resnet/antisymmetric/
// leapfrog slot 1, verlet slots 1 and 3), where the naive loops keep P; for silu,
// whose act' is not a function of act(P), they keep P as well.
template <typename R>
Vec activated(const std::vector<R>& states, int64_t bd, NAct a) {
  Vec out(states.begin(), states.end());
  if (a == NAct::Silu) return out;
  for (size_t base = 0; base + bd <= out.size(); base += bd)
    if ((base / bd) % 2 == 1)
      for (int64_t e = 0; e < bd; ++e) out[base + e] = act_f(a, out[base + e]);
  return out;
}

// Stored states against the reference, in the documented (N, S, B, d) layout
// or, failing that, the tile layout of the narrow kernels.
void check_states_close(const std::string& what, const at::Tensor& got, const Vec& ref,
                        double naive_err, double eps, int64_t B, int64_t d) {
  const double tol = std::max(8.0 * naive_err, 100.0 * eps);
  const Vec g = to_vec(got);
  const double err = rel_err(g, ref);
  if (err <= tol) {
    std::snprintf(buf, sizeof buf, "err %.2e  tol %.2e  (layout (N, S, B, d))", err, tol);
    report(true, what, buf);
    return;
  }
  const double err_tile = rel_err(g, tile_layout(ref, B, d));
  std::snprintf(buf, sizeof buf, "err %.2e  tol %.2e  (tile layout, %lld-row blocks; "
                "(N, S, B, d) layout: err %.2e)", err_tile, tol, (long long)kTileRows, err);
  report(err_tile <= tol, what, buf);
}

// Runs fn and reports a failed check if it throws.
void guarded(const std::string& what, const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    report(false, what, "threw: " + msg);
  }
}

// ======================================================================
// Self-check of the naive backward: every gradient entry of a tiny problem
// against central differences of the naive forward, in double.
// ======================================================================

void self_check(const std::string& arch, const std::string& act) {
  Problem pb = make_problem(arch, act, 3, 2, 3);
  const Result<double> r = run_naive<double>(pb);
  const double eps = 1e-6;
  double worst = 0;
  auto probe = [&](Vec& x, const std::vector<double>& g) {
    for (size_t e = 0; e < x.size(); ++e) {
      const double x0 = x[e];
      x[e] = x0 + eps;
      const double lp = naive_loss(pb);
      x[e] = x0 - eps;
      const double lm = naive_loss(pb);
      x[e] = x0;
      const double fd = (lp - lm) / (2 * eps);
      worst = std::max(worst, std::fabs(fd - g[e]) / std::max(1.0, std::fabs(fd)));
    }
  };
  probe(pb.y, r.g1);
  if (two_state(arch)) probe(pb.y2, r.g2);
  probe(pb.K, r.gK);
  probe(pb.b, r.gb);
  std::snprintf(buf, sizeof buf, "max |fd - grad| / max(1, |fd|) = %.2e  tol 1e-6", worst);
  report(worst <= 1e-6, "naive " + arch + " " + act + ": backward vs finite differences", buf);
}

// ======================================================================
// Kernel checks
// ======================================================================

struct Inputs {
  at::Tensor y, y2, K, b, w1, w2;
};

Inputs make_inputs(const Problem& pb, at::ScalarType dt) {
  Inputs in;
  in.y = tensor(pb.y, {pb.B, pb.d}, dt);
  in.K = tensor(pb.K, {pb.N, pb.d, pb.d}, dt);
  in.b = tensor(pb.b, {pb.N, pb.d}, dt);
  in.w1 = tensor(pb.w1, {pb.B, pb.d}, dt);
  if (two_state(pb.arch)) {
    in.y2 = tensor(pb.y2, {pb.B, pb.d}, dt);
    in.w2 = tensor(pb.w2, {pb.B, pb.d}, dt);
  }
  return in;
}

// (out1, out2 or undefined, states)
std::tuple<at::Tensor, at::Tensor, at::Tensor> kernel_forward(const Problem& pb, const Inputs& in,
                                                              bool store) {
  namespace k = stablenets::cpu;
  if (pb.arch == "resnet") {
    auto [o, s] = k::resnet_forward(in.y, in.K, in.b, pb.h, pb.act, store);
    return {o, at::Tensor(), s};
  }
  if (pb.arch == "antisymmetric") {
    auto [o, s] = k::antisymmetric_forward(in.y, in.K, in.b, pb.h, pb.gamma, pb.act, store);
    return {o, at::Tensor(), s};
  }
  if (pb.arch == "leapfrog") return k::leapfrog_forward(in.y, in.y2, in.K, in.b, pb.h, pb.act, store);
  return k::verlet_forward(in.y, in.y2, in.K, in.b, pb.h, pb.act, store);
}

// (g1, g2 or undefined, gK, gb); `finals` = (out1, out2) for the reversible backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kernel_backward(
    const Problem& pb, const Inputs& in, const at::Tensor& states, bool reversible,
    const at::Tensor& out1, const at::Tensor& out2) {
  namespace k = stablenets::cpu;
  if (pb.arch == "resnet") {
    auto [g, gk, gb] = k::resnet_backward(in.w1, states, in.K, in.b, pb.h, pb.act);
    return {g, at::Tensor(), gk, gb};
  }
  if (pb.arch == "antisymmetric") {
    auto [g, gk, gb] = k::antisymmetric_backward(in.w1, states, in.K, in.b, pb.h, pb.gamma, pb.act);
    return {g, at::Tensor(), gk, gb};
  }
  if (pb.arch == "leapfrog") {
    if (!reversible) return k::leapfrog_backward(in.w1, in.w2, states, in.K, in.b, pb.h, pb.act);
    auto [g1, g2, gk, gb, r1, r2] =
        k::leapfrog_backward_reversible(in.w1, in.w2, out1, out2, in.K, in.b, pb.h, pb.act);
    // the rebuilt inputs come back too: (Y_0, Y_{-1})
    report(at::allclose(r1, in.y, 1e-3, 1e-4) && at::allclose(r2, in.y2, 1e-3, 1e-4),
           pb.arch + " reversible: rebuilt inputs", "");
    return {g1, g2, gk, gb};
  }
  if (!reversible) return k::verlet_backward(in.w1, in.w2, states, in.K, in.b, pb.h, pb.act);
  auto [g1, g2, gk, gb, r1, r2] =
      k::verlet_backward_reversible(in.w1, in.w2, out1, out2, in.K, in.b, pb.h, pb.act);
  report(at::allclose(r1, in.y, 1e-3, 1e-4) && at::allclose(r2, in.y2, 1e-3, 1e-4),
         pb.arch + " reversible: rebuilt inputs", "");
  return {g1, g2, gk, gb};
}

const char* second_name(const std::string& arch) {
  return arch == "leapfrog" ? "Y_{N-1}" : "Z_{N-1/2}";
}

template <typename T>
void check_config(const std::string& arch, const std::string& act, int64_t d) {
  const at::ScalarType dt = std::is_same_v<T, float> ? at::kFloat : at::kDouble;
  const double eps = std::numeric_limits<T>::epsilon();
  const int64_t N = 5, B = 131;  // 131 rows: two full 64-row tiles and a partial one
  const Problem pb = rounded<T>(make_problem(arch, act, N, B, d));
  const Result<double> ref = run_naive<double>(pb);
  const Result<T> low = run_naive<T>(pb);
  const Inputs in = make_inputs(pb, dt);
  const bool two = two_state(arch);
  const int64_t S = slots(arch);
  char tag[128];
  std::snprintf(tag, sizeof tag, "%s %s d=%lld %s", arch.c_str(), act.c_str(), (long long)d,
                std::is_same_v<T, float> ? "float32" : "float64");
  const std::string name = tag;

  at::Tensor out1, out2, states;
  guarded(name + " forward(store)", [&] {
    std::tie(out1, out2, states) = kernel_forward(pb, in, true);
    check_close(name + " forward(store): Y_N", out1, ref.out1, rel_err(widen(low.out1), ref.out1),
                eps);
    if (two)
      check_close(name + " forward(store): " + second_name(arch), out2, ref.out2,
                  rel_err(widen(low.out2), ref.out2), eps);
    const std::vector<int64_t> want{N, S, B, d};
    if (states.sizes().vec() != want) {
      report(false, name + " forward(store): states shape",
             "got " + std::string(c10::str(states.sizes())) + ", expected (N, " +
                 std::to_string(S) + ", B, d)");
      states = at::Tensor();
      return;
    }
    const Vec ref_states = activated(ref.states, B * d, parse_act(act));
    check_states_close(name + " forward(store): states", states, ref_states,
                       rel_err(activated(low.states, B * d, parse_act(act)), ref_states), eps, B,
                       d);
  });

  guarded(name + " forward(no store)", [&] {
    auto [o1, o2, s] = kernel_forward(pb, in, false);
    check_close(name + " forward(no store): Y_N", o1, ref.out1,
                rel_err(widen(low.out1), ref.out1), eps);
    if (two)
      check_close(name + " forward(no store): " + second_name(arch), o2, ref.out2,
                  rel_err(widen(low.out2), ref.out2), eps);
    report(s.dim() == 4 && s.size(0) == 0, name + " forward(no store): states hold 0 layers",
           "states shape " + std::string(c10::str(s.sizes())));
  });

  const char* g2name = arch == "leapfrog" ? "dL/dY_{-1}" : "dL/dZ_{-1/2}";
  for (bool reversible : {false, true}) {
    if (reversible && !two) continue;
    if (!states.defined() || !out1.defined()) {
      report(false, name + (reversible ? " backward(reversible)" : " backward(stored)"),
             "skipped: the forward failed");
      continue;
    }
    const std::string bname = name + (reversible ? " backward(reversible)" : " backward(stored)");
    guarded(bname, [&] {
      auto [g1, g2, gK, gb] = kernel_backward(pb, in, states, reversible, out1, out2);
      check_close(bname + ": dL/dY_0", g1, ref.g1, rel_err(widen(low.g1), ref.g1), eps);
      if (two) check_close(bname + ": " + g2name, g2, ref.g2, rel_err(widen(low.g2), ref.g2), eps);
      check_close(bname + ": dL/dweight", gK, ref.gK, rel_err(widen(low.gK), ref.gK), eps);
      check_close(bname + ": dL/dbias", gb, ref.gb, rel_err(widen(low.gb), ref.gb), eps);
    });
  }
}

// y and weight as non-contiguous views holding the same values.
void check_noncontiguous(const std::string& arch) {
  const Problem pb = make_problem(arch, "tanh", 4, 37, 3);
  const Result<double> ref = run_naive<double>(pb);
  Inputs in = make_inputs(pb, at::kDouble);
  in.y = in.y.t().contiguous().t();                      // column-major (B, d)
  in.K = in.K.transpose(1, 2).contiguous().transpose(1, 2);
  const std::string name = arch + " tanh d=3 float64 non-contiguous y, weight";
  guarded(name, [&] {
    auto [o1, o2, s] = kernel_forward(pb, in, true);
    check_close(name + ": Y_N", o1, ref.out1, 0.0, std::numeric_limits<double>::epsilon());
    auto [g1, g2, gK, gb] = kernel_backward(pb, in, s, false, o1, o2);
    check_close(name + ": dL/dweight", gK, ref.gK, 0.0, std::numeric_limits<double>::epsilon());
  });
}

// A call that must throw, with `needle` in its message.
void check_throws(const std::string& what, const std::string& needle,
                  const std::function<void()>& fn) {
  try {
    fn();
    report(false, what, "did not throw");
  } catch (const std::exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    report(msg.find(needle) != std::string::npos, what, "threw: " + msg.substr(0, 90));
  }
}

#if __has_include("../cpu/tile.h")
// The bit-level float <-> bfloat16 conversion of the narrow kernels' stored states
// (cpu_detail::convert_run) against c10's static_cast, bit for bit: random floats
// over every exponent, the rounding ties, zeros, infinities, NaNs, denormals.
void check_bf16_conversion() {
  std::mt19937 gen(7);
  std::vector<uint32_t> bits;
  for (int k = 0; k < 200000; ++k) bits.push_back(gen());
  for (uint32_t hi : {0x0000u, 0x3F80u, 0x7F7Fu, 0x7F80u, 0x7FC0u, 0x8000u, 0xFF80u, 0x0001u})
    for (uint32_t lo : {0x0000u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu, 0x0001u})
      bits.push_back((hi << 16) | lo);
  std::vector<float> f(bits.size());
  std::memcpy(f.data(), bits.data(), bits.size() * sizeof(float));
  std::vector<c10::BFloat16> got(f.size());
  stablenets::cpu_detail::convert_run(f.data(), got.data(), static_cast<int64_t>(f.size()));
  int64_t down_bad = 0, up_bad = 0;
  std::vector<float> back(f.size());
  stablenets::cpu_detail::convert_run(got.data(), back.data(), static_cast<int64_t>(f.size()));
  for (size_t k = 0; k < f.size(); ++k) {
    if (got[k].x != static_cast<c10::BFloat16>(f[k]).x) ++down_bad;
    const float want = static_cast<float>(got[k]);
    if (std::memcmp(&back[k], &want, sizeof(float)) != 0) ++up_bad;
  }
  std::snprintf(buf, sizeof buf, "%zu values: %lld float->bf16 and %lld bf16->float differ",
                f.size(), static_cast<long long>(down_bad), static_cast<long long>(up_bad));
  report(down_bad == 0 && up_bad == 0, "bfloat16 state conversion == static_cast", buf);
#ifdef STABLENETS_HAVE_AVX512BF16_RUN
  // The AVX-512 BF16 run the avx512 kernels take where the CPU has it (this
  // program is compiled without ISA flags, so convert_run above is the generic one).
  if (stablenets::cpu_detail::cpu_has_avx512bf16()) {
    std::vector<c10::BFloat16> fast(f.size());
    // from every offset, so that the values fall in the vectors' lanes and the tails alike
    int64_t bad = 0;
    for (int64_t off = 0; off < 17; ++off) {
      stablenets::cpu_detail::round_run_avx512bf16(f.data() + off, fast.data() + off,
                                                   static_cast<int64_t>(f.size()) - off);
      for (size_t k = off; k < f.size(); ++k)
        if (fast[k].x != static_cast<c10::BFloat16>(f[k]).x) ++bad;
    }
    std::snprintf(buf, sizeof buf, "%zu values x 17 offsets: %lld differ", f.size(),
                  static_cast<long long>(bad));
    report(bad == 0, "bfloat16 conversion, AVX-512 BF16 run == static_cast", buf);
  } else {
    std::printf("  (skipped: the AVX-512 BF16 conversion; this CPU has no avx512_bf16)\n");
  }
#endif
}
#endif

void check_arguments() {
  namespace k = stablenets::cpu;
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor y = at::zeros({4, 3}, opt), K = at::zeros({2, 3, 3}, opt),
                   b = at::zeros({2, 3}, opt);
  check_throws("arguments: unknown activation", "activation",
               [&] { k::resnet_forward(y, K, b, 0.1, "swish", false); });
  check_throws("arguments: step <= 0", "step",
               [&] { k::verlet_forward(y, y, K, b, -0.1, "tanh", false); });
  check_throws("arguments: weight of the wrong width", "weight",
               [&] { k::leapfrog_forward(y, y, at::zeros({2, 4, 4}, opt), b, 0.1, "tanh", false); });
  check_throws("arguments: bias of the wrong shape", "bias",
               [&] { k::antisymmetric_forward(y, K, at::zeros({3}, opt), 0.1, 0.01, "tanh", false); });
  check_throws("arguments: backward from states with 0 layers", "states", [&] {
    auto [o, s] = k::resnet_forward(y, K, b, 0.1, "tanh", false);
    k::resnet_backward(o, s, K, b, 0.1, "tanh");
  });
  check_throws("arguments: y_prev of the wrong shape", "y_prev",
               [&] { k::leapfrog_forward(y, at::zeros({5, 3}, opt), K, b, 0.1, "tanh", false); });
}

}  // namespace

int main() {
  const std::vector<std::string> archs{"resnet", "antisymmetric", "leapfrog", "verlet"};
  const std::vector<std::string> acts{"tanh",     "relu",       "identity", "sigmoid",
                                      "softplus", "leaky_relu", "silu"};

  std::printf("== the naive reference checked against finite differences\n");
  for (const auto& arch : archs)
    for (const auto& act : acts) self_check(arch, act);

  std::printf("\n== stablenets::cpu kernels against the naive reference (N=5, B=131)\n");
  for (const auto& arch : archs)
    for (const auto& act : acts)
      for (int64_t d : {3, 40}) {
        check_config<float>(arch, act, d);
        check_config<double>(arch, act, d);
      }

  std::printf("\n== non-contiguous inputs\n");
  for (const auto& arch : archs) check_noncontiguous(arch);

  std::printf("\n== argument checks\n");
  check_arguments();

#if __has_include("../cpu/tile.h")
  std::printf("\n== reduced-precision storage\n");
  check_bf16_conversion();
#endif

  std::printf("\n%d checks, %d failed\n", n_checks, n_failed);
  return n_failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
