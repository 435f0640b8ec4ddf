//! Sign bit-planes: the one packing layout every kernel in qdelta shares.
//!
//! Layout (docs/FORMAT.md, "Bit layout"):
//! - a matrix `[rows, cols]` packs along `cols` (the input / reduction axis)
//!   into `words = ceil(cols / 32)` little-endian `u32` words per row;
//! - bit `j` of word `w` (LSB first) holds column `32 * w + j`;
//! - bit = 1 means the value is negative (it *is* the IEEE-754 sign bit, so
//!   -0.0 packs as 1 and +0.0 as 0), i.e. it decodes to -1; bit = 0 decodes to +1;
//! - the padding bits of a ragged last word are 0 and readers ignore them.
//!
//! k-bit residual planes stack `k` such matrices, plane-major: `[k, rows, words]`.

use rayon::prelude::*;

use crate::error::{checked_mul, Error, Result};
use crate::float::Float;
use crate::pool;

pub const WORD_BITS: usize = 32;
/// Rows handed to one rayon task at least; keeps small matrices single-threaded.
const MIN_ROWS_PER_TASK: usize = 16;
/// The most residual planes a delta may have.
pub const MAX_PLANES: usize = 32;

/// Packed words per row for `cols` columns.
pub fn words_per_row(cols: usize) -> usize {
    cols.div_ceil(WORD_BITS)
}

/// How scales are shared: one per plane, or one per (plane, row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleMode {
    Matrix,
    Row,
}

impl ScaleMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "matrix" => Ok(ScaleMode::Matrix),
            "row" => Ok(ScaleMode::Row),
            other => Err(Error::Value(format!(
                "scale granularity: expected \"matrix\" or \"row\", found {other:?}"
            ))),
        }
    }
    /// Scales per plane for a matrix of `rows` rows.
    pub fn per_plane(self, rows: usize) -> usize {
        match self {
            ScaleMode::Matrix => 1,
            ScaleMode::Row => rows,
        }
    }
}

/// Checks a `[rows, cols]` matrix description against its buffer length.
fn check_matrix(len: usize, rows: usize, cols: usize, what: &str) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::Shape(format!(
            "{what}: expected a non-empty 2-D matrix, found shape [{rows}, {cols}]"
        )));
    }
    let n = checked_mul(rows, cols, what)?;
    if n != len {
        return Err(Error::Shape(format!(
            "{what}: shape [{rows}, {cols}] needs {n} elements, found {len}"
        )));
    }
    Ok(())
}

/// Checks a packed buffer holds `planes` planes of a `[rows, cols]` matrix.
pub fn check_packed(len: usize, planes: usize, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::Shape(format!(
            "packed planes: expected a non-empty target shape, found [{rows}, {cols}]"
        )));
    }
    let per_plane = checked_mul(rows, words_per_row(cols), "packed planes")?;
    let need = checked_mul(per_plane, planes, "packed planes")?;
    if len != need {
        return Err(Error::Shape(format!(
            "packed planes: shape [{rows}, {cols}] with {planes} plane(s) needs {need} u32 words \
             ({} per row), found {len}",
            words_per_row(cols)
        )));
    }
    Ok(())
}

#[inline(always)]
fn pack_word<T: Float>(chunk: &[T]) -> (u32, bool) {
    let mut word = 0u32;
    let mut finite = true;
    for (j, v) in chunk.iter().enumerate() {
        word |= v.sign_bit() << j;
        finite &= v.is_finite_value();
    }
    (word, finite)
}

/// Packs one row; returns the column of the first NaN/Inf, if any.
fn pack_row<T: Float>(src: &[T], dst: &mut [u32]) -> Option<usize> {
    let mut finite = true;
    let full = src.chunks_exact(WORD_BITS);
    let tail = full.remainder();
    for (w, chunk) in dst.iter_mut().zip(full) {
        // Fixed-size view lets the compiler unroll and vectorise the word.
        let chunk: &[T; WORD_BITS] = chunk.try_into().expect("exact chunk");
        let (word, ok) = pack_word(chunk);
        *w = word;
        finite &= ok;
    }
    if !tail.is_empty() {
        let (word, ok) = pack_word(tail);
        dst[dst.len() - 1] = word;
        finite &= ok;
    }
    if finite {
        None
    } else {
        src.iter().position(|v| !v.is_finite_value())
    }
}

