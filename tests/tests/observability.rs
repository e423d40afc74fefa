//! The alert rules and Grafana dashboards in `observability/`, checked
//! against a live system: a real Prometheus scrapes every service of a
//! running redmesh (with traffic, errors, a live migration and a failover
//! behind it), loads the alert rules, and answers every dashboard query. An
//! expression naming a metric no service exports, a rule Prometheus cannot
//! evaluate, or a dashboard panel without data fails the test.

use std::collections::BTreeSet;
use std::future::ready;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use redmesh_api::v1::{self, migrator_client::MigratorClient, MigrationState};
use redmesh_e2e::harness::{eventually, http_get, raw_exchange};
use redmesh_e2e::{free_port, Child, System};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_owned()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `redmesh_*` metric name in `expr`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("redmesh_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

/// (dashboard file, panel title, expression) of every dashboard query.
fn dashboard_queries() -> Vec<(String, String, String)> {
    let dir = repo().join("observability/grafana/dashboards");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "dashboards missing in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("dashboard");
        let dash: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let panels = dash["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{name} has no panels");
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{name}: panel {title} has no query");
            for t in targets {
                let expr = t["expr"].as_str().expect("expr");
                out.push((name.clone(), title.clone(), expr.to_owned()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alert_rules_query_what_the_services_export() {
    assert!(
        Command::new("prometheus").arg("--version").output().is_ok(),
        "the `prometheus` binary is needed (Debian package prometheus; ./tests/run.sh installs it)"
    );
    // A system with every kind of service, each exporting metrics.
    let mut sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            "obs",
            4,
            // Compressed, so the compression panel has data.
            v1::ClusterConfig {
                compression: v1::Compression::Lz4 as i32,
                compression_threshold: 64,
                ..Default::default()
            },
        )
        .await;
    let (checkers, co) = sys.start_control_plane().await;
    let migrator = sys.start_migrator("mg-1", &[]);

    // Prometheus scrapes them all every second and evaluates the rules.
    let dir = tempfile::tempdir().expect("tempdir");
    let targets = |addrs: Vec<&str>| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let jobs = [
        ("redmesh-broker", targets(vec![sys.broker.metrics.as_str()])),
        ("redmesh-coordinator", targets(vec![co.metrics.as_str()])),
        (
            "redmesh-health-checker",
            targets(checkers.iter().map(|c| c.metrics.as_str()).collect()),
        ),
        ("redmesh-migrator", targets(vec![migrator.metrics.as_str()])),
        (
            "redmesh-proxy",
            targets(sys.proxies.iter().map(|p| p.metrics.as_str()).collect()),
        ),
    ];
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
        repo()
            .join("observability/prometheus/alerts.yml")
            .display()
    );
    for (job, t) in &jobs {
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [{t}]\n"
        ));
    }
    std::fs::write(dir.path().join("prometheus.yml"), config).expect("config");
    let web = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        dir.path().join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.path().join("data").display()
    ))
    .arg(format!("--web.listen-address={web}"));
    let mut prom = Child::spawn("prometheus", cmd, &dir.path().join("prometheus.log"));

    // Traffic with successes, a redirection and errors, on every proxy.
    let big = format!("SET obs-big {}\r\n", "x".repeat(1000));
    for p in &sys.proxies {
        for req in [
            &b"SET obs-key value\r\nGET obs-key\r\n"[..],
            big.as_bytes(),
            b"NOSUCHCOMMAND\r\n",
            b"MGET {a}x {b}y\r\n",
        ] {
            raw_exchange(&p.resp, req).expect("proxy answers");
        }
    }

    // A migration: the cluster scales out onto the two free proxies, first
    // throttled to a crawl so that its source proxy answers ASK (a key
    // already gone) and TRYAGAIN (keys split between source and
    // destination) meanwhile, then at full speed to the end. It gives the
    // migrations dashboard moved keys and bytes, batches, an ETA and
    // redirects; without it most of its panels have no data.
    const KEYS: usize = 1000;
    let key = |i: usize| format!("{{obs-{i}}}:v");
    let plain =
        redis::Client::open(format!("redis://{}", sys.members(&cluster)[0].plain)).expect("url");
    let mut conn = plain
        .get_multiplexed_async_connection()
        .await
        .expect("plain listener");
    let mut mset = redis::cmd("MSET");
    for i in 0..KEYS {
        mset.arg(key(i)).arg(i);
    }
    let () = mset.query_async(&mut conn).await.expect("MSET");
    let task = sys
        .broker()
        .await
        .scale_cluster(v1::ScaleClusterRequest {
            name: "obs".into(),
            node_count: 8,
            dry_run: false,
            rate: Some(v1::MigrationRate {
                keys_per_second: 20,
                bytes_per_second: 0,
            }),
        })
        .await
        .expect("scale obs to 8 nodes")
        .into_inner()
        .task_id;
    let redirected = || async {
        let c = sys
            .broker()
            .await
            .get_cluster(v1::GetClusterRequest { name: "obs".into() })
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .cluster
            .ok_or("no cluster in the reply")?;
        let range = c
            .slots
            .iter()
            .find(|a| a.migration.is_some())
            .and_then(|a| a.range)
            .ok_or("no slot range migrating yet")?;
        let moving: Vec<usize> = (0..KEYS)
            .filter(|&i| {
                let slot = u32::from(redmesh_model::key_slot(key(i).as_bytes()));
                range.start <= slot && slot <= range.end
            })
            .take(50)
            .collect();
        let first = *moving.first().ok_or("no preloaded key in the range")?;
        // The source owns the range until it commits.
        let (source, _) = sys.key_master(&c, key(first).as_bytes());
        // A key nobody has is the destination's; a key still here with one
        // nobody has is a split pair (the move is too slow to take them all).
        let mut req = format!("GET {{obs-{first}}}:absent\r\n");
        for i in moving {
            req.push_str(&format!("MGET {} {{obs-{i}}}:absent\r\n", key(i)));
        }
        let reply = raw_exchange(&source.resp, req.as_bytes()).map_err(|e| e.to_string())?;
        let reply = String::from_utf8_lossy(&reply);
        if reply.contains("-ASK ") && reply.contains("-TRYAGAIN ") {
            Ok(())
        } else {
            Err(format!("{} answered {reply:?}", source.id))
        }
    };
    eventually(
        "ASK and TRYAGAIN from a source proxy mid-migration",
        Duration::from_secs(60),
        redirected,
    )
    .await;
    let mut migrations = MigratorClient::connect(migrator.url())
        .await
        .expect("migrator");
    migrations
        .set_migration_rate(v1::SetMigrationRateRequest {
            cluster: "obs".into(),
            task_id: task.clone(),
            rate: Some(v1::MigrationRate::default()),
        })
        .await
        .expect("lift the throttle");
    let done = eventually("obs scaled out", Duration::from_secs(60), || {
        let (mut m, task) = (migrations.clone(), task.clone());
        async move {
            let p = m
                .get_migration(v1::GetMigrationRequest {
                    cluster: "obs".into(),
                    task_id: task,
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .progress
                .ok_or("no progress in the reply")?;
            match p.task.as_ref().map(|t| t.state) {
                Some(s) if s == MigrationState::Completed as i32 => Ok(p),
                _ => Err(format!("{p:?}")),
            }
        }
    })
    .await;
    assert!(done.keys_moved > 0, "nothing moved: {done:?}");

    // A failover: the coordinator promotes the partner of a killed proxy.
    // The victim is one that joined in the scale-out, so the sources of the
    // migration (whose series the migrations dashboard shows) stay up.
    let grown = sys
        .broker()
        .await
        .get_cluster(v1::GetClusterRequest { name: "obs".into() })
        .await
        .expect("get obs")
        .into_inner()
        .cluster
        .expect("cluster in the reply");
    let victim = grown
        .chunks
        .iter()
        .find(|c| !cluster.chunks.contains(c))
        .expect("a chunk joined")
        .proxy_ids[0]
        .clone();
    sys.proxy_mut(&victim).child.as_mut().unwrap().kill();
    // The failover histogram appears with the first promotion.
    let failed_over = || -> Result<(), String> {
        let text = http_get(&co.metrics, "/metrics")?;
        if text.contains("redmesh_coordinator_failover_duration_seconds_count") {
            Ok(())
        } else {
            Err(co.log())
        }
    };
    eventually(
        &format!("a failover of {victim}"),
        Duration::from_secs(30),
        || ready(failed_over()),
    )
    .await;
    // And traffic after it, on the proxies that survive (a series only
    // the victim exported may never have been scraped).
    for p in sys.proxies.iter().filter(|p| p.id != victim) {
        for req in [&b"GET obs-key\r\n"[..], big.as_bytes()] {
            raw_exchange(&p.resp, req).expect("proxy answers");
        }
    }

    let query = |expr: &str| -> Result<serde_json::Value, String> {
        let body = http_get(
            &web,
            &format!("/api/v1/query?query={}", percent_encode(expr)),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        Ok(v["data"]["result"].clone())
    };
    // Wait until every live target has been scraped a few times.
    let number = |expr: &str| -> Result<f64, String> {
        query(expr)?[0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("no value for {expr}"))
    };
    let mut scraped = || -> Result<(), String> {
        if prom.exited() {
            panic!("prometheus exited:\n{}", prom.log_tail());
        }
        let scrapes = number("min(count_over_time(up{job=~\"redmesh-.*\"}[1m]))")?;
        let up = number("count(up{job=~\"redmesh-.*\"} == 1)")?;
        // 1 broker + 1 coordinator + 3 checkers + 1 migrator + 3 live proxies.
        if scrapes >= 4.0 && up >= 9.0 {
            Ok(())
        } else {
            Err(format!("{up} up, {scrapes} scrapes"))
        }
    };
    eventually(
        "Prometheus scraping every service",
        Duration::from_secs(60),
        || ready(scraped()),
    )
    .await;

    // Every metric the rules and dashboards name is exported.
    let names: serde_json::Value = serde_json::from_str(
        &http_get(&web, "/api/v1/label/__name__/values").expect("metric names"),
    )
    .expect("json");
    let exported: BTreeSet<String> = names["data"]
        .as_array()
        .expect("names")
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    let rules: serde_json::Value =
        serde_json::from_str(&http_get(&web, "/api/v1/rules").expect("rules")).expect("json");
    let rules: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .collect();
    assert!(rules.len() >= 10, "alert rules not loaded: {rules:?}");
    let queries = dashboard_queries();
    let mut unknown = BTreeSet::new();
    let all = rules
        .iter()
        .map(|r| r["query"].as_str().expect("rule query").to_owned())
        .chain(queries.iter().map(|(_, _, e)| e.clone()));
    for expr in all {
        for name in metric_names(&expr) {
            if !exported.contains(&name) {
                unknown.insert(format!("{name} (in {expr})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "expressions name metrics no service exports:\n{}",
        unknown.into_iter().collect::<Vec<_>>().join("\n")
    );

    // Every rule evaluates without error.
    let rules_ok = || -> Result<(), String> {
        let body = http_get(&web, "/api/v1/rules")?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let bad: Vec<String> = v["data"]["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").iter())
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("\n"))
        }
    };
    eventually(
        "every alert rule evaluating",
        Duration::from_secs(20),
        || ready(rules_ok()),
    )
    .await;

    // Every dashboard query returns data from this system (an invalid
    // expression fails at once).
    for (file, title, expr) in &queries {
        let promql = expr.replace("$__rate_interval", "1m");
        let has_data = || match query(&promql) {
            Ok(r) if r.as_array().is_some_and(|a| !a.is_empty()) => Ok(()),
            Ok(_) => Err(format!("no data: {promql}")),
            Err(e) => panic!("{file}: panel {title:?}: {promql}: {e}"),
        };
        eventually(
            &format!("{file}: data for panel {title:?}"),
            Duration::from_secs(20),
            || ready(has_data()),
        )
        .await;
    }
    prom.kill();
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum(rate(redmesh_a_total{x=\"y\"}[1m])) / redmesh_b_seconds_bucket"),
        vec!["redmesh_a_total", "redmesh_b_seconds_bucket"]
    );
    assert!(metric_names("up == 0").is_empty());
}
