//! The driver queries the probe makes (initialise, count and describe the GPUs, open each one's
//! context for its free memory), with status codes as plain integers (see `raw`), so that any
//! code a driver returns becomes a message instead of a crash.

use super::libs::Lib;
use super::raw;
use std::ffi::{c_char, c_void};

/// A failed driver call: which, and the driver's status code.
#[derive(Clone, Debug)]
pub struct DriverError {
    pub call: &'static str,
    pub code: i32,
    /// The driver's name for `code` (`CUDA_ERROR_NO_DEVICE`), when it has one.
    pub name: Option<String>,
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self
            .name
            .as_deref()
            .unwrap_or("an error code this driver does not name");
        write!(f, "{} failed: {name} ({})", self.call, self.code)
    }
}

// The status codes the probe gives its own fix for (cuda.h).
pub const OUT_OF_MEMORY: i32 = 2;
pub use super::libs::STUB_LIBRARY;
pub const DEVICE_UNAVAILABLE: i32 = 46;
pub const NO_DEVICE: i32 = 100;
pub const SYSTEM_DRIVER_MISMATCH: i32 = 803;

// CUdevice_attribute values (cuda.h).
const COMPUTE_CAPABILITY_MAJOR: i32 = 75;
const COMPUTE_CAPABILITY_MINOR: i32 = 76;
const MULTIPROCESSOR_COUNT: i32 = 16;
const CLOCK_RATE: i32 = 13;

type Ctx = *mut c_void;

/// `libcuda.so.1`'s entry points the probe calls.
pub struct Driver {
    init: unsafe extern "C" fn(u32) -> i32,
    count: unsafe extern "C" fn(*mut i32) -> i32,
    get: unsafe extern "C" fn(*mut i32, i32) -> i32,
    attribute: unsafe extern "C" fn(*mut i32, i32, i32) -> i32,
    name: unsafe extern "C" fn(*mut c_char, i32, i32) -> i32,
    total_mem: unsafe extern "C" fn(*mut usize, i32) -> i32,
    retain: unsafe extern "C" fn(*mut Ctx, i32) -> i32,
    release: unsafe extern "C" fn(i32) -> i32,
    push: unsafe extern "C" fn(Ctx) -> i32,
    pop: unsafe extern "C" fn(*mut Ctx) -> i32,
    mem_info: unsafe extern "C" fn(*mut usize, *mut usize) -> i32,
    error_name: unsafe extern "C" fn(i32, *mut *const c_char) -> i32,
}

/// What the driver says about one GPU.
pub struct Device {
    /// The driver's handle (`CUdevice`).
    pub handle: i32,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub memory_total: u64,
    pub sm_count: i32,
    pub clock_khz: i32,
}

impl Driver {
    /// Binds the entry points of the loaded driver library; an error names a missing one.
    pub fn load() -> Result<Driver, String> {
        // SAFETY: each type is the entry point's C signature in CUDA 12 and 13 (the `_v2`
        // names are the ones the headers map the plain names to).
        unsafe {
            Ok(Driver {
                init: raw::entry(Lib::Driver, "cuInit")?,
                count: raw::entry(Lib::Driver, "cuDeviceGetCount")?,
                get: raw::entry(Lib::Driver, "cuDeviceGet")?,
                attribute: raw::entry(Lib::Driver, "cuDeviceGetAttribute")?,
                name: raw::entry(Lib::Driver, "cuDeviceGetName")?,
                total_mem: raw::entry(Lib::Driver, "cuDeviceTotalMem_v2")?,
                retain: raw::entry(Lib::Driver, "cuDevicePrimaryCtxRetain")?,
                release: raw::entry(Lib::Driver, "cuDevicePrimaryCtxRelease_v2")?,
                push: raw::entry(Lib::Driver, "cuCtxPushCurrent_v2")?,
                pop: raw::entry(Lib::Driver, "cuCtxPopCurrent_v2")?,
                mem_info: raw::entry(Lib::Driver, "cuMemGetInfo_v2")?,
                error_name: raw::entry(Lib::Driver, "cuGetErrorName")?,
            })
        }
    }

