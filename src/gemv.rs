//! Delta matmul on the CPU for decode and small batches, straight from the
//! packed sign bits (docs/FORMAT.md), never through a dense delta:
//!
//! `y[r, n] (+)= sum_{p < k} alpha[t_r, p(, n)] * (x[r] . S[t_r, p, n])`
//!
//! with one tenant id per row of `x` (`-1` = no delta for that row).
//!
//! Formulation: `x . S` is summed as it is defined, `sum_k (bit_k ? -x_k : x_k)`,
//! in float32 lanes: no `sum(x) - 2 * sum(x where bit = 1)`, whose two large
//! terms cancel (inaccurate when `x` has a non-zero mean, NaN for an infinite
//! `x`, overflow for a huge one). With AVX-512 each half of a u32 word is the
//! mask of one blend that makes the 16 signs `+-1.0`, shared by the rows of a
//! tile, and each row takes one fused multiply-add per 16 weights (`x * +-1`
//! is exact, so this is a signed add); elsewhere a portable loop flips each
//! activation's sign bit with its weight bit (XOR) and adds, which the
//! compiler vectorises. Rows whose activations are so large that a partial
//! sum could overflow float32 are scaled by a power of two first (exact) and
//! their results scaled back. Each weight bit is read once per call for small
//! batches (the batch rows reuse it from L1), so the kernel streams 1/32 of
//! the bytes a float32 dense delta would.
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

/// The instruction set the signed-sum loop runs on.
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

    /// `sums[i * count + n] = xs[i] . S[n]` (`S = 1 - 2 * bit`: the signed sum
    /// `sum_k (bit ? -x : x)`) for `count` consecutive packed rows and up to
    /// [`ROW_TILE`] activation rows. Only called after `available()` said yes.
    ///
    /// `folds`: the rows' folds ([`SignRows::fold`]), for the fold kernel
    /// (rows without infinities); `None`: the exact kernel.
    pub(crate) fn signed_sums(
        self,
        xs: &[&[f32]],
        folds: Option<&[&[f32]]>,
        bits: &[u32],
        words: usize,
        sums: &mut [f32],
    ) {
        let count = bits.len() / words;
        assert!(xs.len() <= ROW_TILE && bits.len() == count * words);
        assert!(sums.len() == xs.len() * count);
        assert!(xs.iter().all(|x| x.len() >= words * WORD_BITS));
        if let Some(folds) = folds {
            assert!(folds.len() == xs.len());
            assert!(folds.iter().all(|h| h.len() >= self.fold_len(words)));
        }
        match self {
            // SAFETY: the slices are sized as checked above and the CPU
            // feature was detected before this Isa was chosen.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::signed_sums(xs, folds, bits, words, sums) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => match folds {
                Some(folds) => {
                    let count = count.max(1);
                    for ((x, fold), sums) in xs.iter().zip(folds).zip(sums.chunks_exact_mut(count))
                    {
                        unsafe { avx2::folded_sums(x, fold, bits, words, sums) }
                    }
                }
                None => unsafe { signed_sums_avx2(xs, None, bits, words, sums) },
            },
            _ => signed_sums_portable(xs, folds, bits, words, sums),
        }
    }

    /// Lanes of the fold kernel's accumulators, so of a block's folds: 16
    /// (AVX-512: inputs `32w + j` and `32w + 16 + j` share lane `j`) or 32
    /// (the portable loop: input `32w + j` in lane `j`).
    pub(crate) fn fold_lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            _ => WORD_BITS,
        }
    }

    /// Floats of one row's folds: [`Isa::fold_lanes`] per block of
    /// [`FOLD_WORDS`] words.
    pub(crate) fn fold_len(self, words: usize) -> usize {
        self.fold_lanes() * words.div_ceil(FOLD_WORDS)
    }

    /// [`row_scale`] compiled for this instruction set.
    fn row_scale(self, row: &[f32]) -> (f32, bool) {
        match self {
            // SAFETY: the CPU feature was detected before this Isa was chosen.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { prepare::row_scale_avx512(row) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { prepare::row_scale_avx2(row) },
            _ => row_scale(row),
        }
    }

    /// [`fold_row`] for this instruction set's lanes, compiled for it.
    fn fold_row(self, row: &[f32], dst: &mut [f32]) {
        match self {
            // SAFETY: the CPU feature was detected before this Isa was chosen.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { prepare::fold_row_avx512(row, dst) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { prepare::fold_row_avx2(row, dst) },
            _ => fold_row::<WORD_BITS>(row, dst),
        }
    }
}

