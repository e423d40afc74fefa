//! `redmeshctl migration …` and the scale plan/progress display: a live
//! progress bar (keys, MB, rate, ETA) fed by `Migrator.WatchMigration`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use redmesh_api::v1::{self, migrator_client::MigratorClient, MigrationPhase, MigrationState};
use tokio_stream::StreamExt;

use crate::{channel, print_json, table, MigrationCmd, TaskRef};

fn state_name(state: i32) -> &'static str {
    match MigrationState::try_from(state) {
        Ok(MigrationState::Pending) => "pending",
        Ok(MigrationState::Running) => "running",
        Ok(MigrationState::Paused) => "paused",
        Ok(MigrationState::Cancelling) => "cancelling",
        Ok(MigrationState::Cancelled) => "cancelled",
        Ok(MigrationState::Completed) => "completed",
        Ok(MigrationState::Failed) => "failed",
        _ => "unknown",
    }
}

fn phase_name(phase: i32) -> &'static str {
    match MigrationPhase::try_from(phase) {
        Ok(MigrationPhase::Queued) => "queued",
        Ok(MigrationPhase::Prepare) => "prepare",
        Ok(MigrationPhase::Move) => "move",
        Ok(MigrationPhase::Commit) => "commit",
        Ok(MigrationPhase::Done) => "done",
        _ => "unknown",
    }
}

