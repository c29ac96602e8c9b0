//! Thread buffers that outlive the process: single-producer single-consumer rings of 64-byte
//! slots, in a file mapping under the output directory when the session writes files.
//!
//! # Why
//!
//! Inference servers are killed: SIGKILL after a grace period, the OOM killer, `vllm serve`
//! force-killing its engine. What a thread recorded since the collector's last pass lived in
//! the heap and died with the process. A shared file mapping is kept by the kernel when the
//! process dies (its pages are the file's page cache), so the records are still there for a
//! later reader, as LTTng keeps its per-CPU buffers in shared memory.
//!
//! # Layout
//!
//! One file per session, `DIR/.profilemate_buffers.<pid>.<n>`, locked with `flock` for the
//! session's whole life (the kernel drops the lock when the process dies, so "the lock can be
//! taken" means "its owner is dead, and nobody else is recovering it"; the pid in the header
//! names the dead process in the recovery's report, and the lock, unlike a pid, cannot be
//! mistaken for a new process that reused the number). It starts with a header
//! ([`HEADER_BYTES`]): a magic number that carries the layout version, the pid, slots per
//! ring, ring count, the profilers enabled, a clock anchor (a raw clock reading and its session
//! time, rewritten every pass), the pass state and journal (below), the figures of a replay,
//! and the CPU operation names by id. Then one region per
//! recording thread (and per MoE per-step detail buffer), appended as threads register: a 4 KiB
//! ring header (`write`, written by the producer; `read` and `pass_start`, written by the
//! collector, on separate cache lines) and the slots. Regions are reserved with
//! `posix_fallocate` before they are mapped, so a full disk refuses the mapping at registration
//! (the thread then gets a heap buffer, with a warning) instead of raising SIGBUS on the
//! engine's thread at the first write into a page with no block behind it. The mapping is made
//! with `MAP_POPULATE` and every page written once when the ring is made (a shared file
//! mapping's clean page is mapped read-only until written, for the kernel's dirty tracking), so
//! the hot path does not take a fault per page. The kernel writes the dirty pages back to disk
//! in the background; after each write-back a page's next write takes one fault again (about
//! one per page every few seconds, not per record). The file lives as long as the session: a
//! normal shutdown removes it once every record is in the files.
//!
//! # Why our own ring (not `rtrb`)
//!
//! `rtrb` allocates its buffer and its head and tail counters itself, on the heap, and cannot be
//! placed over memory the caller provides; the counters must live in the mapping too, or a
//! reader after the crash cannot tell which slots hold records. The ring here is the same
//! algorithm (a producer position published with a release store, a consumer position read
//! with an acquire load only when the cached one says the ring is full, indexes wrapped by
//! compare and subtract rather than a division) over a caller-provided region.
//!
//! # Exactly once across a kill
//!
//! The collector reads a ring up to the producer's `write`, but moves the ring's committed
//! `read` only after the rows it made from those records are in the sink files (the files are
//! flushed to the kernel every pass: what `write(2)` accepted survives SIGKILL). Records between
//! `read` and `write` are therefore exactly the ones no file holds yet, except during a pass,
//! when some of a pass's rows may already be in the files. For that window every pass keeps a
//! journal in the header:
//!
//! 1. with the files flushed by the previous pass, it writes each table file's length and each
//!    ring's `pass_start = read`, then sets the state to *in pass*;
//! 2. it drains, writes rows, flushes the files;
//! 3. it sets each ring's `read` to what it drained, then the state back to *idle*.
//!
//! Recovery of a session found *in pass* truncates every table file to its journaled length
//! (dropping the pass's rows, whole or torn) and replays from `pass_start`; found *idle*, it
//! replays from `read`. Either way no row is lost or written twice. Recovery itself follows the
//! same journal, so a recovery killed half-way is completed by the next one; once done it
//! marks the file *replayed* with its figures (events recovered, lost in flight), and the
//! caller removes the file only after recording them, so a recovery killed in between neither
//! replays again nor loses the figures.
//!
//! # What is still lost
//!
//! - A record being written at the instant of the kill. Every slot the collector hands back is
//!   zeroed first (collector side, off the hot path), and a record's head slot is written
//!   before its continuation slots and before `write` is published; so a non-zero slot at
//!   `write` is a record whose recording call had not returned. It is counted
//!   (`events_lost_in_flight`), not recovered: its slots may be half-written. This per-slot
//!   marker costs the hot path nothing (a separate "claim" store would cost one store per
//!   record).
//! - Records the collector had drained but still held: device-timed events waiting for their
//!   GPU time (counted in the header every pass as `held`, reported as lost in flight: the GPU
//!   context died with the process), MoE routing totals of the window in progress (added in
//!   place on the recording thread, in the heap; `profilemate recover` states the steps lost in
//!   the manifest), the step timeline rows the collector was assembling from several
//!   records, and the lifecycle row of a request still in flight at the kill (a request
//!   finished in the replayed records gets its whole row: the replay first reads the lifecycle
//!   events already in `preemption_events.csv`).
//! - With an output budget that rolls a table file over during the pass of the kill, that pass's
//!   rows in the rolled file are not truncated.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes in a slot, the ring's element.
pub(crate) const SLOT: usize = 64;

