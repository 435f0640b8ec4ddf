//! PyO3 bindings, and nothing else: check the numpy arrays, release the GIL,
//! call the core, map errors and panics to the qdelta exception family.
//! One file per core module; each has a `register` function.

use std::panic::{catch_unwind, AssertUnwindSafe};

use numpy::ndarray::Dimension;
use numpy::{
    BorrowError, Element, PyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArray, PyReadwriteArray,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOverflowError, PyTypeError};
use pyo3::types::PyBool;
use pyo3::prelude::*;

use crate::args::{self, OutConflict};
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
/// writing. Every input must already be borrowed (read-only) when this is
/// called, so that an `out` that is also an input is caught here and named:
/// `others` lists the inputs by name, built only on that error (the call is
/// on the per-token path).
pub(crate) fn writable_f32<'py>(
    out: &Bound<'py, PyAny>,
    others: impl FnOnce() -> Vec<(String, Bound<'py, PyAny>)>,
) -> PyResult<PyReadwriteArrayDyn<'py, f32>> {
    let arr: Bound<'py, PyArrayDyn<f32>> = out.clone().cast_into()?;
    let overlap = |others: Vec<(String, Bound<'py, PyAny>)>| {
        let ranges: Vec<(String, (usize, usize))> = others
            .into_iter()
            .filter_map(|(name, a)| byte_range(&a).map(|r| (name, r)))
            .collect();
        byte_range(out).and_then(|r| args::overlapping(r, &ranges).map(str::to_owned))
    };
    match arr.try_readwrite() {
        // numpy's borrow flags only see arrays with one base object: views of
        // one buffer made separately (e.g. two torch views' .numpy()) pass
        // them, so the address ranges are compared too.
        Ok(rw) => match overlap(others()) {
            None => Ok(rw),
            Some(name) => Err(to_py(args::out_conflict(OutConflict::Shared, Some(&name)))),
        },
        Err(BorrowError::NotWriteable) => {
            Err(to_py(args::out_conflict(OutConflict::ReadOnly, None)))
        }
        Err(_) => {
            let with = overlap(others());
            Err(to_py(args::out_conflict(
                OutConflict::Shared,
                with.as_deref(),
            )))
        }
    }
}

/// Input `what` borrowed for reading. A wrong type, rank or dtype fails as
/// numpy's extraction does; an array being written meanwhile (the `out` of
/// a call running on another thread: numpy's borrow flags say so) is a
/// ShapeError naming `what`, not numpy's bare TypeError "already borrowed".
/// Every read-only array argument goes through here.
pub(crate) fn readonly<'py, T: Element, D: Dimension>(
    arr: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    arr.extract().or_else(|err: PyErr| {
        // Only on the error path: if the type, rank and dtype fit, the borrow
        // is what failed (the flags cannot change meanwhile: the GIL is held).
        match arr.cast::<PyArray<T, D>>() {
            Ok(typed) => typed
                .try_readonly()
                .map_err(|_| to_py(args::input_in_use(what))),
            Err(_) => Err(err),
        }
    })
}

/// The inputs of a call by name, for `writable_f32`.
pub(crate) fn named<'py>(args: &[(&str, &Bound<'py, PyAny>)]) -> Vec<(String, Bound<'py, PyAny>)> {
    args.iter()
        .map(|(n, a)| (n.to_string(), (*a).clone()))
        .collect()
}

/// The bytes `[start, end)` a (C-contiguous) numpy array spans; None for an
/// empty array or anything else.
fn byte_range(arr: &Bound<'_, PyAny>) -> Option<(usize, usize)> {
    let a = arr.cast::<PyUntypedArray>().ok()?;
    let start = data_addr(a);
    use numpy::PyArrayDescrMethods;
    if a.len() == 0 {
        return None; // no bytes: overlaps nothing
    }
    let len = a.len() * a.dtype().itemsize();
    Some((start, start + len))
}

/// The address of an array's first element.
fn data_addr(a: &Bound<'_, PyUntypedArray>) -> usize {
    // SAFETY: reads one field of the live array object `a` holds.
    unsafe { (*a.as_array_ptr()).fields.data as usize }
}

/// The elements of a checked (aligned, C-contiguous) array. `check_array`
/// has refused the arrays this fails on; the error, not a panic, stays in
/// case numpy's own flags disagree with those checks.
pub(crate) fn slice<'a, T: Element, D: Dimension>(
    a: &'a PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| not_a_slice(what))
}

/// `slice` for an array borrowed for writing.
pub(crate) fn slice_mut<'a, T: Element, D: Dimension>(
    a: &'a mut PyReadwriteArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut().map_err(|_| not_a_slice(what))
}

fn not_a_slice(what: &str) -> PyErr {
    ShapeError::new_err(format!(
        "{what}: expected an aligned, C-contiguous array, found one numpy does not flag as both \
         (copy it: np.ascontiguousarray / np.require(..., requirements='CA'))"
    ))
}

/// A size or count argument (see `args::size_arg`): taken as any Python
/// int so that a negative or huge one gets an error naming the argument,
/// where pyo3's usize conversion raises an OverflowError naming nothing.
#[derive(Clone, Debug)]
pub(crate) struct Size(std::result::Result<i64, String>);

impl<'a, 'py> FromPyObject<'a, 'py> for Size {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        // A bool is an int to Python, never a size here; a float is named, not a TypeError.
        if obj.is_instance_of::<PyBool>() {
            return Ok(Size(Err(format!("{} (a bool)", obj.str()?))));
        }
        match obj.extract::<i64>() {
            Ok(v) => Ok(Size(Ok(v))),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
                Ok(Size(Err(obj.str()?.to_string())))
            }
            Err(e) if e.is_instance_of::<PyTypeError>(obj.py()) => Ok(Size(Err(format!(
                "{} (a {})",
                obj.repr()?,
                obj.get_type().name()?
            )))),
            Err(e) => Err(e),
        }
    }
}

impl Size {
    /// The value as a usize, or a ShapeError naming `what`.
    pub(crate) fn get(&self, what: &str) -> PyResult<usize> {
        args::size_arg(self.0.clone(), what).map_err(to_py)
    }
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
    // A contiguous view can still start at an odd byte (a uint8 buffer
    // sliced by one, then viewed as float32): not readable as a Rust slice.
    // An empty array is read as an empty slice wherever it points.
    if untyped.len() > 0 {
        let align = match dtype {
            "float32" => std::mem::align_of::<f32>(),
            "uint32" => std::mem::align_of::<u32>(),
            "int64" => std::mem::align_of::<i64>(),
            "uint16" => std::mem::align_of::<u16>(),
            _ => 1,
        };
        args::check_aligned(what, data_addr(untyped), align).map_err(to_py)?;
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
