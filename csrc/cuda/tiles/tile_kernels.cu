// The tile backend of the margin cross-entropy on CUDA (docs/design.md, "CUDA tiles"), correctness-first version:
//   prepass   per-row norms, target column, the target logit through margin_math.h; per-weight-
//             row norms.
//   forward   grid (row tile, class split): for its rows, stream the split's class tiles, form the
//             dot products of a 64 × 64 tile on tensor cores (16-bit inputs) or CUDA cores, apply
//             norms, sub-center max, hard negatives, bias and margin in the epilogue and fold the
//             tile into an online (max, sum-exp) per row. Per-(split, row) partials, then a merge.
//   backward  two atomic-free passes from the saved lse: the row owner (dx, per class split, then
//             a reduction over splits) and the class owner (dW and dbias, streaming every row
//             tile). Each recomputes its logit tiles; no [B, C] buffer, no chunk of logits in
//             global memory. With grad_skip, a tile voted negligible keeps only its label
//             entries, and its products become one row update per label.
// Tiles live in shared memory as fp32/fp64 between the product and the epilogue; the 16-bit
// operand copies of G feed tensor cores as in flash-attention's P·V. float32 inputs are exact
// (CUDA cores) unless torch allows TF32 for float32 matmuls, as cuBLAS reads the same switch.
#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "../../margin_math.h"
#include "tile_kernels.h"
#include "../rows.cuh"
#include "../tile_mma.cuh"

