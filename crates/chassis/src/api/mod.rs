//! The API route table: every route says who may call it, and how.
//!
//! # The standard
//!
//! **Deny by default.** Every API route declares, next to its definition,
//! either the permission it requires or that it is public. A service with a
//! route that declares neither does not start: building it fails and names
//! the route. The requirement is a template filled from the path, e.g.
//! `ticketing:{account}:create:ticket`; the path value is validated against
//! the segment's grammar first (see [`permission`](crate::permission)), and
//! a value outside it answers 404 before any authorization, so no path can
//! turn a requirement into a wildcard.
//!
//! Every call to a route that requires a permission is **authenticated**
//! ([`auth`](crate::auth)), **authorized** (the caller's grants must allow
//! the filled-in permission; deny wins; no grant means 403) and **audited**
//! ([`audit`](crate::audit)), by the chassis, before the handler runs.
//! Authentication needs the `jwt` feature (on by default): without it, a
//! route that requires a permission fails the build with a message naming
//! the feature, and only public routes can be served. The handler receives
//! what was checked: the [`Principal`](crate::auth::Principal), the
//! validated [`AccountId`](crate::permission::AccountId), and an [`Authz`]
//! handle for resource-level checks (such as "only the owner may cancel")
//! that go through the same decision and audit path. The check is the
//! guard's (`api/guard.rs`); what a handler is given of it is in
//! `api/authz.rs`.
//!
//! Naming permissions: `service:account:operation:object`, all lowercase:
//! the service's own name; `{account}` for per-account resources (empty for
//! the rest); a verb (`view`, `create`, `update`, `delete`, or a domain verb
//! such as `reserve`); the singular noun of the resource (`ticket`).
//!
//! | request | answer | audited as |
//! |---|---|---|
//! | no token, or a bad one | 401 + `reason` | `unauthenticated` |
//! | account in the path outside the grammar (`*`, `%2A`, `1%3Acreate`, `1,2`, too long) | 404 | `rejected`, `invalid_path` |
//! | valid token, permission not granted (or denied) | 403 naming the permission | `deny`, `forbidden` |
//! | valid token, permission granted | the handler's answer | `allow` |
//! | public route | the handler's answer | `allow`, `public` |
//! | a method the path does not declare | 405 with `Allow` | `rejected`, `method_not_allowed` |
//!
//! # The contract: every route documented
//!
//! **Undocumented by default, as denied by default.** Each route declares,
//! next to its permission, what a client needs to call it: a summary, its
//! request body, its answers and their schemas, derived from the Rust types
//! with `#[derive(utoipa::ToSchema)]`. A route that documents no success
//! answer stops the build, and one message names every such route; a route
//! that cannot be documented yet says why with
//! [`.undocumented("why")`](Endpoint::undocumented), which stays visible in
//! the document.
//!
//! Each service serves its **OpenAPI 3.1** document at
//! `GET /<name>/v<N>/openapi.json`: public (no token), not audited, built
//! once when the service is built. `info` names the service, its package
//! version ([`build_info!`](crate::build_info)) and `x-api-version`; the
//! paths are the full paths (`/orders/v1/{account}/orders`) under one
//! relative server, `/`. To each operation the chassis adds what it answers
//! itself, as `application/problem+json` with the `Problem` schema (the
//! members [`Problem`](crate::problem::Problem) writes, with
//! `correlation_id`):
//!
//! | answer | on |
//! |---|---|
//! | `x-permission`: the template, e.g. `orders:{account}:create:order`, also the first line of the description | routes that require one |
//! | `x-permission: public`, and "**Public**" in the description | public routes |
//! | the `bearer` (JWT) security scheme; 401 with `WWW-Authenticate`, 403 naming the permission | routes that require one |
//! | 404 | paths with parameters (an account outside its grammar, an unknown id) |
//! | 400 (unreadable body), 413 (too large), 415 (no or another `Content-Type`) | routes that take a body |
//! | 422, `ValidationProblem` (`reason: invalid_fields`, `errors`: see [`validation`](crate::validation)) | routes that take a body or query parameters |
//! | 500; 503 with `Retry-After` (load shedding, keys unavailable); 504 (timeout) | every route |
//!
//! Beside the document, at `GET /<name>/v<N>/docs`, a page renders it for
//! people: Swagger UI, every asset served by the service itself, public and
//! not audited as the document is (the [`docs_ui`] module, feature
//! `docs-ui`, on by default; without it that path answers 404). The
//! paths `/openapi.json`, `/docs` and those under `/docs/` are the
//! chassis': a route table that declares one does not build.
//!
//! A route's own answer for a status (e.g. its 404 described) replaces
//! the chassis' generic one. The operation id is the handler's function
//! name when that handler serves one route (method and path otherwise), or
//! [`.operation_id(..)`](Endpoint::operation_id); ids are unique.
//!
//! ## Why declared in the route table
//!
//! utoipa-axum puts the documentation in a `#[utoipa::path(..)]` attribute
//! on each handler, repeating its method and path; aide infers it from the
//! handler's extractor and response types through traits each type must
//! implement. Here the documentation sits in the route table, next to
//! `.requires(..)`, where the access is declared and checked, so that one
//! line shows a route's method, path, permission and contract, and the same
//! build check that denies an undeclared route refuses an undocumented one.
//! The schemas still come from the types (utoipa's `ToSchema` derive). The
//! types are named explicitly because handlers often read a body as JSON
//! to validate every field at once ([`validation`](crate::validation)),
//! and their extractor types then say nothing of its schema.
//!
//! # Versions
//!
//! An `Api` is the route table of one version. A service that serves two
//! (a v2, and the v1 its clients still call) gives each its own `Api`
//! ([`ServiceBuilder::version`](crate::ServiceBuilder::version)): each is
//! built under its own prefix, with its own permission templates (v2 may
//! rename an operation, and a grant for it then does not open v1), its own
//! audit (`api_version` in each event) and its own document at
//! `/<name>/v<N>/openapi.json`. A deprecated version's document marks
//! every operation `deprecated: true` and says in `info` since when, its
//! sunset (`x-sunset`) and its successor; its answers carry `Deprecation`,
//! `Sunset` and a `Link` to the successor's document, so a client learns
//! of the move from any call. The [service module](crate::service#api-versions)
//! says when to make a v2 and how long v1 lives.
//!
//! # Example
//!
//! A service with four routes, and its document:
//!
//! ```
//! use axum::{Json, http::StatusCode};
//! use chassis::{
//!     api::{self, Api, Authz},
//!     permission::{AccountId, Permission},
//!     page::{Page, PageRequest},
//! };
//! use serde::{Deserialize, Serialize};
//!
//! /// A lift ticket.
//! #[derive(Clone, Serialize, Deserialize, utoipa::ToSchema)]
//! struct Ticket {
//!     /// `tkt_<uuid>`.
//!     id: String,
//!     /// Display name.
//!     name: String,
//! }
//!
//! /// What creating a ticket takes.
//! #[derive(Deserialize, utoipa::ToSchema)]
//! struct NewTicket {
//!     /// Display name, 1 to 100 characters.
//!     name: String,
//! }
//!
//! async fn create(account: AccountId, Json(new): Json<NewTicket>) -> (StatusCode, Json<Ticket>) {
//!     (StatusCode::CREATED, Json(Ticket { id: format!("tkt_{account}"), name: new.name }))
//! }
//!
//! async fn list(page: PageRequest) -> Page<Ticket> {
//!     page.page(Vec::new(), |t: &Ticket| (String::new(), t.id.clone()))
//! }
//!
//! async fn cancel(account: AccountId, authz: Authz) -> Result<StatusCode, api::Forbidden> {
//!     // A resource-level check, recorded in the same audit event.
//!     let owner_only = Permission::new("ticketing", Some(&account), "cancel", "own-ticket").unwrap();
//!     authz.check(&owner_only)?;
//!     Ok(StatusCode::NO_CONTENT)
//! }
//!
//! async fn status() -> &'static str {
//!     "open"
//! }
//!
//! let api: Api = Api::new()
//!     .route(
//!         api::post("/{account}/tickets", create)
//!             .requires("ticketing:{account}:create:ticket")
//!             .summary("Create a ticket")
//!             .body::<NewTicket>()
//!             .response::<Ticket>(201),
//!     )
//!     .route(
//!         api::get("/{account}/tickets", list)
//!             .requires("ticketing:{account}:view:ticket")
//!             .summary("List tickets, oldest first")
//!             .page::<Ticket>(),
//!     )
//!     .route(
//!         api::delete("/{account}/tickets/{id}", cancel)
//!             .requires("ticketing:{account}:delete:ticket")
//!             .summary("Cancel a ticket")
//!             .param("id", "The ticket's id.")
//!             .response_empty(204, "Cancelled."),
//!     )
//!     .route(
//!         api::get("/status", status)
//!             .public()
//!             .summary("Whether sales are open")
//!             .response_as::<String>(200, "text/plain"),
//!     );
//! # #[cfg(feature = "testing")]
//! # {
//! # use tower::ServiceExt;
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! # rt.block_on(async {
//! let app = chassis::ServiceBuilder::new("ticketing", 1)
//!     .api(api)
//!     .verifier(chassis::testing::TestIssuer::new().verifier())
//!     .config(chassis::Config::default())
//!     .build()
//!     .unwrap()
//!     .router();
//! let req = http::Request::get("/ticketing/v1/openapi.json").body(axum::body::Body::empty()).unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! let body = chassis::problem::body_bytes(res.into_body()).await;
//! let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! let create = &doc["paths"]["/ticketing/v1/{account}/tickets"]["post"];
//! assert_eq!(create["x-permission"], "ticketing:{account}:create:ticket");
//! assert_eq!(create["responses"]["201"]["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Ticket");
//! assert_eq!(create["responses"]["403"]["content"]["application/problem+json"]["schema"]["$ref"], "#/components/schemas/Problem");
//! assert_eq!(doc["paths"]["/ticketing/v1/status"]["get"]["x-permission"], "public");
//! # });
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # let _ = api;
//! ```

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::Arc,
};

