//! A small blocking RESP2 client: enough to authenticate, run commands and then read the raw
//! replication stream from the same socket. Blocking on purpose: the replication transfer runs
//! on the backup pipeline's producer thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};

use anyhow::{Context, bail};

use super::config::RedisSettings;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text (status or bulk).
    pub fn text(&self) -> String {
        match self {
            Reply::Status(s) | Reply::Error(s) => s.clone(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Int(i) => i.to_string(),
            _ => String::new(),
        }
    }
}

pub struct Connection {
    reader: BufReader<TcpStream>,
    pub address: String,
}

impl Connection {
    /// Connects and authenticates with the configured credentials.
    pub fn open(settings: &RedisSettings) -> anyhow::Result<Connection> {
        let address = settings.address.clone();
        let target = address
            .to_socket_addrs()
            .with_context(|| format!("resolve Redis address {address}"))?
            .next()
            .with_context(|| format!("Redis address {address} resolves to nothing"))?;
        let stream = TcpStream::connect_timeout(&target, settings.connect_timeout)
            .with_context(|| format!("connect to Redis at {address}"))?;
        stream.set_read_timeout(Some(settings.io_timeout))?;
        stream.set_write_timeout(Some(settings.io_timeout))?;
        stream.set_nodelay(true)?;
        let mut connection = Connection {
            reader: BufReader::with_capacity(1 << 16, stream),
            address,
        };
        if let Some(password) = settings.password()? {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if !settings.username.is_empty() {
                args.push(settings.username.as_bytes());
            }
            args.push(password.as_bytes());
            if let Reply::Error(err) = connection.call(&args)? {
                let user = if settings.username.is_empty() {
                    String::new()
                } else {
                    format!(" of user `{}`", settings.username)
                };
                bail!(
                    "Redis at {} refused the credentials{user}: {err}",
                    connection.address
                );
            }
        }
        Ok(connection)
    }

    /// Sends one command.
    pub fn send(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.reader
            .get_mut()
            .write_all(&out)
            .with_context(|| format!("write to Redis at {}", self.address))
    }

    /// Sends one command and reads its reply (an error reply is a value, not an `Err`).
    pub fn call(&mut self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        self.send(args)?;
        self.read_reply()
    }

    /// Runs a command that must succeed; the error names the command.
    pub fn ok(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        match self.call(&bytes)? {
            Reply::Error(err) => bail!(
                "Redis at {} refused {}: {err}",
                self.address,
                args.join(" ")
            ),
            reply => Ok(reply),
        }
    }

    /// `CONFIG GET name`: its value, or None when the server refuses `CONFIG` (an ACL, a
    /// renamed command) or knows no such setting.
    pub fn config_get(&mut self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(match self.call(&[b"CONFIG", b"GET", name.as_bytes()])? {
            Reply::Array(Some(items)) if items.len() == 2 => Some(items[1].text()),
            _ => None,
        })
    }

    /// `CONFIG SET name value`; whether the server took it.
    pub fn config_set(&mut self, name: &str, value: &str) -> anyhow::Result<bool> {
        Ok(!matches!(
            self.call(&[b"CONFIG", b"SET", name.as_bytes(), value.as_bytes()])?,
            Reply::Error(_)
        ))
    }

    /// `INFO section` as key → value.
    pub fn info(
        &mut self,
        section: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let text = self.ok(&["INFO", section])?.text();
        Ok(text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect())
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("read from Redis at {}", self.address))?;
        if n == 0 {
            bail!("Redis at {} closed the connection", self.address);
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    pub fn read_reply(&mut self) -> anyhow::Result<Reply> {
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || {
            rest.parse::<i64>()
                .with_context(|| format!("malformed Redis reply `{line}`"))
        };
        Ok(match kind {
            "+" => Reply::Status(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Int(number()?),
            "$" => match number()? {
                n if n < 0 => Reply::Bulk(None),
                n => {
                    let mut data = vec![0u8; n as usize + 2];
                    self.reader.read_exact(&mut data)?;
                    data.truncate(n as usize);
                    Reply::Bulk(Some(data))
                }
            },
            "*" => match number()? {
                n if n < 0 => Reply::Array(None),
                n => Reply::Array(Some(
                    (0..n)
                        .map(|_| self.read_reply())
                        .collect::<anyhow::Result<_>>()?,
                )),
            },
            _ => bail!("unexpected Redis reply `{line}`"),
        })
    }

    /// The buffered reader, for the raw replication stream after `PSYNC`.
    pub fn raw(&mut self) -> &mut BufReader<TcpStream> {
        &mut self.reader
    }
}
