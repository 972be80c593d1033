//! The cut: one `REPEATABLE READ READ ONLY` transaction per database exports its snapshot (all
//! databases at once), the first records the WAL position; in fenced mode the configured tables
//! are locked `IN SHARE ROW EXCLUSIVE MODE` around it. The exporting transactions stay open
//! until every dump has imported its snapshot (the whole upload).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aitbc_backup_repository::manifest::{ConsistencyPoint, PgDatabase};
use anyhow::{Context, bail};
use futures::future::try_join_all;
use tokio::sync::oneshot;
use tokio_postgres::Client;

use super::config::PostgresSettings;
use super::server::{Server, ServerInfo, describe, ident, literal};

/// A database to back up, as `pg_database` describes it.
#[derive(Debug, Clone)]
pub struct Database {
    pub name: String,
    pub owner: String,
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
}

/// Connected and checked; nothing is held yet.
pub struct Prepared {
    pub server: Server,
    pub info: ServerInfo,
    exporters: Vec<(Database, Client)>,
    /// Per database with fenced tables: its connection and the tables, quoted.
    fences: Vec<(Client, Vec<String>)>,
    max_pause: Duration,
    /// Raised by [`Prepared::fence`]; carried into the cut.
    fence: Option<Fence>,
    /// The restore point the cut writes, and the connection that writes it.
    restore_point: Option<(String, Client)>,
}

/// Snapshots exported and held.
pub struct Cut {
    pub server: Server,
    pub point: Point,
    /// The exporting transactions, one per database, in `point.databases` order.
    pub exporters: Vec<Client>,
    pub fence: Option<Fence>,
    /// When the cut was taken (for skew across components).
    pub at: Instant,
}

/// The consistency point before row counts are known.
#[derive(Debug, Clone)]
pub struct Point {
    pub lsn: String,
    pub timeline: u32,
    pub info: ServerInfo,
    pub databases: Vec<(Database, Exported)>,
    /// The restore point written at the cut (WAL archiving on), and its LSN; else empty.
    pub restore_point: String,
    pub restore_point_lsn: String,
}

/// What a database's exporting transaction returned.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The id `pg_dump --snapshot` imports.
    pub snapshot: String,
    /// `pg_current_snapshot()`: which transactions the snapshot sees.
    pub txid_snapshot: String,
}

impl Point {
    /// The manifest's record, with the row counts taken inside each snapshot.
    pub fn record(&self, counts: Vec<BTreeMap<String, u64>>) -> ConsistencyPoint {
        ConsistencyPoint::Postgres {
            lsn: self.lsn.clone(),
            snapshot: self
                .databases
                .first()
                .map(|(_, e)| e.snapshot.clone())
                .unwrap_or_default(),
            system_identifier: self.info.system_identifier.clone(),
            timeline: self.timeline,
            server_version: self.info.version.clone(),
            txid_snapshot: self
                .databases
                .first()
                .map(|(_, e)| e.txid_snapshot.clone())
                .unwrap_or_default(),
            databases: self
                .databases
                .iter()
                .zip(counts)
                .map(|((db, exported), row_counts)| PgDatabase {
                    name: db.name.clone(),
                    snapshot: exported.snapshot.clone(),
                    txid_snapshot: exported.txid_snapshot.clone(),
                    owner: db.owner.clone(),
                    encoding: db.encoding.clone(),
                    collate: db.collate.clone(),
                    ctype: db.ctype.clone(),
                    row_counts,
                })
                .collect(),
            restore_point: self.restore_point.clone(),
            restore_point_lsn: self.restore_point_lsn.clone(),
        }
    }
}

/// Writers held by table locks; ends at [`Fence::release`] or at the deadline, whichever is
/// first. The deadline counts from the moment the first `LOCK TABLE` was sent: writers queue
/// behind a pending lock as they do behind a granted one.
pub struct Fence {
    release: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Duration>,
    deadline: Instant,
    max_pause: Duration,
}

impl Fence {
    /// Lets writers go; returns how long they could have waited (from the first `LOCK`).
    pub async fn release(mut self) -> Duration {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.unwrap_or_default()
    }

