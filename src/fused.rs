//! A whole multi-tenant linear layer for decode in one pass over its weights:
//!
//! `y[r, n] = x[r] . W[n] + b[n] + sum_p alpha[t_r, p(, n)] * (x[r] . S[t_r, p, n])`
//!
//! with the dense float32 base `W [N, K]` shared by every row and each row's
//! tenant delta read from its packed sign planes (`-1` = base only).
//!
//! Why fuse: at decode a layer sees a handful of rows, so what a separate
//! BLAS call plus a separate delta call cost is mostly fixed overhead (two
//! calls, two passes over the output) and, inside the delta kernel, one
//! horizontal sum per (row, feature). Here every 16 output features of a row
//! are one tile: 16 accumulators over K for the base and 16 for each delta
//! plane, each set folded into one vector of 16 sums by a transposing
//! reduction (46 shuffles and adds for 16 features instead of 16 separate
//! horizontal sums), and the result is stored once, contiguous.
//!
//! Loop order: feature tiles outside, rows inside, so a tile's base weights
//! (16 x K floats) are read from memory once and reused from cache by every
//! row; threads split the feature tiles when the call is large.

use rayon::prelude::*;

use crate::bitplane::ScaleMode;
use crate::error::{checked_mul, Error, Result};
use crate::gemv::{check_tenant_ids, live_planes, DeltaStack, Isa, SignRows};
use crate::pool;

/// Output features per tile (one AVX-512 vector of results).
pub(crate) const TILE: usize = 16;
/// Feature tiles one thread-pool task computes.
const TILES_PER_TASK: usize = 4;
/// Calls with fewer multiply-adds than this (base weights x rows) run on the
/// calling thread: waking the pool costs more than splitting the work saves.
pub(crate) const PARALLEL_FROM: usize = 1 << 20;

/// The dense base of one layer, borrowed: `weight` f32 `[out, in]` row-major
/// (torch's `nn.Linear.weight`), optional `bias` `[out]`.
#[derive(Clone, Copy, Debug)]
pub struct BaseLinear<'a> {
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
}

/// `out = x W^T + b + delta(x)` on the best instruction set of this CPU.
///
/// `x`: `[rows, K]` row-major; `tenant_ids`: one slot of `stack` per row
/// (`-1` = base only); `out`: `[rows, N]`, overwritten. Every plane of the
/// stack is used (padding planes have zero scales and are skipped).
pub fn fused_linear(
    x: &[f32],
    rows: usize,
    base: BaseLinear<'_>,
    stack: &DeltaStack<'_>,
    tenant_ids: &[i64],
    out: &mut [f32],
) -> Result<()> {
    fused_linear_with(
        Isa::detect(),
        PARALLEL_FROM,
        x,
        rows,
        base,
        stack,
        tenant_ids,
        out,
    )
}

/// [`fused_linear`] on a chosen instruction set, on the thread pool from
/// `parallel_from` multiply-adds on (tests force every path).
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_with(
    isa: Isa,
    parallel_from: usize,
    x: &[f32],
    rows: usize,
    base: BaseLinear<'_>,
    stack: &DeltaStack<'_>,
    tenant_ids: &[i64],
    out: &mut [f32],
) -> Result<()> {
    stack.check()?;
    isa.require()?;
    let (n, k) = (stack.shape.out_features, stack.shape.in_features);
    check_base(&base, n, k, "weight")?;
    check_rows(x.len(), rows, k, out.len(), n)?;
    check_tenant_ids(tenant_ids, rows, stack.shape.tenants)?;
    if rows == 0 {
        return Ok(());
    }
    // Live planes of each tenant some row uses (None: no row uses it).
    let mut live: Vec<Option<Vec<usize>>> = vec![None; stack.shape.tenants];
    for &t in tenant_ids.iter().filter(|&&t| t >= 0) {
        let t = t as usize;
        if live[t].is_none() {
            live[t] = Some(live_planes(stack, t, stack.shape.planes)?);
        }
    }
    let xs = SignRows::new(isa, x, rows, k);
    let layer = Layer {
        isa,
        xs: &xs,
        base,
        stack,
        tenant_ids,
        live: &live,
    };
    run_tiles(
        rows,
        n,
        k,
        parallel_from,
        |f0, dst| layer.tile(f0, dst),
        out,
    );
    Ok(())
}