/// One slot of a ring: a record is one or more of them (`record.rs` gives their layout).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Slot(pub(crate) [u8; SLOT]);

impl Slot {
    pub(crate) const ZERO: Slot = Slot([0; SLOT]);
}

/// The file name prefix of a session's buffers in its output directory.
pub(crate) const BUFFER_FILE_PREFIX: &str = ".profilemate_buffers.";

const PAGE: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"PMBUFS01");
const RING_MAGIC: u64 = u64::from_le_bytes(*b"PMRING01");
/// Most CPU operation names a session registers (see `CpuOp::MAX`).
const MAX_OPS: usize = 1024;
const OP_ENTRY: usize = 128;
/// Session header: one page of fields, then the CPU operation names.
pub(crate) const HEADER_BYTES: usize = PAGE + MAX_OPS * OP_ENTRY;
const RING_HEADER: usize = PAGE;

// Session header fields (byte offsets).
const H_MAGIC: usize = 0;
const H_PID: usize = 8;
const H_CAP: usize = 16;
const H_RINGS: usize = 24;
const H_ANCHOR_RAW: usize = 32;
const H_ANCHOR_NS: usize = 40;
const H_STATE: usize = 48;
const H_HELD: usize = 56;
const H_OPS: usize = 64;
const H_ENABLED: usize = 72;
const H_START_RAW: usize = 80;
/// A replayed file's figures: events recovered, events lost in flight.
const H_RECOVERED: usize = 88;
const H_LOST: usize = 96;
/// Journal: per table, `1 + length` of its file at the pass start (0: no file).
const H_JOURNAL: usize = 256;
const JOURNAL_ENTRIES: usize = 32;

// Ring header fields.
const R_MAGIC: usize = 0;
const R_CAP: usize = 8;
const R_KIND: usize = 16;
const R_WRITE: usize = 64;
const R_READ: usize = 128;
const R_PASS_START: usize = 192;

const STATE_IDLE: u64 = 0;
const STATE_IN_PASS: u64 = 1;
/// Replayed into the files; kept (with its figures) until the caller recorded them.
const STATE_REPLAYED: u64 = 2;

/// What a ring carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum RingKind {
    /// Every profiler's records.
    Events = 0,
    /// MoE per-step routing detail.
    MoeDetail = 1,
}

/// Keeps a ring's memory alive: a heap allocation or a mapped region of the session file.
enum Backing {
    Heap(#[allow(dead_code)] Box<[Slot]>),
    Map(#[allow(dead_code)] memmap2::MmapMut),
}

/// A ring's memory: a header page and `cap` slots.
pub(crate) struct RingMem {
    base: *mut u8,
    cap: u64,
    _backing: Backing,
}

impl Drop for RingMem {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Backing::Map(map) = &self._backing {
            fork_guard::untrack_map(map.as_ptr().cast_mut());
        }
    }
}

// SAFETY: the memory is only reached through `RingProducer` (one thread) and `RingConsumer`
// (the collector), which synchronise through the atomic `write` and `read` positions.
unsafe impl Send for RingMem {}
// SAFETY: as above.
unsafe impl Sync for RingMem {}

impl RingMem {
    fn heap(cap: usize) -> RingMem {
        let mut slots = vec![Slot::ZERO; RING_HEADER / SLOT + cap].into_boxed_slice();
        let base = slots.as_mut_ptr().cast::<u8>();
        let mem = RingMem { base, cap: cap as u64, _backing: Backing::Heap(slots) };
        mem.init(RingKind::Events);
        mem
    }

    fn init(&self, kind: RingKind) {
        self.field(R_MAGIC).store(RING_MAGIC, Ordering::Relaxed);
        self.field(R_CAP).store(self.cap, Ordering::Relaxed);
        self.field(R_KIND).store(kind as u64, Ordering::Relaxed);
    }

    #[inline(always)]
    fn field(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is a multiple of 8 inside the ring header, which lives as long as `self`;
        // the header is page-aligned (mapping) or 64-byte aligned (heap slots).
        unsafe { &*self.base.add(at).cast::<AtomicU64>() }
    }

