//! One PostgreSQL server: connections (tokio-postgres) and its client tools (`pg_dump`,
//! `pg_restore`, `pg_dumpall`, `psql`) pointed at it through libpq's environment, so no
//! password ever appears on a command line.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};

use super::config::PostgresSettings;

/// A server the agent talks to.
#[derive(Clone)]
pub struct Server {
    config: tokio_postgres::Config,
    password: Option<String>,
    /// Where the agent connects to list, create and rename databases.
    pub maintenance_db: String,
    bin_dir: PathBuf,
}

/// Facts about the server recorded in the consistency point.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub version: String,
    pub major: u32,
    pub system_identifier: String,
}

/// Another session on a database, as a user would want it named.
#[derive(Debug, Clone)]
pub struct Session {
    pub pid: i32,
    pub user: String,
    pub application: String,
    pub client: String,
}

impl std::fmt::Display for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} (user {}, application \"{}\", from {})",
            self.pid, self.user, self.application, self.client
        )
    }
}

impl Server {
    /// The configured server, or `url` instead (restore into another server).
    pub fn new(settings: &PostgresSettings, url: Option<&str>) -> anyhow::Result<Server> {
        let url = url.unwrap_or(&settings.url);
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|err| anyhow::anyhow!("PostgreSQL URL `{url}`: {err}"))?;
        if config.get_password().is_some() {
            bail!("a PostgreSQL URL must not hold a password; use AITBC_BACKUP_POSTGRES__PASSWORD");
        }
        let password = settings.password()?;
        if let Some(password) = &password {
            config.password(password.as_bytes());
        }
        if config.get_user().is_none() {
            config.user("postgres");
        }
        config.connect_timeout(settings.connect_timeout);
        config.application_name("aitbc-backup-agent");
        let maintenance_db = config.get_dbname().unwrap_or("postgres").to_owned();
        Ok(Server {
            config,
            password,
            maintenance_db,
            bin_dir: settings.bin_dir.clone(),
        })
    }

    /// The configured server, connected to its maintenance database, its version and identity
    /// read and its client tools found: what every operation on the live server starts with.
    pub async fn open(settings: &PostgresSettings) -> anyhow::Result<(Server, Client, ServerInfo)> {
        let mut server = Server::new(settings, None)?;
        let admin = server.connect(&server.maintenance_db.clone()).await?;
        let info = server.info(&admin).await?;
        server.resolve_tools(info.major)?;
        Ok((server, admin, info))
    }

    /// `host:port` or the socket directory, for messages.
    pub fn endpoint(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or("postgres")
    }

    /// Connects to `database`; the error names the server, the database and the cause.
    pub async fn connect(&self, database: &str) -> anyhow::Result<Client> {
        let mut config = self.config.clone();
        config.dbname(database);
        let (client, connection) = config.connect(NoTls).await.map_err(|err| {
            anyhow::anyhow!(
                "connect to PostgreSQL at {} (database `{database}`, user `{}`): {}",
                self.endpoint(),
                self.user(),
                describe(&err)
            )
        })?;
        // The connection future ends when the client is dropped.
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }

    /// Version and identity of the server.
    pub async fn info(&self, client: &Client) -> anyhow::Result<ServerInfo> {
        let row = client
            .query_one(
                "SELECT current_setting('server_version'), \
                        current_setting('server_version_num')::int",
                &[],
            )
            .await
            .context("read the server version")?;
        let version: String = row.get(0);
        let num: i32 = row.get(1);
        let system_identifier = client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .map_err(|err| {
                anyhow::anyhow!(
                    "read the system identifier: {} (the backup role needs EXECUTE on pg_control_system())",
                    describe(&err)
                )
            })?
            .get(0);
        Ok(ServerInfo {
            version,
            major: (num / 10000) as u32,
            system_identifier,
        })
    }

    /// Other sessions connected to `database`.
    pub async fn sessions(&self, client: &Client, database: &str) -> anyhow::Result<Vec<Session>> {
        let rows = client
            .query(
                "SELECT pid, coalesce(usename::text, '?'), coalesce(application_name, ''), \
                        coalesce(host(client_addr), 'a local socket') \
                 FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() \
                 ORDER BY pid",
                &[&database],
            )
            .await
            .context("list sessions (pg_stat_activity)")?;
        Ok(rows
            .iter()
            .map(|row| Session {
                pid: row.get(0),
                user: row.get(1),
                application: row.get(2),
                client: row.get(3),
            })
            .collect())
    }

    /// Finds the client tools for a server of `major` (`bin_dir`, the Debian layout, `PATH`)
    /// and checks `pg_dump` is at least as new as the server.
    pub fn resolve_tools(&mut self, major: u32) -> anyhow::Result<()> {
        self.bin_dir = tools_dir(&self.bin_dir, major, "pg_dump");
        let output = self
            .tool("pg_dump")
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "run {} --version (postgres.bin_dir)",
                    self.tool_path("pg_dump").display()
                )
            })?;
        let text = String::from_utf8_lossy(&output.stdout);
        let tool_major = text
            .split_whitespace()
            .find_map(|word| word.split('.').next()?.parse::<u32>().ok())
            .with_context(|| format!("unexpected pg_dump --version output `{}`", text.trim()))?;
        if tool_major < major {
            bail!(
                "pg_dump {tool_major} cannot dump a PostgreSQL {major} server; point postgres.bin_dir at version {major} or newer"
            );
        }
        Ok(())
    }

    fn tool_path(&self, name: &str) -> PathBuf {
        tool_in(&self.bin_dir, name)
    }

    /// A client tool with libpq's environment set for this server (password included, never
    /// on the command line); the database is passed with [`conninfo`].
    pub fn tool(&self, name: &str) -> Command {
        let mut command = Command::new(self.tool_path(name));
        for var in [
            "PGDATABASE",
            "PGSERVICE",
            "PGSERVICEFILE",
            "PGOPTIONS",
            "PGHOSTADDR",
        ] {
            command.env_remove(var);
        }
        match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => command.env("PGHOST", host),
            Some(Host::Unix(path)) => command.env("PGHOST", path),
            None => command.env_remove("PGHOST"),
        };
        if let Some(port) = self.config.get_ports().first() {
            command.env("PGPORT", port.to_string());
        }
        command.env("PGUSER", self.user());
        match &self.password {
            Some(password) => command.env("PGPASSWORD", password),
            None => command.env_remove("PGPASSWORD"),
        };
        if let Some(timeout) = self.config.get_connect_timeout() {
            command.env("PGCONNECT_TIMEOUT", timeout.as_secs().max(1).to_string());
        }
        command.env("PGAPPNAME", "aitbc-backup-agent");
        command
    }
}

