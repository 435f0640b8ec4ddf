//! Bindings of the packed per-tenant embedding rows (src/embedding.rs).

use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::gemv::{check_out_rows, shape_of, stack_of};
use super::{check_array, named, readonly, run, slice, slice_mut, writable_f32, ShapeError};
use crate::embedding;

/// `out[m] = base[tokens[m]] + tenant tenants[m]'s packed delta row of that
/// token`: float32 `base` `[V, H]`; `planes` uint32 `[T, P, V, W]`, `scales`
/// float32 `[T, P]` or `[T, P, V]`; int64 `tokens` (any shape, M values) and
/// `tenants` `[M]` (-1 = base row); float32 `out` `[..., H]`, overwritten.
#[pyfunction]
fn packed_embedding<'py>(
    py: Python<'py>,
    base: &Bound<'py, PyAny>,
    planes: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    tokens: &Bound<'py, PyAny>,
    tenants: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
) -> PyResult<()> {
    check_array(base, "base", 2, "float32")?;
    check_array(planes, "planes", 4, "uint32")?;
    check_array(scales, "scales", shape_of(scales).len(), "float32")?;
    check_array(tokens, "tokens", shape_of(tokens).len().max(1), "int64")?;
    check_array(tenants, "tenants", 1, "int64")?;
    check_array(out, "out", shape_of(out).len().max(1), "float32")?;
    let ba: PyReadonlyArray2<f32> = readonly(base, "base")?;
    let width = ba.shape()[1];
    let pa: PyReadonlyArrayDyn<u32> = readonly(planes, "planes")?;
    let sa: PyReadonlyArrayDyn<f32> = readonly(scales, "scales")?;
    let stack = stack_of(&pa, &sa, width)?;
    let ta: PyReadonlyArrayDyn<i64> = readonly(tokens, "tokens")?;
    check_out_rows(out, ta.len(), width)?;
    let na: PyReadonlyArray1<i64> = readonly(tenants, "tenants")?;
    let mut out_rw = writable_f32(out, || {
        named(&[
            ("base", base),
            ("planes", planes),
            ("scales", scales),
            ("tokens", tokens),
            ("tenants", tenants),
        ])
    })?;
    let b = slice(&ba, "base")?;
    let t = slice(&ta, "tokens")?;
    let n = slice(&na, "tenants")?;
    let y = slice_mut(&mut out_rw, "out")?;
    run(py, || embedding::packed_embedding(b, &stack, t, n, y))
}

/// `out[m] = tables[table[m]][tokens[m]]`: float32 `[V, H]` tables, int64
/// `tokens` (any shape, M values) and `table` `[M]`, float32 `out` `[..., H]`.
#[pyfunction]
fn gather_embedding<'py>(
    py: Python<'py>,
    tables: Vec<Bound<'py, PyAny>>,
    tokens: &Bound<'py, PyAny>,
    table: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
) -> PyResult<()> {
    check_array(tokens, "tokens", shape_of(tokens).len().max(1), "int64")?;
    check_array(table, "table", 1, "int64")?;
    check_array(out, "out", shape_of(out).len().max(1), "float32")?;
    let mut views: Vec<PyReadonlyArray2<f32>> = Vec::with_capacity(tables.len());
    for (i, t) in tables.iter().enumerate() {
        check_array(t, &format!("tables[{i}]"), 2, "float32")?;
        views.push(readonly(t, &format!("tables[{i}]"))?);
    }
    let Some(first) = views.first() else {
        return Err(ShapeError::new_err(
            "tables: expected at least one table, found none",
        ));
    };
    let (vocab, width) = (first.shape()[0], first.shape()[1]);
    // The core checks each table's length only: a [2V, H/2] table would be
    // read as [V, H].
    if let Some((i, v)) = views
        .iter()
        .enumerate()
        .find(|(_, v)| v.shape() != [vocab, width])
    {
        return Err(ShapeError::new_err(format!(
            "tables[{i}]: expected [{vocab}, {width}] (the shape of tables[0]), found {:?}",
            v.shape()
        )));
    }
    let slices: Vec<&[f32]> = views
        .iter()
        .enumerate()
        .map(|(i, v)| slice(v, &format!("tables[{i}]")))
        .collect::<PyResult<_>>()?;
    let ta: PyReadonlyArrayDyn<i64> = readonly(tokens, "tokens")?;
    let ia: PyReadonlyArray1<i64> = readonly(table, "table")?;
    let mut out_rw = writable_f32(out, || {
        let mut inputs = named(&[("tokens", tokens), ("table", table)]);
        for (i, t) in tables.iter().enumerate() {
            inputs.push((format!("tables[{i}]"), t.clone()));
        }
        inputs
    })?;
    let t = slice(&ta, "tokens")?;
    let i = slice(&ia, "table")?;
    let y = slice_mut(&mut out_rw, "out")?;
    run(py, || {
        embedding::gather_embedding(&slices, vocab, width, t, i, y)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(packed_embedding, m)?)?;
    m.add_function(wrap_pyfunction!(gather_embedding, m)?)?;
    Ok(())
}
