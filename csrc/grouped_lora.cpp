// Grouped multi-LoRA shrink / expand on CPU: the C++ backend of lumoe_engine.ops (loaded by lumoe_engine/ops/cpp.py).
//
//   lora_shrink:         buf[s, m, :r_e] = x[m / k] @ A[s, e_m, :r_e, :]^T           (other columns, -1 rows: zero)
//   lora_expand:         y[t, n_s] += sum_j w[t, j] * scale[e] * buf[s, t*k+j, :r_e] @ B[e, n_s, :r_e]^T
//   lora_shrink_expand:  both, from the routing itself (no alignment metadata), without the [S, M, R] buffer.
//
// Legend: T tokens (rows of x), E experts, k top-k, M = T*k routed rows (flat index m = t*k + j), S slices,
// H input features, N output features of all slices together, R max rank, P padded grouped length.
//
// Work decomposition. Routed rows are grouped by expert (from meta.sorted_ids / meta.offsets, or by a counting sort
// of ids for the fused op) and each group is cut into chunks of at most kChunkRows rows. One task = one (expert,
// chunk); threads pull tasks from a shared counter (at::parallel_for starts one worker per thread), so a skewed
// popularity (zipf, all-to-one) still balances. Per task and slice, register-tiled micro-kernels do the matmuls of
// the whole chunk: shrink as dot products on A's own [r, H] layout (fp16/bf16 rows converted to fp32 first), expand
// as rank-1 updates on the expert's B slice transposed once into a small fp32 scratch. No per-row matmul call, no
// per-expert ATen call (measured: per-expert at::mm calls cost more than the arithmetic at 4-16 rows per expert).
// All arithmetic is fp32.
//
// Determinism. Every output element is computed by one task with a fixed summation order, whatever thread runs it.
// For k > 1 each routed row's contribution is written to its own row of an [M, N] fp32 buffer, then each token sums
// its k rows in order j = 0..k-1 and adds the sum to y once (as the torch reference does). For k = 1 a token has one
// routed row, so the contribution is added to y directly. Tokens whose ids are all -1 are never written.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// 16 fp32 lanes: one AVX-512 register, two AVX2 registers, four SSE/NEON registers (GCC/Clang vector extension).
typedef float vf __attribute__((vector_size(64)));
constexpr int64_t kVec = 16;
constexpr int64_t kChunkRows = 64;   // rows per task: balances skewed groups; the weight conversion is amortised
constexpr int64_t kColBlock = 256;   // output columns per expand block: the [r, 256] slice of B^T stays in L1
#if defined(__AVX512F__)
// shrink: 4 rows x 4 ranks = 16 zmm accumulators, 8 loads per 16 FMAs;
// expand: 4 rows x 64 columns = 16 zmm accumulators, 4 loads + 4 broadcasts per 16 FMAs.
constexpr int kTileRows = 4, kTileRanks = 4, kColVecs = 4;
#else
// 16 fp32 lanes = 2 ymm (AVX2, 16 registers) or 4 NEON registers (32): 8 accumulators of 16 lanes.
constexpr int kTileRows = 2, kTileRanks = 2, kColVecs = 2;
#endif

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// Keeps a loaded vector in a register (AVX-512: one zmm). Without it GCC folds the load into every FMA that uses
// the value: the shrink loop did 2 loads per FMA instead of 1 per 2 FMAs; with this and the 4 x 64 expand tile the
// fused op went from 2.0 to 1.1 ms (T = 1024, H = 1024, r = 16, 64 experts, one thread).
inline void in_register(vf& v) {
#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(v));
#else
  (void)v;  // 16 lanes span several registers: nothing to pin
#endif
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------------------------
// Element conversion (fp32 / fp16 / bf16 storage, fp32 arithmetic)
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
inline float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <typename T>
void to_f32(const void* src, int64_t n, float* dst) {
  const T* s = static_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
}

void row_to_f32(const void* src, at::ScalarType st, int64_t n, float* dst) {
  switch (st) {
    case at::kFloat: std::memcpy(dst, src, n * sizeof(float)); break;
    case at::kBFloat16: to_f32<c10::BFloat16>(src, n, dst); break;
    case at::kHalf: to_f32<c10::Half>(src, n, dst); break;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
}

// dst[i] = dst[i] + src[i], computed in fp32, rounded once to the storage dtype.
template <typename T>
void add_into(void* dst, const float* src, int64_t n) {
  T* d = static_cast<T*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(static_cast<float>(d[i]) + src[i]);
}

void row_add(void* dst, at::ScalarType st, const float* src, int64_t n) {
  switch (st) {
    case at::kFloat: add_into<float>(dst, src, n); break;
    case at::kBFloat16: add_into<c10::BFloat16>(dst, src, n); break;
    case at::kHalf: add_into<c10::Half>(dst, src, n); break;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
}

// A_e rows as fp32: pointers into A itself when it is fp32, else rows converted into `buf` ([r, H]).
const float* a_rows(const void* a, at::ScalarType st, int64_t r, int64_t H, float* buf) {
  if (st == at::kFloat) return static_cast<const float*>(a);
  row_to_f32(a, st, r * H, buf);
  return buf;
}

#if defined(__AVX512F__)
// Lane indices of the 4 butterfly stages of a 16 x 16 transpose (distance d = 8, 4, 2, 1): at each stage rows i and
// i + d (i % 2d < d) trade their off-diagonal d x d blocks; [stage][0] builds row i, [stage][1] row i + d.
struct TransposeIdx {
  int32_t v[4][2][16];
  constexpr TransposeIdx() : v{} {
    for (int st = 0, d = 8; st < 4; ++st, d /= 2)
      for (int l = 0; l < 16; ++l) {
        const int b = l / (2 * d) * 2 * d, o = l % (2 * d);
        v[st][0][l] = o < d ? b + o : 16 + b + o - d;
        v[st][1][l] = o < d ? b + d + o : 16 + b + o;
      }
  }
};
constexpr TransposeIdx kTransposeIdx{};

template <int D, int ST>
inline void transpose_stage(__m512 (&v)[16]) {
  const __m512i lo = _mm512_loadu_si512(kTransposeIdx.v[ST][0]);
  const __m512i hi = _mm512_loadu_si512(kTransposeIdx.v[ST][1]);
#pragma GCC unroll 16
  for (int g = 0; g < 16; g += 2 * D) {
#pragma GCC unroll 16
    for (int i = g; i < g + D; ++i) {
      const __m512 a = v[i], b = v[i + D];
      v[i] = _mm512_permutex2var_ps(a, lo, b);
      v[i + D] = _mm512_permutex2var_ps(a, hi, b);
    }
  }
}

inline void transpose16(__m512 (&v)[16]) {  // fully unrolled: the 16 rows stay in registers
  transpose_stage<8, 0>(v);
  transpose_stage<4, 1>(v);
  transpose_stage<2, 2>(v);
  transpose_stage<1, 3>(v);
}
#endif

// BT[j, n] = B[n, j] for n < ns, 0 for ns <= n < ncols.   B: [ns, R] rows of stride R (first r used);
// BT: [r, ldb] with ldb = ncols + kVec: the extra 64 bytes keep the r rows of BT out of one L1 set when ncols is a
// multiple of 1024 floats (4 KiB aliasing made this transpose 10x slower at N = 1024).
// With AVX-512 and R % 16 == 0, 16 x 16 blocks go through registers (4 permute stages): the scalar transpose was
// the largest cost of expand at 4 rows per expert (T = 1024, 256 experts).
template <typename T>
void transpose_b(const T* b, int64_t ns, int64_t R, int64_t r, int64_t ncols, int64_t ldb, float* bt) {
  int64_t n0 = 0;
#if defined(__AVX512F__)
  if (R % 16 == 0) {
    for (; n0 + 16 <= ns; n0 += 16)
      for (int64_t jb = 0; jb < r; jb += 16) {
        __m512 v[16];
        for (int i = 0; i < 16; ++i) {
          const T* src = b + (n0 + i) * R + jb;
          if constexpr (std::is_same_v<T, float>) {
            v[i] = _mm512_loadu_ps(src);
          } else {
            alignas(64) float tmp[16];
            for (int l = 0; l < 16; ++l) tmp[l] = static_cast<float>(src[l]);
            v[i] = _mm512_load_ps(tmp);
          }
        }
        transpose16(v);
        for (int64_t j = 0; j < 16 && jb + j < r; ++j) _mm512_storeu_ps(bt + (jb + j) * ldb + n0, v[j]);
      }
  }
#endif
  for (int64_t n = n0; n < ns; ++n) {
    const T* row = b + n * R;
    for (int64_t j = 0; j < r; ++j) bt[j * ldb + n] = static_cast<float>(row[j]);
  }
  for (int64_t j = 0; j < r; ++j)
    for (int64_t n = ns; n < ncols; ++n) bt[j * ldb + n] = 0.f;
}

void build_bt(const void* b, at::ScalarType st, int64_t ns, int64_t R, int64_t r, int64_t ncols, int64_t ldb,
              float* bt) {
  switch (st) {
    case at::kFloat: transpose_b(static_cast<const float*>(b), ns, R, r, ncols, ldb, bt); break;
    case at::kBFloat16: transpose_b(static_cast<const c10::BFloat16*>(b), ns, R, r, ncols, ldb, bt); break;
    case at::kHalf: transpose_b(static_cast<const c10::Half*>(b), ns, R, r, ncols, ldb, bt); break;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Micro-kernels (fp32)
// ---------------------------------------------------------------------------------------------------------------

inline float hsum(vf v) {  // a fixed pairwise order (deterministic)
  typedef float vf8 __attribute__((vector_size(32)));
  typedef float vf4 __attribute__((vector_size(16)));
  vf8 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  const vf8 s8 = lo + hi;
  vf4 a, b;
  std::memcpy(&a, &s8, 16);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + 16, 16);
  const vf4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// P[i, j] = dot(x_i, A_j) for NR rows and NJ ranks, on A's own [r, H] layout (no transpose): NR x NJ vector
// accumulators over H, one horizontal sum each at the end.   xr: NR row pointers; ar: A_e rows (stride H).
template <int NR, int NJ>
void shrink_block(const float* const* xr, const float* ar, int64_t H, float* p, int64_t ldp) {
  vf acc[NR][NJ];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NJ; ++j) acc[i][j] = vf{};
  int64_t h = 0;
  for (; h + kVec <= H; h += kVec) {
    vf xv[NR];
    for (int i = 0; i < NR; ++i) {
      xv[i] = vload(xr[i] + h);
      in_register(xv[i]);
    }
    for (int j = 0; j < NJ; ++j) {
      vf av = vload(ar + j * H + h);
      in_register(av);
      for (int i = 0; i < NR; ++i) acc[i][j] += xv[i] * av;
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NJ; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = h; t < H; ++t) s += xr[i][t] * ar[j * H + t];
      p[i * ldp + j] = s;
    }
}

template <int NR>
void shrink_ranks(const float* const* xr, const float* ar, int64_t r, int64_t H, float* p, int64_t ldp) {
  int64_t j = 0;
  for (; j + kTileRanks <= r; j += kTileRanks) shrink_block<NR, kTileRanks>(xr, ar + j * H, H, p + j, ldp);
  if (j + 2 <= r) { shrink_block<NR, 2>(xr, ar + j * H, H, p + j, ldp); j += 2; }
  if (j < r) shrink_block<NR, 1>(xr, ar + j * H, H, p + j, ldp);
}

// P[i, 0:r] = x_i @ A_e[:r].T for n rows.   P: [n, ldp].
void shrink_rows(const float* const* xr, int64_t n, const float* ar, int64_t r, int64_t H, float* p, int64_t ldp) {
  int64_t i = 0;
  for (; i + kTileRows <= n; i += kTileRows) shrink_ranks<kTileRows>(xr + i, ar, r, H, p + i * ldp, ldp);
  if (i + 2 <= n) { shrink_ranks<2>(xr + i, ar, r, H, p + i * ldp, ldp); i += 2; }
  if (i < n) shrink_ranks<1>(xr + i, ar, r, H, p + i * ldp, ldp);
}

// out[i, 0:cols] = sum_{j<r} P[i, j] * BT[j, c0 : c0 + cols] for NR rows; cols a multiple of kColVecs * kVec.
// Per rank j: kColVecs loads of B^T, NR broadcasts, NR * kColVecs FMAs.
template <int NR>
void expand_tile(const float* p, int64_t ldp, int64_t r, const float* bt, int64_t ldb, int64_t c0, int64_t cols,
                 float* out, int64_t ldo) {
  for (int64_t c = 0; c < cols; c += kColVecs * kVec) {
    vf acc[NR][kColVecs];
    for (int i = 0; i < NR; ++i)
      for (int v = 0; v < kColVecs; ++v) acc[i][v] = vf{};
    const float* b = bt + c0 + c;
    for (int64_t j = 0; j < r; ++j, b += ldb) {
      vf bv[kColVecs], pv[NR];
      for (int v = 0; v < kColVecs; ++v) {
        bv[v] = vload(b + v * kVec);
        in_register(bv[v]);
      }
      for (int i = 0; i < NR; ++i) {
        pv[i] = vf{} + p[i * ldp + j];  // broadcast once, used kColVecs times
        in_register(pv[i]);
      }
      for (int i = 0; i < NR; ++i)
        for (int v = 0; v < kColVecs; ++v) acc[i][v] += pv[i] * bv[v];
    }
    for (int i = 0; i < NR; ++i)
      for (int v = 0; v < kColVecs; ++v) vstore(out + i * ldo + c + v * kVec, acc[i][v]);
  }
}

void expand_rows(const float* p, int64_t n, int64_t ldp, int64_t r, const float* bt, int64_t ldb, int64_t c0,
                 int64_t cols, float* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + kTileRows <= n; i += kTileRows)
    expand_tile<kTileRows>(p + i * ldp, ldp, r, bt, ldb, c0, cols, out + i * ldo, ldo);
  if (kTileRows > 2 && i + 2 <= n) {
    expand_tile<2>(p + i * ldp, ldp, r, bt, ldb, c0, cols, out + i * ldo, ldo);
    i += 2;
  }
  if (i < n) expand_tile<1>(p + i * ldp, ldp, r, bt, ldb, c0, cols, out + i * ldo, ldo);
}

// ---------------------------------------------------------------------------------------------------------------
// Grouping, tasks, workers
// ---------------------------------------------------------------------------------------------------------------

struct Task {
  int64_t expert, begin, end;  // rows[begin:end] of the grouped row list, all routed to `expert`
};

// Chunks of at most kChunkRows rows per expert group, experts with rank 0 (nothing to compute) left out;
// largest first (the shared counter hands them out in this order).
std::vector<Task> make_tasks(const std::vector<int64_t>& start, const int32_t* ranks) {
  std::vector<Task> tasks;
  const int64_t E = static_cast<int64_t>(start.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    if (ranks[e] == 0) continue;
    for (int64_t b = start[e]; b < start[e + 1]; b += kChunkRows)
      tasks.push_back({e, b, std::min(start[e + 1], b + kChunkRows)});
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.end - a.begin > b.end - b.begin; });
  return tasks;
}

// Runs body(task_index, worker_state) for every task; one worker (with its own scratch) per thread, tasks pulled
// from a shared counter. `flops` decides whether starting threads is worth it.
template <typename State, typename MakeState, typename Body>
void run_tasks(int64_t num_tasks, double flops, const MakeState& make_state, const Body& body) {
  if (num_tasks == 0) return;
  int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  if (flops < 2e5) workers = 1;  // a decode-sized problem: thread start-up would cost more than the work
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    State st = make_state();
    for (int64_t i = next.fetch_add(1); i < num_tasks; i = next.fetch_add(1)) body(i, st);
  };
  if (workers <= 1) {
    worker(0, 1);
  } else {
    at::parallel_for(0, workers, 1, worker);
  }
}

struct Scratch {
  std::vector<float> xbuf;  // [kChunkRows, H] rows of x converted to fp32 (non-fp32 x only)
  std::vector<const float*> xr;  // [kChunkRows] row pointers
  std::vector<float> a;     // [R, H] A_e converted to fp32 (non-fp32 weights only)
  std::vector<float> p;     // [kChunkRows, rp]
  std::vector<float> bt;    // [R, ldb]
  std::vector<float> out;   // [kChunkRows, kColBlock]
};

// ---------------------------------------------------------------------------------------------------------------
// Argument checks (ValueError with the argument, the expected and the actual)
// ---------------------------------------------------------------------------------------------------------------

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor (got ", t.device(),
                    "); the C++ op is the CPU backend, use LUMOE_BACKEND=triton on a GPU");
}