use axum::{
    handler::Handler,
    routing::{MethodRouter, on},
};
use http::Method;

use crate::{auth::Verifier, protect::CatchPanicLayer};

mod authz;
mod doc;
#[cfg(feature = "docs-ui")]
#[cfg_attr(docsrs, doc(cfg(feature = "docs-ui")))]
pub mod docs_ui;
mod guard;
mod openapi;

pub use authz::{Authz, Forbidden};
use doc::Doc;
pub(crate) use guard::GuardLayer;
use guard::{Access, Declared};
pub use guard::{Guard, GuardFuture};
pub(crate) use openapi::{
    ApiDoc, DOCUMENT_TYPE as OPENAPI_TYPE, Deprecation as DocDeprecation, PATH as OPENAPI_PATH,
};

/// The docs page's path under the API prefix ([`docs_ui`]); reserved, as
/// the document's, with or without the `docs-ui` feature.
const DOCS_PATH: &str = "/docs";

/// One route: a method, a path, a handler and its access declaration.
///
/// `S` is the type of the state its handler extracts with
/// [`State<S>`](axum::extract::State), `()` when it takes none; the state
/// is given once, to the whole [`Api`], with [`Api::with_state`].
#[must_use = "add it to an `Api` with `Api::route`"]
pub struct Endpoint<S = ()> {
    method: Method,
    path: String,
    router: MethodRouter<S>,
    access: Option<Result<Access, String>>,
    doc: Doc,
}

