use super::Profiler;
use crate::event::Event;
use crate::rows::{ns_to_sec, Outcome, PreemptionEventRow, RequestLifecycleRow, Rows};
use crate::stats::Mean;
use crate::summary::{PreemptionSummary, Summaries};
use crate::types::{LifecycleEvent, ProfilerKind};
use std::collections::{BTreeMap, HashMap};

/// Preemptions and the lifecycle of every request.
///
/// Events are taken in the order recorded. A request id that is seen again after it finished
/// starts a new request. Events for an id whose start was not recorded create the request with
/// an empty `started_sec`. A `resumed` without a pending preemption is kept as an event row but
/// changes nothing. A preemption without a reason is counted under `unspecified` in the summary.
#[derive(Debug, Default, Clone)]
pub struct PreemptionProfiler {
    live: HashMap<String, RequestState>,
    total_requests: u64,
    requests_preempted: u64,
    total_preemptions: u64,
    finished: u64,
    evicted: u64,
    reasons: BTreeMap<String, u64>,
    running_before_preempt_ns: Mean,
    resume_delay_ns: Mean,
    max_resume_delay_ns: u64,
}

#[derive(Debug, Default, Clone)]
struct RequestState {
    started: Option<u64>,
    first_preempted: Option<u64>,
    last_resumed: Option<u64>,
    running_since: Option<u64>,
    preempted_at: Option<u64>,
    delay_ns: u64,
    preemptions: u32,
}

impl RequestState {
    fn row(&self, request_id: String, end: Option<u64>, outcome: Outcome) -> RequestLifecycleRow {
        let preempted = self.preemptions > 0;
        RequestLifecycleRow {
            request_id,
            started_ns: self.started,
            preempted_ns: self.first_preempted,
            resumed_ns: self.last_resumed,
            finished_ns: end,
            total_time_ns: match (self.started, end) {
                (Some(s), Some(e)) => Some(e.saturating_sub(s)),
                _ => None,
            },
            preemption_delay_ns: preempted.then_some(self.delay_ns),
            num_preemptions: self.preemptions,
            outcome,
        }
    }
}

impl PreemptionProfiler {
    /// An empty profiler.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&mut self, id: &str, t: u64, event: LifecycleEvent) -> &mut RequestState {
        if !self.live.contains_key(id) {
            self.total_requests += 1;
            let started = (event == LifecycleEvent::Started).then_some(t);
            self.live
                .insert(id.to_string(), RequestState { started, running_since: started, ..RequestState::default() });
        }
        // Just inserted or already present.
        self.live.get_mut(id).expect("request state present")
    }
}

impl Profiler for PreemptionProfiler {
    fn kind(&self) -> ProfilerKind {
        ProfilerKind::Preemption
    }

