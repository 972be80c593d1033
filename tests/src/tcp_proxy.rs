//! A TCP proxy on a free loopback port in front of a real server, for faults on the path: a
//! byte rate (to give a transfer a middle a test can act in) and cuts (every connection
//! through it closed, new ones refused until it is healed).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct TcpProxy {
    pub port: u16,
    shared: Arc<Shared>,
}

struct Shared {
    target: u16,
    /// Bytes per second each direction of each connection may carry; 0 is unlimited.
    rate: u64,
    /// While set, accepted connections are closed at once.
    refusing: AtomicBool,
    stopped: AtomicBool,
    /// Both sockets of every connection, to cut them.
    open: Mutex<Vec<TcpStream>>,
}

impl TcpProxy {
    /// A proxy to 127.0.0.1:`target`; `rate` bytes per second per direction, 0 unlimited.
    pub fn start(target: u16, rate: u64) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared {
            target,
            rate,
            refusing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || accept_loop(listener, accepting));
        TcpProxy { port, shared }
    }

    /// Closes every connection through the proxy and refuses new ones until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
        for socket in self.shared.open.lock().expect("lock").drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopped.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        let _ = client.set_nonblocking(false);
        if shared.refusing.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(("127.0.0.1", shared.target)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = server.set_nodelay(true);
        let _ = client.set_nodelay(true);
        {
            let mut open = shared.open.lock().expect("lock");
            for socket in [&client, &server] {
                if let Ok(clone) = socket.try_clone() {
                    open.push(clone);
                }
            }
        }
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            let rate = shared.rate;
            std::thread::spawn(move || pump(from, to, rate));
        }
    }
}

/// Copies `from` to `to` at no more than `rate` bytes per second (0: as fast as it comes),
/// then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, rate: u64) {
    let began = Instant::now();
    let mut sent = 0u64;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
        sent += n as u64;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
