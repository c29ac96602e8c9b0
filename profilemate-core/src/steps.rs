//! Engine steps: the id every row of one step carries in its `step` column.
//!
//! # The rule
//!
//! A session has at most one open step at a time; every event recorded while it is open, on any
//! thread, belongs to it. A step opens in one of two ways:
//!
//! - **A step guard** ([`Steps::begin`]) opens a step when the engine starts one (before
//!   scheduling) and closes it when dropped. Everything recorded in between (scheduling, batch
//!   preparation, the forward pass, sampling, KV-cache and CUDA-graph records, preemptions)
//!   carries its id; events recorded between two guards carry none. The guard also times the
//!   step's wall time, and the time between two guards is the step's host gap.
//! - **The forward pass alone**: an engine that never opens a guard still gets steps. A forward
//!   pass that starts while no guard is open opens the next step, which stays open until the
//!   next forward pass starts. Sampling and bookkeeping after the pass belong to its step; CPU
//!   work done *before* a pass (scheduling the next batch) belongs to the previous step, since
//!   nothing told the session that a new step began. Engines that want scheduling in the right
//!   step use the guard.
//!
//! Ids count up from 1 per session. An engine whose steps are numbered elsewhere (the vLLM
//! binding, where the engine-core process numbers each step and the workers record its forward
//! pass) opens them with [`Steps::begin_with_id`], so that rows written by several processes
//! for one step share its id.
//!
//! # Cost
//!
//! Every record reads the open step with one relaxed atomic load of a word the session already
//! touches, and stores it in spare bytes of its 64-byte slot. A forward pass outside a guard
//! adds a load and two stores (no read-modify-write); a guard costs one atomic increment and one
//! more record per step.

use crate::record::{Slot, K_STEP, MAX_STEP_ID};
use crate::recorder::Shared;
use crate::types::{DropReason, ProfilerKind};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The largest step id (ids live in 40 bits of each record).
pub const MAX_STEP: u64 = MAX_STEP_ID;

/// Opens and closes engine steps: every row recorded while a step is open carries its id in
/// its `step` column.
///
/// A session has at most one open step; every event recorded while it is open, on any thread,
/// belongs to it. A step guard ([`begin`](Self::begin)) opens a step before scheduling and
/// closes it when dropped; the time between two guards is the host gap before a step. Without a
/// guard, a forward pass that starts while no guard is open opens the next step, which lasts
/// until the next pass starts: sampling after the pass belongs to it, and so does scheduling for
/// the next batch done before the next pass (engines that want it in its own step use the
/// guard). Ids count up from 1; [`begin_with_id`](Self::begin_with_id) and [`open`](Self::open)
/// take an id numbered elsewhere (another process of the same engine).
///
/// ```
/// use profilemate_core::{CpuOp, MemorySink, Phase, Session};
/// let memory = MemorySink::new();
/// let session = Session::builder().in_memory_only().sink(memory.clone()).build()?;
/// let (steps, cpu, forward) = (session.steps(), session.cpu_timing(), session.forward_pass());
/// for _ in 0..3 {
///     let step = steps.begin();
///     cpu.start(CpuOp::SCHEDULING).stop();      // before the pass, in the same step
///     forward.start(Phase::Decode, 8, 8).stop();
///     step.stop();
/// }
/// session.shutdown()?;
/// let rows = memory.rows();
/// assert_eq!(rows.cpu_operations[2].step, Some(3));
/// assert_eq!(rows.forward_pass[2].step, Some(3));
/// assert_eq!(rows.step_timeline.len(), 3);
/// # Ok::<(), profilemate_core::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct Steps {
    shared: Option<Arc<Shared>>,
}

impl Steps {
    pub(crate) fn new(shared: &Option<Arc<Shared>>) -> Self {
        Steps { shared: shared.clone() }
    }

    /// A handle that records nothing.
    pub const fn disabled() -> Self {
        Steps { shared: None }
    }

