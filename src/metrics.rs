//! Every metric the engine exports, declared once, on the engine's own registry.
//!
//! The names and labels are a contract with users' dashboards and alerts (see the README's
//! "Metrics, health and status"). Labels stay bounded: projection, topic, partition number,
//! event type (a handled type, `other` or `invalid`), outcome, state and mode; never a key, an
//! offset or an error text. The registry is the engine's own, not the process-wide default, so
//! that several engines can run in one process (the tests do).
//!
//! Kept whole: one declaration per metric, registered in one list; splitting it would spread a
//! single contract over files.

use std::collections::HashMap;

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::outcome::{BatchReport, Outcome};

/// The engine's metrics. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `projector_events_total{projection,event_type,outcome}`.
    pub events: IntCounterVec,
    /// `projector_batch_duration_seconds{projection}`.
    pub batch_duration: HistogramVec,
    /// `projector_batch_events{projection}`.
    pub batch_events: HistogramVec,
    /// `projector_batches_total{projection,path}`: committed batches by how they were applied,
    /// `fast` (predicted and pipelined) or `careful` (event by event).
    pub batches: IntCounterVec,
    /// `projector_gap_timeouts_total{projection}`: held events parked because their predecessor
    /// did not arrive within `parking.gap_timeout_secs` (counted as `gap` when they arrived).
    pub gap_timeouts: IntCounterVec,
    /// `projector_batch_retries_total{projection}`: failed attempts at a batch that were retried
    /// (transient failures, and failures no one event can be blamed for).
    pub batch_retries: IntCounterVec,
    /// `projector_retry_backoff_seconds{projection}`: the wait before the next attempt of a
    /// failing batch; 0 once a batch commits.
    pub retry_backoff: GaugeVec,
    /// `projector_records_lost_total{projection,topic,partition}`: records the broker no longer
    /// holds that a projection had not read (retention passed its checkpoint).
    pub records_lost: IntCounterVec,
    /// `projector_consumer_restarts_total{projection}`: Kafka consumer threads that ended
    /// unexpectedly and were replaced.
    pub consumer_restarts: IntCounterVec,
    /// `projector_event_ids_pruned_total{projection}`: processed event ids deleted after
    /// `keep_event_ids`; a duplicate of one of them arriving later is applied again.
    pub event_ids_pruned: IntCounterVec,
    /// `projector_last_commit_timestamp_seconds{projection}`.
    pub last_commit: IntGaugeVec,
    /// `projector_checkpoint_offset{projection,topic,partition}`.
    pub checkpoint: IntGaugeVec,
    /// `projector_projection_state{projection,state}`.
    pub state: IntGaugeVec,
    /// `projector_log_end_offset{projection,topic,partition}`.
    pub log_end: IntGaugeVec,
    /// `projector_consumer_lag_messages{projection,topic,partition,mode}`.
    pub lag_messages: IntGaugeVec,
    /// `projector_consumer_lag_seconds{projection,topic,partition,mode}`.
    pub lag_seconds: GaugeVec,
    /// `projector_rebuild_progress_ratio{projection}`.
    pub rebuild_progress: GaugeVec,
    /// `projector_build_info{version}`.
    pub build_info: IntGaugeVec,
}

/// States a projection can be in, for `projector_projection_state`.
pub const STATES: [&str; 4] = ["running", "rebuilding", "paused", "failed"];

/// Values of the `mode` label of the lag series: live traffic, or a rebuild's replay.
pub const MODES: [&str; 2] = ["live", "rebuild"];

/// Event type labels every projection has besides its handled types (see `store::apply`).
const OTHER_EVENT_TYPES: [&str; 2] = ["other", "invalid"];

