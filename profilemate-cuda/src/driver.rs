//! The real event API over cudarc's driver bindings, and the check that CUDA can be used at all
//! before any cudarc call (cudarc panics when it cannot load the library or a symbol).

use crate::api::{EventApi, EventError};
use crate::CudaError;
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use std::ffi::{c_char, CStr};
use std::sync::{Arc, OnceLock};

/// The driver library's name as users know it.
#[cfg(windows)]
pub(crate) const DRIVER_LIBRARY: &str = "nvcuda.dll";
/// The driver library's name as users know it.
#[cfg(not(windows))]
pub(crate) const DRIVER_LIBRARY: &str = "libcuda.so.1";

#[cfg(windows)]
const LIBRARY_CANDIDATES: &[&str] = &["nvcuda.dll"];
#[cfg(not(windows))]
const LIBRARY_CANDIDATES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// The driver entry points cudarc calls on our behalf, by the symbol names its bindings load.
/// An older driver lacking one of them would make cudarc panic at the first call.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
    "cuStreamGetCtx",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventDestroy_v2",
    "cuGetErrorName",
    "cuGetErrorString",
];

/// cudarc's CUDA 13 bindings time events with `cuEventElapsedTime_v2` (drivers from 12.8 on);
/// earlier bindings with `cuEventElapsedTime`.
const ELAPSED_SYMBOL: &str = if sys::CUDA_VERSION >= 13000 { "cuEventElapsedTime_v2" } else { "cuEventElapsedTime" };

/// Checks, without panicking and without touching cudarc until it is safe, that the CUDA driver
/// library loads, has every entry point this crate uses, and sees at least one device. The
/// answer is computed once per process.
///
/// ```
/// match profilemate_cuda::probe() {
///     Ok(()) => println!("CUDA events available"),
///     Err(why) => println!("no CUDA timing here: {why}"),
/// }
/// ```
///
/// # Errors
///
/// [`CudaError::Unavailable`] saying why: the library is not found (`libcuda.so.1 not found`),
/// the driver is too old for the bindings this program was built with, or there is no device.
pub fn probe() -> Result<(), CudaError> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(run_probe).clone().map_err(|reason| CudaError::Unavailable { reason })
}

fn run_probe() -> Result<(), String> {
    let library = LIBRARY_CANDIDATES
        .iter()
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which is what any CUDA
        // program does at start-up; nothing else is called here.
        .find_map(|name| unsafe { libloading::Library::new(*name) }.ok())
        .ok_or_else(|| format!("{DRIVER_LIBRARY} not found"))?;
    let bindings = format!("CUDA {}.{}", sys::CUDA_VERSION / 1000, sys::CUDA_VERSION % 1000 / 10);
    for symbol in REQUIRED_SYMBOLS.iter().chain(std::iter::once(&ELAPSED_SYMBOL)) {
        // SAFETY: only the symbol's address is looked up; it is not called.
        if unsafe { library.get::<*const ()>(symbol.as_bytes()) }.is_err() {
            let driver = driver_version(&library).map_or_else(String::new, |v| format!(" (driver API {v})"));
            return Err(format!(
                "the CUDA driver{driver} is too old for this build's {bindings} bindings: {DRIVER_LIBRARY} has no \
                 {symbol}; update the driver or rebuild with CUDARC_CUDA_VERSION set to the driver's version \
                 (for example 12000)"
            ));
        }
    }
    // Keep the library loaded for the life of the process: cudarc loads it again by name, and the
    // error strings it hands out point into it.
    std::mem::forget(library);
    result::init().map_err(|e| format!("cuInit failed: {}", event_error(e)))?;
    let devices = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {}", event_error(e)))?;
    if devices < 1 {
        return Err("no CUDA device is visible (cuDeviceGetCount returned 0)".into());
    }
    Ok(())
}

fn driver_version(library: &libloading::Library) -> Option<String> {
    type GetVersion = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: `cuDriverGetVersion(int*)` has this signature in every driver, and may be called
    // before `cuInit`.
    let get = unsafe { library.get::<GetVersion>(b"cuDriverGetVersion") }.ok()?;
    let mut v = 0;
    // SAFETY: `v` is a valid, writable int.
    (unsafe { get(&mut v) } == 0).then(|| format!("{}.{}", v / 1000, v % 1000 / 10))
}

