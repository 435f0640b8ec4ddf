//! Delta matmul on the CPU for decode and small batches, straight from the
//! packed sign bits (docs/FORMAT.md), never through a dense delta:
//!
//! `y[r, n] (+)= sum_{p < k} alpha[t_r, p(, n)] * (x[r] . S[t_r, p, n])`
//!
//! with one tenant id per row of `x` (`-1` = no delta for that row).
//!
//! Formulation: with `S = 1 - 2 * bit`, `x . S = sum(x) - 2 * sum(x where bit = 1)`.
//! `sum(x)` is computed once per row; the masked sum is the hot loop. With
//! AVX-512 each half of a u32 word *is* the write mask of one masked add over
//! 16 activations (one instruction per 16 weights, no unpacking); elsewhere a
//! portable loop ANDs each activation with its bit spread to a full-lane mask,
//! which the compiler vectorises. Each weight bit is read once per call for
//! small batches (the batch rows reuse it from L1), so the kernel streams 1/32
//! of the bytes a float32 dense delta would.
//!
//! Threads split the output features; rows are grouped by tenant so every
//! tenant's planes are read once however its rows are scattered in the batch.

use std::borrow::Cow;

use rayon::prelude::*;

use crate::bitplane::{words_per_row, ScaleMode, WORD_BITS};
use crate::error::{checked_mul, first_outside, Error, Result};
use crate::float::Float;
use crate::pool;

/// Output features one rayon task computes (a multiple of the 4-feature tile).
const FEATURES_PER_TASK: usize = 64;
/// Batch rows sharing one pass over a tenant's plane bits.
const ROW_TILE: usize = 4;
/// Calls that read fewer packed words than this (summed over tenants, planes
/// and row tiles; about 1 ns each with AVX-512) run on the calling thread:
/// below it, waking the thread pool and waiting for it costs more than the
/// work it would split (measured on a shared 2-core EPYC; decode of a model
/// with 512..1376 features stays below, a 4096x4096 GEMV goes to the pool).
const PARALLEL_FROM_WORDS: usize = 1 << 18;

/// Sizes of a stack of packed deltas: `planes [tenants, planes, out, words]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackShape {
    pub tenants: usize,
    pub planes: usize,
    /// Output features `N` (rows of each packed plane).
    pub out_features: usize,
    /// Input features `K` (the packed axis).
    pub in_features: usize,
}

impl StackShape {
    pub fn words(&self) -> usize {
        words_per_row(self.in_features)
    }
}

/// The packed deltas of every loaded tenant of one layer, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct DeltaStack<'a> {
    /// u32 `[tenants, planes, out, words]`.
    pub planes: &'a [u32],
    /// f32 `[tenants, planes]` (matrix) or `[tenants, planes, out]` (row).
    pub scales: &'a [f32],
    pub mode: ScaleMode,
    pub shape: StackShape,
}

impl DeltaStack<'_> {
    pub(crate) fn check(&self) -> Result<()> {
        let StackShape {
            tenants,
            planes,
            out_features,
            in_features,
        } = self.shape;
        if tenants == 0 || planes == 0 || out_features == 0 || in_features == 0 {
            return Err(Error::Shape(format!(
                "delta planes: expected [tenants, planes, out, words] with every size > 0, \
                 found tenants={tenants}, planes={planes}, out={out_features}, in={in_features}"
            )));
        }
        let words = self.shape.words();
        let per_tenant = checked_mul(planes, out_features, "delta planes")?;
        let need = checked_mul(
            checked_mul(tenants, per_tenant, "delta planes")?,
            words,
            "delta planes",
        )?;
        if self.planes.len() != need {
            return Err(Error::Shape(format!(
                "delta planes: shape [{tenants}, {planes}, {out_features}, {words}] \
                 ({in_features} inputs = {words} u32 words per row) needs {need} words, found {}",
                self.planes.len()
            )));
        }
        let need = tenants * planes * self.mode.per_plane(out_features);
        if self.scales.len() != need {
            let layout = match self.mode {
                ScaleMode::Matrix => format!("[{tenants}, {planes}] (one per tenant and plane)"),
                ScaleMode::Row => format!(
                    "[{tenants}, {planes}, {out_features}] (one per tenant, plane and output)"
                ),
            };
            return Err(Error::Shape(format!(
                "delta scales: expected {need} values laid out as {layout}, found {}",
                self.scales.len()
            )));
        }
        Ok(())
    }

    /// The scales of one (tenant, plane): one value, or one per output.
    pub(crate) fn scales_of(&self, tenant: usize, plane: usize) -> &[f32] {
        let per = self.mode.per_plane(self.shape.out_features);
        let at = (tenant * self.shape.planes + plane) * per;
        &self.scales[at..at + per]
    }

    /// The packed rows `[out, words]` of one (tenant, plane).
    pub(crate) fn plane(&self, tenant: usize, plane: usize) -> &[u32] {
        let len = self.shape.out_features * self.shape.words();
        let at = (tenant * self.shape.planes + plane) * len;
        &self.planes[at..at + len]
    }
}

