//! Timing backends: the host clock, and the trait a GPU backend implements.

use std::time::Duration;

/// An opaque timestamp from a [`TimingBackend`]: a raw clock value for the host clock, an event
/// handle for CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark(pub u64);

/// Whether a pair of marks can be turned into a duration yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The region took this long.
    Ready(Duration),
    /// The device has not reached the end mark yet; ask again later.
    Pending,
    /// The region cannot be timed (a driver error); the event is dropped and counted.
    Failed(String),
}

/// Gives marks on the engine thread and turns pairs of marks into durations on the collector
/// thread.
///
/// The engine-thread methods ([`start`](TimingBackend::start), [`stop`](TimingBackend::stop))
/// must not block, allocate or wait for a device: a GPU backend records an event from a pool
/// and returns. [`poll`](TimingBackend::poll) runs on the collector and must not block either:
/// it answers [`Resolution::Pending`] until the device is done.
///
/// ```
/// use profilemate_core::{HostClock, Resolution, TimingBackend};
///
/// let clock = HostClock::new();
/// let start = clock.start().unwrap();
/// let end = clock.stop(start).unwrap();
/// assert!(matches!(clock.poll(start, end), Resolution::Ready(_)));
/// ```
pub trait TimingBackend: Send + Sync + 'static {
    /// A short name for messages and the manifest (`host`, `cuda`).
    fn name(&self) -> &str;

    /// Marks the start of a timed region; `None` when no mark can be taken now (for example a
    /// full event pool): the region is dropped and counted.
    fn start(&self) -> Option<Mark>;

    /// Marks the end of the region begun at `start`; `None` as for [`start`](Self::start).
    fn stop(&self, start: Mark) -> Option<Mark>;

    /// Tries to resolve the region, without blocking.
    fn poll(&self, start: Mark, end: Mark) -> Resolution;

    /// Gives the marks of a resolved (or abandoned) region back to the backend.
    fn release(&self, start: Mark, end: Mark) {
        let _ = (start, end);
    }

    /// How many pending regions the collector resolves per pass. `None` uses the session's
    /// `cuda_event_batch`.
    fn batch_size(&self) -> Option<usize> {
        None
    }
}

/// The host clock: a TSC read where the CPU has a reliable one (through `quanta`), else
/// `CLOCK_MONOTONIC`. Marks are raw clock values; durations are ready at once.
///
/// ```
/// use profilemate_core::HostClock;
/// let clock = HostClock::new();
/// let a = clock.raw();
/// let b = clock.raw();
/// assert!(clock.delta_ns(a, b) < 1_000_000_000);
/// ```
#[derive(Debug, Clone)]
pub struct HostClock {
    clock: quanta::Clock,
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl HostClock {
    /// A calibrated clock (the first one in a process calibrates for a few milliseconds).
    pub fn new() -> Self {
        HostClock { clock: quanta::Clock::new() }
    }

    /// A raw reading: cheap, only meaningful to [`delta_ns`](Self::delta_ns).
    #[inline(always)]
    pub fn raw(&self) -> u64 {
        self.clock.raw()
    }

    /// Nanoseconds from `start` to `end` (0 if `end` is not after `start`).
    #[inline]
    pub fn delta_ns(&self, start: u64, end: u64) -> u64 {
        self.clock.delta_as_nanos(start, end)
    }
}

impl TimingBackend for HostClock {
    fn name(&self) -> &str {
        "host"
    }
    #[inline]
    fn start(&self) -> Option<Mark> {
        Some(Mark(self.raw()))
    }
    #[inline]
    fn stop(&self, _start: Mark) -> Option<Mark> {
        Some(Mark(self.raw()))
    }
    fn poll(&self, start: Mark, end: Mark) -> Resolution {
        Resolution::Ready(Duration::from_nanos(self.delta_ns(start.0, end.0)))
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the time base shared by every process on a host.
pub(crate) fn monotonic_ns() -> u64 {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        if rc == 0 {
            return (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64);
        }
        0
    }
    #[cfg(not(unix))]
    {
        0
    }
}
