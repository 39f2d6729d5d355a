//! The harness's OTLP collector: takes what the `tracing` scenario's
//! servers export and counts it, without keeping it.
//!
//! It answers `POST /v1/traces` with 200, `application/x-protobuf` and an
//! empty body (an empty `ExportTraceServiceResponse` encodes to zero bytes),
//! and counts the export requests and their bytes. Bodies are read frame by
//! frame and thrown away, not decoded: at 100,000 spans a second, keeping
//! them would fill the memory, and decoding them would take CPU from the
//! core it shares with `wrk`.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use http_body_util::BodyExt;

/// What the collector has received so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Received {
    /// Export requests answered with 200.
    pub(crate) requests: u64,
    /// Their body bytes.
    pub(crate) bytes: u64,
}

impl std::ops::Sub for Received {
    type Output = Received;

    fn sub(self, before: Received) -> Received {
        Received {
            requests: self.requests - before.requests,
            bytes: self.bytes - before.bytes,
        }
    }
}

impl std::ops::AddAssign for Received {
    fn add_assign(&mut self, other: Received) {
        self.requests += other.requests;
        self.bytes += other.bytes;
    }
}

#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// A collector on 127.0.0.1, served by a thread of its own with a
/// current-thread tokio runtime; stopped on drop.
#[derive(Debug)]
pub(crate) struct Collector {
    addr: SocketAddr,
    counts: Arc<Counts>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Where its thread runs, for the report.
    pub(crate) placement: String,
}

impl Collector {
    /// Starts the collector; with `cpu`, its thread is pinned to that core
    /// with `taskset` (the rest of the harness process is not pinned).
    pub(crate) fn start(cpu: Option<&str>) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("the collector cannot listen: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("the collector's address: {e}"))?;
        let counts = Arc::new(Counts::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (placed, placement) = std::sync::mpsc::channel::<String>();
        let cpu = cpu.map(str::to_owned);
        let shared = Arc::clone(&counts);
        let thread = std::thread::Builder::new()
            .name("otlp-collector".to_owned())
            .spawn(move || {
                let _ = placed.send(match cpu {
                    Some(cpu) => pin_this_thread(&cpu),
                    None => "not pinned".to_owned(),
                });
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime for the collector");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("a listener in the collector's runtime");
                    let router = Router::new()
                        .route("/v1/traces", post(traces))
                        .with_state(shared);
                    let _ = axum::serve(listener, router)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .map_err(|e| format!("the collector's thread: {e}"))?;
        let placement = placement
            .recv()
            .map_err(|_| "the collector's thread ended at once".to_owned())?;
        Ok(Self {
            addr,
            counts,
            stop: Some(stop),
            thread: Some(thread),
            placement,
        })
    }

    /// The value of `OTEL_EXPORTER_OTLP_ENDPOINT` for a server exporting here.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What has arrived so far.
    pub(crate) fn received(&self) -> Received {
        Received {
            requests: self.counts.requests.load(Ordering::Relaxed),
            bytes: self.counts.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `POST /v1/traces`: counts the body's bytes as they arrive and drops them.
async fn traces(State(counts): State<Arc<Counts>>, mut body: Body) -> impl IntoResponse {
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    counts.requests.fetch_add(1, Ordering::Relaxed);
    counts.bytes.fetch_add(bytes, Ordering::Relaxed);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
    )
        .into_response()
}

/// Pins the calling thread to `cpu` with `taskset -p` on its thread id;
/// says where it ended up.
fn pin_this_thread(cpu: &str) -> String {
    // `/proc/thread-self` links to `<pid>/task/<tid>`.
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok());
    let Some(tid) = tid else {
        return "not pinned (no thread id)".to_owned();
    };
    let pinned = std::process::Command::new("taskset")
        .args(["-p", "-c", cpu, &tid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if pinned {
        format!("pinned to core {cpu}")
    } else {
        "not pinned (taskset failed)".to_owned()
    }
}
