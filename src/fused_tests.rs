use super::*;
use crate::gemv::StackShape;
use crate::test_support::{isas, naive, random_stack, stack, stack_shape, Lcg};

/// Base part by its definition in f64, plus the delta's definition.
fn reference(
    x: &[f32],
    rows: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    stack: &DeltaStack<'_>,
    ids: &[i64],
) -> Vec<f64> {
    let (n, k) = (stack.shape.out_features, stack.shape.in_features);
    let mut y = naive(x, rows, stack, ids, stack.shape.planes);
    for r in 0..rows {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|c| x[r * k + c] as f64 * weight[j * k + c] as f64)
                .sum();
            y[r * n + j] += dot + bias.map_or(0.0, |b| b[j] as f64);
        }
    }
    y
}

fn check_case(
    isa: Isa,
    shape: StackShape,
    rows: usize,
    mode: ScaleMode,
    with_bias: bool,
    seed: u64,
) {
    let mut rng = Lcg(seed);
    let (mut planes, mut scales) = random_stack(&mut rng, shape, mode, false);
    // The last tenant has one plane fewer: its last plane is zero-scale padding
    // with garbage bits, which must add nothing.
    if shape.planes > 1 {
        let per = mode.per_plane(shape.out_features);
        let t = shape.tenants - 1;
        let at = (t * shape.planes + shape.planes - 1) * per;
        scales[at..at + per].fill(0.0);
        let len = shape.out_features * shape.words();
        let at = (t * shape.planes + shape.planes - 1) * len;
        planes[at..at + len].iter_mut().for_each(|w| *w = u32::MAX);
    }
    let stack = stack(&planes, &scales, mode, shape);
    let (n, k) = (shape.out_features, shape.in_features);
    let x: Vec<f32> = (0..rows * k).map(|_| rng.unit() * 2.0).collect();
    let weight: Vec<f32> = (0..n * k).map(|_| rng.unit() * 0.5).collect();
    let bias: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
    let bias = with_bias.then_some(&bias[..]);
    let ids: Vec<i64> = (0..rows)
        .map(|_| (rng.next() % (shape.tenants as u64 + 1)) as i64 - 1)
        .collect();
    let want = reference(&x, rows, &weight, bias, &stack, &ids);
    let base = BaseLinear {
        weight: &weight,
        bias,
    };
    // Tolerance: float32 rounding over K products of |x| * (|w| + alpha * planes).
    let mean_abs: f64 = x.iter().map(|v| v.abs() as f64).sum::<f64>() / rows.max(1) as f64;
    let tol = 5.0 * mean_abs * 1e-6 * (shape.planes as f64 + 1.0) + 1e-5;
    let mut results = Vec::new();
    for parallel_from in [usize::MAX, 0] {
        let mut out = vec![f32::NAN; rows * n];
        fused_linear_with(isa, parallel_from, &x, rows, base, &stack, &ids, &mut out).unwrap();
        for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol,
                "{isa:?} {shape:?} rows={rows} {mode:?} bias={with_bias} \
                 parallel_from={parallel_from}: index {i}: got {g}, want {w} (tol {tol})"
            );
        }
        results.push(out);
    }
    assert_eq!(results[0], results[1], "serial and pool paths differ");
}

#[test]
fn matches_the_definition_on_ragged_shapes_every_isa() {
    // (tenants, planes, out, in, rows): outputs around the 16-feature tile,
    // inputs around the 16-float chunk and the 32-bit word.
    let cases = [
        (1, 1, 1, 1, 1),
        (1, 1, 16, 16, 1),
        (2, 1, 17, 31, 3),
        (3, 2, 15, 33, 4),
        (4, 3, 70, 100, 8),
        (2, 1, 128, 128, 8),
        (8, 1, 352, 128, 8),
        (8, 2, 128, 352, 5),
        (1, 1, 33, 257, 2),
    ];
    for isa in isas() {
        for (i, &(t, p, n, k, rows)) in cases.iter().enumerate() {
            for mode in [ScaleMode::Matrix, ScaleMode::Row] {
                for bias in [false, true] {
                    check_case(isa, stack_shape(t, p, n, k), rows, mode, bias, 7 + i as u64);
                }
            }
        }
    }
}

