// The exact engine's CPU kernel: a whole QAA circuit per tile of tokens, in cache.
//
// The eager engine applies each op to the whole batch of states, so every op is a pass over megabytes of memory
// and a Python-dispatched call. Here a tile of T tokens is simulated from start to end while its state (2^n x T
// complex floats, 128 KiB at n = 10) stays in the core's L2 cache, one gate at a time: with the token axis
// innermost, every gate is a loop over T contiguous floats, which the compiler vectorises for any qubit.
//
// The backward keeps nothing from the forward: it replays the tile's circuit (cheap in cache), then walks the ops
// back inverting the state and carrying the cotangent (the adjoint method). Each gate's gradient is read off the
// state after it, so no intermediate is stored.
//
// Ops (rows of `ops`, int32 [K, 3]): (0, qubit, g) an RY(theta_g) with (cos, sin) of its half angle in ry[g];
// (1, f, 0) a diagonal phase e^{i phi_j} with (cos, sin) in phase[f, j]; (2, p, 0) a gather new[j] = old[perm[p, j]]
// (inv[p] is its inverse).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace {

constexpr int T = 16;     // tokens per tile

// One pass over a tile: an RY on `qubit` with (c, s) the cos and sin of its half angle (`slot`: its index in ry
// and in the gradient), a phase, or a gather (`slot`: the phase's or the permutation's index).
struct Step {
  int kind;  // 0 RY, 1 phase, 2 gather
  int slot;
  int qubit;
  float c, s;
  bool complex_before;  // whether the state is complex before this step: after the circuit's first phase
};

struct Circuit {
  int dim;
  std::vector<Step> steps;
  const float* phase;
  const int32_t* perm;
  const int32_t* inv;
};

// A tile's complex state as real and imaginary planes [dim][T]; `spare` holds the target of a gather.
struct State {
  float* re;
  float* im;
  float* spare_re;
  float* spare_im;
  bool complex = false;
};

// A plane rotation of T tokens by (c, s): an RY on an amplitude pair, or a phase on one amplitude's (re, im).
inline void turn(float* __restrict x, float* __restrict y, float c, float s) {
  for (int t = 0; t < T; ++t) {
    const float a = x[t], b = y[t];
    x[t] = c * a - s * b;
    y[t] = s * a + c * b;
  }
}

// One RY on a plane: amplitude pairs (j, j + stride), the token axis innermost.
inline void rotate(float* v, int dim, int qubit, float c, float s) {
  const int stride = 1 << qubit;
  for (int base = 0; base < dim; base += 2 * stride)
    for (int j = base; j < base + stride; ++j) turn(v + j * T, v + (j + stride) * T, c, s);
}

// `turn` walked back: (x, y) is the state after it and (gx, gy) the cotangent there. Adds
// gy x - gx y (the gradient for its angle, up to a factor) to acc, then rotates both back by (c, -s).
inline void unrotate(float* __restrict x, float* __restrict y, float* __restrict gx, float* __restrict gy, float c,
                     float s, float* __restrict acc) {
  for (int t = 0; t < T; ++t) {
    const float a = x[t], b = y[t], ga = gx[t], gb = gy[t];
    acc[t] += gb * a - ga * b;
    x[t] = c * a + s * b;
    y[t] = c * b - s * a;
    gx[t] = c * ga + s * gb;
    gy[t] = c * gb - s * ga;
  }
}

inline float sum(const float* acc) {
  float total = 0;
  for (int t = 0; t < T; ++t) total += acc[t];
  return total;
}

// One RY walked back on a plane: returns d loss / d theta's share (dRY/dtheta = RY [[0, -1], [1, 0]] / 2, so it is
// sum (g1 a0' - g0 a1') / 2 over its amplitude pairs), and inverts the state and carries the cotangent back
// (RY^T = RY(-theta)) in the same pass.
inline float rotate_back(float* v, float* g, int dim, int qubit, float c, float s) {
  const int stride = 1 << qubit;
  float acc[T] = {};
  for (int base = 0; base < dim; base += 2 * stride)
    for (int j = base; j < base + stride; ++j)
      unrotate(v + j * T, v + (j + stride) * T, g + j * T, g + (j + stride) * T, c, s, acc);
  return 0.5f * sum(acc);
}

// One phase walked back: d loss / d phi_j += sum over tokens of (cot_im re' - cot_re im') at the state after it
// (d re'/d phi = -im', d im'/d phi = re'), and the state and the cotangent are multiplied by e^{-i phi}.
inline void phase_back(State& st, State& cot, const float* cs, int dim, double* grad) {
  for (int j = 0; j < dim; ++j) {
    float acc[T] = {};
    unrotate(st.re + j * T, st.im + j * T, cot.re + j * T, cot.im + j * T, cs[2 * j], cs[2 * j + 1], acc);
    grad[j] += sum(acc);
  }
}