/// The instruction set the masked-sum loop runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best one this CPU has.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// An error unless this CPU can run it.
    pub fn require(self) -> Result<()> {
        if self.available() {
            return Ok(());
        }
        Err(Error::Value(format!(
            "instruction set: this CPU has no {}",
            self.name()
        )))
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// `sums[i * count + n] = sum(xs[i] where bit(n, .) = 1)` for `count`
    /// consecutive packed rows and up to [`ROW_TILE`] activation rows.
    /// Only called after `available()` said yes.
    pub(crate) fn masked_sums(self, xs: &[&[f32]], bits: &[u32], words: usize, sums: &mut [f32]) {
        let count = bits.len() / words;
        assert!(xs.len() <= ROW_TILE && bits.len() == count * words);
        assert!(sums.len() == xs.len() * count);
        assert!(xs.iter().all(|x| x.len() >= words * WORD_BITS));
        match self {
            // SAFETY: the slices are sized as checked above and the CPU
            // feature was detected before this Isa was chosen.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::masked_sums(xs, bits, words, sums) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { masked_sums_avx2(xs, bits, words, sums) },
            _ => masked_sums_portable(xs, bits, words, sums),
        }
    }
}

/// Portable masked sums: each bit becomes an all-ones / all-zeros lane mask.
#[inline(always)]
fn masked_sums_portable(xs: &[&[f32]], bits: &[u32], words: usize, sums: &mut [f32]) {
    let count = bits.len() / words;
    for (x, sums) in xs.iter().zip(sums.chunks_exact_mut(count.max(1))) {
        for (sum, row) in sums.iter_mut().zip(bits.chunks_exact(words)) {
            let mut acc = [0f32; WORD_BITS];
            for (&word, xw) in row.iter().zip(x.chunks_exact(WORD_BITS)) {
                let xw: &[f32; WORD_BITS] = xw.try_into().expect("exact chunk");
                for j in 0..WORD_BITS {
                    let keep = ((word >> j) & 1).wrapping_neg();
                    acc[j] += f32::from_bits(xw[j].to_bits() & keep);
                }
            }
            *sum = acc.iter().sum();
        }
    }
}

