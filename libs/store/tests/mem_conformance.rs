//! The MetaStore conformance suite against the in-memory store.
use std::sync::Arc;

use redmesh_store::{conformance, MemStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_store_conforms() {
    conformance::run_all(Arc::new(MemStore::new()), "/test/").await;
}
