// The margin cross-entropy on the CPU, without a [B, C] logits tensor: the tiled algorithm of docs/design.md.
//
// Classes are processed in tiles of kClassTile, rows in blocks of kRowBlock. For one (row block,
// class tile) pair the logits live only in a kRowBlock × kClassTile·K workspace (K sub-centers):
//   forward:  Z = (α ⊙ x) (β ⊙ W_tile)ᵀ, the max over each class's K rows, + bias, CurricularFace's
//             hard negatives, the margin on the target entries, folded into an online
//             (max, sum-exp) per row, plus Σ_j z_ij and the margin-free argmax;
//   backward: the same Z recomputed, P = exp(Z − lse), G = ∂L/∂z formed in place, then
//             dx += G (β ⊙ W_tile) and dW_tile += Gᵀ (α ⊙ x), with the normalization's rank-1
//             corrections collected as per-row and per-column sums (margin_math.h).
// Tile chunks run in parallel; each chunk owns its rows' partial statistics and dx partials,
// merged in chunk order. Extra memory: O(B·D·threads + C + workspace), never O(B·C).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "../head_inputs.h"
#include "../margin_math.h"

namespace marginops::cpu {
namespace {

constexpr int64_t kClassTile = 256;  // classes per tile, each with K weight rows
constexpr int64_t kRowBlock = 256;

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}

at::Tensor long_tensor(const std::vector<int64_t>& v) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {(int64_t)v.size()}, at::kLong).clone();
}

// What the prepass knows about each row: O(B·D) in all.
template <typename T>
struct RowData {
  at::Tensor xa;  // [B, D] x in the accumulation dtype
  at::Tensor xs;  // [B, D] α_i x_i (the same tensor as xa when α ≡ 1)
  std::vector<Side<T>> row;
  std::vector<int64_t> tcol;      // target column among the computed classes, or -1
  std::vector<int64_t> tsub;      // the target class's sub-center with the largest logit
  std::vector<Target<T>> target;  // valid where tcol >= 0
  std::vector<Side<T>> tside;     // that sub-center's Side, valid where tcol >= 0
  bool has_margin;                // the target entry is a·b·ψ(c) rather than an ordinary logit
  at::Tensor hard_tau, hard_t;    // [B] CurricularFace threshold and t, or undefined
};

// bias of the computed classes, in the accumulation dtype (O(C)), or undefined.
at::Tensor bias_columns(const HeadArgs& a) {
  if (!a.bias.defined()) return at::Tensor();
  at::Tensor b = a.class_index.defined() ? a.bias.index_select(0, a.class_index) : a.bias;
  return b.to(a.acc_dtype()).contiguous();
}

// The weight rows of classes [begin, begin + size) of the computed ones: K per class.
at::Tensor class_rows(const HeadArgs& a, int64_t begin, int64_t size) {
  const int64_t K = a.cfg.subcenters;
  at::Tensor cls = a.class_index.defined() ? a.class_index.narrow(0, begin, size)
                                           : at::arange(begin, begin + size, a.labels.options());
  if (K == 1) return cls;
  return (cls.unsqueeze(1) * K + at::arange(K, cls.options()).unsqueeze(0)).reshape({-1});
}

