// The thin arithmetic of one LoRA-RITE step, hand-fused into three passes per factor.
//
// Built and run by benchmarks/cpu_floor.py (not part of the package): it measures how fast
// this CPU runs the factor-sized work of a step when nothing but arithmetic and the
// minimum memory traffic stands in the way. Per factor X (rows × RANK, row-major), with
// its gradient G, first moment M and previous basis U, and r×r matrices from the small
// linear algebra between passes:
//   pass 1  XᵀX, GᵀG, XᵀU                      reads X, G, U
//   pass 2  U₁ᵀU₁ with U₁ = X·P formed row by row   reads X
//   pass 3  U ← X·C,  M ← G·Ka + M·Kb,  X ← X − M·Kc  reads X, G, M; writes U, M, X
// That is 9 products of a factor with an r×r matrix (2·RANK flop per factor element
// each), the count rite_optax's step forms, in 10 factor-sized reads and writes
// (optax.adam: 7).
//
//   fused_passes bench REPS ROWS:COUNT...   JSON {"pass1": [ms...], "pass2": ..., "pass3": ...}
//   fused_passes check                     JSON of every output for one 8-row factor
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifndef RANK
#define RANK 16
#endif
constexpr int R = RANK;
struct Small { alignas(64) float m[R][R]; };

// out = x · W for one row x.
static inline void row_times(const float* __restrict x, const Small& w, float* __restrict out) {
  alignas(64) float acc[R] = {};
  for (int k = 0; k < R; ++k) {
    const float xk = x[k];
#pragma omp simd
    for (int j = 0; j < R; ++j) acc[j] += xk * w.m[k][j];
  }
  std::memcpy(out, acc, sizeof acc);
}

// acc += xᵀ y for rows x, y.
static inline void add_outer(const float* __restrict x, const float* __restrict y,
                             Small& __restrict acc) {
  for (int k = 0; k < R; ++k) {
    const float xk = x[k];
#pragma omp simd
    for (int j = 0; j < R; ++j) acc.m[k][j] += xk * y[j];
  }
}

void pass1(const float* __restrict X, const float* __restrict G, const float* __restrict U,
           long rows, Small out[3]) {
  Small xx{}, gg{}, xu{};
  for (long i = 0; i < rows; ++i) {
    const float *x = X + i * R, *g = G + i * R, *u = U + i * R;
    for (int k = 0; k < R; ++k) {
      const float xk = x[k], gk = g[k];
#pragma omp simd
      for (int j = 0; j < R; ++j) {
        xx.m[k][j] += xk * x[j];
        gg.m[k][j] += gk * g[j];
        xu.m[k][j] += xk * u[j];
      }
    }
  }
  out[0] = xx, out[1] = gg, out[2] = xu;
}

void pass2(const float* X, const Small& p, long rows, Small& out) {
  Small uu{};
  alignas(64) float u[R];
  for (long i = 0; i < rows; ++i) {
    row_times(X + i * R, p, u);
    add_outer(u, u, uu);
  }
  out = uu;
}

void pass3(float* X, const float* G, float* M, float* U, const Small& c, const Small& ka,
           const Small& kb, const Small& kc, long rows) {
  alignas(64) float gka[R], mkb[R], delta[R];
  for (long i = 0; i < rows; ++i) {
    float *x = X + i * R, *m = M + i * R, *u = U + i * R;
    row_times(x, c, u);
    row_times(G + i * R, ka, gka);
    row_times(m, kb, mkb);
#pragma omp simd
    for (int j = 0; j < R; ++j) m[j] = gka[j] + mkb[j];
    row_times(m, kc, delta);
#pragma omp simd
    for (int j = 0; j < R; ++j) x[j] -= delta[j];
  }
}

// Deterministic inputs, reproduced by the test in NumPy: sin(scale · flat index).
static void fill(float* a, long size, float scale) {
  for (long i = 0; i < size; ++i) a[i] = std::sin(scale * float(i));
}

