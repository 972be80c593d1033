//! Human output: aligned tables, and standard output that may be closed.
//!
//! Everything the CLI prints goes through [`outln!`] / [`out!`] (or [`Stdout`] for streams),
//! which return an error instead of panicking as `println!` does when the reader has gone
//! (`aitbc-backup repo ls | head -1`). The first such failure is remembered, and `main` then
//! ends the process quietly with exit status 141 (128 + SIGPIPE, what a shell reports for a
//! program a closed pipe killed): the reader asked for no more, so there is nothing to say,
//! yet `set -o pipefail` still sees that the command did not run to its end — a `repo verify`
//! whose report was cut short must not pass for a clean one.

use std::fmt;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// The exit status after standard output was closed by its reader.
pub const CLOSED_STDOUT_EXIT: u8 = 141;

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// True once a write to standard output failed because its reader is gone.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Standard output's reader is gone.
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
pub struct StdoutClosed;

fn failed(err: std::io::Error) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        StdoutClosed.into()
    } else {
        anyhow::Error::new(err).context("write to standard output")
    }
}

/// Writes to standard output; see [`outln!`].
pub fn write_stdout(args: fmt::Arguments<'_>, newline: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| stdout.flush())
        .map_err(failed)
}

/// `println!` that returns an error rather than panic when standard output is closed.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*), true)
    };
}

/// `print!` that returns an error rather than panic when standard output is closed.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*), false)
    };
}

/// `eprintln!` that never panics (standard error may be a closed pipe too).
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub(crate) use {errln, out, outln};

/// Standard output for streams (`repo cat` without `-o`), remembering a closed reader.
pub struct Stdout(tokio::io::Stdout);

impl Stdout {
    pub fn new() -> Self {
        Stdout(tokio::io::stdout())
    }
}

fn note<T>(result: std::io::Result<T>) -> std::io::Result<T> {
    if let Err(err) = &result
        && err.kind() == std::io::ErrorKind::BrokenPipe
    {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
    result
}

impl tokio::io::AsyncWrite for Stdout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf).map(note)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx).map(note)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx).map(note)
    }
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        outln!("{}", padded.join("  ").trim_end())
    };
    line(header.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// The name of a `ComponentKind` wire value (`unknown` for one this CLI does not know).
pub fn component_name(kind: i32) -> &'static str {
    aitbc_backup_proto::model::Component::from_proto("component", kind)
        .map_or("unknown", |c| c.as_str())
}