template <typename T>
RowData<T> prepare_rows(const HeadArgs& a, const at::Tensor& bias_cols) {
  const HeadConfig& cfg = a.cfg;
  const int64_t B = a.rows, K = cfg.subcenters;
  RowData<T> r;
  r.has_margin = cfg.margin_kind != kIdentity;
  r.xa = a.x.to(a.acc_dtype()).contiguous();
  const at::Tensor xnorm = at::linalg_vector_norm(r.xa, 2, {1});
  r.row.resize(B);
  at::Tensor alpha = at::empty({B}, r.xa.options());
  for (int64_t i = 0; i < B; ++i) {
    r.row[i] = make_side<T>(ptr<T>(xnorm)[i], cfg.normalize_x, T(cfg.s));
    ptr<T>(alpha)[i] = r.row[i].scale;
  }
  r.xs = cfg.normalize_x ? r.xa * alpha.unsqueeze(1) : r.xa;
  if (a.curricular.defined()) {
    const at::Tensor cur = a.curricular.to(a.acc_dtype());
    r.hard_tau = cur.select(1, 0).contiguous();
    r.hard_t = cur.select(1, 1).contiguous();
  }

  check_label_values(a.labels, cfg);
  if (a.class_index.defined()) check_class_index_values(a.class_index, a.weight.size(0) / K);
  const at::Tensor tcol = target_columns(a.labels, a.class_index, cfg, a.columns);
  r.tcol.assign(ptr<int64_t>(tcol), ptr<int64_t>(tcol) + B);
  r.tsub.assign(B, 0);
  r.target.resize(B);
  r.tside.resize(B);

  std::vector<int64_t> sel, wclass;
  for (int64_t i = 0; i < B; ++i) {
    if (r.tcol[i] < 0) continue;
    sel.push_back(i);
    wclass.push_back(a.class_index.defined() ? ptr<int64_t>(a.class_index)[r.tcol[i]] : r.tcol[i]);
  }
  if (sel.empty()) return r;
  // Dot products with each target class's K rows.
  at::Tensor rows = long_tensor(wclass);
  if (K > 1) rows = (rows.unsqueeze(1) * K + at::arange(K, rows.options()).unsqueeze(0)).reshape({-1});
  const at::Tensor wt = a.weight.index_select(0, rows).to(a.acc_dtype());
  const at::Tensor xsel = r.xa.index_select(0, long_tensor(sel));
  const at::Tensor u = (xsel.repeat_interleave(K, 0) * wt).sum(1);
  const at::Tensor wnorm = at::linalg_vector_norm(wt, 2, {1});
  const at::Tensor rm = a.row_margins.defined() ? a.row_margins.to(a.acc_dtype()) : at::Tensor();
  for (size_t n = 0; n < sel.size(); ++n) {
    const int64_t i = sel[n];
    int64_t best = 0;
    T best_logit = -std::numeric_limits<T>::infinity();
    for (int64_t k = 0; k < K; ++k) {  // the sub-center the tiles will pick: first largest logit
      const Side<T> col = make_side<T>(ptr<T>(wnorm)[n * K + k], cfg.normalize_w, T(1));
      const T logit = r.row[i].scale * col.scale * ptr<T>(u)[n * K + k];
      if (logit > best_logit || (logit != logit && best_logit == best_logit)) {  // a NaN sticks, as in max
        best_logit = logit;
        best = k;
      }
    }
    r.tsub[i] = best;
    r.tside[i] = make_side<T>(ptr<T>(wnorm)[n * K + best], cfg.normalize_w, T(1));
    const T* m = rm.defined() ? ptr<T>(rm) + 3 * i : nullptr;
    r.target[i] = target_logit<T>(cfg.margin_kind, cfg.theta_policy, ptr<T>(u)[n * K + best], r.row[i], r.tside[i],
                                  m ? m[0] : T(cfg.m1), m ? m[1] : T(cfg.m2), m ? m[2] : T(cfg.m3), T(cfg.lambda_),
                                  bias_cols.defined() ? ptr<T>(bias_cols)[r.tcol[i]] : T(0), cfg.straight_through);
  }
  return r;
}

// A class tile: (β ⊙ W) rows of `size` classes (K rows each) in the accumulation dtype.
template <typename T>
struct ClassTile {
  int64_t begin = 0, size = 0;
  at::Tensor ws;             // [size·K, D] view into the chunk's workspace
  at::Tensor rows;           // [size·K] weight rows, or undefined when they are contiguous
  std::vector<Side<T>> col;  // per weight row
};

template <typename T>
struct TileLoader {
  const HeadArgs& a;
  at::Tensor ws_buf;     // [kClassTile·K, D] accumulation dtype
  at::Tensor stage_buf;  // [kClassTile·K, D] weight dtype, for gathers that also convert

  explicit TileLoader(const HeadArgs& args) : a(args) {
    const int64_t n = kClassTile * a.cfg.subcenters;
    ws_buf = at::empty({n, a.dim}, a.x.options().dtype(a.acc_dtype()));
    if (a.class_index.defined() && a.weight.scalar_type() != a.acc_dtype())
      stage_buf = at::empty({n, a.dim}, a.weight.options());
  }

  void load(int64_t begin, int64_t size, ClassTile<T>& t) {
    const int64_t K = a.cfg.subcenters, n = size * K;
    t.begin = begin;
    t.size = size;
    t.ws = ws_buf.narrow(0, 0, n);
    if (a.class_index.defined()) {
      t.rows = class_rows(a, begin, size);
      if (stage_buf.defined()) {
        at::Tensor stage = stage_buf.narrow(0, 0, n);
        at::index_select_out(stage, a.weight, 0, t.rows);
        t.ws.copy_(stage);
      } else {
        at::index_select_out(t.ws, a.weight, 0, t.rows);
      }
    } else {
      t.ws.copy_(a.weight.narrow(0, begin * K, n));
    }
    const at::Tensor norm = at::linalg_vector_norm(t.ws, 2, {1});
    t.col.resize(n);
    for (int64_t j = 0; j < n; ++j) t.col[j] = make_side<T>(ptr<T>(norm)[j], a.cfg.normalize_w, T(1));
    if (a.cfg.normalize_w) {
      at::Tensor beta = at::empty({n}, t.ws.options());
      for (int64_t j = 0; j < n; ++j) ptr<T>(beta)[j] = t.col[j].scale;
      t.ws.mul_(beta.unsqueeze(1));
    }
  }

  // Writes per-weight-row values of the tile into a [rows, ...] tensor of the weight's layout.
  void store(const ClassTile<T>& t, at::Tensor& dst, const at::Tensor& src) const {
    if (t.rows.defined()) {
      dst.index_copy_(0, t.rows, src.to(dst.scalar_type()));
    } else {
      dst.narrow(0, t.begin * a.cfg.subcenters, src.size(0)).copy_(src);
    }
  }
};