void check_float(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
                    " must be fp32, fp16 or bf16 (got ", st, ")");
}

void check_dtype(const at::Tensor& t, at::ScalarType st, const char* name, const char* what) {
  TORCH_CHECK_VALUE(t.scalar_type() == st, name, " must be ", what, " (", st, "), got ", t.scalar_type());
}

// int32 index tensors are read through raw pointers: CPU, int32, contiguous.
void check_index(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  check_dtype(t, at::kInt, name, "int32");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_shape(const at::Tensor& t, std::initializer_list<int64_t> shape, const char* name, const char* what) {
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  int64_t d = 0;
  for (int64_t v : shape) ok = ok && t.size(d++) == v;
  TORCH_CHECK_VALUE(ok, name, " must have shape ", what, ", got ", shape_str(t));
}

// ranks: [E] int32 in [0, R]
const int32_t* check_ranks(const at::Tensor& ranks, int64_t E, int64_t R) {
  check_index(ranks, "ranks");
  check_shape(ranks, {E}, "ranks", "[E] (one rank per expert)");
  const int32_t* rk = ranks.data_ptr<int32_t>();
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK_VALUE(rk[e] >= 0 && rk[e] <= R, "ranks[", e, "] = ", rk[e], " is outside [0, R = ", R,
                      "]; a rank must fit the stacked LoRA weights");
  return rk;
}

// ids: [T, k] int32 in [-1, E)
void check_ids(const at::Tensor& ids, int64_t T, int64_t E) {
  check_index(ids, "ids");
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == T, "ids must have shape [T, k] with T = ", T, ", got ",
                    shape_str(ids));
  const int32_t* p = ids.data_ptr<int32_t>();
  for (int64_t m = 0; m < ids.numel(); ++m)
    TORCH_CHECK_VALUE(p[m] >= -1 && p[m] < E, "ids holds ", p[m], " at flat index ", m, "; expert ids must be in [-1, ",
                      E, ")");
}

