//! `aitbc-backup-lock-bench`: what keeping a locked repository's kept chunks locked costs.
//!
//! Against an S3 endpoint with versioning and Object Lock (the bench script starts radosgw),
//! backs up CHUNKS small chunks into a new repository with a 30-day governance lock and a
//! margin ten minutes short of it, waits until every chunk is older than the 5 minutes a first
//! lock is assumed short, and measures two runs of the lock extension: one where every kept
//! version is due (as each is once per `days - margin` with a real margin), then one right
//! after it, where none is (the steady state in between: the process remembers the dates).
//! Prints one JSON line per run: requests and seconds.
//!
//!   aitbc-backup-lock-bench ENDPOINT BUCKET CHUNKS
//! (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)

use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::storage::{Backend, LockMode, S3Settings, S3Storage};
use aitbc_backup_repository::{
    BackupRequest, ChunkerParams, ObjectLock, Progress, Repository, Storage, StorageLimits, gc,
    immutable,
};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

const DAYS: u32 = 30;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, bucket, chunks] = args.as_slice() else {
        bail!("usage: aitbc-backup-lock-bench ENDPOINT BUCKET CHUNKS");
    };
    let chunks: usize = chunks.parse().context("CHUNKS")?;
    let cancel = CancellationToken::new();
    let prefix = format!("bench{:08x}", rand::random::<u32>());
    let storage = open(endpoint, bucket, &prefix).await;
    let lock = ObjectLock {
        mode: LockMode::Governance,
        days: DAYS,
        margin_secs: u64::from(DAYS) * 86400 - 600,
    };
    // 1-4 KiB chunks, so that CHUNKS chunks are a few hundred megabytes of objects.
    let small = ChunkerParams {
        min_size: 1 << 10,
        avg_size: 2 << 10,
        max_size: 4 << 10,
    };
    let repo = Repository::init_locked(storage, small, None, Some(lock), &cancel).await?;
    let started = Instant::now();
    let data: Vec<u8> = (0..chunks * 2048).map(|_| rand::random::<u8>()).collect();
    let manifest = aitbc_backup_repository::backup(
        &repo,
        std::io::Cursor::new(data),
        BackupRequest {
            name: "bench".into(),
            stream: "raw".into(),
            ..Default::default()
        },
        Arc::new(Progress::default()),
        &cancel,
    )
    .await?;
    println!(
        "{}",
        serde_json::json!({"what": "backup", "chunks": manifest.stats.chunks,
            "seconds": started.elapsed().as_secs_f64()})
    );
    // A version is due once its first lock (its stamp + 30 days - 5 minutes, as assumed)
    // ends within the margin: every chunk is, 5 minutes and 10 seconds after the last write.
    tokio::time::sleep(std::time::Duration::from_secs(310)).await;
    let marked = gc::mark(&repo, false, &cancel).await?;
    for what in ["extend, every version due", "extend again, nothing due"] {
        let started = Instant::now();
        let report = immutable::extend_locks(&repo, &marked, &cancel).await?;
        println!(
            "{}",
            serde_json::json!({"what": what, "chunks": marked.chunks.len(),
                "report": report, "seconds": started.elapsed().as_secs_f64()})
        );
    }
    Ok(())
}

async fn open(endpoint: &str, bucket: &str, prefix: &str) -> Storage {
    let mut settings = S3Settings::new(bucket, prefix);
    settings.endpoint = Some(endpoint.to_owned());
    settings.path_style = true;
    settings.region = Some("us-east-1".to_owned());
    Storage::new(
        Backend::S3(S3Storage::new(settings).await),
        StorageLimits::default(),
    )
}