// A contiguous [rows, cols] view at the start of a flat workspace.
at::Tensor block_view(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// Class logits of a block from its weight-row logits [rb, tc·K]: the max over each class's K
// rows, with the winning row in kidx; zs itself when K = 1.
at::Tensor class_logits(const at::Tensor& zs, int64_t K, const at::Tensor& z_buf, const at::Tensor& k_buf,
                        at::Tensor& kidx) {
  if (K == 1) return zs;
  const int64_t rb = zs.size(0), tc = zs.size(1) / K;
  at::Tensor z = block_view(z_buf, rb, tc);
  kidx = block_view(k_buf, rb, tc);
  at::max_out(z, kidx, zs.view({rb, tc, K}), 2);
  return z;
}

// Spreads class-level values [rb, tc] to the winning weight rows [rb, tc·K] (zeros elsewhere).
at::Tensor to_rows(const at::Tensor& v, const at::Tensor& kidx, int64_t K, const at::Tensor& buf) {
  if (K == 1) return v;
  const int64_t rb = v.size(0), tc = v.size(1);
  at::Tensor out = block_view(buf, rb, tc * K);
  out.zero_();
  out.view({rb, tc, K}).scatter_(2, kidx.unsqueeze(2), v.unsqueeze(2));
  return out;
}

// CurricularFace: a non-target logit z⁰ = s·c with c > τ_i becomes s·c·(t_i + c). Returns the
// change to add to z⁰ and, in factor, ∂(new)/∂(old) = t_i + 2c (1 where the entry is not hard).
template <typename T>
at::Tensor hard_negatives(const RowData<T>& rd, const at::Tensor& z0, int64_t i0, T s, at::Tensor* factor) {
  const int64_t rb = z0.size(0);
  const at::Tensor tau = rd.hard_tau.narrow(0, i0, rb).unsqueeze(1);
  const at::Tensor t = rd.hard_t.narrow(0, i0, rb).unsqueeze(1);
  const at::Tensor c = z0 / s;
  const at::Tensor hard = c.gt(tau);
  if (factor) *factor = at::where(hard, t + 2 * c, at::ones_like(c));
  return at::where(hard, (c * (t + c) - c) * s, at::zeros_like(c));
}

// insightface's interclass filtering: the entries of a block (rows i0…, classes j0…) whose
// margin-free cosine z⁰/s exceeds cfg.interclass_filter, the label entries excepted; they get
// logit 0 and no gradient. Undefined when the filter is off.
template <typename T>
at::Tensor filtered_entries(const RowData<T>& rd, const HeadConfig& cfg, const at::Tensor& z0, int64_t i0, int64_t j0) {
  if (!(cfg.interclass_filter > 0)) return at::Tensor();
  at::Tensor f = (z0 / T(cfg.s)).gt(cfg.interclass_filter).contiguous();
  bool* fp = f.data_ptr<bool>();
  const int64_t rb = f.size(0), tc = f.size(1);
  for (int64_t i = 0; i < rb; ++i) {
    const int64_t c = rd.tcol[i0 + i] - j0;
    if (c >= 0 && c < tc) fp[i * tc + c] = false;
  }
  return f;
}

// The larger of a and b, NaN when either is: std::max and a comparison drop a NaN, and a NaN
// logit must reach the row's lse as it does through eager logits (docs/design.md, "Non-finite values").
template <typename T>
T max_nan(T a, T b) {
  return a > b || a != a ? a : b;
}

int64_t num_chunks(int64_t ntiles) {
  return std::max<int64_t>(1, std::min<int64_t>(ntiles, at::get_num_threads()));
}

// Splits the class tiles into at most one chunk per thread and runs f(chunk, tile_begin,
// tile_end) for each, in parallel.
template <typename F>
void for_each_chunk(int64_t ntiles, const F& f) {
  const int64_t nchunks = num_chunks(ntiles);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
    for (int64_t c = c0; c < c1; ++c) f(c, c * ntiles / nchunks, (c + 1) * ntiles / nchunks);
  });
}