// slice_offsets: [S+1] int32, 0 = first <= ... <= last = N
std::vector<int64_t> check_slices(const at::Tensor& so, int64_t S, int64_t N) {
  check_index(so, "slice_offsets");
  check_shape(so, {S + 1}, "slice_offsets", "[S + 1] (S = number of slices)");
  const int32_t* p = so.data_ptr<int32_t>();
  std::vector<int64_t> offs(p, p + S + 1);
  TORCH_CHECK_VALUE(offs[0] == 0 && offs[S] == N, "slice_offsets must start at 0 and end at N = ", N, ", got ",
                    offs[0], " ... ", offs[S]);
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK_VALUE(offs[s] <= offs[s + 1], "slice_offsets must be non-decreasing, got ", offs[s], " then ",
                      offs[s + 1]);
  return offs;
}

// Rows of each expert's group, read from meta.sorted_ids / meta.offsets (sentinel pads dropped), checked against ids.
void groups_from_meta(const at::Tensor& sorted_ids, const at::Tensor& offsets, const at::Tensor& ids, int64_t E,
                      std::vector<int64_t>& rows, std::vector<int64_t>& start) {
  check_index(sorted_ids, "meta.sorted_ids");
  check_index(offsets, "meta.offsets");
  TORCH_CHECK_VALUE(sorted_ids.dim() == 1, "meta.sorted_ids must have shape [P], got ", shape_str(sorted_ids));
  check_shape(offsets, {E + 1}, "meta.offsets", "[E + 1] (E = experts of the LoRA weights)");
  const int64_t P = sorted_ids.size(0), M = ids.numel();
  const int32_t* si = sorted_ids.data_ptr<int32_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int32_t* id = ids.data_ptr<int32_t>();
  rows.clear();
  start.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(off[e] >= 0 && off[e] <= off[e + 1] && off[e + 1] <= P, "meta.offsets must be non-decreasing "
                      "within [0, P = ", P, "], got offsets[", e, "] = ", off[e], ", offsets[", e + 1, "] = ",
                      off[e + 1], "; build the metadata with build_routing / align_by_expert");
    start[e] = static_cast<int64_t>(rows.size());
    for (int64_t q = off[e]; q < off[e + 1]; ++q) {
      const int64_t m = si[q];
      if (m < 0 || m >= M) continue;  // the sentinel M (padding)
      TORCH_CHECK_VALUE(id[m] == e, "meta.sorted_ids puts row ", m, " in expert ", e, "'s group but meta.ids says ",
                        id[m], "; the metadata was built from other ids (rebuild it with build_routing)");
      rows.push_back(m);
    }
  }
  start[E] = static_cast<int64_t>(rows.size());
}

