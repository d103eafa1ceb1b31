//! Every metric the engine exports, declared once, on the engine's own registry.

use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::store::apply::{BatchReport, Outcome};

/// The engine's metrics. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub events: IntCounterVec,
    pub batch_duration: HistogramVec,
    pub batch_events: HistogramVec,
    pub last_commit: IntGaugeVec,
    pub checkpoint: IntGaugeVec,
    pub state: IntGaugeVec,
}

/// States a projection can be in, for `projector_projection_state`.
pub const STATES: [&str; 4] = ["running", "rebuilding", "paused", "failed"];

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
        let last_commit = IntGaugeVec::new(
            Opts::new("projector_last_commit_timestamp_seconds", "Unix time of the projection's last committed batch"),
            &["projection"],
        )
        .expect("valid metric");
        let checkpoint = IntGaugeVec::new(
            Opts::new("projector_checkpoint_offset", "Next offset the projection will read"),
            &["projection", "topic", "partition"],
        )
        .expect("valid metric");
        let state = IntGaugeVec::new(
            Opts::new("projector_projection_state", "1 for the state each projection is in"),
            &["projection", "state"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(batch_duration.clone()),
            Box::new(batch_events.clone()),
            Box::new(last_commit.clone()),
            Box::new(checkpoint.clone()),
            Box::new(state.clone()),
        ] {
            registry.register(collector).expect("metric registered once");
        }
        Metrics { registry, events, batch_duration, batch_events, last_commit, checkpoint, state }
    }

    /// Records a committed batch.
    pub fn record_batch(&self, projection: &str, report: &BatchReport, events: usize, seconds: f64) {
        for ((event_type, outcome), count) in &report.outcomes {
            self.events.with_label_values(&[projection, event_type, outcome.as_str()]).inc_by(*count);
        }
        self.batch_duration.with_label_values(&[projection]).observe(seconds);
        self.batch_events.with_label_values(&[projection]).observe(events as f64);
        self.last_commit.with_label_values(&[projection]).set(chrono::Utc::now().timestamp());
    }

    pub fn set_state(&self, projection: &str, state: &str) {
        for candidate in STATES {
            self.state.with_label_values(&[projection, candidate]).set(i64::from(candidate == state));
        }
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

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