/// The portable loop compiled with AVX2 enabled (variable shifts per lane).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn masked_sums_avx2(xs: &[&[f32]], bits: &[u32], words: usize, sums: &mut [f32]) {
    masked_sums_portable(xs, bits, words, sums)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::ROW_TILE;
    use std::arch::x86_64::*;

    /// Masked sums of `F` packed rows for `R` activation rows in one pass:
    /// `R * F` accumulators (16 registers), each mask moved into a mask
    /// register once and used for `R` rows, each activation vector loaded
    /// once and used for `F` features.
    ///
    /// Safety: AVX-512F available; each `x[r]` holds `words * 32` floats,
    /// `bits` `F * words` words, `out[r * stride + f]` in bounds.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const F: usize, const R: usize>(
        x: [*const f32; R],
        bits: *const u32,
        words: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); F]; R];
        for w in 0..words {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            for r in 0..R {
                lo[r] = _mm512_loadu_ps(x[r].add(w * 32));
                hi[r] = _mm512_loadu_ps(x[r].add(w * 32 + 16));
            }
            for f in 0..F {
                // The two mask halves straight from memory (little-endian words).
                let half = (bits as *const u16).add(2 * (f * words + w));
                let (mlo, mhi) = (*half, *half.add(1));
                for r in 0..R {
                    acc[r][f] = _mm512_mask_add_ps(acc[r][f], mlo, acc[r][f], lo[r]);
                    acc[r][f] = _mm512_mask_add_ps(acc[r][f], mhi, acc[r][f], hi[r]);
                }
            }
        }
        for r in 0..R {
            for f in 0..F {
                out[r * stride + f] = _mm512_reduce_add_ps(acc[r][f]);
            }
        }
    }

    /// Features `F_BIG, 4, 1` at a time for `R` rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const F_BIG: usize, const R: usize>(
        x: [*const f32; R],
        bits: &[u32],
        words: usize,
        sums: &mut [f32],
    ) {
        let count = bits.len() / words;
        let bp = bits.as_ptr();
        let mut f = 0;
        while f + F_BIG <= count {
            tile::<F_BIG, R>(x, bp.add(f * words), words, &mut sums[f..], count);
            f += F_BIG;
        }
        while f + 4 <= count {
            tile::<4, R>(x, bp.add(f * words), words, &mut sums[f..], count);
            f += 4;
        }
        while f < count {
            tile::<1, R>(x, bp.add(f * words), words, &mut sums[f..], count);
            f += 1;
        }
    }

    /// Safety: AVX-512F available; sizes as `Isa::masked_sums` checks them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn masked_sums(xs: &[&[f32]], bits: &[u32], words: usize, sums: &mut [f32]) {
        const _: () = assert!(ROW_TILE == 4);
        let p = |i: usize| xs[i].as_ptr();
        match xs.len() {
            4 => rows::<4, 4>([p(0), p(1), p(2), p(3)], bits, words, sums),
            3 => rows::<4, 3>([p(0), p(1), p(2)], bits, words, sums),
            2 => rows::<8, 2>([p(0), p(1)], bits, words, sums),
            1 => rows::<16, 1>([p(0)], bits, words, sums),
            _ => {}
        }
    }
}

/// Checks one tenant id per row, each in `[-1, tenants)`.
pub(crate) fn check_tenant_ids(ids: &[i64], rows: usize, tenants: usize) -> Result<()> {
    if ids.len() != rows {
        return Err(Error::Shape(format!(
            "tenant_ids: expected one id per row of x ({rows}), found {}",
            ids.len()
        )));
    }
    if let Some((r, t)) = first_outside(ids, -1, tenants) {
        return Err(Error::Value(format!(
            "tenant_ids: expected values in [-1, {tenants}) ({tenants} tenant(s) stacked, \
             -1 = no delta), found {t} at row {r}"
        )));
    }
    Ok(())
}

/// The planes among the first `k_use` of tenant `t` that can contribute: a
/// plane whose scales are all zero (padding of a tenant with fewer planes) is
/// skipped. Non-finite scales are an error.
pub(crate) fn live_planes(stack: &DeltaStack<'_>, t: usize, k_use: usize) -> Result<Vec<usize>> {
    let mut planes_t = Vec::with_capacity(k_use);
    for p in 0..k_use {
        let scales = stack.scales_of(t, p);
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::NonFinite(format!(
                "delta scales: expected finite values, found {} for tenant {t}, plane {p}, \
                 index {i}",
                scales[i]
            )));
        }
        if scales.iter().any(|&s| s != 0.0) {
            planes_t.push(p);
        }
    }
    Ok(planes_t)
}

/// The rows of each tenant that occurs, tenants ascending: `(tenant, rows)`
/// pairs whose rows are ranges of one shared index buffer (one allocation
/// whatever the number of tenants).
pub(crate) struct Groups {
    order: Vec<usize>,
    spans: Vec<(usize, usize, usize)>, // (tenant, start, end) in `order`
}

impl Groups {
    pub(crate) fn new(ids: &[i64], tenants: usize) -> Groups {
        let mut order: Vec<usize> = (0..ids.len()).filter(|&r| ids[r] >= 0).collect();
        // Stable: rows of one tenant keep their batch order.
        order.sort_by_key(|&r| ids[r]);
        let mut spans = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let t = ids[order[start]];
            let end = start + order[start..].partition_point(|&r| ids[r] == t);
            debug_assert!((t as usize) < tenants);
            spans.push((t as usize, start, end));
            start = end;
        }
        Groups { order, spans }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &[usize])> + '_ {
        self.spans.iter().map(|&(t, a, b)| (t, &self.order[a..b]))
    }

    fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

