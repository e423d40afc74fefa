//! The conformance suite every `MetaStore` must pass, run against `MemStore`
//! in this crate's tests and against a real etcd in the e2e crate.
//!
//! Each check takes a fresh key prefix so runs against a shared etcd never
//! see each other's keys. Checks panic on violation (they are test code).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::{
    Compare, Election, EventKind, LeaseKeeper, MetaStore, Op, StoreError, Txn, WatchBatch,
    WatchStream,
};

/// Runs every check under `prefix` (must end in `/`).
pub async fn run_all(store: Arc<dyn MetaStore>, prefix: &str) {
    basic_kv(&*store, &format!("{prefix}kv/")).await;
    transactions(&*store, &format!("{prefix}txn/")).await;
    watch_history_and_live(&*store, &format!("{prefix}watch/")).await;
    compaction(&*store, &format!("{prefix}compact/")).await;
    leases(&*store, &format!("{prefix}lease/")).await;
    election(store.clone(), &format!("{prefix}election/")).await;
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next_batch(w: &mut WatchStream) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("watch produced nothing within 5 s")
        .expect("watch ended")
        .expect("watch failed")
}

/// get/put/delete/list, revisions and versions.
pub async fn basic_kv(s: &dyn MetaStore, p: &str) {
    assert_eq!(s.get(&format!("{p}a")).await.unwrap(), None);
    let r1 = s.put(&format!("{p}b"), b("1"), None).await.unwrap();
    let r2 = s.put(&format!("{p}a"), b("2"), None).await.unwrap();
    assert!(r2 > r1, "revisions grow");
    let r3 = s.put(&format!("{p}a"), b("3"), None).await.unwrap();
    let a = s.get(&format!("{p}a")).await.unwrap().unwrap();
    assert_eq!(
        (
            a.value.as_ref(),
            a.version,
            a.create_revision,
            a.mod_revision
        ),
        (&b"3"[..], 2, r2, r3)
    );
    s.put(&format!("{p}a/child"), b("c"), None).await.unwrap();
    s.put(&format!("{p}c"), b("x"), None).await.unwrap();
    let list = s.list(p).await.unwrap();
    let keys: Vec<&str> = list
        .kvs
        .iter()
        .map(|kv| kv.key.strip_prefix(p).unwrap())
        .collect();
    assert_eq!(
        keys,
        ["a", "a/child", "b", "c"],
        "list is sorted and prefix-bounded"
    );
    assert!(list.revision >= r3);
    assert!(s.delete(&format!("{p}a")).await.unwrap());
    assert!(!s.delete(&format!("{p}a")).await.unwrap());
    assert_eq!(s.get(&format!("{p}a")).await.unwrap(), None);
    // Recreated keys start over at version 1 with a new create revision.
    let r4 = s.put(&format!("{p}a"), b("4"), None).await.unwrap();
    let a = s.get(&format!("{p}a")).await.unwrap().unwrap();
    assert_eq!((a.version, a.create_revision), (1, r4));
}

