//! A service served in the test's own process.

use std::{net::SocketAddr, time::Duration};

use axum::Router;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use super::support::{plain_downstream, until_ready};
use crate::{ServiceBuilder, client::Downstream, service::ServeError};

/// A service built from its [`ServiceBuilder`] and served in the test's
/// process on a loopback port: the quick way to test its API through a real
/// socket, with the real layers. [`stop`](Self::stop) shuts it down as
/// SIGTERM would and asserts a clean stop; dropping it shuts it down
/// without waiting.
///
/// ```
/// use chassis::{ServiceBuilder, api::{self, Api}, testing::TestServer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let builder = ServiceBuilder::new("hello", 1)
///     .api(Api::new().route(api::get("/hi", || async { "hi" }).public().response_as::<String>(200, "text/plain")))
///     .config(chassis::Config::default());
/// let server = TestServer::start(builder).await;
/// let downstream = server.downstream();
/// let cx = chassis::client::CallContext::background();
/// let res = downstream.anonymous(&cx).get("/hello/v1/hi").send().await.unwrap();
/// assert_eq!(res.body().as_ref(), b"hi");
/// server.stop().await;
/// # }
/// ```
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    router: Router,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

// === impl TestServer ===

impl TestServer {
    /// Builds `builder` (give it its `config` and, for protected routes,
    /// a `verifier` first), serves it on `127.0.0.1` at a free port, and
    /// waits until `/health/ready` answers 200.
    ///
    /// # Panics
    ///
    /// If it does not build, cannot bind, or is not ready within 60 s.
    pub async fn start(builder: ServiceBuilder) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        Self::start_on(builder, listener).await
    }

    /// [`start`](Self::start) on a listener the test bound (e.g. the same
    /// port again, for a restart).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_on(builder: ServiceBuilder, listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("a bound listener");
        let service = builder
            .build()
            .unwrap_or_else(|e| panic!("the service builds: {e}"));
        let router = service.router();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(service.serve_with(listener, async move {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            router,
            stop: Some(stop),
            task: Some(task),
        };
        until_ready(&server.downstream(), Duration::from_secs(60)).await;
        server
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The application it serves, with every layer and the same state: a
    /// request sent through it (e.g. with `tower::ServiceExt::oneshot`)
    /// reaches the service without a socket, and so without a peer
    /// address.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// `http://127.0.0.1:<port>` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A [`Downstream`] named `test` to it: one attempt per call (30 s),
    /// the breaker disabled, so that a test sees every answer as it is.
    ///
    /// # Panics
    ///
    /// Never for a loopback address.
    pub fn downstream(&self) -> Downstream {
        plain_downstream("test", &self.url(""))
    }

    /// Shuts it down as SIGTERM would and waits, at most 60 s, for a clean
    /// stop.
    ///
    /// # Panics
    ///
    /// If it does not stop in time, or stops with an error.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("the task is awaited once");
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the service stops within 60 s")
            .expect("the serving task does not panic")
            .expect("the service stops cleanly");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
