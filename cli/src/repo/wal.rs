//! `aitbc-backup repo wal ...`: archived PostgreSQL WAL and base backups.

use aitbc_backup_repository::{Repository, wal};
use anyhow::bail;
use tokio_util::sync::CancellationToken;

use crate::output::{outln, print_table};

#[derive(clap::Subcommand)]
pub(super) enum WalCommand {
    /// List base backups and a summary of the archived WAL.
    Ls,
    /// Check that the WAL from every base backup to the newest archived has no gap; exit code 1
    /// naming the missing segments otherwise.
    Verify,
    /// Keep the newest KEEP base backups and the WAL they need; delete older ones and older WAL.
    Retain {
        #[arg(long, default_value_t = 2)]
        keep: usize,
    },
}

pub(super) async fn run_wal(
    repo: &Repository,
    command: &WalCommand,
    json: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    match command {
        WalCommand::Ls => {
            let bases = wal::base_backups(repo, cancel).await?;
            let catalog = wal::Catalog::load(repo, cancel).await?;
            let summary = serde_json::json!({
                "base_backups": bases.iter().map(|b| serde_json::json!({
                    "id": b.manifest.id,
                    "created": b.manifest.created,
                    "timeline": b.timeline,
                    "start_lsn": wal::format_lsn(b.start_lsn),
                    "end_lsn": wal::format_lsn(b.end_lsn),
                    "bytes": b.manifest.raw_size,
                })).collect::<Vec<_>>(),
                "segments": catalog.segments.len(),
                "first_segment": catalog.segments.keys().next(),
                "last_segment": catalog.segments.keys().next_back(),
                "partial": catalog.partials.keys().next_back(),
                "timelines": catalog.histories.keys().collect::<Vec<_>>(),
            });
            if json {
                outln!("{}", serde_json::to_string_pretty(&summary)?)?;
            } else {
                let rows: Vec<Vec<String>> = bases
                    .iter()
                    .map(|b| {
                        vec![
                            b.manifest.id.clone(),
                            b.manifest.created.clone(),
                            b.timeline.to_string(),
                            wal::format_lsn(b.start_lsn),
                            wal::format_lsn(b.end_lsn),
                            b.manifest.raw_size.to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "BASE BACKUP",
                        "CREATED",
                        "TIMELINE",
                        "START",
                        "END",
                        "BYTES",
                    ],
                    &rows,
                )?;
                outln!(
                    "WAL: {} segments, {} .. {}, partial {}",
                    catalog.segments.len(),
                    summary["first_segment"].as_str().unwrap_or("-"),
                    summary["last_segment"].as_str().unwrap_or("-"),
                    summary["partial"].as_str().unwrap_or("-"),
                )?;
            }
        }
        WalCommand::Verify => {
            let catalog = wal::Catalog::load(repo, cancel).await?;
            let bases = wal::base_backups(repo, cancel).await?;
            let chains = wal::verify_chains(repo, &catalog, &bases, cancel).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&chains)?)?;
            } else {
                for chain in &chains {
                    match chain.problem.as_str() {
                        "" => outln!(
                            "base backup {}: WAL complete from {} to {} ({} files)",
                            chain.base_backup,
                            chain.first_segment,
                            chain.last_segment,
                            chain.files
                        )?,
                        problem => outln!("base backup {}: {problem}", chain.base_backup)?,
                    }
                }
            }
            if chains.is_empty() {
                bail!("no base backup in the repository: nothing to recover from");
            }
            let broken = chains.iter().filter(|c| !c.problem.is_empty()).count();
            if broken > 0 {
                bail!("verify failed: the WAL of {broken} base backup(s) is incomplete");
            }
        }
        WalCommand::Retain { keep } => {
            let report = wal::retain(repo, *keep, cancel).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                outln!(
                    "kept {} base backup(s), deleted {}; removed {} WAL segment(s) and {} partial upload(s) no kept backup needs",
                    report.kept_base_backups,
                    report.deleted_base_backups.len(),
                    report.pruned.segments,
                    report.pruned.partials
                )?;
            }
        }
    }
    Ok(())
}
