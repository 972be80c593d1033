//! Restore of PostgreSQL databases: each database's dump is spooled to the scratch directory
//! (pg_restore needs a seekable file to run `--jobs` in parallel), restored into a new database
//! under a temporary name, its row counts checked against the manifest, and only then swapped
//! in under the target name. A failure at any step before the swap drops the temporary database
//! and leaves the target as it was.

mod load;
mod swap;
use load::{Dump, Spool, pg_restore, spool};
use swap::{drop_leftovers, refuse_if_in_use, swap, temp_name};

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::manifest::{ComponentManifest, ConsistencyPoint, PgDatabase};
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::backup::{GLOBALS, dump_path};
use super::config::PostgresSettings;
use super::server::{Server, conninfo, describe, ident, literal};

/// Temporary databases are named `<target>_aitbc_restore_<hex>`; leftovers of an interrupted
/// restore are dropped by the next restore of the same target.
const TEMP_MARK: &str = "_aitbc_restore_";
/// The replaced database, kept until the new one is in place.
const PREVIOUS_MARK: &str = "_aitbc_previous_";

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Another server (libpq URL) instead of the configured one.
    pub server_url: Option<String>,
    /// Only this database of the backup (default: all of them).
    pub database: Option<String>,
    /// Restore under this name (needs `database` when the backup holds several).
    pub rename: Option<String>,
    /// Replace a database that has other sessions, terminating them.
    pub force: bool,
    /// Apply the backup's roles and tablespaces first (rebuilding an empty server).
    pub globals: bool,
    /// A restore test: each database under a temporary name, verified, then dropped.
    pub trial: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoredDatabase {
    pub name: String,
    pub from: String,
    pub replaced: bool,
    pub tables: usize,
    pub rows: u64,
    pub seconds: f64,
    pub phases: Phases,
}

/// Where a database's restore spent its time, seconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Phases {
    pub fetch: f64,
    pub pg_restore: f64,
    pub verify: f64,
    pub swap: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub manifest: String,
    pub server: String,
    pub globals: bool,
    pub databases: Vec<RestoredDatabase>,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

