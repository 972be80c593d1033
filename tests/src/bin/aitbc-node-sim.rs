//! `aitbc-node-sim`: keeps an AITBC-like blockchain node data directory alive, for tests,
//! benchmarks and the demo.
//!
//! - `chain/chain.db`: SQLite (WAL, or rollback journal with `--journal delete`) with tables
//!   `block`, `transaction`, `receipt`, `account`; hash-chained blocks at `--rate` per second.
//! - `receipts/<height / 1000>/<height>.json`: one file per block.
//! - `wallets/<address>.json`: small files rewritten in place as balances change.
//! - HTTP: `GET /v1/blocks/head` → `{"height", "hash"}`, `GET /v1/health`.
//! - optionally (`--mirror-postgres URL`, `--mirror-redis HOST:PORT`) every block mirrored into
//!   PostgreSQL (`chain_blocks`) and then Redis (`chain:head`), after its SQLite commit.
//!
//! Prints `listening on <addr>` once serving; stops on SIGTERM/SIGINT (exit 0).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aitbc_backup_tests::chain::{GENESIS_PARENT, SCHEMA, block_hash};
use aitbc_backup_tests::mirror::Mirrors;
use axum::routing::get;
use rusqlite::{Connection, params};

struct Args {
    data_dir: PathBuf,
    rate: f64,
    journal: String,
    http: String,
    blocks: u64,
    txs_per_block: u32,
    wallets: u32,
    /// Exit once `blocks` are written (instead of serving the head until SIGTERM).
    exit: bool,
    /// Bytes of log data in each receipt file (bulk for benchmarks).
    receipt_log_bytes: usize,
    /// Mirror every block into PostgreSQL (`chain_blocks`), then Redis (`chain:head`).
    mirror_postgres: Option<String>,
    mirror_redis: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        data_dir: PathBuf::new(),
        rate: 20.0,
        journal: "wal".into(),
        http: "127.0.0.1:0".into(),
        blocks: 0,
        txs_per_block: 8,
        wallets: 200,
        exit: false,
        receipt_log_bytes: 0,
        mirror_postgres: None,
        mirror_redis: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--data-dir" => args.data_dir = PathBuf::from(value()?),
            "--rate" => {
                args.rate = value()?
                    .parse()
                    .map_err(|_| "--rate: a number of blocks per second")?
            }
            "--journal" => args.journal = value()?,
            "--http" => args.http = value()?,
            "--blocks" => args.blocks = value()?.parse().map_err(|_| "--blocks: a count")?,
            "--txs-per-block" => {
                args.txs_per_block = value()?.parse().map_err(|_| "--txs-per-block: a count")?
            }
            "--wallets" => args.wallets = value()?.parse().map_err(|_| "--wallets: a count")?,
            "--receipt-log-bytes" => {
                args.receipt_log_bytes = value()?
                    .parse()
                    .map_err(|_| "--receipt-log-bytes: a size")?
            }
            "--exit" => args.exit = true,
            "--mirror-postgres" => args.mirror_postgres = Some(value()?),
            "--mirror-redis" => args.mirror_redis = Some(value()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.data_dir.as_os_str().is_empty() {
        return Err("--data-dir is required".into());
    }
    if !matches!(args.journal.as_str(), "wal" | "delete") {
        return Err("--journal: wal or delete".into());
    }
    if args.exit && args.blocks == 0 {
        return Err("--exit needs --blocks".into());
    }
    if args.rate <= 0.0 || args.wallets == 0 {
        return Err("--rate and --wallets must be positive".into());
    }
    Ok(args)
}

type Head = Arc<Mutex<(u64, String)>>;

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("aitbc-node-sim: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("aitbc-node-sim: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aitbc-node-sim: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    for dir in ["chain", "receipts", "wallets"] {
        std::fs::create_dir_all(args.data_dir.join(dir)).map_err(|e| e.to_string())?;
    }
    let mut conn =
        Connection::open(args.data_dir.join("chain/chain.db")).map_err(|e| e.to_string())?;
    // A real node waits for locks (a fenced backup holds BEGIN IMMEDIATE for milliseconds).
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "journal_mode", &args.journal)
        .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| e.to_string())?;
    conn.execute_batch(SCHEMA).map_err(|e| e.to_string())?;
    let head: Head = Arc::new(Mutex::new(load_head(&conn)?));
    let mut mirrors = Mirrors::connect(
        args.mirror_postgres.as_deref(),
        args.mirror_redis.as_deref(),
    )
    .await?;
    if head.lock().map_err(|e| e.to_string())?.1.is_empty() {
        let genesis = write_block(&mut conn, &args, 0, GENESIS_PARENT)?;
        mirrors.block(0, &genesis, GENESIS_PARENT).await?;
        *head.lock().map_err(|e| e.to_string())? = (0, genesis);
    }

    let listener = tokio::net::TcpListener::bind(&args.http)
        .await
        .map_err(|e| format!("bind {}: {e}", args.http))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let router = axum::Router::new()
        .route(
            "/v1/blocks/head",
            get({
                let head = head.clone();
                move || {
                    let (height, hash) = head.lock().map(|h| h.clone()).unwrap_or_default();
                    async move { json(serde_json::json!({"height": height, "hash": hash})) }
                }
            }),
        )
        .route(
            "/v1/health",
            get(|| async { json(serde_json::json!({"status": "ok"})) }),
        );
    let stop = tokio_util::sync::CancellationToken::new();
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await
    });
    println!("listening on {addr}");

    let args_exit = args.exit;
    let writer_stop = stop.clone();
    let writer_head = head.clone();
    let runtime = tokio::runtime::Handle::current();
    let writer = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let interval = Duration::from_secs_f64(1.0 / args.rate);
        let mut next = std::time::Instant::now();
        let mut written = 0u64;
        while !writer_stop.is_cancelled() && (args.blocks == 0 || written < args.blocks) {
            next += interval;
            let (height, parent) = writer_head
                .lock()
                .map(|h| h.clone())
                .map_err(|e| e.to_string())?;
            let hash = write_block(&mut conn, &args, height + 1, &parent)?;
            runtime.block_on(mirrors.block(height + 1, &hash, &parent))?;
            *writer_head.lock().map_err(|e| e.to_string())? = (height + 1, hash);
            written += 1;
            if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut writer = writer;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        result = &mut writer => {
            result.map_err(|e| e.to_string())??;
            // --blocks reached: keep serving the head until told to stop (or exit at once).
            if !args_exit {
                term.recv().await;
            }
            stop.cancel();
            return server.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string());
        }
    }
    stop.cancel();
    writer.await.map_err(|e| e.to_string())??;
    server
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn json(value: serde_json::Value) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
}

