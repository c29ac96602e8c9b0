//! The timing backend: a pool of events recorded on the engine's stream, resolved by the
//! collector.

use crate::api::{EventApi, EventError};
use crate::pool::{SlotPool, MAX_SLOTS};
use crate::CudaError;
use profilemate_core::{Mark, Resolution, TimingBackend};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Settings of a [`CudaTimingBackend`].
///
/// ```
/// use profilemate_cuda::CudaOptions;
/// let options = CudaOptions::default().pool_size(8192).batch_size(256);
/// assert_eq!(options.get_pool_size(), 8192);
/// assert_eq!(options.get_batch_size(), Some(256));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    pool_size: usize,
    batch_size: Option<usize>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { pool_size: CudaOptions::DEFAULT_POOL_SIZE, batch_size: None }
    }
}

impl CudaOptions {
    /// Events created up front: 4096, room for 2048 timed regions in flight (about two seconds
    /// of a 1 ms step loop, while the collector resolves them every 100 ms).
    pub const DEFAULT_POOL_SIZE: usize = 4096;

    /// Events in the pool (two per timed region), from 2 to 16 777 216. They are all created
    /// when the backend is built; none is ever created in the step loop.
    pub fn pool_size(mut self, events: usize) -> Self {
        self.pool_size = events;
        self
    }

    /// Regions the collector resolves per pass. Unset, the session's `cuda_event_batch`
    /// (`PROFILEMATE_CUDA_EVENT_BATCH`, default 100) applies.
    pub fn batch_size(mut self, regions: usize) -> Self {
        self.batch_size = Some(regions);
        self
    }

    /// The pool size in force.
    pub fn get_pool_size(&self) -> usize {
        self.pool_size
    }

    /// The batch size in force, if set here.
    pub fn get_batch_size(&self) -> Option<usize> {
        self.batch_size
    }

    fn validate(&self) -> Result<(), CudaError> {
        if !(2..=MAX_SLOTS).contains(&self.pool_size) {
            return Err(CudaError::InvalidOptions(format!(
                "pool_size {} is out of range: 2 to {MAX_SLOTS} events",
                self.pool_size
            )));
        }
        if self.batch_size == Some(0) {
            return Err(CudaError::InvalidOptions("batch_size must be greater than 0".into()));
        }
        Ok(())
    }
}

/// What a [`CudaTimingBackend`] has done so far.
///
/// ```
/// let stats = profilemate_cuda::CudaTimingStats::default();
/// assert_eq!(stats.exhausted, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CudaTimingStats {
    /// Events in the pool.
    pub pool_size: usize,
    /// Events handed out now (recorded and not yet resolved).
    pub in_use: usize,
    /// Marks refused because every event was in use (the regions were dropped and counted by the
    /// session as `timing`).
    pub exhausted: u64,
    /// Marks refused because `cuEventRecord` failed.
    pub record_failures: u64,
    /// Regions resolved into a duration.
    pub resolved: u64,
    /// Polls answered "not yet".
    pub pending_polls: u64,
    /// Regions that could not be timed (a driver error on one of their events).
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    exhausted: AtomicU64,
    record_failures: AtomicU64,
    resolved: AtomicU64,
    pending_polls: AtomicU64,
    failed: AtomicU64,
}

/// Times forward passes and components with CUDA events recorded on the engine's stream.
///
/// - The events are created once, when the backend is built, and kept in a fixed pool. On the
///   engine thread, [`start`](TimingBackend::start) and [`stop`](TimingBackend::stop) take an
///   event from the pool (one compare-exchange, no lock, no allocation: see below), record it on
///   the stream (`cuEventRecord`, asynchronous) and return its slot as the [`Mark`]. Nothing on
///   the engine thread ever waits for the device.
/// - When the pool is empty the mark is refused (`None`): the session drops the region and counts
///   it as `timing` in the manifest, and [`stats`](Self::stats) counts it as `exhausted`. Nothing
///   blocks.
/// - profilemate's collector thread calls [`poll`](TimingBackend::poll) for the oldest regions
///   first, `batch_size` per pass: `cuEventQuery` on the end event, then `cuEventElapsedTime`
///   once it is complete. A region not complete yet stays pending for the next pass; a driver
///   error drops that region only. At shutdown the collector keeps polling until every region in
///   flight is resolved (up to 10 s).
///
/// The pool is a lock-free stack of slot indices with an ABA tag: taking an event is one load and
/// one compare-exchange, which retries only while the collector is giving events back at that
/// very moment. A lock would be uncontended too, but a lock-free stack can never make the engine
/// wait for the collector thread, even if that thread is descheduled.
///
/// Build one on the engine's stream with [`on_stream`](CudaTimingBackend::on_stream) (a cudarc
/// stream), [`on_raw_stream`](CudaTimingBackend::on_raw_stream) (PyTorch's
/// `torch.cuda.current_stream().cuda_stream`, candle's stream) or
/// [`on_default_stream`](CudaTimingBackend::on_default_stream), and give it to
/// `SessionBuilder::timing_backend`. [`with_api`](CudaTimingBackend::with_api) builds one over
/// any [`EventApi`] (a mock, or a wrapper that counts calls).
pub struct CudaTimingBackend<A: EventApi = crate::CudaDriver> {
    api: A,
    events: Box<[A::Event]>,
    pool: SlotPool,
    batch_size: Option<usize>,
    counters: Counters,
    last_error: Mutex<Option<EventError>>,
}

