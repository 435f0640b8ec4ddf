//! Embedding rows of a mixed batch whose tenants' tables are packed deltas:
//!
//! `out[m] = E[v_m] + sum_p alpha[t_m, p, v_m] * S[t_m, p, v_m]`
//!
//! for token `v_m` of tenant `t_m` (`-1`: the base row alone), with the sign
//! rows `S` read from the packed planes (`1 - 2 * bit`); and, for tenants that
//! keep whole tables, `out[m] = E_{t_m}[v_m]`. One call for the batch instead
//! of the gathers, unpacks and weighted sums torch would run.

use crate::bitplane::{ScaleMode, WORD_BITS};
use crate::error::{first_outside, Error, Result};
use crate::gemv::{check_tenant_ids, DeltaStack};

/// `base`: f32 `[V, H]`; `stack`: planes `[T, P, V, ceil(H/32)]` with scales
/// per tenant and plane (matrix) or per token row (row); `tokens`, `tenants`:
/// one per output row; `out`: `[rows, H]`, overwritten.
pub fn packed_embedding(
    base: &[f32],
    stack: &DeltaStack<'_>,
    tokens: &[i64],
    tenants: &[i64],
    out: &mut [f32],
) -> Result<()> {
    stack.check()?;
    let (vocab, width) = (stack.shape.out_features, stack.shape.in_features);
    if base.len() != vocab * width {
        return Err(Error::Shape(format!(
            "base table: expected [{vocab}, {width}] = {} values (the planes' tokens and width), \
             found {}",
            vocab * width,
            base.len()
        )));
    }
    let rows = tokens.len();
    check_tenant_ids(tenants, rows, stack.shape.tenants)?;
    if out.len() != rows * width {
        return Err(Error::Shape(format!(
            "out: expected [{rows}, {width}] = {} values, found {}",
            rows * width,
            out.len()
        )));
    }
    check_tokens(tokens, vocab)?;
    let words = stack.shape.words();
    for ((y, &v), &t) in out.chunks_exact_mut(width).zip(tokens).zip(tenants) {
        let v = v as usize;
        y.copy_from_slice(&base[v * width..(v + 1) * width]);
        if t < 0 {
            continue;
        }
        for p in 0..stack.shape.planes {
            let (alpha, at) = match stack.mode {
                ScaleMode::Matrix => (stack.scales_of(t as usize, p)[0], 0),
                ScaleMode::Row => (stack.scales_of(t as usize, p)[v], v),
            };
            // As delta_matmul refuses them: a NaN / Inf scale would make the
            // row NaN / Inf. Only the scales read are checked (one per row and
            // plane), not a tenant's whole [P, V] table on every call.
            if !alpha.is_finite() {
                return Err(Error::NonFinite(format!(
                    "delta scales: expected finite values, found {alpha} for tenant {t}, \
                     plane {p}, index {at}"
                )));
            }
            if alpha == 0.0 {
                continue; // a padding plane, or a token this tenant leaves alone
            }
            let bits = &stack.plane(t as usize, p)[v * words..(v + 1) * words];
            for (chunk, &word) in y.chunks_mut(WORD_BITS).zip(bits) {
                for (j, e) in chunk.iter_mut().enumerate() {
                    // bit 1 = negative sign: alpha * (1 - 2 * bit)
                    *e += if (word >> j) & 1 == 1 { -alpha } else { alpha };
                }
            }
        }
    }
    Ok(())
}

