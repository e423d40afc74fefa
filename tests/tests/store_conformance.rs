//! The MetaStore conformance suite against a real etcd, plus etcd outage behaviour.
use std::sync::Arc;
use std::time::{Duration, Instant};

use redmesh_e2e::Etcd;
use redmesh_store::{conformance, EtcdOptions, EtcdStore, MetaStore, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(
        std::slice::from_ref(&etcd.endpoint),
        &EtcdOptions::default(),
    )
    .await
    .unwrap();
    conformance::run_all(Arc::new(store), "/conformance/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_etcd_gives_prompt_unavailable_error() {
    let mut etcd = Etcd::start();
    let opts = EtcdOptions {
        request_timeout: Duration::from_millis(500),
        ..EtcdOptions::default()
    };
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), &opts)
        .await
        .unwrap();
    store.put("/x", "1".into(), None).await.unwrap();
    etcd.kill();
    let started = Instant::now();
    let err = store.get("/x").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string().contains(&etcd.endpoint),
        "error names the endpoint: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no hang: {:?}",
        started.elapsed()
    );
}
