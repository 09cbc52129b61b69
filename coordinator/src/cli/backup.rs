//! `corralctl backup`: take, list, show, delete, download, schedule,
//! restore and verify backups.

use super::connection::Api;
use super::operation::follow;
use super::output::{ago, parse_duration, print_json, table};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use comfy_table::Table;
use corral_proto::pb::{self};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub(super) enum BackupCmd {
    /// Take a backup now (from a healthy replica when there is one) and
    /// wait for it.
    Now {
        cluster: String,
        /// A target of the coordinator's [backup.targets] (default: the
        /// schedule's, else "local").
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Backups of a cluster (of every cluster, deleted ones' kept backups
    /// included, without one), oldest first.
    List { cluster: Option<String> },
    /// One backup in full.
    Show { cluster: String, id: String },
    /// Delete a backup's stored objects and its record.
    Delete {
        cluster: String,
        id: String,
        /// Repeat the backup's id.
        #[arg(long)]
        confirm: Option<String>,
    },
    /// Save a backup in the engine's own format (PostgreSQL: a tar of the
    /// data directory; MariaDB: xbstream; Redis: an RDB file), decrypted
    /// and checked on the way; with --raw, the stored encrypted object.
    Download {
        cluster: String,
        id: String,
        /// The file to write (default: ID.tar / ID.xbstream / ID.rdb, or
        /// ID.cbk with --raw); "-" for standard output.
        file: Option<PathBuf>,
        #[arg(long)]
        raw: bool,
    },
    /// Scheduled backups: when, how many or how long to keep, and where.
    /// PostgreSQL clusters with a schedule also archive their WAL to the
    /// target, for point-in-time restores.
    Schedule {
        cluster: String,
        /// Five-field cron in UTC ("30 2 * * *": 02:30 daily), or six with
        /// seconds first. Without --cron: show the schedule.
        #[arg(long)]
        cron: Option<String>,
        /// Keep this many scheduled backups (e.g. 7) or this long (7d, 36h).
        #[arg(long, value_parser = parse_retain)]
        retain: Option<Retain>,
        #[arg(long)]
        target: Option<String>,
        /// Remove the schedule (no more scheduled backups).
        #[arg(long, conflicts_with_all = ["cron", "retain", "target"])]
        off: bool,
    },
    /// Restore a backup: into a new cluster (safest: --into-new-cluster NAME
    /// --nodes ...), optionally to a point in time (PostgreSQL).
    Restore {
        cluster: String,
        id: String,
        /// A UTC time to recover to (RFC 3339, e.g. 2026-11-26T05:00:00.250Z),
        /// between the backup's end and the last archived WAL.
        #[arg(long, value_parser = parse_time)]
        to_time: Option<i64>,
        /// In place: repeat the cluster's name.
        #[arg(long)]
        confirm: Option<String>,
        #[arg(long)]
        into_new_cluster: Option<String>,
        /// The new cluster's nodes (the first is its primary).
        #[arg(long = "nodes", value_delimiter = ',')]
        nodes: Vec<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Read a backup back through the key and restore it into a scratch
    /// directory on a node, checking what the engine finds there; the
    /// running cluster is not touched.
    Verify {
        cluster: String,
        id: String,
        #[arg(long)]
        no_wait: bool,
    },
}

/// `--retain`: a count or an age.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Retain {
    Count(u32),
    Age(Duration),
}

pub(super) fn parse_retain(s: &str) -> Result<Retain, String> {
    if let Ok(n) = s.parse::<u32>() {
        if n == 0 {
            return Err(
                "--retain 0 would keep nothing: give a count of 1 or more, or an age".into(),
            );
        }
        return Ok(Retain::Count(n));
    }
    parse_duration(s)
        .map(Retain::Age)
        .map_err(|e| format!("{e}; or a count of backups, e.g. 7"))
}

pub(super) fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
                .map(|t| t.and_utc().timestamp_millis())
        })
        .map_err(|_| {
            format!(
                "invalid time {s:?}: use RFC 3339 in UTC, e.g. 2026-11-26T05:00:00Z or \
                 2026-11-26T05:00:00.250Z"
            )
        })
}

