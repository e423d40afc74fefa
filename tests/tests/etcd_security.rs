//! etcd with TLS (client certificates required) and authentication on,
//! as production etcd runs: the store passes its conformance suite as a
//! user allowed only redmesh's prefix, refuses a wrong password or a
//! missing login with errors that say so, logs in once an etcd that was
//! down at start comes up, and the services take the options (a broker
//! serves the API on it).

use std::sync::Arc;
use std::time::Duration;

use redmesh_api::v1;
use redmesh_e2e::harness::{eventually, EtcdTls};
use redmesh_e2e::pki::Pki;
use redmesh_e2e::system::Service;
use redmesh_e2e::Etcd;
use redmesh_store::{conformance, EtcdOptions, EtcdStore, MetaStore, StoreError};

const USER: &str = "redmesh";
const PASSWORD: &str = "etcd-pass-4711";

/// An etcd over mutual TLS with auth on, and the options of a client
/// logged in as `USER` (allowed `/redmesh/` only).
fn secure_etcd(pki: &Pki) -> (Etcd, EtcdOptions) {
    let (cert, key) = pki.leaf("etcd");
    let tls = EtcdTls {
        cert: cert.clone(),
        key: key.clone(),
        ca: pki.ca.clone(),
    };
    let etcd = Etcd::start_tls(tls);
    etcd.enable_auth(USER, PASSWORD, "/redmesh/");
    let opts = EtcdOptions {
        user: Some((USER.into(), PASSWORD.into())),
        tls: Some(redmesh_store::EtcdTls {
            ca: pki.ca.clone(),
            identity: Some((cert, key)),
        }),
        ..EtcdOptions::default()
    };
    (etcd, opts)
}

async fn connect(etcd: &Etcd, opts: &EtcdOptions) -> Result<EtcdStore, StoreError> {
    EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), opts).await
}

/// The error of a read by a client that connects to `etcd` with `opts`
/// (connecting must succeed).
async fn read_refused(etcd: &Etcd, opts: &EtcdOptions) -> String {
    let store = connect(etcd, opts).await.expect("connect");
    store.get("/redmesh/x").await.unwrap_err().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_works_over_tls_as_a_user_and_refuses_strangers() {
    let pki = Pki::new();
    let (etcd, opts) = secure_etcd(&pki);
    let store = connect(&etcd, &opts).await.expect("connect");
    conformance::run_all(Arc::new(store.clone()), "/redmesh/conformance/").await;
    // The role allows redmesh's prefix only.
    let e = store.put("/other/x", "1".into(), None).await.unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");

    // A wrong password fails at once, naming the user.
    let wrong = EtcdOptions {
        user: Some((USER.into(), "guess".into())),
        ..opts.clone()
    };
    let e = connect(&etcd, &wrong).await.unwrap_err().to_string();
    assert!(e.contains("refused user \"redmesh\""), "{e}");
    assert!(!e.contains("guess"), "the password is not shown: {e}");
    // No login: etcd takes the client certificate's name as the user,
    // which has no role here.
    let anonymous = EtcdOptions {
        user: None,
        ..opts.clone()
    };
    let e = read_refused(&etcd, &anonymous).await;
    assert!(e.contains("permission denied"), "{e}");
    // Without a certificate either, the refusal says to log in.
    let plain_auth = Etcd::start();
    plain_auth.enable_auth(USER, PASSWORD, "/redmesh/");
    let e = read_refused(&plain_auth, &EtcdOptions::default()).await;
    assert!(e.contains("requires authentication"), "{e}");
    // Plaintext to a TLS etcd never works; an https endpoint without a CA
    // is refused up front.
    let plain = EtcdOptions {
        tls: None,
        ..opts.clone()
    };
    let http = etcd.endpoint.replace("https://", "http://");
    let store = EtcdStore::connect(&[http], &plain).await;
    match store {
        Ok(s) => assert!(s.get("/redmesh/x").await.is_err()),
        Err(e) => assert!(matches!(e, StoreError::Unavailable(_)), "{e}"),
    }
    let e = connect(&etcd, &plain).await.unwrap_err().to_string();
    assert!(e.contains("--etcd-ca"), "{e}");
    // A client certificate from another CA is refused by etcd.
    let other = Pki::new();
    let (cert, key) = other.leaf("stranger");
    let stranger = EtcdOptions {
        tls: Some(redmesh_store::EtcdTls {
            ca: pki.ca.clone(),
            identity: Some((cert, key)),
        }),
        ..opts.clone()
    };
    assert!(match connect(&etcd, &stranger).await {
        Ok(s) => s.get("/redmesh/x").await.is_err(),
        Err(_) => true,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_logs_in_once_etcd_comes_up() {
    let pki = Pki::new();
    let (mut etcd, opts) = secure_etcd(&pki);
    etcd.kill();
    let opts = EtcdOptions {
        request_timeout: Duration::from_millis(500),
        ..opts
    };
    // etcd is down: connecting succeeds, requests fail as unavailable.
    let store = connect(&etcd, &opts).await.expect("lazy connect");
    assert!(store.get("/redmesh/x").await.is_err());
    etcd.restart();
    eventually(
        "a write once etcd is up",
        Duration::from_secs(20),
        || async { store.put("/redmesh/x", "1".into(), None).await.ok() },
    )
    .await;
    let kv = store.get("/redmesh/x").await.unwrap().unwrap();
    assert_eq!(&kv.value[..], b"1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_serves_on_a_secure_etcd() {
    let pki = Pki::new();
    let (etcd, opts) = secure_etcd(&pki);
    let tls = opts.tls.clone().unwrap();
    let (cert, key) = tls.identity.unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let (ca, cert, key) = (path(&tls.ca), path(&cert), path(&key));
    let env = [
        ("REDMESH_ETCD_CA", ca.as_str()),
        ("REDMESH_ETCD_CERT", cert.as_str()),
        ("REDMESH_ETCD_KEY", key.as_str()),
        ("REDMESH_ETCD_USER", USER),
        ("REDMESH_ETCD_PASSWORD", PASSWORD),
    ];
    let broker = Service::start_env(
        "redmesh-broker",
        "--listen",
        &["--etcd".into(), etcd.endpoint.clone()],
        &env,
    );
    let channel = tonic::transport::Endpoint::from_shared(broker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = v1::broker_client::BrokerClient::new(channel);
    let spec = v1::ProxySpec {
        id: "p-1".into(),
        resp_address: "127.0.0.1:7001".into(),
        admin_address: "127.0.0.1:7101".into(),
        host: "host-a".into(),
        redis_nodes: vec!["127.0.0.1:7201".into(), "127.0.0.1:7202".into()],
        resp_tls_address: String::new(),
    };
    client
        .register_proxy(v1::RegisterProxyRequest { proxy: Some(spec) })
        .await
        .expect("register over a secure etcd");
    let listed = client
        .list_proxies(v1::ListProxiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.proxies.len(), 1);
    // The record is in etcd, under redmesh's prefix, as the user sees it.
    let store = connect(&etcd, &opts).await.unwrap();
    let listing = store.list("/redmesh/v1/").await.unwrap();
    assert!(
        listing.kvs.iter().any(|kv| kv.key.contains("p-1")),
        "{:?}",
        listing.kvs.iter().map(|kv| &kv.key).collect::<Vec<_>>()
    );
    // The password is not in the broker's log.
    assert!(!broker.log_text().contains(PASSWORD), "{}", broker.log());
}