/// `x` itself when `F` is f32.
fn as_f32<F: Float>(x: &[F]) -> Option<&[f32]> {
    if std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>() {
        // SAFETY: F is f32 (same type id), so the slice is reinterpreted as itself.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
    } else {
        None
    }
}

/// `x` as float32 rows padded with zeros to whole words (so the padding bits,
/// whatever they hold, add nothing and nothing past `K` is read), and each
/// row's plain sum. Float32 rows that already fill whole words are borrowed,
/// not copied.
pub(crate) fn padded_rows<F: Float>(
    x: &[F],
    rows: usize,
    cols: usize,
) -> (Cow<'_, [f32]>, Vec<f32>) {
    let row_sum = |row: &mut dyn Iterator<Item = f32>| row.map(|v| v as f64).sum::<f64>() as f32;
    if cols.is_multiple_of(WORD_BITS) {
        if let Some(xf) = as_f32(x) {
            let totals = xf
                .chunks_exact(cols.max(1))
                .map(|r| row_sum(&mut r.iter().copied()))
                .collect();
            return (Cow::Borrowed(xf), totals);
        }
    }
    let stride = words_per_row(cols) * WORD_BITS;
    let mut padded = vec![0f32; rows * stride];
    let mut totals = vec![0f32; rows];
    for ((dst, src), total) in padded
        .chunks_exact_mut(stride)
        .zip(x.chunks_exact(cols))
        .zip(totals.iter_mut())
    {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
        *total = row_sum(&mut dst.iter().copied());
    }
    (Cow::Owned(padded), totals)
}

/// The delta matmul on the best instruction set of this CPU.
///
/// `x`: `[rows, K]` row-major; `tenant_ids`: one per row (`-1` = no delta);
/// `use_planes`: the first k planes (all when `None`); `out`: `[rows, N]`
/// float32, overwritten, or added to when `accumulate` (rows without a delta
/// are then left as they are).
#[allow(clippy::too_many_arguments)]
pub fn delta_matmul<F: Float>(
    x: &[F],
    rows: usize,
    stack: &DeltaStack<'_>,
    tenant_ids: &[i64],
    use_planes: Option<usize>,
    out: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    delta_matmul_on(
        Isa::detect(),
        x,
        rows,
        stack,
        tenant_ids,
        use_planes,
        out,
        accumulate,
    )
}

/// [`delta_matmul`] on a chosen instruction set (tests compare them).
#[allow(clippy::too_many_arguments)]
pub fn delta_matmul_on<F: Float>(
    isa: Isa,
    x: &[F],
    rows: usize,
    stack: &DeltaStack<'_>,
    tenant_ids: &[i64],
    use_planes: Option<usize>,
    out: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    delta_matmul_with(
        isa,
        PARALLEL_FROM_WORDS,
        x,
        rows,
        stack,
        tenant_ids,
        use_planes,
        out,
        accumulate,
    )
}