fn non_finite_error<T: Float>(what: &str, row: usize, col: usize, value: T) -> Error {
    Error::NonFinite(format!(
        "{what}: expected finite values, found {} at [{row}, {col}] ({})",
        value.to_f32(),
        T::NAME
    ))
}

/// Packs the signs of a row-major `[rows, cols]` matrix into `[rows, words]`.
pub fn pack_signs<T: Float>(data: &[T], rows: usize, cols: usize) -> Result<Vec<u32>> {
    check_matrix(data.len(), rows, cols, "pack_signs")?;
    let words = words_per_row(cols);
    let mut out = vec![0u32; rows * words];
    // On the crate's pool, not rayon's global one: see `pool` (fork).
    let bad = pool::install(|| {
        out.par_chunks_mut(words)
            .zip(data.par_chunks(cols))
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .find_map_first(|(r, (dst, src))| pack_row(src, dst).map(|c| (r, c)))
    });
    if let Some((r, c)) = bad {
        return Err(non_finite_error("pack_signs", r, c, data[r * cols + c]));
    }
    Ok(out)
}

/// `dst[c] = pos` where bit c is 0, `neg` where it is 1; word at a time so
/// the 32-lane inner loop vectorises.
#[inline]
fn select_row<T: Copy>(src: &[u32], dst: &mut [T], pos: T, neg: T) {
    let last_word = dst.len() / WORD_BITS;
    let mut full = dst.chunks_exact_mut(WORD_BITS);
    for (lane, &w) in (&mut full).zip(src) {
        for (j, v) in lane.iter_mut().enumerate() {
            *v = if (w >> j) & 1 == 0 { pos } else { neg };
        }
    }
    let tail = full.into_remainder();
    if let Some(&w) = src.get(last_word) {
        for (j, v) in tail.iter_mut().enumerate() {
            *v = if (w >> j) & 1 == 0 { pos } else { neg };
        }
    }
}

/// `acc[c] += a` where bit c is 0, `-a` where it is 1.
#[inline]
fn add_row(src: &[u32], acc: &mut [f32], a: f32) {
    let last_word = acc.len() / WORD_BITS;
    let mut full = acc.chunks_exact_mut(WORD_BITS);
    for (lane, &w) in (&mut full).zip(src) {
        for (j, v) in lane.iter_mut().enumerate() {
            *v += if (w >> j) & 1 == 0 { a } else { -a };
        }
    }
    let tail = full.into_remainder();
    if let Some(&w) = src.get(last_word) {
        for (j, v) in tail.iter_mut().enumerate() {
            *v += if (w >> j) & 1 == 0 { a } else { -a };
        }
    }
}

/// Decodes one plane to +-1 as `i8` (the plain view of the signs).
pub fn unpack_signs(packed: &[u32], rows: usize, cols: usize) -> Result<Vec<i8>> {
    check_packed(packed.len(), 1, rows, cols)?;
    let words = words_per_row(cols);
    let mut out = vec![0i8; rows * cols];
    // On the crate's pool, not rayon's global one: see `pool` (fork).
    pool::install(|| {
        out.par_chunks_mut(cols)
            .zip(packed.par_chunks(words))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(dst, src)| select_row(src, dst, 1i8, -1i8))
    });
    Ok(out)
}

/// Checks the scales buffer for `planes` planes of `rows` rows.
fn check_scales(scales: &[f32], planes: usize, rows: usize, mode: ScaleMode) -> Result<()> {
    let need = planes * mode.per_plane(rows);
    if scales.len() != need {
        let layout = match mode {
            ScaleMode::Matrix => format!("[{planes}] (one per plane)"),
            ScaleMode::Row => format!("[{planes}, {rows}] (one per plane and row)"),
        };
        return Err(Error::Shape(format!(
            "scales: expected {need} values laid out as {layout}, found {}",
            scales.len()
        )));
    }
    if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
        return Err(Error::NonFinite(format!(
            "scales: expected finite values, found {} at index {i}",
            scales[i]
        )));
    }
    Ok(())
}

