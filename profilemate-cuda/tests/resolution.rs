//! The event pool and the resolution of device times, against a mock of the CUDA event API: no
//! GPU needed. A `Device` plays the GPU: the test decides which recorded events it has reached,
//! how long each region took, and which event fails.

use mockall::mock;
use profilemate_core::{
    BackendChoice, Component, Config, MemorySink, Phase, ProfilerKind, RunManifest, Session, TimingBackend,
};
use profilemate_cuda::{CudaError, CudaOptions, CudaTimingBackend, EventApi, EventError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

mock! {
    pub Api {}
    impl EventApi for Api {
        type Event = u32;
        fn create(&self) -> Result<u32, EventError>;
        fn record(&self, event: u32) -> Result<(), EventError>;
        fn query(&self, event: u32) -> Result<bool, EventError>;
        fn elapsed_ms(&self, start: u32, end: u32) -> Result<Option<f32>, EventError>;
        fn destroy(&self, event: u32);
    }
}

const ILLEGAL_ADDRESS: EventError = EventError::new(700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access");
const INVALID_HANDLE: EventError = EventError::new(400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle");

/// What the fake GPU knows. Recordings are numbered in order (`seq`); region `k` (0-based) is
/// recordings `2k` (start) and `2k + 1` (end) when every region gets both marks.
#[derive(Default)]
struct State {
    created: u32,
    destroyed: Vec<u32>,
    /// Recording number of the latest record of each event.
    seq_of: HashMap<u32, usize>,
    recordings: usize,
    /// Recordings the device has reached.
    done: HashSet<usize>,
    /// Milliseconds of the region that ends at recording `seq`.
    ms: HashMap<usize, f32>,
    /// Recordings whose query fails.
    query_fails: HashMap<usize, EventError>,
    /// Recordings whose elapsed time fails.
    elapsed_fails: HashMap<usize, EventError>,
    /// Recording numbers whose `cuEventRecord` fails.
    record_fails: HashMap<usize, EventError>,
    /// Fail `create` after this many events.
    create_limit: Option<u32>,
    /// Threads that called `query` or `elapsed_ms`.
    resolving_threads: HashSet<ThreadId>,
    queries: usize,
}

#[derive(Clone, Default)]
struct Device(Arc<Mutex<State>>);

impl Device {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("device state")
    }

    /// The device reaches region `k` (both its events), which took `ms`.
    fn complete_region(&self, k: usize, ms: f32) {
        let mut s = self.lock();
        s.done.insert(2 * k);
        s.done.insert(2 * k + 1);
        s.ms.insert(2 * k + 1, ms);
    }

    fn complete_recordings(&self, seqs: impl IntoIterator<Item = usize>) {
        let mut s = self.lock();
        s.done.extend(seqs);
    }

    fn api(&self) -> MockApi {
        let mut api = MockApi::new();
        let d = self.clone();
        api.expect_create().returning(move || {
            let mut s = d.lock();
            if s.create_limit.is_some_and(|limit| s.created >= limit) {
                return Err(INVALID_HANDLE);
            }
            s.created += 1;
            Ok(s.created)
        });
        let d = self.clone();
        api.expect_record().returning(move |e| {
            let mut s = d.lock();
            let seq = s.recordings;
            s.recordings += 1;
            if let Some(err) = s.record_fails.get(&seq) {
                return Err(*err);
            }
            s.seq_of.insert(e, seq);
            Ok(())
        });
        let d = self.clone();
        api.expect_query().returning(move |e| {
            let mut s = d.lock();
            s.resolving_threads.insert(std::thread::current().id());
            s.queries += 1;
            let seq = s.seq_of[&e];
            match s.query_fails.get(&seq) {
                Some(err) => Err(*err),
                None => Ok(s.done.contains(&seq)),
            }
        });
        let d = self.clone();
        api.expect_elapsed_ms().returning(move |start, end| {
            let mut s = d.lock();
            s.resolving_threads.insert(std::thread::current().id());
            let (a, b) = (s.seq_of[&start], s.seq_of[&end]);
            if let Some(err) = s.elapsed_fails.get(&b) {
                return Err(*err);
            }
            Ok((s.done.contains(&a) && s.done.contains(&b)).then(|| s.ms.get(&b).copied().unwrap_or(1.0)))
        });
        let d = self.clone();
        api.expect_destroy().returning(move |e| d.lock().destroyed.push(e));
        api
    }

    fn backend(&self, options: CudaOptions) -> Arc<CudaTimingBackend<MockApi>> {
        Arc::new(CudaTimingBackend::with_api(self.api(), options).expect("a backend over the mock"))
    }
}

/// A session whose collector runs a pass only when the test calls `flush()` (the timer is the
/// longest allowed, 60 s), timing with `backend`.
fn session(backend: Arc<CudaTimingBackend<MockApi>>, session_batch: usize) -> (Session, MemorySink) {
    let mut config = Config::default();
    config.flush_interval_ms = 60_000;
    config.cuda_event_batch = session_batch;
    let memory = MemorySink::new();
    let session = Session::builder()
        .config(config)
        .in_memory_only()
        .sink(memory.clone())
        .timing_backend(backend)
        .build()
        .expect("a session over the mock backend");
    (session, memory)
}

fn forward_ms(memory: &MemorySink) -> Vec<f64> {
    memory.rows().forward_pass.iter().map(|r| r.forward_time_ns as f64 / 1e6).collect()
}

fn forward_tokens(memory: &MemorySink) -> Vec<u32> {
    memory.rows().forward_pass.iter().map(|r| r.num_tokens).collect()
}

fn timing_drops(manifest: &RunManifest, profiler: ProfilerKind) -> u64 {
    manifest.dropped[profiler.as_str()]["timing"]
}

/// Runs `n` forward passes tagged by `num_tokens` = first_tag, first_tag + 1, ...
fn passes(session: &Session, n: u32, first_tag: u32) {
    let forward = session.forward_pass();
    for i in 0..n {
        forward.start(Phase::Decode, 1, first_tag + i).stop();
    }
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-3)
}

#[test]
fn regions_resolve_in_order_with_device_durations() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(64));
    let (session, memory) = session(backend.clone(), 100);
    passes(&session, 5, 0);
    for k in 0..5 {
        device.complete_region(k, (k + 1) as f32);
    }
    let manifest = session.shutdown().unwrap();
    assert_eq!(manifest.timing_backend, "cuda");
    assert_eq!(forward_tokens(&memory), vec![0, 1, 2, 3, 4]);
    assert!(close(&forward_ms(&memory), &[1.0, 2.0, 3.0, 4.0, 5.0]), "{:?}", forward_ms(&memory));
    assert_eq!(timing_drops(&manifest, ProfilerKind::ForwardPass), 0);
    let stats = backend.stats();
    assert_eq!((stats.resolved, stats.failed, stats.in_use), (5, 0, 0));
}

