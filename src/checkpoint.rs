//! PURE: partitions, checkpoints and the rules that move them.
//!
//! A checkpoint is the next Kafka offset to read of one partition, stored per projection in
//! Postgres (`store::checkpoint`) and moved only by compare-and-set, in the transaction that
//! applies the records below it. This module holds the rules, free of any I/O: which records a
//! worker still applies ([`PartitionState::accepts`]), where a batch moves each checkpoint
//! ([`moves_of`], [`Move`]), where a consumer that stands past its last record moves it
//! ([`PartitionState::advance_to`]), and how far a rebuild has come ([`progress`]).

use std::collections::HashMap;

use crate::projection::Record;

/// A partition of a topic.
pub type TopicPartition = (String, i32);

/// An offset per partition: stored checkpoints, targets, ends.
pub type Offsets = HashMap<TopicPartition, i64>;

/// Whether the record at (`topic`, `partition`) is of `known`, compared without copying the topic.
pub fn is_of(topic: &str, partition: i32, known: &TopicPartition) -> bool {
    known.1 == partition && known.0 == topic
}

/// One checkpoint's compare-and-set: from the stored value a batch started at to the next offset
/// after it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Move {
    pub partition: TopicPartition,
    /// The stored checkpoint expected (`None`: never checkpointed).
    pub from: Option<i64>,
    /// The next offset to read once the batch commits.
    pub to: i64,
}

impl Move {
    /// A compare-and-set to the value it expects: it moves nothing and holds the partition in a
    /// transaction only while its checkpoint is still `at` (a sweep of held events, a fence check).
    pub fn stay(partition: TopicPartition, at: i64) -> Move {
        Move { partition, from: Some(at), to: at }
    }

    /// Whether the move is a compare-and-set a checkpoint may take: never backwards.
    pub fn is_forward(&self) -> bool {
        self.from.is_none_or(|from| from <= self.to)
    }
}

/// Where each partition of `records` moves: from its expected checkpoint (`expected`) to past
/// its last record. One move per partition, sorted by partition.
pub fn moves_of(records: &[Record], expected: impl Fn(&TopicPartition) -> Option<i64>) -> Vec<Move> {
    // A lane holds a few partitions: found by a scan, the topic copied once per partition.
    let mut moves: Vec<Move> = Vec::new();
    for record in records {
        match moves.iter_mut().find(|known| is_of(&record.topic, record.partition, &known.partition)) {
            Some(known) => known.to = known.to.max(record.offset + 1),
            None => {
                let partition = (record.topic.to_string(), record.partition);
                let from = expected(&partition);
                moves.push(Move { partition, from, to: record.offset + 1 });
            }
        }
    }
    moves.sort();
    moves
}

/// Adds a partition's advance (the consumer's position past records it will not deliver:
/// transaction markers, aborted records) to a batch's `moves`: a partition already moving moves
/// at least that far; another one moves from `from` when `to` is past it.
pub fn add_advance(moves: &mut Vec<Move>, partition: TopicPartition, from: Option<i64>, to: i64) {
    match moves.iter_mut().find(|known| known.partition == partition) {
        Some(known) => known.to = known.to.max(to),
        None => {
            if from.is_none_or(|from| to > from) {
                moves.push(Move { partition, from, to });
            }
        }
    }
}

/// Why a partition is held for records the broker no longer holds: its checkpoint when the loss
/// was found, and where the broker's log started then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    pub checkpoint: i64,
    pub low: i64,
}

/// Where a partition stands, as the worker that owns it knows it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// The stored checkpoint (`None`: never checkpointed): the compare-and-set's expected value.
    pub checkpoint: Option<i64>,
    /// Where the consumer stands past the last record it delivered (transaction markers,
    /// aborted records): the checkpoint moves there with the next batch.
    pub advance: Option<i64>,
    /// The broker no longer holds this partition from the checkpoint on: not read until an
    /// operator moves the checkpoint (`kafka.on_data_loss = "fail"`).
    pub lost: Option<Lost>,
}

impl PartitionState {
    /// Whether a record at `offset`, polled after the partition's latest seek, is still to be
    /// applied: at or past the checkpoint, below `stop` (a rebuild "as of"), and the partition not
    /// held for lost records.
    pub fn accepts(&self, offset: i64, stop: Option<i64>) -> bool {
        self.lost.is_none()
            && self.checkpoint.is_none_or(|next| offset >= next)
            && stop.is_none_or(|stop| offset < stop)
    }

    /// The consumer stands at `position` with no record left to deliver below it: the checkpoint
    /// moves there with the next batch, if that is forward (never past `stop`). Returns whether it
    /// will move.
    pub fn advance_to(&mut self, position: i64, stop: Option<i64>) -> bool {
        let to = stop.map_or(position, |stop| position.min(stop));
        if self.lost.is_some() || self.checkpoint.is_some_and(|checkpoint| to <= checkpoint) {
            return false;
        }
        self.advance = Some(self.advance.map_or(to, |advance| advance.max(to)));
        true
    }
}

