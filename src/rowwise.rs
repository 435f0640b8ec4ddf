//! A linear layer whose weight differs per row: `y[r] = x[r] W[i_r]^T + b[i_r]`,
//! for full-precision per-tenant layers (a fine-tune's own head) in a mixed
//! decode batch.
//!
//! The alternative, one BLAS call per distinct weight on that weight's rows,
//! pays a call, a gather and a scatter per tenant; here one call reads each
//! weight once, its rows register-blocked together (src/fused.rs's tiles).

use crate::bitplane::{words_per_row, WORD_BITS};
use crate::error::{first_outside, Error, Result};
use crate::fused::{check_base, check_rows, run_tiles, BaseLinear, PARALLEL_FROM, TILE};
use crate::gemv::{padded_rows, Groups, Isa};

/// `out[r] = x[r] . weights[index[r]]^T (+ bias)` on the best instruction set.
///
/// `x`: `[rows, k]`; every weight `[n, k]` (bias `[n]`); `index`: one entry
/// of `weights` per row; `out`: `[rows, n]`, overwritten.
pub fn rowwise_linear(
    x: &[f32],
    rows: usize,
    weights: &[BaseLinear<'_>],
    n: usize,
    k: usize,
    index: &[i64],
    out: &mut [f32],
) -> Result<()> {
    rowwise_linear_with(
        Isa::detect(),
        PARALLEL_FROM,
        x,
        rows,
        weights,
        n,
        k,
        index,
        out,
    )
}

/// [`rowwise_linear`] on a chosen instruction set, on the thread pool from
/// `parallel_from` multiply-adds on (tests force every path).
#[allow(clippy::too_many_arguments)]
pub fn rowwise_linear_with(
    isa: Isa,
    parallel_from: usize,
    x: &[f32],
    rows: usize,
    weights: &[BaseLinear<'_>],
    n: usize,
    k: usize,
    index: &[i64],
    out: &mut [f32],
) -> Result<()> {
    isa.require()?;
    for (i, w) in weights.iter().enumerate() {
        check_base(w, n, k, &format!("weights[{i}]"))?;
    }
    check_rows(x.len(), rows, k, out.len(), n)?;
    if index.len() != rows {
        return Err(Error::Shape(format!(
            "index: expected one weight index per row of x ({rows}), found {}",
            index.len()
        )));
    }
    if let Some((r, i)) = first_outside(index, 0, weights.len()) {
        return Err(Error::Value(format!(
            "index: expected values in [0, {}) (one per weight given), found {i} at row {r}",
            weights.len()
        )));
    }
    let xs = padded_rows(x, rows, k);
    let stride = words_per_row(k) * WORD_BITS;
    let groups = Groups::new(index, weights.len());
    let tile = |f0: usize, dst: &mut [f32]| {
        let nf = TILE.min(n - f0);
        for (w, group) in groups.iter() {
            let weight = &weights[w].weight[f0 * k..(f0 + nf) * k];
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                let xp: Vec<*const f32> =
                    group.iter().map(|&r| xs[r * stride..].as_ptr()).collect();
                let dp: Vec<*mut f32> = group
                    .iter()
                    .map(|&r| dst[r * TILE..].as_mut_ptr())
                    .collect();
                // SAFETY: AVX-512F detected for this Isa; rows of `xs` are
                // zero-padded to whole words (`stride >= k`, a multiple of 32),
                // `weight` holds `nf * k` floats and each `dst` row 16.
                unsafe { crate::fused::avx512::dense_rows(&xp, weight.as_ptr(), k, nf, &dp) };
            } else {
                dots_portable(&xs, stride, group, weight, k, nf, dst);
            }
            #[cfg(not(target_arch = "x86_64"))]
            dots_portable(&xs, stride, group, weight, k, nf, dst);
            if let Some(b) = weights[w].bias {
                for &r in group {
                    let y = &mut dst[r * TILE..r * TILE + nf];
                    y.iter_mut().zip(&b[f0..f0 + nf]).for_each(|(v, b)| *v += b);
                }
            }
        }
    };
    run_tiles(rows, n, k, parallel_from, tile, out);
    Ok(())
}

fn dots_portable(
    xs: &[f32],
    stride: usize,
    group: &[usize],
    weight: &[f32],
    k: usize,
    nf: usize,
    dst: &mut [f32],
) {
    for &r in group {
        if k == 0 {
            // No inputs: every dot product is empty (`chunks_exact(0)` panics).
            dst[r * TILE..r * TILE + nf].fill(0.0);
            continue;
        }
        let x = &xs[r * stride..r * stride + k];
        for (v, w) in dst[r * TILE..r * TILE + nf]
            .iter_mut()
            .zip(weight.chunks_exact(k))
        {
            *v = x.iter().zip(w).map(|(a, b)| a * b).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{isas, Lcg};

    #[test]
    fn matches_the_definition_on_ragged_shapes_every_isa() {
        for (case, &(t, n, k, rows)) in [
            (1, 1, 1, 1),
            (2, 3, 0, 2),
            (3, 17, 33, 7),
            (2, 40, 130, 5),
            (5, 259, 128, 8),
        ]
        .iter()
        .enumerate()
        {
            let mut rng = Lcg(11 + case as u64);
            let ws: Vec<Vec<f32>> = (0..t)
                .map(|_| (0..n * k).map(|_| rng.unit()).collect())
                .collect();
            let bs: Vec<Vec<f32>> = (0..t)
                .map(|_| (0..n).map(|_| rng.unit()).collect())
                .collect();
            // Odd weights have a bias, even ones none.
            let weights: Vec<BaseLinear> = (0..t)
                .map(|i| BaseLinear {
                    weight: &ws[i],
                    bias: (i % 2 == 1).then_some(&bs[i][..]),
                })
                .collect();
            let x: Vec<f32> = (0..rows * k).map(|_| rng.unit()).collect();
            let index: Vec<i64> = (0..rows).map(|_| (rng.next() % t as u64) as i64).collect();
            for isa in isas() {
                let mut results = Vec::new();
                for parallel_from in [usize::MAX, 0] {
                    let mut out = vec![f32::NAN; rows * n];
                    rowwise_linear_with(
                        isa,
                        parallel_from,
                        &x,
                        rows,
                        &weights,
                        n,
                        k,
                        &index,
                        &mut out,
                    )
                    .unwrap();
                    for r in 0..rows {
                        let i = index[r] as usize;
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|c| x[r * k + c] as f64 * ws[i][j * k + c] as f64)
                                .sum::<f64>()
                                + if i % 2 == 1 { bs[i][j] as f64 } else { 0.0 };
                            let got = out[r * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (k as f64).sqrt() + 1e-6,
                                "{isa:?} case {case} row {r} feature {j}: got {got}, want {want}"
                            );
                        }
                    }
                    results.push(out);
                }
                assert_eq!(results[0], results[1], "serial and pool paths differ");
            }
        }
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let w = vec![0f32; 12];
        let short = vec![0f32; 11];
        let weights = [
            BaseLinear {
                weight: &w,
                bias: None,
            },
            BaseLinear {
                weight: &short,
                bias: None,
            },
        ];
        let x = vec![0f32; 8];
        let mut out = vec![0f32; 6];
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let msg = err(rowwise_linear(&x, 2, &weights, 3, 4, &[0, 0], &mut out));
        assert!(
            msg.contains("weights[1]: expected [3, 4]") && msg.contains("found 11"),
            "{msg}"
        );
        let msg = err(rowwise_linear(
            &x,
            2,
            &weights[..1],
            3,
            4,
            &[0, 1],
            &mut out,
        ));
        assert!(
            msg.contains("index: expected values in [0, 1)") && msg.contains("found 1 at row 1"),
            "{msg}"
        );
        let msg = err(rowwise_linear(&x, 2, &weights[..1], 3, 4, &[0], &mut out));
        assert!(msg.contains("one weight index per row"), "{msg}");
        let msg = err(rowwise_linear(
            &x,
            2,
            &weights[..1],
            3,
            4,
            &[0, 0],
            &mut out[..5],
        ));
        assert!(msg.contains("out: expected [2, 3]"), "{msg}");
    }
}
