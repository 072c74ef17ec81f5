//! Entry points of the CUDA libraries called with their status codes as plain integers.
//!
//! cudarc declares each status as a Rust enum, so a code outside it (one a newer driver added,
//! or a broken library's garbage) is undefined behaviour, and it killed the process with
//! SIGILL or SIGSEGV before anything was printed. The probe (`flint doctor`, `--device auto`)
//! and the kernel compiler go through these instead, so such a library is reported, not fatal.

use super::libs::{self, Lib};
use std::ffi::{c_char, CStr};

/// The entry point `name` of the loaded `lib`, as the C function pointer type `F`.
///
/// SAFETY: `F` must be the entry point's C signature.
pub unsafe fn entry<F: Copy>(lib: Lib, name: &str) -> Result<F, String> {
    use libloading::os::unix::{Library, RTLD_NOW};
    let found = libs::loaded(lib).ok_or_else(|| format!("{} is not loaded", lib.name()))?;
    // The library stays loaded for the life of the process (`libs` never closes it), so the
    // pointer outlives this handle; forgetting the handle keeps its reference count as well.
    let library =
        Library::open(Some(&found.path), RTLD_NOW).map_err(|e| libs::loader_message(&e))?;
    let f = library
        .get::<F>(name.as_bytes())
        .map(|s| *s)
        .map_err(|e| format!("no {name}: {}", libs::loader_message(&e)));
    std::mem::forget(library);
    f
}

/// A NUL-terminated string a library returned, or `None` for a null pointer.
///
/// SAFETY: `p` must be null or point at a NUL-terminated string that outlives the call.
pub unsafe fn c_str(p: *const c_char) -> Option<String> {
    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
}