// Rows of each expert's group from ids (counting sort, ascending m within a group); -1 rows dropped.
void groups_from_ids(const at::Tensor& ids, int64_t E, std::vector<int64_t>& rows, std::vector<int64_t>& start) {
  const int64_t M = ids.numel();
  const int32_t* id = ids.data_ptr<int32_t>();
  start.assign(E + 1, 0);
  for (int64_t m = 0; m < M; ++m)
    if (id[m] >= 0) ++start[id[m] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  rows.assign(start[E], 0);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t m = 0; m < M; ++m)
    if (id[m] >= 0) rows[fill[id[m]]++] = m;
}

// For k > 1: y[t] += sum_{j in order, row t*k+j written} contrib[t*k+j], tokens in parallel.
void reduce_topk(const float* contrib, const uint8_t* written, int64_t T, int64_t k, int64_t N, at::Tensor& y) {
  auto* ybase = static_cast<char*>(y.data_ptr());
  const auto yst = y.scalar_type();
  const int64_t ysz = y.element_size();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * N));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(N);
    for (int64_t t = t0; t < t1; ++t) {
      bool any = false;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t m = t * k + j;
        if (!written[m]) continue;
        const float* c = contrib + m * N;
        if (!any) {
          std::memcpy(acc.data(), c, N * sizeof(float));
          any = true;
        } else {
          for (int64_t n = 0; n < N; ++n) acc[n] += c[n];
        }
      }
      if (any) row_add(ybase + t * N * ysz, yst, acc.data(), N);
    }
  });
}