#[test]
fn durations_are_resolved_on_the_collector_thread_never_the_engine_thread() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(16));
    let (session, memory) = session(backend, 100);
    passes(&session, 3, 0);
    // The engine thread recorded; nothing was queried yet.
    assert_eq!(device.lock().queries, 0);
    assert_eq!(device.lock().recordings, 6);
    for k in 0..3 {
        device.complete_region(k, 2.0);
    }
    session.shutdown().unwrap();
    assert_eq!(memory.rows().forward_pass.len(), 3);
    let threads = device.lock().resolving_threads.clone();
    assert!(!threads.is_empty());
    assert!(!threads.contains(&std::thread::current().id()), "the engine thread queried an event");
}

#[test]
fn a_collector_pass_resolves_batch_after_batch_until_a_region_is_not_done() {
    // Batches of 2 queries: five finished regions are all resolved in one pass, so the batch
    // size never caps how many steps per second can be timed.
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(64).batch_size(2));
    let (session, memory) = session(backend, 100);
    passes(&session, 5, 0);
    for k in 0..5 {
        device.complete_region(k, 1.0);
    }
    session.flush().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 1, 2, 3, 4]);
    session.shutdown().unwrap();
}

#[test]
fn without_a_backend_batch_size_the_sessions_cuda_event_batch_applies() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(64));
    assert_eq!(backend.batch_size(), None);
    let (session, memory) = session(backend, 3);
    passes(&session, 7, 0);
    for k in 0..4 {
        device.complete_region(k, 1.0);
    }
    session.flush().unwrap();
    // Batches of 3: the first resolves 0..3, the second stops at region 4, not done yet.
    assert_eq!(forward_tokens(&memory), vec![0, 1, 2, 3]);
    for k in 4..7 {
        device.complete_region(k, 1.0);
    }
    session.flush().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 1, 2, 3, 4, 5, 6]);
    session.shutdown().unwrap();
}

