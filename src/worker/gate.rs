//! The definition gate: a projection's worker applies nothing to rows built by another definition
//! of it. It waits, `failed`, until the operator rebuilds or accepts the change.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;

use super::condition::{Condition, Problem};
use crate::projection::Projection;
use crate::store::checkpoint;

/// Waits until the checkpoints of `projection` were written by its current definition (or it has
/// none yet). Checkpoints written by this same definition under the hash of an earlier projector
/// version are taken over first. A changed definition is never applied to rows built by the old
/// one: the operator rebuilds (`projector rebuild`) or accepts the change (`projector accept`),
/// and the worker starts by itself. Returns false when shutdown came first.
pub(super) async fn wait_for_matching_definition(
    projection: &Projection,
    pool: &Pool,
    condition: &Condition,
    mut shutdown: watch::Receiver<bool>,
) -> bool {
    let mut warned = false;
    loop {
        let hashes = match crate::store::client(pool).await {
            Ok(client) => checkpoint::adopt_legacy_hash(&**client, projection).await,
            Err(error) => Err(error),
        };
        match hashes {
            Ok(hashes) if hashes.iter().all(|hash| *hash == projection.hash) => {
                condition.clear(&Problem::Definition);
                return true;
            }
            Ok(hashes) => {
                if !warned {
                    condition.set(
                        Problem::Definition,
                        format!(
                            "projection `{name}` ({file}) changed since its read model was built (built by {built}, \
                             now {current}): its new statements are not applied to rows built by the old ones. \
                             Rebuild it (`projector rebuild {name}`, or `--shadow` to keep serving reads), or keep \
                             the rows and apply the new definition from here on (`projector accept {name}`). Waiting.",
                            name = projection.name,
                            file = projection.file.display(),
                            built = hashes.join(","),
                            current = projection.hash,
                        ),
                    );
                    warned = true;
                }
            }
            Err(error) => tracing::warn!(projection = %projection.name, %error, "cannot read checkpoints, retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = super::stopping(&mut shutdown) => return false,
        }
    }
}