// The expand half shared by lora_expand and lora_shrink_expand: P (the chunk's scaled rank vectors, [n, rp]) times
// B[e, n_s, :r]^T for one slice, added into y (k = 1) or written into the contribution rows (k > 1).
struct ExpandTarget {
  char* y;               // [T, N] rows of y (k == 1), or nullptr
  at::ScalarType yst;
  int64_t ysz;
  float* contrib;        // [M, N] fp32 (k > 1), or nullptr
  int64_t N, k;
};

void expand_chunk(const ExpandTarget& tg, const int64_t* mrows, int64_t n, const float* p, int64_t rp, int64_t r,
                  const void* b_slice, at::ScalarType bst, int64_t ns, int64_t R, int64_t col0, Scratch& sc) {
  const int64_t ncols = round_up(ns, kColVecs * kVec), ldb = ncols + kVec;
  build_bt(b_slice, bst, ns, R, r, ncols, ldb, sc.bt.data());
  for (int64_t c0 = 0; c0 < ns; c0 += kColBlock) {
    const int64_t cols = std::min(kColBlock, ncols - c0);  // a multiple of kColVecs * kVec
    const int64_t valid = std::min(kColBlock, ns - c0);
    expand_rows(p, n, rp, r, sc.bt.data(), ldb, c0, cols, sc.out.data(), kColBlock);
    for (int64_t i = 0; i < n; ++i) {
      const float* src = sc.out.data() + i * kColBlock;
      const int64_t m = mrows[i];
      if (tg.contrib) {
        std::memcpy(tg.contrib + m * tg.N + col0 + c0, src, valid * sizeof(float));
      } else {
        row_add(tg.y + ((m / tg.k) * tg.N + col0 + c0) * tg.ysz, tg.yst, src, valid);
      }
    }
  }
}

Scratch make_scratch(int64_t H, bool need_x, int64_t rp, int64_t R, int64_t max_ns) {
  Scratch sc;
  if (need_x) sc.xbuf.resize(kChunkRows * H);
  sc.xr.resize(kChunkRows);
  if (need_x) sc.a.resize(std::max<int64_t>(1, R * H));
  sc.p.resize(kChunkRows * rp);
  sc.bt.resize(std::max<int64_t>(1, R * (round_up(max_ns, kColVecs * kVec) + kVec)));
  sc.out.resize(kChunkRows * kColBlock);
  return sc;
}

// Row pointers of x for the chunk (converted to fp32 in scratch when x is not fp32).
void gather_x(const at::Tensor& x, const int64_t* mrows, int64_t n, int64_t k, Scratch& sc) {
  const int64_t H = x.size(1);
  const auto st = x.scalar_type();
  const char* base = static_cast<const char*>(x.data_ptr());
  const int64_t rowbytes = H * x.element_size();
  for (int64_t i = 0; i < n; ++i) {
    const char* src = base + (mrows[i] / k) * rowbytes;
    if (st == at::kFloat) {
      sc.xr[i] = reinterpret_cast<const float*>(src);
    } else {
      row_to_f32(src, st, H, sc.xbuf.data() + i * H);
      sc.xr[i] = sc.xbuf.data() + i * H;
    }
  }
}

