//! PyO3 bindings, and nothing else: check the numpy arrays, release the GIL,
//! call the core, map errors and panics to the qdelta exception family.
//! One file per core module; each has a `register` function.

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::{
    PyArrayDyn, PyArrayMethods, PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use crate::error::Error;

mod bitplane;
mod embedding;
mod fused;
mod gemv;
mod rmsnorm;
mod store;

create_exception!(
    _core,
    QDeltaError,
    PyException,
    "Base class of every qdelta error."
);
create_exception!(
    _core,
    ShapeError,
    QDeltaError,
    "A shape, size or length does not fit."
);
create_exception!(
    _core,
    DTypeError,
    QDeltaError,
    "An unsupported or mismatched dtype."
);
create_exception!(
    _core,
    NonFiniteError,
    QDeltaError,
    "NaN or Inf where finite values are required."
);

create_exception!(
    _core,
    FormatError,
    QDeltaError,
    "A file that is not a valid .qdelta (safetensors) file."
);
create_exception!(
    _core,
    UnsupportedVersionError,
    FormatError,
    "A .qdelta file of a format version this qdelta does not read."
);
create_exception!(
    _core,
    ChecksumError,
    QDeltaError,
    "Tensor bytes that do not match their recorded checksum (a corrupt file)."
);
create_exception!(
    _core,
    FileError,
    QDeltaError,
    "A file or directory that cannot be opened, read or written."
);

pub(crate) fn to_py(err: Error) -> PyErr {
    match err {
        Error::Shape(m) => ShapeError::new_err(m),
        Error::DType(m) => DTypeError::new_err(m),
        Error::NonFinite(m) => NonFiniteError::new_err(m),
        Error::Value(m) => QDeltaError::new_err(m),
        Error::Format(m) => FormatError::new_err(m),
        Error::UnsupportedVersion(m) => UnsupportedVersionError::new_err(m),
        Error::Checksum(m) => ChecksumError::new_err(m),
        Error::File(m) => FileError::new_err(m),
    }
}

/// Runs core work without the GIL; a panic becomes a QDeltaError, never an abort.
pub(crate) fn run<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(work)));
    match outcome {
        Ok(result) => result.map_err(to_py),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(QDeltaError::new_err(format!(
                "internal error in the qdelta core (please report it): {msg}"
            )))
        }
    }
}

/// `out` (a float32 array of any shape, checked by `check_array`) for
/// writing, refused when another argument of the call shares its memory.
pub(crate) fn writable_f32<'py>(
    out: &Bound<'py, PyAny>,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    let arr: Bound<'py, PyArrayDyn<f32>> = out.clone().cast_into()?;
    arr.try_readwrite().map_err(|e| {
        ShapeError::new_err(format!(
            "out: expected an array not used by another argument ({e})"
        ))
    })
}

/// Rank, C-contiguity and dtype of an incoming array, with a clear message.
pub(crate) fn check_array(
    arr: &Bound<'_, PyAny>,
    what: &str,
    ndim: usize,
    dtype: &str,
) -> PyResult<()> {
    let untyped = arr.cast::<PyUntypedArray>().map_err(|_| {
        DTypeError::new_err(format!(
            "{what}: expected a numpy array, found {}",
            arr.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    if untyped.ndim() != ndim {
        return Err(ShapeError::new_err(format!(
            "{what}: expected a {ndim}-D array, found {}-D with shape {:?}",
            untyped.ndim(),
            untyped.shape()
        )));
    }
    use numpy::PyArrayDescrMethods;
    let descr = untyped.dtype();
    // Fast check without formatting the dtype (a Python call): kind + size,
    // native byte order; the name is only built for the error message.
    let fast = matches!(
        (descr.kind(), descr.itemsize(), dtype),
        (b'f', 4, "float32")
            | (b'u', 4, "uint32")
            | (b'i', 8, "int64")
            | (b'u', 2, "uint16")
            | (b'u', 1, "uint8")
    ) && descr.is_native_byteorder() != Some(false);
    let found = if fast {
        String::new()
    } else {
        descr.to_string()
    };
    if !fast && found != dtype {
        return Err(DTypeError::new_err(format!(
            "{what}: expected dtype {dtype}, found {found}"
        )));
    }
    if !untyped.is_c_contiguous() {
        return Err(ShapeError::new_err(format!(
            "{what}: expected a C-contiguous array, found strides {:?} \
             (pass np.ascontiguousarray(x) or tensor.contiguous())",
            untyped.strides()
        )));
    }
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("QDeltaError", py.get_type::<QDeltaError>())?;
    m.add("ShapeError", py.get_type::<ShapeError>())?;
    m.add("DTypeError", py.get_type::<DTypeError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add(
        "UnsupportedVersionError",
        py.get_type::<UnsupportedVersionError>(),
    )?;
    m.add("ChecksumError", py.get_type::<ChecksumError>())?;
    m.add("FileError", py.get_type::<FileError>())?;
    bitplane::register(m)?;
    gemv::register(m)?;
    fused::register(m)?;
    embedding::register(m)?;
    rmsnorm::register(m)?;
    store::register(m)?;
    Ok(())
}
