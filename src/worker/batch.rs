//! A worker's batches: split into lanes by partition, each lane's part applied by a task of its
//! own ([`super::lane`]), and settled in order when done (metrics, the advisory Kafka commit, or
//! the partitions re-read when it did not commit).

use std::collections::HashMap;

use futures::stream::StreamExt;
use tokio::sync::oneshot;

use super::lane::{InFlight, Lane, LaneJob, Pending};
use super::{Ended, Worker, WorkerError};
use crate::checkpoint::{add_advance, is_of, moves_of, Move, TopicPartition};
use crate::kafka::Command;
use crate::outcome::{BatchReport, Outcome};
use crate::projection::Record;

impl Worker {
    /// Starts applying `batch` (then empties it), with the partitions' pending advances. The
    /// batch is split by partition into up to `lanes` parts, each applied by a task of its own, in
    /// a transaction of its own on a connection of its own: a key's events are all in one
    /// partition, so in one lane, in order. Each lane's part waits for the lane's previous batch to
    /// commit; at most two batches per lane, and about two batches' bytes, are in flight. The
    /// checkpoints this worker expects are moved at once; a lane that does not commit has its
    /// partitions re-read from the stored checkpoints when it is settled.
    pub(super) async fn flush(&mut self, batch: &mut Vec<Record>, pending: &mut Pending) -> Result<(), WorkerError> {
        // Settling may re-read partitions: their records in `batch` are then dropped.
        while pending.len() >= 2 * self.lanes || (!pending.is_empty() && self.in_flight_bytes >= 2 * self.max_bytes) {
            let Some(done) = pending.next().await else { break };
            self.settle(done, batch).await?;
        }
        self.dispatch(batch, pending, &vec![true; self.lanes]);
        Ok(())
    }

    /// Natural batching: starts applying the records of `batch` that fall on lanes with no batch
    /// in flight, and keeps the others in `batch`. Under light traffic each record is applied as
    /// soon as it arrives; while a lane is busy its records gather into its next batch, which so
    /// grows with the time a commit takes (up to `max_events` and `max_bytes`, or `max_wait`,
    /// when [`Worker::flush`] sends everything).
    pub(super) fn flush_free(&mut self, batch: &mut Vec<Record>, pending: &mut Pending) {
        let free: Vec<bool> = self.chains.iter().map(|chain| chain.in_flight == 0).collect();
        if !batch.is_empty() && free.contains(&true) {
            self.dispatch(batch, pending, &free);
        }
    }

    /// Starts applying the records of `batch` on the lanes `chosen` says, with their partitions'
    /// pending advances; the other lanes' records stay in `batch`.
    fn dispatch(&mut self, batch: &mut Vec<Record>, pending: &mut Pending, chosen: &[bool]) {
        // Each chosen lane's part, with room for all its records (grown record by record, a part was
        // copied again each time it doubled).
        let mut sizes = vec![0usize; self.lanes];
        let mut counted = Runs::default();
        for record in batch.iter() {
            sizes[counted.lane(&self.lane_map, record)] += 1;
        }
        let mut lanes: Vec<Vec<Record>> = sizes
            .iter()
            .zip(chosen)
            .map(|(&size, &chosen)| Vec::with_capacity(if chosen { size } else { 0 }))
            .collect();
        // The chosen lanes' records are taken out; the others stay where they are, in order.
        let (mut looked_up, mut taken) = (Runs::default(), Runs::default());
        for record in batch.extract_if(.., |record| chosen[looked_up.lane(&self.lane_map, record)]) {
            let lane = taken.lane(&self.lane_map, &record);
            self.batch_bytes = self.batch_bytes.saturating_sub(crate::kafka::record_bytes(&record));
            lanes[lane].push(record);
        }
        let expected = |partition: &TopicPartition| self.partitions.get(partition).and_then(|state| state.checkpoint);
        let mut lane_moves: Vec<Vec<Move>> = lanes.iter().map(|records| moves_of(records, expected)).collect();
        let lane_map = &self.lane_map;
        let advances: Vec<(TopicPartition, i64)> = self
            .partitions
            .iter_mut()
            .filter(|(partition, _)| chosen[lane_in(lane_map, &partition.0, partition.1)])
            .filter_map(|(partition, state)| state.advance.take().map(|to| (partition.clone(), to)))
            .collect();
        for (partition, to) in advances {
            let from = self.partitions.get(&partition).and_then(|state| state.checkpoint);
            add_advance(&mut lane_moves[self.lane_of(&partition.0, partition.1)], partition, from, to);
        }
        for (lane, (records, moves)) in lanes.into_iter().zip(lane_moves).enumerate() {
            if moves.is_empty() {
                continue;
            }
            for Move { partition, to, .. } in &moves {
                if let Some(state) = self.partitions.get_mut(partition) {
                    state.checkpoint = Some(*to);
                }
            }
            self.in_flight_bytes += records.iter().map(crate::kafka::record_bytes).sum::<usize>();
            let (done, next) = oneshot::channel();
            self.chains[lane].in_flight += 1;
            let job = LaneJob {
                projection: self.projection.clone(),
                applier: self.applier.clone(),
                pool: self.pool.clone(),
                shutdown: self.shutdown.clone(),
                condition: self.condition.clone(),
                metrics: self.metrics.clone(),
                retry: self.retry,
                lane,
                generation: self.chains[lane].generation,
                records,
                moves,
                previous: self.chains[lane].latest.replace(next),
                done,
            };
            pending.push_back(tokio::spawn(job.run()));
        }
    }