static void print_array(const char* name, const float* a, long size, bool last = false) {
  std::printf("\"%s\": [", name);
  for (long i = 0; i < size; ++i) std::printf(i ? ", %.9g" : "%.9g", a[i]);
  std::printf(last ? "]" : "], ");
}

static int check() {
  const long rows = 8, size = rows * R;
  std::vector<float> X(size), G(size), M(size), U(size);
  fill(X.data(), size, 0.1f), fill(G.data(), size, 0.2f), fill(M.data(), size, 0.3f);
  fill(U.data(), size, 0.4f);
  Small p, c, ka, kb, kc, out1[3], out2;
  Small* smalls[] = {&p, &c, &ka, &kb, &kc};
  for (int s = 0; s < 5; ++s) fill(&smalls[s]->m[0][0], R * R, 0.05f * float(s + 1));
  pass1(X.data(), G.data(), U.data(), rows, out1);
  pass2(X.data(), p, rows, out2);
  pass3(X.data(), G.data(), M.data(), U.data(), c, ka, kb, kc, rows);
  std::printf("{\"rank\": %d, ", R);
  print_array("xx", &out1[0].m[0][0], R * R), print_array("gg", &out1[1].m[0][0], R * R);
  print_array("xu", &out1[2].m[0][0], R * R), print_array("u1u1", &out2.m[0][0], R * R);
  print_array("u", U.data(), size), print_array("m", M.data(), size);
  print_array("x", X.data(), size, true);
  std::printf("}\n");
  return 0;
}

static int bench(int reps, int argc, char** argv) {
  std::vector<long> rows;  // one entry per factor
  for (int a = 0; a < argc; ++a) {
    const std::string spec = argv[a];
    const long n = std::stol(spec.substr(0, spec.find(':')));
    rows.insert(rows.end(), std::stol(spec.substr(spec.find(':') + 1)), n);
  }
  const long factors = long(rows.size());
  std::vector<std::vector<float>> X(factors), G(factors), M(factors), U(factors);
  std::vector<Small> smalls(factors * 4);
#pragma omp parallel for schedule(dynamic)
  for (long f = 0; f < factors; ++f) {  // first touch by the thread that will use it
    for (auto* a : {&X[f], &G[f], &M[f], &U[f]}) a->assign(rows[f] * R, 0.0f);
    fill(X[f].data(), rows[f] * R, 1e-3f), fill(G[f].data(), rows[f] * R, 2e-3f);
  }
  for (auto& s : smalls) {  // 0.1·I keeps the repeated updates finite and normal
    s = Small{};
    for (int k = 0; k < R; ++k) s.m[k][k] = 0.1f;
  }
  std::vector<double> times[3];
  for (int rep = -2; rep < reps; ++rep) {  // two warm-up repetitions
    double ms[3];
    for (int pass = 0; pass < 3; ++pass) {
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(dynamic)
      for (long f = 0; f < factors; ++f) {
        Small* s = &smalls[f * 4];
        if (pass == 0) pass1(X[f].data(), G[f].data(), U[f].data(), rows[f], s);
        if (pass == 1) pass2(X[f].data(), s[0], rows[f], s[3]);
        if (pass == 2) pass3(X[f].data(), G[f].data(), M[f].data(), U[f].data(), s[0], s[1],
                             s[2], s[3], rows[f]);
      }
      ms[pass] = std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now() - t0).count();
    }
    for (int pass = 0; rep >= 0 && pass < 3; ++pass) times[pass].push_back(ms[pass]);
  }
  std::printf("{\"threads\": %d, ", omp_get_max_threads());
  for (int pass = 0; pass < 3; ++pass) {
    std::printf("\"pass%d\": [", pass + 1);
    for (size_t i = 0; i < times[pass].size(); ++i) std::printf(i ? ", %.4f" : "%.4f", times[pass][i]);
    std::printf(pass < 2 ? "], " : "]}\n");
  }
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "check") return check();
  if (mode == "bench" && argc > 3) return bench(std::atoi(argv[2]), argc - 3, argv + 3);
  std::fprintf(stderr, "usage: %s check | bench REPS ROWS:COUNT...\n", argv[0]);
  return 2;
}