pub async fn restore(
    repo: &Repository,
    manifest: &ComponentManifest,
    settings: &PostgresSettings,
    options: &RestoreOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreReport> {
    let started = Instant::now();
    let Some(ConsistencyPoint::Postgres {
        databases,
        server_version,
        ..
    }) = &manifest.consistency
    else {
        bail!("backup {} is not a PostgreSQL backup", manifest.id);
    };
    let selected = select(databases, options)?;
    let mut server = Server::new(settings, options.server_url.as_deref())?;
    // A database cannot be renamed while we are connected to it: when the maintenance database
    // itself is restored (rebuilding a whole server), create and swap from template1.
    let replaces_maintenance = selected.iter().any(|(_, t)| *t == server.maintenance_db);
    let admin_db = if replaces_maintenance {
        "template1".to_owned()
    } else {
        server.maintenance_db.clone()
    };
    let admin = server.connect(&admin_db).await?;
    let info = server.info(&admin).await?;
    server.resolve_tools(info.major)?;
    let mut warnings = Vec::new();
    if info.major < major_of(server_version) {
        warnings.push(format!(
            "restoring a PostgreSQL {server_version} backup into an older server ({})",
            info.version
        ));
    }
    // Refuse early (before any download) when a target is in use.
    if !options.force {
        for (_, target) in &selected {
            refuse_if_in_use(&server, &admin, target).await?;
        }
    }
    let mut scratch = Spool::new(&settings.scratch_dir);
    if options.globals {
        let path = scratch.path("globals.sql")?;
        spool(repo, manifest, GLOBALS, &path, progress.clone(), cancel)
            .await
            .context("fetch the globals")?;
        apply_globals(&server, &path, &mut warnings)?;
    }
    let mut restored = Vec::new();
    for (i, (db, target)) in selected.iter().enumerate() {
        let began = Instant::now();
        let dump = if settings.jobs > 1 {
            let path = scratch.path(&format!("{i}.dump"))?;
            spool(
                repo,
                manifest,
                &dump_path(&db.name),
                &path,
                progress.clone(),
                cancel,
            )
            .await
            .with_context(|| format!("fetch the dump of `{}`", db.name))?;
            let spooled = path.clone();
            match tokio::task::spawn_blocking(move || super::archive::fill_offsets(&spooled))
                .await?
            {
                Ok(filled) => tracing::debug!(database = %db.name, filled, "data offsets written"),
                Err(err) => {
                    tracing::info!(database = %db.name, error = %format!("{err:#}"), "dump left without data offsets; pg_restore scans for them")
                }
            }
            Dump::Spooled(path)
        } else {
            Dump::Streamed {
                repo,
                part: Box::new(aitbc_backup_repository::part(
                    manifest,
                    &dump_path(&db.name),
                )?),
                progress: progress.clone(),
            }
        };
        let mut phases = Phases {
            fetch: began.elapsed().as_secs_f64(),
            ..Phases::default()
        };
        let replaced = restore_one(
            &server,
            &admin,
            db,
            target,
            &dump,
            settings.jobs,
            options.force,
            &mut phases,
            cancel,
        )
        .await
        .with_context(|| {
            format!(
                "restore `{}` as `{target}` on {}",
                db.name,
                server.endpoint()
            )
        })?;
        if let Dump::Spooled(path) = &dump {
            let _ = std::fs::remove_file(path);
        }
        if options.trial {
            admin
                .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", ident(target)))
                .await
                .map_err(|e| {
                    anyhow::anyhow!("drop the trial database `{target}`: {}", describe(&e))
                })?;
        }
        restored.push(RestoredDatabase {
            name: target.clone(),
            from: db.name.clone(),
            replaced,
            tables: db.row_counts.len(),
            rows: db.row_counts.values().sum(),
            seconds: began.elapsed().as_secs_f64(),
            phases,
        });
    }
    Ok(RestoreReport {
        manifest: manifest.id.clone(),
        server: server.endpoint(),
        globals: options.globals,
        databases: restored,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

/// The databases to restore, each with its target name.
fn select<'a>(
    databases: &'a [PgDatabase],
    options: &RestoreOptions,
) -> anyhow::Result<Vec<(&'a PgDatabase, String)>> {
    let chosen: Vec<&PgDatabase> = match &options.database {
        Some(name) => vec![
            databases
                .iter()
                .find(|db| &db.name == name)
                .with_context(|| {
                    format!(
                        "the backup has no database `{name}` (it has: {})",
                        databases
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
        ],
        None => databases.iter().collect(),
    };
    if chosen.is_empty() {
        bail!("the backup holds no database");
    }
    if options.trial {
        let tag = format!("{:08x}", rand::random::<u32>());
        return Ok(chosen
            .into_iter()
            .map(|db| {
                let stem: String = db.name.chars().take(40).collect();
                (db, format!("{stem}_aitbc_trial_{tag}"))
            })
            .collect());
    }
    match &options.rename {
        Some(rename) if chosen.len() == 1 => Ok(vec![(chosen[0], rename.clone())]),
        Some(_) => bail!("--as needs --database: the backup holds several databases"),
        None => Ok(chosen.into_iter().map(|db| (db, db.name.clone())).collect()),
    }
}

fn major_of(version: &str) -> u32 {
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// Restores one database under a temporary name, checks it, swaps it in. Returns whether an
/// existing database was replaced.
#[allow(clippy::too_many_arguments)]
async fn restore_one(
    server: &Server,
    admin: &Client,
    db: &PgDatabase,
    target: &str,
    dump: &Dump<'_>,
    jobs: u32,
    force: bool,
    phases: &mut Phases,
    cancel: &CancellationToken,
) -> anyhow::Result<bool> {
    drop_leftovers(admin, target).await?;
    let temp = temp_name(target, TEMP_MARK);
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {} WITH TEMPLATE template0 OWNER {} ENCODING {} LC_COLLATE {} LC_CTYPE {}",
            ident(&temp),
            ident(&db.owner),
            literal(&db.encoding),
            literal(&db.collate),
            literal(&db.ctype)
        ))
        .await
        .map_err(|e| {
            let hint = if describe(&e).contains("role") {
                " (restore with --globals to create the backup's roles)"
            } else {
                ""
            };
            anyhow::anyhow!("create database {temp}: {}{hint}", describe(&e))
        })?;
    let result = async {
        let mut clock = Instant::now();
        let mut lap = || {
            std::mem::replace(&mut clock, Instant::now())
                .elapsed()
                .as_secs_f64()
        };
        pg_restore(server, &temp, dump, jobs, cancel).await?;
        phases.pg_restore = lap();
        check_counts(server, &temp, &db.row_counts).await?;
        phases.verify = lap();
        let replaced = swap(server, admin, &temp, target, force).await;
        phases.swap = lap();
        replaced
    }
    .await;
    if result.is_err() {
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                ident(&temp)
            ))
            .await;
    }
    result
}

/// Compares every table's rows with the counts taken at the cut. The rows `pg_restore` loaded
/// are read from the statistics (`n_tup_ins`: the new database saw nothing but the restore's
/// `COPY`, and triggers are created after the data); a table whose figure differs (statistics
/// off or not yet flushed) is counted with `count(*)`, which is exact but reads the whole table
/// and dirties every page it sets hint bits on.
async fn check_counts(
    server: &Server,
    database: &str,
    expected: &BTreeMap<String, u64>,
) -> anyhow::Result<()> {
    let client = server.connect(database).await?;
    let loaded: BTreeMap<String, i64> = client
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(relname), n_tup_ins \
             FROM pg_stat_user_tables",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default();
    let mut wrong = Vec::new();
    for (table, want) in expected {
        if loaded.get(table).is_some_and(|n| *n as u64 == *want) {
            continue;
        }
        let got = match client
            .query_one(&format!("SELECT count(*) FROM ONLY {table}"), &[])
            .await
        {
            Ok(row) => row.get::<_, i64>(0).to_string(),
            Err(err) => describe(&err),
        };
        if got != want.to_string() {
            wrong.push(format!("{table}: {got} rows, the backup counted {want}"));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "the restored data does not match the backup: {}",
            wrong.join("; ")
        );
    }
    Ok(())
}

/// Runs the backup's `pg_dumpall --globals-only` script. Objects that already exist (the
/// restoring role itself, roles of an earlier restore) are expected errors; others are warned.
fn apply_globals(
    server: &Server,
    script: &std::path::Path,
    warnings: &mut Vec<String>,
) -> anyhow::Result<()> {
    let output = server
        .tool("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=0"])
        .arg(format!("--dbname={}", conninfo(&server.maintenance_db)))
        .arg("-f")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .context("run psql for the globals")?;
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        if line.contains("ERROR") && !line.contains("already exists") {
            warnings.push(format!("globals: {line}"));
        }
    }
    if !output.status.success() {
        bail!(
            "applying the globals failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