// Running statistics of one chunk, per row.
template <typename T>
struct RowStats {
  std::vector<T> max, sum, logit_sum, best;
  std::vector<int64_t> best_col;
  explicit RowStats(int64_t B)
      : max(B, -std::numeric_limits<T>::infinity()),
        sum(B, T(0)),
        logit_sum(B, T(0)),
        best(B, -std::numeric_limits<T>::infinity()),
        best_col(B, -1) {}
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_typed(const HeadArgs& a) {
  const int64_t B = a.rows, C = a.columns, K = a.cfg.subcenters;
  const at::Tensor bias_cols = bias_columns(a);
  const RowData<T> rd = prepare_rows<T>(a, bias_cols);
  const auto opts = rd.xa.options();

  const int64_t ntiles = (C + kClassTile - 1) / kClassTile;
  std::vector<RowStats<T>> stats;
  for (int64_t c = 0; c < num_chunks(ntiles); ++c) stats.emplace_back(B);
  // Without a margin the target logit is the tile's own entry (written by the one chunk that holds
  // it), so that lse ≥ z_iy exactly and the loss of a confident row is never negative.
  std::vector<T> tile_target(B, T(0));

  if (B > 0 && C > 0) {
    for_each_chunk(ntiles, [&](int64_t chunk, int64_t t0, int64_t t1) {
      RowStats<T>& st = stats[chunk];
      TileLoader<T> loader(a);
      ClassTile<T> tile;
      const at::Tensor zs_buf = at::empty({kRowBlock * kClassTile * K}, opts);
      const at::Tensor z_buf = at::empty({K > 1 ? kRowBlock * kClassTile : 0}, opts);
      const at::Tensor k_buf = at::empty({K > 1 ? kRowBlock * kClassTile : 0}, opts.dtype(at::kLong));
      const at::Tensor m_new = at::empty({kRowBlock}, opts);
      at::Tensor kidx;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = t * kClassTile;
        loader.load(j0, std::min(kClassTile, C - j0), tile);
        const int64_t tc = tile.size;
        for (int64_t i0 = 0; i0 < B; i0 += kRowBlock) {
          const int64_t rb = std::min(kRowBlock, B - i0);
          at::Tensor zs = block_view(zs_buf, rb, tc * K);
          at::mm_out(zs, rd.xs.narrow(0, i0, rb), tile.ws.t());
          at::Tensor z = class_logits(zs, K, z_buf, k_buf, kidx);
          const at::Tensor hard = rd.hard_tau.defined() ? hard_negatives(rd, z, i0, T(a.cfg.s), nullptr) : at::Tensor();
          const at::Tensor filt = filtered_entries(rd, a.cfg, z, i0, j0);
          if (bias_cols.defined()) z.add_(bias_cols.narrow(0, j0, tc).unsqueeze(0));
          T* zp = ptr<T>(z);

          const auto [bv, bj] = z.max(1);  // margin-free argmax, first index on ties
          for (int64_t i = 0; i < rb; ++i) {
            if (ptr<T>(bv)[i] > st.best[i0 + i]) {
              st.best[i0 + i] = ptr<T>(bv)[i];
              st.best_col[i0 + i] = j0 + ptr<int64_t>(bj)[i];
            }
          }
          if (hard.defined()) z.add_(hard);
          if (filt.defined()) z.masked_fill_(filt, T(0));
          for (int64_t i = 0; i < rb; ++i) {
            const int64_t c = rd.tcol[i0 + i] - j0;
            if (c < 0 || c >= tc) continue;
            if (rd.has_margin) {
              zp[i * tc + c] = rd.target[i0 + i].logit;
            } else {
              tile_target[i0 + i] = zp[i * tc + c];
            }
          }
          const at::Tensor zsum = z.sum(1);
          const at::Tensor zmax = z.amax(1);  // NaN if any entry is
          for (int64_t i = 0; i < rb; ++i) {
            st.logit_sum[i0 + i] += ptr<T>(zsum)[i];
            ptr<T>(m_new)[i] = max_nan(st.max[i0 + i], ptr<T>(zmax)[i]);
          }
          z.sub_(m_new.narrow(0, 0, rb).unsqueeze(1)).exp_();
          const at::Tensor esum = z.sum(1);
          // The running sum stays 0 while every entry so far is −inf (exp(−inf − (−inf)) is NaN);
          // a NaN or an Inf − Inf sticks in it from then on.
          for (int64_t i = 0; i < rb; ++i) {
            const T mn = ptr<T>(m_new)[i], mo = st.max[i0 + i];
            if (mn == -std::numeric_limits<T>::infinity()) continue;
            st.sum[i0 + i] = (mo == -std::numeric_limits<T>::infinity() ? T(0) : st.sum[i0 + i] * std::exp(mo - mn)) +
                             ptr<T>(esum)[i];
            st.max[i0 + i] = mn;
          }
        }
      }
    });
  }

  at::Tensor lse = at::empty({B}, opts), zt = at::zeros({B}, opts), zsum = at::zeros({B}, opts);
  at::Tensor best = at::empty({B}, opts), best_class = at::empty({B}, opts.dtype(at::kLong));
  const int64_t* ci = a.class_index.defined() ? ptr<int64_t>(a.class_index) : nullptr;
  for (int64_t i = 0; i < B; ++i) {
    T m = -std::numeric_limits<T>::infinity(), l = 0, s = 0, bv = m;
    int64_t bc = -1;
    // A chunk whose entries are all −inf holds sum 0 and adds nothing; a NaN sum (a NaN logit, or
    // exp(inf − inf)) is never dropped, and a NaN max is the row's max.
    for (const RowStats<T>& st : stats) m = max_nan(m, st.max[i]);
    for (const RowStats<T>& st : stats) {
      if (st.sum[i] != T(0)) l += st.sum[i] * std::exp(st.max[i] - m);
      s += st.logit_sum[i];
      if (st.best[i] > bv) {
        bv = st.best[i];
        bc = st.best_col[i];
      }
    }
    ptr<T>(lse)[i] = m + std::log(l);
    ptr<T>(zsum)[i] = s;
    ptr<T>(best)[i] = bv;
    ptr<int64_t>(best_class)[i] = bc < 0 ? -1 : a.cfg.class_offset + (ci ? ci[bc] : bc);
    if (rd.tcol[i] >= 0) ptr<T>(zt)[i] = rd.has_margin ? rd.target[i].logit : tile_target[i];
  }
  return {lse, zt, zsum, best, best_class};
}