/// Portable signed sums, 32 lanes (lane `j`: bit `j` of each word), which the
/// compiler vectorises.
///
/// With `folds` (rows without infinities): each bit spread to a full-lane
/// mask keeps or drops its activation (AND), so a lane gathers the
/// activations whose bit is set; every block of [`FOLD_WORDS`] words starts
/// by adding the block's fold (minus half its plain sums), so the lanes end
/// at `-(x . S) / 2` and never hold more than about half a block's plain sum:
/// no large sums cancel. Otherwise each bit, as a mask on the sign bit, flips
/// the sign of its activation (XOR), which is added: one more operation per
/// weight, and infinities of both signs meet only where the definition has
/// them meet.
#[inline(always)]
fn signed_sums_portable(
    xs: &[&[f32]],
    folds: Option<&[&[f32]]>,
    bits: &[u32],
    words: usize,
    sums: &mut [f32],
) {
    let count = bits.len() / words;
    for (i, (x, sums)) in xs
        .iter()
        .zip(sums.chunks_exact_mut(count.max(1)))
        .enumerate()
    {
        let Some(fold) = folds.map(|f| f[i]) else {
            for (sum, row) in sums.iter_mut().zip(bits.chunks_exact(words)) {
                let mut acc = [0f32; WORD_BITS];
                for (&word, xw) in row.iter().zip(x.chunks_exact(WORD_BITS)) {
                    let xw: &[f32; WORD_BITS] = xw.try_into().expect("exact chunk");
                    for j in 0..WORD_BITS {
                        let flip = ((word >> j) & 1).wrapping_neg() & 0x8000_0000;
                        acc[j] += f32::from_bits(xw[j].to_bits() ^ flip);
                    }
                }
                *sum = acc.iter().sum();
            }
            continue;
        };
        for (sum, row) in sums.iter_mut().zip(bits.chunks_exact(words)) {
            // Each block in lanes of its own (in registers), folded and
            // summed to one number: nested loops carrying the lanes across
            // blocks would leave them in memory or in scalars.
            let mut total = 0f64;
            let blocks = row
                .chunks(FOLD_WORDS)
                .zip(x.chunks(FOLD_WORDS * WORD_BITS))
                .zip(fold.chunks_exact(WORD_BITS));
            for ((block, xb), h) in blocks {
                let h: &[f32; WORD_BITS] = h.try_into().expect("one block's folds");
                let mut v = masked_block(block, xb);
                for j in 0..WORD_BITS {
                    v[j] += h[j];
                }
                total += tree_sum(v) as f64;
            }
            *sum = (-2.0 * total) as f32;
        }
    }
}

/// `x where bit = 1` summed over one block, lane `j` taking bit `j` of each
/// word.
#[inline(always)]
fn masked_block(bits: &[u32], x: &[f32]) -> [f32; WORD_BITS] {
    let mut acc = [0f32; WORD_BITS];
    for (&word, xw) in bits.iter().zip(x.chunks_exact(WORD_BITS)) {
        let xw: &[f32; WORD_BITS] = xw.try_into().expect("exact chunk");
        for j in 0..WORD_BITS {
            let keep = ((word >> j) & 1).wrapping_neg();
            acc[j] += f32::from_bits(xw[j].to_bits() & keep);
        }
    }
    acc
}

/// The lanes' sum as a tree of halves (vector adds, not 31 scalar ones).
#[inline(always)]
fn tree_sum(mut v: [f32; WORD_BITS]) -> f32 {
    let mut half = WORD_BITS / 2;
    while half > 0 {
        for j in 0..half {
            v[j] += v[j + half];
        }
        half /= 2;
    }
    v[0]
}