namespace marginops::cuda {
namespace {

constexpr int kBK = 32;       // depth of one step of a logit tile's product
constexpr int kFwdRows = 64;  // rows of a forward tile
constexpr int kDxRows = 32;   // rows of a dx tile
constexpr int kDwRows = 64;   // rows streamed per step of the dW pass
constexpr int kTileW = 64;    // weight rows of a forward / dx class tile
constexpr int kDwW = 32;      // weight rows owned by a dW block
constexpr int kChunk = 64;    // columns of D per step of the dx / dW products

template <typename ACC>
constexpr int kSlab = std::is_same_v<ACC, double> ? 256 : 512;  // columns of D one block accumulates

// wr[pos] = the weight row of position pos < NW of the class tile from j0 (class j0 + pos / K,
// sub-center pos % K), or -1 past the computed classes and in the last NW % K positions. Filled
// once per class tile, so the tile loads look rows up instead of dividing by K per element; K = 1
// (no sub-centers) divides nothing.
template <int NW>
__device__ __forceinline__ void fill_weight_rows(const HeadParams& p, int64_t j0, int64_t* wr) {
  const int K = static_cast<int>(p.K);  // 1..32
  for (int pos = threadIdx.x; pos < NW; pos += blockDim.x) {
    const int cc = K == 1 ? pos : pos / K, k = K == 1 ? 0 : pos - cc * K;
    const int64_t c = j0 + cc;
    int64_t row = -1;
    if (cc < NW / K && c < p.C) row = local_class(p, c) * K + k;
    wr[pos] = row;
  }
}

// The class tiles [t0, t1) of split s: contiguous and in order (the merge keeps the first split's
// best logit on ties, as the CPU op keeps the first column). In 32-bit unsigned arithmetic, which
// divides inline: a 64-bit division is a subroutine call, and registers live across the call
// spill. tiles_forward / tiles_backward check C < 2^31; workspace_bytes keeps splits < 2^16, so
// s · rem < 2^32.
__device__ __forceinline__ void split_tiles(const HeadParams& p, int cpt, unsigned s, int64_t& t0, int64_t& t1) {
  const unsigned splits = static_cast<unsigned>(p.splits);
  const unsigned ntiles = (static_cast<unsigned>(p.C) + cpt - 1) / static_cast<unsigned>(cpt);
  const unsigned q = ntiles / splits, rem = ntiles % splits;
  t0 = static_cast<int64_t>(s) * q + s * rem / splits;
  t1 = static_cast<int64_t>(s + 1) * q + (s + 1) * rem / splits;
}

// Shared memory of a tile kernel: the logit tile's operands As [BM][kBK] and Bs [NW][kBK], the
// tile Ss [BM][NW]; for the backward products also G [BM][NW] as operands, the streamed operand
// Cs [CROWS][kChunk], the accumulator acc [AROWS][slab] and EXTRA scalars.
template <int BM, int NW, int CROWS, int AROWS, int EXTRA, typename OP, typename ACC>
struct TileSmem {
  static constexpr int lda = kBK + kPad<OP>, lds = NW + kPad<ACC>, ldg = NW + kPad<OP>;
  static constexpr int ldc = kChunk + kPad<OP>, lacc = kSlab<ACC> + kPad<ACC>;
  OP *As, *Bs;
  ACC* Ss;
  OP *Gs, *Cs;
  ACC *acc, *extra;
  int64_t* wr;  // [NW] the class tile's weight rows (fill_weight_rows)
  size_t bytes;
  __host__ __device__ explicit TileSmem(unsigned char* base) {
    SmemCarver sm{base};
    As = sm.take<OP>(BM * lda);
    Bs = sm.take<OP>(NW * lda);
    Ss = sm.take<ACC>(BM * lds);
    Gs = sm.take<OP>(AROWS ? BM * ldg : 0);
    Cs = sm.take<OP>(CROWS * ldc);
    acc = sm.take<ACC>(AROWS * lacc);
    extra = sm.take<ACC>(EXTRA);
    wr = sm.take<int64_t>(NW);
    bytes = sm.offset;
  }
};
template <typename OP, typename ACC>
using ForwardSmem = TileSmem<kFwdRows, kTileW, 0, 0, 0, OP, ACC>;
template <typename OP, typename ACC>
using DxSmem = TileSmem<kDxRows, kTileW, kTileW, kDxRows, kDxRows, OP, ACC>;  // Cs: W rows; extra: Σ G z⁰ per row
template <typename OP, typename ACC>
using DwSmem =
    TileSmem<kDwRows, kDwW, kDwRows, kDwW, 3 * kDwW, OP, ACC>;  // Cs: x rows; extra: three sums per weight row

// ---- prepass --------------------------------------------------------------------------------

template <typename TW, typename ACC>
__global__ void __launch_bounds__(kThreads) w_norm_kernel(HeadParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.C * p.K) return;
  const int64_t c = r / p.K;
  if (lane == 0 && r % p.K == 0) check_class_index(p, c);
  const int64_t row = local_class(p, c) * p.K + r % p.K;
  const TW* w = static_cast<const TW*>(p.w) + row * p.D;
  const ACC norm = warp_row_norm<ACC>(w, p.D, lane);
  if (lane == 0) static_cast<ACC*>(p.w_norm)[r] = norm;
}

// ---- the logit tile ---------------------------------------------------------------------------

// Ss[r][pos] = x_{i0 + r} · W_{wr[pos]} for ROWS rows and NW weight rows (zero outside).
// prologue() runs after the first barrier, when every warp is done with the previous tile: the
// forward and dx kernels fill wr for the new class tile there.
template <int ROWS, int NW, typename TX, typename TW, typename OP, typename ACC, typename Prologue>
__device__ __forceinline__ void logit_tile(const HeadParams& p, int64_t i0, const int64_t* wr, Prologue prologue,
                                           OP* As, OP* Bs, ACC* Ss) {
  constexpr int lda = kBK + kPad<OP>, lds = NW + kPad<ACC>;
  __syncthreads();  // every warp is done with the previous tile's Ss and wr
  prologue();
  for (int e = threadIdx.x; e < ROWS * lds; e += blockDim.x) Ss[e] = ACC(0);
  for (int64_t d0 = 0; d0 < p.D; d0 += kBK) {
    __syncthreads();
    load_tile(As, lda, ROWS, kBK, static_cast<const TX*>(p.x), p.D, d0, p.D,
              [&](int r) { return i0 + r < p.B ? i0 + r : int64_t(-1); });
    load_tile(Bs, lda, NW, kBK, static_cast<const TW*>(p.w), p.D, d0, p.D, [&](int pos) { return wr[pos]; });
    __syncthreads();
    tile_mma<ROWS, NW, kBK, OP, ACC, false, true>(As, lda, Bs, lda, Ss, lds);
  }
  __syncthreads();
}

template <typename TX, typename TW, typename OP, typename ACC>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(HeadParams p) {
  constexpr int BM = kFwdRows, NW = kTileW;
  using Smem = ForwardSmem<OP, ACC>;
  constexpr int lds = Smem::lds, kRowsPerWarp = BM / kWarps;
  MO_DYNAMIC_SMEM(smem_raw);
  const Smem sm(smem_raw);
  OP *As = sm.As, *Bs = sm.Bs;
  ACC* Ss = sm.Ss;
  int64_t* wr = sm.wr;
  RowInfo<ACC>* rows = static_cast<RowInfo<ACC>*>(p.rows);
  const ACC* wnorm = static_cast<const ACC*>(p.w_norm);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cpt = kTileW / static_cast<int>(p.K);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM, s = blockIdx.y;
  int64_t t0, t1;
  split_tiles(p, cpt, blockIdx.y, t0, t1);

  ACC m[kRowsPerWarp], l[kRowsPerWarp], zs[kRowsPerWarp], bv[kRowsPerWarp];
  int64_t bj[kRowsPerWarp];
  for (int q = 0; q < kRowsPerWarp; ++q) {
    m[q] = neg_inf<ACC>();
    l[q] = zs[q] = ACC(0);
    bv[q] = neg_inf<ACC>();
    bj[q] = -1;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = t * cpt;
    logit_tile<BM, NW, TX, TW, OP, ACC>(p, i0, wr, [&] { fill_weight_rows<NW>(p, j0, wr); }, As, Bs, Ss);
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int r = warp * kRowsPerWarp + q;
      const int64_t i = i0 + r;
      if (i >= p.B) break;
      const RowInfo<ACC> row = rows[i];
      ACC zmax = neg_inf<ACC>(), pbest = neg_inf<ACC>(), zsum = 0;
      int64_t pj = -1;
      Entry<ACC> es[2];
      bool valid[2];
      for (int h = 0; h < 2; ++h) {
        const int cc = lane + 32 * h;
        const int64_t j = j0 + cc;
        valid[h] = cc < cpt && j < p.C;
        if (!valid[h]) continue;
        es[h] = entry(p, row, Ss + r * lds + cc * p.K, wnorm + j * p.K, j);
        // Without a margin the target logit is this entry itself (merge_kernel reports it), so
        // that lse ≥ z_iy exactly: only this block's lane touches the field, nothing else reads it.
        if (j == row.tcol && p.cfg.margin_kind == kIdentity) rows[i].target.logit = es[h].z;
        zmax = max_nan(zmax, es[h].z);
        zsum += es[h].z;
        if (es[h].plain > pbest) {
          pbest = es[h].plain;
          pj = j;
        }
      }
      zmax = warp_max_nan(zmax);
      zsum = warp_sum(zsum);
      for (int o = 16; o > 0; o >>= 1) {  // argmax, first column on ties
        const ACC ov = __shfl_xor_sync(0xffffffffu, pbest, o);
        const int64_t oj = __shfl_xor_sync(0xffffffffu, pj, o);
        if (ov > pbest || (ov == pbest && oj >= 0 && (pj < 0 || oj < pj))) {
          pbest = ov;
          pj = oj;
        }
      }
      const ACC mnew = max_nan(m[q], zmax);
      ACC e = 0;
      for (int h = 0; h < 2; ++h) {
        if (valid[h]) e += exp(es[h].z - mnew);
      }
      e = warp_sum(e);
      // l stays 0 while every entry so far is −inf (exp(−inf − (−inf)) is NaN); a NaN or an
      // Inf − Inf sticks in it from then on.
      if (mnew != neg_inf<ACC>()) {
        l[q] = (m[q] == neg_inf<ACC>() ? ACC(0) : l[q] * exp(m[q] - mnew)) + e;
        m[q] = mnew;
      }
      zs[q] += zsum;
      if (pbest > bv[q]) {
        bv[q] = pbest;
        bj[q] = pj;
      }
    }
  }
  if (lane == 0) {
    ACC* part = static_cast<ACC*>(p.partial);
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int64_t i = i0 + warp * kRowsPerWarp + q;
      if (i >= p.B) break;
      ACC* o = part + (s * p.B + i) * 4;
      o[0] = m[q];
      o[1] = l[q];
      o[2] = zs[q];
      o[3] = bv[q];
      p.partial_best[s * p.B + i] = bj[q];
    }
  }
}