    #[inline(always)]
    fn slot_ptr(&self, index: u64) -> *mut Slot {
        // SAFETY: callers pass `index < cap`; the slots follow the header.
        unsafe { self.base.add(RING_HEADER).cast::<Slot>().add(index as usize) }
    }
}

/// Creates a heap ring (a session that writes no files, or whose mapping failed).
pub(crate) fn heap_ring(cap: usize) -> (RingProducer, RingConsumer) {
    split(Arc::new(RingMem::heap(cap)), false)
}

fn split(mem: Arc<RingMem>, persistent: bool) -> (RingProducer, RingConsumer) {
    let cap = mem.cap;
    let write = mem.field(R_WRITE).load(Ordering::Acquire);
    let read = mem.field(R_READ).load(Ordering::Acquire);
    let producer =
        RingProducer { base: mem.base, _mem: mem.clone(), write, index: write % cap.max(1), read_cache: read, cap };
    let consumer = RingConsumer { mem, drained: read, index: read % cap.max(1), cap, persistent };
    (producer, consumer)
}

/// The recording thread's end of a ring.
pub(crate) struct RingProducer {
    /// Keeps the memory alive; the hot path uses `base` (one load less per record).
    _mem: Arc<RingMem>,
    base: *mut u8,
    /// Next position to write (never wraps).
    write: u64,
    /// `write % cap`, kept alongside so the hot path never divides.
    index: u64,
    /// The consumer's committed position as last read.
    read_cache: u64,
    cap: u64,
}

// SAFETY: the producer is used by one thread at a time (it is moved, never shared); `base`
// points into memory that `_mem` keeps alive.
unsafe impl Send for RingProducer {}

impl RingProducer {
    #[inline(always)]
    fn field(&self, at: usize) -> &AtomicU64 {
        // SAFETY: as `RingMem::field`, through the cached base pointer.
        unsafe { &*self.base.add(at).cast::<AtomicU64>() }
    }

    #[inline(always)]
    fn slot_ptr(&self, index: u64) -> *mut Slot {
        // SAFETY: callers pass `index < cap`; the slots follow the header.
        unsafe { self.base.add(RING_HEADER).cast::<Slot>().add(index as usize) }
    }

    /// Room for `n` slots, reloading the consumer's position only when the cached one says no.
    #[inline(always)]
    fn has_room(&mut self, n: u64) -> bool {
        if self.write + n - self.read_cache <= self.cap {
            return true;
        }
        self.read_cache = self.field(R_READ).load(Ordering::Acquire);
        self.write + n - self.read_cache <= self.cap
    }

    /// Writes one slot and publishes it. `Err` when the ring is full.
    #[inline(always)]
    pub(crate) fn push(&mut self, slot: Slot) -> Result<(), ()> {
        self.push_in_place(|s| *s = slot)
    }

    /// Fills the next free slot in place with `fill` and publishes it. `Err` when the ring is
    /// full. `fill` must write the whole slot (a heap ring's free slot holds an old record).
    /// Writing in place, rather than building the slot on the stack and copying it, spares the
    /// hot path a 64-byte copy whose loads would wait on the text's byte-wise stores.
    #[inline(always)]
    pub(crate) fn push_in_place(&mut self, fill: impl FnOnce(&mut Slot)) -> Result<(), ()> {
        if !self.has_room(1) {
            return Err(());
        }
        let end = self.write + 1;
        // SAFETY: `index < cap`, and the slot is free: the consumer's committed position is at
        // most `cap` slots behind; nothing else refers to it until `write` is published below.
        fill(unsafe { &mut *self.slot_ptr(self.index) });
        self.index += 1;
        if self.index == self.cap {
            self.index = 0;
        }
        self.write = end;
        self.field(R_WRITE).store(end, Ordering::Release);
        Ok(())
    }

    /// Writes `n` slots filled by `fill(i, slot)` and publishes them together. `Err` when the
    /// ring has no room for all of them.
    #[inline]
    pub(crate) fn push_many(&mut self, n: u64, mut fill: impl FnMut(u64, &mut Slot)) -> Result<(), ()> {
        if n > self.cap || !self.has_room(n) {
            return Err(());
        }
        let end = self.write + n;
        // The head slot first: a kill part-way leaves it non-zero at `write` (in flight).
        for i in 0..n {
            let mut s = Slot::ZERO;
            fill(i, &mut s);
            // SAFETY: as in `push`, for each of the `n` free slots.
            unsafe { self.slot_ptr(self.index).write(s) };
            self.index += 1;
            if self.index == self.cap {
                self.index = 0;
            }
        }
        self.write = end;
        self.field(R_WRITE).store(end, Ordering::Release);
        Ok(())
    }
}

/// The collector's end of a ring.
pub(crate) struct RingConsumer {
    mem: Arc<RingMem>,
    /// Position up to which records were handed to the collector.
    drained: u64,
    index: u64,
    cap: u64,
    /// Committed only when [`commit`](Self::commit) is called (after the files are flushed);
    /// a heap ring commits as it drains.
    persistent: bool,
}

/// Iterates the slots of a ring from a position.
struct SlotIter<'a> {
    mem: &'a RingMem,
    index: u64,
    left: u64,
}

impl<'a> Iterator for SlotIter<'a> {
    type Item = &'a Slot;
    #[inline]
    fn next(&mut self) -> Option<&'a Slot> {
        if self.left == 0 {
            return None;
        }
        // SAFETY: the slot was published (acquire load of `write`) and is not rewritten before
        // the consumer commits past it.
        let s = unsafe { &*self.mem.slot_ptr(self.index) };
        self.index += 1;
        if self.index == self.mem.cap {
            self.index = 0;
        }
        self.left -= 1;
        Some(s)
    }
}