    /// Whether this handle records.
    pub fn is_enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Opens the next step; it closes when the guard is stopped or dropped.
    #[inline]
    pub fn begin(&self) -> StepGuard<'_> {
        match &self.shared {
            Some(s) => {
                let id = (s.last_step.fetch_add(1, Ordering::Relaxed) + 1) & MAX_STEP_ID;
                open(s, id)
            }
            None => StepGuard { shared: None, id: 0, start_raw: 0 },
        }
    }

    /// Opens step `id`, numbered by the engine (1 to [`MAX_STEP`]). Later [`begin`](Self::begin)
    /// calls continue above the highest id seen. An id of 0 or above [`MAX_STEP`] opens no step
    /// and is counted as [`DropReason::InvalidValue`] (forward pass profiler).
    #[inline]
    pub fn begin_with_id(&self, id: u64) -> StepGuard<'_> {
        match &self.shared {
            Some(s) => {
                let start_raw = s.now();
                if self.open_at(id, start_raw) {
                    StepGuard { shared: Some(s), id, start_raw }
                } else {
                    StepGuard { shared: None, id: 0, start_raw: 0 }
                }
            }
            None => StepGuard { shared: None, id: 0, start_raw: 0 },
        }
    }

    /// Opens step `id` without a guard, for bindings that cannot hold one across calls (the
    /// vLLM module, called from Python): the step stays open until [`close`](Self::close).
    /// Returns `false` (and counts [`DropReason::InvalidValue`]) for an id of 0 or above
    /// [`MAX_STEP`].
    ///
    /// ```
    /// use profilemate_core::Session;
    /// let session = Session::builder().in_memory_only().build()?;
    /// let steps = session.steps();
    /// assert!(steps.open(41));
    /// assert_eq!(steps.current(), Some(41));
    /// steps.close();
    /// assert_eq!(steps.current(), None);
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    pub fn open(&self, id: u64) -> bool {
        match &self.shared {
            Some(s) => self.open_at(id, s.now()),
            None => false,
        }
    }

    /// Closes the step [`open`](Self::open) opened, and records it; nothing when none is open.
    /// It closes whatever step is open: one a [`StepGuard`] holds too, whose own row then
    /// follows when the guard is dropped. Use guards or `open`/`close`, not both at once.
    pub fn close(&self) {
        if let Some(s) = &self.shared {
            self.close_at(s.now());
        }
    }

    /// [`open`](Self::open), with the step starting at `start_raw`: a reading of a [`HostClock`]
    /// that the caller took anyway (every `HostClock` of a process reads the one counter that
    /// the session stamps its rows with), so that one reading serves two purposes. The vLLM
    /// binding opens a step where its scheduling time starts.
    ///
    /// ```
    /// use profilemate_core::{HostClock, Session};
    /// let session = Session::builder().in_memory_only().build()?;
    /// let (steps, clock) = (session.steps(), HostClock::new());
    /// let start = clock.raw(); // also the start of something the engine times itself
    /// assert!(steps.open_at(7, start));
    /// steps.close_at(clock.raw());
    /// assert_eq!(steps.current(), None);
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    ///
    /// [`HostClock`]: crate::HostClock
    pub fn open_at(&self, id: u64, start_raw: u64) -> bool {
        match &self.shared {
            Some(s) if (1..=MAX_STEP_ID).contains(&id) => {
                s.last_step.fetch_max(id, Ordering::Relaxed);
                s.step.store(id << 1 | 1, Ordering::Relaxed);
                s.step_start.store(start_raw, Ordering::Relaxed);
                true
            }
            Some(s) => {
                s.count_drop(ProfilerKind::ForwardPass, DropReason::InvalidValue);
                false
            }
            None => false,
        }
    }

    /// [`close`](Self::close), with the step ending at `end_raw`, a [`HostClock`] reading as
    /// for [`open_at`](Self::open_at).
    ///
    /// [`HostClock`]: crate::HostClock
    pub fn close_at(&self, end_raw: u64) {
        if let Some(s) = &self.shared {
            let id = s.current_step();
            if id != 0 {
                close_and_push(s, id, s.step_start.load(Ordering::Relaxed), end_raw);
            }
        }
    }

    /// Closes the step [`open`](Self::open) opened without recording it: for a step the engine
    /// opened before knowing whether it would run (the vLLM binding opens the next id before
    /// scheduling, so that preemptions made while scheduling belong to the step, and cancels it
    /// when the scheduler returns nothing to run). Rows recorded while it was open keep its id;
    /// the engine opens the same id again for its next step, so they join that one.
    ///
    /// ```
    /// use profilemate_core::{MemorySink, Session};
    /// let memory = MemorySink::new();
    /// let session = Session::builder().in_memory_only().sink(memory.clone()).build()?;
    /// let steps = session.steps();
    /// steps.open(7);
    /// steps.cancel();
    /// assert_eq!(steps.current(), None);
    /// session.shutdown()?;
    /// assert!(memory.rows().step_timeline.is_empty());
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    pub fn cancel(&self) {
        if let Some(s) = &self.shared {
            s.step.store(0, Ordering::Relaxed);
        }
    }

    /// Runs `f` with step `id` (0: no step) in place of the open one, then restores the open
    /// step as it was (its start unchanged): for rows measured late, such as forward passes
    /// timed by device events that resolve a step or two after their pass ran, so that they
    /// carry the step they belong to. A forward pass recorded inside opens no step of its own.
    /// Events other threads record meanwhile also get `id`: call it on the engine's thread. An
    /// id above [`MAX_STEP`] runs `f` outside any step.
    ///
    /// ```
    /// use profilemate_core::{MemorySink, Phase, Session};
    /// let memory = MemorySink::new();
    /// let session = Session::builder().in_memory_only().sink(memory.clone()).build()?;
    /// let (steps, forward) = (session.steps(), session.forward_pass());
    /// steps.open(5);
    /// steps.within(4, || forward.record_ms(Phase::Decode, 2, 2, 1.5));
    /// assert_eq!(steps.current(), Some(5));
    /// steps.close();
    /// session.shutdown()?;
    /// assert_eq!(memory.rows().forward_pass[0].step, Some(4));
    /// # Ok::<(), profilemate_core::Error>(())
    /// ```
    pub fn within<R>(&self, id: u64, f: impl FnOnce() -> R) -> R {
        match &self.shared {
            Some(s) => {
                let id = if id > MAX_STEP_ID { 0 } else { id };
                // Marked as held by a guard, so that a forward pass inside opens no step.
                let previous = s.step.swap(id << 1 | 1, Ordering::Relaxed);
                let out = f();
                s.step.store(previous, Ordering::Relaxed);
                out
            }
            None => f(),
        }
    }

    /// The open step's id, if any.
    pub fn current(&self) -> Option<u64> {
        self.shared.as_ref().map(|s| s.current_step()).filter(|&id| id != 0)
    }
}