/// `out[m] = tables[table[m]][tokens[m]]`: every table f32 `[V, H]`.
pub fn gather_embedding(
    tables: &[&[f32]],
    vocab: usize,
    width: usize,
    tokens: &[i64],
    table: &[i64],
    out: &mut [f32],
) -> Result<()> {
    for (i, t) in tables.iter().enumerate() {
        if t.len() != vocab * width {
            return Err(Error::Shape(format!(
                "tables[{i}]: expected [{vocab}, {width}] = {} values, found {}",
                vocab * width,
                t.len()
            )));
        }
    }
    let rows = tokens.len();
    if table.len() != rows || out.len() != rows * width {
        return Err(Error::Shape(format!(
            "expected one table index per token ({rows}) and out [{rows}, {width}], found {} \
             indices and {} values",
            table.len(),
            out.len()
        )));
    }
    check_tokens(tokens, vocab)?;
    if let Some((r, i)) = first_outside(table, 0, tables.len()) {
        return Err(Error::Value(format!(
            "table: expected indices in [0, {}), found {i} at index {r} of the flattened ids",
            tables.len()
        )));
    }
    if width == 0 {
        return Ok(()); // rows of no values: nothing to copy
    }
    for ((y, &v), &i) in out.chunks_exact_mut(width).zip(tokens).zip(table) {
        let v = v as usize;
        y.copy_from_slice(&tables[i as usize][v * width..(v + 1) * width]);
    }
    Ok(())
}

