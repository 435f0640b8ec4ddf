//! RMSNorm with a weight per group of rows, for a mixed decode batch whose
//! sequences each carry their tenant's norm weight:
//!
//! `y[r] = w[r / s] * (x[r] / sqrt(mean(x[r]^2) + eps))`, `s` rows per weight.
//!
//! LlamaRMSNorm's formula in float32 (the mean of squares is summed in f64,
//! then rounded). One call instead of the half-dozen tensor ops of the torch
//! form, which at decode sizes cost far more than their arithmetic.

use crate::error::{Error, Result};

/// The array shapes of a call: `x` `[..., D]`, `weights` `[G, D]` (G weight
/// rows, one per group of rows), `out` exactly `x`'s shape. The kernel sees
/// flat slices, where a `[1, 2D]` weight would pass as two groups and an
/// `out` of x's transposed shape as x's; the bindings check shapes here.
pub fn check_shapes(x: &[usize], weights: &[usize], out: &[usize]) -> Result<()> {
    let width = x.last().copied().unwrap_or(1);
    if weights.len() != 2 || weights[1] != width {
        return Err(Error::Shape(format!(
            "weights: expected [groups, {width}] (one weight row of x's width {width} per \
             group of rows), found {weights:?}"
        )));
    }
    if out != x {
        return Err(Error::Shape(format!(
            "out: expected {x:?} (the shape of x), found {out:?}"
        )));
    }
    Ok(())
}

/// `x`: `[rows, width]`; `weights`: `[groups, width]`, `rows` a multiple of
/// `groups` (row `r` uses weight `r / (rows / groups)`); `out`: like `x`.
pub fn rms_norm_rows(
    x: &[f32],
    width: usize,
    weights: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    if width == 0 || !x.len().is_multiple_of(width) || !weights.len().is_multiple_of(width) {
        return Err(Error::Shape(format!(
            "rms norm: expected x [rows, {width}] and weights [groups, {width}] with width > 0, \
             found {} and {} values",
            x.len(),
            weights.len()
        )));
    }
    let (rows, groups) = (x.len() / width, weights.len() / width);
    if out.len() != x.len() {
        return Err(Error::Shape(format!(
            "out: expected [{rows}, {width}] = {} values, found {}",
            x.len(),
            out.len()
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    if groups == 0 || !rows.is_multiple_of(groups) {
        return Err(Error::Shape(format!(
            "weights: expected a number of weight rows that divides the {rows} rows of x, \
             found {groups}"
        )));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Value(format!(
            "eps: expected a finite value >= 0, found {eps}"
        )));
    }
    let per = rows / groups;
    for (r, (x, y)) in x
        .chunks_exact(width)
        .zip(out.chunks_exact_mut(width))
        .enumerate()
    {
        let w = &weights[(r / per) * width..(r / per + 1) * width];
        let squares: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let inv = 1.0 / ((squares / width as f64) as f32 + eps).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = w * (x * inv);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Lcg;

    #[test]
    fn matches_the_definition() {
        let mut rng = Lcg(5);
        for &(rows, groups, width) in &[(1, 1, 1), (6, 3, 7), (8, 8, 128), (16, 8, 33)] {
            let x: Vec<f32> = (0..rows * width).map(|_| rng.unit() * 3.0).collect();
            let w: Vec<f32> = (0..groups * width).map(|_| rng.unit()).collect();
            let mut out = vec![f32::NAN; x.len()];
            rms_norm_rows(&x, width, &w, 1e-6, &mut out).unwrap();
            for r in 0..rows {
                let row = &x[r * width..(r + 1) * width];
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / width as f64;
                let g = r / (rows / groups);
                for j in 0..width {
                    let want = w[g * width + j] as f64 * row[j] as f64 / (ms + 1e-6).sqrt();
                    let got = out[r * width + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "row {r} col {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let mut out = vec![0f32; 6];
        let msg = err(rms_norm_rows(&[0.0; 6], 3, &[1.0; 3], 1e-6, &mut out[..5]));
        assert!(msg.contains("out: expected [2, 3]"), "{msg}");
        let msg = err(rms_norm_rows(&[0.0; 9], 3, &[1.0; 6], 1e-6, &mut [0.0; 9]));
        assert!(
            msg.contains("divides the 3 rows") && msg.contains("found 2"),
            "{msg}"
        );
        let msg = err(rms_norm_rows(&[0.0; 6], 3, &[1.0; 3], f32::NAN, &mut out));
        assert!(msg.contains("eps"), "{msg}");
        let msg = err(rms_norm_rows(&[0.0; 5], 3, &[1.0; 3], 1e-6, &mut out));
        assert!(msg.contains("rms norm: expected x [rows, 3]"), "{msg}");
    }

    #[test]
    fn shapes_are_checked_whole_not_by_element_count() {
        assert!(check_shapes(&[6, 8], &[3, 8], &[6, 8]).is_ok());
        assert!(check_shapes(&[2, 3, 8], &[2, 8], &[2, 3, 8]).is_ok());
        // Weights of another width, whose element count happens to fit.
        for w in [[1, 16], [4, 2], [2, 12]] {
            let e = check_shapes(&[6, 8], &w, &[6, 8]).unwrap_err();
            assert!(matches!(e, Error::Shape(_)));
            let msg = e.to_string();
            assert!(
                msg.contains("weights: expected [groups, 8]") && msg.contains(&format!("{w:?}")),
                "{msg}"
            );
        }
        let msg = err_of(check_shapes(&[6, 8], &[8], &[6, 8]));
        assert!(msg.contains("weights: expected [groups, 8]"), "{msg}");
        // out: x's shape, not merely its element count.
        for o in [&[8, 6][..], &[48], &[2, 3, 8]] {
            let msg = err_of(check_shapes(&[6, 8], &[1, 8], o));
            assert!(
                msg.contains("out: expected [6, 8] (the shape of x)")
                    && msg.contains(&format!("found {o:?}")),
                "{msg}"
            );
        }
    }

    fn err_of(r: Result<()>) -> String {
        r.unwrap_err().to_string()
    }
}