fn int_gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new("projector_events_total", "Events received, by projection, event type and outcome"),
            &["projection", "event_type", "outcome"],
        )
        .expect("valid metric");
        let batch_duration = HistogramVec::new(
            HistogramOpts::new("projector_batch_duration_seconds", "Time to apply and commit one batch")
                .buckets(exponential_buckets(0.001, 2.0, 15).expect("valid buckets")),
            &["projection"],
        )
        .expect("valid metric");
        let batch_events = HistogramVec::new(
            HistogramOpts::new("projector_batch_events", "Events in one committed batch")
                .buckets(exponential_buckets(1.0, 2.0, 14).expect("valid buckets")),
            &["projection"],
        )
        .expect("valid metric");
        let batches = IntCounterVec::new(
            Opts::new(
                "projector_batches_total",
                "Committed batches by how they were applied: fast (predicted, pipelined) or careful (event by event)",
            ),
            &["projection", "path"],
        )
        .expect("valid metric");
        let gap_timeouts = IntCounterVec::new(
            Opts::new(
                "projector_gap_timeouts_total",
                "Held events parked because their predecessor did not arrive within parking.gap_timeout_secs",
            ),
            &["projection"],
        )
        .expect("valid metric");
        let batch_retries = IntCounterVec::new(
            Opts::new(
                "projector_batch_retries_total",
                "Failed attempts at a batch that were retried (transient failures, or failures no one event can be blamed for)",
            ),
            &["projection"],
        )
        .expect("valid metric");
        let retry_backoff = GaugeVec::new(
            Opts::new(
                "projector_retry_backoff_seconds",
                "Wait before the next attempt of a failing batch; 0 once a batch commits",
            ),
            &["projection"],
        )
        .expect("valid metric");
        let records_lost = IntCounterVec::new(
            Opts::new(
                "projector_records_lost_total",
                "Records the broker no longer holds (retention) that the projection had not read",
            ),
            &PARTITION_LABELS,
        )
        .expect("valid metric");
        let consumer_restarts = IntCounterVec::new(
            Opts::new(
                "projector_consumer_restarts_total",
                "Kafka consumer threads that ended unexpectedly and were replaced",
            ),
            &["projection"],
        )
        .expect("valid metric");
        let event_ids_pruned = IntCounterVec::new(
            Opts::new("projector_event_ids_pruned_total", "Processed event ids deleted after `keep_event_ids`"),
            &["projection"],
        )
        .expect("valid metric");
        let last_commit = int_gauge(
            "projector_last_commit_timestamp_seconds",
            "Unix time of the projection's last committed batch",
            &["projection"],
        );
        let checkpoint =
            int_gauge("projector_checkpoint_offset", "Next offset the projection will read", &PARTITION_LABELS);
        let state =
            int_gauge("projector_projection_state", "1 for the state each projection is in", &["projection", "state"]);
        let log_end = int_gauge(
            "projector_log_end_offset",
            "End offset of the partition (its last stable offset: the engine reads committed records only)",
            &PARTITION_LABELS,
        );
        let lag_messages = int_gauge(
            "projector_consumer_lag_messages",
            "Records from the oldest one not yet applied to the end of the partition; 0 when caught up",
            &LAG_LABELS,
        );
        let lag_seconds = GaugeVec::new(
            Opts::new(
                "projector_consumer_lag_seconds",
                "Age of the oldest record not yet applied (from its Kafka timestamp); 0 when caught up",
            ),
            &LAG_LABELS,
        )
        .expect("valid metric");
        let rebuild_progress = GaugeVec::new(
            Opts::new("projector_rebuild_progress_ratio", "Share of the rebuild's records applied, from 0 to 1"),
            &["projection"],
        )
        .expect("valid metric");
        let build_info = int_gauge("projector_build_info", "Always 1; the version of this projector", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        let mut collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(events.clone()),
            Box::new(batch_duration.clone()),
            Box::new(batch_events.clone()),
            Box::new(batches.clone()),
            Box::new(gap_timeouts.clone()),
            Box::new(batch_retries.clone()),
            Box::new(retry_backoff.clone()),
            Box::new(records_lost.clone()),
            Box::new(consumer_restarts.clone()),
            Box::new(event_ids_pruned.clone()),
            Box::new(last_commit.clone()),
            Box::new(checkpoint.clone()),
            Box::new(state.clone()),
            Box::new(log_end.clone()),
            Box::new(lag_messages.clone()),
            Box::new(lag_seconds.clone()),
            Box::new(rebuild_progress.clone()),
            Box::new(build_info.clone()),
        ];
        // CPU, memory, open files, start time: `process_*`.
        #[cfg(target_os = "linux")]
        collectors.push(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        for collector in collectors {
            registry.register(collector).expect("metric registered once");
        }
        Metrics {
            registry,
            events,
            batch_duration,
            batch_events,
            batches,
            gap_timeouts,
            batch_retries,
            retry_backoff,
            records_lost,
            consumer_restarts,
            event_ids_pruned,
            last_commit,
            checkpoint,
            state,
            log_end,
            lag_messages,
            lag_seconds,
            rebuild_progress,
            build_info,
        }
    }

    /// Creates `projector_events_total` at 0 for every event type label of a projection and
    /// every outcome, so that `increase()` sees the first event of each (alerts on gaps and
    /// parked events would miss it otherwise).
    pub fn register_projection<'a>(&self, projection: &str, event_types: impl IntoIterator<Item = &'a str>) {
        for event_type in event_types.into_iter().chain(OTHER_EVENT_TYPES) {
            for outcome in Outcome::ALL {
                self.events.with_label_values(&[projection, event_type, outcome.as_str()]);
            }
        }
        self.gap_timeouts.with_label_values(&[projection]);
        self.batch_retries.with_label_values(&[projection]);
        self.retry_backoff.with_label_values(&[projection]);
        self.consumer_restarts.with_label_values(&[projection]);
    }

    /// A failed attempt at a batch, to be retried after `wait`.
    pub fn record_retry(&self, projection: &str, wait: std::time::Duration) {
        self.batch_retries.with_label_values(&[projection]).inc();
        self.set_retry_backoff(projection, wait);
    }

    /// `projector_retry_backoff_seconds`: `wait`, or 0 after a commit.
    pub fn set_retry_backoff(&self, projection: &str, wait: std::time::Duration) {
        self.retry_backoff.with_label_values(&[projection]).set(wait.as_secs_f64());
    }

    /// A consumer thread that ended unasked, replaced.
    pub fn record_consumer_restart(&self, projection: &str) {
        self.consumer_restarts.with_label_values(&[projection]).inc();
    }

    /// Processed event ids deleted after `keep_event_ids`.
    pub fn record_event_ids_pruned(&self, projection: &str, pruned: u64) {
        self.event_ids_pruned.with_label_values(&[projection]).inc_by(pruned);
    }

    /// Held events parked for waiting past `parking.gap_timeout_secs`.
    pub fn record_gap_timeouts(&self, projection: &str, parked: u64) {
        self.gap_timeouts.with_label_values(&[projection]).inc_by(parked);
    }

    /// `projector_checkpoint_offset`: the next offset a partition's projection reads (0: never
    /// checkpointed).
    pub fn set_checkpoint(
        &self,
        projection: &str,
        (topic, partition): &crate::checkpoint::TopicPartition,
        offset: i64,
    ) {
        self.checkpoint.with_label_values(&[projection, topic, &partition.to_string()]).set(offset);
    }

    /// Records of a partition found gone before the projection read them.
    pub fn record_lost(&self, projection: &str, topic: &str, partition: i32, records: u64) {
        self.records_lost.with_label_values(&[projection, topic, &partition.to_string()]).inc_by(records);
    }

    /// Records a committed batch.
    pub fn record_batch(&self, projection: &str, report: &BatchReport, events: usize, seconds: f64) {
        self.record_outcomes(projection, report);
        self.batch_duration.with_label_values(&[projection]).observe(seconds);
        self.batch_events.with_label_values(&[projection]).observe(events as f64);
        self.batches.with_label_values(&[projection, if report.fast { "fast" } else { "careful" }]).inc();
        self.last_commit.with_label_values(&[projection]).set(chrono::Utc::now().timestamp());
    }

    /// Counts a report's outcomes (a batch's, or a sweep's that released held events).
    pub fn record_outcomes(&self, projection: &str, report: &BatchReport) {
        for ((event_type, outcome), count) in &report.outcomes {
            self.events.with_label_values(&[projection, event_type, outcome.as_str()]).inc_by(*count);
        }
    }

    pub fn set_state(&self, projection: &str, state: &str) {
        debug_assert!(STATES.contains(&state), "unknown state `{state}`");
        for candidate in STATES {
            self.state.with_label_values(&[projection, candidate]).set(i64::from(candidate == state));
        }
    }

    /// The state a projection was last set to, if any.
    pub fn current_state(&self, projection: &str) -> Option<&'static str> {
        STATES.into_iter().find(|state| {
            self.state.get_metric_with_label_values(&[projection, state]).is_ok_and(|gauge| gauge.get() == 1)
        })
    }

    /// Raises `projector_last_commit_timestamp_seconds` to `unix_seconds` (never lowers it):
    /// the lag sampler reports commits stored in Postgres, also those made before a restart.
    pub fn observe_commit_time(&self, projection: &str, unix_seconds: i64) {
        let gauge = self.last_commit.with_label_values(&[projection]);
        if unix_seconds > gauge.get() {
            gauge.set(unix_seconds);
        }
    }

    /// One partition's lag sample. Removes the partition's series of the other mode, so that a
    /// projection leaving a rebuild does not keep reporting its last rebuild lag.
    pub fn record_lag(&self, sample: &LagSample<'_>) {
        let partition = sample.partition.to_string();
        let labels = [sample.projection, sample.topic, partition.as_str()];
        self.log_end.with_label_values(&labels).set(sample.end_offset);
        if let Some(checkpoint) = sample.checkpoint {
            self.checkpoint.with_label_values(&labels).set(checkpoint);
        }
        let with_mode = [sample.projection, sample.topic, partition.as_str(), sample.mode];
        self.lag_messages.with_label_values(&with_mode).set(sample.lag_messages);
        if let Some(seconds) = sample.lag_seconds {
            self.lag_seconds.with_label_values(&with_mode).set(seconds);
        }
        for other in MODES.into_iter().filter(|mode| *mode != sample.mode) {
            let stale = [sample.projection, sample.topic, partition.as_str(), other];
            let _ = self.lag_messages.remove_label_values(&stale);
            let _ = self.lag_seconds.remove_label_values(&stale);
        }
    }

    /// Drops the gauges of a projection that no longer runs (a reload removed it): its state,
    /// checkpoints, end offsets, lag, last commit and backoff would otherwise keep their last
    /// values (and alerts on them firing). Its counters stay: they only ever count what happened.
    pub fn forget_projection(&self, projection: &str) {
        forget_series(&self.state, &["projection", "state"], projection);
        forget_series(&self.checkpoint, &["projection", "topic", "partition"], projection);
        forget_series(&self.log_end, &["projection", "topic", "partition"], projection);
        forget_series(&self.lag_messages, &["projection", "topic", "partition", "mode"], projection);
        forget_series(&self.lag_seconds, &["projection", "topic", "partition", "mode"], projection);
        forget_series(&self.last_commit, &["projection"], projection);
        forget_series(&self.retry_backoff, &["projection"], projection);
        forget_series(&self.rebuild_progress, &["projection"], projection);
    }

    /// Sets `projector_rebuild_progress_ratio` (0 to 1).
    pub fn set_rebuild_progress(&self, projection: &str, ratio: f64) {
        self.rebuild_progress.with_label_values(&[projection]).set(ratio.clamp(0.0, 1.0));
    }

    /// The whole registry in the Prometheus text format, as served on `/metrics`.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("encoding to memory");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }

    /// Each outcome's count for one projection, as the log and the demo show them: `applied 30,
    /// duplicate 11, gap 1, ignored 0, parked 0`.
    pub fn outcome_summary(&self, projection: &str) -> String {
        let counts: Vec<String> = Outcome::ALL
            .iter()
            .map(|outcome| format!("{} {}", outcome.as_str(), self.outcome_count(projection, *outcome)))
            .collect();
        counts.join(", ")
    }

    /// Sum of `projector_events_total` for one projection and outcome, over event types.
    pub fn outcome_count(&self, projection: &str, outcome: Outcome) -> u64 {
        self.registry
            .gather()
            .iter()
            .filter(|family| family.name() == "projector_events_total")
            .flat_map(|family| family.get_metric().iter())
            .filter(|metric| {
                let labels = metric.get_label();
                labels.iter().any(|l| l.name() == "projection" && l.value() == projection)
                    && labels.iter().any(|l| l.name() == "outcome" && l.value() == outcome.as_str())
            })
            .map(|metric| metric.get_counter().value() as u64)
            .sum()
    }
}

