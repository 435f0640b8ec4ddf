//! Bindings of the bit-plane core.

use half::{bf16, f16};
use numpy::ndarray::{Array1, Array2, Array3};
use numpy::{
    IntoPyArray, PyArray2, PyArray3, PyReadonlyArray2, PyReadonlyArray3, PyReadonlyArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

use super::{check_array, readonly, run, slice, to_py, DTypeError, ShapeError, Size};
use crate::bitplane::{self, ScaleMode};
use crate::float::{halves_from_bits, halves_into_bits};

/// The numpy storage dtype for each element type name we take.
fn storage_dtype(dtype: &str) -> PyResult<&'static str> {
    match dtype {
        "float32" => Ok("float32"),
        // numpy has no bfloat16; both half types travel as raw uint16 bits.
        "float16" | "bfloat16" => Ok("uint16"),
        other => Err(DTypeError::new_err(format!(
            "dtype: expected float32, float16 or bfloat16, found {other}"
        ))),
    }
}

/// Calls `$body` with `$slice: &[T]` for the element type named by `$dtype`.
macro_rules! with_float_slice {
    ($arr:expr, $what:expr, $dtype:expr, |$slice:ident| $body:expr) => {{
        match $dtype {
            "float32" => {
                let a: PyReadonlyArray2<f32> = readonly($arr, $what)?;
                let $slice: &[f32] = slice(&a, $what)?;
                $body
            }
            "float16" => {
                let a: PyReadonlyArray2<u16> = readonly($arr, $what)?;
                let $slice: &[f16] = halves_from_bits(slice(&a, $what)?);
                $body
            }
            _ => {
                let a: PyReadonlyArray2<u16> = readonly($arr, $what)?;
                let $slice: &[bf16] = halves_from_bits(slice(&a, $what)?);
                $body
            }
        }
    }};
}

fn matrix_shape(arr: &Bound<'_, PyAny>) -> (usize, usize) {
    let s = arr
        .cast::<PyUntypedArray>()
        .expect("checked")
        .shape()
        .to_vec();
    (s[0], s[1])
}

/// Packs the signs of `delta` ([out, in]) into u32 words along `in`.
#[pyfunction]
fn pack_signs<'py>(
    py: Python<'py>,
    delta: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<Bound<'py, PyArray2<u32>>> {
    check_array(delta, "delta", 2, storage_dtype(dtype)?)?;
    let (rows, cols) = matrix_shape(delta);
    let words = bitplane::words_per_row(cols);
    let packed = with_float_slice!(delta, "delta", dtype, |s| run(
        py,
        || bitplane::pack_signs(s, rows, cols)
    )?);
    Ok(Array2::from_shape_vec((rows, words), packed)
        .expect("sized by core")
        .into_pyarray(py))
}

fn check_packed_shape(
    shape: &[usize],
    planes: Option<usize>,
    rows: usize,
    cols: usize,
) -> PyResult<()> {
    let words = bitplane::words_per_row(cols);
    let want: Vec<usize> = planes.into_iter().chain([rows, words]).collect();
    if shape != want.as_slice() {
        return Err(ShapeError::new_err(format!(
            "packed: target shape [{rows}, {cols}] needs packed shape {want:?} \
             ({words} u32 words per row), found {shape:?}"
        )));
    }
    Ok(())
}

/// Decodes one packed plane to a +-1 int8 matrix of shape [rows, cols].
#[pyfunction]
fn unpack_signs<'py>(
    py: Python<'py>,
    packed: &Bound<'py, PyAny>,
    rows: Size,
    cols: Size,
) -> PyResult<Bound<'py, PyArray2<i8>>> {
    let (rows, cols) = (rows.get("rows")?, cols.get("cols")?);
    check_array(packed, "packed", 2, "uint32")?;
    let packed: PyReadonlyArray2<u32> = readonly(packed, "packed")?;
    check_packed_shape(packed.shape(), None, rows, cols)?;
    let src = slice(&packed, "packed")?;
    let out = run(py, || bitplane::unpack_signs(src, rows, cols))?;
    Ok(Array2::from_shape_vec((rows, cols), out)
        .expect("sized by core")
        .into_pyarray(py))
}