impl RingConsumer {
    /// Calls `f` with every complete record published since the last drain (its head slot and
    /// an iterator at its continuation slots); returns the records read.
    pub(crate) fn drain<F>(&mut self, mut f: F) -> usize
    where
        F: for<'s> FnMut(&'s Slot, &mut dyn Iterator<Item = &'s Slot>),
    {
        let end = self.mem.field(R_WRITE).load(Ordering::Acquire);
        let n = end.saturating_sub(self.drained);
        if n == 0 {
            return 0;
        }
        let mut it = SlotIter { mem: &self.mem, index: self.index, left: n };
        let mut events = 0;
        while let Some(head) = it.next() {
            f(head, &mut it);
            events += 1;
        }
        self.drained = end;
        self.index = (self.index + n % self.cap) % self.cap;
        if !self.persistent {
            self.commit();
        }
        events
    }

    /// Hands the drained slots back to the producer (for a persistent ring: once their rows are
    /// in the files).
    pub(crate) fn commit(&self) {
        if self.persistent {
            // Slots handed back are zero: a record half-written at a kill shows as a non-zero
            // slot at `write` (see the module docs).
            let read = self.mem.field(R_READ).load(Ordering::Relaxed);
            for pos in read..self.drained {
                // SAFETY: drained, not yet handed back: the producer does not touch it.
                unsafe { self.mem.slot_ptr(pos % self.cap).write(Slot::ZERO) };
            }
        }
        self.mem.field(R_READ).store(self.drained, Ordering::Release);
    }

    /// Every record drained is committed.
    pub(crate) fn is_committed(&self) -> bool {
        self.mem.field(R_READ).load(Ordering::Relaxed) == self.drained
    }

    /// The producer is gone (its thread exited).
    pub(crate) fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.mem) == 1
    }

    /// Nothing published is left to drain.
    pub(crate) fn is_empty(&self) -> bool {
        self.mem.field(R_WRITE).load(Ordering::Acquire) == self.drained
    }
}

fn map_region(file: &File, offset: u64, len: usize) -> std::io::Result<memmap2::MmapMut> {
    // SAFETY: the file is ours (created and locked by this session, or locked by the recovery
    // that opened it); nobody truncates it while it is mapped.
    unsafe { memmap2::MmapOptions::new().offset(offset).len(len).populate().map_mut(file) }
}