impl<S> fmt::Debug for Endpoint<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl<S> Endpoint<S> {
    /// A route for `method` at `path` served by `router` (e.g.
    /// `axum::routing::get(handler)`).
    pub fn new(method: Method, path: &str, router: MethodRouter<S>) -> Self {
        Self {
            method,
            path: path.to_owned(),
            router,
            access: None,
            doc: Doc::default(),
        }
    }

    /// Requires the permission `template` (e.g. `ticketing:{account}:view:ticket`),
    /// its placeholders filled from this route's path parameters.
    pub fn requires(mut self, template: &str) -> Self {
        self.access = Some(
            template
                .parse()
                .map(Access::Permission)
                .map_err(|e| format!("invalid permission `{template}`: {e}")),
        );
        self
    }

    /// Marks the route public: no authentication, no authorization (still
    /// audited).
    pub fn public(mut self) -> Self {
        self.access = Some(Ok(Access::Public));
        self
    }
}

fn filter(method: &Method) -> axum::routing::MethodFilter {
    use axum::routing::MethodFilter as F;
    match *method {
        Method::GET => F::GET,
        Method::POST => F::POST,
        Method::PUT => F::PUT,
        Method::PATCH => F::PATCH,
        Method::DELETE => F::DELETE,
        Method::HEAD => F::HEAD,
        Method::OPTIONS => F::OPTIONS,
        _ => F::TRACE,
    }
}

