//! The API token (`--api-token-file`): every gRPC server refuses calls that
//! lack it but keeps health checks open; the proxies, the broker and the
//! migrator send it on their own calls, so a cluster is created, served and
//! scaled with every service requiring it; tokens rotate without restarts
//! and never reach a log.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use redis::AsyncCommands;
use redmesh_api::v1;
use redmesh_e2e::harness::{bin_path, eventually};
use redmesh_e2e::system::{grpc_serving, patient_cluster_client};
use redmesh_e2e::System;
use tonic::transport::Channel;
use tonic::Code;

const OLD: &str = "old-token-4f1c2a9e7b3d5061";
const NEW: &str = "new-token-8e2d4b6a1c3f5079";

async fn channel(url: String) -> Channel {
    Channel::from_shared(url).unwrap().connect().await.unwrap()
}

/// A channel whose calls carry `authorization: Bearer <token>`.
fn with_token(
    ch: Channel,
    token: &'static str,
) -> tonic::service::interceptor::InterceptedService<
    Channel,
    impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
> {
    tonic::service::interceptor::InterceptedService::new(ch, move |mut r: tonic::Request<()>| {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        Ok(r)
    })
}

fn assert_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needle: &str) {
    let e = r.expect_err("an unauthenticated call must fail");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains(needle), "{e:?}");
}

fn ctl(sys: &System, migrator: &str, tokens: &Path, args: &[&str]) -> Output {
    Command::new(bin_path("redmeshctl"))
        .args(["--broker", &sys.broker.url(), "--migrator", migrator])
        .arg("--api-token-file")
        .arg(tokens)
        .args(args)
        .output()
        .expect("redmeshctl runs")
}

fn assert_ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `redmeshctl --json cluster get c`, with the token.
fn get_cluster(sys: &System, migrator: &str, tokens: &Path) -> v1::GetClusterResponse {
    serde_json::from_str(&assert_ok(&ctl(
        sys,
        migrator,
        tokens,
        &["--json", "cluster", "get", "c"],
    )))
    .expect("cluster get --json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_requires_the_api_token_and_passes_it_on() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("# redmesh API tokens\n{OLD}\n")).unwrap();
    let old_file = dir.path().join("old");
    std::fs::write(&old_file, format!("{OLD}\n")).unwrap();
    let new_file = dir.path().join("new");
    std::fs::write(&new_file, format!("{NEW}\n")).unwrap();
    let tokens_env = tokens.to_str().unwrap().to_owned();
    let sys = System::start_env(4, &[("REDMESH_API_TOKEN_FILE", &tokens_env)]);
    // The harness's own clients (waiting for the cluster) need it as well.
    redmesh_runtime::ApiTokenArgs {
        file: Some(tokens.clone()),
    }
    .install(true)
    .unwrap();
    let migrator = sys.start_migrator("m-1", &[]);
    let migrator_url = migrator.url();

    // No token, or a wrong one: refused, naming what is missing. Health
    // checks stay open (the harness waited on them to start every service).
    let broker = channel(sys.broker.url()).await;
    assert_refused(
        v1::broker_client::BrokerClient::new(broker.clone())
            .list_proxies(v1::ListProxiesRequest::default())
            .await,
        "authorization: Bearer",
    );
    assert_refused(
        v1::broker_client::BrokerClient::new(with_token(broker.clone(), NEW))
            .list_proxies(v1::ListProxiesRequest::default())
            .await,
        "invalid API token",
    );
    assert_refused(
        v1::migrator_client::MigratorClient::new(channel(migrator_url.clone()).await)
            .list_migrations(v1::ListMigrationsRequest::default())
            .await,
        "authorization: Bearer",
    );
    let admin = format!("http://{}", sys.proxies[0].admin);
    assert_refused(
        v1::proxy_admin_client::ProxyAdminClient::new(channel(admin.clone()).await)
            .get_info(v1::GetInfoRequest::default())
            .await,
        "authorization: Bearer",
    );
    assert!(grpc_serving(&admin) && grpc_serving(&migrator_url));
    let refused = ctl(
        &sys,
        &migrator_url,
        Path::new("/dev/null"),
        &["proxy", "list"],
    );
    assert_eq!(refused.status.code(), Some(2), "{refused:?}"); // an empty token file
    let out = Command::new(bin_path("redmeshctl"))
        .args(["--broker", &sys.broker.url(), "proxy", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("UNAUTHENTICATED: missing API token"),
        "{stderr}"
    );

    // With the token, through redmeshctl: register, create, serve, scale.
    // Proxies only learn their cluster from the broker, and the migrator
    // only moves slots through the proxies' admin API, so this works only if
    // every service sends the token on its own calls.
    for p in &sys.proxies {
        let redis = format!("{},{}", p.redis[0].addr, p.redis[1].addr);
        assert_ok(&ctl(
            &sys,
            &migrator_url,
            &tokens,
            &[
                "proxy", "register", "--id", &p.id, "--resp", &p.resp, "--admin", &p.admin,
                "--host", &p.host, "--redis", &redis,
            ],
        ));
    }
    assert_ok(&ctl(
        &sys,
        &migrator_url,
        &tokens,
        &["cluster", "create", "c", "--nodes", "4"],
    ));
    let got = get_cluster(&sys, &migrator_url, &tokens);
    let cluster = got.cluster.expect("cluster");
    sys.wait_cluster_ok(&cluster).await;
    let mut conn = patient_cluster_client(sys.members(&cluster).iter().map(|p| &p.resp))
        .get_async_connection()
        .await
        .unwrap();
    for i in 0..500 {
        conn.set::<_, _, ()>(format!("k{i}"), i).await.unwrap();
    }
    assert_ok(&ctl(
        &sys,
        &migrator_url,
        &tokens,
        &["cluster", "scale", "c", "8"],
    ));
    let got = get_cluster(&sys, &migrator_url, &tokens);
    assert_eq!(got.proxies.len(), 4, "{got:?}");
    for i in 0..500 {
        let v: i32 = conn.get(format!("k{i}")).await.unwrap();
        assert_eq!(v, i);
    }

    // Rotation without restarts: both tokens, then only the new one.
    std::fs::write(&tokens, format!("{NEW}\n{OLD}\n")).unwrap();
    eventually(
        "the new token is accepted",
        Duration::from_secs(10),
        || async {
            ctl(&sys, &migrator_url, &new_file, &["proxy", "list"])
                .status
                .success()
                .then_some(())
        },
    )
    .await;
    std::fs::write(&tokens, format!("{NEW}\n")).unwrap();
    eventually(
        "the old token is refused",
        Duration::from_secs(10),
        || async {
            (!ctl(&sys, &migrator_url, &old_file, &["proxy", "list"])
                .status
                .success())
            .then_some(())
        },
    )
    .await;
    // The services now send the new token to each other: the proxies still
    // follow the broker (a failed call would fence them) and serve writes.
    conn.set::<_, _, ()>("after-rotation", 1).await.unwrap();

    // Never in a log.
    let mut logs = vec![sys.broker.log_text(), migrator.log_text()];
    logs.extend(sys.proxies.iter().map(|p| p.log_text()));
    for log in logs {
        assert!(
            !log.contains(OLD) && !log.contains(NEW),
            "a token in a log:\n{log}"
        );
    }
}