#[cfg(unix)]
fn reserve(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

#[cfg(not(unix))]
fn reserve(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    file.set_len(offset + len)
}

/// Takes the file's exclusive lock without waiting; `Ok(false)` when someone holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

/// Takes the lock, waiting up to 200 ms: a process forked to run another program holds the
/// file's open description (and so the `flock`) until its `exec` closes it. A process forked
/// without `exec` lets go of it at once ([`fork_guard`]), unless more than
/// [`fork_guard::SLOTS`] sessions were alive at the fork.
fn lock_soon(file: &File) -> std::io::Result<bool> {
    for _ in 0..40 {
        if try_lock(file)? {
            return Ok(true);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(false)
}

/// A child forked without `exec` (a worker pool made with `os.fork`, `multiprocessing`'s
/// default start method on Linux, a daemonising fork) inherits every open descriptor, the
/// session buffer files' among them, and a `flock` is held by the open file description: as
/// long as one descriptor of it is open, the lock stays, so the parent's buffers would read as
/// live (never recovered) until the child ends too. A `pthread_atfork` child handler makes the
/// child let go: each lock descriptor of the parent is replaced in the child by `/dev/null`
/// (`dup3`, async-signal-safe, as a handler in the child of a threaded process must be), and
/// each mapping of a buffer file (which references the open file description too) by private
/// zeroed memory at the same address (`mmap` with `MAP_FIXED`). That drops only the child's
/// references; the parent's descriptor still holds the lock. The descriptor number stays open
/// (now `/dev/null`) and the addresses stay mapped, so a session the child drops later closes
/// and unmaps those, never someone else's, and a child that records through the handles it
/// inherited writes into its own memory, not into the parent's rings (its records are lost:
/// no collector runs in it).
#[cfg(unix)]
pub(crate) mod fork_guard {
    use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

    /// Lock descriptors tracked at once (sessions alive in the process); beyond that a forked
    /// child keeps the lock of the sessions not tracked.
    pub(crate) const SLOTS: usize = 64;
    static LOCK_FDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(-1) }; SLOTS];
    static REGISTER: std::sync::Once = std::sync::Once::new();

    extern "C" fn in_child() {
        // SAFETY: `open`, `dup3`/`dup2` and `close` are async-signal-safe; the path is a
        // static C string.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if null < 0 {
                return;
            }
            for slot in &LOCK_FDS {
                let fd = slot.swap(-1, Ordering::Relaxed);
                if fd >= 0 {
                    #[cfg(any(target_os = "linux", target_os = "android"))]
                    libc::dup3(null, fd, libc::O_CLOEXEC);
                    #[cfg(not(any(target_os = "linux", target_os = "android")))]
                    libc::dup2(null, fd);
                }
            }
            libc::close(null);
            // `mmap` is a bare system call (no lock taken): safe here in practice, though POSIX
            // does not list it.
            for (a, l) in &MAPS {
                let (addr, len) = (a.swap(0, Ordering::Relaxed), l.swap(0, Ordering::Relaxed));
                if addr != 0 && len != 0 {
                    libc::mmap(
                        addr as *mut libc::c_void,
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    );
                }
            }
        }
    }

    /// Makes a child forked from now on let go of the lock held through `fd`.
    pub(crate) fn track(fd: i32) {
        REGISTER.call_once(|| {
            // SAFETY: registers a handler that only makes async-signal-safe calls.
            let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
            if rc != 0 {
                eprintln!(
                    "profilemate: pthread_atfork failed ({rc}): a child forked without exec keeps the thread \
                     buffers' lock, so they read as live until it ends"
                );
            }
        });
        if !LOCK_FDS.iter().any(|slot| slot.compare_exchange(-1, fd, Ordering::Relaxed, Ordering::Relaxed).is_ok()) {
            eprintln!(
                "profilemate: more than {SLOTS} sessions alive: a child forked without exec keeps this session's \
                 buffer lock until it ends"
            );
        }
    }

    /// `fd` is about to be closed: a later fork has nothing to let go of.
    pub(crate) fn untrack(fd: i32) {
        for slot in &LOCK_FDS {
            let _ = slot.compare_exchange(fd, -1, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Makes a child forked from now on replace the mapping at `addr` (`len` bytes) with
    /// private zeroed memory: a shared file mapping holds the open file description too (and so
    /// the lock), and a child recording through the handles it inherited writes where the
    /// parent's collector never reads, instead of into the parent's rings.
    pub(crate) fn track_map(addr: *mut u8, len: usize) {
        let addr = addr as usize;
        for (a, l) in &MAPS {
            if a.compare_exchange(0, addr, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                l.store(len, Ordering::Release);
                return;
            }
        }
        eprintln!(
            "profilemate: more than {MAP_SLOTS} thread buffers alive: a child forked without exec keeps the \
             buffers' lock until it ends"
        );
    }

    /// The mapping at `addr` is about to be unmapped.
    pub(crate) fn untrack_map(addr: *mut u8) {
        let addr = addr as usize;
        for (a, l) in &MAPS {
            if a.load(Ordering::Relaxed) == addr {
                l.store(0, Ordering::Relaxed);
                a.store(0, Ordering::Release);
            }
        }
    }

    const MAP_SLOTS: usize = 4096;
    /// Mappings of the buffer files alive: `(address, length)`; 0 is a free entry.
    static MAPS: [(AtomicUsize, AtomicUsize); MAP_SLOTS] =
        [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAP_SLOTS];
}

/// The header's record of the profilers enabled (bit per profiler) and of MoE per-step detail
/// (bit 63).
pub(crate) fn enabled_mask(enabled: &[bool], moe_detail: bool) -> u64 {
    let mut mask = u64::from(moe_detail) << 63;
    for (i, on) in enabled.iter().enumerate() {
        mask |= u64::from(*on) << i;
    }
    mask
}

fn ring_bytes(cap: u64) -> u64 {
    let bytes = RING_HEADER as u64 + cap * SLOT as u64;
    bytes.div_ceil(PAGE as u64) * PAGE as u64
}

/// A session's buffer file: its header and the regions of its rings.
pub(crate) struct BufferFile {
    path: PathBuf,
    file: File,
    header: memmap2::MmapMut,
    cap: u64,
    /// Regions handed out, and every ring's memory (for the collector's journal).
    rings: Mutex<Vec<Arc<RingMem>>>,
}

impl BufferFile {
    fn h(&self, at: usize) -> &AtomicU64 {
        header_field(&self.header, at)
    }

    /// Creates and locks `DIR/.profilemate_buffers.<pid>.<n>` for a session whose rings hold
    /// `cap` slots each.
    pub(crate) fn create(
        dir: &Path,
        cap: usize,
        enabled: u64,
        start_raw: u64,
        ops: &[&str],
    ) -> std::io::Result<BufferFile> {
        let pid = std::process::id();
        let mut n = 0u32;
        let (path, file) = loop {
            let path = dir.join(format!("{BUFFER_FILE_PREFIX}{pid}.{n}"));
            match std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1 << 16 => n += 1,
                Err(e) => return Err(e),
            }
        };
        let made = (|| {
            if !try_lock(&file)? {
                return Err(std::io::Error::other("the new buffer file is locked by another process"));
            }
            reserve(&file, 0, HEADER_BYTES as u64)?;
            let header = map_region(&file, 0, HEADER_BYTES)?;
            let b = BufferFile { path: path.clone(), file, header, cap: cap as u64, rings: Mutex::new(Vec::new()) };
            // Tracked while `b` owns the descriptor and the mapping (its drop untracks them).
            #[cfg(unix)]
            {
                fork_guard::track(std::os::fd::AsRawFd::as_raw_fd(&b.file));
                fork_guard::track_map(b.header.as_ptr().cast_mut(), b.header.len());
            }
            b.h(H_PID).store(u64::from(pid), Ordering::Relaxed);
            b.h(H_CAP).store(cap as u64, Ordering::Relaxed);
            b.h(H_ENABLED).store(enabled, Ordering::Relaxed);
            b.h(H_START_RAW).store(start_raw, Ordering::Relaxed);
            b.h(H_ANCHOR_RAW).store(start_raw, Ordering::Relaxed);
            for (i, name) in ops.iter().enumerate() {
                b.set_op(i, name);
            }
            b.h(H_MAGIC).store(MAGIC, Ordering::Release);
            Ok(b)
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        made
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Records CPU operation `id`'s name (set-up time, under the session's operations lock).
    pub(crate) fn set_op(&self, id: usize, name: &str) {
        if id >= MAX_OPS {
            return;
        }
        let at = PAGE + id * OP_ENTRY;
        let bytes = &name.as_bytes()[..name.len().min(OP_ENTRY - 1)];
        // SAFETY: the entry lies inside the header mapping; names are written once, before any
        // record that uses the id, by the thread that registers it.
        unsafe {
            let p = self.header.as_ptr().cast_mut().add(at);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.add(1), bytes.len());
            p.write(bytes.len() as u8);
        }
        let count = self.h(H_OPS).load(Ordering::Relaxed).max(id as u64 + 1);
        self.h(H_OPS).store(count, Ordering::Release);
    }

    /// Adds a ring region to the file and maps it (once per thread: a lock, a syscall or two).
    pub(crate) fn new_ring(&self, kind: RingKind) -> std::io::Result<(RingProducer, RingConsumer)> {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let len = ring_bytes(self.cap);
        let offset = HEADER_BYTES as u64 + rings.len() as u64 * len;
        reserve(&self.file, offset, len)?;
        let mut map = map_region(&self.file, offset, len as usize)?;
        // A shared file mapping's page is mapped read-only until first written (the kernel
        // tracks which pages are dirty): write every page now, so that the engine thread's
        // first record into each does not take that fault.
        for page in map.chunks_mut(PAGE) {
            page[0] = 0;
        }
        let base = map.as_mut_ptr();
        #[cfg(unix)]
        fork_guard::track_map(base, map.len());
        let mem = Arc::new(RingMem { base, cap: self.cap, _backing: Backing::Map(map) });
        mem.init(kind);
        rings.push(mem.clone());
        self.h(H_RINGS).store(rings.len() as u64, Ordering::Release);
        Ok(split(mem, true))
    }

    /// Journal step 1: file lengths, rings' pass starts, clock anchor, then the state.
    pub(crate) fn begin_pass(&self, files: &[Option<u64>], anchor: (u64, u64)) {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        for r in rings.iter() {
            let read = r.field(R_READ).load(Ordering::Relaxed);
            r.field(R_PASS_START).store(read, Ordering::Relaxed);
        }
        drop(rings);
        write_journal(&self.header, files);
        self.h(H_ANCHOR_RAW).store(anchor.0, Ordering::Relaxed);
        self.h(H_ANCHOR_NS).store(anchor.1, Ordering::Relaxed);
        self.h(H_STATE).store(STATE_IN_PASS, Ordering::Release);
    }

    /// Journal step 3 (after the consumers committed): the records the collector still holds,
    /// then the state.
    pub(crate) fn end_pass(&self, held: u64) {
        self.h(H_HELD).store(held, Ordering::Relaxed);
        self.h(H_STATE).store(STATE_IDLE, Ordering::Release);
    }

    /// A normal shutdown: the file goes (its records are all in the files).
    pub(crate) fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("profilemate: cannot remove the thread buffers {}: {e}", self.path.display());
        }
    }
}

