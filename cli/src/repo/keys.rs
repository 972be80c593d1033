//! `aitbc-backup repo keys ...`: the repository's keys and their audit log.

use std::path::PathBuf;

use aitbc_backup_repository::keys;
use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{RepoArgs, secret_from};
use crate::output::{errln, outln, print_table};

#[derive(clap::Subcommand)]
pub(super) enum KeysCommand {
    /// List active and revoked keys.
    List,
    /// Add a key (the new secret from --new-passphrase-file, --new-key-file or AITBC_CLI_NEW_PASSPHRASE).
    Add(NewSecret),
    /// Replace the key in use with a new one and revoke the old one.
    Rotate(NewSecret),
    /// Revoke a key by id (not the last one).
    Revoke { id: String },
    /// Show the key audit log.
    Audit,
    /// Upgrade a version 1 encrypted repository in place to the sealed scheme: new backups
    /// are sealed, version 1 backups stay readable until retention removes them, and every
    /// version 1 key keeps opening it (as key legacy-v1) until that key is revoked.
    Upgrade,
    /// Issue a credential of a sealed repository, printed on stdout (store it as a secret:
    /// AITBC_BACKUP_REPOSITORY__CREDENTIAL). `--writer COMPONENT`: an agent's, which writes
    /// that component's backups and reads none; `--metadata`: the coordinator's, which
    /// reads manifests and no data.
    Issue {
        #[arg(long, value_name = "COMPONENT", required_unless_present = "metadata")]
        writer: Option<String>,
        #[arg(long, conflicts_with = "writer")]
        metadata: bool,
    },
}

#[derive(clap::Args)]
pub(super) struct NewSecret {
    #[arg(long)]
    new_passphrase_file: Option<PathBuf>,
    #[arg(long)]
    new_key_file: Option<PathBuf>,
}

pub(super) async fn run_keys(
    args: &RepoArgs,
    command: &KeysCommand,
    json: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    // Key and audit objects of a locked repository are written locked like the rest.
    let storage =
        aitbc_backup_repository::repo::with_recorded_lock(args.storage().await?, cancel).await?;
    let current = || {
        args.secret()?
            .context("a passphrase or key file is needed for key operations")
    };
    let new_secret = |new: &NewSecret| {
        secret_from(
            &new.new_passphrase_file,
            &new.new_key_file,
            "AITBC_CLI_NEW_PASSPHRASE",
        )?
        .context(
            "the new key needs --new-passphrase-file, --new-key-file or AITBC_CLI_NEW_PASSPHRASE",
        )
    };
    match command {
        KeysCommand::List => {
            let keys = keys::list_keys(&storage, cancel).await?;
            if keys.is_empty() {
                // Every encrypted repository has at least one key.
                errln!("{} is not encrypted: it has no keys", storage.describe());
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&keys)?)?;
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            k.kind.to_owned(),
                            k.created.clone(),
                            k.revoked_at
                                .clone()
                                .map(|t| format!("revoked {t}"))
                                .unwrap_or("active".into()),
                        ]
                    })
                    .collect();
                print_table(&["ID", "KIND", "CREATED", "STATE"], &rows)?;
            }
        }
        KeysCommand::Add(new) => {
            let id = keys::add_key(&storage, &current()?, &new_secret(new)?, cancel).await?;
            outln!("added key {id}")?;
        }
        KeysCommand::Rotate(new) => {
            let id = keys::rotate_key(&storage, &current()?, &new_secret(new)?, cancel).await?;
            outln!("rotated: new key {id}; the previous key is revoked")?;
        }
        KeysCommand::Issue { writer, metadata } => {
            let what = match (writer, metadata) {
                (Some(component), _) => keys::Issue::Writer(component),
                (None, _) => keys::Issue::Coordinator,
            };
            let (credential, key_id) = keys::issue(&storage, &current()?, what, cancel).await?;
            if let Some(id) = key_id {
                errln!(
                    "issued the coordinator's credential (key {id}; `keys revoke {id}` ends it)"
                );
            } else if let Some(component) = writer {
                errln!("issued a writer credential for component {component}");
            }
            outln!("{}", credential.encode())?;
        }
        KeysCommand::Upgrade => {
            let id = keys::upgrade(&storage, &current()?, cancel).await?;
            outln!(
                "upgraded: sealed key {id} opens it with the same secret; issue credentials \
                 with `keys issue`, then revoke legacy-v1 once every version 1 key is replaced"
            )?;
        }
        KeysCommand::Revoke { id } => {
            keys::revoke_key(&storage, &current()?, id, cancel).await?;
            outln!("revoked key {id}")?;
        }
        KeysCommand::Audit => {
            let log = keys::audit_log(&storage, cancel).await?;
            if log.is_empty() {
                errln!(
                    "{} records no key operations (it is not encrypted)",
                    storage.describe()
                );
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&log)?)?;
            } else {
                let rows: Vec<Vec<String>> = log
                    .iter()
                    .map(|e| {
                        vec![
                            e.time.clone(),
                            e.action.clone(),
                            e.key_id.clone(),
                            e.by_key_id.clone().unwrap_or_default(),
                            e.host.clone(),
                            e.detail.clone(),
                        ]
                    })
                    .collect();
                print_table(&["TIME", "ACTION", "KEY", "BY", "HOST", "DETAIL"], &rows)?;
            }
        }
    }
    Ok(())
}