/// Reconstructs `sum_{p < use_planes} alpha_p * S_p` as a dense `[rows, cols]`
/// matrix of `T`. `planes` is `[n_planes, rows, words]`, `scales` is
/// `[n_planes]` (matrix) or `[n_planes, rows]` (row).
#[allow(clippy::too_many_arguments)]
pub fn unpack_planes<T: Float>(
    planes: &[u32],
    n_planes: usize,
    use_planes: usize,
    scales: &[f32],
    mode: ScaleMode,
    rows: usize,
    cols: usize,
) -> Result<Vec<T>> {
    if n_planes == 0 || n_planes > MAX_PLANES {
        return Err(Error::Shape(format!(
            "packed planes: expected 1..={MAX_PLANES} planes, found {n_planes}"
        )));
    }
    if use_planes == 0 || use_planes > n_planes {
        return Err(Error::Value(format!(
            "bits: expected 1..={n_planes} (the planes stored), found {use_planes}"
        )));
    }
    check_packed(planes.len(), n_planes, rows, cols)?;
    check_scales(scales, n_planes, rows, mode)?;
    let words = words_per_row(cols);
    let plane_len = rows * words;
    let per_plane = mode.per_plane(rows);
    let scale = |p: usize, r: usize| match mode {
        ScaleMode::Matrix => scales[p],
        ScaleMode::Row => scales[p * per_plane + r],
    };
    let mut out = vec![T::from_f32(0.0); rows * cols];
    // On the crate's pool, not rayon's global one: see `pool` (fork).
    pool::install(|| {
        out.par_chunks_mut(cols)
            .enumerate()
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each_init(
                || vec![0f32; cols],
                |acc, (r, dst)| {
                    if use_planes == 1 {
                        // One plane: each output is one of two values; pick, no math.
                        let a = scale(0, r);
                        let src = &planes[r * words..(r + 1) * words];
                        select_row(src, dst, T::from_f32(a), T::from_f32(-a));
                        return;
                    }
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    for p in 0..use_planes {
                        let a = scale(p, r);
                        let src =
                            &planes[p * plane_len + r * words..p * plane_len + (r + 1) * words];
                        add_row(src, acc, a);
                    }
                    for (d, a) in dst.iter_mut().zip(acc.iter()) {
                        *d = T::from_f32(*a);
                    }
                },
            )
    });
    check_in_range(&out, use_planes, scales, mode, rows, cols)?;
    Ok(out)
}

/// A reconstruction past `T`'s range (float16 tops out at 65504) would come back
/// as +-inf without a word. No value can pass the largest row's `sum |scale|`, so
/// the output is scanned only when that bound itself does not fit `T`.
fn check_in_range<T: Float>(
    out: &[T],
    use_planes: usize,
    scales: &[f32],
    mode: ScaleMode,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let per_plane = mode.per_plane(rows);
    let bound = (0..per_plane)
        .map(|r| {
            (0..use_planes)
                .map(|p| f64::from(scales[p * per_plane + r].abs()))
                .sum::<f64>()
        })
        .fold(0.0f64, f64::max);
    if bound <= f64::from(f32::MAX) && T::from_f32(bound as f32).is_finite_value() {
        return Ok(());
    }
    match out.iter().position(|v| !v.is_finite_value()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite(format!(
            "unpack: expected values within {}'s range, found one that overflows it at \
             [{}, {}] (the planes' scales sum to {bound:.6e} there at most); unpack to \
             float32",
            T::NAME,
            i / cols.max(1),
            i % cols.max(1)
        ))),
    }
}