/// Where the programs of PostgreSQL `major` are: `configured` (`postgres.bin_dir`), else the
/// Debian layout when it has `probe`, else empty (found on `PATH`).
pub fn tools_dir(configured: &Path, major: u32, probe: &str) -> PathBuf {
    if !configured.as_os_str().is_empty() {
        return configured.to_owned();
    }
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join(probe).exists() {
        debian
    } else {
        PathBuf::new()
    }
}

/// Program `name` in `dir` (from [`tools_dir`]; empty: on `PATH`).
pub fn tool_in(dir: &Path, name: &str) -> PathBuf {
    if dir.as_os_str().is_empty() {
        PathBuf::from(name)
    } else {
        dir.join(name)
    }
}

/// A libpq connection string naming only `database` (host, user and password come from the
/// environment of [`Server::tool`]).
pub fn conninfo(database: &str) -> String {
    format!(
        "dbname='{}'",
        database.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

/// `"name"`, quoted for SQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, quoted for SQL.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A tokio-postgres error as one line: the server's message when there is one, else the
/// cause (connection refused, timeout).
pub fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_owned(),
        };
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// Runs a tool to completion; its stderr (trimmed) is the error when it fails.
pub fn check_output(what: &str, output: std::process::Output) -> anyhow::Result<Vec<u8>> {
    if output.status.success() {
        return Ok(output.stdout);
    }
    bail!(
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// The server's WAL segment size in bytes.
pub async fn wal_segment_size(client: &tokio_postgres::Client) -> anyhow::Result<u64> {
    let row = client
        .query_one(
            "SELECT setting::bigint * CASE unit WHEN 'B' THEN 1 WHEN 'kB' THEN 1024 \
                    WHEN 'MB' THEN 1048576 ELSE 1 END \
             FROM pg_settings WHERE name = 'wal_segment_size'",
            &[],
        )
        .await
        .context("read wal_segment_size")?;
    Ok(row.get::<_, i64>(0) as u64)
}
