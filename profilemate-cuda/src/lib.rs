//! # profilemate-cuda
//!
//! CUDA-event timing for [profilemate](https://docs.rs/profilemate): forward passes and
//! encoder/decoder components are timed on the GPU, on the engine's own stream, and the engine
//! thread never waits for the GPU because of it.
//!
//! Most users turn on the `cuda` feature of the `profilemate` facade: `profilemate::builder()`
//! and `profilemate::from_env()` then time the default stream of device 0 with CUDA events when
//! a GPU is usable, and fall back to the host clock, with one warning line, when it is not. An
//! engine with its own stream builds the backend on that stream:
//!
//! ```no_run
//! use profilemate_core::{Phase, Session};
//! use profilemate_cuda::cudarc::driver::CudaContext;
//! use profilemate_cuda::{CudaOptions, CudaTimingBackend};
//! use std::sync::Arc;
//!
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.new_stream()?;
//! let backend = CudaTimingBackend::on_stream(&stream, CudaOptions::default())?;
//! let session = Session::builder().in_memory_only().timing_backend(Arc::new(backend)).build()?;
//! let forward = session.forward_pass();
//!
//! let (src, mut dst) = (stream.alloc_zeros::<f32>(1 << 20)?, stream.alloc_zeros::<f32>(1 << 20)?);
//! for _ in 0..100 {
//!     let pass = forward.start(Phase::Decode, 8, 8); // cuEventRecord on `stream`, no wait
//!     stream.memcpy_dtod(&src, &mut dst)?;           // the forward pass
//!     pass.stop();                                   // cuEventRecord on `stream`, no wait
//! }
//! let manifest = session.shutdown()?; // waits for the events still in flight
//! assert_eq!(manifest.timing_backend, "cuda");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## How it works
//!
//! - [`CudaTimingBackend`] creates a fixed pool of events up front ([`CudaOptions::pool_size`],
//!   4096 by default). Each timed region takes two: one recorded when it starts, one when it
//!   stops, on the engine thread, with `cuEventRecord` (asynchronous).
//! - profilemate's collector thread resolves regions oldest first, `PROFILEMATE_CUDA_EVENT_BATCH`
//!   (default 100) per pass, by polling `cuEventQuery` and reading `cuEventElapsedTime` once the
//!   end event is complete. A region whose events are not complete waits for the next pass; at
//!   shutdown the collector keeps polling until all are done (up to 10 s).
//! - Nothing on the engine thread allocates, locks or synchronises. When the pool is empty the
//!   region is dropped and counted (`dropped.<profiler>.timing` in `profilemate_run.json`).
//!
//! ## Without CUDA
//!
//! The crate builds without a CUDA toolkit or driver (the driver library is loaded at run time).
//! [`probe`] checks, without panicking, that `libcuda.so.1` loads, has the entry points used
//! here, and sees a device. [`backend_factory`] (installed by the facade) then either supplies
//! the backend or, with `PROFILEMATE_BACKEND` unset (`auto`), prints
//!
//! ```text
//! profilemate: CUDA timing unavailable (libcuda.so.1 not found): timing forward passes with the host clock
//! ```
//!
//! once and lets the session use the host clock; with `PROFILEMATE_BACKEND=cuda` building the
//! session fails with `Error::BackendUnavailable` saying why.
//!
//! ## The CUDA version
//!
//! cudarc needs one CUDA version for its bindings. This crate does not force one: an application
//! that picks one for cudarc (a `cuda-12080`-style feature, or `CUDARC_CUDA_VERSION` at build
//! time, as candle and mistral.rs users do) gets it here too; otherwise cudarc asks `nvcc`, and
//! without a toolkit uses its newest bindings (CUDA 13, which need a driver from CUDA 12.8 on;
//! [`probe`] says so rather than panicking on an older driver). See the crate's README.

#![deny(unsafe_op_in_unsafe_fn)]

mod api;
mod backend;
mod driver;
mod pool;

pub use api::{EventApi, EventError};
pub use backend::{CudaOptions, CudaTimingBackend, CudaTimingStats};
pub use driver::{probe, CudaDriver, EventHandle};

/// The cudarc this crate was built with, to name its types (`cudarc::driver::CudaStream`)
/// without a second version in the build.
pub use cudarc;

use profilemate_core::{BackendChoice, Config, Error, TimingBackend};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why a CUDA timing backend cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// CUDA cannot be used on this machine: the driver library is missing (`libcuda.so.1 not
    /// found`), too old for the bindings this program was built with, or sees no device.
    ///
    /// Fix: install the NVIDIA driver and make a GPU visible (`nvidia-smi` lists it), or time
    /// with the host clock (`PROFILEMATE_BACKEND=host`).
    #[error("{reason}")]
    Unavailable {
        /// What is missing.
        reason: String,
    },

    /// A driver call failed while the backend was being built.
    ///
    /// Fix: the driver's message says what went wrong (a stream from another context, an
    /// exhausted device, a sticky error from earlier work).
    #[error("CUDA driver error while {during}: {source}")]
    Driver {
        /// What the backend was doing.
        during: &'static str,
        /// The driver's error.
        #[source]
        source: EventError,
    },

    /// [`CudaOptions`] out of range.
    ///
    /// Fix: choose values in the ranges the options document.
    #[error("invalid CUDA timing options: {0}")]
    InvalidOptions(String),
}

