//! The guard step: per path, for the request's method, authenticate, fill
//! and validate the route's permission from the path, authorize, and record
//! the decision in the call's audit note; a method the path does not
//! declare is answered 405 with `Allow`. See the [module docs](super) for
//! the standard and its answers.

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    extract::{FromRequestParts, RawPathParams, Request},
    response::{IntoResponse, Response},
};
use http::{HeaderValue, Method, StatusCode, header};
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

use super::Forbidden;
use crate::{
    auth::{Principal, Reason, Verifier},
    context::{AuditDecision, AuditNote, RequestContext},
    permission::{AccountId, Decision, Permission, PermissionTemplate},
    problem::Problem,
};

/// Who may call a route.
#[derive(Debug, Clone)]
pub(super) enum Access {
    Public,
    Permission(PermissionTemplate),
}

/// A method declared on a path, with its access.
pub(super) type Declared = (Method, Arc<Access>);

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
    pub(super) fn new(access: Vec<Declared>, verifier: Option<Verifier>) -> Self {
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

impl GuardLayer {
    /// The `Allow` header of the path: its declared methods.
    pub(super) fn allow(&self) -> &HeaderValue {
        &self.methods.allow
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
    // The note is also what the extractors read (see `crate::context::authorized`); the
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
            Err(Box::new(Forbidden::new(permission).into_response()))
        }
    }
}

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
pub(super) fn fill<'a>(
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
