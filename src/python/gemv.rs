//! Bindings of the CPU delta matmul: numpy in (zero-copy), GIL released.

use half::{bf16, f16};
use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::{
    check_array, named, readonly, run, slice, slice_mut, writable_f32, DTypeError, ShapeError, Size,
};
use crate::bitplane::{words_per_row, ScaleMode};
use crate::float::halves_from_bits;
use crate::gemv::{self, DeltaStack, StackShape};

/// `[..., w]` read as `[rows, w]` (a 0-D shape as one row of width 1).
pub(super) fn rows_and_width(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        Some((&w, lead)) => (lead.iter().product(), w),
        None => (1, 1),
    }
}

/// `out` `[..., n]` with `rows` rows in all: the kernels write by element
/// count, so a `[2 * rows, n / 2]` array would pass them and come out scrambled.
pub(super) fn check_out_rows(out: &Bound<'_, PyAny>, rows: usize, n: usize) -> PyResult<()> {
    let shape = shape_of(out);
    if rows_and_width(&shape) != (rows, n) {
        return Err(ShapeError::new_err(format!(
            "out: expected [..., {n}] with {rows} rows in all, found {shape:?}"
        )));
    }
    Ok(())
}

pub(super) fn shape_of(arr: &Bound<'_, PyAny>) -> Vec<usize> {
    arr.cast::<PyUntypedArray>()
        .map(|a| a.shape().to_vec())
        .unwrap_or_default()
}

/// `y[r] (+)= sum_p alpha[t_r, p(, n)] * (x[r] . S[t_r, p, n])`.
///
/// `x`: `[M, K]` float32, or uint16 bits of float16 / bfloat16 (`dtype` says
/// which); `planes`: uint32 `[T, P, N, ceil(K/32)]`; `scales`: float32
/// `[T, P]` or `[T, P, N]`; `tenant_ids`: int64 `[M]` (-1 = no delta);
/// `bits`: use the first `bits` planes; `out`: float32 `[M, N]` to add into
/// (a new zeroed array when None). Returns the result array.
#[pyfunction]
#[pyo3(signature = (x, dtype, planes, scales, tenant_ids, bits=None, out=None))]
#[allow(clippy::too_many_arguments)]
fn delta_matmul<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    dtype: &str,
    planes: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    tenant_ids: &Bound<'py, PyAny>,
    bits: Option<Size>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let bits = bits.map(|b| b.get("bits")).transpose()?;
    let storage = match dtype {
        "float32" => "float32",
        "float16" | "bfloat16" => "uint16",
        other => {
            return Err(DTypeError::new_err(format!(
                "x dtype: expected float32, float16 or bfloat16, found {other}"
            )))
        }
    };
    check_array(x, "x", 2, storage)?;
    check_array(planes, "planes", 4, "uint32")?;
    check_array(tenant_ids, "tenant_ids", 1, "int64")?;
    let (rows, k) = match shape_of(x)[..] {
        [m, k] => (m, k),
        _ => unreachable!("checked 2-D"),
    };
    let scale_dims = shape_of(scales).len();
    check_array(scales, "scales", scale_dims, "float32")?;
    let planes_ro: PyReadonlyArrayDyn<u32> = readonly(planes, "planes")?;
    let scales_ro: PyReadonlyArrayDyn<f32> = readonly(scales, "scales")?;
    let stack = stack_of(&planes_ro, &scales_ro, k)?;
    let n = stack.shape.out_features;
    let ids: PyReadonlyArray1<i64> = readonly(tenant_ids, "tenant_ids")?;
    let ids = slice(&ids, "tenant_ids")?;
    // x is borrowed before out, so that an out that is also x is refused
    // (and named) when out is borrowed for writing.
    let xa = match storage {
        "float32" => XArray::F32(readonly(x, "x")?),
        _ => XArray::Bits(readonly(x, "x")?),
    };

    let result: Bound<'py, PyAny> = match out {
        Some(o) => {
            check_array(o, "out", 2, "float32")?;
            if shape_of(o) != [rows, n] {
                return Err(ShapeError::new_err(format!(
                    "out: expected [{rows}, {n}], found {:?}",
                    shape_of(o)
                )));
            }
            o.clone()
        }
        None => Array2::<f32>::zeros((rows, n)).into_pyarray(py).into_any(),
    };
    let accumulate = out.is_some();
    {
        let mut out_rw = writable_f32(&result, || {
            named(&[
                ("x", x),
                ("planes", planes),
                ("scales", scales),
                ("tenant_ids", tenant_ids),
            ])
        })?;
        let y = slice_mut(&mut out_rw, "out")?;
        match (&xa, dtype) {
            (XArray::F32(xa), _) => {
                let xs = slice(xa, "x")?;
                run(py, || {
                    gemv::delta_matmul(xs, rows, &stack, ids, bits, y, accumulate)
                })?
            }
            (XArray::Bits(xa), "float16") => {
                let xs: &[f16] = halves_from_bits(slice(xa, "x")?);
                run(py, || {
                    gemv::delta_matmul(xs, rows, &stack, ids, bits, y, accumulate)
                })?
            }
            (XArray::Bits(xa), _) => {
                let xs: &[bf16] = halves_from_bits(slice(xa, "x")?);
                run(py, || {
                    gemv::delta_matmul(xs, rows, &stack, ids, bits, y, accumulate)
                })?
            }
        }
    }
    Ok(result)
}

/// `x` of `delta_matmul` borrowed: float32, or the uint16 bits of halves.
enum XArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    Bits(PyReadonlyArrayDyn<'py, u16>),
}

/// The stack of `planes` (uint32 `[T, P, N, W]`) and `scales` (float32
/// `[T, P]` or `[T, P, N]`) for `k` input features: shapes checked, slices
/// borrowed for as long as the two readonly views live.
pub(super) fn stack_of<'a>(
    planes: &'a PyReadonlyArrayDyn<'_, u32>,
    scales: &'a PyReadonlyArrayDyn<'_, f32>,
    k: usize,
) -> PyResult<DeltaStack<'a>> {
    let [t, p, n, w] = <[usize; 4]>::try_from(planes.shape()).map_err(|_| {
        ShapeError::new_err(format!(
            "planes: expected a 4-D array [tenants, planes, out, words], found shape {:?}",
            planes.shape()
        ))
    })?;
    if w != words_per_row(k) {
        return Err(ShapeError::new_err(format!(
            "planes: x has {k} input features, so planes need {} u32 words per row, \
             found shape [{t}, {p}, {n}, {w}]",
            words_per_row(k)
        )));
    }
    let mode = match scales.shape() {
        [a, b] if *a == t && *b == p => ScaleMode::Matrix,
        [a, b, c] if *a == t && *b == p && *c == n => ScaleMode::Row,
        other => {
            return Err(ShapeError::new_err(format!(
                "scales: expected [{t}, {p}] (per matrix) or [{t}, {p}, {n}] (per row) \
                 for planes [{t}, {p}, {n}, {w}], found {other:?}"
            )))
        }
    };
    Ok(DeltaStack {
        planes: slice(planes, "planes")?,
        scales: slice(scales, "scales")?,
        mode,
        shape: StackShape {
            tenants: t,
            planes: p,
            out_features: n,
            in_features: k,
        },
    })
}

/// The instruction set the kernel uses on this CPU ("avx512", "avx2", "portable").
#[pyfunction]
fn gemv_isa() -> &'static str {
    gemv::Isa::detect().name()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(delta_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(gemv_isa, m)?)?;
    Ok(())
}
