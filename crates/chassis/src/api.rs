//! The API route table: every route says who may call it.
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
//! the feature, and only public routes can be served. The
//! handler receives what was checked: the [`Principal`], the validated
//! [`AccountId`], and an [`Authz`] handle for resource-level checks (such as
//! "only the owner may cancel") that go through the same decision and audit
//! path.
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
//! # Example
//!
//! A service with three routes:
//!
//! ```
//! use axum::Json;
//! use chassis::{
//!     api::{self, Api, Authz},
//!     auth::Principal,
//!     permission::{AccountId, Permission},
//! };
//!
//! async fn list(account: AccountId) -> Json<Vec<String>> {
//!     Json(vec![format!("tickets of {account}")])
//! }
//!
//! async fn cancel(account: AccountId, authz: Authz) -> Result<&'static str, api::Forbidden> {
//!     // A resource-level check, recorded in the same audit event.
//!     let owner_only = Permission::new("ticketing", Some(&account), "cancel", "own-ticket").unwrap();
//!     authz.check(&owner_only)?;
//!     Ok("cancelled")
//! }
//!
//! async fn status() -> &'static str {
//!     "open"
//! }
//!
//! let api: Api = Api::new()
//!     .route(api::get("/{account}/tickets", list).requires("ticketing:{account}:view:ticket"))
//!     .route(api::delete("/{account}/tickets/{id}", cancel).requires("ticketing:{account}:delete:ticket"))
//!     .route(api::get("/status", status).public());
//! # let _ = api;
//! ```

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    extract::{FromRequestParts, RawPathParams, Request},
    handler::Handler,
    response::{IntoResponse, Response},
    routing::{MethodRouter, on},
};
use http::{HeaderValue, Method, StatusCode, header, request::Parts};
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

use crate::{
    auth::{Principal, Reason, Verifier},
    context::{AuditDecision, AuditNote, RequestContext},
    permission::{AccountId, Decision, Permission, PermissionTemplate},
    problem::Problem,
    protect::CatchPanicLayer,
};

