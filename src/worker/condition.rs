//! A projection's condition: `running` (or `rebuilding`) while nothing is wrong, `failed` while
//! anything is, with each problem named in the log when it starts and when it ends. The worker,
//! its lanes and its consumer report problems here; the state metric, `/health/ready` and the
//! `ProjectorProjectionFailed` alert follow.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::checkpoint::TopicPartition;
use crate::metrics::Metrics;

/// Something that keeps a projection from doing its work.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// A lane's batch failed `retry.max_attempts` times in a row and is still being retried.
    Retries { lane: usize },
    /// Records of this partition are gone from the broker (`kafka.on_data_loss = "fail"`).
    DataLoss(TopicPartition),
    /// The consumer thread ended unexpectedly; a new one is being started.
    Consumer,
    /// The checkpoints were written by another definition of the projection.
    Definition,
}

/// The shared condition of one projection.
pub struct Condition {
    projection: String,
    metrics: Metrics,
    /// The state while no problem is present: `running` or `rebuilding`.
    healthy: &'static str,
    problems: Mutex<BTreeMap<Problem, String>>,
}

impl Condition {
    pub fn new(projection: &str, metrics: Metrics, rebuilding: bool) -> Condition {
        Condition {
            projection: projection.to_string(),
            metrics,
            healthy: if rebuilding { "rebuilding" } else { "running" },
            problems: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets the state metric from the problems present now.
    pub fn publish(&self) {
        let problems = self.problems.lock().expect("condition");
        self.metrics.set_state(&self.projection, if problems.is_empty() { self.healthy } else { "failed" });
    }

    /// Records `problem` (logged once, when it starts; `message` says what and why).
    pub fn set(&self, problem: Problem, message: String) {
        let mut problems = self.problems.lock().expect("condition");
        if !problems.contains_key(&problem) {
            tracing::error!(projection = %self.projection, problem = ?problem, "projection failed: {message}");
        }
        problems.insert(problem, message);
        self.metrics.set_state(&self.projection, "failed");
    }

    /// Ends `problem`, if present.
    pub fn clear(&self, problem: &Problem) {
        let mut problems = self.problems.lock().expect("condition");
        if problems.remove(problem).is_none() {
            return;
        }
        tracing::info!(projection = %self.projection, problem = ?problem, "problem resolved");
        if problems.is_empty() {
            self.metrics.set_state(&self.projection, self.healthy);
        }
    }

    /// Ends every problem `which` selects.
    pub fn clear_all(&self, which: impl Fn(&Problem) -> bool) {
        let present: Vec<Problem> =
            self.problems.lock().expect("condition").keys().filter(|p| which(p)).cloned().collect();
        for problem in present {
            self.clear(&problem);
        }
    }

    /// Whether `problem` is present.
    pub fn has(&self, problem: &Problem) -> bool {
        self.problems.lock().expect("condition").contains_key(problem)
    }

    /// The problems present, with their messages.
    pub fn problems(&self) -> Vec<(Problem, String)> {
        self.problems.lock().expect("condition").iter().map(|(p, m)| (p.clone(), m.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_while_any_problem_is_present() {
        let metrics = Metrics::new();
        let condition = Condition::new("p", metrics.clone(), false);
        condition.publish();
        assert_eq!(metrics.current_state("p"), Some("running"));
        condition.set(Problem::Retries { lane: 0 }, "boom".into());
        condition.set(Problem::Consumer, "gone".into());
        assert_eq!(metrics.current_state("p"), Some("failed"));
        condition.clear(&Problem::Retries { lane: 0 });
        assert_eq!(metrics.current_state("p"), Some("failed"), "the consumer problem is still there");
        condition.clear(&Problem::Consumer);
        assert_eq!(metrics.current_state("p"), Some("running"));
        let rebuilding = Condition::new("r", metrics.clone(), true);
        rebuilding.set(Problem::DataLoss(("t".into(), 0)), "lost".into());
        rebuilding.clear_all(|problem| matches!(problem, Problem::DataLoss(_)));
        assert_eq!(metrics.current_state("r"), Some("rebuilding"));
    }
}