// Multiply by e^{i phi}; a real state becomes complex.
inline void apply_phase(float* re, float* im, bool complex, const float* cs, int dim) {
  for (int j = 0; j < dim; ++j) {
    const float c = cs[2 * j], s = cs[2 * j + 1];
    float* __restrict x = re + j * T;
    float* __restrict y = im + j * T;
    if (complex) {
      turn(x, y, c, s);
    } else {
      for (int t = 0; t < T; ++t) {
        y[t] = x[t] * s;
        x[t] *= c;
      }
    }
  }
}

inline void gather(float*& v, float*& spare, const int32_t* index, int dim) {
  for (int j = 0; j < dim; ++j) std::copy_n(v + index[j] * T, T, spare + j * T);
  std::swap(v, spare);
}

// psi = z / ||z||, zero-padded to dim, for tokens [t0, t0 + T) (rows past `tokens` are zero).
void load(State& st, const float* z, const float* inv_norm, int64_t t0, int64_t tokens, int d, int dim) {
  std::fill_n(st.re, dim * T, 0.f);
  st.complex = false;
  const int64_t count = std::min<int64_t>(T, tokens - t0);
  for (int64_t t = 0; t < count; ++t) {
    const float* row = z + (t0 + t) * d;
    const float scale = inv_norm[t0 + t];
    for (int j = 0; j < d; ++j) st.re[j * T + t] = row[j] * scale;
  }
}

void run(const Circuit& c, State& st) {
  for (const Step& step : c.steps) {
    if (step.kind == 0) {
      rotate(st.re, c.dim, step.qubit, step.c, step.s);
      if (st.complex) rotate(st.im, c.dim, step.qubit, step.c, step.s);
    } else if (step.kind == 1) {
      apply_phase(st.re, st.im, st.complex, c.phase + 2 * int64_t(step.slot) * c.dim, c.dim);
      st.complex = true;
    } else {
      const int32_t* index = c.perm + int64_t(step.slot) * c.dim;
      gather(st.re, st.spare_re, index, c.dim);
      if (st.complex) gather(st.im, st.spare_im, index, c.dim);
    }
  }
}

struct Tile {
  std::vector<float> planes;
  State state, cot;
  explicit Tile(int dim) : planes(size_t(8) * dim * T) {
    float* p = planes.data();
    const size_t plane = size_t(dim) * T;
    state = {p, p + plane, p + 2 * plane, p + 3 * plane};
    cot = {p + 4 * plane, p + 5 * plane, p + 6 * plane, p + 7 * plane};
  }
};

Circuit circuit(const torch::Tensor& ops, const torch::Tensor& ry, const torch::Tensor& phase,
                const torch::Tensor& perm, const torch::Tensor& inv, int dim) {
  Circuit c{dim, {}, phase.data_ptr<float>(), perm.data_ptr<int32_t>(), inv.data_ptr<int32_t>()};
  const int32_t* rows = ops.data_ptr<int32_t>();
  const float* angles = ry.data_ptr<float>();
  bool complex = false;
  for (int64_t k = 0; k < ops.size(0); ++k) {
    const int32_t* op = rows + 3 * k;
    const int slot = op[0] == 0 ? op[2] : op[1];
    const float cos_h = op[0] == 0 ? angles[2 * slot] : 0.f, sin_h = op[0] == 0 ? angles[2 * slot + 1] : 0.f;
    c.steps.push_back({op[0], slot, op[1], cos_h, sin_h, complex});
    complex = complex || op[0] == 1;
  }
  return c;
}

void check(const torch::Tensor& t, torch::ScalarType type, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(), name,
              ": expected a contiguous CPU tensor of ", c10::toString(type));
}

// What forward and backward share: the checked inputs, the circuit and the tiling of the tokens.
struct Call {
  Circuit circuit;
  int64_t tokens, tiles;
  int d;
  const float* z;
  const float* inv_norm;
};

Call prepare(const torch::Tensor& z, const torch::Tensor& inv_norm, const torch::Tensor& ops, const torch::Tensor& ry,
             const torch::Tensor& phase, const torch::Tensor& perm, const torch::Tensor& inv, int64_t dim) {
  check(z, torch::kFloat, "z");
  check(inv_norm, torch::kFloat, "inv_norm");
  check(ops, torch::kInt, "ops");
  check(ry, torch::kFloat, "ry");
  check(phase, torch::kFloat, "phase");
  check(perm, torch::kInt, "perm");
  check(inv, torch::kInt, "inv");
  const int64_t tokens = z.size(0);
  const int d = int(z.size(1));
  TORCH_CHECK(d <= dim, "z has ", d, " features, more than the register's ", dim, " amplitudes");
  return {circuit(ops, ry, phase, perm, inv, int(dim)), tokens, (tokens + T - 1) / T, d, z.data_ptr<float>(),
          inv_norm.data_ptr<float>()};
}

