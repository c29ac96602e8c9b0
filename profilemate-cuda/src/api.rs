//! The slice of the CUDA event API the backend uses, as a trait: the real driver implements it,
//! tests mock it, and an engine may wrap it to count or trace calls.

use std::fmt;

/// A CUDA driver error, cheap to copy: recording fails on the engine thread, where nothing may
/// allocate.
///
/// ```
/// use profilemate_cuda::EventError;
/// let e = EventError::new(700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered");
/// assert_eq!(e.to_string(), "CUDA_ERROR_ILLEGAL_ADDRESS (700): an illegal memory access was encountered");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventError {
    /// The `CUresult` code.
    pub code: i32,
    /// Its name (`CUDA_ERROR_...`).
    pub name: &'static str,
    /// The driver's description of it.
    pub description: &'static str,
}

impl EventError {
    /// An error with a code, its name and its description.
    pub const fn new(code: i32, name: &'static str, description: &'static str) -> Self {
        EventError { code, name, description }
    }
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.code)?;
        if !self.description.is_empty() {
            write!(f, ": {}", self.description)?;
        }
        Ok(())
    }
}

impl std::error::Error for EventError {}

/// CUDA events on one stream: what [`CudaTimingBackend`](crate::CudaTimingBackend) needs from a
/// driver.
///
/// [`CudaDriver`](crate::CudaDriver) implements it over cudarc's driver API. The trait exists so
/// that the event pool and the resolution logic can be tested without a GPU, and so that an
/// engine can wrap the driver to count or trace calls. It has, on purpose, no call that waits for
/// the device: the backend cannot synchronise even by mistake.
///
/// Which thread calls what:
///
/// | method | thread | may block |
/// | --- | --- | --- |
/// | [`create`](Self::create), [`destroy`](Self::destroy) | whoever builds or drops the backend | no device wait |
/// | [`record`](Self::record) | the engine thread, in the step loop | never |
/// | [`query`](Self::query), [`elapsed_ms`](Self::elapsed_ms) | profilemate's collector thread | never |
pub trait EventApi: Send + Sync + 'static {
    /// An event handle (`CUevent` for the driver).
    type Event: Copy + Send + Sync + 'static;

    /// Creates a timing event (`cuEventCreate` with `CU_EVENT_DEFAULT`: timing on, no blocking
    /// sync).
    ///
    /// # Errors
    ///
    /// The driver's error.
    fn create(&self) -> Result<Self::Event, EventError>;

    /// Records `event` on the stream (`cuEventRecord`). Must return at once.
    ///
    /// # Errors
    ///
    /// The driver's error; the region is dropped and counted.
    fn record(&self, event: Self::Event) -> Result<(), EventError>;

    /// Whether the device has reached `event` (`cuEventQuery`): `Ok(false)` for
    /// `CUDA_ERROR_NOT_READY`.
    ///
    /// # Errors
    ///
    /// Any other driver error.
    fn query(&self, event: Self::Event) -> Result<bool, EventError>;

    /// Milliseconds from `start` to `end` (`cuEventElapsedTime`): `Ok(None)` while either is
    /// not complete.
    ///
    /// # Errors
    ///
    /// Any other driver error.
    fn elapsed_ms(&self, start: Self::Event, end: Self::Event) -> Result<Option<f32>, EventError>;

    /// Destroys `event` (`cuEventDestroy`); an event still in flight is released by the driver
    /// when it completes.
    fn destroy(&self, event: Self::Event);
}