    /// Fails when the deadline has passed: writers may have gone on, so a cut now would not
    /// be exact.
    fn check_holding(&self) -> anyhow::Result<()> {
        if Instant::now() >= self.deadline {
            bail!(
                "the PostgreSQL fence ended at its deadline (postgres.fence_max_pause = {}) before \
                 the cut was taken, so the cut would not be exact; the set is aborted (a slow \
                 coordinator or agent: raise fence_max_pause or check their load)",
                humantime_serde::re::humantime::format_duration(self.max_pause)
            );
        }
        Ok(())
    }
}

/// Connects to every database, checks the fenced tables exist and finds the client tools.
pub async fn prepare(settings: &PostgresSettings) -> anyhow::Result<Prepared> {
    let (server, admin, info) = Server::open(settings).await?;
    let databases = list_databases(&admin, &settings.databases, &server).await?;
    let exporters = try_join_all(databases.into_iter().map(|db| {
        let server = server.clone();
        async move {
            let client = server.connect(&db.name).await?;
            Ok::<_, anyhow::Error>((db, client))
        }
    }))
    .await?;
    let mut by_database: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for table in settings.fence_tables()? {
        let database = table
            .database
            .unwrap_or_else(|| server.maintenance_db.clone());
        by_database.entry(database).or_default().push(format!(
            "{}.{}",
            ident(&table.schema),
            ident(&table.table)
        ));
    }
    let mut fences = Vec::new();
    for (database, tables) in by_database {
        let client = server.connect(&database).await?;
        for table in &tables {
            let found: Option<String> = client
                .query_one("SELECT to_regclass($1)::text", &[table])
                .await?
                .get(0);
            if found.is_none() {
                bail!(
                    "fence table {table} does not exist in database `{database}` (postgres.fence_tables)"
                );
            }
        }
        fences.push((client, tables));
    }
    Ok(Prepared {
        server,
        info,
        exporters,
        fences,
        max_pause: settings.fence_max_pause,
        fence: None,
        restore_point: None,
    })
}

async fn list_databases(
    admin: &Client,
    wanted: &[String],
    server: &Server,
) -> anyhow::Result<Vec<Database>> {
    let rows = admin
        .query(
            "SELECT datname::text, pg_get_userbyid(datdba)::text, pg_encoding_to_char(encoding)::text, \
                    datcollate::text, datctype::text \
             FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname",
            &[],
        )
        .await
        .context("list databases")?;
    let all: Vec<Database> = rows
        .iter()
        .map(|row| Database {
            name: row.get(0),
            owner: row.get(1),
            encoding: row.get(2),
            collate: row.get(3),
            ctype: row.get(4),
        })
        .collect();
    if wanted.is_empty() {
        return Ok(all);
    }
    wanted
        .iter()
        .map(|name| {
            all.iter()
                .find(|db| &db.name == name)
                .cloned()
                .with_context(|| {
                    format!(
                        "database `{name}` does not exist on {} (postgres.databases)",
                        server.endpoint()
                    )
                })
        })
        .collect()
}

impl Prepared {
    /// Makes the cut write a restore point named `name` (WAL archiving on).
    pub async fn with_restore_point(mut self, name: String) -> anyhow::Result<Prepared> {
        let client = self
            .server
            .connect(&self.server.maintenance_db.clone())
            .await?;
        self.restore_point = Some((name, client));
        Ok(self)
    }

    /// Locks the fenced tables (if any are configured). They stay locked until
    /// [`Fence::release`] or the deadline (`fence_max_pause`), whichever is first.
    pub async fn fence(&mut self) -> anyhow::Result<()> {
        if self.fence.is_none() && !self.fences.is_empty() {
            let fences = std::mem::take(&mut self.fences);
            self.fence = Some(raise_fence(fences, self.max_pause).await?);
        }
        Ok(())
    }