/// Greedy residual binarisation: R0 = delta; for p in 1..=bits:
/// alpha_p = mean|R_{p-1}| (over the matrix or per row), S_p = sign(R_{p-1}),
/// R_p = R_{p-1} - alpha_p * S_p. Returns (planes `[bits, rows, words]`,
/// scales `[bits]` or `[bits, rows]`).
pub fn pack_residual<T: Float>(
    data: &[T],
    rows: usize,
    cols: usize,
    bits: usize,
    mode: ScaleMode,
) -> Result<(Vec<u32>, Vec<f32>)> {
    check_matrix(data.len(), rows, cols, "pack_residual")?;
    if bits == 0 || bits > MAX_PLANES {
        return Err(Error::Value(format!(
            "bits: expected 1..={MAX_PLANES} residual planes, found {bits}"
        )));
    }
    // On the crate's pool, not rayon's global one: see `pool` (fork). One
    // install for the whole pass, whose parallel steps all run on it.
    pool::install(|| {
        if let Some(i) = data.par_iter().position_first(|v| !v.is_finite_value()) {
            return Err(non_finite_error(
                "pack_residual",
                i / cols,
                i % cols,
                data[i],
            ));
        }
        let words = words_per_row(cols);
        let plane_len = rows * words;
        let mut residual: Vec<f32> = data.par_iter().map(|v| v.to_f32()).collect();
        let mut planes = vec![0u32; bits * plane_len];
        let per_plane = mode.per_plane(rows);
        let mut scales = vec![0f32; bits * per_plane];

        for (plane, plane_scales) in planes
            .chunks_mut(plane_len)
            .zip(scales.chunks_mut(per_plane))
        {
            // Row sums of |R| in f64 so large matrices do not lose the mean.
            let row_abs: Vec<f64> = residual
                .par_chunks(cols)
                .map(|row| row.iter().map(|v| v.abs() as f64).sum())
                .collect();
            match mode {
                ScaleMode::Matrix => {
                    plane_scales[0] = (row_abs.iter().sum::<f64>() / (rows * cols) as f64) as f32
                }
                ScaleMode::Row => {
                    for (s, sum) in plane_scales.iter_mut().zip(&row_abs) {
                        *s = (sum / cols as f64) as f32;
                    }
                }
            }
            let plane_scales = &*plane_scales;
            residual
                .par_chunks_mut(cols)
                .zip(plane.par_chunks_mut(words))
                .enumerate()
                .with_min_len(MIN_ROWS_PER_TASK)
                .for_each(|(r, (res, dst))| {
                    pack_row(res, dst);
                    let a = plane_scales[if mode == ScaleMode::Row { r } else { 0 }];
                    for v in res.iter_mut() {
                        // Same sign rule as the packed bit: sign bit set -> -1.
                        *v -= if v.is_sign_negative() { -a } else { a };
                    }
                });
        }
        Ok((planes, scales))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn unpacking_past_the_dtypes_range_is_an_error_not_inf() {
        let (rows, cols) = (3, 40); // 2 words a row, a ragged tail
        let words = words_per_row(cols);
        let plus = vec![0u32; rows * words]; // sign bit 0: +alpha
        let err = unpack_planes::<f16>(&plus, 1, 1, &[7e4], ScaleMode::Matrix, rows, cols);
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("float16's range") && msg.contains("[0, 0]"), "{msg}");
        // The same scale fits float32 and bfloat16.
        assert!(unpack_planes::<f32>(&plus, 1, 1, &[7e4], ScaleMode::Matrix, rows, cols).is_ok());
        assert!(unpack_planes::<bf16>(&plus, 1, 1, &[7e4], ScaleMode::Matrix, rows, cols).is_ok());
        // Two planes whose scales pass the range but cancel: every value fits.
        let mut both = plus.clone();
        both.extend(vec![u32::MAX; rows * words]);
        let out =
            unpack_planes::<f16>(&both, 2, 2, &[4e4, 4e4], ScaleMode::Matrix, rows, cols).unwrap();
        assert!(out.iter().all(|v| v.to_f32() == 0.0));
        // Row scales: only row 2 overflows, and the error names it.
        let scales = [1.0, 2.0, 7e4];
        let err = unpack_planes::<f16>(&plus, 1, 1, &scales, ScaleMode::Row, rows, cols);
        assert!(err.unwrap_err().to_string().contains("at [2, 0]"));
    }

    /// Deterministic pseudo-random values in [-1, 1) (xorshift; no rand crate).
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn naive_pack(data: &[f32], rows: usize, cols: usize) -> Vec<u32> {
        let words = words_per_row(cols);
        let mut out = vec![0u32; rows * words];
        for r in 0..rows {
            for c in 0..cols {
                if data[r * cols + c].is_sign_negative() {
                    out[r * words + c / 32] |= 1 << (c % 32);
                }
            }
        }
        out
    }

    #[test]
    fn pack_matches_naive_on_ragged_shapes() {
        for &(rows, cols) in &[
            (1, 1),
            (1, 31),
            (3, 32),
            (5, 33),
            (7, 100),
            (64, 65),
            (17, 1),
        ] {
            let data = random(rows * cols, (rows * 1000 + cols) as u64);
            assert_eq!(
                pack_signs(&data, rows, cols).unwrap(),
                naive_pack(&data, rows, cols)
            );
        }
    }

    #[test]
    fn half_types_pack_like_f32() {
        let (rows, cols) = (9, 77);
        let data = random(rows * cols, 7);
        let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        let b: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        let want = naive_pack(&data, rows, cols);
        assert_eq!(pack_signs(&h, rows, cols).unwrap(), want);
        assert_eq!(pack_signs(&b, rows, cols).unwrap(), want);
    }

    #[test]
    fn zero_signs_follow_the_sign_bit() {
        let packed = pack_signs(&[0.0f32, -0.0, 1.0, -1.0], 1, 4).unwrap();
        assert_eq!(packed, vec![0b1010]);
        assert_eq!(unpack_signs(&packed, 1, 4).unwrap(), vec![1, -1, 1, -1]);
    }

    #[test]
    fn padding_bits_stay_zero() {
        let data = vec![-1.0f32; 33];
        let packed = pack_signs(&data, 1, 33).unwrap();
        assert_eq!(packed, vec![u32::MAX, 1]);
    }

    #[test]
    fn non_finite_is_an_error_with_position() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut data = random(4 * 40, 3);
            data[2 * 40 + 35] = bad;
            let err = pack_signs(&data, 4, 40).unwrap_err();
            assert!(matches!(err, Error::NonFinite(_)));
            assert!(err.to_string().contains("[2, 35]"), "{err}");
            assert!(pack_residual(&data, 4, 40, 2, ScaleMode::Matrix).is_err());
        }
    }

    #[test]
    fn shape_errors_say_expected_and_found() {
        let err = pack_signs(&[1.0f32; 5], 2, 3).unwrap_err().to_string();
        assert!(err.contains("needs 6") && err.contains("found 5"), "{err}");
        assert!(pack_signs::<f32>(&[], 0, 3).is_err());
        assert!(unpack_signs(&[0u32; 3], 2, 33).is_err());
        assert!(pack_signs(&[1.0f32], usize::MAX, 2).is_err());
    }

    #[test]
    fn unpack_scaled_round_trip() {
        let (rows, cols) = (6, 70);
        let data = random(rows * cols, 11);
        let packed = pack_signs(&data, rows, cols).unwrap();
        let dense: Vec<f32> =
            unpack_planes(&packed, 1, 1, &[0.5], ScaleMode::Matrix, rows, cols).unwrap();
        for (d, x) in dense.iter().zip(&data) {
            assert_eq!(*d, if x.is_sign_negative() { -0.5 } else { 0.5 });
        }
        let wrong = unpack_planes::<f32>(&packed, 1, 1, &[0.5, 0.5], ScaleMode::Matrix, rows, cols);
        assert!(matches!(wrong, Err(Error::Shape(_))));
    }

    fn error_norm(data: &[f32], approx: &[f32]) -> f64 {
        data.iter()
            .zip(approx)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn residual_error_falls_with_more_planes() {
        let (rows, cols) = (32, 96);
        let data = random(rows * cols, 5);
        for mode in [ScaleMode::Matrix, ScaleMode::Row] {
            let (planes, scales) = pack_residual(&data, rows, cols, 4, mode).unwrap();
            let mut last = f64::INFINITY;
            for k in 1..=4 {
                let approx: Vec<f32> =
                    unpack_planes(&planes, 4, k, &scales, mode, rows, cols).unwrap();
                let err = error_norm(&data, &approx);
                assert!(
                    err < last,
                    "{mode:?}: k={k} error {err} did not fall below {last}"
                );
                last = err;
            }
        }
    }

    #[test]
    fn first_residual_plane_is_bitdelta() {
        let (rows, cols) = (8, 40);
        let data = random(rows * cols, 9);
        let (planes, scales) = pack_residual(&data, rows, cols, 1, ScaleMode::Matrix).unwrap();
        assert_eq!(planes, pack_signs(&data, rows, cols).unwrap());
        let mean = data.iter().map(|v| v.abs() as f64).sum::<f64>() / data.len() as f64;
        assert!((scales[0] as f64 - mean).abs() < 1e-6);
    }
}