/// The AVX2 fold kernel, written out: the portable loop's lanes, compiled
/// with AVX2, would not stay in registers across blocks.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{FOLD_WORDS, WORD_BITS};
    use std::arch::x86_64::*;

    /// `sums[n] = x . S[n]` for each packed row `n` of `bits` (`words` u32
    /// each), a row without infinities: as `signed_sums_portable` with folds,
    /// 32 lanes in 4 vectors, bit `j` moved to the sign position and spread
    /// over lane `j` (shift, arithmetic shift), ANDed with its activation.
    ///
    /// Safety: AVX2 available; `x` holds `words * 32` floats, `fold`
    /// `32 * ceil(words / FOLD_WORDS)`, `bits` `sums.len() * words` words.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn folded_sums(
        x: &[f32],
        fold: &[f32],
        bits: &[u32],
        words: usize,
        sums: &mut [f32],
    ) {
        assert!(x.len() >= words * WORD_BITS && bits.len() == sums.len() * words);
        assert!(fold.len() >= WORD_BITS * words.div_ceil(FOLD_WORDS));
        // Lane j of vector i holds bit 8i + j: shifted left by 31 - (8i + j).
        let shift = |i: i32| {
            let s = 31 - 8 * i;
            _mm256_setr_epi32(s, s - 1, s - 2, s - 3, s - 4, s - 5, s - 6, s - 7)
        };
        let shifts = [shift(0), shift(1), shift(2), shift(3)];
        let (xp, hp) = (x.as_ptr(), fold.as_ptr());
        // Two packed rows at a time: 8 independent sums per word, not 4.
        let mut pairs = sums.chunks_exact_mut(2).zip(bits.chunks_exact(2 * words));
        for (sum, rows) in &mut pairs {
            let (a, b) = rows.split_at(words);
            let s = pass::<2>([a, b], words, xp, hp, &shifts);
            sum.copy_from_slice(&s);
        }
        let done = sums.len() / 2 * 2;
        for (sum, row) in sums[done..]
            .iter_mut()
            .zip(bits[done * words..].chunks_exact(words))
        {
            *sum = pass::<1>([row], words, xp, hp, &shifts)[0];
        }
    }

    /// `x . S` of `F` packed rows in one pass over `x`.
    #[inline]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn pass<const F: usize>(
        rows: [&[u32]; F],
        words: usize,
        xp: *const f32,
        hp: *const f32,
        shifts: &[__m256i; 4],
    ) -> [f32; F] {
        let mut acc = [[_mm256_setzero_ps(); 4]; F];
        for w in 0..words {
            if w % FOLD_WORDS == 0 {
                let h = hp.add(w / FOLD_WORDS * WORD_BITS);
                for i in 0..4 {
                    let h = _mm256_loadu_ps(h.add(8 * i));
                    for f in 0..F {
                        acc[f][i] = _mm256_add_ps(acc[f][i], h);
                    }
                }
            }
            let mut v = [_mm256_setzero_ps(); 4];
            for i in 0..4 {
                v[i] = _mm256_loadu_ps(xp.add(WORD_BITS * w + 8 * i));
            }
            for f in 0..F {
                let b = _mm256_set1_epi32(*rows[f].get_unchecked(w) as i32);
                for i in 0..4 {
                    let keep = _mm256_srai_epi32::<31>(_mm256_sllv_epi32(b, shifts[i]));
                    let kept = _mm256_and_ps(_mm256_castsi256_ps(keep), v[i]);
                    acc[f][i] = _mm256_add_ps(acc[f][i], kept);
                }
            }
        }
        let mut out = [0f32; F];
        for f in 0..F {
            let a = &acc[f];
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let q = _mm_add_ss(q, _mm_shuffle_ps::<1>(q, q));
            out[f] = -2.0 * _mm_cvtss_f32(q);
        }
        out
    }
}

