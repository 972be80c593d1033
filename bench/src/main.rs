//! `aitbc-backup-session-load`: opens N real mTLS agent sessions against a coordinator, each
//! heartbeating at the fleet interval, and reports heartbeat round-trip percentiles plus the
//! coordinator's RSS and CPU (read from /proc) as one JSON line.
//!
//! Certificates are issued on the fly from the CA in `--certs` (ca.pem, ca.key), one per
//! session, so the coordinator sees N distinct agents exactly as in production.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aitbc_backup_proto::agent_session_client::AgentSessionClient;
use aitbc_backup_proto::{
    AgentMessage, ComponentKind, Heartbeat, Register, agent_message, coordinator_message,
};
use aitbc_backup_tls::{CertificateAuthority, PeerIdentity, Role};
use anyhow::Context;
use clap::Parser;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Parser)]
struct Args {
    /// Coordinator gRPC address.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    coordinator: String,
    /// Directory holding ca.pem and ca.key.
    #[arg(long)]
    certs: PathBuf,
    /// Number of sessions.
    #[arg(long, default_value_t = 2000)]
    sessions: usize,
    /// Heartbeat interval of every session.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    interval: Duration,
    /// How long to measure once every session is up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    duration: Duration,
    /// The coordinator's pid, for RSS and CPU.
    #[arg(long)]
    coordinator_pid: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    aitbc_backup_tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ca = CertificateAuthority::from_pem(
        &std::fs::read_to_string(args.certs.join("ca.pem")).context("read ca.pem")?,
        &std::fs::read_to_string(args.certs.join("ca.key")).context("read ca.key")?,
    )?;
    let ca_pem = ca.cert_pem().to_owned();
    let rtts = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let connect_start = Instant::now();
    let mut up = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.sessions {
        let identity = PeerIdentity::new(Role::Agent, format!("load-{i:05}"))?;
        let issued = ca.issue(&identity, &[])?;
        let tls = ClientTlsConfig::new()
            .identity(Identity::from_pem(issued.cert_pem, issued.key_pem))
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(args.coordinator.clone())?
            .tls_config(tls)?
            .connect()
            .await
            .with_context(|| format!("session {i}: connect"))?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        up.push(ready_rx);
        tasks.spawn(session(
            channel,
            identity.name,
            args.interval,
            rtts.clone(),
            measuring.clone(),
            errors.clone(),
            ready_tx,
        ));
    }
    for ready in up {
        ready.await.context("a session failed to register")?;
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();

    // One interval to settle into the steady state, then measure.
    tokio::time::sleep(args.interval).await;
    let cpu_before = cpu_ticks(args.coordinator_pid)?;
    let measure_start = Instant::now();
    measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(args.duration).await;
    measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    let elapsed = measure_start.elapsed().as_secs_f64();
    let cpu_after = cpu_ticks(args.coordinator_pid)?;
    let (rss_kib, hwm_kib) = rss_kib(args.coordinator_pid)?;
    tasks.abort_all();

    let mut samples = rtts
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    samples.sort();
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN)
    };
    let line = serde_json::json!({
        "scenario": "coordinator_sessions",
        "sessions": args.sessions,
        "heartbeat_interval_s": args.interval.as_secs_f64(),
        "measured_s": elapsed,
        "connect_all_s": connect_secs,
        "heartbeats": samples.len(),
        "session_errors": errors.load(std::sync::atomic::Ordering::Relaxed),
        "rtt_p50_ms": pct(0.50),
        "rtt_p99_ms": pct(0.99),
        "rtt_max_ms": samples.last().map(|d| d.as_secs_f64() * 1e3),
        "coordinator_rss_mib": rss_kib as f64 / 1024.0,
        "coordinator_peak_rss_mib": hwm_kib as f64 / 1024.0,
        "coordinator_cpu_percent": (cpu_after - cpu_before) as f64 / clock_ticks() / elapsed * 100.0,
    });
    println!("{line}");
    Ok(())
}

async fn session(
    channel: tonic::transport::Channel,
    name: String,
    interval: Duration,
    rtts: Arc<Mutex<Vec<Duration>>>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
    errors: Arc<std::sync::atomic::AtomicUsize>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let (tx, rx) = mpsc::channel(8);
    let register = AgentMessage {
        body: Some(agent_message::Body::Register(Register {
            name,
            component: ComponentKind::Ledger as i32,
            version: "load".into(),
            host: "bench".into(),
        })),
    };
    if tx.send(register).await.is_err() {
        return;
    }
    let mut client = AgentSessionClient::new(channel);
    let Ok(response) = client.session(ReceiverStream::new(rx)).await else {
        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    };
    let mut inbound = response.into_inner();
    if !matches!(inbound.message().await, Ok(Some(_))) {
        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    let _ = ready.send(());
    // Spread the fleet's heartbeats over the interval, as real agents started at random times.
    tokio::time::sleep(interval.mul_f64(rand::random::<f64>())).await;
    let mut ticker = tokio::time::interval(interval);
    let mut sequence = 0;
    loop {
        ticker.tick().await;
        sequence += 1;
        let sent = Instant::now();
        let heartbeat = AgentMessage {
            body: Some(agent_message::Body::Heartbeat(Heartbeat { sequence })),
        };
        if tx.send(heartbeat).await.is_err() {
            break;
        }
        match inbound.message().await {
            Ok(Some(msg))
                if matches!(msg.body, Some(coordinator_message::Body::HeartbeatAck(_))) =>
            {
                if measuring.load(std::sync::atomic::Ordering::Relaxed)
                    && let Ok(mut samples) = rtts.lock()
                {
                    samples.push(sent.elapsed());
                }
            }
            _ => {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                break;
            }
        }
    }
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux this runs on.
    100.0
}

fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