/// [`delta_matmul_on`] that runs on the thread pool from `parallel_from`
/// packed words of work on (tests force either path).
#[allow(clippy::too_many_arguments)]
fn delta_matmul_with<F: Float>(
    isa: Isa,
    parallel_from: usize,
    x: &[F],
    rows: usize,
    stack: &DeltaStack<'_>,
    tenant_ids: &[i64],
    use_planes: Option<usize>,
    out: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    stack.check()?;
    isa.require()?;
    let StackShape {
        tenants,
        planes,
        out_features: n,
        in_features: k,
    } = stack.shape;
    let need_x = checked_mul(rows, k, "x")?;
    if x.len() != need_x {
        return Err(Error::Shape(format!(
            "x: expected [{rows}, {k}] = {need_x} values ({k} = the delta's input features), \
             found {}",
            x.len()
        )));
    }
    let need_out = checked_mul(rows, n, "out")?;
    if out.len() != need_out {
        return Err(Error::Shape(format!(
            "out: expected [{rows}, {n}] = {need_out} values, found {}",
            out.len()
        )));
    }
    let k_use = use_planes.unwrap_or(planes);
    if k_use == 0 || k_use > planes {
        return Err(Error::Value(format!(
            "bits: expected 1..={planes} (planes stored), found {k_use}"
        )));
    }
    check_tenant_ids(tenant_ids, rows, tenants)?;
    let groups = Groups::new(tenant_ids, tenants);
    // Planes of each used tenant that can contribute: a plane whose scales are
    // all zero (padding of a tenant with fewer planes) is skipped.
    let live = groups
        .iter()
        .map(|(t, _)| live_planes(stack, t, k_use))
        .collect::<Result<Vec<_>>>()?;
    if !accumulate {
        out.fill(0.0);
    }
    if groups.is_empty() {
        return Ok(());
    }

    let words = stack.shape.words();
    let stride = words * WORD_BITS;
    let (xs, totals) = padded_rows(x, rows, k);
    // Packed words the call reads, counted once per row tile.
    let work: usize = groups
        .iter()
        .zip(&live)
        .map(|((_, r), planes_t)| planes_t.len() * r.len().div_ceil(ROW_TILE))
        .sum::<usize>()
        * n
        * words;
    // Output features [n0, n0 + count) for every row, feature-major into `dst`.
    let features = |n0: usize, dst: &mut [f32]| {
        let count = dst.len() / rows;
        let mut sums = vec![0f32; ROW_TILE * count];
        for ((t, group_rows), planes_t) in groups.iter().zip(&live) {
            for &p in planes_t {
                let bits = &stack.plane(t, p)[n0 * words..(n0 + count) * words];
                let scales = stack.scales_of(t, p);
                for tile_rows in group_rows.chunks(ROW_TILE) {
                    let mut x_tile: [&[f32]; ROW_TILE] = [&[]; ROW_TILE];
                    for (slot, &r) in x_tile.iter_mut().zip(tile_rows) {
                        *slot = &xs[r * stride..(r + 1) * stride];
                    }
                    let sums = &mut sums[..tile_rows.len() * count];
                    isa.masked_sums(&x_tile[..tile_rows.len()], bits, words, sums);
                    for (&r, sums) in tile_rows.iter().zip(sums.chunks_exact(count)) {
                        for (j, &neg) in sums.iter().enumerate() {
                            let alpha = match stack.mode {
                                ScaleMode::Matrix => scales[0],
                                ScaleMode::Row => scales[n0 + j],
                            };
                            dst[j * rows + r] += alpha * (totals[r] - 2.0 * neg);
                        }
                    }
                }
            }
        }
    };
    let mut result_t = vec![0f32; n * rows];
    if work < parallel_from {
        // Small calls (decode at model sizes of a few hundred features) on
        // the calling thread: waking the pool would cost more than the work.
        features(0, &mut result_t);
    } else {
        // Feature-major result so each task owns one contiguous slice. On
        // the crate's pool, not rayon's global one: see `pool` (fork).
        pool::install(|| {
            result_t
                .par_chunks_mut(FEATURES_PER_TASK * rows)
                .enumerate()
                .for_each(|(task, dst)| features(task * FEATURES_PER_TASK, dst))
        });
    }
    for (r, y) in out.chunks_exact_mut(n).enumerate() {
        if tenant_ids[r] < 0 {
            continue;
        }
        for (j, v) in y.iter_mut().enumerate() {
            *v += result_t[j * rows + r];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    use crate::test_support::{isas, naive, random_stack, stack, stack_shape, Lcg};

    fn assert_close(got: &[f32], want: &[f64], x: &[f32], k: usize, what: &str) {
        // Tolerance: float32 rounding over K terms of size |x| * alpha (alpha <= ~1, <= 3 planes).
        let scale: f64 = x.iter().map(|v| v.abs() as f64).sum::<f64>() / (x.len() / k) as f64;
        let tol = 3.0 * scale * 1e-5 + 1e-6;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol,
                "{what}: index {i}: got {g}, want {w} (tol {tol})"
            );
        }
    }

    fn check_case(
        isa: Isa,
        shape: StackShape,
        rows: usize,
        mode: ScaleMode,
        use_planes: Option<usize>,
        seed: u64,
    ) {
        let mut rng = Lcg(seed);
        let (planes, scales) = random_stack(&mut rng, shape, mode, false);
        let stack = stack(&planes, &scales, mode, shape);
        let x: Vec<f32> = (0..rows * shape.in_features)
            .map(|_| rng.unit() * 2.0)
            .collect();
        let ids: Vec<i64> = (0..rows)
            .map(|_| (rng.next() % (shape.tenants as u64 + 1)) as i64 - 1)
            .collect();
        let want = naive(&x, rows, &stack, &ids, use_planes.unwrap_or(shape.planes));
        // Both paths: on the calling thread and on the pool; they agree exactly.
        let mut results = Vec::new();
        for parallel_from in [usize::MAX, 0] {
            let mut out = vec![f32::NAN; rows * shape.out_features];
            delta_matmul_with(
                isa,
                parallel_from,
                &x,
                rows,
                &stack,
                &ids,
                use_planes,
                &mut out,
                false,
            )
            .unwrap();
            assert_close(
                &out,
                &want,
                &x,
                shape.in_features,
                &format!("{isa:?} {shape:?} rows={rows} {mode:?} parallel_from={parallel_from}"),
            );
            results.push(out);
        }
        assert_eq!(results[0], results[1], "serial and pool paths differ");
    }

    #[test]
    fn matches_naive_on_ragged_shapes_every_isa() {
        let cases = [
            (1, 1, 1, 1, 1),
            (1, 1, 5, 31, 1),
            (2, 3, 7, 33, 4),
            (3, 2, 70, 100, 3),
            (4, 1, 130, 257, 9),
            (1, 3, 64, 64, 2),
            (1, 2, 77, 96, 11),
            (6, 1, 200, 128, 23),
            (2, 1, 45, 40, 14),
        ];
        for isa in isas() {
            for (seed, &(t, p, n, k, m)) in cases.iter().enumerate() {
                let shape = stack_shape(t, p, n, k);
                for mode in [ScaleMode::Matrix, ScaleMode::Row] {
                    check_case(isa, shape, m, mode, None, seed as u64 + 1);
                }
            }
        }
    }

    #[test]
    fn first_k_planes_only() {
        let shape = stack_shape(2, 3, 9, 45);
        for isa in isas() {
            for k in 1..=3 {
                check_case(isa, shape, 5, ScaleMode::Row, Some(k), 77 + k as u64);
            }
        }
    }

    #[test]
    fn padding_bits_and_past_k_never_count() {
        let shape = stack_shape(1, 1, 6, 40);
        let mut rng = Lcg(5);
        let (dirty, scales) = random_stack(&mut rng, shape, ScaleMode::Matrix, true);
        let clean: Vec<u32> = dirty
            .chunks_exact(2)
            .flat_map(|w| [w[0], w[1] & 0xff])
            .collect();
        let x: Vec<f32> = (0..3 * 40).map(|_| rng.unit()).collect();
        let ids = [0i64, 0, 0];
        for isa in isas() {
            let mut a = vec![0f32; 18];
            let mut b = vec![0f32; 18];
            let mk = |planes| DeltaStack {
                planes,
                scales: &scales,
                mode: ScaleMode::Matrix,
                shape,
            };
            delta_matmul_on(isa, &x, 3, &mk(&dirty), &ids, None, &mut a, false).unwrap();
            delta_matmul_on(isa, &x, 3, &mk(&clean), &ids, None, &mut b, false).unwrap();
            assert_eq!(a, b, "{isa:?}");
        }
    }

    #[test]
    fn accumulate_adds_and_skips_base_rows() {
        let shape = stack_shape(2, 1, 10, 50);
        let mut rng = Lcg(11);
        let (planes, scales) = random_stack(&mut rng, shape, ScaleMode::Matrix, false);
        let stack = stack(&planes, &scales, ScaleMode::Matrix, shape);
        let x: Vec<f32> = (0..4 * 50).map(|_| rng.unit()).collect();
        let ids = [1i64, -1, 0, 1];
        let start: Vec<f32> = (0..40).map(|_| rng.unit()).collect();
        let mut out = start.clone();
        delta_matmul(&x, 4, &stack, &ids, None, &mut out, true).unwrap();
        let want = naive(&x, 4, &stack, &ids, 1);
        let want: Vec<f64> = want
            .iter()
            .zip(&start)
            .map(|(d, s)| d + *s as f64)
            .collect();
        assert_close(&out, &want, &x, 50, "accumulate");
        assert_eq!(&out[10..20], &start[10..20], "a base-only row is untouched");
    }

    #[test]
    fn half_inputs_convert_exactly() {
        let shape = stack_shape(1, 2, 8, 70);
        let mut rng = Lcg(3);
        let (planes, scales) = random_stack(&mut rng, shape, ScaleMode::Row, false);
        let stack = stack(&planes, &scales, ScaleMode::Row, shape);
        let xf: Vec<f32> = (0..2 * 70).map(|_| rng.unit()).collect();
        let ids = [0i64, 0];
        let xh: Vec<f16> = xf.iter().map(|&v| f16::from_f32(v)).collect();
        let xb: Vec<bf16> = xf.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut out = vec![0f32; 16];
        delta_matmul(&xh, 2, &stack, &ids, None, &mut out, false).unwrap();
        let rounded: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        assert_close(
            &out,
            &naive(&rounded, 2, &stack, &ids, 2),
            &rounded,
            70,
            "f16",
        );
        delta_matmul(&xb, 2, &stack, &ids, None, &mut out, false).unwrap();
        let rounded: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        assert_close(
            &out,
            &naive(&rounded, 2, &stack, &ids, 2),
            &rounded,
            70,
            "bf16",
        );
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let shape = stack_shape(2, 1, 4, 33);
        let planes = vec![1u32; 2 * 4 * 2];
        let scales = vec![0.5f32; 2];
        let stack = stack(&planes, &scales, ScaleMode::Matrix, shape);
        let x = vec![1f32; 2 * 33];
        let mut out = vec![0f32; 8];
        let err = |r: Result<()>| r.unwrap_err().to_string();

        let e = err(delta_matmul(&x, 2, &stack, &[0, 2], None, &mut out, false));
        assert!(e.contains("found 2 at row 1"), "{e}");
        let e = err(delta_matmul(&x, 2, &stack, &[0, -2], None, &mut out, false));
        assert!(e.contains("found -2 at row 1"), "{e}");
        let e = err(delta_matmul(&x, 2, &stack, &[0], None, &mut out, false));
        assert!(e.contains("one id per row of x (2), found 1"), "{e}");
        let e = err(delta_matmul(
            &x[..65],
            2,
            &stack,
            &[0, 0],
            None,
            &mut out,
            false,
        ));
        assert!(e.contains("x: expected [2, 33]"), "{e}");
        let e = err(delta_matmul(
            &x,
            2,
            &stack,
            &[0, 0],
            Some(2),
            &mut out,
            false,
        ));
        assert!(e.contains("bits: expected 1..=1"), "{e}");
        let e = err(delta_matmul(
            &x,
            2,
            &stack,
            &[0, 0],
            None,
            &mut out[..7],
            false,
        ));
        assert!(e.contains("out: expected [2, 4]"), "{e}");

        let short = DeltaStack {
            planes: &planes[1..],
            ..stack
        };
        let e = err(delta_matmul(&x, 2, &short, &[0, 0], None, &mut out, false));
        assert!(e.contains("needs 16 words, found 15"), "{e}");
        let row_mode = DeltaStack {
            mode: ScaleMode::Row,
            ..stack
        };
        let e = err(delta_matmul(
            &x,
            2,
            &row_mode,
            &[0, 0],
            None,
            &mut out,
            false,
        ));
        assert!(e.contains("[2, 1, 4]"), "{e}");
        let nan = [0.5f32, f32::NAN];
        let bad_scale = DeltaStack {
            scales: &nan,
            ..stack
        };
        let e = err(delta_matmul(
            &x,
            2,
            &bad_scale,
            &[1, -1],
            None,
            &mut out,
            false,
        ));
        assert!(e.contains("tenant 1, plane 0"), "{e}");
        // A NaN scale of a tenant no row uses is not read.
        delta_matmul(&x, 2, &bad_scale, &[0, -1], None, &mut out, false).unwrap();
    }

    #[test]
    fn empty_batch_is_fine() {
        let shape = stack_shape(1, 1, 3, 8);
        let planes = vec![0u32; 3];
        let stack = stack(&planes, &[1.0], ScaleMode::Matrix, shape);
        let mut out: Vec<f32> = vec![];
        delta_matmul::<f32>(&[], 0, &stack, &[], None, &mut out, false).unwrap();
    }
}