const PARTITION_LABELS: [&str; 3] = ["projection", "topic", "partition"];
const LAG_LABELS: [&str; 4] = ["projection", "topic", "partition", "mode"];

/// What the lag sampler measured for one partition of one projection.
#[derive(Debug, Clone, PartialEq)]
pub struct LagSample<'a> {
    pub projection: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    /// `live` or `rebuild`.
    pub mode: &'a str,
    pub end_offset: i64,
    /// The stored checkpoint, if the projection has one for this partition.
    pub checkpoint: Option<i64>,
    pub lag_messages: i64,
    /// `None`: unknown this time (the oldest pending record could not be read); left as it was.
    pub lag_seconds: Option<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Removes every series of `vec` (labels `names`, in their declared order) whose `projection`
/// label is `projection`.
fn forget_series<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    names: &[&str],
    projection: &str,
) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> =
                metric.get_label().iter().map(|pair| (pair.name(), pair.value())).collect();
            if labels.get("projection") == Some(&projection) {
                let values: Vec<&str> =
                    names.iter().map(|name| labels.get(name).copied().unwrap_or_default()).collect();
                let _ = vec.remove_label_values(&values);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(mode: &'a str, lag: i64) -> LagSample<'a> {
        LagSample {
            projection: "p",
            topic: "t",
            partition: 0,
            mode,
            end_offset: 10,
            checkpoint: Some(10 - lag),
            lag_messages: lag,
            lag_seconds: Some(lag as f64),
        }
    }

    #[test]
    fn a_lag_sample_replaces_the_other_mode() {
        let metrics = Metrics::new();
        metrics.record_lag(&sample("rebuild", 4));
        assert_eq!(metrics.lag_messages.with_label_values(&["p", "t", "0", "rebuild"]).get(), 4);
        metrics.record_lag(&sample("live", 1));
        let text = metrics.encode();
        assert!(!text.contains("mode=\"rebuild\""), "{text}");
        assert!(
            text.contains(
                "projector_consumer_lag_messages{mode=\"live\",partition=\"0\",projection=\"p\",topic=\"t\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("projector_checkpoint_offset{partition=\"0\",projection=\"p\",topic=\"t\"} 9"), "{text}");
    }

    #[test]
    fn state_is_one_hot() {
        let metrics = Metrics::new();
        assert_eq!(metrics.current_state("p"), None);
        metrics.set_state("p", "running");
        metrics.set_state("p", "failed");
        assert_eq!(metrics.current_state("p"), Some("failed"));
        let ones = STATES.iter().filter(|state| metrics.state.with_label_values(&["p", state]).get() == 1).count();
        assert_eq!(ones, 1);
    }

    #[test]
    fn last_commit_only_moves_forward() {
        let metrics = Metrics::new();
        metrics.observe_commit_time("p", 200);
        metrics.observe_commit_time("p", 100);
        assert_eq!(metrics.last_commit.with_label_values(&["p"]).get(), 200);
    }

    #[test]
    fn build_info_and_process_metrics_are_exported() {
        let text = Metrics::new().encode();
        assert!(text.contains(&format!("projector_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
        #[cfg(target_os = "linux")]
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