/// The portable loop compiled with AVX2 enabled (variable shifts per lane).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn signed_sums_avx2(
    xs: &[&[f32]],
    folds: Option<&[&[f32]]>,
    bits: &[u32],
    words: usize,
    sums: &mut [f32],
) {
    signed_sums_portable(xs, folds, bits, words, sums)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{FOLD_WORDS, ROW_TILE};
    use std::arch::x86_64::*;

    /// Signed sums of `F` packed rows for `R` activation rows in one pass,
    /// `R * F` accumulators (16 registers), each activation vector loaded once
    /// and used for `F` features, each mask half used for `R` rows.
    ///
    /// `FOLD` (rows without infinities): each half word is the write mask of
    /// one masked add, so an accumulator gathers `sum(x where bit = 1)`; at
    /// the start of every block of [`FOLD_WORDS`] words it takes away half
    /// the block's plain sums (`folds`: per row, minus those halves, 16 lanes
    /// a block). It ends at `-(x . S) / 2` and never holds more than about
    /// half a block's plain sum (what the masked adds take back within the
    /// block): no large sums cancel. One instruction per 16 weights and row,
    /// plus one per block after the first.
    ///
    /// Otherwise (any row with an infinity): each half word becomes a vector
    /// of signs `+-1.0` (one blend), shared by the `R` rows, each of which
    /// adds `x * sign` with one fused multiply-add (an exact product: a signed
    /// add). Infinities of both signs meet only where the definition has
    /// them meet.
    ///
    /// Safety: AVX-512F available; each `x[r]` holds `words * 32` floats and,
    /// with `FOLD`, each `folds[r]` `16 * ceil(words / FOLD_WORDS)`; `bits`
    /// `F * words` words; `out[r * stride + f]` in bounds.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const F: usize, const R: usize, const FOLD: bool>(
        x: [*const f32; R],
        folds: [*const f32; R],
        bits: *const u32,
        words: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); F]; R];
        // The two mask halves straight from memory (little-endian words).
        let half = |f: usize, w: usize| (bits as *const u16).add(2 * (f * words + w));
        if FOLD {
            let mut w0 = 0;
            let mut block = 0;
            while w0 < words {
                for r in 0..R {
                    let h = _mm512_loadu_ps(folds[r].add(16 * block));
                    for f in 0..F {
                        acc[r][f] = if block == 0 {
                            h
                        } else {
                            _mm512_add_ps(acc[r][f], h)
                        };
                    }
                }
                let end = words.min(w0 + FOLD_WORDS);
                for w in w0..end {
                    let mut lo = [_mm512_setzero_ps(); R];
                    let mut hi = [_mm512_setzero_ps(); R];
                    for r in 0..R {
                        lo[r] = _mm512_loadu_ps(x[r].add(w * 32));
                        hi[r] = _mm512_loadu_ps(x[r].add(w * 32 + 16));
                    }
                    for f in 0..F {
                        let (mlo, mhi) = (*half(f, w), *half(f, w).add(1));
                        for r in 0..R {
                            acc[r][f] = _mm512_mask_add_ps(acc[r][f], mlo, acc[r][f], lo[r]);
                            acc[r][f] = _mm512_mask_add_ps(acc[r][f], mhi, acc[r][f], hi[r]);
                        }
                    }
                }
                w0 = end;
                block += 1;
            }
            for r in 0..R {
                for f in 0..F {
                    out[r * stride + f] = -2.0 * _mm512_reduce_add_ps(acc[r][f]);
                }
            }
        } else {
            let plus = _mm512_set1_ps(1.0);
            let minus = _mm512_set1_ps(-1.0);
            for w in 0..words {
                let mut lo = [_mm512_setzero_ps(); R];
                let mut hi = [_mm512_setzero_ps(); R];
                for r in 0..R {
                    lo[r] = _mm512_loadu_ps(x[r].add(w * 32));
                    hi[r] = _mm512_loadu_ps(x[r].add(w * 32 + 16));
                }
                for f in 0..F {
                    let slo = _mm512_mask_blend_ps(*half(f, w), plus, minus);
                    let shi = _mm512_mask_blend_ps(*half(f, w).add(1), plus, minus);
                    for r in 0..R {
                        acc[r][f] = _mm512_fmadd_ps(lo[r], slo, acc[r][f]);
                        acc[r][f] = _mm512_fmadd_ps(hi[r], shi, acc[r][f]);
                    }
                }
            }
            for r in 0..R {
                for f in 0..F {
                    out[r * stride + f] = _mm512_reduce_add_ps(acc[r][f]);
                }
            }
        }
    }

    /// Features `F_BIG, 4, 1` at a time for `R` rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const F_BIG: usize, const R: usize, const FOLD: bool>(
        x: [*const f32; R],
        folds: [*const f32; R],
        bits: &[u32],
        words: usize,
        sums: &mut [f32],
    ) {
        let count = bits.len() / words;
        let bp = bits.as_ptr();
        let mut f = 0;
        while f + F_BIG <= count {
            let out = &mut sums[f..];
            tile::<F_BIG, R, FOLD>(x, folds, bp.add(f * words), words, out, count);
            f += F_BIG;
        }
        while f + 4 <= count {
            tile::<4, R, FOLD>(x, folds, bp.add(f * words), words, &mut sums[f..], count);
            f += 4;
        }
        while f < count {
            tile::<1, R, FOLD>(x, folds, bp.add(f * words), words, &mut sums[f..], count);
            f += 1;
        }
    }

    /// Safety: AVX-512F available; sizes as `Isa::signed_sums` checks them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn signed_sums(
        xs: &[&[f32]],
        folds: Option<&[&[f32]]>,
        bits: &[u32],
        words: usize,
        sums: &mut [f32],
    ) {
        const _: () = assert!(ROW_TILE == 4);
        let p = |i: usize| xs[i].as_ptr();
        let Some(folds) = folds else {
            let z = std::ptr::null();
            match xs.len() {
                4 => rows::<4, 4, false>([p(0), p(1), p(2), p(3)], [z; 4], bits, words, sums),
                3 => rows::<4, 3, false>([p(0), p(1), p(2)], [z; 3], bits, words, sums),
                2 => rows::<8, 2, false>([p(0), p(1)], [z; 2], bits, words, sums),
                1 => rows::<16, 1, false>([p(0)], [z; 1], bits, words, sums),
                _ => {}
            }
            return;
        };
        let h = |i: usize| folds[i].as_ptr();
        match xs.len() {
            4 => rows::<4, 4, true>(
                [p(0), p(1), p(2), p(3)],
                [h(0), h(1), h(2), h(3)],
                bits,
                words,
                sums,
            ),
            3 => rows::<4, 3, true>([p(0), p(1), p(2)], [h(0), h(1), h(2)], bits, words, sums),
            2 => rows::<8, 2, true>([p(0), p(1)], [h(0), h(1)], bits, words, sums),
            1 => rows::<16, 1, true>([p(0)], [h(0)], bits, words, sums),
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
/// whatever they hold, add nothing and nothing past `K` is read). Float32 rows
/// that already fill whole words are borrowed, not copied.
pub(crate) fn padded_rows<F: Float>(x: &[F], rows: usize, cols: usize) -> Cow<'_, [f32]> {
    if cols.is_multiple_of(WORD_BITS) {
        if let Some(xf) = as_f32(x) {
            return Cow::Borrowed(xf);
        }
    }
    let stride = words_per_row(cols) * WORD_BITS;
    let mut padded = vec![0f32; rows * stride];
    if cols > 0 {
        for (dst, src) in padded.chunks_exact_mut(stride).zip(x.chunks_exact(cols)) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
    }
    Cow::Owned(padded)
}

/// Rows whose largest finite `|x|` times their length stays below this are
/// summed as they are: no partial sum of theirs (at most `sum |x|`) can come
/// near float32's range, nor `alpha *` one for any sane scale.
const SUM_BOUND: f64 = (1u128 << 100) as f64;
/// A larger row is scaled by a power of two that brings that bound to this.
const SCALED_BOUND_LOG2: i32 = 64;
/// Words per block of the AVX-512 fold kernel (see `avx512::tile`): its
/// accumulators never hold more than about half one block's plain sum, 16
/// words (512 inputs, 32 per lane) keeping its rounding at that of the plain
/// signed sum (measured: float32 dense matmul's, for x ~ N(10, 1) and
/// N(1000, 1), K up to 65536) for one extra add per 512 weights.
pub(crate) const FOLD_WORDS: usize = 16;

/// The factor that undoes the power of two a row is multiplied by before it
/// is summed (1 for any row of realistic activations), and whether it holds
/// an infinity. The bound `max finite |x| * len` on its partial sums is
/// brought from above [`SUM_BOUND`] down to about `2^SCALED_BOUND_LOG2`, so a
/// sign sum cannot overflow where the delta's output is finite. Infinities
/// and NaN are left out of the bound (scaling keeps them as they are).
#[inline(always)]
fn row_scale(row: &[f32]) -> (f32, bool) {
    let mut top = abs_bits_max(row);
    let mut has_inf = false;
    if top >= 0x7f80_0000 {
        // An infinity or a NaN (rare): whether there is an infinity, and the
        // largest finite |x|.
        has_inf = row.iter().any(|v| v.is_infinite());
        top = row
            .iter()
            .map(|v| v.to_bits() & 0x7fff_ffff)
            .filter(|&a| a < 0x7f80_0000)
            .max()
            .unwrap_or(0);
    }
    let bound = f32::from_bits(top) as f64 * row.len() as f64;
    if bound < SUM_BOUND {
        return (1.0, has_inf);
    }
    // 2^100 <= bound < 2^128 * 2^61 (a slice of f32 has fewer than 2^61
    // elements), so 36 <= e <= 125: 2^e and 2^-e are normal floats.
    let e = bound.log2().ceil() as i32 - SCALED_BOUND_LOG2;
    (f32::from_bits(((127 + e) as u32) << 23), has_inf)
}

/// The largest `|x|` of a row as bits (those of non-negative floats are in
/// their numeric order; an infinity's, then a NaN's, above every finite
/// one). Below the sign bit the bits compare the same as i32, whose max
/// vectorises in 8 independent lanes even on baseline x86-64.
#[inline(always)]
fn abs_bits_max(row: &[f32]) -> u32 {
    let abs = |v: &f32| (v.to_bits() & 0x7fff_ffff) as i32;
    let mut lanes = [0i32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = (*m).max(abs(v));
        }
    }
    let top = rest.iter().map(abs).fold(0, i32::max);
    lanes.into_iter().fold(top, i32::max) as u32
}