    fn observe(&mut self, event: &Event<'_>, rows: &mut Rows) {
        let Event::Lifecycle { timestamp_ns: t, request_id, event, reason, extra_info } = *event else {
            return;
        };
        let mut running_time_ns = None;
        match event {
            LifecycleEvent::Started => {
                let st = self.state(request_id, t, event);
                if st.started.is_none() {
                    st.started = Some(t);
                    st.running_since = Some(t);
                }
            }
            LifecycleEvent::Preempted => {
                let st = self.state(request_id, t, event);
                running_time_ns = st.running_since.map(|since| t.saturating_sub(since));
                let first = st.preemptions == 0;
                st.preemptions += 1;
                st.first_preempted.get_or_insert(t);
                // Preempted again without a resume in between: the delay still runs from the
                // first preemption.
                st.preempted_at.get_or_insert(t);
                st.running_since = None;
                if first {
                    self.requests_preempted += 1;
                }
                self.total_preemptions += 1;
                let key = if reason.is_empty() { "unspecified" } else { reason };
                *self.reasons.entry(key.to_string()).or_insert(0) += 1;
                if let Some(r) = running_time_ns {
                    self.running_before_preempt_ns.add(r as f64);
                }
            }
            LifecycleEvent::Resumed => {
                let st = self.state(request_id, t, event);
                if let Some(p) = st.preempted_at.take() {
                    let d = t.saturating_sub(p);
                    st.delay_ns += d;
                    st.last_resumed = Some(t);
                    st.running_since = Some(t);
                    self.resume_delay_ns.add(d as f64);
                    self.max_resume_delay_ns = self.max_resume_delay_ns.max(d);
                }
            }
            LifecycleEvent::Finished | LifecycleEvent::Evicted => {
                self.state(request_id, t, event);
                if let Some((id, st)) = self.live.remove_entry(request_id) {
                    let outcome = if event == LifecycleEvent::Finished {
                        self.finished += 1;
                        Outcome::Finished
                    } else {
                        self.evicted += 1;
                        Outcome::Evicted
                    };
                    rows.request_lifecycle.push(st.row(id, Some(t), outcome));
                }
            }
        }
        let reason = match event {
            LifecycleEvent::Preempted | LifecycleEvent::Evicted => reason.to_string(),
            _ => String::new(),
        };
        rows.preemption_events.push(PreemptionEventRow {
            step: None,
            timestamp_ns: t,
            request_id: request_id.to_string(),
            event,
            reason,
            running_time_ns,
            extra_info: extra_info.to_string(),
        });
    }

    fn finish(&mut self, _now_ns: u64, rows: &mut Rows) {
        let mut live: Vec<_> = self.live.drain().collect();
        live.sort_by_key(|(_, st)| st.started);
        for (id, st) in live {
            rows.request_lifecycle.push(st.row(id, None, Outcome::InFlight));
        }
    }

    fn summarize(&self, out: &mut Summaries) {
        let rate = if self.total_requests == 0 {
            0.0
        } else {
            self.total_preemptions as f64 / self.total_requests as f64 * 100.0
        };
        out.preemption = Some(PreemptionSummary {
            total_preemptions: self.total_preemptions,
            total_requests: self.total_requests,
            requests_preempted: self.requests_preempted,
            preemption_rate_pct: rate,
            preemption_reasons: self.reasons.clone(),
            mean_running_time_before_preempt: self.running_before_preempt_ns.value() / 1e9,
            mean_resume_delay: self.resume_delay_ns.value() / 1e9,
            max_resume_delay: ns_to_sec(self.max_resume_delay_ns),
            requests_finished: self.finished,
            requests_evicted: self.evicted,
            requests_in_flight: self.live.len() as u64,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(p: &mut PreemptionProfiler, rows: &mut Rows, t_sec: u64, event: LifecycleEvent) {
        let reason = if event == LifecycleEvent::Preempted { "RECOMPUTE" } else { "" };
        p.observe(
            &Event::Lifecycle { timestamp_ns: t_sec * 1_000_000_000, request_id: "r1", event, reason, extra_info: "" },
            rows,
        );
    }

    /// Preempted at 2 s, preempted again at 5 s without a resume, resumed at 9 s: the request
    /// waited 7 s, from its first preemption.
    #[test]
    fn a_second_preemption_before_a_resume_keeps_the_first_ones_time() {
        let (mut p, mut rows) = (PreemptionProfiler::new(), Rows::default());
        ev(&mut p, &mut rows, 1, LifecycleEvent::Started);
        ev(&mut p, &mut rows, 2, LifecycleEvent::Preempted);
        ev(&mut p, &mut rows, 5, LifecycleEvent::Preempted);
        ev(&mut p, &mut rows, 9, LifecycleEvent::Resumed);
        ev(&mut p, &mut rows, 10, LifecycleEvent::Finished);
        let r = &rows.request_lifecycle[0];
        assert_eq!(r.num_preemptions, 2);
        assert_eq!(r.preemption_delay_ns, Some(7_000_000_000));
        let mut s = Summaries::default();
        p.summarize(&mut s);
        let s = s.preemption.unwrap();
        assert_eq!((s.mean_resume_delay, s.max_resume_delay), (7.0, 7.0));
    }
}