fn range(m: &v1::PlannedMove) -> String {
    match m.range {
        Some(r) if r.start == r.end => r.start.to_string(),
        Some(r) => format!("{}-{}", r.start, r.end),
        None => "-".into(),
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Prints a scale plan.
pub fn print_plan(p: &v1::ScalePlan) {
    println!("plan: {} -> {} nodes", p.from_node_count, p.to_node_count);
    for c in &p.added_chunks {
        println!("  add chunk {}", c.proxy_ids.join("+"));
    }
    for c in &p.removed_chunks {
        println!(
            "  remove chunk {} (returned to the pool when empty)",
            c.proxy_ids.join("+")
        );
    }
    if p.moves.is_empty() {
        return;
    }
    let mut t = table(&["slots", "from", "to", "est. keys", "est. size"]);
    for m in &p.moves {
        t.add_row(vec![
            range(m),
            format!("shard {} ({})", m.from_shard_id, m.from_proxy_id),
            format!("shard {} ({})", m.to_shard_id, m.to_proxy_id),
            m.estimated_keys.to_string(),
            mb(m.estimated_bytes),
        ]);
    }
    println!("{t}");
}

fn print_task(p: &v1::MigrationProgress) {
    let Some(t) = &p.task else { return };
    println!(
        "task {} of cluster {}: {} ({} of ~{} keys, {} of ~{}){}",
        t.id,
        t.cluster,
        state_name(t.state),
        p.keys_moved,
        p.keys_total,
        mb(p.bytes_moved),
        mb(p.bytes_total),
        if t.error.is_empty() {
            String::new()
        } else {
            format!("; last error: {}", t.error)
        }
    );
    let mut tb = table(&["slots", "from", "to", "phase", "keys", "size", "pass"]);
    for r in &t.ranges {
        let Some(m) = &r.r#move else { continue };
        tb.add_row(vec![
            format!("{}{}", range(m), if r.reverse { " (back)" } else { "" }),
            format!("shard {}", m.from_shard_id),
            format!("shard {}", m.to_shard_id),
            phase_name(r.phase).to_owned(),
            r.keys_moved.to_string(),
            mb(r.bytes_moved),
            r.pass.to_string(),
        ]);
    }
    println!("{tb}");
}

/// Follows a task until it ends; an error if it did not complete.
async fn watch(
    client: &mut MigratorClient<redmesh_runtime::trace_context::TracedChannel>,
    json: bool,
    t: TaskRef,
) -> anyhow::Result<()> {
    let mut stream = client
        .watch_migration(v1::WatchMigrationRequest {
            cluster: t.cluster.clone(),
            task_id: t.task.clone(),
        })
        .await?
        .into_inner();
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} keys  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last: Option<v1::MigrationProgress> = None;
    while let Some(item) = stream.next().await {
        let p = item?.progress.unwrap_or_default();
        if json {
            println!("{}", serde_json::to_string(&p)?);
        }
        let state = p.task.as_ref().map_or(0, |t| t.state);
        bar.set_length(p.keys_total.max(p.keys_moved).max(1));
        bar.set_position(p.keys_moved);
        let eta = if p.eta_seconds >= 0.0 {
            format!("ETA {}s", p.eta_seconds.round())
        } else {
            "ETA ?".into()
        };
        bar.set_message(format!(
            "{}  {:.0} keys/s  {:.1} MB/s  {}  {}",
            mb(p.bytes_moved),
            p.keys_per_second,
            p.bytes_per_second / 1e6,
            eta,
            state_name(state)
        ));
        last = Some(p);
    }
    bar.finish_and_clear();
    let Some(p) = last else {
        anyhow::bail!("the migrator closed the stream without progress");
    };
    if !json {
        print_task(&p);
    }
    let t = p.task.unwrap_or_default();
    match MigrationState::try_from(t.state) {
        Ok(MigrationState::Completed) => Ok(()),
        Ok(MigrationState::Cancelled) => Err(tonic::Status::aborted(format!(
            "task {} was cancelled; every slot is back where it was",
            t.id
        ))
        .into()),
        Ok(MigrationState::Failed) => {
            Err(tonic::Status::internal(format!("task {} failed: {}", t.id, t.error)).into())
        }
        // The stream ended before the task did (server shutting down).
        _ => Err(tonic::Status::unavailable(format!(
            "lost the migrator while task {} was {}",
            t.id,
            state_name(t.state)
        ))
        .into()),
    }
}

/// Runs a `migration` subcommand.
pub async fn run(url: &str, json: bool, cmd: MigrationCmd) -> anyhow::Result<()> {
    let streaming = matches!(cmd, MigrationCmd::Watch(_));
    let mut client = MigratorClient::new(channel("migrator", url, streaming).await?);
    let task = match cmd {
        MigrationCmd::Watch(t) => return watch(&mut client, json, t).await,
        MigrationCmd::Get(t) => {
            let p = client
                .get_migration(v1::GetMigrationRequest {
                    cluster: t.cluster,
                    task_id: t.task,
                })
                .await?
                .into_inner()
                .progress
                .unwrap_or_default();
            if json {
                return print_json(&p);
            }
            print_task(&p);
            return Ok(());
        }
        MigrationCmd::List { cluster } => {
            let resp = client
                .list_migrations(v1::ListMigrationsRequest { cluster })
                .await?
                .into_inner();
            if json {
                return print_json(&resp);
            }
            let mut t = table(&["task", "state", "nodes", "ranges", "error"]);
            for task in &resp.tasks {
                let plan = task.plan.clone().unwrap_or_default();
                t.add_row(vec![
                    task.id.clone(),
                    state_name(task.state).to_owned(),
                    format!("{} -> {}", plan.from_node_count, plan.to_node_count),
                    task.ranges.len().to_string(),
                    task.error.clone(),
                ]);
            }
            println!("{t}");
            return Ok(());
        }
        MigrationCmd::Pause(t) => {
            client
                .pause_migration(v1::PauseMigrationRequest {
                    cluster: t.cluster,
                    task_id: t.task,
                })
                .await?
                .into_inner()
                .task
        }
        MigrationCmd::Resume(t) => {
            client
                .resume_migration(v1::ResumeMigrationRequest {
                    cluster: t.cluster,
                    task_id: t.task,
                })
                .await?
                .into_inner()
                .task
        }
        MigrationCmd::Cancel(t) => {
            client
                .cancel_migration(v1::CancelMigrationRequest {
                    cluster: t.cluster,
                    task_id: t.task,
                })
                .await?
                .into_inner()
                .task
        }
        MigrationCmd::Rate { task, rate } => {
            client
                .set_migration_rate(v1::SetMigrationRateRequest {
                    cluster: task.cluster,
                    task_id: task.task,
                    rate: Some(rate.to_v1()),
                })
                .await?
                .into_inner()
                .task
        }
    };
    let task = task.unwrap_or_default();
    if json {
        return print_json(&task);
    }
    println!("task {} is {}", task.id, state_name(task.state));
    Ok(())
}
