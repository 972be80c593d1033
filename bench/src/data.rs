//! `aitbc-backup-bench-data`: benchmark inputs.
//!   ledger DIR FILES SIZE   FILES files of about SIZE bytes (ledger-like: blocks/, receipts/,
//!                           wallets/), semi-compressible, deterministic
//!   stream BYTES            BYTES of the same kind of data on stdout

use std::io::Write;
use std::path::PathBuf;

use aitbc_backup_tests::data::generate;
use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["ledger", dir, files, size] => ledger(PathBuf::from(dir), files.parse()?, size.parse()?),
        ["stream", bytes] => stream(bytes.parse()?),
        _ => bail!("usage: aitbc-backup-bench-data ledger DIR FILES SIZE | stream BYTES"),
    }
}

fn ledger(dir: PathBuf, files: usize, size: usize) -> anyhow::Result<()> {
    for i in 0..files {
        let sub = ["blocks", "receipts", "wallets"][i % 3];
        let folder = dir.join(sub).join(format!("{:03}", i / 300));
        std::fs::create_dir_all(&folder).with_context(|| format!("create {}", folder.display()))?;
        // Sizes vary +-25 % around SIZE.
        let len = size * 3 / 4 + (i * 7919) % (size / 2).max(1);
        std::fs::write(folder.join(format!("{i:06}.dat")), generate(len, i as u64))?;
    }
    Ok(())
}

fn stream(bytes: u64) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let block = 8u64 << 20;
    let mut written = 0;
    let mut seed = 0;
    while written < bytes {
        let n = block.min(bytes - written) as usize;
        out.write_all(&generate(n, 1_000_000 + seed))?;
        written += n as u64;
        seed += 1;
    }
    out.flush()?;
    Ok(())
}
