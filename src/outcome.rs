//! PURE: what happened to each event ([`Outcome`]), and what a committed batch did
//! ([`BatchReport`]): the counts the metrics record and `projector test` checks.

use std::collections::BTreeMap;

use crate::projection::{Decoded, Projection};

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Its statements changed the read model.
    Applied,
    /// Already reflected (row at or past its version, or its id already processed): nothing changed.
    Duplicate,
    /// Its predecessor has not been applied yet: held in `projector.held_events`.
    Gap,
    /// The projection does not handle its type (or it is a tombstone).
    Ignored,
    /// It cannot be applied (malformed, a value that does not fit, a constraint it violates):
    /// parked in `projector.dead_letters`.
    Parked,
}

impl Outcome {
    pub const ALL: [Outcome; 5] =
        [Outcome::Applied, Outcome::Duplicate, Outcome::Gap, Outcome::Ignored, Outcome::Parked];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Gap => "gap",
            Outcome::Ignored => "ignored",
            Outcome::Parked => "parked",
        }
    }
}

/// What a committed batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    /// (event type label, outcome) to count. Labels are handled types, `other` or `invalid`.
    pub outcomes: BTreeMap<(String, Outcome), u64>,
    /// Held events applied because their predecessor arrived (also counted as `applied`).
    pub released: u64,
    /// Applied by the fast path (`store::fast`).
    pub fast: bool,
}

impl BatchReport {
    /// Counts one event of `label` with `outcome`.
    pub fn count(&mut self, label: &str, outcome: Outcome) {
        // Once per event: the label is copied only the first time a batch counts it.
        let counted = self.outcomes.iter_mut().find(|((known, of), _)| *of == outcome && known == label);
        match counted {
            Some((_, count)) => *count += 1,
            None => {
                self.outcomes.insert((label.to_string(), outcome), 1);
            }
        }
    }

    /// Events with `outcome`, whatever their label.
    pub fn total(&self, outcome: Outcome) -> u64 {
        self.outcomes.iter().filter(|((_, o), _)| *o == outcome).map(|(_, n)| n).sum()
    }
}

/// The outcome label of a decoded record: its type when the projection handles it, else `other`
/// (or `invalid` when it cannot be decoded). Bounded by the definition, whatever the events say.
pub fn label(projection: &Projection, decoded: &Decoded<'_>) -> String {
    match decoded {
        Decoded::Handled { event, .. } => event.event_type.to_string(),
        Decoded::Poison { event_type: Some(event_type), .. }
            if projection.handlers.contains_key(event_type.as_str()) =>
        {
            event_type.clone()
        }
        Decoded::Poison { .. } => "invalid".into(),
        Decoded::Ignored { .. } | Decoded::Tombstone => "other".into(),
    }
}

/// The event type a decoded record says it is, when it could be read (whether handled or not).
pub fn event_type<'d>(decoded: &'d Decoded<'_>) -> Option<&'d str> {
    match decoded {
        Decoded::Handled { event, .. } => Some(&event.event_type),
        Decoded::Poison { event_type, .. } => event_type.as_deref(),
        Decoded::Ignored { event_type } => Some(event_type),
        Decoded::Tombstone => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_label_and_outcome() {
        let mut report = BatchReport::default();
        report.count("OrderPlaced", Outcome::Applied);
        report.count("OrderPlaced", Outcome::Applied);
        report.count("OrderPlaced", Outcome::Duplicate);
        report.count("other", Outcome::Ignored);
        report.count("OrderPaid", Outcome::Applied);
        assert_eq!(report.outcomes[&("OrderPlaced".to_string(), Outcome::Applied)], 2);
        assert_eq!(report.outcomes[&("OrderPlaced".to_string(), Outcome::Duplicate)], 1);
        assert_eq!(report.total(Outcome::Applied), 3);
        assert_eq!(report.total(Outcome::Gap), 0);
        assert_eq!(report.outcomes.len(), 4);
    }

    #[test]
    fn every_outcome_has_its_own_label() {
        let labels: std::collections::BTreeSet<&str> = Outcome::ALL.iter().map(|outcome| outcome.as_str()).collect();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