int64_t max_slice(const std::vector<int64_t>& offs) {
  int64_t mx = 0;
  for (size_t s = 0; s + 1 < offs.size(); ++s) mx = std::max(mx, offs[s + 1] - offs[s]);
  return mx;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------------

// buf[s, m, :r_e] = x[m / k] @ lora_a[s, e_m, :r_e, :]^T; every other element of `out` is zeroed.
// x: [T, H] fp32/fp16/bf16; lora_a: [S, E, R, H] dtype of x; sorted_ids: [P] int32; offsets: [E+1] int32;
// ids: [T, k] int32; ranks: [E] int32; out: [S, M, R] fp32 contiguous (overwritten). Returns out.
at::Tensor lora_shrink(const at::Tensor& x_, const at::Tensor& lora_a_, const at::Tensor& sorted_ids,
                       const at::Tensor& offsets, const at::Tensor& ids, const at::Tensor& ranks, at::Tensor out) {
  check_cpu(x_, "x");
  check_cpu(lora_a_, "lora_a");
  check_cpu(out, "out");
  check_float(x_, "x");
  TORCH_CHECK_VALUE(x_.dim() == 2, "x must have shape [T, H], got ", shape_str(x_));
  TORCH_CHECK_VALUE(lora_a_.dim() == 4, "lora_a must have shape [S, E, R, H], got ", shape_str(lora_a_));
  check_dtype(lora_a_, x_.scalar_type(), "lora_a", "the dtype of x");
  const int64_t T = x_.size(0), H = x_.size(1);
  const int64_t S = lora_a_.size(0), E = lora_a_.size(1), R = lora_a_.size(2);
  TORCH_CHECK_VALUE(lora_a_.size(3) == H, "lora_a must have shape [S, E, R, H = ", H, "], got ", shape_str(lora_a_));
  check_ids(ids, T, E);
  const int64_t k = ids.size(1), M = T * k;
  check_dtype(out, at::kFloat, "out", "fp32");
  check_shape(out, {S, M, R}, "out", "[S, M, R]");
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  const int32_t* rk = check_ranks(ranks, E, R);
  std::vector<int64_t> rows, start;
  groups_from_meta(sorted_ids, offsets, ids, E, rows, start);

  out.zero_();
  if (M == 0 || H == 0 || R == 0) return out;
  const at::Tensor x = x_.contiguous(), lora_a = lora_a_.contiguous();
  const auto tasks = make_tasks(start, rk);
  const int64_t rp = round_up(R, kVec);
  const char* abase = static_cast<const char*>(lora_a.data_ptr());
  const int64_t esz = lora_a.element_size();
  float* obase = out.data_ptr<float>();
  const double flops = 2.0 * static_cast<double>(rows.size()) * S * R * H;
  run_tasks<Scratch>(
      static_cast<int64_t>(tasks.size()), flops,
      [&] { return make_scratch(H, x.scalar_type() != at::kFloat, rp, R, 0); },
      [&](int64_t ti, Scratch& sc) {
        const Task& tk = tasks[ti];
        const int64_t n = tk.end - tk.begin, r = rk[tk.expert], rpe = round_up(r, kVec);
        const int64_t* mrows = rows.data() + tk.begin;
        gather_x(x, mrows, n, k, sc);
        for (int64_t s = 0; s < S; ++s) {
          const float* ar = a_rows(abase + ((s * E + tk.expert) * R * H) * esz, x.scalar_type(), r, H, sc.a.data());
          shrink_rows(sc.xr.data(), n, ar, r, H, sc.p.data(), rpe);
          for (int64_t i = 0; i < n; ++i)
            std::memcpy(obase + (s * M + mrows[i]) * R, sc.p.data() + i * rpe, r * sizeof(float));
        }
      });
  return out;
}

// y[t, n_s] += sum_j weights[t, j] * scales[e] * buf[s, t*k+j, :r_e] @ lora_b[e, n_s, :r_e]^T (e = ids[t, j]).
// buf: [S, M, R] fp32; lora_b: [E, N, R] dtype of y; slice_offsets: [S+1] int32; sorted_ids: [P] int32;
// offsets: [E+1] int32; ids: [T, k] int32; weights: [T, k] fp32; scales: [E] fp32; ranks: [E] int32;
// y: [T, N] fp32/fp16/bf16, updated in place. Returns y.
at::Tensor lora_expand(const at::Tensor& buf_, const at::Tensor& lora_b_, const at::Tensor& slice_offsets,
                       const at::Tensor& sorted_ids, const at::Tensor& offsets, const at::Tensor& ids,
                       const at::Tensor& weights_, const at::Tensor& scales_, const at::Tensor& ranks, at::Tensor y) {
  check_cpu(buf_, "buf");
  check_cpu(lora_b_, "lora_b");
  check_cpu(y, "y");
  check_cpu(weights_, "weights");
  check_cpu(scales_, "scales");
  check_float(y, "y");
  check_dtype(buf_, at::kFloat, "buf", "fp32");
  TORCH_CHECK_VALUE(y.dim() == 2, "y must have shape [T, N], got ", shape_str(y));
  TORCH_CHECK_VALUE(lora_b_.dim() == 3, "lora_b must have shape [E, N, R], got ", shape_str(lora_b_));
  check_dtype(lora_b_, y.scalar_type(), "lora_b", "the dtype of y");
  const int64_t T = y.size(0), N = y.size(1), E = lora_b_.size(0), R = lora_b_.size(2);
  TORCH_CHECK_VALUE(lora_b_.size(1) == N, "lora_b must have shape [E, N = ", N, ", R], got ", shape_str(lora_b_));
  check_ids(ids, T, E);
  const int64_t k = ids.size(1), M = T * k;
  TORCH_CHECK_VALUE(buf_.dim() == 3 && buf_.size(1) == M && buf_.size(2) == R,
                    "buf must have shape [S, M = ", M, ", R = ", R, "], got ", shape_str(buf_));
  const int64_t S = buf_.size(0);
  const auto offs = check_slices(slice_offsets, S, N);
  check_dtype(weights_, at::kFloat, "weights", "fp32");
  check_shape(weights_, {T, k}, "weights", "[T, k] like ids");
  check_dtype(scales_, at::kFloat, "scales", "fp32");
  check_shape(scales_, {E}, "scales", "[E]");
  const int32_t* rk = check_ranks(ranks, E, R);
  std::vector<int64_t> rows, start;
  groups_from_meta(sorted_ids, offsets, ids, E, rows, start);
  if (M == 0 || N == 0 || R == 0 || rows.empty()) return y;

  const at::Tensor buf = buf_.contiguous(), lora_b = lora_b_.contiguous();
  const at::Tensor weights = weights_.contiguous(), scales = scales_.contiguous();
  at::Tensor yc = y.is_contiguous() ? y : y.contiguous();
  const auto tasks = make_tasks(start, rk);
  const int64_t rp = round_up(R, kVec), max_ns = max_slice(offs);
  at::Tensor contrib;
  std::vector<uint8_t> written;
  if (k > 1) {
    contrib = at::empty({M, N}, buf.options());
    written.assign(M, 0);
  }
  ExpandTarget tg{static_cast<char*>(yc.data_ptr()), yc.scalar_type(), yc.element_size(),
                  k > 1 ? contrib.data_ptr<float>() : nullptr, N, k};
  const float* bufp = buf.data_ptr<float>();
  const float* w = weights.data_ptr<float>();
  const float* sc_e = scales.data_ptr<float>();
  const char* bbase = static_cast<const char*>(lora_b.data_ptr());
  const int64_t bsz = lora_b.element_size();
  const double flops = 2.0 * static_cast<double>(rows.size()) * R * N;
  run_tasks<Scratch>(
      static_cast<int64_t>(tasks.size()), flops, [&] { return make_scratch(0, false, rp, R, max_ns); },
      [&](int64_t ti, Scratch& sc) {
        const Task& tk = tasks[ti];
        const int64_t e = tk.expert, n = tk.end - tk.begin, r = rk[e];
        const int64_t* mrows = rows.data() + tk.begin;
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t i = 0; i < n; ++i) {
            const float coef = w[mrows[i]] * sc_e[e];
            const float* src = bufp + (s * M + mrows[i]) * R;
            float* dst = sc.p.data() + i * rp;
            for (int64_t j = 0; j < r; ++j) dst[j] = src[j] * coef;
          }
          const int64_t ns = offs[s + 1] - offs[s];
          if (ns == 0) continue;
          expand_chunk(tg, mrows, n, sc.p.data(), rp, r, bbase + (e * N + offs[s]) * R * bsz, lora_b.scalar_type(),
                       ns, R, offs[s], sc);
        }
        if (k > 1)
          for (int64_t i = 0; i < n; ++i) written[mrows[i]] = 1;
      });
  if (k > 1) reduce_topk(contrib.data_ptr<float>(), written.data(), T, k, N, yc);
  if (!yc.is_same(y)) y.copy_(yc);
  return y;
}

