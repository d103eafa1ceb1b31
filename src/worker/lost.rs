//! Records the broker no longer holds. The consumer reads with `auto.offset.reset = error`, so a
//! partition whose checkpoint is below its log start (retention deleted records the projection
//! had not read) or past its end (the topic was deleted and created again) stops with an error
//! instead of jumping. The worker then counts what is gone
//! (`projector_records_lost_total`) and, by `kafka.on_data_loss`, either holds the partition and
//! reports the projection `failed` until an operator moves its checkpoint (`projector
//! accept-data-loss`, or a rebuild), or moves the checkpoint to the log start itself and goes on.

use std::time::{Duration, Instant};

use super::condition::Problem;
use super::{Ended, Worker, WorkerError};
use crate::checkpoint::{Lost, Move, TopicPartition};
use crate::settings::OnDataLoss;
use crate::store::checkpoint::{self, Cas};

impl Worker {
    /// The consumer could not read a partition from its position: compares every owned
    /// partition's checkpoint with the broker's offsets (the consumer cannot say which partition
    /// it was), and handles those out of range.
    pub(super) async fn out_of_range(&mut self, watermarks: &[(TopicPartition, i64, i64)]) -> Result<(), WorkerError> {
        let mut explained = false;
        for (partition, low, high) in watermarks {
            let Some(state) = self.partitions.get(partition) else { continue };
            if state.lost.is_some() {
                explained = true;
                continue;
            }
            let Some(checkpoint) = state.checkpoint else { continue };
            if checkpoint < *low {
                explained = true;
                self.data_lost(partition, checkpoint, *low).await;
            } else if checkpoint > *high {
                explained = true;
                self.past_the_end(partition, checkpoint, *low, *high).await;
            }
        }
        if !explained {
            // Fetching stopped on a partition whose checkpoint the broker still holds (its log
            // moved between the error and this look): read every partition again from its
            // checkpoint, not more often than every few seconds.
            tracing::warn!(projection = %self.projection.name, "a partition could not be read from its position, yet every checkpoint is within the broker's offsets: reading again from the checkpoints");
            let wait =
                self.unexplained_at.map_or(Duration::ZERO, |at| Duration::from_secs(5).saturating_sub(at.elapsed()));
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = super::stopping(&mut shutdown) => return Ok(()),
            }
            self.unexplained_at = Some(Instant::now());
            let moves: Vec<Move> = self
                .partitions
                .iter()
                .filter(|(_, state)| state.lost.is_none())
                .map(|(partition, state)| Move {
                    partition: partition.clone(),
                    from: state.checkpoint,
                    to: state.checkpoint.unwrap_or(0),
                })
                .collect();
            self.resync(&moves).await;
        }
        Ok(())
    }

    /// Records `checkpoint..low` of `partition` are gone: counted (once), then held or skipped.
    async fn data_lost(&mut self, partition: &TopicPartition, checkpoint: i64, low: i64) {
        let counted = self.counted_lost.entry((partition.clone(), checkpoint)).or_insert(checkpoint);
        if low > *counted {
            self.metrics.record_lost(&self.projection.name, &partition.0, partition.1, (low - *counted) as u64);
            *counted = low;
        }
        let (topic, number, name) = (&partition.0, partition.1, &self.projection.name);
        match self.on_data_loss {
            OnDataLoss::Fail => self.hold(
                partition,
                Lost { checkpoint, low },
                format!(
                    "`{topic}` partition {number}: records {checkpoint} to {} ({} of them) were deleted by the broker \
                     (retention) before this projection read them; the partition is not read until its checkpoint \
                     is moved: rebuild the projection (`projector rebuild {name} --accept-data-loss`), or accept the \
                     loss (`projector accept-data-loss {name}`); `kafka.on_data_loss = \"skip\"` moves on by itself",
                    low - 1,
                    low - checkpoint
                ),
            ),
            OnDataLoss::Skip => {
                tracing::warn!(projection = %name, %topic, partition = number, from = checkpoint, to = low, lost = low - checkpoint,
                    "records deleted by the broker (retention) before this projection read them: skipping to the log start (kafka.on_data_loss = \"skip\")");
                self.jump(partition, checkpoint, low).await;
            }
        }
    }

    /// The checkpoint of `partition` is past its end: the topic was deleted and created again (or
    /// truncated). Nothing can be counted; held, or read again from the log start.
    async fn past_the_end(&mut self, partition: &TopicPartition, checkpoint: i64, low: i64, high: i64) {
        let (topic, number, name) = (&partition.0, partition.1, &self.projection.name);
        match self.on_data_loss {
            OnDataLoss::Fail => self.hold(
                partition,
                Lost { checkpoint, low },
                format!(
                    "`{topic}` partition {number}: the checkpoint ({checkpoint}) is past the partition's end ({high}): \
                     was the topic deleted and created again? The partition is not read until its checkpoint is \
                     moved: rebuild the projection (`projector rebuild {name}`)"
                ),
            ),
            OnDataLoss::Skip => {
                tracing::warn!(projection = %name, %topic, partition = number, checkpoint, end = high,
                    "the checkpoint is past the partition's end (was the topic created again?): reading it from its log start (kafka.on_data_loss = \"skip\")");
                self.jump(partition, checkpoint, low).await;
            }
        }
    }

    /// Holds `partition`: not read, the projection `failed`, until its checkpoint moves.
    fn hold(&mut self, partition: &TopicPartition, lost: Lost, message: String) {
        if let Some(state) = self.partitions.get_mut(partition) {
            state.lost = Some(lost);
            state.advance = None;
        }
        self.condition.set(Problem::DataLoss(partition.clone()), message);
    }

    /// Moves the checkpoint of `partition` from `from` to `to` in a transaction of its own and
    /// reads it from there. When that fails, the partition is held and the move tried again.
    async fn jump(&mut self, partition: &TopicPartition, from: i64, to: i64) {
        let result = match self.pool.get().await {
            Ok(client) => checkpoint::jump(&client, &self.projection.name, partition, from, to, &self.projection.hash)
                .await
                .map_err(|error| crate::store::describe(&error)),
            Err(error) => Err(error.to_string()),
        };
        match result {
            Ok(Cas::Moved) => {
                if let Some(state) = self.partitions.get_mut(partition) {
                    state.checkpoint = Some(to);
                    state.lost = None;
                }
                self.condition.clear(&Problem::DataLoss(partition.clone()));
                self.seek(partition.clone(), Some(to));
            }
            Ok(Cas::Fenced) => self.resync(&[Move::stay(partition.clone(), from)]).await,
            Ok(Cas::OtherDefinition(stored)) => {
                self.ended.get_or_insert(Ended::DefinitionChanged(format!(
                    "the checkpoint of `{}` partition {} was written by another definition ({stored})",
                    partition.0, partition.1
                )));
            }
            Err(error) => {
                tracing::warn!(projection = %self.projection.name, %error, "cannot move the checkpoint past the lost records; trying again");
                if let Some(state) = self.partitions.get_mut(partition) {
                    state.lost = Some(Lost { checkpoint: from, low: to });
                }
            }
        }
    }

    /// Looks again at the held partitions: one whose stored checkpoint an operator moved (an
    /// accepted loss, a rebuild) is read again from there; with `skip`, a move that failed is
    /// tried again.
    pub(super) async fn recheck_lost(&mut self) -> Result<(), WorkerError> {
        let held: Vec<(TopicPartition, Lost)> = self
            .partitions
            .iter()
            .filter_map(|(partition, state)| state.lost.map(|lost| (partition.clone(), lost)))
            .collect();
        let partitions: Vec<TopicPartition> = held.iter().map(|(partition, _)| partition.clone()).collect();
        let Some(stored) = self.load_checkpoints(&partitions).await else {
            return Ok(());
        };
        for (partition, lost) in held {
            let now = stored.get(&partition).copied();
            if now != Some(lost.checkpoint) {
                tracing::info!(projection = %self.projection.name, topic = %partition.0, partition = partition.1,
                    from = lost.checkpoint, to = ?now, "the checkpoint was moved: reading the partition again");
                if let Some(state) = self.partitions.get_mut(&partition) {
                    state.lost = None;
                    state.checkpoint = now;
                }
                self.condition.clear(&Problem::DataLoss(partition.clone()));
                self.seek(partition, now);
            } else if self.on_data_loss == OnDataLoss::Skip {
                self.jump(&partition, lost.checkpoint, lost.low).await;
            }
        }
        Ok(())
    }
}