/// Events done towards `targets`: per partition, how far the checkpoint (`stored`) is past its
/// start, never past the target.
pub fn progress(stored: &Offsets, starts: &Offsets, targets: &Offsets) -> u64 {
    targets
        .iter()
        .map(|(partition, target)| {
            let start = starts.get(partition).copied().unwrap_or(0);
            let at = stored.get(partition).copied().unwrap_or(start).clamp(start, (*target).max(start));
            (at - start) as u64
        })
        .sum()
}

/// `targets`, each lowered to where `reached` says the partition ends sooner.
pub fn capped(targets: &Offsets, reached: &Offsets) -> Offsets {
    targets
        .iter()
        .map(|(partition, target)| {
            let found = reached.get(partition).copied();
            (partition.clone(), found.map_or(*target, |found| found.min(*target)))
        })
        .collect()
}

/// Whether every partition's checkpoint is at or past its target (absent: 0).
pub fn reached(stored: &Offsets, targets: &Offsets) -> bool {
    targets.iter().all(|(partition, target)| stored.get(partition).copied().unwrap_or(0) >= *target)
}

/// Messages between the checkpoints and the partitions' ends, summed (none is negative).
pub fn lag(ends: &Offsets, stored: &Offsets) -> i64 {
    ends.iter().map(|(partition, end)| (end - stored.get(partition).copied().unwrap_or(0)).max(0)).sum()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn record(topic: &str, partition: i32, offset: i64) -> Record {
        Record {
            topic: Arc::from(topic),
            partition,
            offset,
            key: None,
            value: None,
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    fn tp(topic: &str, partition: i32) -> TopicPartition {
        (topic.to_string(), partition)
    }

    fn offsets(entries: &[(&str, i32, i64)]) -> Offsets {
        entries.iter().map(|(topic, partition, offset)| (tp(topic, *partition), *offset)).collect()
    }

    #[test]
    fn is_of_compares_topic_and_partition() {
        assert!(is_of("orders", 3, &tp("orders", 3)));
        assert!(!is_of("orders", 2, &tp("orders", 3)));
        assert!(!is_of("order", 3, &tp("orders", 3)));
        assert!(!is_of("orders", 3, &tp("payments", 3)));
        assert!(is_of("", 0, &tp("", 0)));
    }

    #[test]
    fn moves_of_gives_one_move_per_partition_past_its_last_record() {
        let records = [
            record("b", 0, 7),
            record("a", 1, 3),
            record("a", 0, 10),
            record("a", 1, 4),
            record("b", 0, 9),
            record("a", 0, 11),
        ];
        let stored = offsets(&[("a", 0, 10), ("a", 1, 2)]);
        let moves = moves_of(&records, |partition| stored.get(partition).copied());
        assert_eq!(
            moves,
            vec![
                Move { partition: tp("a", 0), from: Some(10), to: 12 },
                Move { partition: tp("a", 1), from: Some(2), to: 5 },
                Move { partition: tp("b", 0), from: None, to: 10 },
            ]
        );
        assert!(moves.iter().all(Move::is_forward));
    }

    #[test]
    fn moves_of_takes_the_highest_offset_whatever_the_order() {
        // Records of one partition in any order (a held event re-read, a redelivery): the move
        // goes past the highest.
        let records = [record("a", 0, 5), record("a", 0, 2), record("a", 0, 4)];
        let moves = moves_of(&records, |_| Some(2));
        assert_eq!(moves, vec![Move { partition: tp("a", 0), from: Some(2), to: 6 }]);
        assert!(moves_of(&[], |_| None).is_empty());
    }

    #[test]
    fn an_advance_joins_a_move_or_makes_one_when_forward() {
        let mut moves = vec![Move { partition: tp("a", 0), from: Some(0), to: 5 }];
        add_advance(&mut moves, tp("a", 0), Some(0), 8);
        assert_eq!(moves[0].to, 8);
        add_advance(&mut moves, tp("a", 0), Some(0), 3);
        assert_eq!(moves[0].to, 8, "an advance behind the batch leaves it");
        add_advance(&mut moves, tp("a", 1), Some(4), 4);
        assert_eq!(moves.len(), 1, "an advance to the checkpoint itself moves nothing");
        add_advance(&mut moves, tp("a", 1), Some(4), 2);
        assert_eq!(moves.len(), 1, "an advance behind the checkpoint moves nothing");
        add_advance(&mut moves, tp("a", 1), Some(4), 6);
        add_advance(&mut moves, tp("a", 2), None, 1);
        assert_eq!(
            moves[1..],
            [Move { partition: tp("a", 1), from: Some(4), to: 6 }, Move { partition: tp("a", 2), from: None, to: 1 }]
        );
    }

    #[test]
    fn stay_is_a_forward_move_of_nothing() {
        let stay = Move::stay(tp("a", 0), 9);
        assert_eq!((stay.from, stay.to), (Some(9), 9));
        assert!(stay.is_forward());
        assert!(!Move { partition: tp("a", 0), from: Some(9), to: 8 }.is_forward());
        assert!(Move { partition: tp("a", 0), from: None, to: 0 }.is_forward());
    }

    /// Every combination of checkpoint, stop and lost state against offsets around them.
    #[test]
    fn accepts_exactly_the_offsets_from_the_checkpoint_to_the_stop() {
        let lost = Some(Lost { checkpoint: 3, low: 6 });
        for checkpoint in [None, Some(0), Some(3), Some(5)] {
            for stop in [None, Some(0), Some(4), Some(8)] {
                for lost in [None, lost] {
                    let state = PartitionState { checkpoint, advance: None, lost };
                    for offset in 0..10 {
                        let expected =
                            lost.is_none() && offset >= checkpoint.unwrap_or(0) && offset < stop.unwrap_or(i64::MAX);
                        assert_eq!(
                            state.accepts(offset, stop),
                            expected,
                            "checkpoint {checkpoint:?}, stop {stop:?}, lost {lost:?}, offset {offset}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn advance_moves_forward_only_and_never_past_the_stop() {
        for checkpoint in [None, Some(0), Some(5)] {
            for stop in [None, Some(3), Some(7)] {
                for advance in [None, Some(6)] {
                    for position in 0..10 {
                        let mut state = PartitionState { checkpoint, advance, lost: None };
                        let to = stop.map_or(position, |stop| position.min(stop));
                        let moves = checkpoint.is_none_or(|checkpoint| to > checkpoint);
                        assert_eq!(state.advance_to(position, stop), moves, "{checkpoint:?} {stop:?} {position}");
                        let expected =
                            if moves { Some(advance.map_or(to, |advance| advance.max(to))) } else { advance };
                        assert_eq!(state.advance, expected, "{checkpoint:?} {stop:?} {advance:?} {position}");
                    }
                }
            }
        }
        let mut held =
            PartitionState { checkpoint: Some(2), advance: None, lost: Some(Lost { checkpoint: 2, low: 9 }) };
        assert!(!held.advance_to(9, None), "a partition held for lost records does not move by itself");
        assert_eq!(held.advance, None);
    }

    #[test]
    fn progress_counts_from_the_start_up_to_the_target() {
        let starts = offsets(&[("a", 0, 10), ("a", 1, 0)]);
        let targets = offsets(&[("a", 0, 20), ("a", 1, 5), ("a", 2, 4)]);
        assert_eq!(progress(&Offsets::new(), &starts, &targets), 0, "nothing stored: nothing done");
        let stored = offsets(&[("a", 0, 15), ("a", 1, 9), ("a", 2, 1)]);
        assert_eq!(progress(&stored, &starts, &targets), 5 + 5 + 1, "past the target counts as the target");
        let behind = offsets(&[("a", 0, 3)]);
        assert_eq!(progress(&behind, &starts, &targets), 0, "behind the start counts nothing");
        let done = offsets(&[("a", 0, 20), ("a", 1, 5), ("a", 2, 4)]);
        assert_eq!(progress(&done, &starts, &targets), 10 + 5 + 4);
        let empty_target = offsets(&[("a", 0, 5)]);
        assert_eq!(progress(&stored, &starts, &empty_target), 0, "a target before the start is done at once");
    }

    #[test]
    fn targets_are_capped_where_the_end_came_sooner_and_reached_when_all_are() {
        let targets = offsets(&[("a", 0, 20), ("a", 1, 5)]);
        let capped = capped(&targets, &offsets(&[("a", 0, 12), ("a", 1, 9), ("b", 0, 1)]));
        assert_eq!(capped, offsets(&[("a", 0, 12), ("a", 1, 5)]));
        assert!(!reached(&offsets(&[("a", 0, 12)]), &capped));
        assert!(reached(&offsets(&[("a", 0, 12), ("a", 1, 6)]), &capped));
        assert!(reached(&Offsets::new(), &offsets(&[("a", 0, 0)])), "an empty partition is reached");
        assert!(reached(&Offsets::new(), &Offsets::new()));
    }

    #[test]
    fn lag_sums_what_is_left_and_never_goes_negative() {
        let ends = offsets(&[("a", 0, 10), ("a", 1, 4), ("a", 2, 7)]);
        assert_eq!(lag(&ends, &offsets(&[("a", 0, 6), ("a", 1, 9)])), 4 + 7);
        assert_eq!(lag(&ends, &ends), 0);
        assert_eq!(lag(&Offsets::new(), &ends), 0);
    }
}