/// `base` is `[n, k]` (and its bias `[n]`); `what` names the weight in errors.
pub(crate) fn check_base(base: &BaseLinear<'_>, n: usize, k: usize, what: &str) -> Result<()> {
    let need_w = checked_mul(n, k, "weight")?;
    if base.weight.len() != need_w {
        return Err(Error::Shape(format!(
            "{what}: expected [{n}, {k}] = {need_w} values (the layer's [out, in]), found {}",
            base.weight.len()
        )));
    }
    if let Some(b) = base.bias {
        if b.len() != n {
            return Err(Error::Shape(format!(
                "bias of {what}: expected {n} values (one per output feature), found {}",
                b.len()
            )));
        }
    }
    Ok(())
}

/// `x` holds `[rows, k]` values and `out` `[rows, n]`.
pub(crate) fn check_rows(x: usize, rows: usize, k: usize, out: usize, n: usize) -> Result<()> {
    let need_x = checked_mul(rows, k, "x")?;
    if x != need_x {
        return Err(Error::Shape(format!(
            "x: expected [{rows}, {k}] = {need_x} values ({k} = the layer's input features), \
             found {x}"
        )));
    }
    let need_out = checked_mul(rows, n, "out")?;
    if out != need_out {
        return Err(Error::Shape(format!(
            "out: expected [{rows}, {n}] = {need_out} values, found {out}"
        )));
    }
    Ok(())
}

/// Runs `tile(f0, dst)` for every 16-feature tile of `[rows, n]` outputs
/// (`dst`: `[rows][16]`), on the calling thread or, from `parallel_from`
/// multiply-adds (`rows * n * k`) on, on the pool; then writes `out` row-major.
pub(crate) fn run_tiles(
    rows: usize,
    n: usize,
    k: usize,
    parallel_from: usize,
    tile: impl Fn(usize, &mut [f32]) + Sync,
    out: &mut [f32],
) {
    if rows == 0 || n == 0 {
        return;
    }
    // Results tile-major, [tile][row][16], so each task owns one slice.
    let tiles = n.div_ceil(TILE);
    let mut scratch = vec![0f32; tiles * rows * TILE];
    let chunk = TILES_PER_TASK * rows * TILE;
    let task = |(i, dst): (usize, &mut [f32])| {
        for (j, dst) in dst.chunks_exact_mut(rows * TILE).enumerate() {
            tile((i * TILES_PER_TASK + j) * TILE, dst);
        }
    };
    if rows * n * k < parallel_from {
        scratch.chunks_mut(chunk).enumerate().for_each(task);
    } else {
        // On the crate's pool, not rayon's global one: see `pool` (fork).
        pool::install(|| scratch.par_chunks_mut(chunk).enumerate().for_each(task));
    }
    for (r, y) in out.chunks_exact_mut(n).enumerate() {
        for (t, y) in y.chunks_mut(TILE).enumerate() {
            let at = (t * rows + r) * TILE;
            y.copy_from_slice(&scratch[at..at + y.len()]);
        }
    }
}

/// Everything one call's tiles share.
struct Layer<'a> {
    isa: Isa,
    /// Rows padded with zeros to whole words, some (huge activations only)
    /// scaled by a power of two, with what undoes it and their folds.
    xs: &'a SignRows<'a>,
    base: BaseLinear<'a>,
    stack: &'a DeltaStack<'a>,
    tenant_ids: &'a [i64],
    live: &'a [Option<Vec<usize>>],
}