/// Dense reconstruction from `planes` [k, rows, words] and `scales` [k]
/// (matrix) or [k, rows] (row); returns float32, or uint16 bits for halves.
#[pyfunction]
#[pyo3(signature = (planes, scales, rows, cols, dtype, bits=None))]
fn unpack_planes<'py>(
    py: Python<'py>,
    planes: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    rows: Size,
    cols: Size,
    dtype: &str,
    bits: Option<Size>,
) -> PyResult<Bound<'py, PyAny>> {
    let (rows, cols) = (rows.get("rows")?, cols.get("cols")?);
    let bits = bits.map(|b| b.get("bits")).transpose()?;
    storage_dtype(dtype)?;
    check_array(planes, "planes", 3, "uint32")?;
    let planes: PyReadonlyArray3<u32> = readonly(planes, "planes")?;
    let k = planes.shape()[0];
    check_packed_shape(planes.shape(), Some(k), rows, cols)?;
    let scales_arr = scales
        .cast::<PyUntypedArray>()
        .map_err(|_| DTypeError::new_err("scales: expected a float32 numpy array"))?;
    let mode = match scales_arr.shape() {
        [n] if *n == k => ScaleMode::Matrix,
        [n, r] if *n == k && *r == rows => ScaleMode::Row,
        other => {
            return Err(ShapeError::new_err(format!(
                "scales: expected shape [{k}] (per matrix) or [{k}, {rows}] (per row) for {k} plane(s), found {other:?}"
            )))
        }
    };
    check_array(scales, "scales", scales_arr.ndim(), "float32")?;
    let scales: PyReadonlyArrayDyn<f32> = readonly(scales, "scales")?;
    let (p, s) = (slice(&planes, "planes")?, slice(&scales, "scales")?);
    let use_k = bits.unwrap_or(k);
    fn shaped<T: numpy::Element>(
        py: Python<'_>,
        v: Vec<T>,
        rows: usize,
        cols: usize,
    ) -> Bound<'_, PyAny> {
        Array2::from_shape_vec((rows, cols), v)
            .expect("sized by core")
            .into_pyarray(py)
            .into_any()
    }
    Ok(match dtype {
        "float32" => shaped(
            py,
            run(py, || {
                bitplane::unpack_planes::<f32>(p, k, use_k, s, mode, rows, cols)
            })?,
            rows,
            cols,
        ),
        "float16" => shaped(
            py,
            halves_into_bits(run(py, || {
                bitplane::unpack_planes::<f16>(p, k, use_k, s, mode, rows, cols)
            })?),
            rows,
            cols,
        ),
        _ => shaped(
            py,
            halves_into_bits(run(py, || {
                bitplane::unpack_planes::<bf16>(p, k, use_k, s, mode, rows, cols)
            })?),
            rows,
            cols,
        ),
    })
}

/// Greedy residual binarisation into `bits` planes; returns (planes, scales).
#[pyfunction]
#[pyo3(signature = (delta, dtype, bits, scale="matrix"))]
fn pack_residual<'py>(
    py: Python<'py>,
    delta: &Bound<'py, PyAny>,
    dtype: &str,
    bits: Size,
    scale: &str,
) -> PyResult<(Bound<'py, PyArray3<u32>>, Bound<'py, PyAny>)> {
    let bits = bits.get("bits")?;
    check_array(delta, "delta", 2, storage_dtype(dtype)?)?;
    let mode = ScaleMode::parse(scale).map_err(to_py)?;
    let (rows, cols) = matrix_shape(delta);
    let (planes, scales) = with_float_slice!(delta, "delta", dtype, |s| run(py, || {
        bitplane::pack_residual(s, rows, cols, bits, mode)
    })?);
    let planes = Array3::from_shape_vec((bits, rows, bitplane::words_per_row(cols)), planes)
        .expect("sized by core")
        .into_pyarray(py);
    let scales = match mode {
        ScaleMode::Matrix => Array1::from_vec(scales).into_pyarray(py).into_any(),
        ScaleMode::Row => Array2::from_shape_vec((bits, rows), scales)
            .expect("sized by core")
            .into_pyarray(py)
            .into_any(),
    };
    Ok((planes, scales))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("WORD_BITS", bitplane::WORD_BITS)?;
    m.add("MAX_PLANES", bitplane::MAX_PLANES)?;
    m.add_function(wrap_pyfunction!(pack_signs, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_signs, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_planes, m)?)?;
    m.add_function(wrap_pyfunction!(pack_residual, m)?)?;
    Ok(())
}