pub(super) fn rfc3339(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

pub(super) fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub(super) fn backups_table(backups: &[pb::Backup]) -> Table {
    let mut t = table(&[
        "ID",
        "CLUSTER",
        "KIND",
        "STATE",
        "TARGET",
        "FROM",
        "TAKEN (UTC)",
        "TOOK",
        "DATA",
        "STORED",
        "POSITION",
        "EXPIRES",
        "VERIFIED",
    ]);
    for b in backups {
        let state = match (b.state.as_str(), &b.progress) {
            ("running", Some(p)) if p.done_bytes > 0 => format!("running ({})", size(p.done_bytes)),
            ("failed", _) => format!("failed: {}", b.reason),
            (s, _) => s.to_string(),
        };
        t.add_row(vec![
            b.id.clone(),
            b.cluster.clone(),
            b.kind.clone(),
            state,
            b.target.clone(),
            if b.node.is_empty() {
                "-".into()
            } else {
                format!("{} ({})", b.node, b.role)
            },
            rfc3339(b.started_at_ms),
            if b.finished_at_ms > 0 && b.state == "succeeded" {
                format!(
                    "{:.1}s",
                    (b.finished_at_ms - b.started_at_ms) as f64 / 1000.0
                )
            } else {
                "-".into()
            },
            size(b.plain_bytes),
            size(b.stored_bytes),
            b.position.clone(),
            match (b.expires_at_ms, b.kind.as_str()) {
                (0, "scheduled") => "by retention".into(),
                (0, _) => "when deleted".into(),
                (at, _) => rfc3339(at),
            },
            match (b.verified_at_ms, b.verify_ok) {
                (0, _) => "never".into(),
                (at, true) => format!("ok {}", ago(at)),
                (at, false) => format!("FAILED {}", ago(at)),
            },
        ]);
    }
    t
}

pub(super) fn download_extension(engine: &str) -> &'static str {
    match engine {
        "postgres" => "tar",
        "mariadb" | "mysql" => "xbstream",
        _ => "rdb",
    }
}