/// Who may call a route.
#[derive(Debug, Clone)]
enum Access {
    Public,
    Permission(PermissionTemplate),
}

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
            Endpoint::new(Method::$method, path, on(filter(&Method::$method), handler))
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
///     .route(api::get("/greeting", greet).public())
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

    /// The API's paths, each with its handlers and its guard; or every
    /// problem, each naming its route. The service builder wraps each path
    /// in its layers once: every layer level axum adds boxes the route
    /// again, which costs a clone and an allocation on every request.
    pub(crate) fn build(
        self,
        prefix: &str,
        verifier: Option<&Verifier>,
    ) -> Result<Vec<ApiPath>, Vec<String>> {
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        let mut paths: Vec<(String, MethodRouter, Vec<Declared>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for e in self.endpoints {
            let name = format!("{} {prefix}{}", e.method, e.path);
            if !e.path.starts_with('/') {
                problems.push(format!("{name}: the path must start with `/`"));
                continue;
            }
            if !seen.insert((e.method.clone(), e.path.clone())) {
                problems.push(format!("{name}: declared twice"));
                continue;
            }
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
                let params = path_params(&e.path);
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
        Ok(paths
            .into_iter()
            .map(|(path, router, methods)| ApiPath {
                path,
                router,
                guard: GuardLayer::new(methods, verifier.cloned()),
            })
            .collect())
    }
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
    /// let api = Api::new().route(api::get("/items/{id}", || async { "item" }).public());
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
        for path in self.build(prefix, verifier)? {
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

/// A method declared on a path, with its access.
type Declared = (Method, Arc<Access>);

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
            .field("allow", &self.guard.methods.allow)
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
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|p| p.trim_start_matches('*'))
        .collect()
}

/// The 403 of a permission that is not granted; names the permission.
#[derive(Debug, Clone)]
pub struct Forbidden {
    permission: Permission,
}

impl Forbidden {
    /// The 403 of `permission`.
    pub(crate) fn new(permission: Permission) -> Self {
        Self { permission }
    }

    /// The permission that was required.
    pub fn permission(&self) -> &Permission {
        &self.permission
    }
}

impl IntoResponse for Forbidden {
    fn into_response(self) -> Response {
        Problem::new(StatusCode::FORBIDDEN)
            .with_detail(format!(
                "The caller lacks the permission `{}`.",
                self.permission
            ))
            .with_member("reason", Reason::Forbidden.code())
            .with_member("permission", self.permission.as_str())
            .into_response()
    }
}

/// Resource-level authorization inside a handler, through the same decision
/// and audit path as the route's own check.
#[derive(Debug, Clone)]
pub struct Authz {
    principal: Principal,
    note: Option<AuditNote>,
}

impl Authz {
    /// The caller.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// Allows when the caller's grants allow `permission`; otherwise records
    /// the denial in the call's audit event and returns the 403.
    ///
    /// # Errors
    ///
    /// [`Forbidden`] naming the permission.
    pub fn check(&self, permission: &Permission) -> Result<(), Forbidden> {
        if self.principal.grants().decide(permission).is_allowed() {
            return Ok(());
        }
        self.deny(permission);
        Err(Forbidden {
            permission: permission.clone(),
        })
    }

    /// Records a denial decided by the handler itself (e.g. the caller is
    /// not the owner) and returns the 403.
    pub fn deny(&self, permission: &Permission) -> Forbidden {
        if let Some(note) = &self.note {
            note.update(|n| {
                n.permission = Some(permission.clone());
                n.decision = Some((AuditDecision::Deny, Some(Reason::Forbidden.code())));
            });
        }
        Forbidden {
            permission: permission.clone(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Authz {
    type Rejection = crate::auth::AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state).await?;
        Ok(Self {
            principal,
            note: AuditNote::of(&parts.extensions).cloned(),
        })
    }
}

/// Extracts the account the chassis validated and authorised; 404 on a route
/// without an account.
impl<S: Send + Sync> FromRequestParts<S> for AccountId {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        authorized(&parts.extensions)
            .and_then(|(_, account)| account)
            .ok_or_else(Problem::not_found)
    }
}

/// Per-path layer: for the request's method, authenticate, validate the
/// path and authorize; a method the path does not declare is answered 405.
#[derive(Clone)]
pub(crate) struct GuardLayer {
    methods: Methods,
    verifier: Option<Verifier>,
}

/// The declared methods of a path, each with its access, and the `Allow`
/// header naming them.
#[derive(Clone)]
struct Methods {
    access: Arc<[Declared]>,
    allow: HeaderValue,
}

impl Methods {
    /// The access of `method`; a `HEAD` request is served by the `GET`
    /// handler, so it takes that route's access.
    fn of(&self, method: &Method) -> Option<&Arc<Access>> {
        let find = |m: &Method| self.access.iter().find(|(d, _)| d == m).map(|(_, a)| a);
        find(method).or_else(|| {
            (*method == Method::HEAD)
                .then(|| find(&Method::GET))
                .flatten()
        })
    }
}

impl GuardLayer {
    fn new(access: Vec<Declared>, verifier: Option<Verifier>) -> Self {
        let mut allow: Vec<&str> = Vec::new();
        for (m, _) in &access {
            allow.push(m.as_str());
            if *m == Method::GET && !access.iter().any(|(d, _)| *d == Method::HEAD) {
                allow.push("HEAD");
            }
        }
        let allow =
            HeaderValue::from_str(&allow.join(",")).expect("method names are valid header values");
        Self {
            methods: Methods {
                access: access.into(),
                allow,
            },
            verifier,
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            methods: self.methods.clone(),
            verifier: self.verifier.clone(),
        }
    }
}

/// Service built by the guard layer.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    methods: Methods,
    verifier: Option<Verifier>,
}

impl<S> fmt::Debug for Guard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("allow", &self.methods.allow)
            .finish_non_exhaustive()
    }
}

/// Runs an async fn that never waits (axum's path extractor) to completion.
fn now<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    match fut
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Checks `principal` against the route's template; the request to pass on,
/// or the answer.
fn authorize(
    access: &Arc<Access>,
    template: &PermissionTemplate,
    principal: Principal,
    mut req: Request,
) -> Result<Request, Box<Response>> {
    // The note is also what the extractors read (see [`authorized`]); the
    // audit step opens it, or the guard when used without one.
    let note = RequestContext::with(&mut req, |ctx| ctx.note().clone());
    // What the audit event learns, recorded in one update of the note.
    // Takes the permission by value: on the allowed path it moves into the
    // note rather than being copied.
    let record = |principal: Principal,
                  permission: Option<Permission>,
                  account: Option<&AccountId>,
                  decision: (AuditDecision, Option<&'static str>)| {
        note.update(|x| {
            x.principal = Some(principal);
            x.permission = permission;
            x.account = account.cloned();
            x.decision = Some(decision);
        });
    };
    let (mut parts, body) = req.into_parts();
    let params = now(RawPathParams::from_request_parts(&mut parts, &())).and_then(Result::ok);
    let lookup = |name: &str| {
        params
            .as_ref()?
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    };
    let (permission, account) = match fill(access, template, lookup) {
        Ok(filled) => filled,
        Err(param) => {
            tracing::debug!(
                param,
                "path parameter outside its grammar; refused before authorization"
            );
            record(
                principal,
                None,
                None,
                (AuditDecision::Rejected, Some("invalid_path")),
            );
            return Err(Box::new(Problem::not_found().into_response()));
        }
    };
    match principal.grants().decide(&permission) {
        Decision::Allow => {
            record(
                principal,
                Some(permission),
                account.as_ref(),
                (AuditDecision::Allow, None),
            );
            Ok(Request::from_parts(parts, body))
        }
        Decision::DeniedExplicitly | Decision::NoGrant => {
            record(
                principal,
                Some(permission.clone()),
                account.as_ref(),
                (AuditDecision::Deny, Some(Reason::Forbidden.code())),
            );
            Err(Box::new(Forbidden { permission }.into_response()))
        }
    }
}