    /// Takes the cut: fence (if asked and not fenced yet), export every database's snapshot at
    /// once, record the WAL position. The fence stays up until [`Fence::release`] or its
    /// deadline.
    pub async fn cut(mut self, fenced: bool) -> anyhow::Result<Cut> {
        if fenced {
            self.fence().await?;
        }
        let fence = self.fence.take();
        let exported = try_join_all(self.exporters.iter().map(|(db, client)| async move {
            client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .with_context(|| format!("begin the snapshot transaction in `{}`", db.name))?;
            let row = client
                .query_one(
                    "SELECT pg_export_snapshot(), pg_current_snapshot()::text",
                    &[],
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!("export a snapshot of `{}`: {}", db.name, describe(&e))
                })?;
            Ok::<Exported, anyhow::Error>(Exported {
                snapshot: row.get(0),
                txid_snapshot: row.get(1),
            })
        }))
        .await?;
        let at = Instant::now();
        if let Some(fence) = &fence {
            fence.check_holding()?;
        }
        let first = &self.exporters.first().context("no database to back up")?.1;
        let row = first
            .query_one(
                "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                              ELSE pg_current_wal_lsn() END)::text, \
                        (SELECT timeline_id FROM pg_control_checkpoint())",
                &[],
            )
            .await
            .map_err(|e| anyhow::anyhow!("read the WAL position: {}", describe(&e)))?;
        // Written while the fence (if any) still holds writers, so in fenced mode recovery to
        // this point reproduces exactly the state the snapshots saw.
        let restore_point_lsn = match &self.restore_point {
            Some((name, client)) => client
                .query_one("SELECT pg_create_restore_point($1)::text", &[name])
                .await
                .map_err(|e| {
                    anyhow::anyhow!("create the restore point `{name}`: {}", describe(&e))
                })?
                .get(0),
            None => String::new(),
        };
        let (databases, exporters): (Vec<Database>, Vec<Client>) =
            self.exporters.into_iter().unzip();
        Ok(Cut {
            server: self.server,
            point: Point {
                lsn: row.get(0),
                timeline: row.get::<_, i32>(1) as u32,
                info: self.info,
                databases: databases.into_iter().zip(exported).collect(),
                restore_point: self.restore_point.map(|(name, _)| name).unwrap_or_default(),
                restore_point_lsn,
            },
            exporters,
            fence,
            at,
        })
    }
}

/// Locks the fenced tables within `max_pause`, counted from the first `LOCK`: the lock wait
/// (`lock_timeout` per table, `statement_timeout` for the statement) and then the time the
/// locks are held (`idle_in_transaction_session_timeout`, set to what is left once they are
/// granted) come out of one budget, so writers queued behind the fence wait at most
/// `max_pause` whoever disappears. A fence not granted in time names the sessions in its way.
async fn raise_fence(
    fences: Vec<(Client, Vec<String>)>,
    max_pause: Duration,
) -> anyhow::Result<Fence> {
    let budget = &millis(max_pause);
    try_join_all(fences.iter().map(|(client, tables)| async move {
        let tables = tables.join(", ");
        client
            .batch_execute(&format!(
                "SET statement_timeout = {budget}; SET lock_timeout = {budget}; \
                 SET idle_in_transaction_session_timeout = 0"
            ))
            .await
            .map_err(|e| anyhow::anyhow!("fence {tables}: {}", describe(&e)))
    }))
    .await?;
    let started = Instant::now();
    let deadline = started + max_pause;
    let budget_ms = max_pause.as_millis().max(1);
    let locked = try_join_all(fences.iter().map(|(client, quoted)| async move {
        let tables = quoted.join(", ");
        // What is left of the budget once the locks are granted bounds the hold on the server
        // too, should the agent vanish or hang: the session is ended, which releases the locks.
        // It is set by the server in the same message as the LOCK (statement_timestamp() is
        // when that message arrived), so no round trip to the agent lies in between.
        let locked = client
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {tables} IN SHARE ROW EXCLUSIVE MODE; \
                 SELECT set_config('idle_in_transaction_session_timeout', \
                   greatest(1, {budget_ms} - floor(1000 * extract(epoch FROM clock_timestamp() - \
                   statement_timestamp())))::bigint::text || 'ms', false); \
                 SET statement_timeout = 0"
            ))
            .await;
        if let Err(err) = locked {
            let _ = client.batch_execute("ROLLBACK").await;
            let blockers = blocking_sessions(client, quoted).await;
            bail!(
                "could not fence {tables} within postgres.fence_max_pause ({}): {}; {blockers}",
                humantime_serde::re::humantime::format_duration(max_pause),
                describe(&err)
            );
        }
        Ok(())
    }))
    .await;
    if let Err(err) = locked {
        // Locks granted on the other databases go now (dropping the clients would too, later).
        for (client, _) in &fences {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        return Err(err);
    }
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = rx => {}
            _ = tokio::time::sleep_until(deadline.into()) => {
                tracing::warn!(pause = ?max_pause, "fence deadline passed before release; letting writers go");
            }
        }
        for (client, _) in &fences {
            // Fails only if the server already ended the session, which released the locks.
            let _ = client.batch_execute("COMMIT").await;
        }
        started.elapsed()
    });
    Ok(Fence {
        release: Some(tx),
        task,
        deadline,
        max_pause,
    })
}

