// Where the narrow CPU kernels spend their time: each phase of the ResNet and
// leapfrog tile kernels (csrc/cpu/tile.h) timed on its own, one thread, over the
// same tiles and layers a whole (B, d, N) call walks, float32, tanh.
//
//   bash benchmarks/narrow_phases.sh [B d N]     (compiles this file, then runs it)
//
// A phase is run for every (tile, layer) pair of the call, in the kernel's order,
// on state buffers of the call's size, so its time includes the memory traffic
// the kernel sees. The sum of the phases is checked against the whole kernel
// timed in the same run. Times: median of 15 runs, microseconds per call.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../csrc/cpu/tile.h"

using namespace stablenets;
using namespace stablenets::cpu_detail;
using T = float;
constexpr Act A = Act::Tanh;

static double median_us(const std::function<void()>& fn) {
  fn();
  std::vector<double> t;
  for (int r = 0; r < 15; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(t.begin(), t.begin() + 7, t.end());
  return t[7];
}

int main(int argc, char** argv) {
  const int64_t B = argc > 1 ? std::atoll(argv[1]) : 1024;
  const int64_t d = argc > 2 ? std::atoll(argv[2]) : 4;
  const int64_t N = argc > 3 ? std::atoll(argv[3]) : 64;
  if (d > kNarrowMax) {
    std::fprintf(stderr, "d must be at most %lld (the narrow kernels)\n", (long long)kNarrowMax);
    return 2;
  }
  at::set_num_threads(1);
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto randv = [&](int64_t n, float s) {
    std::vector<T> v(n);
    for (auto& x : v) x = s * nd(rng);
    return v;
  };
  const auto K = randv(N * d * d, 1.f / std::sqrt(float(d)));
  const auto bias = randv(N * d, 0.1f);
  const auto y = randv(B * d, 1.f);
  std::vector<T> states(N * 2 * B * d), out(B * d), dW(N * d * d * kLanes), db(N * d * kLanes);
  for (auto& s : states) s = 0.5f * nd(rng);
  const T h = 0.1f, mh2 = -h * h;
  const int64_t tiles = num_tiles(B);
  std::vector<T> buf(8 * d * kTile);
  T* X = buf.data();
  T* Y = X + d * kTile;
  T* P = Y + d * kTile;
  T* G = P + d * kTile;
  T* L = G + d * kTile;
  T* C = L + d * kTile;
  for (int64_t e = 0; e < 6 * d * kTile; ++e) X[e] = 0.3f * nd(rng);

  // Run fn(row0, rows, j) over every tile and every layer, as the kernels do.
  auto walk = [&](const std::function<void(int64_t, int64_t, int64_t)>& fn) {
    return [&, fn] {
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t row0 = tile * kTile, rows = std::min<int64_t>(kTile, B - row0);
        for (int64_t j = 0; j < N; ++j) fn(row0, rows, j);
      }
    };
  };
  auto st = [&](int64_t j, int s, int64_t row0) { return states.data() + ((j * 2 + s) * B + row0) * d; };

  struct Row { std::string name; double us; };
  auto report = [](const char* title, const std::vector<Row>& rows, double whole) {
    double sum = 0;
    for (auto& r : rows) sum += r.us;
    std::printf("%s\n", title);
    for (auto& r : rows) std::printf("  %-34s %9.1f us  %5.1f%%\n", r.name.c_str(), r.us, 100 * r.us / sum);
    std::printf("  %-34s %9.1f us   (whole kernel, timed as one: %.1f us)\n", "sum of phases", sum, whole);
  };

  // ---- ResNet forward: gemm, save Y, act + update, save A
  std::vector<Row> f;
  f.push_back({"gemm P = Y K^T + b", median_us(walk([&](int64_t, int64_t, int64_t j) {
                 tile_gemm<T, false>(K.data() + j * d * d, d, bias.data() + j * d, Y, P, T(1), false);
               }))});
  f.push_back({"save states (Y, A)", median_us(walk([&](int64_t row0, int64_t rows, int64_t j) {
                 save_state(Y, rows, d, st(j, 0, row0));
                 save_state(P, rows, d, st(j, 1, row0));
               }))});
  f.push_back({"act + update Y += h act(P)", median_us(walk([&](int64_t, int64_t, int64_t) {
#pragma omp simd
                 for (int64_t e = 0; e < d * kTile; ++e) {
                   const T a = act_f<A, T>(P[e]);
                   L[e] = a;
                   Y[e] += h * a;
                 }
               }))});
  const double fwd_whole = median_us(walk([&](int64_t row0, int64_t rows, int64_t j) {
    tile_gemm<T, false>(K.data() + j * d * d, d, bias.data() + j * d, Y, P, T(1), false);
    save_state(Y, rows, d, st(j, 0, row0));
#pragma omp simd
    for (int64_t e = 0; e < d * kTile; ++e) {
      const T a = act_f<A, T>(P[e]);
      P[e] = a;
      Y[e] += h * a;
    }
    save_state(P, rows, d, st(j, 1, row0));
    for (int64_t e = 0; e < d * kTile; ++e) Y[e] = X[e];  // keep values bounded
  }));
  report("resnet forward (per call)", f, fwd_whole);

  // ---- ResNet backward: load states, act', weight-grad outer, bias rowsum, gemm^T
  std::vector<Row> r;
  // The states are read in place (state_tile: a copy only for a partial last tile).
  r.push_back({"act' G = h L act'(A), A in place", median_us(walk([&](int64_t row0, int64_t rows, int64_t j) {
                 const T* As = state_tile(st(j, 1, row0), rows, d, G);
#pragma omp simd
                 for (int64_t e = 0; e < d * kTile; ++e) C[e] = h * L[e] * stored_grad<A, T>(As[e]);
               }))});
  r.push_back({"weight grad dW += G^T Y, Y in place", median_us(walk([&](int64_t row0, int64_t rows, int64_t j) {
                 const T* Ys = state_tile(st(j, 0, row0), rows, d, Y);
                 tile_outer(G, Ys, d, rows, T(1), dW.data() + j * d * d * kLanes);
               }))});
  r.push_back({"bias grad db += rowsum G", median_us(walk([&](int64_t, int64_t rows, int64_t j) {
                 tile_rowsum(G, d, rows, db.data() + j * d * kLanes);
               }))});
  r.push_back({"gemm L += G K", median_us(walk([&](int64_t, int64_t, int64_t j) {
                 tile_gemm<T, true>(K.data() + j * d * d, d, nullptr, G, L, T(1), true);
               }))});
  const double bwd_whole = median_us(walk([&](int64_t row0, int64_t rows, int64_t j) {
    const T* Ys = state_tile(st(j, 0, row0), rows, d, Y);
    const T* As = state_tile(st(j, 1, row0), rows, d, G);
#pragma omp simd
    for (int64_t e = 0; e < d * kTile; ++e) G[e] = h * L[e] * stored_grad<A, T>(As[e]);
    tile_outer(G, Ys, d, rows, T(1), dW.data() + j * d * d * kLanes);
    tile_rowsum(G, d, rows, db.data() + j * d * kLanes);
    tile_gemm<T, true>(K.data() + j * d * d, d, nullptr, G, L, T(1), true);
    for (int64_t e = 0; e < d * kTile; ++e) L[e] = X[e];  // keep values bounded
  }));
  report("resnet backward (per call)", r, bwd_whole);
  std::printf("resnet backward / forward (whole kernels): %.2fx\n\n", bwd_whole / fwd_whole);

  // ---- Leapfrog backward's extra phases: a second gemm and a second outer product
  std::vector<Row> l;
  l.push_back({"gemm G = -h^2 lam K^T", median_us(walk([&](int64_t, int64_t, int64_t j) {
                 tile_gemm<T, false>(K.data() + j * d * d, d, nullptr, L, G, mh2, false);
               }))});
  l.push_back({"act' + c += 2 lam", median_us(walk([&](int64_t, int64_t, int64_t) {
#pragma omp simd
                 for (int64_t e = 0; e < d * kTile; ++e) {
                   C[e] *= stored_grad<A, T>(P[e]);
                   X[e] += T(2) * L[e];
                 }
               }))});
  l.push_back({"weight grad: two outer products", 2 * r[1].us});
  l.push_back({"bias grad", r[2].us});
  l.push_back({"gemm c += G K", r[3].us});
  l.push_back({"negate lam", median_us(walk([&](int64_t, int64_t, int64_t) {
#pragma omp simd
                 for (int64_t e = 0; e < d * kTile; ++e) C[e] = -C[e];
               }))});
  double lsum = 0;
  for (auto& x : l) lsum += x.us;
  report("leapfrog backward (phases; whole kernel not timed here)", l, lsum);
  std::printf("checksum %g\n", double(dW[0] + db[0] + states[0]));
  return 0;
}
