//! Without a usable GPU (this machine has no libcuda): `auto` falls back to the host clock with
//! one warning, a demanded `cuda` is an error saying why, and nothing panics. On a machine with a
//! GPU the same tests check the other side of each answer.

use profilemate_core::{BackendChoice, Config, Error, Phase, Session};
use profilemate_cuda::{backend_factory, fallback_warning, probe, CudaError, CudaOptions, CudaTimingBackend};
use std::process::Command;

fn config(backend: BackendChoice) -> Config {
    let mut c = Config::default();
    c.backend = backend;
    c
}

/// Why CUDA cannot be used here, or `None` on a machine where it can.
fn unavailable() -> Option<String> {
    probe().err().map(|e| e.to_string())
}

#[test]
fn the_probe_says_why_without_panicking() {
    match probe() {
        Ok(()) => {}
        Err(CudaError::Unavailable { reason }) => {
            assert!(!reason.is_empty());
            if !std::path::Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1").exists() && cfg!(target_os = "linux") {
                // The usual situation on a machine without the NVIDIA driver.
                assert!(reason.contains("libcuda.so.1"), "{reason}");
            }
        }
        Err(other) => panic!("unexpected error kind: {other}"),
    }
    // Asking twice gives the same answer (computed once).
    assert_eq!(probe().is_ok(), probe().is_ok());
}

#[test]
fn auto_falls_back_to_the_host_clock() {
    let backend = backend_factory(&config(BackendChoice::Auto)).expect("auto never fails");
    match unavailable() {
        Some(_) => assert!(backend.is_none()),
        None => assert_eq!(backend.map(|b| b.name().to_string()).as_deref(), Some("cuda")),
    }
}

#[test]
fn host_never_touches_cuda() {
    assert!(backend_factory(&config(BackendChoice::Host)).unwrap().is_none());
}

#[test]
fn demanded_cuda_is_an_error_that_says_why() {
    let Some(why) = unavailable() else { return };
    let Err(err) = backend_factory(&config(BackendChoice::Cuda)) else { panic!("CUDA was demanded and is missing") };
    assert!(matches!(&err, Error::BackendUnavailable { backend, .. } if backend == "cuda"), "{err}");
    let message = err.to_string();
    assert!(message.contains(&why), "{message}");
    assert!(message.contains("PROFILEMATE_BACKEND=host"), "{message}");
}

#[test]
fn a_session_with_the_factory_and_no_backend_setting_times_with_the_host_clock() {
    let session = Session::builder()
        .config(config(BackendChoice::Auto))
        .in_memory_only()
        .backend_factory(backend_factory)
        .build()
        .expect("auto never fails");
    session.forward_pass().start(Phase::Decode, 1, 1).stop();
    let manifest = session.shutdown().unwrap();
    let expected = if unavailable().is_some() { "host" } else { "cuda" };
    assert_eq!(manifest.timing_backend, expected);
    assert_eq!(manifest.steps, 1);
}

#[test]
fn a_session_demanding_cuda_fails_to_build() {
    let Some(why) = unavailable() else { return };
    let err = Session::builder()
        .config(config(BackendChoice::Cuda))
        .in_memory_only()
        .backend_factory(backend_factory)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains(&why), "{err}");
}

#[test]
fn the_stream_constructors_refuse_cleanly() {
    if unavailable().is_none() {
        return;
    }
    let err = CudaTimingBackend::on_default_stream(0, CudaOptions::default()).unwrap_err();
    assert!(matches!(err, CudaError::Unavailable { .. }), "{err}");
    // SAFETY: with no driver the stream is never used: the probe fails first.
    let err = unsafe { CudaTimingBackend::on_raw_stream(std::ptr::null_mut(), CudaOptions::default()) }.unwrap_err();
    assert!(matches!(err, CudaError::Unavailable { .. }), "{err}");
}

#[test]
fn the_warning_reads_as_documented() {
    assert_eq!(
        fallback_warning("libcuda.so.1 not found"),
        "profilemate: CUDA timing unavailable (libcuda.so.1 not found): timing forward passes with the host clock"
    );
}

const CHILD: &str = "PROFILEMATE_CUDA_TEST_CHILD";

/// Run by [`the_fallback_warning_is_printed_once_per_process`] in a child process.
#[test]
fn child_builds_three_auto_sessions() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    for _ in 0..3 {
        let session = Session::builder().in_memory_only().backend_factory(backend_factory).build().unwrap();
        session.shutdown().unwrap();
    }
}

#[test]
fn the_fallback_warning_is_printed_once_per_process() {
    let Some(why) = unavailable() else { return };
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_builds_three_auto_sessions", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warning = fallback_warning(&why);
    assert_eq!(stderr.matches(&warning).count(), 1, "stderr was:\n{stderr}");
    assert!(!stderr.contains("panicked"), "stderr was:\n{stderr}");
}