// out += rows of src scaled by coef [n] (src_r · coef_r), skipping the rows whose coefficient is 0:
// 0 · an infinite entry would be NaN where eager's gradient has no such term at all (dW = Gᵀx of an
// unnormalized weight, dx = G W of unnormalized features).
template <typename T>
void add_scaled_rows(at::Tensor& out, const at::Tensor& src, const at::Tensor& coef) {
  const int64_t n = coef.size(0);
  int64_t live = 0;
  for (int64_t r = 0; r < n; ++r) live += ptr<T>(coef)[r] != T(0);
  if (live == n) {
    out.addcmul_(src, coef.unsqueeze(1));
  } else if (live > 0) {
    const at::Tensor rows = coef.ne(0).nonzero().squeeze(1);
    out.index_add_(0, rows, src.index_select(0, rows) * coef.index_select(0, rows).unsqueeze(1));
  }
}

// Per-row gradient inputs as host pointers of the accumulation dtype (nullptr = zero).
template <typename T>
const T* row_grad_ptr(const at::Tensor& g, at::ScalarType acc, at::Tensor& keep) {
  if (!g.defined()) return nullptr;
  keep = g.to(acc).contiguous();
  return ptr<T>(keep);
}

// Gradient skipping (grad_skip > 0): whether a block of P = exp(z − lse) is negligible apart from
// its label entries — no row with a grad_logit_sum (label smoothing puts a uniform gradient on
// every entry) and every other probability of a row with a grad_lse below the threshold. The
// label entries are zeroed in P by the caller before asking.
template <typename T>
bool negligible_block(const at::Tensor& P, int64_t i0, int64_t rb, const T* gl, const T* gs, T threshold) {
  const at::Tensor pmax = gl ? P.amax(1) : at::Tensor();
  for (int64_t i = 0; i < rb; ++i) {
    if (gs && gs[i0 + i] != T(0)) return false;
    if (gl && gl[i0 + i] != T(0) && ptr<T>(pmax)[i] >= threshold) return false;
  }
  return true;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_typed(const HeadArgs& a, const at::Tensor& g_lse_in,
                                                                          const at::Tensor& g_t_in,
                                                                          const at::Tensor& g_sum_in,
                                                                          const at::Tensor& lse_in,
                                                                          std::array<bool, 4> mask, double grad_skip) {
  const HeadConfig& cfg = a.cfg;
  const int64_t B = a.rows, D = a.dim, C = a.columns, K = cfg.subcenters;
  const auto acc = a.acc_dtype();
  const at::Tensor bias_cols = bias_columns(a);
  const RowData<T> rd = prepare_rows<T>(a, bias_cols);
  const auto opts = rd.xa.options();
  const bool need_dx = mask[0], need_dw = mask[1], need_db = mask[2] && a.bias.defined(),
             need_dm = mask[3] && a.row_margins.defined();

  at::Tensor keep_l, keep_t, keep_s;
  const T* gl = row_grad_ptr<T>(g_lse_in, acc, keep_l);
  const T* gt = row_grad_ptr<T>(g_t_in, acc, keep_t);
  const T* gs = row_grad_ptr<T>(g_sum_in, acc, keep_s);
  const at::Tensor lse = lse_in.to(acc).contiguous();

  // The target's share of the gradient, known from per-row data before any tile is seen.
  std::vector<TargetGrad<T>> tg(B);
  std::vector<T> g_target(B, T(0));
  at::Tensor dm = at::zeros({need_dm ? B : 0, 3}, opts);
  for (int64_t i = 0; i < B; ++i) {
    if (rd.tcol[i] < 0) continue;
    const T g =
        (gl ? gl[i] * std::exp(rd.target[i].logit - ptr<T>(lse)[i]) : T(0)) + (gs ? gs[i] : T(0)) + (gt ? gt[i] : T(0));
    g_target[i] = g;
    if (!rd.has_margin) continue;
    tg[i] = target_grad<T>(rd.target[i], rd.row[i], rd.tside[i], g);
    if (need_dm) {
      ptr<T>(dm)[3 * i + 1] = tg[i].d_m2;
      ptr<T>(dm)[3 * i + 2] = tg[i].d_m3;
    }
  }

  // The tiles write every computed row of dW and dbias; rows they do not visit must be zero.
  const bool tiles_run = B > 0 && C > 0 && (need_dx || need_dw || need_db);
  const bool dense = tiles_run && !a.class_index.defined();
  at::Tensor dw, db;
  if (need_dw) dw = dense ? at::empty_like(a.weight) : at::zeros_like(a.weight);
  if (need_db) db = dense ? at::empty_like(a.bias) : at::zeros_like(a.bias);
  const int64_t ntiles = (C + kClassTile - 1) / kClassTile;
  const int64_t nchunks = num_chunks(ntiles);
  // Per chunk: Σ_j G_ij (β ⊙ W)_j and the non-target Σ_j G_ij z⁰_ij, for the x̂ correction.
  at::Tensor dxs = at::zeros({need_dx ? nchunks : 0, B, D}, opts);
  at::Tensor rsum = at::zeros({nchunks, B}, opts);
  const bool row_corr = need_dx && cfg.normalize_x, col_corr = need_dw && cfg.normalize_w;

  if (tiles_run) {
    for_each_chunk(ntiles, [&](int64_t chunk, int64_t t0, int64_t t1) {
      TileLoader<T> loader(a);
      ClassTile<T> tile;
      const int64_t nw = kClassTile * K;  // weight rows per tile
      const at::Tensor zs_buf = at::empty({kRowBlock * nw}, opts);
      const at::Tensor z_buf = at::empty({K > 1 ? kRowBlock * kClassTile : 0}, opts);
      const at::Tensor k_buf = at::empty({K > 1 ? kRowBlock * kClassTile : 0}, opts.dtype(at::kLong));
      const at::Tensor g_buf = at::empty({kRowBlock * kClassTile}, opts);
      const at::Tensor rows_buf = at::empty({K > 1 ? kRowBlock * nw : 0}, opts);
      const at::Tensor dws = at::empty({nw, D}, opts);
      const at::Tensor qsum = at::empty({nw}, opts), qt = at::empty({nw}, opts);
      const at::Tensor dbt = at::empty({kClassTile}, opts);
      T* rs = ptr<T>(rsum) + chunk * B;
      std::vector<T> label_p;  // gradient skipping: the label entries' P, set aside
      at::Tensor kidx;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = t * kClassTile;
        loader.load(j0, std::min(kClassTile, C - j0), tile);
        const int64_t tc = tile.size, tw = tc * K;
        at::Tensor dws_t = dws.narrow(0, 0, tw), dbt_t = dbt.narrow(0, 0, tc);
        at::Tensor qsum_t = qsum.narrow(0, 0, tw);
        dws_t.zero_();
        dbt_t.zero_();
        qsum.zero_();
        qt.zero_();
        for (int64_t i0 = 0; i0 < B; i0 += kRowBlock) {
          const int64_t rb = std::min(kRowBlock, B - i0);
          const at::Tensor xs_b = rd.xs.narrow(0, i0, rb);
          at::Tensor zs = block_view(zs_buf, rb, tw);
          at::mm_out(zs, xs_b, tile.ws.t());
          at::Tensor z0 = class_logits(zs, K, z_buf, k_buf, kidx);  // margin-free, no bias
          at::Tensor g = block_view(g_buf, rb, tc);                 // becomes ∂L/∂z
          if (bias_cols.defined()) {
            at::add_out(g, z0, bias_cols.narrow(0, j0, tc).unsqueeze(0));
          } else {
            g.copy_(z0);
          }
          at::Tensor hard_factor;
          if (rd.hard_tau.defined()) g.add_(hard_negatives(rd, z0, i0, T(cfg.s), &hard_factor));
          const at::Tensor filt = filtered_entries(rd, cfg, z0, i0, j0);
          if (filt.defined()) g.masked_fill_(filt, T(0));
          T* gp = ptr<T>(g);
          int64_t* kp = K > 1 ? ptr<int64_t>(kidx) : nullptr;
          // Visits the rows of this block whose target lies in this tile.
          const auto each_target = [&](auto&& fn) {
            for (int64_t i = 0; i < rb; ++i) {
              const int64_t c = rd.tcol[i0 + i] - j0;
              if (c >= 0 && c < tc) fn(i0 + i, i * tc + c, c);
            }
          };
          if (rd.has_margin) {
            each_target([&](int64_t i, int64_t e, int64_t) {
              gp[e] = rd.target[i].logit;
              if (kp) kp[e] = rd.tsub[i];  // the prepass's sub-center carries the target's gradient
            });
          }
          if (gl) {
            g.sub_(lse.narrow(0, i0, rb).unsqueeze(1)).exp_();  // P
          } else {
            g.zero_();
          }
          // A negligible block keeps only its label entries: G is zero elsewhere, and its products
          // shrink to one row update per label (sparse) instead of two GEMMs.
          bool sparse = false;
          if (grad_skip > 0) {
            label_p.clear();
            each_target([&](int64_t, int64_t e, int64_t) {
              label_p.push_back(gp[e]);
              gp[e] = T(0);
            });
            sparse = negligible_block(g, i0, rb, gl, gs, T(grad_skip));
            if (sparse) g.zero_();
            size_t n = 0;
            each_target([&](int64_t, int64_t e, int64_t) { gp[e] = label_p[n++]; });
          }
          if (gl) g.mul_(keep_l.narrow(0, i0, rb).unsqueeze(1));
          if (gs) g.add_(keep_s.narrow(0, i0, rb).unsqueeze(1));
          if (rd.has_margin) {
            each_target([&](int64_t i, int64_t e, int64_t) { gp[e] = g_target[i]; });
          } else if (gt) {
            each_target([&](int64_t i, int64_t e, int64_t) { gp[e] += gt[i]; });
          }
          if (filt.defined()) g.masked_fill_(filt, T(0));  // no gradient through filtered entries
          if (need_db) dbt_t.add_(g.sum(0));
          if (hard_factor.defined()) g.mul_(hard_factor);  // ∂L/∂z⁰ on hard negatives
          if (row_corr || col_corr) {
            if (rd.has_margin) each_target([&](int64_t, int64_t e, int64_t) { gp[e] = T(0); });
            z0.mul_(g);
            if (row_corr) {
              const at::Tensor s = z0.sum(1);
              for (int64_t i = 0; i < rb; ++i) rs[i0 + i] += ptr<T>(s)[i];
            }
            if (col_corr) qsum_t.add_(to_rows(z0, kidx, K, rows_buf).sum(0));
          }
          if (rd.has_margin) {
            each_target([&](int64_t i, int64_t e, int64_t c) {
              gp[e] = tg[i].tile_grad;
              ptr<T>(qt)[c * K + rd.tsub[i]] += tg[i].w_coef;
            });
          }
          if (sparse) {
            each_target([&](int64_t i, int64_t e, int64_t c) {
              const int64_t r = c * K + (kp ? kp[e] : 0);  // the label's weight row in the tile
              if (need_dx) dxs[chunk][i].add_(tile.ws[r], gp[e]);
              if (need_dw) dws_t[r].add_(rd.xs[i], gp[e]);
            });
            continue;
          }
          const at::Tensor gw = to_rows(g, kidx, K, rows_buf);  // [rb, tc·K]
          if (need_dx) dxs[chunk].narrow(0, i0, rb).addmm_(gw, tile.ws);
          if (need_dw) dws_t.addmm_(gw.t(), xs_b);
        }
        if (need_dw) {
          // dW_r = β_r Σ_i G_ir α_i x_i + Ŵ_r (−inv_r Σ_i G_ir z⁰_ir [normalized] + target terms)
          at::Tensor beta = at::empty({tw}, opts), what = at::empty({tw}, opts);
          for (int64_t j = 0; j < tw; ++j) {
            const Side<T>& col = tile.col[j];
            const bool live = col.normalized && col.norm > T(kNormEps);
            const T coef = (live ? -col.inv * ptr<T>(qsum)[j] : T(0)) + ptr<T>(qt)[j];
            ptr<T>(beta)[j] = col.scale;
            ptr<T>(what)[j] = coef * (col.normalized ? T(1) : col.inv);  // tile.ws_j · this = coef·Ŵ_j
          }
          dws_t.mul_(beta.unsqueeze(1));
          add_scaled_rows<T>(dws_t, tile.ws, what);
          loader.store(tile, dw, dws_t);
        }
        if (need_db) {
          if (a.class_index.defined()) {
            db.index_copy_(0, a.class_index.narrow(0, j0, tc), dbt_t.to(db.scalar_type()));
          } else {
            db.narrow(0, j0, tc).copy_(dbt_t);
          }
        }
      }
    });
  }

  at::Tensor dx;
  if (need_dx) {
    // dx_i = α_i Σ_j G_ij β_j W_j + x̂_i (−inv_i Σ_j G_ij z⁰_ij [normalized] + target terms)
    at::Tensor xcoef = at::zeros({B}, opts), alpha = at::empty({B}, opts);
    const at::Tensor rtot = rsum.sum(0);
    for (int64_t i = 0; i < B; ++i) {
      const Side<T>& row = rd.row[i];
      const bool live = row.normalized && row.norm > T(kNormEps);
      T coef = live ? -row.inv * ptr<T>(rtot)[i] : T(0);
      if (rd.has_margin && rd.tcol[i] >= 0) coef += tg[i].x_coef;
      ptr<T>(xcoef)[i] = coef * row.inv;
      ptr<T>(alpha)[i] = row.scale;
    }
    dx = dxs.sum(0).mul_(alpha.unsqueeze(1));
    add_scaled_rows<T>(dx, rd.xa, xcoef);
    dx = dx.to(a.x.scalar_type());
  }
  if (!need_dw) dw = at::empty({0}, a.weight.options());
  if (!need_db) db = at::empty({0}, a.x.options());
  dm = need_dm ? dm.to(a.row_margins.scalar_type()) : at::empty({0}, a.x.options());
  return {dx.defined() ? dx : at::empty({0}, a.x.options()), dw, db, dm};
}

