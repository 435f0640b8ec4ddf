//! Bindings of the per-row RMSNorm (src/rmsnorm.rs).

use numpy::{PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::gemv::{rows_and_width, shape_of};
use super::{check_array, named, readonly, run, slice, slice_mut, to_py, writable_f32};
use crate::error::Error;
use crate::rmsnorm;

/// `out[r] = weights[r / s] * x[r] / sqrt(mean(x[r]^2) + eps)`: float32 `x`
/// `[..., D]`, `weights` `[G, D]` (`s` = rows / G), `out` like `x`.
#[pyfunction]
fn rms_norm_rows<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    eps: f64,
    out: &Bound<'py, PyAny>,
) -> PyResult<()> {
    // Taken as f64 so that a value past float32's range is named as given, not as inf.
    if eps.is_finite() && !(eps as f32).is_finite() {
        return Err(to_py(Error::Value(format!(
            "eps: expected a finite float32 value >= 0 (at most {:e}), found {eps:e}",
            f32::MAX
        ))));
    }
    check_array(x, "x", shape_of(x).len().max(1), "float32")?;
    check_array(weights, "weights", 2, "float32")?;
    check_array(out, "out", shape_of(out).len().max(1), "float32")?;
    rmsnorm::check_shapes(&shape_of(x), &shape_of(weights), &shape_of(out)).map_err(to_py)?;
    let xa: PyReadonlyArrayDyn<f32> = readonly(x, "x")?;
    let (_, width) = rows_and_width(xa.shape());
    let wa: PyReadonlyArray2<f32> = readonly(weights, "weights")?;
    let mut out_rw = writable_f32(out, || named(&[("x", x), ("weights", weights)]))?;
    let xs = slice(&xa, "x")?;
    let ws = slice(&wa, "weights")?;
    let y = slice_mut(&mut out_rw, "out")?;
    run(py, || rmsnorm::rms_norm_rows(xs, width, ws, eps as f32, y))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rms_norm_rows, m)?)?;
    Ok(())
}
