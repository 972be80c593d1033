//! The simulated node's ledger: schema, block hashing, and the checks tests make on a chain.db
//! (integrity, hash chain, head).

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS block(
    height INTEGER PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    parent_hash TEXT NOT NULL,
    proposer TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    tx_count INTEGER NOT NULL,
    state_root TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS "transaction"(
    hash TEXT PRIMARY KEY,
    height INTEGER NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    amount INTEGER NOT NULL,
    payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS receipt(
    tx_hash TEXT PRIMARY KEY,
    height INTEGER NOT NULL,
    status INTEGER NOT NULL,
    gas_used INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS account(
    address TEXT PRIMARY KEY,
    balance INTEGER NOT NULL,
    nonce INTEGER NOT NULL);
"#;

pub const GENESIS_PARENT: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of a block: BLAKE3 over its parent, height, time, proposer, transactions and state.
pub fn block_hash(
    parent: &str,
    height: u64,
    timestamp: i64,
    proposer: &str,
    tx_hashes: &[String],
    state_root: &str,
) -> String {
    let mut h = blake3::Hasher::new();
    h.update(parent.as_bytes());
    h.update(&height.to_le_bytes());
    h.update(&timestamp.to_le_bytes());
    h.update(proposer.as_bytes());
    for tx in tx_hashes {
        h.update(tx.as_bytes());
    }
    h.update(state_root.as_bytes());
    h.finalize().to_hex().to_string()
}

/// What a check of a chain.db found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub height: u64,
    pub hash: String,
    pub blocks: u64,
}

/// Opens `db` read-only and checks `PRAGMA integrity_check`, that heights are contiguous from 0,
/// that every block's parent_hash is the previous block's hash and every hash recomputes.
pub fn check_chain(db: &Path) -> Result<ChainHead, String> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("open {}: {e}", db.display()))?;
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| format!("integrity_check: {e}"))?;
    if integrity != "ok" {
        return Err(format!("integrity_check: {integrity}"));
    }
    let mut blocks = conn
        .prepare("SELECT height, hash, parent_hash, proposer, timestamp, state_root FROM block ORDER BY height")
        .map_err(|e| e.to_string())?;
    // Every transaction hash by block, in one pass (a query per block is a table scan each:
    // the table has no index on height).
    let mut by_height: std::collections::HashMap<u64, Vec<String>> = Default::default();
    {
        let mut txs = conn
            .prepare(r#"SELECT height, hash FROM "transaction" ORDER BY rowid"#)
            .map_err(|e| e.to_string())?;
        let mut rows = txs.query([]).map_err(|e| e.to_string())?;
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let height: u64 = row.get(0).map_err(|e| e.to_string())?;
            by_height
                .entry(height)
                .or_default()
                .push(row.get(1).map_err(|e| e.to_string())?);
        }
    }
    let mut rows = blocks.query([]).map_err(|e| e.to_string())?;
    let mut previous = GENESIS_PARENT.to_owned();
    let mut expected_height = 0u64;
    let mut head = None;
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        let height: u64 = row.get(0).map_err(|e| e.to_string())?;
        let hash: String = row.get(1).map_err(|e| e.to_string())?;
        let parent: String = row.get(2).map_err(|e| e.to_string())?;
        let proposer: String = row.get(3).map_err(|e| e.to_string())?;
        let timestamp: i64 = row.get(4).map_err(|e| e.to_string())?;
        let state_root: String = row.get(5).map_err(|e| e.to_string())?;
        if height != expected_height {
            return Err(format!(
                "height {height} follows {}",
                expected_height.wrapping_sub(1)
            ));
        }
        if parent != previous {
            return Err(format!(
                "block {height}: parent_hash does not match block {}",
                height.wrapping_sub(1)
            ));
        }
        let tx_hashes = by_height.remove(&height).unwrap_or_default();
        if block_hash(
            &parent,
            height,
            timestamp,
            &proposer,
            &tx_hashes,
            &state_root,
        ) != hash
        {
            return Err(format!("block {height}: hash does not recompute"));
        }
        previous = hash.clone();
        expected_height += 1;
        head = Some((height, hash));
    }
    let (height, hash) = head.ok_or("no blocks")?;
    Ok(ChainHead {
        height,
        hash,
        blocks: expected_height,
    })
}
