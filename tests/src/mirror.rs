//! The simulator's optional mirrors: every block also goes to PostgreSQL (a `chain_blocks` row)
//! and then to Redis (`chain:head`), in that order and only after the SQLite commit, so at any
//! instant redis height <= postgres height <= ledger height. Snapshot-set tests check a
//! consistent cut against exactly that.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub const CHAIN_BLOCKS_TABLE: &str = "CREATE TABLE IF NOT EXISTS chain_blocks(
    height BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    parent_hash TEXT NOT NULL,
    mirrored_at TIMESTAMPTZ NOT NULL DEFAULT now())";
pub const REDIS_HEAD_KEY: &str = "chain:head";

#[derive(Default)]
pub struct Mirrors {
    postgres: Option<tokio_postgres::Client>,
    redis: Option<BufReader<TcpStream>>,
}

impl Mirrors {
    /// Connects to the mirrors that are given (`postgres://...` URL, Redis `host:port`).
    pub async fn connect(postgres: Option<&str>, redis: Option<&str>) -> Result<Self, String> {
        let mut mirrors = Mirrors::default();
        if let Some(url) = postgres {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("mirror PostgreSQL {url}: {e}"))?;
            tokio::spawn(connection);
            client
                .batch_execute(CHAIN_BLOCKS_TABLE)
                .await
                .map_err(|e| format!("create chain_blocks: {e}"))?;
            mirrors.postgres = Some(client);
        }
        if let Some(addr) = redis {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("mirror Redis {addr}: {e}"))?;
            mirrors.redis = Some(BufReader::new(stream));
        }
        Ok(mirrors)
    }

    /// Mirrors one block: PostgreSQL first, then Redis.
    pub async fn block(&mut self, height: u64, hash: &str, parent: &str) -> Result<(), String> {
        if let Some(client) = &self.postgres {
            client
                .execute(
                    "INSERT INTO chain_blocks(height, hash, parent_hash) VALUES ($1, $2, $3)
                     ON CONFLICT (height) DO NOTHING",
                    &[&(height as i64), &hash, &parent],
                )
                .await
                .map_err(|e| format!("mirror block {height} to PostgreSQL: {e}"))?;
        }
        if let Some(redis) = &mut self.redis {
            let head = serde_json::json!({"height": height, "hash": hash}).to_string();
            let reply = redis_command(redis, &["SET", REDIS_HEAD_KEY, &head]).await?;
            if reply != "+OK" {
                return Err(format!("mirror block {height} to Redis: {reply}"));
            }
        }
        Ok(())
    }
}

/// Sends one command in RESP and reads a one-line reply.
async fn redis_command(conn: &mut BufReader<TcpStream>, args: &[&str]) -> Result<String, String> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    conn.get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("Redis: {e}"))?;
    let mut line = String::new();
    conn.read_line(&mut line)
        .await
        .map_err(|e| format!("Redis: {e}"))?;
    Ok(line.trim_end().to_owned())
}
