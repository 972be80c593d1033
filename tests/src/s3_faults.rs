//! An HTTP proxy in front of a real S3 server that injects the faults real networks and
//! servers produce: 500 InternalError, 503 SlowDown and 429 answers (before or after the
//! server applied the request), connections reset in the middle of a response body, bodies cut
//! short of their Content-Length, and slow answers. It exercises the SDK's retry
//! classification and mid-body failures, which faults injected at our storage trait do not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use rand::{Rng, SeedableRng};

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// An error answer; the request never reaches the server.
    ErrorBefore(u16),
    /// The request is applied, then an error answer (the client cannot know it succeeded).
    ErrorAfter(u16),
    /// Headers and half the body, then the connection is closed.
    CutBody,
    /// The whole answer, late.
    Slow,
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    rng: std::sync::Mutex<rand::rngs::StdRng>,
    /// Faults per thousand requests.
    rate: u32,
    injected: AtomicU64,
    requests: AtomicU64,
}

/// The proxy, serving until dropped.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// A proxy to `upstream` (`http://host:port`) faulting `per_mille` requests in a thousand,
    /// chosen by `seed`.
    pub fn start(upstream: &str, per_mille: u32, seed: u64) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("http client"),
            rng: std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            rate: per_mille,
            injected: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(SocketAddr::from((
                [127, 0, 0, 1],
                0,
            ))))
            .expect("bind the proxy");
        let port = listener.local_addr().expect("address").port();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy {
            port,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (requests seen, faults injected)
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.requests.load(Ordering::Relaxed),
            self.shared.injected.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn pick(shared: &Shared) -> Fault {
    let Ok(mut rng) = shared.rng.lock() else {
        return Fault::None;
    };
    if rng.random_range(0..1000) >= shared.rate {
        return Fault::None;
    }
    let status = [500, 503, 429][rng.random_range(0..3)];
    match rng.random_range(0..5) {
        0 => Fault::ErrorBefore(status),
        1 => Fault::ErrorAfter(status),
        2 | 3 => Fault::CutBody,
        _ => Fault::Slow,
    }
}

fn error_answer(status: u16) -> Response<Body> {
    let code = match status {
        503 => "SlowDown",
        429 => "TooManyRequests",
        _ => "InternalError",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the fault proxy</Message></Error>"
    );
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/xml")
        .body(Body::from(body))
        .unwrap_or_default()
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request<Body>) -> Response<Body> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let fault = pick(&shared);
    if fault != Fault::None {
        shared.injected.fetch_add(1, Ordering::Relaxed);
    }
    if let Fault::ErrorBefore(status) = fault {
        return error_answer(status);
    }
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 256 << 20).await else {
        return error_answer(500);
    };
    let url = format!(
        "{}{}",
        shared.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    // Every header goes on unchanged, Host included: it is part of the SigV4 signature.
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if name != "content-length" {
            headers.append(name.clone(), value.clone());
        }
    }
    let forwarded = shared
        .client
        .request(parts.method.clone(), &url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    let Ok(answer) = forwarded else {
        return error_answer(502);
    };
    if let Fault::ErrorAfter(status) = fault {
        return error_answer(status);
    }
    let status = answer.status();
    let answer_headers = answer.headers().clone();
    let Ok(bytes) = answer.bytes().await else {
        return error_answer(502);
    };
    let mut builder = Response::builder().status(status);
    for (name, value) in &answer_headers {
        if name != "transfer-encoding" && name != "connection" {
            builder = builder.header(name.clone(), value.clone());
        }
    }
    match fault {
        Fault::CutBody if bytes.len() > 1 => {
            // Content-Length promises the whole body; half of it comes, then the stream fails
            // and the server drops the connection.
            let half = bytes.slice(..bytes.len() / 2);
            let stream = futures::stream::iter(vec![
                Ok::<_, std::io::Error>(half),
                Err(std::io::Error::other("injected: connection cut mid-body")),
            ]);
            builder.body(Body::from_stream(stream)).unwrap_or_default()
        }
        Fault::Slow => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            builder.body(Body::from(bytes)).unwrap_or_default()
        }
        _ => builder.body(Body::from(bytes)).unwrap_or_default(),
    }
}