    fn check(&self, call: &'static str, code: i32) -> Result<(), DriverError> {
        if code == 0 {
            return Ok(());
        }
        let mut p = std::ptr::null();
        // SAFETY: cuGetErrorName takes any code; on success it points `p` at a static string.
        let name = unsafe { ((self.error_name)(code, &mut p) == 0).then(|| raw::c_str(p)) };
        Err(DriverError {
            call,
            code,
            name: name.flatten(),
        })
    }

    pub fn init(&self) -> Result<(), DriverError> {
        // SAFETY: cuInit takes flags, which must be 0.
        self.check("cuInit", unsafe { (self.init)(0) })
    }

    pub fn device_count(&self) -> Result<usize, DriverError> {
        let mut n = 0;
        // SAFETY: writes one int.
        self.check("cuDeviceGetCount", unsafe { (self.count)(&mut n) })?;
        Ok(n.max(0) as usize)
    }

    pub fn device(&self, index: usize) -> Result<Device, DriverError> {
        let mut dev = 0;
        // SAFETY: writes one int; the driver checks the ordinal.
        self.check("cuDeviceGet", unsafe { (self.get)(&mut dev, index as i32) })?;
        let attr = |a| {
            let mut v = 0;
            // SAFETY: writes one int for a valid device and attribute.
            self.check("cuDeviceGetAttribute", unsafe {
                (self.attribute)(&mut v, a, dev)
            })
            .map(|()| v)
        };
        let mut name = [0 as c_char; 256];
        // SAFETY: the driver writes at most `len` bytes, NUL-terminated.
        self.check("cuDeviceGetName", unsafe {
            (self.name)(name.as_mut_ptr(), name.len() as i32 - 1, dev)
        })?;
        let mut total = 0usize;
        // SAFETY: writes one size_t.
        self.check("cuDeviceTotalMem", unsafe {
            (self.total_mem)(&mut total, dev)
        })?;
        Ok(Device {
            handle: dev,
            // SAFETY: the array is NUL-terminated (its last byte is never written).
            name: unsafe { raw::c_str(name.as_ptr()) }.unwrap_or_default(),
            compute_capability: (
                attr(COMPUTE_CAPABILITY_MAJOR)?,
                attr(COMPUTE_CAPABILITY_MINOR)?,
            ),
            memory_total: total as u64,
            sm_count: attr(MULTIPROCESSOR_COUNT)?,
            // Deprecated in CUDA 13's headers: a driver that stops answering it must not hide
            // the GPU (0 = unknown).
            clock_khz: attr(CLOCK_RATE).unwrap_or(0),
        })
    }

    /// The free memory of the GPU with handle `dev`, through its primary context (the one
    /// training will use): an error here (the GPU is exclusive to another process, or full)
    /// means flint cannot use it.
    pub fn free_memory(&self, dev: i32) -> Result<u64, DriverError> {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: retains the device's primary context, released below on every path.
        self.check("cuDevicePrimaryCtxRetain", unsafe {
            (self.retain)(&mut ctx, dev)
        })?;
        // SAFETY: `ctx` is live; it is pushed and popped on this thread only.
        let free = self
            .check("cuCtxPushCurrent", unsafe { (self.push)(ctx) })
            .and_then(|()| {
                let (mut free, mut total) = (0usize, 0usize);
                let got = self.check("cuMemGetInfo", unsafe {
                    (self.mem_info)(&mut free, &mut total)
                });
                let mut popped = std::ptr::null_mut();
                // SAFETY: pops the context pushed above.
                unsafe { (self.pop)(&mut popped) };
                got.map(|()| free as u64)
            });
        // SAFETY: releases the retain above.
        unsafe { (self.release)(dev) };
        free
    }
}
