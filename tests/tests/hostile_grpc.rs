//! Absurd gRPC arguments to every service besides the broker (whose own are
//! in broker_api.rs): the migrator, the coordinator, a health-checker and a
//! proxy's admin API answer each with a precise error naming the field, and
//! keep serving.

use redmesh_api::v1;
use redmesh_e2e::System;
use tonic::Code;

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let e = r.expect_err("an absurd request must fail");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(needle),
        "{needle:?} not in {:?}",
        e.message()
    );
}

fn batch(start: u32, end: u32, max_keys: u32, task: &str) -> v1::MigrateBatchRequest {
    v1::MigrateBatchRequest {
        cluster: "c".into(),
        task_id: task.into(),
        range: Some(v1::SlotRange { start, end }),
        max_keys,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_arguments_get_precise_errors_from_every_service() {
    let sys = System::start(2);
    sys.register_all().await;
    sys.create_cluster("c", 4, v1::ClusterConfig::default())
        .await;
    let (_checkers, coordinator) = sys.start_control_plane().await;
    let migrator_svc = sys.start_migrator("m-1", &[]);
    let checker = sys.start_service("redmesh-health-checker", "hc-x", &[]);

    // A proxy's admin API: reversed, out-of-range and missing slot ranges,
    // absurd batch sizes, an empty task id, another cluster.
    let mut admin = sys.proxies[0].admin_client().await;
    assert_status(
        admin.migrate_batch(batch(10, 5, 100, "t")).await,
        Code::InvalidArgument,
        "range",
    );
    assert_status(
        admin.migrate_batch(batch(0, 16384, 100, "t")).await,
        Code::InvalidArgument,
        "range",
    );
    assert_status(
        admin
            .migrate_batch(v1::MigrateBatchRequest {
                range: None,
                ..batch(0, 1, 1, "t")
            })
            .await,
        Code::InvalidArgument,
        "range: missing",
    );
    assert_status(
        admin.migrate_batch(batch(0, 10, 0, "t")).await,
        Code::InvalidArgument,
        "max_keys",
    );
    assert_status(
        admin.migrate_batch(batch(0, 10, u32::MAX, "t")).await,
        Code::InvalidArgument,
        "max_keys",
    );
    assert_status(
        admin.migrate_batch(batch(0, 10, 10, "")).await,
        Code::InvalidArgument,
        "task_id",
    );
    assert_status(
        admin
            .migrate_batch(v1::MigrateBatchRequest {
                cluster: "other".into(),
                ..batch(0, 10, 10, "t")
            })
            .await,
        Code::FailedPrecondition,
        "not \"other\"",
    );

    // The migrator: unknown clusters and tasks, bad node counts, names.
    let mut migrator = v1::migrator_client::MigratorClient::connect(migrator_svc.url())
        .await
        .unwrap();
    let start = |cluster: &str, node_count| v1::StartMigrationRequest {
        cluster: cluster.into(),
        node_count,
        dry_run: true,
        rate: None,
    };
    assert_status(
        migrator.start_migration(start("c", 6)).await,
        Code::InvalidArgument,
        "node_count",
    );
    assert_status(
        migrator.start_migration(start("c", 0)).await,
        Code::InvalidArgument,
        "node_count",
    );
    assert_status(
        migrator.start_migration(start("c", 4_000_000)).await,
        Code::InvalidArgument,
        "node_count",
    );
    assert_status(
        migrator.start_migration(start("", 8)).await,
        Code::InvalidArgument,
        "cluster",
    );
    assert_status(
        migrator.start_migration(start(&"x".repeat(300), 8)).await,
        Code::InvalidArgument,
        "cluster",
    );
    assert_status(
        migrator.start_migration(start("nope", 8)).await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        migrator
            .get_migration(v1::GetMigrationRequest {
                cluster: "c".into(),
                task_id: "no-such-task".into(),
            })
            .await,
        Code::NotFound,
        "no-such-task",
    );
    assert_status(
        migrator
            .set_migration_rate(v1::SetMigrationRateRequest {
                cluster: "c".into(),
                task_id: "no-such-task".into(),
                rate: None,
            })
            .await,
        Code::NotFound,
        "no-such-task",
    );

    // The coordinator: manual failovers of what does not exist.
    let mut co = v1::coordinator_client::CoordinatorClient::connect(coordinator.url())
        .await
        .unwrap();
    let failover = |cluster: &str, proxy: &str, mode: i32| v1::FailoverRequest {
        cluster: cluster.into(),
        proxy_id: proxy.into(),
        mode,
        replace: false,
    };
    let graceful = v1::FailoverMode::Switchover as i32;
    assert_status(
        co.failover(failover("", "proxy-0", graceful)).await,
        Code::InvalidArgument,
        "cluster",
    );
    assert_status(
        co.failover(failover("c", "", graceful)).await,
        Code::InvalidArgument,
        "proxy",
    );
    assert_status(
        co.failover(failover("nope", "proxy-0", graceful)).await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        co.failover(failover("c", "proxy-9", graceful)).await,
        Code::FailedPrecondition,
        "proxy proxy-9 does not serve cluster c",
    );
    assert_status(
        co.failover(failover("c", "proxy-0", 99)).await,
        Code::InvalidArgument,
        "mode",
    );

    // A health-checker: a report on a proxy id that cannot exist.
    let mut hc = v1::health_checker_client::HealthCheckerClient::connect(checker.url())
        .await
        .unwrap();
    assert_status(
        hc.get_report(v1::GetReportRequest {
            proxy_id: "bad/id".into(),
        })
        .await,
        Code::InvalidArgument,
        "proxy_id",
    );

    // Every service still serves.
    admin.get_info(v1::GetInfoRequest::default()).await.unwrap();
    migrator
        .list_migrations(v1::ListMigrationsRequest {
            cluster: "c".into(),
        })
        .await
        .unwrap();
    co.get_status(v1::GetStatusRequest {}).await.unwrap();
    hc.get_report(v1::GetReportRequest::default())
        .await
        .unwrap();
}
