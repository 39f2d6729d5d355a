//! The smallest chassis service: one API route, and with it health checks,
//! metrics, correlation ids, JSON logs, problem+json errors, load shedding,
//! timeouts and graceful shutdown.
//!
//! Run with `cargo run -p hello-service`, then
//! `curl -i localhost:8080/hello/v1/greetings/ann`.

use axum::{Json, Router, extract::Path, routing::get};
use chassis::{Problem, ServiceBuilder};
use http::StatusCode;
use serde::Serialize;

/// The answer to a greeting.
#[derive(Debug, Serialize)]
pub struct Greeting {
    /// The greeting text.
    pub message: String,
}

async fn greet(Path(name): Path<String>) -> Result<Json<Greeting>, Problem> {
    if name.chars().count() > 64 {
        return Err(
            Problem::new(StatusCode::BAD_REQUEST).with_detail("name is longer than 64 characters")
        );
    }
    Ok(Json(Greeting {
        message: format!("hello, {name}"),
    }))
}

/// The service: `GET /hello/v1/greetings/{name}`.
pub fn service() -> ServiceBuilder {
    ServiceBuilder::new("hello", 1)
        .api(Router::new().route("/greetings/{name}", get(greet)))
        .build_info(chassis::build_info!())
}