fn header_field(header: &memmap2::MmapMut, at: usize) -> &AtomicU64 {
    // SAFETY: `at` is a multiple of 8 inside the page-aligned header mapping.
    unsafe { &*header.as_ptr().add(at).cast::<AtomicU64>() }
}

fn write_journal(header: &memmap2::MmapMut, files: &[Option<u64>]) {
    for i in 0..JOURNAL_ENTRIES {
        let v = files.get(i).copied().flatten().map_or(0, |len| len + 1);
        header_field(header, H_JOURNAL + i * 8).store(v, Ordering::Relaxed);
    }
}

impl Drop for BufferFile {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            fork_guard::untrack(std::os::fd::AsRawFd::as_raw_fd(&self.file));
            fork_guard::untrack_map(self.header.as_ptr().cast_mut());
        }
    }
}

impl std::fmt::Debug for BufferFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferFile").field("path", &self.path).finish()
    }
}

/// The buffer file of a session whose process died, opened and locked for recovery.
pub(crate) struct DeadBuffers {
    file: File,
    header: memmap2::MmapMut,
    pub(crate) pid: u32,
    pub(crate) enabled: u64,
    pub(crate) start_raw: u64,
    pub(crate) anchor: (u64, u64),
    pub(crate) held: u64,
    pub(crate) ops: Vec<String>,
    /// Per table, its file's length at the start of the pass the process died in (`None`: no
    /// file, or the process was between passes).
    pub(crate) journal: Option<Vec<Option<u64>>>,
    /// Replayed already by a recovery that stopped before removing the file: its figures
    /// (events recovered, lost in flight).
    pub(crate) replayed: Option<(u64, u64)>,
    /// The rings' collector ends, for the replay to take.
    pub(crate) rings: Vec<(RingKind, RingConsumer)>,
    mems: Vec<Arc<RingMem>>,
}