// |U psi|^2 as [dim, M] for z [M, d].
torch::Tensor forward(torch::Tensor z, torch::Tensor inv_norm, torch::Tensor ops, torch::Tensor ry,
                      torch::Tensor phase, torch::Tensor perm, torch::Tensor inv, int64_t dim) {
  const Call call = prepare(z, inv_norm, ops, ry, phase, perm, inv, dim);
  const Circuit& c = call.circuit;
  const int64_t tokens = call.tokens;
  auto probs = torch::empty({dim, tokens}, z.options());
  float* out = probs.data_ptr<float>();
  at::parallel_for(0, call.tiles, 1, [&](int64_t begin, int64_t end) {
    Tile tile(c.dim);
    State& st = tile.state;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t0 = i * T, count = std::min<int64_t>(T, tokens - t0);
      load(st, call.z, call.inv_norm, t0, tokens, call.d, c.dim);
      run(c, st);
      for (int j = 0; j < c.dim; ++j) {
        const float* x = st.re + j * T;
        const float* y = st.im + j * T;
        float* row = out + j * tokens + t0;
        for (int64_t t = 0; t < count; ++t) row[t] = st.complex ? x[t] * x[t] + y[t] * y[t] : x[t] * x[t];
      }
    }
  });
  return probs;
}

// The adjoint pass. `weights` [dim, M] is d loss / d |amplitude|^2 times 2 (d |a|^2 / d a = 2a). Returns
// (d loss / d psi for the first d amplitudes as [M, d], d loss / d theta_g per RY [G], d loss / d phi [F, dim]).
std::vector<torch::Tensor> backward(torch::Tensor z, torch::Tensor inv_norm, torch::Tensor ops, torch::Tensor ry,
                                    torch::Tensor phase, torch::Tensor perm, torch::Tensor inv, int64_t dim,
                                    torch::Tensor weights) {
  const Call call = prepare(z, inv_norm, ops, ry, phase, perm, inv, dim);
  check(weights, torch::kFloat, "weights");
  const Circuit& c = call.circuit;
  const int64_t tokens = call.tokens;
  const int d = call.d;
  const int rotations = int(ry.size(0)), phases = int(phase.size(0));
  auto grad_psi = torch::empty({tokens, d}, z.options());
  std::vector<double> total_ry(rotations, 0.0), total_phase(size_t(phases) * c.dim, 0.0);
  std::mutex merge;
  const float* wp = weights.data_ptr<float>();
  float* gp = grad_psi.data_ptr<float>();
  at::parallel_for(0, call.tiles, 1, [&](int64_t begin, int64_t end) {
    Tile tile(c.dim);
    State& st = tile.state;
    State& cot = tile.cot;
    std::vector<double> acc_ry(rotations, 0.0), acc_phase(size_t(phases) * c.dim, 0.0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t0 = i * T, count = std::min<int64_t>(T, tokens - t0);
      load(st, call.z, call.inv_norm, t0, tokens, d, c.dim);
      run(c, st);
      // The cotangent of the final amplitudes: weights * amplitude (zero for the padding tokens).
      for (int j = 0; j < c.dim; ++j) {
        const float* w = wp + j * tokens + t0;
        for (int t = 0; t < T; ++t) {
          const float wt = t < count ? w[t] : 0.f;
          cot.re[j * T + t] = wt * st.re[j * T + t];
          cot.im[j * T + t] = st.complex ? wt * st.im[j * T + t] : 0.f;
        }
      }
      cot.complex = st.complex;
      for (int k = int(c.steps.size()) - 1; k >= 0; --k) {
        const Step& step = c.steps[k];
        const bool was_complex = step.complex_before;
        if (step.kind == 0) {
          double grad = rotate_back(st.re, cot.re, c.dim, step.qubit, step.c, step.s);
          if (was_complex) grad += rotate_back(st.im, cot.im, c.dim, step.qubit, step.c, step.s);
          acc_ry[step.slot] += grad;
        } else if (step.kind == 1) {
          phase_back(st, cot, c.phase + 2 * int64_t(step.slot) * c.dim, c.dim, acc_phase.data() + size_t(step.slot) * c.dim);
          st.complex = cot.complex = was_complex;  // before the first phase the state is real: drop Im
        } else {
          const int32_t* index = c.inv + int64_t(step.slot) * c.dim;
          gather(st.re, st.spare_re, index, c.dim);
          gather(cot.re, cot.spare_re, index, c.dim);
          if (was_complex) {
            gather(st.im, st.spare_im, index, c.dim);
            gather(cot.im, cot.spare_im, index, c.dim);
          }
        }
      }
      for (int64_t t = 0; t < count; ++t) {
        float* row = gp + (t0 + t) * d;
        for (int j = 0; j < d; ++j) row[j] = cot.re[j * T + t];
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int g = 0; g < rotations; ++g) total_ry[g] += acc_ry[g];
    for (size_t j = 0; j < acc_phase.size(); ++j) total_phase[j] += acc_phase[j];
  });
  auto grad_ry = torch::tensor(total_ry, torch::kDouble).to(torch::kFloat);
  auto grad_phase = torch::tensor(total_phase, torch::kDouble).to(torch::kFloat).view({phases, c.dim});
  return {grad_psi, grad_ry, grad_phase};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "|U psi|^2 per token, as [2^n, M]");
  m.def("backward", &backward, "the adjoint pass: (d/d psi, d/d theta per RY, d/d phi per phase)");
}