#[test]
fn a_batch_ends_at_the_first_region_not_done() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(64).batch_size(10));
    let (session, memory) = session(backend.clone(), 100);
    passes(&session, 6, 0);
    for k in [0, 1, 3, 4, 5] {
        device.complete_region(k, 1.0);
    }
    session.flush().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 1], "region 2 is not done: later ones wait behind it");
    device.complete_region(2, 1.0);
    session.flush().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 1, 2, 3, 4, 5]);
    assert!(backend.stats().pending_polls >= 1);
    session.shutdown().unwrap();
}

#[test]
fn regions_completing_out_of_order_are_written_in_order() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(16));
    let (session, memory) = session(backend, 100);
    passes(&session, 3, 10);
    device.complete_region(2, 3.0);
    device.complete_region(1, 2.0);
    session.flush().unwrap();
    assert!(memory.rows().forward_pass.is_empty());
    device.complete_region(0, 1.0);
    session.flush().unwrap();
    assert_eq!(forward_tokens(&memory), vec![10, 11, 12]);
    assert!(close(&forward_ms(&memory), &[1.0, 2.0, 3.0]));
    session.shutdown().unwrap();
}

#[test]
fn an_end_event_done_before_its_start_is_still_pending() {
    // The driver answers NOT_READY from cuEventElapsedTime while either event is incomplete.
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(16));
    let (session, memory) = session(backend, 100);
    passes(&session, 1, 0);
    device.complete_recordings([1]);
    session.flush().unwrap();
    assert!(memory.rows().forward_pass.is_empty());
    device.complete_region(0, 4.0);
    session.flush().unwrap();
    assert!(close(&forward_ms(&memory), &[4.0]));
    session.shutdown().unwrap();
}

#[test]
fn a_late_region_keeps_its_events_until_it_resolves() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(8));
    let (session, memory) = session(backend.clone(), 100);
    passes(&session, 2, 0);
    device.complete_region(1, 1.0);
    for _ in 0..3 {
        session.flush().unwrap();
        assert!(memory.rows().forward_pass.is_empty());
        assert_eq!(backend.stats().in_use, 4, "both regions hold their events while pending");
    }
    device.complete_region(0, 250.0);
    session.flush().unwrap();
    assert!(close(&forward_ms(&memory), &[250.0, 1.0]));
    assert_eq!(backend.stats().in_use, 0, "resolved regions give their events back");
    session.shutdown().unwrap();
}

#[test]
fn an_empty_pool_drops_and_counts_the_region_and_never_blocks() {
    let device = Device::default();
    // Four events: room for two regions in flight.
    let backend = device.backend(CudaOptions::default().pool_size(4));
    let (session, memory) = session(backend.clone(), 100);
    let t = Instant::now();
    passes(&session, 3, 0);
    assert!(t.elapsed() < Duration::from_secs(1), "recording waited");
    assert_eq!(backend.stats().exhausted, 1);
    assert_eq!(backend.start(), None);
    assert_eq!(backend.stats().exhausted, 2);
    device.complete_region(0, 1.0);
    device.complete_region(1, 1.0);
    session.flush().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 1]);
    // Events came back: recording works again.
    passes(&session, 1, 3);
    device.complete_region(2, 1.0);
    let manifest = session.shutdown().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 1, 3]);
    assert_eq!(timing_drops(&manifest, ProfilerKind::ForwardPass), 1);
}

#[test]
fn a_region_whose_stop_finds_the_pool_empty_gives_its_start_event_back() {
    let device = Device::default();
    // Five events: two whole regions, then a start with no event left for its stop.
    let backend = device.backend(CudaOptions::default().pool_size(5));
    let (session, memory) = session(backend.clone(), 100);
    passes(&session, 3, 0);
    assert_eq!(backend.stats().exhausted, 1);
    assert_eq!(backend.stats().in_use, 4, "the third region's start event was released");
    device.complete_region(0, 1.0);
    device.complete_region(1, 1.0);
    let manifest = session.shutdown().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 1]);
    assert_eq!(timing_drops(&manifest, ProfilerKind::ForwardPass), 1);
    assert_eq!(backend.stats().in_use, 0);
}

