//! A worker's sweeps of its held events: those that waited past `parking.gap_timeout_secs` are
//! parked; those whose predecessor another lane or instance applied are released.

use super::{Ended, Worker, WorkerError};
use crate::checkpoint::{Move, TopicPartition};
use crate::store::apply::{ApplyError, Handling};
use crate::store::held::{park_expired_gaps, release_ready};

impl Worker {
    /// Parks the held gaps of our partitions that waited past `parking.gap_timeout_secs`.
    pub(super) async fn park_expired_gaps(&mut self) -> Result<(), WorkerError> {
        let Some(timeout) = self.gap_timeout else {
            return Ok(());
        };
        let owned = self.owned_checkpoints();
        if owned.is_empty() {
            return Ok(());
        }
        let result = match self.pool.get().await {
            Ok(mut client) => park_expired_gaps(&mut client, &self.projection, &owned, timeout.as_secs()).await,
            Err(error) => Err(ApplyError::Pool(error)),
        };
        match result {
            Ok(0) => {}
            Ok(parked) => {
                tracing::warn!(projection = %self.projection.name, parked, "held events parked: their predecessors did not arrive in time");
                self.metrics.record_gap_timeouts(&self.projection.name, parked);
            }
            Err(error) => self.sweep_failed(error, owned, "cannot check held events for their timeout").await?,
        }
        Ok(())
    }

    /// Releases the held events of our partitions whose predecessor was applied by a batch that
    /// could not see them (another lane's, or another instance's, that read the key before the
    /// hold committed). Stops looking once our partitions hold nothing.
    pub(super) async fn release_ready(&mut self) -> Result<(), WorkerError> {
        let owned = self.owned_checkpoints();
        let result = match self.pool.get().await {
            Ok(mut client) => release_ready(&mut client, &self.applier, &self.projection, &owned).await,
            Err(error) => Err(ApplyError::Pool(error)),
        };
        match result {
            Ok(swept) => {
                if swept.report.released > 0 {
                    tracing::info!(projection = %self.projection.name, released = swept.report.released,
                        "held events released: their predecessors were applied by another lane or instance");
                    self.metrics.record_outcomes(&self.projection.name, &swept.report);
                }
                self.may_hold = swept.still_held > 0;
            }
            Err(error) => self.sweep_failed(error, owned, "cannot release held events").await?,
        }
        Ok(())
    }

    /// The partitions we own with a known checkpoint, for a sweep over them.
    pub(super) fn owned_checkpoints(&self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter()
            .filter_map(|(partition, state)| state.checkpoint.map(|checkpoint| (partition.clone(), checkpoint)))
            .collect()
    }

    /// A sweep of held events (expired gaps, releases) that did not commit: fenced, it re-reads
    /// the partition from its stored checkpoint; on another definition the projection ends; what
    /// is fatal stops the engine; anything else is tried again at the next tick.
    pub(super) async fn sweep_failed(
        &mut self,
        error: ApplyError,
        owned: Vec<(TopicPartition, i64)>,
        what: &str,
    ) -> Result<(), WorkerError> {
        match (error.handling(), &error) {
            (Handling::Reread, ApplyError::Fenced { partition }) => {
                tracing::warn!(projection = %self.projection.name, topic = %partition.0, partition = partition.1,
                    "checkpoint moved by another instance: re-reading from the stored checkpoint");
                let moves: Vec<Move> = owned
                    .into_iter()
                    .filter(|(owned, _)| owned == partition)
                    .map(|(partition, checkpoint)| Move::stay(partition, checkpoint))
                    .collect();
                self.resync(&moves).await;
            }
            (Handling::StopProjection, _) => {
                self.ended.get_or_insert(Ended::DefinitionChanged(error.to_string()));
            }
            (Handling::Fail, _) => {
                return Err(WorkerError::Fatal { projection: self.projection.name.clone(), message: error.to_string() })
            }
            _ => tracing::warn!(projection = %self.projection.name, %error, "{what}; trying again later"),
        }
        Ok(())
    }
}
