//! Checks of the arguments the Python bindings receive that need no Python:
//! sizes given as Python ints, the addresses of numpy arrays, an `out` array
//! that shares memory with an input. Here, not in src/python/, so that
//! `cargo test` (built without libpython) covers them.

use crate::error::{Error, Result};

/// A size or count argument as the binding extracted it: `Ok(v)` for an int
/// that fits in i64, `Err(text)` (the int as Python prints it) for one that
/// does not. The bindings take i64, not usize, because pyo3's own usize
/// conversion of a negative int raises an OverflowError that names no
/// argument; here the error says which one and what it was.
pub fn size_arg(found: std::result::Result<i64, String>, what: &str) -> Result<usize> {
    match found {
        Ok(v) => usize::try_from(v)
            .map_err(|_| Error::Shape(format!("{what}: expected an int >= 0, found {v}"))),
        Err(text) => Err(Error::Shape(format!(
            "{what}: expected an int in [0, 2**63), found {text}"
        ))),
    }
}

/// The data of an array must sit at a multiple of its element's alignment
/// to be read as a Rust slice; a numpy view at an odd byte offset (a
/// `uint8` buffer sliced by one, then `.view(np.float32)`) does not.
pub fn check_aligned(what: &str, addr: usize, align: usize) -> Result<()> {
    let off = addr % align.max(1);
    if off == 0 {
        return Ok(());
    }
    Err(Error::Shape(format!(
        "{what}: expected an array aligned to {align} bytes, found one at an address offset \
         by {off} (copy it: np.ascontiguousarray / np.require(..., requirements='A'))"
    )))
}

/// Why `out` could not be borrowed for writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutConflict {
    /// numpy marks it read-only.
    ReadOnly,
    /// Another argument of the call borrows (part of) its memory.
    Shared,
}

/// The first of `others` whose bytes `[start, end)` overlap `out`'s: the
/// argument to name when `out` is also an input.
pub fn overlapping<S: AsRef<str>>(
    out: (usize, usize),
    others: &[(S, (usize, usize))],
) -> Option<&str> {
    others
        .iter()
        .find(|(_, (s, e))| *s < out.1 && out.0 < *e)
        .map(|(name, _)| name.as_ref())
}

/// The error for an `out` that cannot be written: read-only, or shared with
/// the argument `with` (None: numpy did not say which).
pub fn out_conflict(kind: OutConflict, with: Option<&str>) -> Error {
    match kind {
        OutConflict::ReadOnly => {
            Error::Shape("out: expected a writable array, found a read-only one".into())
        }
        OutConflict::Shared => Error::Shape(match with {
            Some(name) => format!(
                "out: expected an array not shared with another argument, found it is also \
                 {name} (pass a separate output array)"
            ),
            // numpy's borrow flags also count a call running on another
            // thread (the GIL is released while the core runs).
            None => "out: expected an array not shared with another argument, found it in use \
                     by another argument or by a call running on another thread"
                .into(),
        }),
    }
}

/// The error for input `what` that numpy's borrow flags show is being
/// written: the `out` of a call running on another thread (the GIL is
/// released while the core runs), which a read here would race with.
pub fn input_in_use(what: &str) -> Error {
    Error::Shape(format!(
        "{what}: expected an array not being written, found it in use as the output of a call \
         running on another thread (pass a copy, or wait for that call to return)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_name_the_argument_and_the_value() {
        assert_eq!(size_arg(Ok(0), "rows").unwrap(), 0);
        assert_eq!(size_arg(Ok(7), "rows").unwrap(), 7);
        let e = size_arg(Ok(-3), "rows").unwrap_err();
        assert!(matches!(e, Error::Shape(_)));
        assert_eq!(e.to_string(), "rows: expected an int >= 0, found -3");
        let e = size_arg(Err("-1180591620717411303424".into()), "bits").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("bits: expected an int in [0, 2**63), found -1180591620717411303424"),
            "{e}"
        );
    }

    #[test]
    fn misaligned_addresses_are_a_clear_error() {
        assert!(check_aligned("x", 4096, 4).is_ok());
        assert!(check_aligned("x", 4097, 1).is_ok());
        assert!(check_aligned("x", 4097, 0).is_ok());
        let e = check_aligned("delta", 4097, 4).unwrap_err();
        assert!(matches!(e, Error::Shape(_)));
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "delta: expected an array aligned to 4 bytes, found one at an address offset by 1"
            ) && msg.contains("np.ascontiguousarray"),
            "{msg}"
        );
        let msg = check_aligned("tokens", 4100, 8).unwrap_err().to_string();
        assert!(
            msg.contains("aligned to 8 bytes") && msg.contains("offset by 4"),
            "{msg}"
        );
    }

    #[test]
    fn out_conflicts_say_which() {
        let others = [("x", (100, 200)), ("planes", (300, 400))];
        assert_eq!(overlapping((150, 160), &others), Some("x"));
        assert_eq!(overlapping((350, 500), &others), Some("planes"));
        assert_eq!(overlapping((200, 300), &others), None);
        let named = vec![(String::from("weights[1]"), (0usize, 8usize))];
        assert_eq!(overlapping((4, 12), &named), Some("weights[1]"));
        let msg = out_conflict(OutConflict::Shared, Some("x")).to_string();
        assert!(
            msg.starts_with(
                "out: expected an array not shared with another argument, found it is also x"
            ),
            "{msg}"
        );
        let msg = input_in_use("weights[1]").to_string();
        assert!(
            msg.starts_with("weights[1]: expected an array not being written, found it in use"),
            "{msg}"
        );
        assert!(msg.contains("as the output of a call running on another thread"));
        let msg = out_conflict(OutConflict::Shared, None).to_string();
        assert!(
            msg.contains("found it in use by another argument or by a call"),
            "{msg}"
        );
        assert_eq!(
            out_conflict(OutConflict::ReadOnly, None).to_string(),
            "out: expected a writable array, found a read-only one"
        );
    }
}