// lora_shrink then lora_expand from the routing itself (rows grouped by a counting sort of ids), the rank vectors of
// a chunk kept in scratch (no [S, M, R] buffer).
// x: [T, H]; lora_a: [S, E, R, H] dtype of x; lora_b: [E, N, R] dtype of y; slice_offsets: [S+1] int32;
// ids: [T, k] int32; weights: [T, k] fp32; scales: [E] fp32; ranks: [E] int32; y: [T, N], updated in place.
at::Tensor lora_shrink_expand(const at::Tensor& x_, const at::Tensor& lora_a_, const at::Tensor& lora_b_,
                              const at::Tensor& slice_offsets, const at::Tensor& ids_, const at::Tensor& weights_,
                              const at::Tensor& scales_, const at::Tensor& ranks, at::Tensor y) {
  check_cpu(x_, "x");
  check_cpu(lora_a_, "lora_a");
  check_cpu(lora_b_, "lora_b");
  check_cpu(weights_, "weights");
  check_cpu(scales_, "scales");
  check_cpu(y, "y");
  check_float(x_, "x");
  check_float(y, "y");
  TORCH_CHECK_VALUE(x_.dim() == 2, "x must have shape [T, H], got ", shape_str(x_));
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == x_.size(0), "y must have shape [T = ", x_.size(0), ", N], got ",
                    shape_str(y));
  TORCH_CHECK_VALUE(lora_a_.dim() == 4, "lora_a must have shape [S, E, R, H], got ", shape_str(lora_a_));
  check_dtype(lora_a_, x_.scalar_type(), "lora_a", "the dtype of x");
  check_dtype(lora_b_, y.scalar_type(), "lora_b", "the dtype of y");
  const int64_t T = x_.size(0), H = x_.size(1), N = y.size(1);
  const int64_t S = lora_a_.size(0), E = lora_a_.size(1), R = lora_a_.size(2);
  TORCH_CHECK_VALUE(lora_a_.size(3) == H, "lora_a must have shape [S, E, R, H = ", H, "], got ", shape_str(lora_a_));
  check_shape(lora_b_, {E, N, R}, "lora_b", "[E, N, R] (E, R of lora_a; N of y)");
  check_ids(ids_, T, E);
  const int64_t k = ids_.size(1), M = T * k;
  const auto offs = check_slices(slice_offsets, S, N);
  check_dtype(weights_, at::kFloat, "weights", "fp32");
  check_shape(weights_, {T, k}, "weights", "[T, k] like ids");
  check_dtype(scales_, at::kFloat, "scales", "fp32");
  check_shape(scales_, {E}, "scales", "[E]");
  const int32_t* rk = check_ranks(ranks, E, R);
  const at::Tensor& ids = ids_;
  std::vector<int64_t> rows, start;
  groups_from_ids(ids, E, rows, start);
  if (M == 0 || N == 0 || R == 0 || H == 0 || rows.empty()) return y;

  const at::Tensor x = x_.contiguous(), lora_a = lora_a_.contiguous(), lora_b = lora_b_.contiguous();
  const at::Tensor weights = weights_.contiguous(), scales = scales_.contiguous();
  at::Tensor yc = y.is_contiguous() ? y : y.contiguous();
  const auto tasks = make_tasks(start, rk);
  const int64_t rp = round_up(R, kVec), max_ns = max_slice(offs);
  at::Tensor contrib;
  std::vector<uint8_t> written;
  if (k > 1) {
    contrib = at::empty({M, N}, x.options().dtype(at::kFloat));
    written.assign(M, 0);
  }
  ExpandTarget tg{static_cast<char*>(yc.data_ptr()), yc.scalar_type(), yc.element_size(),
                  k > 1 ? contrib.data_ptr<float>() : nullptr, N, k};
  const float* w = weights.data_ptr<float>();
  const float* sc_e = scales.data_ptr<float>();
  const char* abase = static_cast<const char*>(lora_a.data_ptr());
  const char* bbase = static_cast<const char*>(lora_b.data_ptr());
  const int64_t asz = lora_a.element_size(), bsz = lora_b.element_size();
  const double flops = 2.0 * static_cast<double>(rows.size()) * R * (S * H + N);
  run_tasks<Scratch>(
      static_cast<int64_t>(tasks.size()), flops,
      [&] { return make_scratch(H, x.scalar_type() != at::kFloat, rp, R, max_ns); },
      [&](int64_t ti, Scratch& sc) {
        const Task& tk = tasks[ti];
        const int64_t e = tk.expert, n = tk.end - tk.begin, r = rk[e], rpe = round_up(r, kVec);
        const int64_t* mrows = rows.data() + tk.begin;
        gather_x(x, mrows, n, k, sc);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t ns = offs[s + 1] - offs[s];
          if (ns == 0) continue;
          const float* ar = a_rows(abase + ((s * E + e) * R * H) * asz, x.scalar_type(), r, H, sc.a.data());
          shrink_rows(sc.xr.data(), n, ar, r, H, sc.p.data(), rpe);
          for (int64_t i = 0; i < n; ++i) {
            const float coef = w[mrows[i]] * sc_e[e];
            float* p = sc.p.data() + i * rpe;
            for (int64_t j = 0; j < r; ++j) p[j] *= coef;
          }
          expand_chunk(tg, mrows, n, sc.p.data(), rpe, r, bbase + (e * N + offs[s]) * R * bsz, lora_b.scalar_type(),
                       ns, R, offs[s], sc);
        }
        if (k > 1)
          for (int64_t i = 0; i < n; ++i) written[mrows[i]] = 1;
      });
  if (k > 1) reduce_topk(contrib.data_ptr<float>(), written.data(), T, k, N, yc);
  if (!yc.is_same(y)) y.copy_(yc);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Grouped multi-LoRA shrink / expand on CPU (fp32 arithmetic; fp32/fp16/bf16 storage).";
  m.def("lora_shrink", &lora_shrink, "buf[s, m, :r] = x[m // k] @ A[s, e_m, :r].T (rows grouped by expert)",
        py::arg("x"), py::arg("lora_a"), py::arg("sorted_ids"), py::arg("offsets"), py::arg("ids"), py::arg("ranks"),
        py::arg("out"));
  m.def("lora_expand", &lora_expand, "y[t, n_s] += sum_j w * scale_e * buf[s, t*k+j, :r] @ B[e, n_s, :r].T",
        py::arg("buf"), py::arg("lora_b"), py::arg("slice_offsets"), py::arg("sorted_ids"), py::arg("offsets"),
        py::arg("ids"), py::arg("weights"), py::arg("scales"), py::arg("ranks"), py::arg("y"));
  m.def("lora_shrink_expand", &lora_shrink_expand, "lora_shrink then lora_expand from ids (no alignment metadata)",
        py::arg("x"), py::arg("lora_a"), py::arg("lora_b"), py::arg("slice_offsets"), py::arg("ids"),
        py::arg("weights"), py::arg("scales"), py::arg("ranks"), py::arg("y"));
}