// ---- backward -------------------------------------------------------------------------------

// Gradient skipping (p.grad_skip > 0), a block vote on the recomputed tile of rows [i0, i0 + bm)
// × classes [j0, j0 + cpt): whether it is negligible apart from its label entries — no row with
// a grad_logit_sum (label smoothing's uniform gradient) and every other probability exp(z − lse)
// of a row with a grad_lse below the threshold. The same rule as the CPU op's. A negligible tile
// keeps only its label entries, and its products shrink to one row update per label.
template <typename ACC>
__device__ bool tile_negligible(const HeadParams& p, const RowInfo<ACC>* rows, const ACC* Ss, int lds, int64_t i0,
                                int bm, int64_t j0, int cpt, const ACC* wnorm) {
  int visible = 0;
  for (int e = threadIdx.x; e < bm * cpt && !visible; e += blockDim.x) {
    const int r = e / cpt, cc = e % cpt;
    const int64_t i = i0 + r, j = j0 + cc;
    if (i >= p.B || j >= p.C || j == rows[i].tcol) continue;
    const RowInfo<ACC>& row = rows[i];
    if (row.gs != ACC(0)) {
      visible = 1;
    } else if (row.gl != ACC(0)) {
      visible = exp(entry(p, row, Ss + r * lds + cc * p.K, wnorm + j * p.K, j).z - row.lse) >= ACC(p.grad_skip);
    }
  }
  return __syncthreads_or(visible) == 0;
}