/// What opening a buffer file found.
pub(crate) enum Opened {
    /// Its session is alive, or another process is recovering it.
    Locked,
    /// Killed while making the file, before its header was complete: it never held a record
    /// (removed).
    Empty,
    Dead(Box<DeadBuffers>),
}

/// Buffer files in `dir`.
pub(crate) fn buffer_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(BUFFER_FILE_PREFIX) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

impl DeadBuffers {
    /// Opens and locks `path`; `Locked` when its session lives or someone recovers it.
    pub(crate) fn open(path: &Path) -> std::io::Result<Opened> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        if !lock_soon(&file)? {
            return Ok(Opened::Locked);
        }
        let len = file.metadata()?.len();
        let bad =
            |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {why}", path.display()));
        let magic = if len < HEADER_BYTES as u64 {
            0
        } else {
            header_field(&map_region(&file, 0, HEADER_BYTES)?, H_MAGIC).load(Ordering::Acquire)
        };
        if magic == 0 {
            // The magic is written last when the file is made, before any ring exists.
            std::fs::remove_file(path)?;
            return Ok(Opened::Empty);
        }
        let header = map_region(&file, 0, HEADER_BYTES)?;
        let h = |at| header_field(&header, at).load(Ordering::Acquire);
        if h(H_MAGIC) != MAGIC {
            return Err(bad("not a profilemate buffer file of this version"));
        }
        let cap = h(H_CAP);
        if cap == 0 || cap > 1 << 26 {
            return Err(bad("bad ring capacity in its header"));
        }
        let ops = (0..(h(H_OPS) as usize).min(MAX_OPS))
            .map(|i| {
                let e = &header[PAGE + i * OP_ENTRY..PAGE + (i + 1) * OP_ENTRY];
                let n = usize::from(e[0]).min(OP_ENTRY - 1);
                String::from_utf8_lossy(&e[1..1 + n]).into_owned()
            })
            .collect();
        let replayed = (h(H_STATE) == STATE_REPLAYED).then(|| (h(H_RECOVERED), h(H_LOST)));
        let journal = (h(H_STATE) == STATE_IN_PASS)
            .then(|| (0..JOURNAL_ENTRIES).map(|i| h(H_JOURNAL + i * 8).checked_sub(1)).collect());
        let mut rings = Vec::new();
        let mut mems = Vec::new();
        let rlen = ring_bytes(cap);
        let count =
            if replayed.is_some() { 0 } else { h(H_RINGS).min((len.saturating_sub(HEADER_BYTES as u64)) / rlen) };
        for i in 0..count {
            let mut map = map_region(&file, HEADER_BYTES as u64 + i * rlen, rlen as usize)?;
            let base = map.as_mut_ptr();
            let mem = Arc::new(RingMem { base, cap, _backing: Backing::Map(map) });
            if mem.field(R_MAGIC).load(Ordering::Relaxed) != RING_MAGIC
                || mem.field(R_CAP).load(Ordering::Relaxed) != cap
            {
                // Registered but never initialised (killed while adding it): no records.
                continue;
            }
            let kind = if mem.field(R_KIND).load(Ordering::Relaxed) == RingKind::MoeDetail as u64 {
                RingKind::MoeDetail
            } else {
                RingKind::Events
            };
            if journal.is_some() {
                // Killed in a pass: its rows were truncated away; replay from the pass start.
                let start = mem.field(R_PASS_START).load(Ordering::Relaxed);
                mem.field(R_READ).store(start, Ordering::Release);
            }
            // A write position behind `read`, or ahead of it by more than the ring holds: the
            // header is damaged, and replaying would be guessing.
            let (w, r) = (mem.field(R_WRITE).load(Ordering::Acquire), mem.field(R_READ).load(Ordering::Acquire));
            if w < r || w - r > cap {
                return Err(bad("a ring's positions are inconsistent"));
            }
            mems.push(mem.clone());
            let (_, c) = split(mem, true);
            rings.push((kind, c));
        }
        Ok(Opened::Dead(Box::new(DeadBuffers {
            pid: h(H_PID) as u32,
            enabled: h(H_ENABLED),
            start_raw: h(H_START_RAW),
            anchor: (h(H_ANCHOR_RAW), h(H_ANCHOR_NS)),
            held: h(H_HELD),
            ops,
            journal,
            replayed,
            file,
            header,
            rings,
            mems,
        })))
    }

    /// Records in flight at the kill: a ring whose slot at `write` is not zero (a record being
    /// written, not yet published; see the module docs), plus what the collector held
    /// (device-timed events awaiting their time).
    pub(crate) fn lost_in_flight(&self) -> u64 {
        let in_flight = self
            .mems
            .iter()
            .filter(|m| {
                let (w, r) = (m.field(R_WRITE).load(Ordering::Relaxed), m.field(R_READ).load(Ordering::Relaxed));
                // SAFETY: `w % cap < cap`.
                w - r < m.cap && unsafe { (*m.slot_ptr(w % m.cap)).kind() } != 0
            })
            .count() as u64;
        in_flight + self.held
    }

    /// Journal step 1 of the recovery's own pass.
    pub(crate) fn begin_pass(&self, files: &[Option<u64>]) {
        for m in &self.mems {
            let read = m.field(R_READ).load(Ordering::Relaxed);
            m.field(R_PASS_START).store(read, Ordering::Relaxed);
        }
        write_journal(&self.header, files);
        header_field(&self.header, H_STATE).store(STATE_IN_PASS, Ordering::Release);
    }

    /// Commits everything replayed (the producer is dead: `write` no longer moves), forgets
    /// what was in flight, and marks the file replayed with its figures; the caller removes it
    /// ([`remove_if_replayed`]) once it has recorded them.
    pub(crate) fn finish(self, recovered: u64, lost: u64) {
        for m in &self.mems {
            let w = m.field(R_WRITE).load(Ordering::Acquire);
            m.field(R_READ).store(w, Ordering::Relaxed);
            // The record in flight, counted once: its slot is cleared.
            // SAFETY: `w % cap < cap`.
            unsafe { m.slot_ptr(w % m.cap).write(Slot::ZERO) };
        }
        header_field(&self.header, H_HELD).store(0, Ordering::Relaxed);
        header_field(&self.header, H_RECOVERED).store(recovered, Ordering::Relaxed);
        header_field(&self.header, H_LOST).store(lost, Ordering::Relaxed);
        header_field(&self.header, H_STATE).store(STATE_REPLAYED, Ordering::Release);
        drop(self.file);
    }
}

