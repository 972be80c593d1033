//! The agent's master side of a restore: it listens on `redis.restore_listen`, answers the
//! server's replica handshake with `+FULLRESYNC` and streams the RDB to it while walking it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::super::config::RedisSettings;
use super::super::rdb;
use super::super::sync::Tee;
use super::now_ms;

/// The agent's side of the replication link.
pub struct Master {
    listener: TcpListener,
    size: u64,
    timeout: Duration,
}

/// Where the server is told to replicate from.
pub struct Advertised(pub String, pub u16);

impl Master {
    pub fn start(settings: &RedisSettings, size: u64) -> anyhow::Result<(Advertised, Master)> {
        let listener = TcpListener::bind(settings.restore_listen).with_context(|| {
            format!("listen on redis.restore_listen {}", settings.restore_listen)
        })?;
        let local = listener.local_addr()?;
        let advertised = if settings.restore_advertise.is_empty() {
            Advertised(local.ip().to_string(), local.port())
        } else {
            match settings.restore_advertise.rsplit_once(':') {
                Some((host, port)) => Advertised(
                    host.to_owned(),
                    port.parse().context("redis.restore_advertise port")?,
                ),
                None => Advertised(settings.restore_advertise.clone(), local.port()),
            }
        };
        Ok((
            advertised,
            Master {
                listener,
                size,
                timeout: settings.io_timeout,
            },
        ))
    }

    /// Accepts the replica, answers its handshake, sends the RDB while walking it. Returns the
    /// walk and the still-open socket (closing it before the server is released would make the
    /// server retry the link).
    pub fn serve(self, rdb_stream: &mut dyn Read) -> anyhow::Result<(rdb::Summary, TcpStream)> {
        let socket = accept_within(&self.listener, self.timeout)?;
        socket.set_read_timeout(Some(self.timeout))?;
        socket.set_write_timeout(Some(self.timeout))?;
        let mut reader = BufReader::new(socket.try_clone()?);
        let mut writer = socket.try_clone()?;
        loop {
            let command = read_command(&mut reader)?;
            let name = command
                .first()
                .map(|c| c.to_ascii_uppercase())
                .unwrap_or_default();
            match name.as_str() {
                "PING" => writer.write_all(b"+PONG\r\n")?,
                "AUTH" | "REPLCONF" => writer.write_all(b"+OK\r\n")?,
                "PSYNC" | "SYNC" => {
                    let replid = hex::encode(rand::random::<[u8; 20]>());
                    writer.write_all(
                        format!("+FULLRESYNC {replid} 0\r\n${}\r\n", self.size).as_bytes(),
                    )?;
                    break;
                }
                other => writer.write_all(format!("-ERR unexpected {other}\r\n").as_bytes())?,
            }
        }
        let horizon = now_ms() + 24 * 3600 * 1000;
        let mut tee = BufReader::with_capacity(
            1 << 20,
            Tee {
                input: rdb_stream,
                out: std::io::BufWriter::with_capacity(1 << 20, writer),
            },
        );
        let summary = rdb::walk(&mut tee, Some(horizon)).context("stream the RDB to the server")?;
        rdb::drain(&mut tee)?;
        let Tee { out, .. } = tee.into_inner();
        out.into_inner().map_err(|e| e.into_error())?.flush()?;
        Ok((summary, socket))
    }
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((socket, _)) => {
                socket.set_nonblocking(false)?;
                return Ok(socket);
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!(
                        "the server did not connect to the agent at {} within {timeout:?} (redis.restore_listen, redis.restore_advertise)",
                        listener.local_addr()?
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// One RESP command from the replica (arrays, or an inline command).
fn read_command(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Vec<String>> {
    let mut line = String::new();
    if reader
        .read_line(&mut line)
        .context("read the server's handshake")?
        == 0
    {
        bail!("the server closed the replication link during the handshake");
    }
    let line = line.trim_end();
    let Some(count) = line.strip_prefix('*') else {
        return Ok(line.split_whitespace().map(str::to_owned).collect());
    };
    let count: usize = count.parse().context("malformed command from the server")?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let len: usize = header
            .trim_end()
            .trim_start_matches('$')
            .parse()
            .context("malformed argument")?;
        let mut data = vec![0u8; len + 2];
        std::io::Read::read_exact(reader, &mut data)?;
        data.truncate(len);
        args.push(String::from_utf8_lossy(&data).into_owned());
    }
    Ok(args)
}