/// A row's folds for `LANES`-lane accumulators (`dst`: `LANES` per block of
/// [`FOLD_WORDS`] words): minus half the block's plain sums, lane `j` taking
/// input `32w + j` and, for 16 lanes, `32w + 16 + j` of each word. Summed in
/// f64, rounded once.
#[inline(always)]
fn fold_row<const LANES: usize>(row: &[f32], dst: &mut [f32]) {
    for (block, dst) in row
        .chunks(FOLD_WORDS * WORD_BITS)
        .zip(dst.chunks_exact_mut(LANES))
    {
        let mut acc = [0f64; WORD_BITS];
        for word in block.chunks_exact(WORD_BITS) {
            let word: &[f32; WORD_BITS] = word.try_into().expect("exact chunk");
            for j in 0..WORD_BITS {
                acc[j] += word[j] as f64;
            }
        }
        for (j, d) in dst.iter_mut().enumerate() {
            let sum = if LANES == 16 {
                acc[j] + acc[j + 16]
            } else {
                acc[j]
            };
            *d = (-0.5 * sum) as f32;
        }
    }
}

/// The preparation of rows compiled with the vector instructions the kernel
/// uses (baseline x86-64 has neither a 32-bit integer max nor wide f64).
#[cfg(target_arch = "x86_64")]
mod prepare {
    use super::{fold_row, row_scale, WORD_BITS};

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_scale_avx512(row: &[f32]) -> (f32, bool) {
        row_scale(row)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row_scale_avx2(row: &[f32]) -> (f32, bool) {
        row_scale(row)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fold_row_avx512(row: &[f32], dst: &mut [f32]) {
        fold_row::<16>(row, dst)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn fold_row_avx2(row: &[f32], dst: &mut [f32]) {
        fold_row::<WORD_BITS>(row, dst)
    }
}

/// A call's activation rows as the signed-sum kernels read them: padded to
/// whole words ([`padded_rows`]); each with the factor its results are
/// multiplied by afterwards (1 but for the rows [`row_scale`] scales: those
/// are copied and divided by that power of two, exactly but for values that
/// would become subnormal: those, about `K * 2^-190` of the row's largest, are
/// flushed to zero, far below the rounding of the sums, as subnormal
/// arithmetic is slow); and, for AVX-512, each row's folds: minus half its
/// plain sums over each block of [`FOLD_WORDS`] words, 16 lanes (lane `j`:
/// inputs `32w + j` and `32w + 16 + j` of the block's words), summed in f64
/// and rounded once. A row with an infinity has no folds: it takes the
/// exact kernel.
pub(crate) struct SignRows<'a> {
    xs: Cow<'a, [f32]>,
    stride: usize,
    /// Per row, what multiplies its results back.
    pub(crate) unscale: Vec<f32>,
    /// `[rows, fold_len]`, those of a row that is not `foldable` unset.
    folds: Vec<f32>,
    foldable: Vec<bool>,
    fold_len: usize,
}

impl<'a> SignRows<'a> {
    pub(crate) fn new<F: Float>(isa: Isa, x: &'a [F], rows: usize, cols: usize) -> Self {
        let mut xs = padded_rows(x, rows, cols);
        let words = words_per_row(cols);
        let stride = words * WORD_BITS;
        let (unscale, has_inf): (Vec<f32>, Vec<bool>) = if stride == 0 {
            (vec![1.0; rows], vec![false; rows])
        } else {
            xs.chunks_exact(stride).map(|r| isa.row_scale(r)).unzip()
        };
        if unscale.iter().any(|&u| u != 1.0) {
            for (row, &u) in xs.to_mut().chunks_exact_mut(stride).zip(&unscale) {
                if u != 1.0 {
                    let s = 1.0 / u; // exact: a power of two
                    for v in row {
                        let scaled = *v * s;
                        *v = if scaled.abs() < f32::MIN_POSITIVE {
                            0.0
                        } else {
                            scaled
                        };
                    }
                }
            }
        }
        let mut foldable = has_inf;
        foldable.iter_mut().for_each(|f| *f = !*f);
        let fold_len = isa.fold_len(words);
        let mut folds = vec![0f32; rows * fold_len];
        if fold_len > 0 {
            for ((row, dst), _) in xs
                .chunks_exact(stride)
                .zip(folds.chunks_exact_mut(fold_len))
                .zip(&foldable)
                .filter(|(_, &ok)| ok)
            {
                isa.fold_row(row, dst);
            }
        }
        SignRows {
            xs,
            stride,
            unscale,
            folds,
            foldable,
            fold_len,
        }
    }

    /// Row `r`, `stride` floats.
    pub(crate) fn row(&self, r: usize) -> &[f32] {
        &self.xs[r * self.stride..(r + 1) * self.stride]
    }

    /// Row `r`'s folds, for the fold kernel (None: the exact kernel).
    pub(crate) fn fold(&self, r: usize) -> Option<&[f32]> {
        self.foldable[r].then(|| &self.folds[r * self.fold_len..(r + 1) * self.fold_len])
    }
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
    let xs = SignRows::new(isa, x, rows, k);
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
                    let mut folds: [&[f32]; ROW_TILE] = [&[]; ROW_TILE];
                    let mut fold = true;
                    for ((slot, h), &r) in x_tile.iter_mut().zip(&mut folds).zip(tile_rows) {
                        *slot = xs.row(r);
                        match xs.fold(r) {
                            Some(f) => *h = f,
                            None => fold = false,
                        }
                    }
                    let m = tile_rows.len();
                    let sums = &mut sums[..m * count];
                    let folds = fold.then_some(&folds[..m]);
                    isa.signed_sums(&x_tile[..m], folds, bits, words, sums);
                    for (&r, sums) in tile_rows.iter().zip(sums.chunks_exact(count)) {
                        for (j, &dot) in sums.iter().enumerate() {
                            let alpha = match stack.mode {
                                ScaleMode::Matrix => scales[0],
                                ScaleMode::Row => scales[n0 + j],
                            };
                            dst[j * rows + r] += alpha * dot;
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
        let unscale = xs.unscale[r];
        for (j, v) in y.iter_mut().enumerate() {
            *v += result_t[j * rows + r] * unscale;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// `got` equals the definition `want` (f64, IEEE: NaN only where
    /// infinities of both signs meet): the same NaN / infinity, else within
    /// `rel` of `scale`.
    pub(crate) fn assert_like(got: &[f32], want: &[f64], scale: &[f64], rel: f64, what: &str) {
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            let ok = if w.is_nan() {
                g.is_nan()
            } else if w.is_infinite() {
                g as f64 == w
            } else {
                g.is_finite() && (g as f64 - w).abs() <= rel * s + 1e-30
            };
            assert!(ok, "{what}: index {i}: got {g}, want {w} (scale {s})");
        }
    }

    /// Per output, `sum_p |alpha| * sum_k |x|` over the finite x: what the
    /// rounding of that output scales with.
    pub(crate) fn magnitudes(
        x: &[f32],
        rows: usize,
        stack: &DeltaStack<'_>,
        ids: &[i64],
    ) -> Vec<f64> {
        let abs: Vec<f32> = x
            .iter()
            .map(|v| if v.is_finite() { v.abs() } else { 0.0 })
            .collect();
        let n = stack.shape.out_features;
        let plus = vec![0u32; stack.planes.len()]; // every sign +1
        let scales: Vec<f32> = stack.scales.iter().map(|s| s.abs()).collect();
        let all_plus = DeltaStack {
            planes: &plus,
            scales: &scales,
            ..*stack
        };
        let m = naive(&abs, rows, &all_plus, ids, stack.shape.planes);
        assert_eq!(m.len(), rows * n);
        m
    }

    #[test]
    fn infinities_meet_only_where_the_definition_has_them_meet() {
        // Rows: +inf, -inf, both, NaN, finite, +inf twice; each tile of 4 rows
        // mixes rows with and without infinities (the kernels differ).
        let shape = stack_shape(2, 2, 37, 70);
        let rows = 6;
        for isa in isas() {
            for mode in [ScaleMode::Matrix, ScaleMode::Row] {
                let mut rng = Lcg(21);
                let (planes, scales) = random_stack(&mut rng, shape, mode, false);
                let stack = stack(&planes, &scales, mode, shape);
                let mut x: Vec<f32> = (0..rows * 70).map(|_| rng.unit() + 0.5).collect();
                x[3] = f32::INFINITY;
                x[70 + 69] = f32::NEG_INFINITY;
                x[140 + 5] = f32::INFINITY;
                x[140 + 40] = f32::NEG_INFINITY;
                x[210 + 33] = f32::NAN;
                x[350 + 1] = f32::INFINITY;
                x[350 + 64] = f32::INFINITY;
                let ids = [0i64, 1, 0, 1, 0, 0];
                let want = naive(&x, rows, &stack, &ids, 2);
                let scale = magnitudes(&x, rows, &stack, &ids);
                for parallel_from in [usize::MAX, 0] {
                    let mut out = vec![0f32; rows * 37];
                    delta_matmul_with(
                        isa,
                        parallel_from,
                        &x,
                        rows,
                        &stack,
                        &ids,
                        None,
                        &mut out,
                        false,
                    )
                    .unwrap();
                    assert_like(&out, &want, &scale, 1e-6, &format!("{isa:?} {mode:?}"));
                }
                // The finite row is what it is without the others.
                let mut alone = vec![0f32; 37];
                delta_matmul_on(isa, &x[280..350], 1, &stack, &[0], None, &mut alone, false)
                    .unwrap();
                assert_like(
                    &alone,
                    &want[4 * 37..5 * 37],
                    &scale[4 * 37..],
                    1e-6,
                    "alone",
                );
            }
        }
    }

    #[test]
    fn huge_activations_stay_finite_where_the_delta_is() {
        // x . S itself overflows float32 (64 * 1e37) while alpha * x . S does
        // not; 2 * x (3e38) overflows too. Also tiny values beside huge ones.
        let shape = stack_shape(1, 1, 5, 64);
        let mut planes = vec![0u32; 5 * 2]; // feature 0: all +1
        planes[2..4].fill(u32::MAX); // feature 1: all -1
        planes[4] = 0x5555_5555; // feature 2: alternating
        planes[5] = 0x5555_5555;
        planes[6] = 1; // feature 3: -1 at input 0
        planes[8] = 0xffff_fffe; // feature 4: -1 but at input 0
        planes[9] = u32::MAX;
        let scales = [0.01f32];
        let stack = stack(&planes, &scales, ScaleMode::Matrix, shape);
        let mut cases: Vec<Vec<f32>> = vec![
            vec![1e37; 64],
            vec![-3e38; 64],
            (0..64)
                .map(|i| if i % 2 == 0 { 3e38 } else { 1e-30 })
                .collect(),
        ];
        let mut one = vec![0f32; 64];
        one[0] = 3e38;
        one[1] = -3.3e38;
        cases.push(one);
        for isa in isas() {
            for x in &cases {
                let want = naive(x, 1, &stack, &[0], 1);
                let mut out = vec![0f32; 5];
                delta_matmul_on(isa, x, 1, &stack, &[0], None, &mut out, false).unwrap();
                let scale = magnitudes(x, 1, &stack, &[0]);
                assert_like(&out, &want, &scale, 1e-6, &format!("{isa:?} x[0]={}", x[0]));
            }
            // float16 / bfloat16 inputs: bfloat16 reaches float32's range.
            let xb: Vec<bf16> = cases[0].iter().map(|&v| bf16::from_f32(v)).collect();
            let xr: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let mut out = vec![0f32; 5];
            delta_matmul_on(isa, &xb, 1, &stack, &[0], None, &mut out, false).unwrap();
            let scale = magnitudes(&xr, 1, &stack, &[0]);
            assert_like(&out, &naive(&xr, 1, &stack, &[0], 1), &scale, 1e-6, "bf16");
        }
    }

    #[test]
    fn a_non_zero_mean_costs_no_accuracy() {
        // x ~ 10 + U(-1, 1): x . S is a random walk of ~sqrt(K) * 10 while
        // sum(x) is K * 10; a kernel that subtracts two such sums loses about
        // log2(sqrt(K)) bits (3e-6 of max |y| here, float32 dense: 3e-7).
        let shape = stack_shape(1, 1, 64, 4096);
        let mut rng = Lcg(9);
        let (planes, scales) = random_stack(&mut rng, shape, ScaleMode::Matrix, false);
        let stack = stack(&planes, &scales, ScaleMode::Matrix, shape);
        let rows = 5;
        let x: Vec<f32> = (0..rows * 4096).map(|_| 10.0 + rng.unit()).collect();
        let ids = [0i64; 5];
        let want = naive(&x, rows, &stack, &ids, 1);
        let top = want.iter().fold(0f64, |m, w| m.max(w.abs()));
        for isa in isas() {
            let mut out = vec![0f32; rows * 64];
            delta_matmul_on(isa, &x, rows, &stack, &ids, None, &mut out, false).unwrap();
            let err = out
                .iter()
                .zip(&want)
                .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
            assert!(err <= 1e-6 * top, "{isa:?}: error {err} of max |y| {top}");
        }
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