impl Layer<'_> {
    /// Features `[f0, f0 + 16)` (fewer at the end) of every row into
    /// `dst [rows][16]`.
    fn tile(&self, f0: usize, dst: &mut [f32]) {
        let n = self.stack.shape.out_features;
        assert!(f0 < n && dst.len() == self.tenant_ids.len() * TILE);
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 {
            // SAFETY: AVX-512F was detected for this Isa; `f0 < n`, `dst` holds
            // 16 floats per row, and the call's checks sized every other slice.
            unsafe { avx512::tile(self, f0, dst) };
            return;
        }
        self.tile_portable(f0, dst);
    }

    /// The live planes of row `r`'s tenant (empty for a base row).
    fn planes_of(&self, r: usize) -> (usize, &[usize]) {
        let t = self.tenant_ids[r];
        if t < 0 {
            return (0, &[]);
        }
        (t as usize, self.live[t as usize].as_deref().unwrap_or(&[]))
    }

    fn tile_portable(&self, f0: usize, dst: &mut [f32]) {
        let (n, k) = (self.stack.shape.out_features, self.stack.shape.in_features);
        let words = self.stack.shape.words();
        let nf = TILE.min(n - f0);
        let weight = &self.base.weight[f0 * k..(f0 + nf) * k];
        for (r, y) in dst.chunks_exact_mut(TILE).enumerate() {
            let x = self.xs.row(r);
            let y = &mut y[..nf];
            for (v, w) in y.iter_mut().zip(weight.chunks_exact(k)) {
                *v = x[..k].iter().zip(w).map(|(a, b)| a * b).sum();
            }
            let (t, planes) = self.planes_of(r);
            for &p in planes {
                let bits = &self.stack.plane(t, p)[f0 * words..(f0 + nf) * words];
                let scales = self.stack.scales_of(t, p);
                let mut dots = [0f32; TILE];
                let folds = self.xs.fold(r);
                let folds = folds.as_ref().map(std::slice::from_ref);
                self.isa
                    .signed_sums(&[x], folds, bits, words, &mut dots[..nf]);
                for (j, (v, &dot)) in y.iter_mut().zip(&dots).enumerate() {
                    let alpha = match self.stack.mode {
                        ScaleMode::Matrix => scales[0],
                        ScaleMode::Row => scales[f0 + j],
                    };
                    *v += alpha * dot;
                }
            }
            // Base and deltas are of the row as scaled; the bias is not.
            let unscale = self.xs.unscale[r];
            match self.base.bias {
                Some(b) => y
                    .iter_mut()
                    .zip(&b[f0..f0 + nf])
                    .for_each(|(v, b)| *v = *v * unscale + b),
                None => y.iter_mut().for_each(|v| *v *= unscale),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // lanes and accumulators indexed together
pub(crate) mod avx512 {
    use super::{Layer, TILE};
    use crate::bitplane::ScaleMode;
    use crate::gemv::FOLD_WORDS;
    use std::arch::x86_64::*;

    /// Lane `f` of the result = the sum of the 16 lanes of `acc[f]`.
    ///
    /// Four rounds, each halving the vectors and the lanes per feature
    /// (quarters across vectors, then elements within 128-bit lanes); after
    /// them lane `4q + e` holds feature `q + 4e`, which one permute puts in
    /// place.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce16(acc: &[__m512; TILE]) -> __m512 {
        // Round 1: quarters 0,1 of c[i] hold feature 2i, quarters 2,3 feature 2i+1.
        let mut c = [_mm512_setzero_ps(); 8];
        for i in 0..8 {
            let (a, b) = (acc[2 * i], acc[2 * i + 1]);
            c[i] = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
        }
        // Round 2: quarter q of d[j] holds feature 4j + q.
        let mut d = [_mm512_setzero_ps(); 4];
        for j in 0..4 {
            let (a, b) = (c[2 * j], c[2 * j + 1]);
            d[j] = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            );
        }
        // Round 3 (within quarters): elements 0,1 of quarter q of e[m] hold
        // feature 8m + q, elements 2,3 feature 8m + 4 + q.
        let e0 = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(d[0], d[1]),
            _mm512_shuffle_ps::<0xEE>(d[0], d[1]),
        );
        let e1 = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(d[2], d[3]),
            _mm512_shuffle_ps::<0xEE>(d[2], d[3]),
        );
        // Round 4: element e of quarter q holds feature q + 4e.
        let g = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(e0, e1),
            _mm512_shuffle_ps::<0xDD>(e0, e1),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, g)
    }

    /// One feature tile of every row: base dots, bias and each live plane's
    /// delta folded in registers, one masked store per row.
    ///
    /// Safety: AVX-512F available; `f0 < N`; `dst` holds 16 floats per row;
    /// the layer's slices sized as `fused_linear_with` checks them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(layer: &Layer<'_>, f0: usize, dst: &mut [f32]) {
        let shape = layer.stack.shape;
        let (n, k, words) = (shape.out_features, shape.in_features, shape.words());
        let nf = TILE.min(n - f0);
        let lanes = ((1u32 << nf) - 1) as u16;
        let weight = layer.base.weight.as_ptr().add(f0 * k);
        let bias = layer
            .base
            .bias
            .map(|b| _mm512_maskz_loadu_ps(lanes, b.as_ptr().add(f0)));
        let rows = layer.tenant_ids.len();
        // Ask for the next tile's weights and bits now: at decode a layer's
        // weights are cold (every other layer ran since), and the loads of this
        // tile alone leave the memory system idle between misses.
        if f0 + TILE < n {
            let next = f0 + TILE;
            let count = TILE.min(n - next);
            let w = layer.base.weight.as_ptr().add(next * k) as *const i8;
            for line in (0..count * k * 4).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(w.add(line));
            }
            for r in 0..rows {
                let (t, planes) = layer.planes_of(r);
                for &p in planes {
                    let bits = layer.stack.plane(t, p).as_ptr().add(next * words) as *const i8;
                    for line in (0..count * words * 4).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(bits.add(line));
                    }
                }
            }
        }
        // The base first, register-blocked over rows (4, then 2, then 1 at a
        // time) so each loaded weight vector serves several rows and a block
        // touches few weight rows at once (16 rows K floats apart would share
        // cache sets when K is a multiple of 1024).
        let xs: Vec<*const f32> = (0..rows).map(|r| layer.xs.row(r).as_ptr()).collect();
        let dsts: Vec<*mut f32> = (0..rows).map(|r| dst.as_mut_ptr().add(r * TILE)).collect();
        dense_rows(&xs, weight, k, nf, &dsts);
        for r in 0..rows {
            let x = layer.xs.row(r).as_ptr();
            let fold = layer.xs.fold(r);
            let mut y = _mm512_maskz_loadu_ps(lanes, dst.as_ptr().add(r * TILE));
            let (t, planes) = layer.planes_of(r);
            for &p in planes {
                let bits = layer.stack.plane(t, p).as_ptr().add(f0 * words);
                let scales = layer.stack.scales_of(t, p);
                let alpha = match layer.stack.mode {
                    ScaleMode::Matrix => _mm512_set1_ps(scales[0]),
                    ScaleMode::Row => _mm512_maskz_loadu_ps(lanes, scales.as_ptr().add(f0)),
                };
                let dot = match fold {
                    Some(h) => folded(x, h.as_ptr(), bits, words, nf),
                    None => signed(x, bits, words, nf),
                };
                y = _mm512_fmadd_ps(alpha, dot, y);
            }
            // Base and deltas are of the row as scaled (gemv::delta_rows);
            // the bias is not. The factor is a power of two: exact.
            let unscale = _mm512_set1_ps(layer.xs.unscale[r]);
            y = match bias {
                Some(b) => _mm512_fmadd_ps(y, unscale, b),
                None => _mm512_mul_ps(y, unscale),
            };
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(r * TILE), lanes, y);
        }
    }

    /// `dst[i][f] = x[i] . w[f]` for the `nf <= 16` weight rows of `k`
    /// floats from `w`, register-blocked over rows (4, then 2, then 1 at a
    /// time) so each loaded weight vector serves several rows and a block
    /// touches few weight rows at once (16 rows K floats apart would share
    /// cache sets when K is a multiple of 1024).
    ///
    /// Safety: AVX-512F available; each `x[i]` holds `k` floats, zero-padded
    /// to a multiple of 16 when `k` is not one; `w` holds `nf * k` floats;
    /// each `dst[i]` `nf` floats.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn dense_rows(
        x: &[*const f32],
        w: *const f32,
        k: usize,
        nf: usize,
        dst: &[*mut f32],
    ) {
        let mut r = 0;
        while r < x.len() {
            let left = x.len() - r;
            if left >= 4 {
                dense_block::<4, 4>(&x[r..r + 4], w, k, nf, &dst[r..r + 4]);
                r += 4;
            } else if left >= 2 {
                dense_block::<2, 8>(&x[r..r + 2], w, k, nf, &dst[r..r + 2]);
                r += 2;
            } else {
                dense_block::<1, 8>(&x[r..r + 1], w, k, nf, &dst[r..r + 1]);
                r += 1;
            }
        }
    }

    /// [`dense_rows`] for `R` rows, `F` features at a time (`R * F <= 16`
    /// accumulators, folded by one `reduce16`: lane `i * F + f`). One row
    /// takes 8 features, not 16: 16 weight rows 4 KiB apart (K = 1024) would
    /// all fall in one L1 set, more than its ways.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dense_block<const R: usize, const F: usize>(
        x: &[*const f32],
        w: *const f32,
        k: usize,
        nf: usize,
        dst: &[*mut f32],
    ) {
        const { assert!(R * F <= TILE) };
        let x: [*const f32; R] = std::array::from_fn(|i| x[i]);
        let full = k / 16;
        let tail = ((1u32 << (k % 16)) - 1) as u16;
        let mut f0 = 0;
        while f0 < nf {
            let count = F.min(nf - f0);
            let wf = w.add(f0 * k);
            let mut acc = [_mm512_setzero_ps(); TILE];
            for c in 0..full {
                let mut xv = [_mm512_setzero_ps(); R];
                for i in 0..R {
                    xv[i] = _mm512_loadu_ps(x[i].add(16 * c));
                }
                for f in 0..F {
                    if f < count {
                        let wv = _mm512_loadu_ps(wf.add(f * k + 16 * c));
                        for i in 0..R {
                            acc[i * F + f] = _mm512_fmadd_ps(xv[i], wv, acc[i * F + f]);
                        }
                    }
                }
            }
            if tail != 0 {
                for f in 0..count {
                    let wv = _mm512_maskz_loadu_ps(tail, wf.add(f * k + 16 * full));
                    for i in 0..R {
                        // x is zero-padded to whole words: no mask needed.
                        let xv = _mm512_loadu_ps(x[i].add(16 * full));
                        acc[i * F + f] = _mm512_fmadd_ps(xv, wv, acc[i * F + f]);
                    }
                }
            }
            let mut sums = [0f32; TILE];
            _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(&acc));
            for i in 0..R {
                let row = dst[i].add(f0);
                for f in 0..count {
                    *row.add(f) = sums[i * F + f];
                }
            }
            f0 += F;
        }
    }

    /// Lane `f` = `x . S[f]` for `nf <= 16` packed rows of `words` u32 from
    /// `bits` (the other lanes 0), for a row without infinities; `x` holds
    /// `words * 32` floats, `folds` the row's folds (`gemv::SignRows`). As
    /// `gemv`'s fold kernel: each half word is the write mask of one masked
    /// add, and every block of `FOLD_WORDS` words starts by taking away half
    /// its plain sums (adding the fold), so the accumulators end at
    /// `-(x . S) / 2` and never hold more than about half a block's plain sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn folded(
        x: *const f32,
        folds: *const f32,
        bits: *const u32,
        words: usize,
        nf: usize,
    ) -> __m512 {
        let halves = bits as *const u16;
        let mut acc = [_mm512_setzero_ps(); TILE];
        // Little-endian words: the low half masks inputs 0..16.
        macro_rules! blocks {
            ($count:expr) => {{
                let mut w0 = 0;
                let mut block = 0;
                while w0 < words {
                    let h = _mm512_loadu_ps(folds.add(16 * block));
                    for f in 0..$count {
                        acc[f] = if block == 0 {
                            h
                        } else {
                            _mm512_add_ps(acc[f], h)
                        };
                    }
                    let end = words.min(w0 + FOLD_WORDS);
                    for w in w0..end {
                        let lo = _mm512_loadu_ps(x.add(32 * w));
                        let hi = _mm512_loadu_ps(x.add(32 * w + 16));
                        for f in 0..$count {
                            let half = halves.add(2 * (f * words + w));
                            acc[f] = _mm512_mask_add_ps(acc[f], *half, acc[f], lo);
                            acc[f] = _mm512_mask_add_ps(acc[f], *half.add(1), acc[f], hi);
                        }
                    }
                    w0 = end;
                    block += 1;
                }
            }};
        }
        if nf == TILE {
            blocks!(TILE);
        } else {
            blocks!(nf);
        }
        _mm512_mul_ps(_mm512_set1_ps(-2.0), reduce16(&acc))
    }

    /// Lane `f` = `x . S[f]` (`sum_k (bit ? -x_k : x_k)`) for `nf <= 16`
    /// packed rows of `words` u32 from `bits` (the other lanes 0); `x` holds
    /// `words * 32` floats. Each half word is the mask of one blend making 16
    /// signs `+-1.0`, then one fused multiply-add (exact product) adds the 16
    /// signed activations.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn signed(x: *const f32, bits: *const u32, words: usize, nf: usize) -> __m512 {
        let halves = bits as *const u16;
        let plus = _mm512_set1_ps(1.0);
        let minus = _mm512_set1_ps(-1.0);
        let mut acc = [_mm512_setzero_ps(); TILE];
        // Little-endian words: the low half signs inputs 0..16.
        macro_rules! word {
            ($w:expr, $count:expr) => {{
                let lo = _mm512_loadu_ps(x.add(32 * $w));
                let hi = _mm512_loadu_ps(x.add(32 * $w + 16));
                for f in 0..$count {
                    let half = halves.add(2 * (f * words + $w));
                    let slo = _mm512_mask_blend_ps(*half, plus, minus);
                    let shi = _mm512_mask_blend_ps(*half.add(1), plus, minus);
                    acc[f] = _mm512_fmadd_ps(lo, slo, acc[f]);
                    acc[f] = _mm512_fmadd_ps(hi, shi, acc[f]);
                }
            }};
        }
        if nf == TILE {
            for w in 0..words {
                word!(w, TILE);
            }
        } else {
            for w in 0..words {
                word!(w, nf);
            }
        }
        reduce16(&acc)
    }
}

#[cfg(test)]
#[path = "fused_tests.rs"]
mod tests;
