//! `aitbc-backup repo verify | gc | extend-locks`: checking and maintaining a repository.

use std::time::Duration;

use aitbc_backup_repository::{Repository, damaged, gc, immutable, verify};
use anyhow::bail;
use tokio_util::sync::CancellationToken;

use crate::output::{errln, outln};

pub(super) async fn run_verify(
    repo: &Repository,
    read_data: bool,
    json: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let report = verify::verify(repo, read_data, cancel).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "checked {} manifests, {} chunks{}",
            report.manifests,
            report.chunks,
            if read_data {
                format!(", read {}", report.chunks_read)
            } else {
                String::new()
            }
        )?;
        for problem in &report.problems {
            outln!(
                "{}: {} (used by {})",
                problem.object,
                problem.problem,
                problem.manifests.join(", ")
            )?;
        }
    }
    // Recovered, so not a failure; but someone with write access changed the repository.
    for object in &report.overwritten {
        errln!(
            "warning: {object}: its current version is missing or does not verify; an older \
             version that verifies is read instead (overwritten or deleted by someone with \
             write access?)"
        );
    }
    if !report.ok() {
        bail!("verify failed: {} problem(s)", report.problems.len());
    }
    Ok(())
}

pub(super) async fn run_extend_locks(
    repo: &Repository,
    json: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let marked = gc::mark(repo, false, cancel).await?;
    let report = immutable::extend_locks(repo, &marked, cancel).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        outln!(
            "{} kept object versions: {} extended, {} locked long enough already ({} requests){}",
            report.kept_versions,
            report.extended,
            report.already_locked,
            report.requests,
            if report.manifests_skipped > 0 {
                format!(
                    "; {} manifest(s) could not be read and were skipped (see `repo verify`)",
                    report.manifests_skipped
                )
            } else {
                String::new()
            }
        )?;
    }
    Ok(())
}

pub(super) async fn run_gc(
    repo: &Repository,
    grace: Duration,
    dry_run: bool,
    json: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let report = gc::gc(repo, grace, dry_run, cancel).await.map_err(|err| {
        match damaged::gc_stopped_at(&err) {
            Some(message) => anyhow::anyhow!(message),
            None => err.into(),
        }
    })?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    outln!(
        "{} manifests, {} chunks: {} referenced, {} unreferenced ({} within the grace period); {} {} chunks, {} bytes",
        report.manifests,
        report.chunks,
        report.referenced,
        report.unreferenced,
        report.in_grace,
        if dry_run { "would delete" } else { "deleted" },
        report.deleted_chunks,
        report.deleted_bytes
    )?;
    if report.writers_in_flight > 0 {
        outln!(
            "{} backup(s) or WAL upload(s) in flight: nothing deleted; run gc again when they are done",
            report.writers_in_flight
        )?;
    }
    if report.stale_locks_removed > 0 {
        outln!(
            "removed {} stale lock(s) of backups or GC runs that died",
            report.stale_locks_removed
        )?;
    }
    if report.locked > 0 {
        outln!(
            "{} unreferenced chunk(s) still under Object Lock: left for a later run",
            report.locked
        )?;
    }
    if let Some(locks) = &report.locks {
        outln!(
            "object lock: {} kept versions, {} extended",
            locks.kept_versions,
            locks.extended
        )?;
    }
    if let Some(purged) = &report.purged {
        outln!(
            "removed {} version(s) of deleted objects; {} deleted object(s) still locked",
            purged.versions_removed,
            purged.locked
        )?;
    }
    Ok(())
}
