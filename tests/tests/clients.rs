//! Real client libraries against a redmesh cluster: redis-py's RedisCluster
//! (RESP3, its default, and RESP2) and raw RESP3 framing.

use redmesh_api::v1;
use redmesh_e2e::harness::{raw_exchange, redis_py_cluster};
use redmesh_e2e::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_cluster_client_works_in_resp3_and_resp2() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            "py",
            4,
            v1::ClusterConfig {
                password: "pw".into(),
                ..Default::default()
            },
        )
        .await;
    redis_py_cluster(&sys.members(&cluster)[0].resp, "pw", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_clients_get_native_resp3_replies() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("r3", 4, v1::ClusterConfig::default())
        .await;
    let addr = &sys.members(&cluster)[0].resp;
    let hello = raw_exchange(addr, b"HELLO 3\r\n").unwrap();
    assert!(
        hello.starts_with(b"%7\r\n"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    assert!(
        String::from_utf8_lossy(&hello).contains(":3\r\n"),
        "proto 3"
    );
    // One connection: switch, then a map-shaped reply from Redis itself.
    let key = "{r3}h";
    let slot_owner_reply = raw_exchange(
        addr,
        format!("HELLO 3\r\nHSET {key} f v\r\nHGETALL {key}\r\nCLUSTER INFO\r\n").as_bytes(),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&slot_owner_reply);
    if text.contains("-MOVED") {
        return; // the key lives on the other proxy; framing was checked above
    }
    assert!(
        text.contains("%1\r\n$1\r\nf\r\n$1\r\nv\r\n"),
        "HGETALL as a RESP3 map: {text}"
    );
    assert!(
        text.contains("=") && text.contains("txt:cluster_state:ok"),
        "CLUSTER INFO verbatim: {text}"
    );
    assert_eq!(
        String::from_utf8_lossy(&raw_exchange(addr, b"HELLO 4\r\n").unwrap()),
        "-NOPROTO unsupported protocol version\r\n"
    );
}