macro_rules! method_fn {
    ($name:ident, $method:ident) => {
        #[doc = concat!("A `", stringify!($method), "` route; declare its access with [`Endpoint::requires`] or [`Endpoint::public`].")]
        pub fn $name<H, T, S>(path: &str, handler: H) -> Endpoint<S>
        where
            H: Handler<T, S>,
            T: 'static,
            S: Clone + Send + Sync + 'static,
        {
            let mut e = Endpoint::new(Method::$method, path, on(filter(&Method::$method), handler));
            e.doc = Doc::for_handler(std::any::type_name::<H>());
            e
        }
    };
}

method_fn!(get, GET);
method_fn!(post, POST);
method_fn!(put, PUT);
method_fn!(patch, PATCH);
method_fn!(delete, DELETE);

/// The routes of a service's API; see the [module docs](self).
///
/// As with axum's `Router<S>`, `S` is the state the handlers extract with
/// [`State<S>`](axum::extract::State). The service builder takes an
/// `Api<()>`: an API whose handlers take state is handed its state with
/// [`with_state`](Api::with_state) first. State so given is checked at
/// compile time (a missing `with_state` does not build), where state passed
/// through an `Extension` is a 500 at run time when it is missing.
///
/// ```
/// use axum::extract::State;
/// use chassis::api::{self, Api};
///
/// #[derive(Clone)]
/// struct Greeter {
///     greeting: &'static str,
/// }
///
/// async fn greet(State(greeter): State<Greeter>) -> String {
///     greeter.greeting.to_owned()
/// }
///
/// let api: Api = Api::new()
///     .route(api::get("/greeting", greet).public().response_as::<String>(200, "text/plain"))
///     .with_state(Greeter { greeting: "hello" });
/// # chassis::ServiceBuilder::new("doc", 1).api(api).build().unwrap();
/// ```
#[must_use]
pub struct Api<S = ()> {
    endpoints: Vec<Endpoint<S>>,
}

impl<S> fmt::Debug for Api<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl<S> Default for Api<S> {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
        }
    }
}

impl<S> Api<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// No routes yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route.
    pub fn route(mut self, endpoint: Endpoint<S>) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Adds every route of `other`.
    pub fn merge(mut self, other: Api<S>) -> Self {
        self.endpoints.extend(other.endpoints);
        self
    }

    /// Gives every handler its state, as axum's `Router::with_state` does:
    /// the result needs no more state (`S2` is usually `()`, what the
    /// service builder takes), and can be merged with other APIs.
    pub fn with_state<S2>(self, state: S) -> Api<S2> {
        Api {
            endpoints: self
                .endpoints
                .into_iter()
                .map(|e| Endpoint {
                    method: e.method,
                    path: e.path,
                    router: e.router.with_state(state.clone()),
                    access: e.access,
                    doc: e.doc,
                })
                .collect(),
        }
    }
}