/// Compare-and-swap semantics.
pub async fn transactions(s: &dyn MetaStore, p: &str) {
    let k = format!("{p}k");
    let create = Txn {
        compares: vec![Compare::missing(&k)],
        success: vec![Op::put(&k, b("v1")), Op::get(&k)],
        failure: vec![Op::get(&k)],
    };
    let r = s.txn(create.clone()).await.unwrap();
    assert!(r.succeeded);
    let kv = r.gets[0].clone().expect("get inside txn sees the put");
    assert_eq!(kv.value, b("v1"));
    assert_eq!(kv.mod_revision, r.revision);
    let again = s.txn(create).await.unwrap();
    assert!(!again.succeeded, "second create must fail");
    assert_eq!(again.gets[0].as_ref().unwrap().value, b("v1"));
    // Update guarded by mod revision: a stale revision loses.
    let stale = kv.mod_revision;
    let upd = |rev| Txn {
        compares: vec![Compare::mod_revision(&k, rev)],
        success: vec![Op::put(&k, b("v2")), Op::put(format!("{p}other"), b("o"))],
        failure: vec![],
    };
    let ok = s.txn(upd(stale)).await.unwrap();
    assert!(ok.succeeded);
    assert!(!s.txn(upd(stale)).await.unwrap().succeeded);
    // Both puts of one txn share one revision.
    let k1 = s.get(&k).await.unwrap().unwrap();
    let k2 = s.get(&format!("{p}other")).await.unwrap().unwrap();
    assert_eq!(k1.mod_revision, k2.mod_revision);
    assert_eq!(k1.mod_revision, ok.revision);
    // exists / delete in a txn.
    let del = s
        .txn(Txn {
            compares: vec![Compare::exists(&k)],
            success: vec![Op::delete(&k)],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(del.succeeded);
    assert_eq!(s.get(&k).await.unwrap(), None);
    // A guard on a missing key's mod revision (0) holds.
    assert!(s.txn(upd(0)).await.unwrap().succeeded);
}

/// Watch from a past revision replays history, then streams live changes,
/// only under the prefix, deletes included.
pub async fn watch_history_and_live(s: &dyn MetaStore, p: &str) {
    let w_prefix = format!("{p}w/");
    let r1 = s.put(&format!("{w_prefix}a"), b("1"), None).await.unwrap();
    s.put(&format!("{p}outside"), b("x"), None).await.unwrap();
    let mut w = s.watch(&w_prefix, r1).await.unwrap();
    let first = next_batch(&mut w).await;
    assert_eq!(first.revision, r1);
    assert_eq!(first.events[0].kv.value, b("1"));
    let r2 = s.put(&format!("{w_prefix}b"), b("2"), None).await.unwrap();
    let second = next_batch(&mut w).await;
    assert_eq!((second.revision, second.events.len()), (r2, 1));
    assert!(s.delete(&format!("{w_prefix}a")).await.unwrap());
    let third = next_batch(&mut w).await;
    assert_eq!(third.events[0].kind, EventKind::Delete);
    assert_eq!(third.events[0].kv.key, format!("{w_prefix}a"));
    // A watch from 0 sees only what comes next.
    let mut now = s.watch(&w_prefix, 0).await.unwrap();
    let r4 = s.put(&format!("{w_prefix}c"), b("3"), None).await.unwrap();
    assert_eq!(next_batch(&mut now).await.revision, r4);
}

/// Watching compacted history fails with `Compacted`; watching from the
/// compaction revision itself still works.
pub async fn compaction(s: &dyn MetaStore, p: &str) {
    let r1 = s.put(&format!("{p}a"), b("1"), None).await.unwrap();
    let r2 = s.put(&format!("{p}a"), b("2"), None).await.unwrap();
    s.compact(r2).await.unwrap();
    let err = match s.watch(p, r1).await {
        Err(e) => e,
        Ok(mut w) => tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("compacted watch must fail promptly")
            .expect("stream yields the error")
            .expect_err("history before the compaction is gone"),
    };
    assert!(
        matches!(err, StoreError::Compacted { compact_revision, .. } if compact_revision == r2),
        "{err:?}"
    );
    let mut ok = s.watch(p, r2).await.unwrap();
    assert_eq!(next_batch(&mut ok).await.revision, r2);
}

/// Leases: keys die with their lease (revoke or expiry), refresh keeps them.
pub async fn leases(s: &dyn MetaStore, p: &str) {
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.put(&format!("{p}held"), b("1"), Some(lease))
        .await
        .unwrap();
    assert_eq!(
        s.get(&format!("{p}held")).await.unwrap().unwrap().lease,
        lease
    );
    assert!(s.keep_alive(lease).await.unwrap() >= Duration::from_secs(1));
    let mut w = s.watch(p, 0).await.unwrap();
    s.revoke_lease(lease).await.unwrap();
    let ev = next_batch(&mut w).await;
    assert_eq!(ev.events[0].kind, EventKind::Delete);
    assert_eq!(s.get(&format!("{p}held")).await.unwrap(), None);
    let ka = s.keep_alive(lease).await;
    assert!(matches!(ka, Err(StoreError::LeaseNotFound(_))), "{ka:?}");
    assert!(matches!(
        s.put(&format!("{p}x"), b("1"), Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    // Expiry without refresh (etcd rounds TTLs up to its minimum of ~2 s).
    let short = s.grant_lease(Duration::from_secs(1)).await.unwrap();
    s.put(&format!("{p}short"), b("1"), Some(short))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while s.get(&format!("{p}short")).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "leased key outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Election: one leader at a time, successor takes over on resign or lease
/// loss, and a deposed leader's guard no longer holds.
pub async fn election(store: Arc<dyn MetaStore>, p: &str) {
    let e = Election::new(store.clone(), format!("{p}candidates/"));
    let l1 = LeaseKeeper::start(store.clone(), Duration::from_secs(2))
        .await
        .unwrap();
    let l2 = LeaseKeeper::start(store.clone(), Duration::from_secs(2))
        .await
        .unwrap();
    let first = e.campaign(l1.id(), b("one")).await.unwrap();
    assert_eq!(e.leader().await.unwrap().unwrap().value, b("one"));
    let e2 = e.clone();
    let id2 = l2.id();
    let mut second = tokio::spawn(async move { e2.campaign(id2, b("two")).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut second)
            .await
            .is_err(),
        "second candidate must wait while the first leads"
    );
    let guarded = Txn {
        compares: vec![first.guard()],
        success: vec![Op::put(format!("{p}owned"), b("by-one"))],
        failure: vec![],
    };
    assert!(store.txn(guarded.clone()).await.unwrap().succeeded);
    e.resign(&first).await.unwrap();
    let lead2 = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("successor elected promptly")
        .unwrap()
        .unwrap();
    assert_eq!(e.leader().await.unwrap().unwrap().value, b("two"));
    assert!(
        !store.txn(guarded).await.unwrap().succeeded,
        "deposed leader cannot write"
    );
    // Lease loss ends leadership too.
    l2.revoke().await.unwrap();
    assert!(e.leader().await.unwrap().is_none());
    assert!(
        !store
            .txn(Txn {
                compares: vec![lead2.guard()],
                success: vec![],
                failure: vec![],
            })
            .await
            .unwrap()
            .succeeded
    );
    drop(l1);
}