pub(super) async fn run(api: &mut Api, cmd: BackupCmd, json: bool) -> Result<()> {
    match cmd {
        BackupCmd::Now {
            cluster,
            target,
            no_wait,
        } => {
            let op = api
                .backup_now(pb::BackupNowRequest {
                    cluster: cluster.clone(),
                    target: target.unwrap_or_default(),
                })
                .await?
                .into_inner();
            follow(
                api,
                op,
                no_wait,
                json,
                &format!("backing up cluster {cluster}"),
            )
            .await?;
        }
        BackupCmd::List { cluster } => {
            let r = api
                .list_backups(pb::ListBackupsRequest {
                    cluster: cluster.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                return print_json(&r);
            }
            if r.backups.is_empty() {
                println!(
                    "no backups{}; take one with `corralctl backup now CLUSTER`",
                    cluster
                        .map(|c| format!(" of cluster {c}"))
                        .unwrap_or_default()
                );
            } else {
                println!("{}", backups_table(&r.backups));
            }
        }
        BackupCmd::Show { cluster, id } => {
            let b = backup_of(api, &cluster, &id).await?;
            if json {
                return print_json(&b);
            }
            print_backup(&b);
        }
        BackupCmd::Delete {
            cluster,
            id,
            confirm,
        } => {
            backup_of(api, &cluster, &id).await?;
            let b = api
                .delete_backup(pb::DeleteBackupRequest {
                    id: id.clone(),
                    confirm: confirm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                return print_json(&b);
            }
            println!("backup {id} deleted");
        }
        BackupCmd::Download {
            cluster,
            id,
            file,
            raw,
        } => save(api, &cluster, &id, file, raw).await?,
        BackupCmd::Schedule {
            cluster,
            cron,
            retain,
            target,
            off,
        } => schedule(api, cluster, cron, retain, target, off, json).await?,
        BackupCmd::Restore {
            cluster,
            id,
            to_time,
            confirm,
            into_new_cluster,
            nodes,
            no_wait,
        } => {
            let target = RestoreTarget {
                to_time,
                confirm,
                into_new_cluster,
                nodes,
            };
            restore(api, cluster, id, target, no_wait, json).await?
        }
        BackupCmd::Verify {
            cluster,
            id,
            no_wait,
        } => {
            backup_of(api, &cluster, &id).await?;
            let op = api
                .verify_backup(pb::VerifyBackupOperatorRequest { id: id.clone() })
                .await?
                .into_inner();
            follow(api, op, no_wait, json, &format!("verifying backup {id}")).await?;
        }
    }
    Ok(())
}

/// Backup `id`, refused unless it is of `cluster` (the commands name both,
/// so a mistyped id never acts on another cluster's backup).
pub(super) async fn backup_of(api: &mut Api, cluster: &str, id: &str) -> Result<pb::Backup> {
    let b = api
        .get_backup(pb::GetBackupRequest { id: id.into() })
        .await?
        .into_inner();
    if b.cluster != cluster {
        bail!("backup {id} is of cluster {}, not {cluster}", b.cluster);
    }
    Ok(b)
}

/// `backup show`: one backup in full, one field a line.
pub(super) fn print_backup(b: &pb::Backup) {
    let rows = [
        ("id", b.id.clone()),
        ("cluster", b.cluster.clone()),
        ("kind", b.kind.clone()),
        ("state", b.state.clone()),
        ("reason", b.reason.clone()),
        ("target", b.target.clone()),
        ("taken from", format!("{} ({})", b.node, b.role)),
        ("engine", format!("{} {}", b.engine, b.version)),
        ("started", rfc3339(b.started_at_ms)),
        ("finished", rfc3339(b.finished_at_ms)),
        (
            "consistent at",
            format!("{} ({})", b.position, rfc3339(b.position_time_ms)),
        ),
        ("data", size(b.plain_bytes)),
        ("stored", size(b.stored_bytes)),
        ("sha256", b.sha256.clone()),
        ("key id", b.key_id.clone()),
        (
            "expires",
            match (b.expires_at_ms, b.kind.as_str()) {
                (0, "scheduled") => "when the schedule's retention removes it".into(),
                (0, _) => "never: kept until deleted".into(),
                (at, _) => rfc3339(at),
            },
        ),
        ("operation", b.operation.clone()),
        (
            "verified",
            match b.verified_at_ms {
                0 => "never (`corralctl backup verify`)".into(),
                at => format!(
                    "{} at {}: {}",
                    if b.verify_ok { "ok" } else { "FAILED" },
                    rfc3339(at),
                    b.verify_summary
                ),
            },
        ),
    ];
    for (k, v) in rows {
        if !v.is_empty() {
            println!("{k:>14}: {v}");
        }
    }
}

/// `backup schedule`: set it (`--cron` with `--retain`), remove it
/// (`--off`) or, with neither, show it.
pub(super) async fn schedule(
    api: &mut Api,
    cluster: String,
    cron: Option<String>,
    retain: Option<Retain>,
    target: Option<String>,
    off: bool,
    json: bool,
) -> Result<()> {
    let s = if off || cron.is_some() {
        if !off && retain.is_none() {
            bail!(
                "--cron needs --retain: how many backups (e.g. 7) or how long (e.g. 14d) to keep"
            );
        }
        let (retain_count, retain_ms) = match retain {
            Some(Retain::Count(n)) => (n, 0),
            Some(Retain::Age(d)) => (0, d.as_millis() as i64),
            None => (0, 0),
        };
        api.set_backup_schedule(pb::SetBackupScheduleRequest {
            cluster: cluster.clone(),
            cron: if off {
                String::new()
            } else {
                cron.unwrap_or_default()
            },
            retain_count,
            retain_ms,
            target: target.unwrap_or_default(),
        })
        .await?
        .into_inner()
    } else {
        if retain.is_some() || target.is_some() {
            bail!("give --cron with --retain and --target (or --off to remove the schedule)");
        }
        api.get_backup_schedule(pb::GetBackupScheduleRequest {
            cluster: cluster.clone(),
        })
        .await?
        .into_inner()
    };
    if json {
        return print_json(&s);
    }
    print_schedule(&cluster, &s);
    Ok(())
}

pub(super) fn print_schedule(cluster: &str, s: &pb::BackupSchedule) {
    if s.cron.is_empty() {
        println!("cluster {cluster} has no backup schedule");
    } else {
        println!(
            "cluster {cluster}: backups at {:?} (UTC) to target {}",
            s.cron, s.target
        );
        let keep = match (s.retain_count, s.retain_ms) {
            (0, 0) => "every backup".to_string(),
            (n, 0) => format!("the newest {n}"),
            (0, ms) => format!(
                "those younger than {}",
                crate::backups::fmt_duration(Duration::from_millis(ms as u64))
            ),
            (n, ms) => format!(
                "the newest {n}, younger than {}",
                crate::backups::fmt_duration(Duration::from_millis(ms as u64))
            ),
        };
        println!("  keeps {keep} (the newest is never removed)");
        println!("  next run: {}", rfc3339(s.next_run_ms));
        if s.wal_archiving {
            println!(
                "  WAL is archived to {} for point-in-time restores",
                s.target
            );
        }
    }
}

/// Where `backup restore` restores to, and to which point.
pub(super) struct RestoreTarget {
    to_time: Option<i64>,
    confirm: Option<String>,
    into_new_cluster: Option<String>,
    nodes: Vec<String>,
}

/// `backup restore`: into a new cluster, or in place once confirmed.
pub(super) async fn restore(
    api: &mut Api,
    cluster: String,
    id: String,
    target: RestoreTarget,
    no_wait: bool,
    json: bool,
) -> Result<()> {
    let RestoreTarget {
        to_time,
        confirm,
        into_new_cluster,
        nodes,
    } = target;
    if into_new_cluster.is_none() && confirm.is_none() {
        bail!(
            "say where to restore: --into-new-cluster NAME --nodes N1,N2 (safest: the \
             cluster keeps running), or in place with --confirm {cluster}"
        );
    }
    let what = match &into_new_cluster {
        Some(n) => format!("restoring backup {id} into new cluster {n}"),
        None => format!("restoring backup {id} into cluster {cluster}"),
    };
    let op = api
        .restore_backup(pb::RestoreBackupRequest {
            cluster,
            id,
            to_time_ms: to_time.unwrap_or(0),
            confirm: confirm.unwrap_or_default(),
            into_new_cluster: into_new_cluster.unwrap_or_default(),
            nodes,
        })
        .await?
        .into_inner();
    follow(api, op, no_wait, json, &what).await?;
    Ok(())
}

/// `backup download`: to `file`, or to a name after the backup's id and
/// format.
async fn save(
    api: &mut Api,
    cluster: &str,
    id: &str,
    file: Option<PathBuf>,
    raw: bool,
) -> Result<()> {
    let b = backup_of(api, cluster, id).await?;
    let path = file.unwrap_or_else(|| {
        PathBuf::from(format!(
            "{id}.{}",
            if raw {
                "cbk"
            } else {
                download_extension(&b.engine)
            }
        ))
    });
    download(api, id, raw, &path).await
}

/// Writes a downloaded backup to `path` (a temporary name renamed once
/// complete, so a failed download leaves no file that looks whole).
pub(super) async fn download(api: &mut Api, id: &str, raw: bool, path: &Path) -> Result<()> {
    use std::io::Write;
    let mut stream = api
        .download_backup(pb::DownloadBackupRequest { id: id.into(), raw })
        .await?
        .into_inner();
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        let written: std::io::Result<()> = async {
            while let Some(chunk) = stream.message().await.map_err(std::io::Error::other)? {
                out.write_all(&chunk.data)?;
            }
            out.flush()
        }
        .await;
        return match written {
            // The reader had enough (`| head`): not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.with_context(|| format!("downloading backup {id}")),
        };
    }
    if path.exists() {
        bail!(
            "{} exists; name another file after the backup's id",
            path.display()
        );
    }
    let part = path.with_extension("part");
    let mut file =
        std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let mut bytes = 0u64;
    let outcome: Result<()> = async {
        while let Some(chunk) = stream.message().await? {
            file.write_all(&chunk.data)?;
            bytes += chunk.data.len() as u64;
        }
        file.sync_all()?;
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        let _ = std::fs::remove_file(&part);
        return Err(e.context(format!("downloading backup {id}; nothing was saved")));
    }
    std::fs::rename(&part, path)?;
    eprintln!("saved backup {id} to {} ({})", path.display(), size(bytes));
    Ok(())
}
