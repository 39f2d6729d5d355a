//! The smallest chassis service: one API route, and with it health checks,
//! metrics, correlation ids, JSON logs, problem+json errors, load shedding,
//! timeouts and graceful shutdown.
//!
//! Run with `cargo run -p hello-service`, then
//! `curl -i localhost:8080/hello/v1/greetings/ann`.

use axum::{Json, extract::Path};
use chassis::{
    Problem, ServiceBuilder,
    api::{self, Api},
};
use http::StatusCode;
use serde::Serialize;

/// The answer to a greeting.
#[derive(Debug, Serialize, utoipa::ToSchema)]
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
        .api(
            Api::new().route(
                api::get("/greetings/{name}", greet)
                    .public()
                    .summary("Greet someone")
                    .param("name", "Who to greet, at most 64 characters.")
                    .response::<Greeting>(200)
                    .problem(400, "The name is longer than 64 characters."),
            ),
        )
        .build_info(chassis::build_info!())
}