void check_cpu_backend(int64_t backend, int64_t workspace_bytes, const at::Tensor& x) {
  check_backend(backend, workspace_bytes);
  TORCH_CHECK_VALUE(backend == kAuto, "the ", backend == kChunked ? "chunked" : "tiles",
                    " backend runs on CUDA only, but x is on ", x.device(), " (use backend 'auto')");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_ce_forward(MO_HEAD_PARAMS,
                                                                                         double /*grad_skip*/,
                                                                                         int64_t backend,
                                                                                         int64_t workspace_bytes) {
  at::NoGradGuard no_grad;
  check_cpu_backend(backend, workspace_bytes, x);
  const HeadArgs a = check_head_args(MO_HEAD_PARAM_NAMES);
  if (a.acc_dtype() == at::kDouble) return forward_typed<double>(a);
  return forward_typed<float>(a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_ce_backward(
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& grad_target,
    const std::optional<at::Tensor>& grad_sum, const at::Tensor& lse, MO_HEAD_PARAMS, std::array<bool, 4> output_mask,
    double grad_skip, int64_t backend, int64_t workspace_bytes) {
  at::NoGradGuard no_grad;
  check_cpu_backend(backend, workspace_bytes, x);
  const HeadArgs a = check_head_args(MO_HEAD_PARAM_NAMES);
  check_grad_skip(grad_skip);
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == a.rows, "lse must have shape [", a.rows, "], got ", lse.sizes());
  const at::Tensor gl = check_row_grad(grad_lse, a, "grad_lse");
  const at::Tensor gt = check_row_grad(grad_target, a, "grad_target_logit");
  const at::Tensor gs = check_row_grad(grad_sum, a, "grad_logit_sum");
  if (a.acc_dtype() == at::kDouble) return backward_typed<double>(a, gl, gt, gs, lse, output_mask, grad_skip);
  return backward_typed<float>(a, gl, gt, gs, lse, output_mask, grad_skip);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> topk_typed(const HeadArgs& a, int64_t k) {
  const int64_t B = a.rows, C = a.columns, K = a.cfg.subcenters;
  const at::Tensor bias_cols = bias_columns(a);
  at::Tensor xs = a.x.to(a.acc_dtype()).contiguous();
  if (a.cfg.normalize_x) {
    xs = xs * (T(a.cfg.s) / at::linalg_vector_norm(xs, 2, {1}, true).clamp_min(kNormEps));
  }
  const auto opts = xs.options();
  const int64_t ntiles = (C + kClassTile - 1) / kClassTile, nchunks = num_chunks(ntiles);
  // Per chunk: the running top k of each row, as values and computed-class columns.
  at::Tensor vals = at::full({nchunks, B, k}, -std::numeric_limits<T>::infinity(), opts);
  at::Tensor cols = at::full({nchunks, B, k}, -1, opts.dtype(at::kLong));
  if (B > 0 && C > 0) {
    for_each_chunk(ntiles, [&](int64_t chunk, int64_t t0, int64_t t1) {
      TileLoader<T> loader(a);
      ClassTile<T> tile;
      const at::Tensor zs_buf = at::empty({kRowBlock * kClassTile * K}, opts);
      const at::Tensor z_buf = at::empty({K > 1 ? kRowBlock * kClassTile : 0}, opts);
      const at::Tensor k_buf = at::empty({K > 1 ? kRowBlock * kClassTile : 0}, opts.dtype(at::kLong));
      at::Tensor kidx;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = t * kClassTile;
        loader.load(j0, std::min(kClassTile, C - j0), tile);
        const int64_t tc = tile.size;
        const at::Tensor ids = at::arange(j0, j0 + tc, opts.dtype(at::kLong));
        for (int64_t i0 = 0; i0 < B; i0 += kRowBlock) {
          const int64_t rb = std::min(kRowBlock, B - i0);
          at::Tensor zs = block_view(zs_buf, rb, tc * K);
          at::mm_out(zs, xs.narrow(0, i0, rb), tile.ws.t());
          at::Tensor z = class_logits(zs, K, z_buf, k_buf, kidx);
          if (bias_cols.defined()) z.add_(bias_cols.narrow(0, j0, tc).unsqueeze(0));
          at::Tensor v = vals[chunk].narrow(0, i0, rb), c = cols[chunk].narrow(0, i0, rb);
          const auto [top, pos] = at::cat({v, z}, 1).topk(k, 1);
          const at::Tensor all_cols = at::cat({c, ids.unsqueeze(0).expand({rb, tc})}, 1);
          c.copy_(all_cols.gather(1, pos));
          v.copy_(top);
        }
      }
    });
  }
  const auto [top, pos] = vals.permute({1, 0, 2}).reshape({B, nchunks * k}).topk(k, 1);
  at::Tensor col = cols.permute({1, 0, 2}).reshape({B, nchunks * k}).gather(1, pos);
  at::Tensor cls = a.class_index.defined() ? a.class_index.index({col.clamp_min(0)}) : col;
  cls = at::where(col.ge(0), cls + a.cfg.class_offset, at::full_like(col, -1));
  return {top, cls};
}

std::tuple<at::Tensor, at::Tensor> margin_topk(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& class_index, int64_t k,
                                               int64_t class_offset, bool normalize_x, bool normalize_w, double s,
                                               int64_t subcenters) {
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape [B, D], got ", x.sizes());
  const at::Tensor no_labels = at::full({x.size(0)}, -1, x.options().dtype(at::kLong));
  const int64_t local = weight.dim() == 2 && subcenters >= 1 ? weight.size(0) / subcenters : 0;
  const HeadArgs a = check_head_args(x, weight, no_labels, bias, std::nullopt, std::nullopt, class_index,
                                     topk_config(local, class_offset, normalize_x, normalize_w, s, subcenters));
  if (a.class_index.defined()) check_class_index_values(a.class_index, local);
  TORCH_CHECK_VALUE(k >= 1 && k <= a.columns, "k = ", k, " must lie in [1, ", a.columns, "] (the number of classes)");
  if (a.acc_dtype() == at::kDouble) return topk_typed<double>(a, k);
  return topk_typed<float>(a, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(marginops, CPU, m) {
  m.impl("margin_ce_forward", &margin_ce_forward);
  m.impl("margin_ce_backward", &margin_ce_backward);
  m.impl("margin_topk", &margin_topk);
}

}  // namespace marginops::cpu