#[test]
fn a_driver_error_on_one_event_drops_only_that_region() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(16));
    let (session, memory) = session(backend.clone(), 100);
    device.lock().query_fails.insert(3, ILLEGAL_ADDRESS); // region 1's end event
    passes(&session, 3, 0);
    for k in 0..3 {
        device.complete_region(k, (k + 1) as f32);
    }
    let manifest = session.shutdown().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 2]);
    assert!(close(&forward_ms(&memory), &[1.0, 3.0]));
    assert_eq!(timing_drops(&manifest, ProfilerKind::ForwardPass), 1);
    let stats = backend.stats();
    assert_eq!((stats.resolved, stats.failed, stats.in_use), (2, 1, 0));
    assert_eq!(backend.last_error(), Some(ILLEGAL_ADDRESS));
}

#[test]
fn a_driver_error_reading_the_elapsed_time_drops_only_that_region() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(16));
    let (session, memory) = session(backend.clone(), 100);
    device.lock().elapsed_fails.insert(1, INVALID_HANDLE); // region 0's end event
    passes(&session, 2, 0);
    device.complete_region(0, 1.0);
    device.complete_region(1, 2.0);
    let manifest = session.shutdown().unwrap();
    assert_eq!(forward_tokens(&memory), vec![1]);
    assert_eq!(timing_drops(&manifest, ProfilerKind::ForwardPass), 1);
    assert_eq!(backend.stats().in_use, 0);
}

#[test]
fn a_failed_record_drops_and_counts_the_region() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(16));
    let (session, memory) = session(backend.clone(), 100);
    // Recording 2 is region 1's start (region 0 takes recordings 0 and 1).
    device.lock().record_fails.insert(2, ILLEGAL_ADDRESS);
    passes(&session, 3, 0);
    // Pass 1 never got a start; pass 2 takes recordings 3 and 4.
    device.complete_recordings([0, 1, 3, 4]);
    let manifest = session.shutdown().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 2]);
    assert_eq!(timing_drops(&manifest, ProfilerKind::ForwardPass), 1);
    assert_eq!(backend.stats().record_failures, 1);
    assert_eq!(backend.stats().in_use, 0, "the event of the failed record went back to the pool");
}

#[test]
fn shutdown_waits_for_events_still_in_flight() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(16));
    let (session, memory) = session(backend.clone(), 100);
    passes(&session, 3, 0);
    let gpu = device.clone();
    let finisher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        for k in 0..3 {
            gpu.complete_region(k, 5.0);
        }
    });
    let t = Instant::now();
    let manifest = session.shutdown().unwrap();
    assert!(t.elapsed() >= Duration::from_millis(250), "shutdown did not wait ({:?})", t.elapsed());
    finisher.join().unwrap();
    assert_eq!(forward_tokens(&memory), vec![0, 1, 2]);
    assert!(close(&forward_ms(&memory), &[5.0, 5.0, 5.0]));
    assert_eq!(timing_drops(&manifest, ProfilerKind::ForwardPass), 0);
    assert_eq!(backend.stats().in_use, 0);
}

#[test]
fn components_are_timed_with_device_events_too() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(16));
    let (session, memory) = session(backend, 100);
    let components = session.components();
    components.start(Component::Encoder, "vision_encoder").stop();
    passes(&session, 1, 0);
    device.complete_region(0, 7.0);
    device.complete_region(1, 3.0);
    session.shutdown().unwrap();
    let rows = memory.rows();
    assert_eq!(rows.encoder_decoder.len(), 1);
    assert!((rows.encoder_decoder[0].duration_ns as f64 / 1e6 - 7.0).abs() < 1e-3);
    assert!(close(&forward_ms(&memory), &[3.0]));
}

#[test]
fn a_cancelled_pass_gives_its_event_back() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(4));
    let (session, memory) = session(backend.clone(), 100);
    let forward = session.forward_pass();
    forward.start(Phase::Prefill, 1, 1).cancel();
    assert_eq!(backend.stats().in_use, 0);
    session.shutdown().unwrap();
    assert!(memory.rows().forward_pass.is_empty());
}