// The label's column of row i within the tile's classes [j0, j0 + cpt), or -1.
template <typename ACC>
__device__ __forceinline__ int label_column(const RowInfo<ACC>& row, int64_t j0, int cpt) {
  return row.tcol >= j0 && row.tcol < j0 + cpt ? static_cast<int>(row.tcol - j0) : -1;
}

template <typename TX, typename TW, typename OP, typename ACC>
__global__ void __launch_bounds__(kThreads, 1) dx_kernel(HeadParams p) {
  constexpr int BM = kDxRows, NW = kTileW, SLAB = kSlab<ACC>;
  using Smem = DxSmem<OP, ACC>;
  constexpr int lds = Smem::lds, ldg = Smem::ldg, ldw = Smem::ldc, lacc = Smem::lacc, kRowsPerWarp = BM / kWarps;
  MO_DYNAMIC_SMEM(smem_raw);
  const Smem sm(smem_raw);
  OP *As = sm.As, *Bs = sm.Bs, *Gs = sm.Gs, *Wc = sm.Cs;
  ACC *Ss = sm.Ss, *acc = sm.acc, *rs = sm.extra;
  int64_t* wr = sm.wr;
  RowInfo<ACC>* rows = static_cast<RowInfo<ACC>*>(p.rows);
  const ACC* wnorm = static_cast<const ACC*>(p.w_norm);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cpt = kTileW / static_cast<int>(p.K);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM, s = blockIdx.y,
                d_begin = static_cast<int64_t>(blockIdx.z) * SLAB;
  const int64_t d_end = d_begin + SLAB < p.D ? d_begin + SLAB : p.D;
  int64_t t0, t1;
  split_tiles(p, cpt, blockIdx.y, t0, t1);
  for (int e = threadIdx.x; e < BM * lacc; e += blockDim.x) acc[e] = ACC(0);
  for (int e = threadIdx.x; e < BM; e += blockDim.x) rs[e] = ACC(0);

  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j0 = t * cpt;
    const auto wrow = [&](int pos) { return wr[pos]; };
    logit_tile<BM, NW, TX, TW, OP, ACC>(p, i0, wr, [&] { fill_weight_rows<NW>(p, j0, wr); }, As, Bs, Ss);
    const bool sparse = p.grad_skip > 0 && tile_negligible(p, rows, Ss, lds, i0, BM, j0, cpt, wnorm);
    for (int e = threadIdx.x; e < BM * ldg; e += blockDim.x) Gs[e] = convert<OP>(0.0f);
    __syncthreads();
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int r = warp * kRowsPerWarp + q;
      const int64_t i = i0 + r;
      if (i >= p.B) break;
      const RowInfo<ACC> row = rows[i];
      ACC corr = 0;
      for (int h = 0; h < 2; ++h) {
        const int cc = lane + 32 * h;
        const int64_t j = j0 + cc;
        if (cc >= cpt || j >= p.C || (sparse && j != row.tcol)) continue;
        const Entry<ACC> e = entry(p, row, Ss + r * lds + cc * p.K, wnorm + j * p.K, j);
        const ACC g = entry_grad(row, e, j == row.tcol) * (e.target ? ACC(1) : e.factor);
        if (!e.target) corr += g * e.z0;
        const ACC beta = make_side<ACC>(wnorm[j * p.K + e.k], p.cfg.normalize_w, ACC(1)).scale;
        Gs[r * ldg + cc * p.K + e.k] = convert<OP>((e.target ? row.tg.tile_grad : g) * beta);
      }
      corr = warp_sum(corr);
      if (lane == 0) rs[r] += corr;
    }
    if (sparse) {  // acc[r] += G[r][pos] W[pos] at each row's label (its sub-centers: one is nonzero)
      __syncwarp();
      for (int q = 0; q < kRowsPerWarp; ++q) {
        const int r = warp * kRowsPerWarp + q;
        const int c = i0 + r < p.B ? label_column(rows[i0 + r], j0, cpt) : -1;
        for (int k = 0; c >= 0 && k < p.K; ++k) {
          const int pos = c * static_cast<int>(p.K) + k;
          const ACC g = convert<ACC>(Gs[r * ldg + pos]);
          const TW* w = static_cast<const TW*>(p.w) + wrow(pos) * p.D;
          for (int64_t d = d_begin + lane; g != ACC(0) && d < d_end; d += 32)
            acc[r * lacc + (d - d_begin)] += g * convert<ACC>(w[d]);
        }
      }
      continue;  // the next tile's first barrier orders these writes
    }
    // acc[r][d] += Σ_pos G[r][pos] W[pos][d] over this block's slab of D.
    for (int64_t c0 = d_begin; c0 < d_end; c0 += kChunk) {
      __syncthreads();
      load_tile(Wc, ldw, NW, kChunk, static_cast<const TW*>(p.w), p.D, c0, d_end, wrow);
      __syncthreads();
      tile_mma<BM, kChunk, NW, OP, ACC, false, false>(Gs, ldg, Wc, ldw, acc + (c0 - d_begin), lacc);
    }
    __syncthreads();
  }
  __syncthreads();  // a last sparse tile's row updates
  ACC* part = static_cast<ACC*>(p.dx_part);
  for (int e = threadIdx.x; e < BM * SLAB; e += blockDim.x) {
    const int r = e / SLAB;
    const int64_t i = i0 + r, d = d_begin + e % SLAB;
    if (i < p.B && d < d_end) part[(s * p.B + i) * p.D + d] = acc[r * lacc + e % SLAB];
  }
  if (blockIdx.z == 0) {
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {
      if (i0 + r < p.B) static_cast<ACC*>(p.rsum_part)[s * p.B + i0 + r] = rs[r];
    }
  }
}