/// A `'static` string from the driver (its error strings live as long as the loaded library,
/// which is never unloaded: see [`run_probe`]).
fn driver_str(f: unsafe fn(sys::CUresult, *mut *const c_char) -> sys::CUresult, code: sys::CUresult) -> &'static str {
    let mut ptr: *const c_char = std::ptr::null();
    // SAFETY: the driver writes a pointer to a static, NUL-terminated string, or fails.
    let ok = unsafe { f(code, &mut ptr) } == sys::CUresult::CUDA_SUCCESS;
    if !ok || ptr.is_null() {
        return "";
    }
    // SAFETY: non-null, NUL-terminated, static for the life of the loaded driver.
    unsafe { CStr::from_ptr::<'static>(ptr) }.to_str().unwrap_or("")
}

/// A cudarc driver error as an [`EventError`] (no allocation).
pub(crate) fn event_error(e: DriverError) -> EventError {
    EventError {
        code: e.0 as i32,
        name: driver_str(sys::cuGetErrorName, e.0),
        description: driver_str(sys::cuGetErrorString, e.0),
    }
}

/// Keeps the stream's context alive as long as the events made in it.
#[derive(Debug)]
enum Owner {
    Stream(#[allow(dead_code)] Arc<CudaStream>),
    Borrowed,
}

/// CUDA events on one stream, through cudarc's driver API (`cudarc::driver::result` and `sys`).
///
/// Events are created in the stream's context with `CU_EVENT_DEFAULT` (timing on; not
/// `CU_EVENT_BLOCKING_SYNC`, which is only about how a synchronising thread waits, and the
/// backend never synchronises). Creation and destruction push the context and pop it again, so
/// the caller's current context is left as it was. Recording happens on the engine thread, which
/// has the stream's context current as a matter of course (it launches work on that stream); if a
/// thread with no context at all records, the stream's context is made current there. Queries run
/// on profilemate's collector thread, which the driver makes current in that context once.
///
/// ```no_run
/// use profilemate_cuda::cudarc::driver::CudaContext;
/// use profilemate_cuda::{CudaDriver, CudaOptions, CudaTimingBackend};
///
/// let ctx = CudaContext::new(0)?;
/// let stream = ctx.new_stream()?;
/// let driver = CudaDriver::for_stream(&stream)?;
/// let backend = CudaTimingBackend::with_api(driver, CudaOptions::default())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct CudaDriver {
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    _owner: Owner,
}

// SAFETY: CUDA driver handles (contexts, streams, events) may be used from any thread; the
// driver API is thread-safe.
unsafe impl Send for CudaDriver {}
// SAFETY: as above; `CudaDriver` holds no interior state besides the handles.
unsafe impl Sync for CudaDriver {}

impl CudaDriver {
    /// Events on a cudarc stream (the stream is kept alive as long as the driver).
    ///
    /// # Errors
    ///
    /// [`CudaError::Unavailable`] when [`probe`] fails.
    pub fn for_stream(stream: &Arc<CudaStream>) -> Result<Self, CudaError> {
        probe()?;
        Ok(CudaDriver {
            ctx: stream.context().cu_ctx(),
            stream: stream.cu_stream(),
            _owner: Owner::Stream(stream.clone()),
        })
    }

    /// Events on a stream owned by someone else: PyTorch's
    /// `torch.cuda.current_stream().cuda_stream` (an integer: cast it with `as sys::CUstream`),
    /// candle's `CudaStream::cu_stream()`, or the null (legacy default) stream of the context
    /// current on the calling thread.
    ///
    /// # Safety
    ///
    /// `stream` must be a valid stream handle, and it and its context must outlive the driver
    /// (and the backend built on it). For the null stream, call this on a thread whose current
    /// context is the one the engine uses.
    ///
    /// # Errors
    ///
    /// [`CudaError::Unavailable`] when [`probe`] fails; [`CudaError::Driver`] when the stream's
    /// context cannot be found (`cuStreamGetCtx`), for example the null stream on a thread with
    /// no current context.
    pub unsafe fn for_raw_stream(stream: sys::CUstream) -> Result<Self, CudaError> {
        probe()?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the caller guarantees `stream` is valid; `ctx` is writable.
        unsafe { sys::cuStreamGetCtx(stream, &mut ctx) }.result().map_err(|e| CudaError::Driver {
            during: "finding the stream's context (cuStreamGetCtx)",
            source: event_error(e),
        })?;
        if ctx.is_null() {
            return Err(CudaError::Unavailable {
                reason: "the stream has no CUDA context (is a context current on this thread?)".into(),
            });
        }
        Ok(CudaDriver { ctx, stream, _owner: Owner::Borrowed })
    }

