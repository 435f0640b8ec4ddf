//! Test helpers shared by the kernels' unit tests: a small deterministic
//! generator, random packed stacks and the delta matmul by its definition.

use crate::bitplane::{ScaleMode, WORD_BITS};
use crate::gemv::{DeltaStack, Isa, StackShape};

/// Small deterministic generator (no extra dev-dependencies).
pub(crate) struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    pub fn unit(&mut self) -> f32 {
        (self.next() as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
}

pub(crate) fn stack_shape(tenants: usize, planes: usize, out: usize, inp: usize) -> StackShape {
    StackShape {
        tenants,
        planes,
        out_features: out,
        in_features: inp,
    }
}

pub(crate) fn stack<'a>(
    planes: &'a [u32],
    scales: &'a [f32],
    mode: ScaleMode,
    shape: StackShape,
) -> DeltaStack<'a> {
    DeltaStack {
        planes,
        scales,
        mode,
        shape,
    }
}

pub(crate) fn random_stack(
    rng: &mut Lcg,
    shape: StackShape,
    mode: ScaleMode,
    dirty_padding: bool,
) -> (Vec<u32>, Vec<f32>) {
    let words = shape.words();
    let tail = shape.in_features % WORD_BITS;
    let mut planes: Vec<u32> = (0..shape.tenants * shape.planes * shape.out_features * words)
        .map(|_| rng.next() as u32)
        .collect();
    if tail != 0 && !dirty_padding {
        for row in planes.chunks_exact_mut(words) {
            row[words - 1] &= (1u32 << tail) - 1;
        }
    }
    let per = mode.per_plane(shape.out_features);
    let scales = (0..shape.tenants * shape.planes * per)
        .map(|_| 0.01 + rng.unit().abs())
        .collect();
    (planes, scales)
}

/// The definition, element by element, in f64.
pub(crate) fn naive(
    x: &[f32],
    rows: usize,
    stack: &DeltaStack<'_>,
    ids: &[i64],
    use_planes: usize,
) -> Vec<f64> {
    let StackShape {
        out_features: n,
        in_features: k,
        ..
    } = stack.shape;
    let words = stack.shape.words();
    let mut y = vec![0f64; rows * n];
    for r in 0..rows {
        if ids[r] < 0 {
            continue;
        }
        let t = ids[r] as usize;
        for p in 0..use_planes {
            let plane = stack.plane(t, p);
            let scales = stack.scales_of(t, p);
            for j in 0..n {
                let alpha = if scales.len() == 1 {
                    scales[0]
                } else {
                    scales[j]
                };
                let mut dot = 0f64;
                for c in 0..k {
                    let bit = (plane[j * words + c / 32] >> (c % 32)) & 1;
                    dot += x[r * k + c] as f64 * (1.0 - 2.0 * bit as f64);
                }
                y[r * n + j] += alpha as f64 * dot;
            }
        }
    }
    y
}

/// Every instruction set this CPU can run (tests compare them all).
pub(crate) fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|i| i.available())
        .collect()
}