impl Api {
    /// Whether a route requires a permission (and so a token verifier).
    #[cfg(feature = "jwt")]
    pub(crate) fn requires_auth(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| matches!(e.access, Some(Ok(Access::Permission(_)))))
    }

    /// The API's paths, each with its handlers and its guard, and its
    /// OpenAPI operations; or every problem, each naming its route. The
    /// service builder wraps each path in its layers once: every layer
    /// level axum adds boxes the route again, which costs a clone and an
    /// allocation on every request.
    pub(crate) fn build(
        self,
        prefix: &str,
        verifier: Option<&Verifier>,
    ) -> Result<(Vec<ApiPath>, ApiDoc), Vec<String>> {
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        let mut paths: Vec<(String, MethodRouter, Vec<Declared>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut document = ApiDoc::default();
        let mut operation_ids: HashMap<String, String> = HashMap::new();
        // A handler's name is the operation id of the one route it serves;
        // a handler that serves several leaves each its method and path.
        let mut handlers: HashMap<String, usize> = HashMap::new();
        for e in &self.endpoints {
            if let Some(h) = &e.doc.handler {
                *handlers.entry(h.clone()).or_default() += 1;
            }
        }
        for e in self.endpoints {
            let name = format!("{} {prefix}{}", e.method, e.path);
            if !e.path.starts_with('/') {
                problems.push(format!("{name}: the path must start with `/`"));
                continue;
            }
            if e.path == openapi::PATH {
                problems.push(format!(
                    "{name}: the path is the service's OpenAPI document, which the chassis serves"
                ));
                continue;
            }
            if e.path == DOCS_PATH || e.path.starts_with(&format!("{DOCS_PATH}/")) {
                problems.push(format!(
                    "{name}: the path is reserved for the service's docs page, which the chassis serves"
                ));
                continue;
            }
            if !seen.insert((e.method.clone(), e.path.clone())) {
                problems.push(format!("{name}: declared twice"));
                continue;
            }
            let params = path_params(&e.path);
            problems.extend(document_problems(&name, &e.doc, &params));
            let access = match e.access {
                None => {
                    problems.push(format!(
                        "{name}: declares neither a permission (`.requires(..)`) nor `.public()`; API routes are denied by default"
                    ));
                    continue;
                }
                Some(Err(msg)) => {
                    problems.push(format!("{name}: {msg}"));
                    continue;
                }
                Some(Ok(a)) => a,
            };
            if let Access::Permission(t) = &access {
                for p in t.params() {
                    if !params.contains(p) {
                        problems.push(format!(
                            "{name}: placeholder `{{{p}}}` of `{t}` is not a path parameter"
                        ));
                    }
                }
                if verifier.is_none() {
                    problems.push(format!("{name}: requires `{t}` but {NO_VERIFIER}"));
                }
            }
            // Mounted under the prefix directly rather than with
            // `Router::nest`, which rewrites the URI on every request.
            let full = if e.path == "/" {
                prefix.to_owned()
            } else {
                format!("{prefix}{}", e.path)
            };
            if let Some(method) = doc::http_method(&e.method) {
                let mut d = e.doc;
                if d.handler.as_ref().is_some_and(|h| handlers[h] > 1) {
                    d.handler = None;
                }
                if let Err(p) = document.add_schemas(std::mem::take(&mut d.schemas)) {
                    problems.push(format!("{name}: {p}"));
                }
                let op = openapi::operation(
                    &e.path,
                    &access,
                    d,
                    openapi::default_operation_id(&e.method, &e.path),
                );
                if let Some(id) = &op.operation_id {
                    match operation_ids.get(id) {
                        Some(other) => problems.push(format!(
                            "{name}: operation id `{id}` is also {other}'s; name one with `.operation_id(..)`"
                        )),
                        None => {
                            operation_ids.insert(id.clone(), name.clone());
                        }
                    }
                }
                document.add(&openapi::template(&full), method, op);
            }
            let declared = (e.method, Arc::new(access));
            match index.get(&full) {
                Some(&i) => {
                    let (_, router, methods) = &mut paths[i];
                    *router = std::mem::take(router).merge(e.router);
                    methods.push(declared);
                }
                None => {
                    index.insert(full.clone(), paths.len());
                    paths.push((full, e.router, vec![declared]));
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let paths = paths
            .into_iter()
            .map(|(path, router, methods)| ApiPath {
                path,
                router,
                guard: GuardLayer::new(methods, verifier.cloned()),
            })
            .collect();
        Ok((paths, document))
    }
}

/// What is wrong with a route's documentation: no success answer (unless it
/// says why it is undocumented), mistakes in its declaration, a described
/// parameter the path does not have.
fn document_problems(name: &str, doc: &Doc, params: &HashSet<&str>) -> Vec<String> {
    let mut problems: Vec<String> = doc
        .problems
        .iter()
        .map(|p| format!("{name}: {p}"))
        .collect();
    if doc.undocumented.is_none() && !doc.has_success() {
        problems.push(format!(
            "{name}: documents no success answer (`.response::<T>(status)`, `.page::<T>()`, `.response_empty(status, ..)`, or `.undocumented(\"why\")`); API routes are undocumented by default"
        ));
    }
    for (p, _) in &doc.params {
        if !params.contains(p.as_str()) {
            problems.push(format!(
                "{name}: describes `{{{p}}}`, which is not a path parameter"
            ));
        }
    }
    problems
}

// === impl Api: by hand ===

#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
impl Api {
    /// The API as an axum [`Router`](axum::Router) under `prefix` with each
    /// path behind its guard (405 for an undeclared method, then
    /// authentication, path validation and authorization) and the
    /// [`CatchPanicLayer`], and no other layer: for composing the chassis'
    /// public layers by hand. The service builder runs the same steps, in
    /// the order [`service`](crate::service) lists.
    ///
    /// # Errors
    ///
    /// Every problem of the declarations, each naming its route, as
    /// [`ServiceBuilder::build`](crate::ServiceBuilder::build) reports them.
    ///
    /// # Example
    ///
    /// ```
    /// use chassis::api::{self, Api};
    /// use chassis::{correlation::SetCorrelationIdLayer, problem::EnsureProblemLayer};
    /// use tower::ServiceBuilder;
    ///
    /// let api = Api::new().route(api::get("/items/{id}", || async { "item" }).public().response_as::<String>(200, "text/plain"));
    /// let app = api
    ///     .into_router("/hello/v1", None)
    ///     .unwrap()
    ///     .layer(ServiceBuilder::new().layer(SetCorrelationIdLayer::new()).layer(EnsureProblemLayer::new()));
    /// # let _: axum::Router = app;
    /// ```
    pub fn into_router(
        self,
        prefix: &str,
        verifier: Option<&Verifier>,
    ) -> Result<axum::Router, Vec<String>> {
        let mut router = axum::Router::new();
        for path in self.build(prefix, verifier)?.0 {
            let guard = path.guard_layer();
            router = router.route(&path.path, path.router.layer(guard));
        }
        Ok(router)
    }
}

/// Why a route that requires a permission cannot be served: nothing
/// verifies tokens.
#[cfg(feature = "jwt")]
const NO_VERIFIER: &str =
    "no token verifier is configured (set CHASSIS_AUTH_ISSUER, or give the builder a Verifier)";
#[cfg(not(feature = "jwt"))]
const NO_VERIFIER: &str = "this build of the chassis cannot verify tokens: enable the `jwt` feature of service-chassis (on by default), or make the route public";

/// One path of the API: the handlers of its methods, and the guard that
/// checks each declared method's access and answers 405 to the others.
pub(crate) struct ApiPath {
    pub(crate) path: String,
    pub(crate) router: MethodRouter,
    pub(crate) guard: GuardLayer,
}

impl fmt::Debug for ApiPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiPath")
            .field("path", &self.path)
            .field("allow", self.guard.allow())
            .finish_non_exhaustive()
    }
}

impl ApiPath {
    /// The guard and the panic catcher, as one layer around the handlers.
    pub(crate) fn guard_layer(&self) -> tower::layer::util::Stack<CatchPanicLayer, GuardLayer> {
        tower::layer::util::Stack::new(CatchPanicLayer::new(), self.guard.clone())
    }
}

/// Names of the `{param}` segments of a route path.
fn path_params(path: &str) -> HashSet<&str> {
    openapi::path_params(path).into_iter().collect()
}

#[cfg(test)]
mod tests;