fn check_tokens(tokens: &[i64], vocab: usize) -> Result<()> {
    match first_outside(tokens, 0, vocab) {
        Some((r, v)) => Err(Error::Value(format!(
            "tokens: expected ids in [0, {vocab}), found {v} at index {r} of the flattened ids"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{random_stack, stack, stack_shape, Lcg};

    #[test]
    fn matches_the_definition() {
        let mut rng = Lcg(9);
        for &(t, p, vocab, width) in &[(1, 1, 1, 1), (3, 2, 20, 33), (2, 3, 7, 64)] {
            for mode in [ScaleMode::Matrix, ScaleMode::Row] {
                let shape = stack_shape(t, p, vocab, width);
                let (planes, scales) = random_stack(&mut rng, shape, mode, false);
                let stack = stack(&planes, &scales, mode, shape);
                let base: Vec<f32> = (0..vocab * width).map(|_| rng.unit()).collect();
                let rows = 9;
                let tokens: Vec<i64> = (0..rows)
                    .map(|_| (rng.next() % vocab as u64) as i64)
                    .collect();
                let tenants: Vec<i64> = (0..rows)
                    .map(|_| (rng.next() % (t as u64 + 1)) as i64 - 1)
                    .collect();
                let mut out = vec![f32::NAN; rows * width];
                packed_embedding(&base, &stack, &tokens, &tenants, &mut out).unwrap();
                let words = shape.words();
                for r in 0..rows {
                    let v = tokens[r] as usize;
                    for j in 0..width {
                        let mut want = base[v * width + j] as f64;
                        if tenants[r] >= 0 {
                            let tt = tenants[r] as usize;
                            for pp in 0..p {
                                let s = stack.scales_of(tt, pp);
                                let alpha = if s.len() == 1 { s[0] } else { s[v] };
                                let bit = (stack.plane(tt, pp)[v * words + j / 32] >> (j % 32)) & 1;
                                want += alpha as f64 * (1.0 - 2.0 * bit as f64);
                            }
                        }
                        let got = out[r * width + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "row {r} col {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gathers_each_rows_table() {
        let a: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let b: Vec<f32> = (0..12).map(|v| -(v as f32)).collect();
        let mut out = vec![0f32; 9];
        gather_embedding(&[&a, &b], 4, 3, &[3, 0, 1], &[1, 0, 1], &mut out).unwrap();
        assert_eq!(out, [-9.0, -10.0, -11.0, 0.0, 1.0, 2.0, -3.0, -4.0, -5.0]);
        let err = gather_embedding(&[&a], 4, 3, &[3, 0, 1], &[0, 1, 0], &mut out).unwrap_err();
        assert!(
            err.to_string()
                .contains("table: expected indices in [0, 1)"),
            "{err}"
        );
        let err = gather_embedding(&[&a[..11]], 4, 3, &[0], &[0], &mut out[..3]).unwrap_err();
        assert!(
            err.to_string().contains("tables[0]: expected [4, 3]"),
            "{err}"
        );
        let err = gather_embedding(&[&a], 4, 3, &[4], &[0], &mut out[..3]).unwrap_err();
        assert!(
            err.to_string().contains("tokens: expected ids in [0, 4)"),
            "{err}"
        );
    }

    #[test]
    fn non_finite_scales_of_a_used_tenant_are_an_error() {
        let shape = stack_shape(2, 2, 4, 8);
        let planes = vec![0u32; 2 * 2 * 4];
        let base = vec![0f32; 32];
        let mut out = vec![0f32; 16];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // Matrix scales [2, 2]: tenant 1, plane 1 is bad.
            let scales = [1.0, 0.5, 0.25, bad];
            let st = stack(&planes, &scales, ScaleMode::Matrix, shape);
            let e = packed_embedding(&base, &st, &[0, 1], &[0, 1], &mut out).unwrap_err();
            assert!(matches!(e, Error::NonFinite(_)), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("delta scales: expected finite values")
                    && msg.contains("tenant 1, plane 1"),
                "{msg}"
            );
            // Row scales [2, 2, 4]: token 2's scale of tenant 0, plane 1 is bad.
            let mut scales = vec![0.5f32; 16];
            scales[6] = bad;
            let st = stack(&planes, &scales, ScaleMode::Row, shape);
            let e = packed_embedding(&base, &st, &[0, 2], &[-1, 0], &mut out).unwrap_err();
            assert!(matches!(e, Error::NonFinite(_)), "{e}");
            assert!(e.to_string().contains("tenant 0, plane 1, index 2"), "{e}");
            // Scales no row reads (another tenant's, another token's) are
            // not read: the rows are finite.
            packed_embedding(&base, &st, &[2, 1], &[1, 0], &mut out).unwrap();
            assert!(out.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn an_empty_width_gathers_nothing() {
        let (a, b): (Vec<f32>, Vec<f32>) = (vec![], vec![]);
        let mut out: Vec<f32> = vec![];
        gather_embedding(&[&a, &b], 4, 0, &[3, 0, 1], &[1, 0, 1], &mut out).unwrap();
        // The ids are still checked.
        let e = gather_embedding(&[&a], 4, 0, &[4], &[0], &mut out).unwrap_err();
        assert!(
            e.to_string().contains("tokens: expected ids in [0, 4)"),
            "{e}"
        );
        let e = gather_embedding(&[&a], 4, 0, &[0], &[1], &mut out).unwrap_err();
        assert!(
            e.to_string().contains("table: expected indices in [0, 1)"),
            "{e}"
        );
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let shape = stack_shape(1, 1, 4, 8);
        let planes = vec![0u32; 4];
        let scales = vec![1.0f32];
        let stack = stack(&planes, &scales, ScaleMode::Matrix, shape);
        let base = vec![0f32; 32];
        let mut out = vec![0f32; 16];
        let err = |r: Result<()>| r.unwrap_err().to_string();
        let msg = err(packed_embedding(
            &base[..31],
            &stack,
            &[0, 1],
            &[0, 0],
            &mut out,
        ));
        assert!(msg.contains("base table: expected [4, 8]"), "{msg}");
        let msg = err(packed_embedding(&base, &stack, &[0, 4], &[0, 0], &mut out));
        assert!(
            msg.contains("tokens: expected ids in [0, 4)") && msg.contains("found 4"),
            "{msg}"
        );
        let msg = err(packed_embedding(&base, &stack, &[0, 1], &[0, 1], &mut out));
        assert!(msg.contains("tenant_ids"), "{msg}");
        let msg = err(packed_embedding(
            &base,
            &stack,
            &[0, 1],
            &[0, 0],
            &mut out[..15],
        ));
        assert!(msg.contains("out: expected [2, 8]"), "{msg}");
    }
}