#[test]
fn base_rows_get_the_base_exactly_as_the_isa_computes_it() {
    // A row with tenant -1 sees only x W^T + b; the same row with an all-zero
    // scale tenant matches it bit for bit.
    let shape = stack_shape(1, 1, 40, 50);
    let mut rng = Lcg(3);
    let (planes, _) = random_stack(&mut rng, shape, ScaleMode::Matrix, false);
    let scales = vec![0.0f32];
    let stack = stack(&planes, &scales, ScaleMode::Matrix, shape);
    let x: Vec<f32> = (0..2 * 50).map(|_| rng.unit()).collect();
    let x = [&x[..50], &x[..50]].concat();
    let weight: Vec<f32> = (0..40 * 50).map(|_| rng.unit()).collect();
    let base = BaseLinear {
        weight: &weight,
        bias: None,
    };
    for isa in isas() {
        let mut out = vec![0f32; 2 * 40];
        fused_linear_with(isa, usize::MAX, &x, 2, base, &stack, &[-1, 0], &mut out).unwrap();
        assert_eq!(out[..40], out[40..], "{isa:?}");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let shape = stack_shape(2, 1, 4, 8);
    let planes = vec![0u32; 2 * 4];
    let scales = vec![1.0f32; 2];
    let stack = stack(&planes, &scales, ScaleMode::Matrix, shape);
    let weight = vec![0f32; 32];
    let x = vec![0f32; 8];
    let mut out = vec![0f32; 4];
    let base = BaseLinear {
        weight: &weight,
        bias: None,
    };
    let err = |r: Result<()>| r.unwrap_err().to_string();
    let short = BaseLinear {
        weight: &weight[..31],
        bias: None,
    };
    let msg = err(fused_linear(&x, 1, short, &stack, &[0], &mut out));
    assert!(
        msg.contains("weight: expected [4, 8]") && msg.contains("found 31"),
        "{msg}"
    );
    let bias = [0f32; 3];
    let biased = BaseLinear {
        weight: &weight,
        bias: Some(&bias),
    };
    let msg = err(fused_linear(&x, 1, biased, &stack, &[0], &mut out));
    assert!(
        msg.contains("bias of weight: expected 4") && msg.contains("found 3"),
        "{msg}"
    );
    let msg = err(fused_linear(&x[..7], 1, base, &stack, &[0], &mut out));
    assert!(msg.contains("x: expected [1, 8]"), "{msg}");
    let msg = err(fused_linear(&x, 1, base, &stack, &[0], &mut out[..3]));
    assert!(msg.contains("out: expected [1, 4]"), "{msg}");
    let msg = err(fused_linear(&x, 1, base, &stack, &[2], &mut out));
    assert!(
        msg.contains("tenant_ids") && msg.contains("found 2"),
        "{msg}"
    );
    let msg = err(fused_linear(&x, 1, base, &stack, &[0, 0], &mut out));
    assert!(msg.contains("one id per row"), "{msg}");
    let nan = vec![f32::NAN, 1.0];
    let bad = crate::test_support::stack(&planes, &nan, ScaleMode::Matrix, shape);
    let msg = err(fused_linear(&x, 1, base, &bad, &[0], &mut out));
    assert!(msg.contains("finite"), "{msg}");
}

#[test]
fn empty_batch_is_fine() {
    let shape = stack_shape(1, 1, 4, 8);
    let planes = vec![0u32; 4];
    let scales = vec![1.0f32];
    let stack = stack(&planes, &scales, ScaleMode::Matrix, shape);
    let weight = vec![0f32; 32];
    let base = BaseLinear {
        weight: &weight,
        bias: None,
    };
    fused_linear(&[], 0, base, &stack, &[], &mut []).unwrap();
}

/// Infinities, NaN, huge and non-zero-mean activations, rows of each kind
/// side by side, against the definition (f64: NaN only where infinities of
/// both signs meet), on every instruction set and both thread paths.
#[test]
fn extreme_activations_match_the_definition() {
    use crate::gemv::tests::{assert_like, magnitudes};
    let shape = stack_shape(2, 2, 35, 100);
    let (n, k) = (35, 100);
    for isa in isas() {
        for mode in [ScaleMode::Matrix, ScaleMode::Row] {
            let mut rng = Lcg(31);
            let (planes, scales) = random_stack(&mut rng, shape, mode, false);
            let stack = stack(&planes, &scales, mode, shape);
            let weight: Vec<f32> = (0..n * k).map(|_| rng.unit() * 1e-3).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            let rows = 7;
            let mut x: Vec<f32> = (0..rows * k).map(|_| 10.0 + rng.unit()).collect();
            x[7] = f32::INFINITY;
            x[k + 50] = f32::NEG_INFINITY;
            x[2 * k + 1] = f32::INFINITY;
            x[2 * k + 99] = f32::NEG_INFINITY;
            x[3 * k + 20] = f32::NAN;
            x[4 * k..5 * k].fill(1e36);
            x[5 * k..6 * k].iter_mut().for_each(|v| *v *= -1e35);
            let ids = [0i64, 1, 0, 1, 0, 1, -1];
            let base = BaseLinear {
                weight: &weight,
                bias: Some(&bias),
            };
            let want = reference(&x, rows, &weight, Some(&bias), &stack, &ids);
            let wabs: Vec<f32> = weight.iter().map(|w| w.abs()).collect();
            let babs: Vec<f32> = bias.iter().map(|b| b.abs()).collect();
            let xabs: Vec<f32> = x
                .iter()
                .map(|v| if v.is_finite() { v.abs() } else { 0.0 })
                .collect();
            let mut scale = magnitudes(&x, rows, &stack, &ids);
            let none = [-1i64; 7];
            let base_mag = reference(&xabs, rows, &wabs, Some(&babs), &stack, &none);
            scale.iter_mut().zip(&base_mag).for_each(|(s, b)| *s += b);
            for parallel_from in [usize::MAX, 0] {
                let mut out = vec![0f32; rows * n];
                fused_linear_with(isa, parallel_from, &x, rows, base, &stack, &ids, &mut out)
                    .unwrap();
                let what = format!("{isa:?} {mode:?} parallel_from={parallel_from}");
                assert_like(&out, &want, &scale, 2e-6, &what);
            }
        }
    }
}
