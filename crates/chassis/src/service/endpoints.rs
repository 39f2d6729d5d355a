//! The standard endpoints: `/health/ready`, `/metrics`, `/info`, and the
//! answer to a path that matches nothing.

use std::{sync::Arc, time::SystemTime};

use axum::{
    Json,
    extract::{RawQuery, State},
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::time::Instant;

use super::{BuildInfo, version::DeprecatedLayer};
use crate::{auth::Verifier, health::Health, permission::Permission, problem::Problem};

pub(super) async fn not_found() -> Problem {
    Problem::not_found()
}

/// The 404 of a service that serves a deprecated version: under its
/// prefix, with its headers (and counted), as its routes answer.
pub(super) async fn not_found_under(
    deprecated: Arc<Vec<(String, DeprecatedLayer)>>,
    uri: http::Uri,
) -> Response {
    let mut res = Problem::not_found().into_response();
    let path = uri.path();
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if let Some((_, layer)) = deprecated.iter().find(|(prefix, _)| under(prefix)) {
        layer.mark(&mut res);
    }
    res
}

/// The permission that lets a caller read the detail view of readiness,
/// `<service>::view:health`; `None` only for a name the builder refuses.
pub fn health_permission(service: &str) -> Option<Permission> {
    Permission::new(service, None, "view", "health").ok()
}

/// What `/health/ready` needs: the checks, and who may read their errors.
pub(super) struct Readiness {
    pub(super) health: Health,
    pub(super) verifier: Option<Verifier>,
    pub(super) permission: Option<Permission>,
}

/// `GET /health/ready`: names and states for anyone; with `?detail`, the
/// whole report to a bearer token holding [`health_permission`].
pub(super) async fn ready_endpoint(
    State(r): State<Arc<Readiness>>,
    RawQuery(query): RawQuery,
    headers: http::HeaderMap,
) -> Response {
    let mut res = if wants_detail(query.as_deref()) {
        if let Err(refused) = r.may_read_details(&headers).await {
            return refused;
        }
        crate::health::detailed(&r.health.report())
    } else {
        crate::health::ready(State(r.health.clone())).await
    };
    // The report is the chassis' own: a 503 keeps its body.
    res.extensions_mut().insert(crate::problem::Vetted);
    res
}

/// Whether the query asks for the detail view: `detail`, `detail=1`,
/// `detail=true`.
fn wants_detail(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes())
            .any(|(k, v)| k == "detail" && matches!(&*v, "" | "1" | "true"))
    })
}

impl Readiness {
    /// `Ok` for a verified token holding the permission; else the 401 or 403
    /// to answer. A service that verifies no tokens shows no details.
    async fn may_read_details(&self, headers: &http::HeaderMap) -> Result<(), Response> {
        let Some(permission) = &self.permission else {
            return Err(Problem::new(http::StatusCode::FORBIDDEN).into_response());
        };
        let forbidden = || crate::api::Forbidden::new(permission.clone()).into_response();
        let Some(verifier) = &self.verifier else {
            return Err(forbidden());
        };
        let principal = match verifier.verify(headers).await {
            Ok(p) => p,
            Err(e) => return Err(e.into_response()),
        };
        if principal.grants().decide(permission).is_allowed() {
            Ok(())
        } else {
            Err(forbidden())
        }
    }
}

/// `GET /<name>/v<N>/openapi.json`: the document built with the service.
pub(super) async fn openapi_endpoint(State(document): State<bytes::Bytes>) -> Response {
    (
        [(http::header::CONTENT_TYPE, crate::api::OPENAPI_TYPE)],
        document,
    )
        .into_response()
}

pub(super) async fn metrics_endpoint(State(handle): State<PrometheusHandle>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&handle),
    )
        .into_response()
}

#[derive(Debug)]
pub(super) struct Info {
    pub(super) service: String,
    pub(super) api_version: u32,
    /// What each version served says of itself, oldest first.
    pub(super) versions: Vec<serde_json::Value>,
    pub(super) build: BuildInfo,
    pub(super) started: SystemTime,
    pub(super) started_mono: Instant,
}

pub(super) async fn info_endpoint(State(info): State<Arc<Info>>) -> Response {
    let started = info
        .started
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Json(serde_json::json!({
        "service": info.service,
        "api_version": info.api_version,
        "api_prefix": format!("/{}/v{}", info.service, info.api_version),
        "api_versions": info.versions,
        "build": info.build,
        "chassis_version": env!("CARGO_PKG_VERSION"),
        "started_at_unix": started,
        "uptime_secs": info.started_mono.elapsed().as_secs(),
    }))
    .into_response()
}
