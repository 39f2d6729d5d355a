//! The three servers under load. Each serves the same per-account endpoint,
//! `GET /ticketing/v1/{account}/tickets/{id}`, with the same handler, plus
//! `routes - 1` more routes of the same shape that the load never calls.
//!
//! - **A**, bare axum: the router and the handler, nothing else.
//! - **B**, what a Rust team assembles by hand today: tower-http's request-id
//!   set/propagate layers and `TraceLayer` (access log at INFO, JSON lines
//!   through a non-blocking writer), Prometheus metrics with
//!   `axum-prometheus`, and a middleware that verifies the bearer JWT with
//!   `jsonwebtoken` on every request (no cache) and checks that its `perms`
//!   claim holds `ticketing:{account}:view:ticket`.
//! - **C**, the chassis with everything on: correlation and trace context,
//!   logging, metrics, load shedding, timeouts, JWT authentication with the
//!   verified-token cache, the route's permission check and audit to the
//!   default sink (the log).

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use chassis::{
    ServiceBuilder,
    api::{self, Api},
    auth::{Key, Verifier},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The issuer every variant trusts.
pub(crate) const ISS: &str = "https://auth.load.test";
/// The audience of the tokens.
pub(crate) const AUD: &str = "ticketing";

const RSA_PUB: &[u8] = include_bytes!("../../tests/fixtures/rsa1.pub.pem");
const ED_PUB: &[u8] = include_bytes!("../../tests/fixtures/ed.pub.pem");

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A: bare axum.
    Bare,
    /// B: tower-http + axum-prometheus + jsonwebtoken, by hand.
    Hand,
    /// C: the chassis.
    Chassis,
}

impl Kind {
    pub(crate) fn arg(self) -> &'static str {
        match self {
            Kind::Bare => "bare",
            Kind::Hand => "hand",
            Kind::Chassis => "chassis",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "bare" => Some(Kind::Bare),
            "hand" => Some(Kind::Hand),
            "chassis" => Some(Kind::Chassis),
            _ => None,
        }
    }
}

/// How a server is started: `load serve <kind> <routes> <alg> <cache>`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerSpec {
    pub(crate) kind: Kind,
    /// Routes registered in the API (at least 1: the ticket route).
    pub(crate) routes: usize,
    /// The algorithm of the tokens B verifies (C accepts both).
    pub(crate) alg: Algorithm,
    /// C's verified-token cache capacity; `None` keeps the default.
    pub(crate) cache: Option<usize>,
}

impl ServerSpec {
    pub(crate) fn args(&self) -> Vec<String> {
        vec![
            "serve".to_owned(),
            self.kind.arg().to_owned(),
            self.routes.to_string(),
            alg_arg(self.alg).to_owned(),
            self.cache.map_or("default".to_owned(), |c| c.to_string()),
        ]
    }

    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let [kind, routes, alg, cache] = args else {
            return Err(
                "usage: serve <bare|hand|chassis> <routes> <rs256|eddsa> <cache|default>"
                    .to_owned(),
            );
        };
        Ok(Self {
            kind: Kind::parse(kind).ok_or_else(|| format!("unknown server `{kind}`"))?,
            routes: routes
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("routes must be a number >= 1, not `{routes}`"))?,
            alg: parse_alg(alg)?,
            cache: match cache.as_str() {
                "default" => None,
                n => Some(
                    n.parse()
                        .map_err(|_| format!("cache must be a number or `default`, not `{n}`"))?,
                ),
            },
        })
    }
}

pub(crate) fn alg_arg(alg: Algorithm) -> &'static str {
    if alg == Algorithm::EdDSA {
        "eddsa"
    } else {
        "rs256"
    }
}

fn parse_alg(s: &str) -> Result<Algorithm, String> {
    match s {
        "rs256" => Ok(Algorithm::RS256),
        "eddsa" => Ok(Algorithm::EdDSA),
        _ => Err(format!("algorithm must be rs256 or eddsa, not `{s}`")),
    }
}

/// What every variant answers.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) account: String,
    pub(crate) id: String,
    pub(crate) title: String,
    pub(crate) status: String,
}

async fn ticket(Path((account, id)): Path<(String, String)>) -> Json<Ticket> {
    Json(Ticket {
        title: format!("Ticket {id}"),
        account,
        id,
        status: "open".to_owned(),
    })
}

/// Route `i` of the API: 0 is the ticket route, the others never called.
fn route_path(i: usize) -> String {
    if i == 0 {
        "/{account}/tickets/{id}".to_owned()
    } else {
        format!("/{{account}}/thing{i}/{{id}}")
    }
}

