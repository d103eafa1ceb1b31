//! The pruning of an event-id projection's processed ids (`keep_event_ids`): beside the worker,
//! every tenth of the window (between 1 s and 1 min), the ids older than the window are deleted.
//! A failure is logged and tried again at the next round; it never stops the projection.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;

use super::stopping;
use crate::metrics::Metrics;
use crate::projection::Projection;
use crate::store::processed::{prune_chunk, PRUNE_CHUNK};

/// How often the ids older than `keep` are looked for.
pub(super) fn every(keep: Duration) -> Duration {
    (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Prunes `projection`'s processed ids older than `keep` until shutdown.
pub(super) async fn prune_event_ids(
    projection: Arc<Projection>,
    keep: Duration,
    pool: Pool,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut rounds = tokio::time::interval(every(keep));
    // Where the search for old ids starts: no id processed before it is left.
    let mut from = None;
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopping(&mut shutdown) => return,
            _ = rounds.tick() => {}
        }
        let round = async {
            let client = crate::store::client(&pool).await?;
            let mut pruned = 0;
            loop {
                let chunk = prune_chunk(&**client, &projection.name, keep, from)
                    .await
                    .map_err(|e| crate::store::StoreError::postgres(&e))?;
                metrics.record_event_ids_pruned(&projection.name, chunk.deleted);
                pruned += chunk.deleted;
                from = chunk.up_to.or(from);
                if chunk.deleted < PRUNE_CHUNK as u64 || *shutdown.borrow() {
                    return Ok::<u64, crate::store::StoreError>(pruned);
                }
            }
        };
        match round.await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(projection = %projection.name, pruned, "processed event ids pruned"),
            Err(error) => {
                tracing::warn!(projection = %projection.name, %error, "cannot prune processed event ids; trying again later")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_a_tenth_of_the_window_within_bounds() {
        assert_eq!(every(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(every(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(every(Duration::from_secs(7 * 86_400)), Duration::from_secs(60));
    }
}