#[inline]
fn open(s: &Arc<Shared>, id: u64) -> StepGuard<'_> {
    s.step.store(id << 1 | 1, Ordering::Relaxed);
    StepGuard { shared: Some(s), id, start_raw: s.now() }
}

/// An open step. It closes, and is recorded, when stopped or dropped.
#[must_use = "dropping the guard closes the step at once; bind it (`let step = ...`) for the whole engine step"]
pub struct StepGuard<'a> {
    shared: Option<&'a Arc<Shared>>,
    id: u64,
    start_raw: u64,
}

impl StepGuard<'_> {
    /// The step's id (0 for a disabled handle).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Closes the step now.
    #[inline]
    pub fn stop(self) {}
}

#[inline]
fn close_and_push(s: &Arc<Shared>, id: u64, start_raw: u64, end_raw: u64) {
    // Close it unless another guard has opened a step since.
    let _ = s.step.compare_exchange(id << 1 | 1, 0, Ordering::Relaxed, Ordering::Relaxed);
    let mut slot = Slot::head(K_STEP, 0, 0);
    slot.set_step(id);
    slot.set_word(1, start_raw);
    slot.set_word(2, end_raw);
    s.push_step(slot);
}

impl Drop for StepGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(s) = self.shared {
            close_and_push(s, self.id, self.start_raw, s.now());
        }
    }
}
