//! Bindings of the .qdelta store core: open / verify / write files and the
//! base fingerprint. Tensors come out as read-only uint8 numpy views of the
//! mapping (zero-copy); the Python face gives them their dtype and shape.

use std::collections::BTreeMap;
use std::path::PathBuf;

use numpy::ndarray::ArrayView1;
use numpy::npyffi::NPY_ARRAY_WRITEABLE;
use numpy::{PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::{run, slice, to_py, Size};
use crate::bitplane::ScaleMode;
use crate::fingerprint::{self as fp, Weight};
use crate::header::Dtype;
use crate::store;

/// A memory-mapped, header-validated .qdelta file (the core of qdelta.DeltaFile).
#[pyclass(frozen, name = "DeltaFile", module = "qdelta._core")]
struct PyDeltaFile {
    inner: store::DeltaFile,
}

#[pymethods]
impl PyDeltaFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = run(py, || store::DeltaFile::open(&path))?;
        Ok(PyDeltaFile { inner })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// File size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// The raw `__metadata__` map.
    #[getter]
    fn metadata(&self) -> BTreeMap<String, String> {
        self.inner.contents.metadata.clone()
    }

    #[getter]
    fn format_version(&self) -> u32 {
        self.inner.contents.version
    }

    #[getter]
    fn tenant(&self) -> String {
        self.inner.contents.tenant.clone()
    }

    #[getter]
    fn creator(&self) -> String {
        self.inner.contents.creator.clone()
    }

    #[getter]
    fn base_fingerprint(&self) -> String {
        self.inner.contents.base_fingerprint.clone()
    }

    #[getter]
    fn user_metadata(&self) -> BTreeMap<String, String> {
        self.inner.contents.user.clone()
    }

    /// An error when the mapped file was truncated or rewritten in place since it
    /// was opened (one fstat): views handed out before are checked again here.
    fn check_unchanged(&self) -> PyResult<()> {
        self.inner.check_unchanged().map_err(to_py)
    }

    /// The layer table: (module, (out, in), bits, scale, transposed, planes tensor, scales tensor).
    #[allow(clippy::type_complexity)]
    #[getter]
    fn layers(&self) -> Vec<(String, (usize, usize), usize, String, bool, String, String)> {
        self.inner
            .contents
            .layers
            .iter()
            .map(|(n, e)| {
                (
                    n.clone(),
                    (e.shape[0], e.shape[1]),
                    e.bits,
                    e.scale.clone(),
                    e.transposed,
                    e.planes.clone(),
                    e.scales.clone(),
                )
            })
            .collect()
    }

    /// One row of the layer table (see `layers`).
    #[allow(clippy::type_complexity)]
    fn layer(
        &self,
        name: &str,
    ) -> PyResult<(String, (usize, usize), usize, String, bool, String, String)> {
        let e = self.inner.contents.layers.get(name).ok_or_else(|| {
            let known: Vec<&str> = self
                .inner
                .contents
                .layers
                .keys()
                .take(10)
                .map(|k| k.as_str())
                .collect();
            to_py(crate::Error::Value(format!(
                "{}: no layer named {name:?} (layers: {}{})",
                self.inner.path.display(),
                known.join(", "),
                if self.inner.contents.layers.len() > 10 {
                    ", ..."
                } else {
                    ""
                }
            )))
        })?;
        Ok((
            name.to_string(),
            (e.shape[0], e.shape[1]),
            e.bits,
            e.scale.clone(),
            e.transposed,
            e.planes.clone(),
            e.scales.clone(),
        ))
    }

    /// Names of the parameters kept whole.
    #[getter]
    fn params(&self) -> Vec<String> {
        self.inner.contents.params.clone()
    }

    /// Every tensor: (name, dtype, shape, nbytes), in file order.
    #[getter]
    fn tensors(&self) -> Vec<(String, &'static str, Vec<usize>, usize)> {
        self.inner
            .contents
            .header
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype.name(), t.shape.clone(), t.nbytes()))
            .collect()
    }

    /// (dtype, shape, read-only uint8 view of the bytes) of tensor `name`.
    #[allow(clippy::type_complexity)]
    fn tensor<'py>(
        slf: Bound<'py, Self>,
        name: &str,
    ) -> PyResult<(&'static str, Vec<usize>, Bound<'py, PyArray1<u8>>)> {
        let this = slf.get();
        let (info, bytes) = this.inner.bytes(name).map_err(to_py)?;
        let view = ArrayView1::from(bytes);
        // SAFETY: the array borrows the mapping owned by `slf`, which it holds
        // as its base object; the mapping is never written or unmapped while
        // `slf` lives. The array is made read-only before anyone sees it.
        let arr = unsafe { PyArray1::borrow_from_array(&view, slf.clone().into_any()) };
        // SAFETY: clearing WRITEABLE on an array nobody else has seen yet is
        // what numpy's PyArray_CLEARFLAGS does.
        unsafe { (*arr.as_array_ptr()).fields.flags &= !NPY_ARRAY_WRITEABLE };
        Ok((info.dtype.name(), info.shape.clone(), arr))
    }

    /// Whether the file has a header checksum, so that `verify` covers the
    /// tensor table and metadata too (files written before it have none).
    #[getter]
    fn header_covered(&self) -> bool {
        self.inner.header_covered()
    }

    /// Checks the header checksum (when the file has one) and every tensor
    /// checksum; returns how many tensors were checked.
    fn verify(&self, py: Python<'_>) -> PyResult<usize> {
        run(py, || self.inner.verify())
    }
}

