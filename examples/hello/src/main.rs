//! `hello`: binds `CHASSIS_BIND` (default `127.0.0.1:8080`) and serves until
//! SIGTERM or SIGINT.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hello_service::service().run().await
}