impl CudaTimingBackend<CudaDriver> {
    /// A backend recording on a cudarc stream, the stream the engine runs its forward pass on.
    ///
    /// # Errors
    ///
    /// As [`CudaDriver::for_stream`] and [`CudaTimingBackend::with_api`].
    pub fn on_stream(stream: &Arc<cudarc::driver::CudaStream>, options: CudaOptions) -> Result<Self, CudaError> {
        Self::with_api(CudaDriver::for_stream(stream)?, options)
    }

    /// A backend recording on a stream owned by another library: PyTorch's
    /// `torch.cuda.current_stream().cuda_stream` (cast the integer with
    /// `as cudarc::driver::sys::CUstream`) or candle's `CudaStream::cu_stream()`.
    ///
    /// # Safety
    ///
    /// As [`CudaDriver::for_raw_stream`]: the stream and its context must outlive the backend.
    ///
    /// # Errors
    ///
    /// As [`CudaDriver::for_raw_stream`] and [`CudaTimingBackend::with_api`].
    pub unsafe fn on_raw_stream(
        stream: cudarc::driver::sys::CUstream,
        options: CudaOptions,
    ) -> Result<Self, CudaError> {
        // SAFETY: forwarded to the caller.
        Self::with_api(unsafe { CudaDriver::for_raw_stream(stream) }?, options)
    }

    /// A backend recording on the null (legacy default) stream of device `ordinal`. This is what
    /// [`backend_factory`] builds, for device 0; engines that run on a stream of their own
    /// (every cudarc `new_stream()` is non-blocking and does not synchronise with the null
    /// stream) use [`on_stream`](Self::on_stream) instead.
    ///
    /// # Errors
    ///
    /// As [`CudaDriver::for_default_stream`] and [`CudaTimingBackend::with_api`].
    pub fn on_default_stream(ordinal: usize, options: CudaOptions) -> Result<Self, CudaError> {
        Self::with_api(CudaDriver::for_default_stream(ordinal)?, options)
    }
}

/// The warning printed when `auto` falls back to the host clock.
///
/// ```
/// assert_eq!(
///     profilemate_cuda::fallback_warning("libcuda.so.1 not found"),
///     "profilemate: CUDA timing unavailable (libcuda.so.1 not found): timing forward passes with the host clock"
/// );
/// ```
pub fn fallback_warning(reason: &str) -> String {
    format!("profilemate: CUDA timing unavailable ({reason}): timing forward passes with the host clock")
}

/// Supplies the CUDA timing backend to a session: matches `profilemate_core::BackendFactory`,
/// and the `profilemate` facade installs it in `builder()` and `from_env()` when its `cuda`
/// feature is on. Install it yourself with `SessionBuilder::backend_factory`.
///
/// - `host`: `Ok(None)`, CUDA is not touched.
/// - `auto` (`PROFILEMATE_BACKEND` unset): a backend on the default stream of device 0 when
///   [`probe`] and the backend's construction succeed; otherwise one warning line on stderr
///   (once per process, see [`fallback_warning`]) and `Ok(None)`: the session uses the host
///   clock.
/// - `cuda`: the backend, or [`Error::BackendUnavailable`] saying why.
///
/// It never panics, whatever the machine has.
///
/// ```
/// use profilemate_core::{BackendChoice, Config, Session};
///
/// let session = Session::builder().in_memory_only().backend_factory(profilemate_cuda::backend_factory).build()?;
/// let expected = if profilemate_cuda::probe().is_ok() { "cuda" } else { "host" };
/// assert_eq!(session.shutdown()?.timing_backend, expected);
///
/// let mut demanded = Config::default();
/// demanded.backend = BackendChoice::Cuda;
/// if let Err(e) = profilemate_cuda::probe() {
///     let Err(err) = profilemate_cuda::backend_factory(&demanded) else { panic!("CUDA was demanded") };
///     assert!(err.to_string().contains(&e.to_string()));
/// }
/// # Ok::<(), profilemate_core::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::BackendUnavailable`] when `cuda` is demanded and cannot be used.
pub fn backend_factory(config: &Config) -> profilemate_core::Result<Option<Arc<dyn TimingBackend>>> {
    if config.backend == BackendChoice::Host {
        return Ok(None);
    }
    match build_default() {
        Ok(backend) => Ok(Some(Arc::new(backend))),
        Err(reason) if config.backend == BackendChoice::Cuda => Err(Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: format!(
                "{reason} (install the NVIDIA driver and make a GPU visible, or set PROFILEMATE_BACKEND=host)"
            ),
        }),
        Err(reason) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!("{}", fallback_warning(&reason));
            }
            Ok(None)
        }
    }
}

/// The default-stream backend of device 0, or why not. [`probe`] keeps cudarc from being called
/// where it would panic; the `catch_unwind` is only a last resort for a driver that misbehaves
/// in ways the probe cannot see.
fn build_default() -> Result<CudaTimingBackend, String> {
    probe().map_err(|e| e.to_string())?;
    match std::panic::catch_unwind(|| CudaTimingBackend::on_default_stream(0, CudaOptions::default())) {
        Ok(Ok(backend)) => Ok(backend),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(format!("the CUDA driver bindings failed: {what}"))
        }
    }
}