// dx_i = α_i Σ_s part[s][i] + x̂_i (−inv_i Σ_s rsum[s][i] [normalized] + the target's x_coef)
template <typename TX, typename ACC>
__global__ void dx_finalize_kernel(HeadParams p) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.B * p.D) return;
  const int64_t i = e / p.D;
  const RowInfo<ACC>& row = static_cast<const RowInfo<ACC>*>(p.rows)[i];
  const ACC* part = static_cast<const ACC*>(p.dx_part);
  ACC sum = 0, rsum = 0;
  for (int s = 0; s < p.splits; ++s) {
    sum += part[s * p.B * p.D + e];
    rsum += static_cast<const ACC*>(p.rsum_part)[s * p.B + i];
  }
  const bool live = row.side.normalized && row.side.norm > ACC(kNormEps);
  ACC coef = live ? -row.side.inv * rsum : ACC(0);
  if (p.cfg.margin_kind != kIdentity && row.tcol >= 0) coef += row.tg.x_coef;
  const ACC xv = convert<ACC>(static_cast<const TX*>(p.x)[e]);
  // x̂'s term only where it has a coefficient: 0·x would make an infinite entry NaN where eager's
  // gradient has no such term.
  static_cast<TX*>(p.dx)[e] = convert<TX>(row.side.scale * sum + (coef != ACC(0) ? xv * row.side.inv * coef : ACC(0)));
}