impl<A: EventApi> std::fmt::Debug for CudaTimingBackend<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaTimingBackend").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl<A: EventApi> CudaTimingBackend<A> {
    /// A backend over `api`: creates the whole pool of events now.
    ///
    /// # Errors
    ///
    /// [`CudaError::InvalidOptions`] for options out of range; [`CudaError::Driver`] when an
    /// event cannot be created (those already created are destroyed).
    pub fn with_api(api: A, options: CudaOptions) -> Result<Self, CudaError> {
        options.validate()?;
        let mut events = Vec::with_capacity(options.pool_size);
        for _ in 0..options.pool_size {
            match api.create() {
                Ok(e) => events.push(e),
                Err(source) => {
                    for e in events {
                        api.destroy(e);
                    }
                    return Err(CudaError::Driver { during: "creating the event pool (cuEventCreate)", source });
                }
            }
        }
        Ok(CudaTimingBackend {
            api,
            pool: SlotPool::new(events.len()),
            events: events.into_boxed_slice(),
            batch_size: options.batch_size,
            counters: Counters::default(),
            last_error: Mutex::new(None),
        })
    }

    /// The event API the backend records through.
    pub fn api(&self) -> &A {
        &self.api
    }

    /// Counts of what the backend did so far.
    pub fn stats(&self) -> CudaTimingStats {
        let c = &self.counters;
        CudaTimingStats {
            pool_size: self.pool.len(),
            in_use: self.pool.taken_count(),
            exhausted: c.exhausted.load(Ordering::Relaxed),
            record_failures: c.record_failures.load(Ordering::Relaxed),
            resolved: c.resolved.load(Ordering::Relaxed),
            pending_polls: c.pending_polls.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// The last driver error the backend met (recording or resolving), if any.
    pub fn last_error(&self) -> Option<EventError> {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cold]
    fn note_error(&self, error: EventError) {
        // `try_lock`: the engine thread must never wait, not even for a diagnostic.
        if let Ok(mut last) = self.last_error.try_lock() {
            *last = Some(error);
        }
    }

    #[cold]
    fn exhausted(&self) -> Option<Mark> {
        self.counters.exhausted.fetch_add(1, Ordering::Relaxed);
        None
    }

    #[inline]
    fn mark(&self) -> Option<Mark> {
        let Some(slot) = self.pool.acquire() else { return self.exhausted() };
        match self.api.record(self.events[slot]) {
            Ok(()) => Some(Mark(slot as u64)),
            Err(e) => {
                self.pool.release(slot);
                self.counters.record_failures.fetch_add(1, Ordering::Relaxed);
                self.note_error(e);
                None
            }
        }
    }

    /// The event of a mark this backend handed out and has not taken back.
    #[inline]
    fn event(&self, mark: Mark) -> Option<A::Event> {
        let slot = usize::try_from(mark.0).ok()?;
        self.pool.is_taken(slot).then(|| self.events[slot])
    }

    fn failed(&self, why: String) -> Resolution {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        Resolution::Failed(why)
    }
}

/// Milliseconds from `cuEventElapsedTime` (resolution about 0.5 µs) to a duration; a negative or
/// non-finite value (events recorded out of order) is 0.
fn ms_to_duration(ms: f32) -> Duration {
    if ms.is_finite() && ms > 0.0 {
        Duration::from_nanos((f64::from(ms) * 1e6).round() as u64)
    } else {
        Duration::ZERO
    }
}

impl<A: EventApi> TimingBackend for CudaTimingBackend<A> {
    fn name(&self) -> &str {
        "cuda"
    }

    #[inline]
    fn start(&self) -> Option<Mark> {
        self.mark()
    }

    #[inline]
    fn stop(&self, _start: Mark) -> Option<Mark> {
        self.mark()
    }

    fn poll(&self, start: Mark, end: Mark) -> Resolution {
        let (Some(s), Some(e)) = (self.event(start), self.event(end)) else {
            return self.failed(format!("marks {}/{} were not handed out by this backend", start.0, end.0));
        };
        let done = match self.api.query(e) {
            Ok(done) => done,
            Err(err) => {
                self.note_error(err);
                return self.failed(format!("cuEventQuery: {err}"));
            }
        };
        if done {
            match self.api.elapsed_ms(s, e) {
                Ok(Some(ms)) => {
                    self.counters.resolved.fetch_add(1, Ordering::Relaxed);
                    return Resolution::Ready(ms_to_duration(ms));
                }
                Ok(None) => {}
                Err(err) => {
                    self.note_error(err);
                    return self.failed(format!("cuEventElapsedTime: {err}"));
                }
            }
        }
        self.counters.pending_polls.fetch_add(1, Ordering::Relaxed);
        Resolution::Pending
    }

    fn release(&self, start: Mark, end: Mark) {
        for mark in [start, end].iter().take(if start == end { 1 } else { 2 }) {
            if let Ok(slot) = usize::try_from(mark.0) {
                self.pool.release(slot);
            }
        }
    }

    fn batch_size(&self) -> Option<usize> {
        self.batch_size
    }
}

impl<A: EventApi> Drop for CudaTimingBackend<A> {
    fn drop(&mut self) {
        for &e in self.events.iter() {
            self.api.destroy(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_become_durations() {
        assert_eq!(ms_to_duration(1.5), Duration::from_micros(1500));
        assert_eq!(ms_to_duration(0.0005), Duration::from_nanos(500));
        assert_eq!(ms_to_duration(-0.1), Duration::ZERO);
        assert_eq!(ms_to_duration(f32::NAN), Duration::ZERO);
        assert_eq!(ms_to_duration(f32::INFINITY), Duration::ZERO);
    }

    #[test]
    fn options_are_checked() {
        assert!(CudaOptions::default().validate().is_ok());
        assert!(CudaOptions::default().pool_size(1).validate().is_err());
        assert!(CudaOptions::default().pool_size(MAX_SLOTS + 1).validate().is_err());
        assert!(CudaOptions::default().batch_size(0).validate().is_err());
    }
}