fn load_head(conn: &Connection) -> Result<(u64, String), String> {
    conn.query_row(
        "SELECT height, hash FROM block ORDER BY height DESC LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .or_else(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Ok((0, String::new())),
        other => Err(other.to_string()),
    })
}

/// Writes block `height` on top of `parent` (one SQLite transaction), then its receipt file and
/// the wallets it touched; returns its hash.
fn write_block(
    conn: &mut Connection,
    args: &Args,
    height: u64,
    parent: &str,
) -> Result<String, String> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let proposer = format!("validator-{}", height % 4);
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    let mut tx_hashes = Vec::new();
    let mut touched = Vec::new();
    let txs = if height == 0 { 0 } else { args.txs_per_block };
    for i in 0..txs {
        let n = height * u64::from(args.txs_per_block) + u64::from(i);
        let sender = format!("aitbc1{:08x}", n % u64::from(args.wallets));
        let recipient = format!("aitbc1{:08x}", (n * 7 + 3) % u64::from(args.wallets));
        let amount = (n % 1000) as i64 + 1;
        let hash = blake3::hash(format!("{height}:{i}:{sender}:{recipient}:{amount}").as_bytes())
            .to_hex()
            .to_string();
        let payload = blake3::hash(hash.as_bytes()).as_bytes().repeat(8);
        tx.execute(
            r#"INSERT INTO "transaction"(hash, height, sender, recipient, amount, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"#,
            params![hash, height, sender, recipient, amount, payload],
        )
        .map_err(|e| e.to_string())?;
        tx.execute(
            "INSERT INTO receipt(tx_hash, height, status, gas_used) VALUES (?1, ?2, 1, ?3)",
            params![hash, height, 21000 + i64::from(i)],
        )
        .map_err(|e| e.to_string())?;
        for (address, delta) in [(&sender, -amount), (&recipient, amount)] {
            tx.execute(
                "INSERT INTO account(address, balance, nonce) VALUES (?1, 1000000 + ?2, 1)
                 ON CONFLICT(address) DO UPDATE SET balance = balance + ?2, nonce = nonce + 1",
                params![address, delta],
            )
            .map_err(|e| e.to_string())?;
            touched.push(address.clone());
        }
        tx_hashes.push(hash);
    }
    let state_root = blake3::hash(touched.concat().as_bytes())
        .to_hex()
        .to_string();
    let hash = block_hash(
        parent,
        height,
        timestamp,
        &proposer,
        &tx_hashes,
        &state_root,
    );
    tx.execute(
        "INSERT INTO block(height, hash, parent_hash, proposer, timestamp, tx_count, state_root) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![height, hash, parent, proposer, timestamp, txs, state_root],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;

    let receipts = args
        .data_dir
        .join("receipts")
        .join(format!("{:06}", height / 1000));
    std::fs::create_dir_all(&receipts).map_err(|e| e.to_string())?;
    let logs = receipt_logs(&hash, args.receipt_log_bytes);
    let receipt = serde_json::json!({"height": height, "hash": hash, "transactions": tx_hashes, "logs": logs});
    std::fs::write(receipts.join(format!("{height}.json")), receipt.to_string())
        .map_err(|e| e.to_string())?;
    touched.sort();
    touched.dedup();
    for address in touched {
        write_wallet(&args.data_dir, &address, height)?;
    }
    Ok(hash)
}

fn write_wallet(data_dir: &Path, address: &str, height: u64) -> Result<(), String> {
    let body = serde_json::json!({"address": address, "updated_at_height": height});
    std::fs::write(
        data_dir.join("wallets").join(format!("{address}.json")),
        body.to_string(),
    )
    .map_err(|e| e.to_string())
}

/// About `bytes` of event logs for a receipt, shaped like a node's: structured entries naming
/// wallets and event kinds, each with a topic hash and an amount, derived from the block.
fn receipt_logs(hash: &str, bytes: usize) -> Vec<serde_json::Value> {
    const EVENTS: [&str; 4] = ["Transfer", "Approval", "Stake", "RewardPaid"];
    let mut logs = Vec::new();
    let mut size = 0;
    let mut i = 0u64;
    while size < bytes {
        let topic = blake3::hash(format!("{hash}:{i}").as_bytes());
        let t = topic.as_bytes();
        let entry = serde_json::json!({
            "address": format!("aitbc1{:08x}", u32::from_le_bytes([t[0], t[1], 0, 0]) % 200),
            "event": EVENTS[usize::from(t[2]) % EVENTS.len()],
            "topics": [topic.to_hex().to_string()],
            "data": {"amount": u64::from_le_bytes([t[3], t[4], t[5], 0, 0, 0, 0, 0]), "index": i},
        });
        size += entry.to_string().len() + 1;
        logs.push(entry);
        i += 1;
    }
    logs
}