template <typename TX, typename TW, typename OP, typename ACC>
__global__ void __launch_bounds__(kThreads, 1) dw_kernel(HeadParams p) {
  constexpr int BM = kDwRows, NW = kDwW, SLAB = kSlab<ACC>;
  using Smem = DwSmem<OP, ACC>;
  constexpr int lds = Smem::lds, ldg = Smem::ldg, ldx = Smem::ldc, lacc = Smem::lacc, kRowsPerWarp = BM / kWarps;
  MO_DYNAMIC_SMEM(smem_raw);
  const Smem sm(smem_raw);
  OP *As = sm.As, *Bs = sm.Bs, *Gs = sm.Gs, *Xc = sm.Cs;
  ACC *Ss = sm.Ss, *acc = sm.acc;
  int64_t* wr = sm.wr;
  ACC* qsum = sm.extra;         // per weight row: Σ_i G z⁰ off the target
  ACC* qt = sm.extra + NW;      // per weight row: the targets' w_coef
  ACC* db = sm.extra + 2 * NW;  // per class: Σ_i ∂L/∂z
  const RowInfo<ACC>* rows = static_cast<const RowInfo<ACC>*>(p.rows);
  const ACC* wnorm = static_cast<const ACC*>(p.w_norm);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cpt = kDwW / static_cast<int>(p.K);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * cpt, d_begin = static_cast<int64_t>(blockIdx.y) * SLAB;
  const int64_t d_end = d_begin + SLAB < p.D ? d_begin + SLAB : p.D;
  for (int e = threadIdx.x; e < NW * lacc; e += blockDim.x) acc[e] = ACC(0);
  for (int e = threadIdx.x; e < NW; e += blockDim.x) qsum[e] = qt[e] = db[e] = ACC(0);
  fill_weight_rows<NW>(p, j0, wr);  // the block's weight rows, for every row tile (logit_tile's barrier orders it)

  // Each lane owns one class (cpt <= 32) and sums its share of qsum, qt and db in registers over
  // its rows of every row tile: qsum / qt for the sub-center pos_acc (flushed when the winning
  // sub-center changes; never for K = 1), db for its class. One shared atomic per lane and sum at
  // the end, instead of one per (row, class); warps still meet on a class, hence atomics.
  const int cc = lane;
  const int64_t j = j0 + cc;
  const bool live_class = cc < cpt && j < p.C;
  ACC my_db = 0, my_qsum = 0, my_qt = 0;
  int pos_acc = -1;
  for (int64_t i0 = 0; i0 < p.B; i0 += BM) {
    logit_tile<BM, NW, TX, TW, OP, ACC>(p, i0, wr, [] {}, As, Bs, Ss);
    const bool sparse = p.grad_skip > 0 && tile_negligible(p, rows, Ss, lds, i0, BM, j0, cpt, wnorm);
    for (int e = threadIdx.x; e < BM * ldg; e += blockDim.x) Gs[e] = convert<OP>(0.0f);
    __syncthreads();
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const int r = warp * kRowsPerWarp + q;
      const int64_t i = i0 + r;
      if (i >= p.B) break;
      if (!live_class || (sparse && j != rows[i].tcol)) continue;
      const RowInfo<ACC> row = rows[i];
      const Entry<ACC> e = entry(p, row, Ss + r * lds + cc * p.K, wnorm + j * p.K, j);
      const ACC g0 = entry_grad(row, e, j == row.tcol);
      my_db += g0;
      const ACC g = e.target ? row.tg.tile_grad : g0 * e.factor;
      const int pos = cc * static_cast<int>(p.K) + e.k;
      if (pos != pos_acc) {
        if (pos_acc >= 0) {
          atomicAdd(qsum + pos_acc, my_qsum);
          atomicAdd(qt + pos_acc, my_qt);
        }
        pos_acc = pos;
        my_qsum = my_qt = ACC(0);
      }
      if (e.target) {
        my_qt += row.tg.w_coef;
      } else {
        my_qsum += g * e.z0;
      }
      Gs[r * ldg + pos] = convert<OP>(g * row.side.scale);
    }
    if (sparse) {  // acc[pos] += G[r][pos] x[r] at each row's label; rows may share a class: atomics
      __syncwarp();
      for (int q = 0; q < kRowsPerWarp; ++q) {
        const int r = warp * kRowsPerWarp + q;
        const int64_t i = i0 + r;
        const int c = i < p.B ? label_column(rows[i], j0, cpt) : -1;
        for (int k = 0; c >= 0 && k < p.K; ++k) {
          const int pos = c * static_cast<int>(p.K) + k;
          const ACC g = convert<ACC>(Gs[r * ldg + pos]);
          const TX* x = static_cast<const TX*>(p.x) + i * p.D;
          for (int64_t d = d_begin + lane; g != ACC(0) && d < d_end; d += 32) {
            atomicAdd(acc + pos * lacc + (d - d_begin), g * convert<ACC>(x[d]));
          }
        }
      }
      continue;  // the next tile's first barrier orders these writes
    }
    // acc[pos][d] += Σ_r G[r][pos] x[r][d] over this block's slab of D.
    for (int64_t c0 = d_begin; c0 < d_end; c0 += kChunk) {
      __syncthreads();
      load_tile(Xc, ldx, BM, kChunk, static_cast<const TX*>(p.x), p.D, c0, d_end,
                [&](int r) { return i0 + r < p.B ? i0 + r : int64_t(-1); });
      __syncthreads();
      tile_mma<NW, kChunk, BM, OP, ACC, true, false>(Gs, ldg, Xc, ldx, acc + (c0 - d_begin), lacc);
    }
    __syncthreads();
  }
  if (pos_acc >= 0) {
    atomicAdd(qsum + pos_acc, my_qsum);
    atomicAdd(qt + pos_acc, my_qt);
  }
  if (live_class) atomicAdd(db + cc, my_db);
  __syncthreads();  // a last sparse tile's row updates, the sums above
  // dW_r = β_r acc_r + W_r inv_r (−inv_r qsum_r [normalized] + qt_r)
  const TW* w = static_cast<const TW*>(p.w);
  TW* dw = static_cast<TW*>(p.dw);
  for (int e = threadIdx.x; e < NW * SLAB; e += blockDim.x) {
    const int pos = e / SLAB;
    const int64_t d = d_begin + e % SLAB, r = wr[pos];
    if (r < 0 || d >= d_end) continue;
    const Side<ACC> col = make_side<ACC>(wnorm[j0 * p.K + pos], p.cfg.normalize_w, ACC(1));
    const bool live = col.normalized && col.norm > ACC(kNormEps);
    const ACC coef = (live ? -col.inv * qsum[pos] : ACC(0)) + qt[pos];
    const ACC wv = convert<ACC>(w[r * p.D + d]);
    // Ŵ's term only where it has a coefficient: 0·W would make an infinite weight entry NaN where
    // eager's dW = Gᵀx (unnormalized weights) has none.
    dw[r * p.D + d] =
        convert<TW>(col.scale * acc[pos * lacc + e % SLAB] + (coef != ACC(0) ? wv * col.inv * coef : ACC(0)));
  }
  if (p.dbias && blockIdx.y == 0) {
    for (int c = threadIdx.x; c < cpt; c += blockDim.x) {
      if (j0 + c < p.C) static_cast<ACC*>(p.dbias)[j0 + c] = db[c];
    }
  }
}