/// A duration as a SQL literal in milliseconds (at least 1: 0 would mean no limit).
fn millis(duration: Duration) -> String {
    literal(&format!("{}ms", duration.as_millis().max(1)))
}

/// The sessions holding locks on `tables` that the fence waited for, for the error message.
async fn blocking_sessions(client: &Client, tables: &[String]) -> String {
    let query = format!(
        "SELECT l.relation::regclass::text, l.mode, a.pid, coalesce(a.usename::text, ''), \
                coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local'), \
                coalesce(a.state, ''), coalesce(now() - a.xact_start, '0'::interval)::text \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.granted AND l.pid <> pg_backend_pid() \
           AND l.relation = ANY (ARRAY[{}]::regclass[]) \
           AND l.mode NOT IN ('AccessShareLock', 'RowShareLock') \
         ORDER BY a.xact_start",
        tables
            .iter()
            .map(|t| literal(t))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match client.query(&query, &[]).await {
        Ok(rows) if rows.is_empty() => {
            "no session holds a conflicting lock any more (it was released meanwhile)".to_owned()
        }
        Ok(rows) => {
            let sessions: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{} held in {} by pid {} (user `{}`, application `{}`, from {}, {}, in its transaction for {})",
                        r.get::<_, String>(0),
                        r.get::<_, String>(1),
                        r.get::<_, i32>(2),
                        r.get::<_, String>(3),
                        r.get::<_, String>(4),
                        r.get::<_, String>(5),
                        r.get::<_, String>(6),
                        r.get::<_, String>(7),
                    )
                })
                .collect();
            format!(
                "blocked by: {} (end or shorten that transaction, or fence other tables)",
                sessions.join("; ")
            )
        }
        Err(e) => format!(
            "the blocking sessions could not be listed: {}",
            describe(&e)
        ),
    }
}

/// Exact row counts of every table whose data `pg_dump` writes, in a connection of its own
/// that imports the exported snapshot (an error here must not end the exporting transaction).
pub async fn row_counts(
    server: &Server,
    database: &str,
    snapshot: &str,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let client = server.connect(database).await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            literal(snapshot)
        ))
        .await
        .map_err(|e| anyhow::anyhow!("import the snapshot of `{database}`: {}", describe(&e)))?;
    let tables = client
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' \
               AND n.nspname NOT LIKE 'pg\\_%' \
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                               AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY 1",
            &[],
        )
        .await
        .with_context(|| format!("list the tables of `{database}`"))?;
    let mut counts = BTreeMap::new();
    for row in tables {
        let table: String = row.get(0);
        let count: i64 = client
            .query_one(&format!("SELECT count(*) FROM ONLY {table}"), &[])
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "count the rows of {table} in `{database}`: {}",
                    describe(&e)
                )
            })?
            .get(0);
        counts.insert(table, count as u64);
    }
    Ok(counts)
}