    /// Waits for every batch in flight and settles it.
    pub(super) async fn drain(&mut self, batch: &mut Vec<Record>, pending: &mut Pending) -> Result<(), WorkerError> {
        while let Some(done) = pending.next().await {
            self.settle(done, batch).await?;
        }
        Ok(())
    }

    /// Records how a lane's batch ended: metrics and the advisory Kafka commit when it committed;
    /// when it did not, its partitions are re-read from the stored checkpoints (once per failure:
    /// batches built on the failed one are skipped and need nothing more).
    pub(super) async fn settle(
        &mut self,
        done: Result<InFlight, tokio::task::JoinError>,
        batch: &mut Vec<Record>,
    ) -> Result<(), WorkerError> {
        let done = done.map_err(|error| WorkerError::Fatal {
            projection: self.projection.name.clone(),
            message: format!("a batch task failed: {error}"),
        })?;
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(done.bytes);
        self.chains[done.lane].in_flight = self.chains[done.lane].in_flight.saturating_sub(1);
        match done.outcome {
            Lane::Committed { report, seconds } => self.committed(&done.moves, &report, done.events, seconds),
            Lane::Fenced | Lane::Skipped => {
                if done.generation == self.chains[done.lane].generation && !*self.shutdown.borrow() {
                    self.chains[done.lane].generation += 1;
                    batch.retain(|record| {
                        !done.moves.iter().any(|known| is_of(&record.topic, record.partition, &known.partition))
                    });
                    self.batch_bytes = batch.iter().map(crate::kafka::record_bytes).sum();
                    self.resync(&done.moves).await;
                }
            }
            Lane::DefinitionChanged(message) => {
                if self.ended.is_none() {
                    self.ended = Some(Ended::DefinitionChanged(message));
                }
            }
            Lane::GaveUp => {}
            Lane::Fatal(message) => {
                return Err(WorkerError::Fatal { projection: self.projection.name.clone(), message })
            }
        }
        Ok(())
    }

    /// The lane of a partition: the same one until the assignment changes (with nothing in
    /// flight).
    pub(super) fn lane_of(&self, topic: &str, partition: i32) -> usize {
        lane_in(&self.lane_map, topic, partition)
    }

    /// Deals the owned partitions out to the lanes in turn, so that lanes get equal shares.
    pub(super) fn deal_lanes(&mut self) {
        let mut owned: Vec<&TopicPartition> = self.partitions.keys().collect();
        owned.sort();
        self.lane_map.clear();
        for (index, (topic, partition)) in owned.into_iter().enumerate() {
            self.lane_map.entry(*partition).or_default().push((topic.clone(), index % self.lanes));
        }
    }

    /// Records a committed lane: checkpoint gauges, metrics, and the advisory Kafka commit. (The
    /// expected checkpoints moved when the batch started.)
    pub(super) fn committed(&mut self, moves: &[Move], report: &BatchReport, events: usize, seconds: f64) {
        if report.total(Outcome::Gap) > 0 {
            self.may_hold = true;
        }
        let mut committed = Vec::with_capacity(moves.len());
        for Move { partition, to, .. } in moves {
            self.metrics.set_checkpoint(&self.projection.name, partition, *to);
            committed.push((partition.clone(), *to));
        }
        self.metrics.record_batch(&self.projection.name, report, events, seconds);
        tracing::debug!(projection = %self.projection.name, events, ?report, "batch committed");
        if self.commit_offsets {
            let _ = self.commands.send(Command::Commit(committed));
        }
    }
}

/// Lanes looked up for records that come in runs of one partition: once per run. (A topic's
/// records share its name, so the name's address tells the topic.)
#[derive(Default)]
struct Runs(Option<(*const u8, i32, usize)>);

impl Runs {
    fn lane(&mut self, lane_map: &HashMap<i32, Vec<(String, usize)>>, record: &Record) -> usize {
        let topic = std::sync::Arc::as_ptr(&record.topic) as *const u8;
        match self.0 {
            Some((of, partition, lane)) if of == topic && partition == record.partition => lane,
            _ => {
                let lane = lane_in(lane_map, &record.topic, record.partition);
                self.0 = Some((topic, record.partition, lane));
                lane
            }
        }
    }
}

/// The lane of a partition in `lane_map` ([`Worker::deal_lanes`]); 0 for one not dealt.
fn lane_in(lane_map: &HashMap<i32, Vec<(String, usize)>>, topic: &str, partition: i32) -> usize {
    lane_map
        .get(&partition)
        .and_then(|topics| topics.iter().find(|(name, _)| name == topic))
        .map_or(0, |(_, lane)| *lane)
}