// ---- dispatch -------------------------------------------------------------------------------

template <typename Smem>
size_t smem_bytes() {
  return Smem(nullptr).bytes;
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const HeadParams& p) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  MO_LAUNCH(kernel, grid, kThreads, smem, stream, p);
  return cudaGetLastError();
}

unsigned blocks(int64_t n, int64_t per) {
  return static_cast<unsigned>((n + per - 1) / per);
}

template <typename TX, typename TW, typename OP, typename ACC>
cudaError_t forward_typed(const HeadParams& p, cudaStream_t stream) {
  cudaError_t err;
  if ((err = launch(w_norm_kernel<TW, ACC>, dim3(blocks(p.C * p.K, kWarps)), 0, stream, p)) != cudaSuccess) return err;
  if ((err = launch(row_prep_kernel<TX, TW, ACC>, dim3(blocks(p.B, kWarps)), 0, stream, p)) != cudaSuccess) return err;
  const dim3 grid(blocks(p.B, kFwdRows), p.splits);
  if ((err = launch(forward_kernel<TX, TW, OP, ACC>, grid, smem_bytes<ForwardSmem<OP, ACC>>(), stream, p)) !=
      cudaSuccess)
    return err;
  if (p.B == 0) return cudaSuccess;
  MO_LAUNCH(merge_kernel<ACC>, blocks(p.B, 256), 256, 0, stream, p);
  return cudaGetLastError();
}