/// The caller and account an authorized call was checked for, as the guard
/// recorded them in the call's audit note; read by the [`Principal`] and
/// [`AccountId`] extractors and the outgoing client. The guard records a
/// caller only once its token verified, and a handler runs only when the
/// guard allowed the call.
/// How many filled permissions each thread keeps, see [`fill`].
const FILLED_SLOTS: usize = 16;

/// A permission filled from a template and an account.
struct Filled {
    /// The route's access, kept alive so its address is not reused while
    /// the entry stands.
    access: Arc<Access>,
    account: AccountId,
    permission: Permission,
}

thread_local! {
    static FILLED: std::cell::RefCell<[Option<Filled>; FILLED_SLOTS]> =
        const { std::cell::RefCell::new([const { None }; FILLED_SLOTS]) };
}

/// [`PermissionTemplate::fill`], remembered per thread for templates whose
/// only placeholder is the account (`svc:{account}:op:object`): the
/// permission is then a function of the template and the account's text,
/// so a request for an account this thread has just served on the same
/// route gets the same validated account and permission without parsing,
/// validating or allocating them again. An entry is used only for the very
/// template (by address, held alive) and the same account text, byte for
/// byte.
fn fill<'a>(
    access: &Arc<Access>,
    template: &PermissionTemplate,
    params: impl Fn(&str) -> Option<&'a str>,
) -> Result<(Permission, Option<AccountId>), String> {
    let Some(value) = template.only_account_param().and_then(&params) else {
        return template.fill(params);
    };
    let slot = {
        let mut h = (Arc::as_ptr(access) as usize >> 4) ^ value.len();
        for b in value.bytes().take(16) {
            h = h.wrapping_mul(31).wrapping_add(usize::from(b));
        }
        h % FILLED_SLOTS
    };
    let hit = FILLED.with_borrow(|filled| match &filled[slot] {
        Some(f) if Arc::ptr_eq(&f.access, access) && f.account.as_str() == value => {
            Some((f.permission.clone(), Some(f.account.clone())))
        }
        _ => None,
    });
    if let Some(hit) = hit {
        return Ok(hit);
    }
    let (permission, account) = template.fill(params)?;
    if let Some(account) = &account {
        FILLED.with_borrow_mut(|filled| {
            filled[slot] = Some(Filled {
                access: access.clone(),
                account: account.clone(),
                permission: permission.clone(),
            });
        });
    }
    Ok((permission, account))
}

pub(crate) use crate::context::authorized;

fn unauthenticated(req: &Request, reason: Reason) -> Response {
    if let Some(note) = AuditNote::of(req.extensions()) {
        let decision = match reason {
            Reason::Forbidden => AuditDecision::Deny,
            _ => AuditDecision::Unauthenticated,
        };
        note.decide(decision, reason.code());
    }
    reason.problem().into_response()
}

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let Some(access) = self.methods.of(req.method()) else {
            // Not declared: refused here, before any handler a hand-built
            // method router might hold for it.
            return GuardFuture::ready(
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    [(header::ALLOW, self.methods.allow.clone())],
                )
                    .into_response(),
            );
        };
        let template = match &**access {
            Access::Public => {
                if let Some(note) = AuditNote::of(req.extensions()) {
                    note.decide(AuditDecision::Allow, "public");
                }
                return GuardFuture::inner(self.inner.call(req));
            }
            Access::Permission(t) => t,
        };
        let Some(verifier) = &self.verifier else {
            // The builder refuses this; answer as a misconfiguration would.
            return GuardFuture::ready(Problem::internal().vetted().into_response());
        };
        match verifier.verify_cached(req.headers()) {
            Some(Ok(principal)) => match authorize(access, template, principal, req) {
                Ok(req) => GuardFuture::inner(self.inner.call(req)),
                Err(res) => GuardFuture::ready(*res),
            },
            Some(Err(e)) => GuardFuture::ready(unauthenticated(&req, e.reason())),
            None => {
                // Not cached: verify (may fetch keys), then go on.
                let verifier = verifier.clone();
                let access = access.clone();
                let inner = self.inner.clone();
                GuardFuture::slow(Box::pin(async move {
                    let Access::Permission(template) = &*access else {
                        unreachable!("public routes return above")
                    };
                    match verifier.verify(req.headers()).await {
                        Ok(principal) => match authorize(&access, template, principal, req) {
                            Ok(req) => inner.oneshot(req).await,
                            Err(res) => Ok(*res),
                        },
                        Err(e) => Ok(unauthenticated(&req, e.reason())),
                    }
                }))
            }
        }
    }
}

type SlowFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

pin_project! {
    /// Response future of [`Guard`].
    pub struct GuardFuture<F> {
        #[pin]
        kind: GuardKind<F>,
    }
}

pin_project! {
    #[project = GuardProj]
    enum GuardKind<F> {
        Inner { #[pin] inner: F },
        Ready { response: Option<Response> },
        Slow { fut: SlowFuture },
    }
}

impl<F> GuardFuture<F> {
    fn inner(inner: F) -> Self {
        Self {
            kind: GuardKind::Inner { inner },
        }
    }

    fn ready(response: Response) -> Self {
        Self {
            kind: GuardKind::Ready {
                response: Some(response),
            },
        }
    }

    fn slow(fut: SlowFuture) -> Self {
        Self {
            kind: GuardKind::Slow { fut },
        }
    }
}

impl<F> fmt::Debug for GuardFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GuardFuture")
    }
}

impl<F> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            GuardProj::Inner { inner } => inner.poll(cx),
            GuardProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            GuardProj::Slow { fut } => fut.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_permissions_are_remembered_per_template_and_account() {
        // More templates than the thread keeps: slots are shared, and every
        // answer must still be its own template's.
        let templates: Vec<Arc<Access>> = (0..64)
            .map(|i| {
                Arc::new(Access::Permission(
                    format!("svc:{{account}}:op{i}:thing").parse().unwrap(),
                ))
            })
            .collect();
        let fill_for = |access: &Arc<Access>, account: &'static str| {
            let Access::Permission(t) = &**access else {
                unreachable!()
            };
            fill(access, t, |name| (name == "account").then_some(account))
        };
        for account in ["a1", "a2", "a1"] {
            for round in 0..3 {
                for (i, access) in templates.iter().enumerate() {
                    let (permission, acc) = fill_for(access, account).unwrap();
                    assert_eq!(
                        permission.to_string(),
                        format!("svc:{account}:op{i}:thing"),
                        "round {round}"
                    );
                    assert_eq!(acc.unwrap().as_str(), account);
                    // A value outside the grammar is refused right after.
                    assert_eq!(fill_for(access, "bad:").unwrap_err(), "account");
                }
            }
        }
        // Other placeholders are filled afresh every time.
        let other = Arc::new(Access::Permission(
            "svc:{account}:view:{kind}".parse().unwrap(),
        ));
        for kind in ["a", "b", "a"] {
            let Access::Permission(t) = &*other else {
                unreachable!()
            };
            let (p, _) = fill(&other, t, |name| match name {
                "account" => Some("a1"),
                _ => Some(kind),
            })
            .unwrap();
            assert_eq!(p.to_string(), format!("svc:a1:view:{kind}"));
        }
    }

    async fn ok() -> &'static str {
        "ok"
    }

    #[test]
    fn undeclared_routes_fail_the_build_by_name() {
        let api = Api::new()
            .route(get("/{account}/tickets", ok).requires("ticketing:{account}:view:ticket"))
            .route(post("/{account}/tickets", ok))
            .route(get("/status", ok).public())
            .route(get("/{id}/things", ok).requires("ticketing:{account}:view:thing"))
            .route(get("/bad", ok).requires("ticketing:*:view:ticket"))
            .route(get("/status", ok).public());
        let problems = api.build("/ticketing/v1", None).unwrap_err();
        let text = problems.join("\n");
        assert!(
            text.contains("POST /ticketing/v1/{account}/tickets: declares neither"),
            "{text}"
        );
        assert!(
            text.contains("GET /ticketing/v1/{id}/things: placeholder `{account}`"),
            "{text}"
        );
        assert!(
            text.contains("GET /ticketing/v1/bad: invalid permission"),
            "{text}"
        );
        assert!(
            text.contains("GET /ticketing/v1/status: declared twice"),
            "{text}"
        );
        #[cfg(feature = "jwt")]
        assert!(text.contains("no token verifier is configured"), "{text}");
        #[cfg(not(feature = "jwt"))]
        assert!(
            text.contains(
                "GET /ticketing/v1/{account}/tickets: requires `ticketing:{account}:view:ticket` but this build of the chassis cannot verify tokens: enable the `jwt` feature"
            ),
            "{text}"
        );
    }

    #[test]
    fn public_only_apis_need_no_verifier() {
        let api = Api::new().route(get("/status", ok).public());
        assert!(api.build("/x/v1", None).is_ok());
    }

    #[test]
    fn path_params_are_found() {
        let p = path_params("/{account}/tickets/{id}/{*rest}");
        assert!(p.contains("account") && p.contains("id") && p.contains("rest"));
    }
}
