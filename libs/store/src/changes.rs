//! Change notifications under a prefix, for services that re-read what they
//! need whenever something changed (coordinator, health-checker).
//!
//! The receiver holds a generation counter, so a burst of changes wakes a
//! slow reader once. The counter also moves when a watch is re-established,
//! because changes may have been missed while it was down; readers therefore
//! never need a timer to stay correct.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use crate::{MetaStore, StoreError};

/// Starts following `prefix`; the returned counter grows on every change.
/// The background task ends when every receiver is dropped.
pub fn changes(store: Arc<dyn MetaStore>, prefix: String) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0);
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                outcome = follow(&*store, &prefix, &tx) => {
                    match outcome {
                        Ok(()) => failures = 0,
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            tracing::warn!(%prefix, error = %e, "metadata watch failed; re-establishing");
                        }
                    }
                }
            }
            // Up to 1 s between attempts while the store is unavailable.
            let pause = Duration::from_millis(50u64 << failures.min(4)).min(Duration::from_secs(1));
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    });
    rx
}

/// One watch: bumps the counter once it is established, then per batch.
async fn follow(
    store: &dyn MetaStore,
    prefix: &str,
    tx: &watch::Sender<u64>,
) -> Result<(), StoreError> {
    let mut stream = store.watch(prefix, 0).await?;
    tx.send_modify(|g| *g += 1);
    while let Some(batch) = stream.next().await {
        batch?;
        tx.send_modify(|g| *g += 1);
    }
    Ok(())
}