template <typename TX, typename TW, typename OP, typename ACC>
cudaError_t backward_typed(const HeadParams& p, cudaStream_t stream) {
  cudaError_t err;
  if ((err = launch(w_norm_kernel<TW, ACC>, dim3(blocks(p.C * p.K, kWarps)), 0, stream, p)) != cudaSuccess) return err;
  if ((err = launch(row_prep_kernel<TX, TW, ACC>, dim3(blocks(p.B, kWarps)), 0, stream, p)) != cudaSuccess) return err;
  if (p.B > 0) {
    MO_LAUNCH(target_grad_kernel<ACC>, blocks(p.B, 256), 256, 0, stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const unsigned slabs = blocks(p.D, kSlab<ACC>);
  if (p.dx) {
    const dim3 grid(blocks(p.B, kDxRows), p.splits, slabs);
    if ((err = launch(dx_kernel<TX, TW, OP, ACC>, grid, smem_bytes<DxSmem<OP, ACC>>(), stream, p)) != cudaSuccess)
      return err;
    if (p.B * p.D > 0) {
      MO_LAUNCH((dx_finalize_kernel<TX, ACC>), blocks(p.B * p.D, 256), 256, 0, stream, p);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  if (p.dw || p.dbias) {
    const dim3 grid(blocks(p.C, kDwW / p.K), slabs);
    if ((err = launch(dw_kernel<TX, TW, OP, ACC>, grid, smem_bytes<DwSmem<OP, ACC>>(), stream, p)) != cudaSuccess)
      return err;
  }
  return cudaSuccess;
}

template <typename T>
__global__ void psi_kernel(const T* c, const T* m1, const T* m2, const T* m3, int64_t n, int32_t kind, int32_t policy,
                           double lambda, T* v, T* dc, T* d1, T* d2, T* d3) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const Psi<T> r = ::marginops::margin_psi<T>(kind, policy, c[i], m1[i], m2[i], m3[i], T(lambda));
  v[i] = r.value;
  dc[i] = r.d_c;
  d1[i] = r.d_m1;
  d2[i] = r.d_m2;
  d3[i] = r.d_m3;
}

}  // namespace

bool supported_dtypes(DType x, DType w) {
  return x == w || (w == kFloat && (x == kHalf || x == kBFloat16));
}

Workspace workspace_bytes(const HeadParams& p, int sm_count, bool backward) {
  const size_t acc = p.acc_double ? sizeof(double) : sizeof(float);
  const size_t row = p.acc_double ? sizeof(RowInfo<double>) : sizeof(RowInfo<float>);
  const int64_t cpt = kTileW / (p.K > 0 ? p.K : 1), ntiles = (p.C + cpt - 1) / cpt;
  // About two waves of the pass's own blocks: the forward's row tiles are kFwdRows tall, dx's
  // kDxRows. p.splits is per call: the forward and the backward each size their own workspace.
  const int64_t tile_rows = backward ? kDxRows : kFwdRows;
  const int64_t row_tiles = (p.B + tile_rows - 1) / tile_rows;
  int64_t splits = row_tiles > 0 ? (2 * sm_count + row_tiles - 1) / row_tiles : 1;
  splits = splits < ntiles ? splits : ntiles;
  // dx partials stay within 32 MiB: O(B·D·splits) of the memory contract.
  const int64_t per_split = p.B * p.D * static_cast<int64_t>(acc);
  const int64_t cap = per_split > 0 ? (int64_t(32) << 20) / per_split : splits;
  splits = splits < cap ? splits : cap;
  splits = splits < 1 ? 1 : splits;
  splits = splits < 65535 ? splits : 65535;  // split_tiles' 32-bit arithmetic (and gridDim.y)
  Workspace w{};
  w.splits = static_cast<int>(splits);
  w.rows = static_cast<size_t>(p.B) * row;
  w.w_norm = static_cast<size_t>(p.C * p.K) * acc;
  w.partial = static_cast<size_t>(splits * p.B) * 4 * acc;
  w.partial_best = static_cast<size_t>(splits * p.B) * sizeof(int64_t);
  w.dx_part = backward ? static_cast<size_t>(splits) * static_cast<size_t>(per_split) : 0;
  w.rsum_part = backward ? static_cast<size_t>(splits * p.B) * acc : 0;
  return w;
}

// The tile kernels index class tiles in 32 bits (split_tiles): fewer than 2^31 classes per call.
bool class_count_ok(const HeadParams& p) {
  return p.C < (int64_t(1) << 31) - kTileW;
}

cudaError_t tiles_forward(const HeadParams& p, cudaStream_t stream) {
  if (!class_count_ok(p)) return cudaErrorInvalidValue;
  return dispatch(p, [&](auto tx, auto tw, auto op, auto acc) {
    return forward_typed<decltype(tx), decltype(tw), decltype(op), decltype(acc)>(p, stream);
  });
}

cudaError_t tiles_backward(const HeadParams& p, cudaStream_t stream) {
  if (!class_count_ok(p)) return cudaErrorInvalidValue;
  return dispatch(p, [&](auto tx, auto tw, auto op, auto acc) {
    return backward_typed<decltype(tx), decltype(tw), decltype(op), decltype(acc)>(p, stream);
  });
}

cudaError_t margin_psi(const void* c, const void* m1, const void* m2, const void* m3, int64_t n, int32_t kind,
                       int32_t policy, double lambda, bool is_double, void* v, void* dc, void* d1, void* d2, void* d3,
                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid = blocks(n, 256);
  if (is_double) {
    MO_LAUNCH(psi_kernel<double>, grid, 256, 0, stream, static_cast<const double*>(c), static_cast<const double*>(m1),
              static_cast<const double*>(m2), static_cast<const double*>(m3), n, kind, policy, lambda,
              static_cast<double*>(v), static_cast<double*>(dc), static_cast<double*>(d1), static_cast<double*>(d2),
              static_cast<double*>(d3));
  } else {
    MO_LAUNCH(psi_kernel<float>, grid, 256, 0, stream, static_cast<const float*>(c), static_cast<const float*>(m1),
              static_cast<const float*>(m2), static_cast<const float*>(m3), n, kind, policy, lambda,
              static_cast<float*>(v), static_cast<float*>(dc), static_cast<float*>(d1), static_cast<float*>(d2),
              static_cast<float*>(d3));
  }
  return cudaGetLastError();
}

}  // namespace marginops::cuda
