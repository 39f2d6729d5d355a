//! Graceful shutdown.
//!
//! # The standard
//!
//! On SIGTERM (what orchestrators send) or SIGINT (Ctrl-C), a service:
//!
//! 1. reports 503 on `/health/ready` at once, so load balancers stop sending;
//! 2. after `CHASSIS_SHUTDOWN_DELAY_SECS` (default 0; set it to a few seconds
//!    behind a load balancer that polls readiness), stops accepting
//!    connections and closes idle keep-alive connections;
//! 3. lets in-flight requests finish, for at most
//!    `CHASSIS_SHUTDOWN_GRACE_SECS` (default 30) counted from the signal;
//! 4. cancels its background tasks (each holds a [`CancellationToken`]) and
//!    waits for them within the same grace period;
//! 5. exits 0. Requests or tasks still running at the deadline are cut, and a
//!    warning says how many.
//!
//! No accepted request is dropped while there is time to finish it, and
//! shutdown never hangs past its deadline.
//!
//! # How the chassis does it
//!
//! [`Service::serve`](crate::service::Service::serve) waits for
//! [`signal`]; [`Service::serve_with`](crate::service::Service::serve_with)
//! takes any future instead, which is how tests and embedding programs stop a
//! service.
//!
//! # Example
//!
//! ```no_run
//! # async fn example(service: chassis::service::Service) {
//! // What `serve()` does: stop on SIGTERM or SIGINT.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
//! service.serve_with(listener, chassis::shutdown::signal()).await.unwrap();
//! # }
//! ```

pub use tokio_util::sync::CancellationToken;

/// Completes on SIGTERM or SIGINT (on non-Unix platforms, Ctrl-C only).
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutdown requested"),
        () = term => tracing::info!(signal = "SIGTERM", "shutdown requested"),
    }
}