    /// Events on the null (legacy default) stream of device `ordinal`'s primary context, the
    /// stream that PyTorch's default stream and every blocking stream synchronise with. If the
    /// calling thread had another context current, it is current again afterwards.
    ///
    /// # Errors
    ///
    /// [`CudaError::Unavailable`] when [`probe`] fails or there is no device `ordinal`;
    /// [`CudaError::Driver`] when its primary context cannot be retained.
    pub fn for_default_stream(ordinal: usize) -> Result<Self, CudaError> {
        probe()?;
        let count = result::device::get_count()
            .map_err(|e| CudaError::Driver { during: "counting devices (cuDeviceGetCount)", source: event_error(e) })?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(CudaError::Unavailable { reason: format!("no CUDA device {ordinal} ({count} visible)") });
        }
        let previous = result::ctx::get_current().ok().flatten();
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::Driver { during: "retaining the primary context", source: event_error(e) })?;
        if let Some(previous) = previous.filter(|p| *p != ctx.cu_ctx()) {
            // SAFETY: `previous` was current on this thread a moment ago, so it is alive.
            let _ = unsafe { result::ctx::set_current(previous) };
        }
        let stream = ctx.default_stream();
        Ok(CudaDriver { ctx: ctx.cu_ctx(), stream: stream.cu_stream(), _owner: Owner::Stream(stream) })
    }

    /// The stream events are recorded on.
    pub fn stream(&self) -> sys::CUstream {
        self.stream
    }

    /// The context the events live in.
    pub fn context(&self) -> sys::CUcontext {
        self.ctx
    }

    /// Runs `f` with the events' context pushed on this thread, then pops it.
    fn in_context<R>(&self, f: impl FnOnce() -> Result<R, DriverError>) -> Result<R, EventError> {
        // SAFETY: `self.ctx` is alive (kept by `_owner`, or guaranteed by the caller of
        // `for_raw_stream`).
        unsafe { sys::cuCtxPushCurrent_v2(self.ctx) }.result().map_err(event_error)?;
        let out = f();
        let mut popped: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops what was pushed above; `popped` is writable.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
        out.map_err(event_error)
    }

    /// Makes the events' context current on this (collector) thread if it is not already.
    fn ensure_current(&self) -> Result<(), EventError> {
        if result::ctx::get_current().map_err(event_error)? != Some(self.ctx) {
            // SAFETY: `self.ctx` is alive (see `in_context`).
            unsafe { result::ctx::set_current(self.ctx) }.map_err(event_error)?;
        }
        Ok(())
    }
}

impl EventApi for CudaDriver {
    type Event = EventHandle;

    fn create(&self) -> Result<EventHandle, EventError> {
        self.in_context(|| result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)).map(EventHandle)
    }

    #[inline]
    fn record(&self, event: EventHandle) -> Result<(), EventError> {
        // SAFETY: `event` was created by `create` in this context and is not destroyed before
        // the backend is dropped; `self.stream` is alive.
        match unsafe { result::event::record(event.0, self.stream) } {
            Ok(()) => Ok(()),
            Err(e) => self.record_retry(event, e),
        }
    }

    fn query(&self, event: EventHandle) -> Result<bool, EventError> {
        self.ensure_current()?;
        // SAFETY: as in `record`.
        match unsafe { result::event::query(event.0) } {
            Ok(()) => Ok(true),
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(event_error(e)),
        }
    }

    fn elapsed_ms(&self, start: EventHandle, end: EventHandle) -> Result<Option<f32>, EventError> {
        self.ensure_current()?;
        // SAFETY: as in `record`; both events were recorded on the same stream.
        match unsafe { result::event::elapsed(start.0, end.0) } {
            Ok(ms) => Ok(Some(ms)),
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(None),
            Err(e) => Err(event_error(e)),
        }
    }

    fn destroy(&self, event: EventHandle) {
        // SAFETY: each event is destroyed once, when the backend is dropped; one still in flight
        // is released by the driver when it completes.
        let _ = self.in_context(|| unsafe { result::event::destroy(event.0) });
    }
}

impl CudaDriver {
    /// A thread with no current context cannot record on the null stream: make ours current
    /// there and try once more. A thread with another context current is left alone.
    #[cold]
    fn record_retry(&self, event: EventHandle, first: DriverError) -> Result<(), EventError> {
        if first.0 != sys::CUresult::CUDA_ERROR_INVALID_CONTEXT || !matches!(result::ctx::get_current(), Ok(None)) {
            return Err(event_error(first));
        }
        self.ensure_current()?;
        // SAFETY: as in `record`.
        unsafe { result::event::record(event.0, self.stream) }.map_err(event_error)
    }
}

/// A `CUevent` made by [`CudaDriver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventHandle(pub sys::CUevent);

// SAFETY: a `CUevent` is a driver handle, usable from any thread.
unsafe impl Send for EventHandle {}
// SAFETY: as above.
unsafe impl Sync for EventHandle {}
