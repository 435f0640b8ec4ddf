//! Bindings of the decode-sized layer kernels: the fused multi-tenant linear
//! (src/fused.rs) and the per-row-weight linear (src/rowwise.rs).

use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::gemv::{check_out_rows, rows_and_width, shape_of, stack_of};
use super::{check_array, named, readonly, run, slice, slice_mut, writable_f32, ShapeError};
use crate::fused::{self, BaseLinear};
use crate::rowwise;

/// A multi-tenant linear layer for decode in one pass (src/fused.rs):
/// `out[r] = x[r] W^T + b + delta of row r's tenant`.
///
/// `x`: float32 `[M, K]`; `weight`: float32 `[N, K]`; `bias`: float32 `[N]`
/// or None; `planes`, `scales`: the stack as for `delta_matmul`;
/// `tenant_ids`: int64 `[M]` (-1 = base only); `out`: float32 `[M, N]`,
/// overwritten.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, planes, scales, tenant_ids, out))]
#[allow(clippy::too_many_arguments)]
fn fused_linear<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    weight: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    planes: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    tenant_ids: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
) -> PyResult<()> {
    // x [..., K] and out [..., N]: any leading shape (torch's [batch, seq, K]
    // views pass as they are), read as [rows, K] and [rows, N].
    check_array(x, "x", shape_of(x).len().max(1), "float32")?;
    check_array(weight, "weight", 2, "float32")?;
    check_array(planes, "planes", 4, "uint32")?;
    check_array(tenant_ids, "tenant_ids", 1, "int64")?;
    check_array(out, "out", shape_of(out).len().max(1), "float32")?;
    if let Some(b) = bias {
        check_array(b, "bias", 1, "float32")?;
    }
    let scale_dims = shape_of(scales).len();
    check_array(scales, "scales", scale_dims, "float32")?;
    let xa: PyReadonlyArrayDyn<f32> = readonly(x, "x")?;
    let (rows, k) = rows_and_width(xa.shape());
    let wa: PyReadonlyArray2<f32> = readonly(weight, "weight")?;
    if wa.shape() != [shape_of(planes)[2], k] {
        return Err(ShapeError::new_err(format!(
            "weight: expected [out, {k}] with out = the planes' {} rows, found {:?}",
            shape_of(planes)[2],
            wa.shape()
        )));
    }
    check_out_rows(out, rows, wa.shape()[0])?;
    let ba: Option<PyReadonlyArray1<f32>> = bias.map(|b| readonly(b, "bias")).transpose()?;
    let pa: PyReadonlyArrayDyn<u32> = readonly(planes, "planes")?;
    let sa: PyReadonlyArrayDyn<f32> = readonly(scales, "scales")?;
    let stack = stack_of(&pa, &sa, k)?;
    let ids: PyReadonlyArray1<i64> = readonly(tenant_ids, "tenant_ids")?;
    let mut out_rw = writable_f32(out, || {
        let mut inputs = named(&[
            ("x", x),
            ("weight", weight),
            ("planes", planes),
            ("scales", scales),
            ("tenant_ids", tenant_ids),
        ]);
        inputs.extend(bias.map(|b| ("bias".to_string(), b.clone())));
        inputs
    })?;
    let base = BaseLinear {
        weight: slice(&wa, "weight")?,
        bias: ba.as_ref().map(|b| slice(b, "bias")).transpose()?,
    };
    let xs = slice(&xa, "x")?;
    let ids = slice(&ids, "tenant_ids")?;
    let y = slice_mut(&mut out_rw, "out")?;
    run(py, || fused::fused_linear(xs, rows, base, &stack, ids, y))
}

/// A linear layer with one weight per row (src/rowwise.rs):
/// `out[r] = x[r] weights[index[r]]^T + biases[index[r]]`.
///
/// `x`: float32 `[..., K]` (`M` rows); `weights`: float32 `[N, K]` arrays; `biases`: one
/// float32 `[N]` array or None per weight; `index`: int64 `[M]`; `out`:
/// float32 `[..., N]`, overwritten.
#[pyfunction]
fn rowwise_linear<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    weights: Vec<Bound<'py, PyAny>>,
    biases: Vec<Option<Bound<'py, PyAny>>>,
    index: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
) -> PyResult<()> {
    check_array(x, "x", shape_of(x).len().max(1), "float32")?;
    check_array(index, "index", 1, "int64")?;
    check_array(out, "out", shape_of(out).len().max(1), "float32")?;
    if biases.len() != weights.len() {
        return Err(ShapeError::new_err(format!(
            "biases: expected one per weight ({}), found {}",
            weights.len(),
            biases.len()
        )));
    }
    let xa: PyReadonlyArrayDyn<f32> = readonly(x, "x")?;
    let (rows, k) = rows_and_width(xa.shape());
    let (_, n) = rows_and_width(&shape_of(out));
    check_out_rows(out, rows, n)?;
    let mut ws: Vec<PyReadonlyArray2<f32>> = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter().enumerate() {
        check_array(w, &format!("weights[{i}]"), 2, "float32")?;
        // The core checks the length only: a transposed [K, N] weight
        // would be read as [N, K].
        if shape_of(w) != [n, k] {
            return Err(ShapeError::new_err(format!(
                "weights[{i}]: expected [{n}, {k}] (out's {n} features, x's {k}), found {:?}",
                shape_of(w)
            )));
        }
        ws.push(readonly(w, &format!("weights[{i}]"))?);
    }
    let mut bs: Vec<Option<PyReadonlyArray1<f32>>> = Vec::with_capacity(biases.len());
    for (i, b) in biases.iter().enumerate() {
        bs.push(match b {
            Some(b) => {
                check_array(b, &format!("biases[{i}]"), 1, "float32")?;
                Some(readonly(b, &format!("biases[{i}]"))?)
            }
            None => None,
        });
    }
    let mut layers: Vec<BaseLinear> = Vec::with_capacity(ws.len());
    for (i, (w, b)) in ws.iter().zip(&bs).enumerate() {
        layers.push(BaseLinear {
            weight: slice(w, &format!("weights[{i}]"))?,
            bias: b
                .as_ref()
                .map(|b| slice(b, &format!("biases[{i}]")))
                .transpose()?,
        });
    }
    let ids: PyReadonlyArray1<i64> = readonly(index, "index")?;
    let mut out_rw = writable_f32(out, || {
        let mut inputs = named(&[("x", x), ("index", index)]);
        for (i, w) in weights.iter().enumerate() {
            inputs.push((format!("weights[{i}]"), w.clone()));
        }
        for (i, b) in biases.iter().enumerate() {
            inputs.extend(b.as_ref().map(|b| (format!("biases[{i}]"), b.clone())));
        }
        inputs
    })?;
    let xs = slice(&xa, "x")?;
    let ids = slice(&ids, "index")?;
    let y = slice_mut(&mut out_rw, "out")?;
    run(py, || {
        rowwise::rowwise_linear(xs, rows, &layers, n, k, ids, y)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fused_linear, m)?)?;
    m.add_function(wrap_pyfunction!(rowwise_linear, m)?)?;
    Ok(())
}
