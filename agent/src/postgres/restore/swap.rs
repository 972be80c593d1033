//! Restoring under a temporary name and swapping it in: the target is replaced only by a complete, checked database.

use anyhow::{Context, bail};
use tokio_postgres::Client;

use super::{PREVIOUS_MARK, TEMP_MARK};
use crate::postgres::server::{Server, Session, describe, ident};

pub(super) fn temp_name(target: &str, mark: &str) -> String {
    // PostgreSQL names are at most 63 bytes.
    let mut base: String = target.to_owned();
    while base.len() > 63 - mark.len() - 8 {
        base.pop();
    }
    format!("{base}{mark}{:08x}", rand::random::<u32>())
}

pub(super) async fn drop_leftovers(admin: &Client, target: &str) -> anyhow::Result<()> {
    let rows = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE $1 || '%'",
            &[&format!(
                "{}{TEMP_MARK}",
                target.replace('_', "\\_").replace('%', "\\%")
            )],
        )
        .await?;
    for row in rows {
        let name: String = row.get(0);
        tracing::info!(database = %name, "dropping the leftover of an interrupted restore");
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                ident(&name)
            ))
            .await
            .map_err(|e| anyhow::anyhow!("drop leftover {name}: {}", describe(&e)))?;
    }
    Ok(())
}

pub(super) async fn refuse_if_in_use(
    server: &Server,
    admin: &Client,
    target: &str,
) -> anyhow::Result<()> {
    let sessions = server.sessions(admin, target).await?;
    if sessions.is_empty() {
        return Ok(());
    }
    bail!(
        "database `{target}` is in use by {} other session(s): {}; stop them or restore with --force (which terminates them)",
        sessions.len(),
        sessions
            .iter()
            .map(Session::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    )
}

/// Puts `temp` in place of `target`: the old database is closed to new connections, its
/// sessions checked (refused without `force`, terminated with it), renamed aside, the new one
/// renamed in, the old one dropped.
pub(super) async fn swap(
    server: &Server,
    admin: &Client,
    temp: &str,
    target: &str,
    force: bool,
) -> anyhow::Result<bool> {
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&target])
        .await?
        .is_some();
    if !exists {
        rename(admin, temp, target).await?;
        return Ok(false);
    }
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS false",
            ident(target)
        ))
        .await
        .map_err(|e| anyhow::anyhow!("close `{target}` to new connections: {}", describe(&e)))?;
    let reopen = || async {
        let _ = admin
            .batch_execute(&format!(
                "ALTER DATABASE {} WITH ALLOW_CONNECTIONS true",
                ident(target)
            ))
            .await;
    };
    let sessions = server.sessions(admin, target).await?;
    if !sessions.is_empty() {
        if !force {
            reopen().await;
            refuse_if_in_use(server, admin, target).await?;
        }
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&target],
            )
            .await
            .context("terminate the sessions on the target")?;
        tracing::warn!(database = %target, sessions = sessions.len(), "--force: terminated the sessions on the replaced database");
    }
    let previous = temp_name(target, PREVIOUS_MARK);
    // Terminated backends take a moment to leave; renaming waits for that.
    let mut attempts = 0;
    loop {
        match rename(admin, target, &previous).await {
            Ok(()) => break,
            Err(err) if attempts < 50 && err.to_string().contains("being accessed") => {
                attempts += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(err) => {
                reopen().await;
                return Err(err);
            }
        }
    }
    if let Err(err) = rename(admin, temp, target).await {
        let _ = rename(admin, &previous, target).await;
        reopen().await;
        return Err(err);
    }
    if let Err(err) = admin
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", ident(&previous)))
        .await
    {
        tracing::warn!(database = %previous, error = %describe(&err), "the replaced database could not be dropped; drop it by hand");
    }
    Ok(true)
}

pub(super) async fn rename(admin: &Client, from: &str, to: &str) -> anyhow::Result<()> {
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} RENAME TO {}",
            ident(from),
            ident(to)
        ))
        .await
        .map_err(|e| anyhow::anyhow!("rename database `{from}` to `{to}`: {}", describe(&e)))
}
