//! Bindings of the per-row RMSNorm (src/rmsnorm.rs).

use numpy::{PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::gemv::{rows_and_width, shape_of};
use super::{check_array, run, writable_f32};
use crate::rmsnorm;

/// `out[r] = weights[r / s] * x[r] / sqrt(mean(x[r]^2) + eps)`: float32 `x`
/// `[..., D]`, `weights` `[G, D]` (`s` = rows / G), `out` like `x`.
#[pyfunction]
fn rms_norm_rows<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    eps: f32,
    out: &Bound<'py, PyAny>,
) -> PyResult<()> {
    check_array(x, "x", shape_of(x).len().max(1), "float32")?;
    check_array(weights, "weights", 2, "float32")?;
    check_array(out, "out", shape_of(out).len().max(1), "float32")?;
    let xa: PyReadonlyArrayDyn<f32> = x.extract()?;
    let (_, width) = rows_and_width(xa.shape());
    let wa: PyReadonlyArray2<f32> = weights.extract()?;
    let mut out_rw = writable_f32(out)?;
    let xs = xa.as_slice().expect("checked contiguous");
    let ws = wa.as_slice().expect("checked contiguous");
    let y = out_rw.as_slice_mut().expect("checked contiguous");
    run(py, || rmsnorm::rms_norm_rows(xs, width, ws, eps, y))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rms_norm_rows, m)?)?;
    Ok(())
}
