//! Per-key locks that serialise a key's move against client commands on the
//! source proxy of a migration (DESIGN.md §6): a command on a migrating slot
//! holds its keys' locks from the existence check until its reply, and a
//! migration batch holds them from `DUMP` until the source copy is deleted.
//!
//! Keys hash onto a fixed table of stripes; a holder of several keys takes
//! their stripes in ascending order, so two holders never wait on each other
//! in a cycle. Only migrating slots pay for this.
//!
//! A key held for long (a big key copied in pieces, seconds) is held by its
//! exact name instead, so the other keys of its stripe are not held up.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

/// Stripes: enough that unrelated keys rarely share one while a batch of a
/// thousand keys is held.
const STRIPES: usize = 8192;

/// The lock table.
pub struct KeyLocks {
    stripes: Vec<Arc<Mutex<()>>>,
    hasher: std::collections::hash_map::RandomState,
    /// Keys under a long hold, with what their waiters wait on.
    long: std::sync::Mutex<HashMap<Vec<u8>, Arc<Notify>>>,
}

impl std::fmt::Debug for KeyLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLocks")
            .field("stripes", &self.stripes.len())
            .finish()
    }
}

impl Default for KeyLocks {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Arc::new(Mutex::new(()))).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            long: std::sync::Mutex::default(),
        }
    }
}

/// A long hold of one key; dropping it releases the key.
#[derive(Debug)]
pub struct LongHeld {
    locks: Arc<KeyLocks>,
    key: Vec<u8>,
}

impl Drop for LongHeld {
    fn drop(&mut self) {
        let mut long = self.locks.long.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = long.remove(&self.key) {
            n.notify_waiters();
        }
    }
}

/// Locks held; dropping it releases them.
#[derive(Debug)]
pub struct Held {
    _guards: Vec<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    fn stripe(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) % STRIPES as u64) as usize
    }

    /// Waits for the locks of every key in `keys`.
    pub async fn lock<K: AsRef<[u8]>>(&self, keys: &[K]) -> Held {
        loop {
            let held = self.lock_stripes(keys).await;
            // A key under a long hold: wait for its release, then start
            // over. The wait is registered under the table's mutex, which
            // the release takes too, so no release is missed.
            let released = {
                let long = self.long.lock().unwrap_or_else(|e| e.into_inner());
                keys.iter()
                    .find_map(|k| long.get(k.as_ref()))
                    .map(|n| n.clone().notified_owned())
            };
            match released {
                None => return held,
                Some(released) => {
                    drop(held);
                    released.await;
                }
            }
        }
    }

    /// Holds `key` for a long time: once every current holder is done, the
    /// key is marked as held by name and its stripe released.
    pub async fn lock_long(self: &Arc<Self>, key: &[u8]) -> LongHeld {
        let held = self.lock(&[key]).await;
        self.long
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_vec(), Arc::new(Notify::new()));
        drop(held);
        LongHeld {
            locks: Arc::clone(self),
            key: key.to_vec(),
        }
    }

    async fn lock_stripes<K: AsRef<[u8]>>(&self, keys: &[K]) -> Held {
        let mut ids: Vec<usize> = keys.iter().map(|k| self.stripe(k.as_ref())).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut held = Vec::with_capacity(ids.len());
        for i in ids {
            held.push(self.stripes[i].clone().lock_owned().await);
        }
        Held { _guards: held }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_long_hold_blocks_its_key_but_not_its_stripe() {
        let locks = Arc::new(KeyLocks::default());
        let big = b"big".as_slice();
        // Another key of the same stripe.
        let neighbour = (0..100_000)
            .map(|i| format!("k{i}"))
            .find(|k| locks.stripe(k.as_bytes()) == locks.stripe(big))
            .unwrap();
        let long = locks.lock_long(big).await;
        tokio::time::timeout(Duration::from_secs(5), locks.lock(&[neighbour.as_bytes()]))
            .await
            .expect("a neighbour of a long-held key waits");
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(&[b"big".as_slice()]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "a long-held key was taken");
        drop(long);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a released long hold is taken")
            .unwrap();
    }

    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_key_is_held_by_one_holder_at_a_time_and_orders_avoid_deadlock() {
        let locks = Arc::new(KeyLocks::default());
        let held = locks.lock(&[b"a".as_slice(), b"b"]).await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(&[b"b".as_slice(), b"a"]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "second holder got a held key");
        // Unrelated keys proceed (unless they share a stripe, which these
        // two sets are checked not to).
        let a = locks.stripe(b"a");
        let b = locks.stripe(b"b");
        let free = (0..1000)
            .map(|i| format!("other{i}"))
            .find(|k| ![a, b].contains(&locks.stripe(k.as_bytes())))
            .unwrap();
        drop(locks.lock(&[free.as_bytes()]).await);
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released locks are taken")
            .unwrap();
    }
}