fn extract_bytes<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArray1<'py, u8>> {
    super::check_array(obj, what, 1, "uint8")?;
    super::readonly(obj, what)
}

/// The dims of tensor `name`'s shape, each an int >= 0.
fn dims(shape: &[Size], name: &str) -> PyResult<Vec<usize>> {
    shape
        .iter()
        .enumerate()
        .map(|(i, d)| d.get(&format!("{name} shape[{i}]")))
        .collect()
}

fn dtype(name: &str) -> PyResult<Dtype> {
    Dtype::parse(name).map_err(to_py)
}

/// Writes a .qdelta file atomically.
///
/// layers: [(module, (out, in), bits, scale, transposed, planes u8, scales u8)];
/// params: [(name, dtype, shape, bytes u8)].
#[allow(clippy::type_complexity)]
#[pyfunction]
fn write_delta(
    py: Python<'_>,
    path: PathBuf,
    layers: Vec<(
        String,
        (Size, Size),
        Size,
        String,
        bool,
        Bound<'_, PyAny>,
        Bound<'_, PyAny>,
    )>,
    params: Vec<(String, String, Vec<Size>, Bound<'_, PyAny>)>,
    tenant: String,
    base_fingerprint: String,
    user_metadata: BTreeMap<String, String>,
) -> PyResult<()> {
    let mut held = Vec::new();
    let mut held_names = Vec::new();
    let mut layer_meta = Vec::new();
    for (name, (rows, cols), bits, scale, transposed, planes, scales) in &layers {
        let shape = (
            rows.get(&format!("{name} shape[0]"))?,
            cols.get(&format!("{name} shape[1]"))?,
        );
        let bits = bits.get(&format!("{name} bits"))?;
        let mode = ScaleMode::parse(scale).map_err(to_py)?;
        for (what, arr) in [("planes", planes), ("scales", scales)] {
            let what = format!("{name} {what}");
            held.push(extract_bytes(arr, &what)?);
            held_names.push(what);
        }
        layer_meta.push((name.clone(), shape, bits, mode, *transposed));
    }
    let mut param_meta = Vec::new();
    for (name, dt, shape, data) in &params {
        let shape = dims(shape, name)?;
        param_meta.push((name.clone(), dtype(dt)?, shape));
        held.push(extract_bytes(data, name)?);
        held_names.push(name.clone());
    }
    let slices: Vec<&[u8]> = held
        .iter()
        .zip(&held_names)
        .map(|(a, name)| slice(a, name))
        .collect::<PyResult<_>>()?;
    let n_layers = layer_meta.len();
    let data = store::DeltaData {
        layers: layer_meta
            .into_iter()
            .enumerate()
            .map(
                |(i, (name, shape, bits, scale, transposed))| store::LayerData {
                    name,
                    shape: [shape.0, shape.1],
                    bits,
                    scale,
                    transposed,
                    planes: slices[2 * i],
                    scales: slices[2 * i + 1],
                },
            )
            .collect(),
        params: param_meta
            .into_iter()
            .enumerate()
            .map(|(i, (name, dtype, shape))| store::TensorData {
                name,
                dtype,
                shape,
                data: slices[2 * n_layers + i],
            })
            .collect(),
        tenant,
        base_fingerprint,
        user: user_metadata,
    };
    run(py, || store::write(&path, &data))
}

/// Replaces `path` with `data` atomically: the writer of .qdelta files (a
/// temporary beside it, fsync, rename; the old mode kept; special files and
/// directories refused; dead writers' temporaries swept) for any content, so
/// every file qdelta writes follows one set of rules.
#[pyfunction]
fn write_file(py: Python<'_>, path: PathBuf, data: &[u8]) -> PyResult<()> {
    run(py, || {
        store::write_atomic(&path, |w| {
            use std::io::Write;
            w.write_all(data)
        })
    })
}

/// The bytes of the regular file `path` (`store::read_regular`): the reader's
/// rules for special files, for every file qdelta reads whole.
#[pyfunction]
fn read_file<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    let data = run(py, || store::read_regular(&path))?;
    Ok(pyo3::types::PyBytes::new(py, &data))
}

/// The base fingerprint of [(name, dtype, shape, bytes u8)].
#[pyfunction]
fn fingerprint(py: Python<'_>, weights: &Bound<'_, PyList>) -> PyResult<String> {
    let mut meta = Vec::with_capacity(weights.len());
    let mut held = Vec::with_capacity(weights.len());
    for item in weights.iter() {
        let (name, dt, shape, data): (String, String, Vec<Size>, Bound<'_, PyAny>) =
            item.extract()?;
        let shape = dims(&shape, &name)?;
        held.push(extract_bytes(&data, &name)?);
        meta.push((name, dt, shape));
    }
    let mut ws: Vec<Weight<'_>> = Vec::with_capacity(meta.len());
    for ((name, dtype, shape), a) in meta.into_iter().zip(held.iter()) {
        let data = slice(a, &name)?;
        ws.push(Weight {
            name,
            dtype,
            shape,
            data,
        });
    }
    run(py, || fp::fingerprint(&mut ws))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDeltaFile>()?;
    m.add_function(wrap_pyfunction!(write_delta, m)?)?;
    m.add_function(wrap_pyfunction!(fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(write_file, m)?)?;
    m.add_function(wrap_pyfunction!(read_file, m)?)?;
    m.add("FORMAT_VERSION", store::FORMAT_VERSION)?;
    m.add("BIT_LAYOUT", store::BIT_LAYOUT)?;
    Ok(())
}