fn route_resource(i: usize) -> String {
    if i == 0 {
        "ticket".to_owned()
    } else {
        format!("thing{i}")
    }
}

/// Serves `spec` on `CHASSIS_BIND` with one tokio worker until killed.
pub(crate) fn serve(spec: ServerSpec) -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async move {
        match spec.kind {
            Kind::Chassis => chassis(spec).run().await,
            Kind::Bare => serve_router(bare(spec.routes)).await,
            Kind::Hand => {
                let (writer, _guard) = tracing_appender::non_blocking(std::io::stdout());
                tracing_subscriber::fmt()
                    .json()
                    .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                    .with_writer(writer)
                    .init();
                serve_router(hand(spec.routes, spec.alg)).await
            }
        }
    })
}

async fn serve_router(router: Router) -> std::process::ExitCode {
    let addr: SocketAddr = std::env::var("CHASSIS_BIND")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match axum::serve(listener, router).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A: bare axum.
pub(crate) fn bare(routes: usize) -> Router {
    let api = (0..routes).fold(Router::new(), |r, i| r.route(&route_path(i), get(ticket)));
    Router::new().nest("/ticketing/v1", api)
}

#[derive(Debug, Deserialize, Clone)]
struct Claims {
    #[allow(dead_code)]
    sub: String,
    #[serde(default)]
    perms: Vec<String>,
}

struct JwtAuth {
    key: DecodingKey,
    validation: Validation,
}

/// B's authentication: verify the token on every request, then check a
/// claim. What a team writes with `jsonwebtoken` and `from_fn`.
async fn jwt(
    State(auth): State<Arc<JwtAuth>>,
    Path(params): Path<HashMap<String, String>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(token) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return (StatusCode::UNAUTHORIZED, "missing bearer token").into_response();
    };
    let claims = match jsonwebtoken::decode::<Claims>(token, &auth.key, &auth.validation) {
        Ok(data) => data.claims,
        Err(e) => {
            tracing::info!(error = %e, "token rejected");
            return (StatusCode::UNAUTHORIZED, "invalid token").into_response();
        }
    };
    let account = params.get("account").map_or("", String::as_str);
    let needed = format!("ticketing:{account}:view:ticket");
    if !claims.perms.contains(&needed) {
        return (StatusCode::FORBIDDEN, "forbidden").into_response();
    }
    req.extensions_mut().insert(claims);
    next.run(req).await
}

/// B: the stack a team assembles by hand from tower-http, axum-prometheus
/// and jsonwebtoken.
pub(crate) fn hand(routes: usize, alg: Algorithm) -> Router {
    use axum_prometheus::PrometheusMetricLayer;
    use tower_http::{
        request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
        trace::{DefaultOnResponse, TraceLayer},
    };

    let key = match alg {
        Algorithm::EdDSA => DecodingKey::from_ed_pem(ED_PUB),
        _ => DecodingKey::from_rsa_pem(RSA_PUB),
    }
    .expect("the fixture key is valid");
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[ISS]);
    validation.set_audience(&[AUD]);
    let auth = Arc::new(JwtAuth { key, validation });

    let (prometheus, handle) = PrometheusMetricLayer::pair();
    let api = (0..routes)
        .fold(Router::new(), |r, i| r.route(&route_path(i), get(ticket)))
        .route_layer(middleware::from_fn_with_state(auth, jwt));
    Router::new()
        .nest("/ticketing/v1", api)
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|req: &Request| {
                            let id = req
                                .headers()
                                .get("x-request-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
                        })
                        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
                )
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(prometheus),
        )
}

/// C: the chassis. Accepts RS256 and EdDSA tokens of [`ISS`].
pub(crate) fn chassis(spec: ServerSpec) -> ServiceBuilder {
    let keys = vec![
        Key::from_pem(Some("rsa"), Algorithm::RS256, RSA_PUB).expect("the fixture key is valid"),
        Key::from_pem(Some("ed"), Algorithm::EdDSA, ED_PUB).expect("the fixture key is valid"),
    ];
    let mut verifier = Verifier::builder().keys(ISS, AUD, keys);
    if let Some(capacity) = spec.cache {
        verifier = verifier.cache_capacity(capacity);
    }
    let api = (0..spec.routes).fold(Api::new(), |a, i| {
        a.route(
            api::get(&route_path(i), ticket)
                .requires(&format!("ticketing:{{account}}:view:{}", route_resource(i)))
                .undocumented("a test route"),
        )
    });
    ServiceBuilder::new("ticketing", 1)
        .verifier(verifier.build().expect("the verifier builds"))
        .api(api)
}