#[test]
fn the_backend_hands_out_marks_and_takes_them_back() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(2));
    let start = backend.start().unwrap();
    let end = backend.stop(start).unwrap();
    assert_ne!(start, end);
    assert_eq!(backend.start(), None, "two events, both in use");
    assert_eq!(backend.poll(start, end), profilemate_core::Resolution::Pending);
    device.complete_region(0, 1.5);
    assert_eq!(backend.poll(start, end), profilemate_core::Resolution::Ready(Duration::from_micros(1500)));
    backend.release(start, end);
    backend.release(start, end); // a second release changes nothing
    assert_eq!(backend.stats().in_use, 0);
    let again = backend.start().unwrap();
    assert!(again == start || again == end);
    assert_eq!(backend.stats().in_use, 1);
}

#[test]
fn marks_the_backend_did_not_hand_out_fail_instead_of_touching_an_event() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(4));
    let r = backend.poll(profilemate_core::Mark(0), profilemate_core::Mark(99));
    assert!(matches!(r, profilemate_core::Resolution::Failed(_)), "{r:?}");
    assert_eq!(device.lock().queries, 0);
    backend.release(profilemate_core::Mark(99), profilemate_core::Mark(u64::MAX));
}

#[test]
fn the_pool_is_created_up_front_and_destroyed_once() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(32));
    assert_eq!(device.lock().created, 32);
    passes_without_session(&backend, 10);
    assert_eq!(device.lock().created, 32, "no event is created after construction");
    drop(backend);
    let mut destroyed = device.lock().destroyed.clone();
    destroyed.sort_unstable();
    assert_eq!(destroyed, (1..=32).collect::<Vec<u32>>());
}

fn passes_without_session(backend: &CudaTimingBackend<MockApi>, n: usize) {
    for _ in 0..n {
        let s = backend.start().expect("an event for the start");
        let e = backend.stop(s).expect("an event for the stop");
        backend.release(s, e);
    }
}

#[test]
fn a_pool_that_cannot_be_created_is_an_error_and_leaks_nothing() {
    let device = Device::default();
    device.lock().create_limit = Some(3);
    let err = CudaTimingBackend::with_api(device.api(), CudaOptions::default().pool_size(8)).unwrap_err();
    assert!(matches!(err, CudaError::Driver { .. }), "{err}");
    assert!(err.to_string().contains("CUDA_ERROR_INVALID_HANDLE"), "{err}");
    assert_eq!(device.lock().destroyed.len(), 3);
}

#[test]
fn options_out_of_range_are_refused() {
    let device = Device::default();
    let err = CudaTimingBackend::with_api(device.api(), CudaOptions::default().pool_size(1)).unwrap_err();
    assert!(matches!(err, CudaError::InvalidOptions(_)), "{err}");
    let err = CudaTimingBackend::with_api(device.api(), CudaOptions::default().batch_size(0)).unwrap_err();
    assert!(matches!(err, CudaError::InvalidOptions(_)), "{err}");
}

#[test]
fn the_host_choice_ignores_the_cuda_backend() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(4));
    let mut config = Config::default();
    config.backend = BackendChoice::Host;
    let session = Session::builder().config(config).in_memory_only().timing_backend(backend).build().unwrap();
    passes(&session, 2, 0);
    assert_eq!(session.shutdown().unwrap().timing_backend, "host");
    assert_eq!(device.lock().recordings, 0);
}

#[test]
fn many_engine_threads_share_one_pool() {
    let device = Device::default();
    let backend = device.backend(CudaOptions::default().pool_size(4096));
    let (session, memory) = session(backend.clone(), 1000);
    let session = Arc::new(session);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let session = session.clone();
            std::thread::spawn(move || passes(&session, 200, t * 1000))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let recordings = device.lock().recordings;
    assert_eq!(recordings, 1600);
    device.complete_recordings(0..recordings);
    let session = Arc::try_unwrap(session).unwrap();
    let manifest = session.shutdown().unwrap();
    assert_eq!(memory.rows().forward_pass.len(), 800);
    assert_eq!(timing_drops(&manifest, ProfilerKind::ForwardPass), 0);
    assert_eq!(backend.stats().in_use, 0);
}