/// Removes the buffer file at `path` if a recovery replayed it; `Ok(false)` when it is live,
/// being recovered, or not replayed yet.
pub(crate) fn remove_if_replayed(path: &Path) -> std::io::Result<bool> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    if !try_lock(&file)? || file.metadata()?.len() < HEADER_BYTES as u64 {
        return Ok(false);
    }
    let header = map_region(&file, 0, HEADER_BYTES)?;
    let replayed = header_field(&header, H_MAGIC).load(Ordering::Acquire) == MAGIC
        && header_field(&header, H_STATE).load(Ordering::Acquire) == STATE_REPLAYED;
    if replayed {
        std::fs::remove_file(path)?;
    }
    Ok(replayed)
}

/// Whether `name` is one of the files a session writes in its output directory.
fn is_run_file(name: &str) -> bool {
    let table = crate::rows::Table::ALL.iter().any(|t| name.starts_with(t.name()) && name.ends_with(".csv"));
    table
        || name.ends_with("_summary.json")
        || name.starts_with("profilemate_")
        || name.contains(".parquet")
        || name.starts_with(BUFFER_FILE_PREFIX)
}

/// A new session is starting in `dir`: when it holds the thread buffers of a dead session, that
/// run's files (which the new session's sinks would truncate) move to `dir/killed-run-<pid>/`,
/// buffers included, for recovery there. Returns that directory and the dead pids.
pub(crate) fn set_aside_dead_run(dir: &Path) -> std::io::Result<Option<(PathBuf, Vec<u32>)>> {
    let mut locked = Vec::new();
    for path in buffer_files(dir)? {
        let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(&path) else { continue };
        if !try_lock(&file)? {
            continue;
        }
        let mut pid = [0u8; 4];
        let _ = std::io::Read::read_exact(&mut (&file), &mut [0u8; H_PID])
            .and_then(|()| std::io::Read::read_exact(&mut (&file), &mut pid));
        locked.push((file, u32::from_le_bytes(pid)));
    }
    let Some(&(_, first)) = locked.first() else { return Ok(None) };
    let mut aside = dir.join(format!("killed-run-{first}"));
    let mut k = 1;
    while aside.exists() {
        k += 1;
        aside = dir.join(format!("killed-run-{first}-{k}"));
    }
    std::fs::create_dir(&aside)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && is_run_file(&name) {
            std::fs::rename(entry.path(), aside.join(&name))?;
        }
    }
    Ok(Some((aside, locked.into_iter().map(|(_, pid)| pid).collect())))
}
