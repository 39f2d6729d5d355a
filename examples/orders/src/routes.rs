//! The API: each route, the permission it requires, and its handler.
//!
//! By the time a handler runs, the chassis has authenticated the caller,
//! checked the route's permission for the account in the path, and
//! recorded the call for audit.
//!
//! These are version 1's routes, deprecated since v2 ([`v2`]) and served
//! beside it on the same data; placing an order is one piece of code for
//! both, given each version's [`Shape`] ([`Version`]).

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::Bytes,
    extract::{self, Path},
    response::{IntoResponse, Response},
};
use chassis::{
    Problem,
    api::{self, Api},
    auth::Principal,
    client::{CallContext, ClientError},
    correlation::CorrelationId,
    otel::Span,
    page::PageRequest,
    permission::AccountId,
    validation::{FieldError, Fields, Invalid, integer, string},
};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::Value;

use crate::{
    State,
    client::{NewOrder, Order, OrderStatus},
    idempotency::{self, Claim, Lease, Scope},
    store,
};

pub(crate) mod v2;

/// What placing an order differs in from one version to another.
pub(crate) struct Shape {
    /// The route template, part of every idempotency fingerprint, so that a
    /// key used with one version is not replayed in another's shape.
    pub(crate) route: &'static str,
    /// `/orders/v<N>`, for the `Location` of a new order.
    pub(crate) prefix: &'static str,
    /// The request body, checked.
    pub(crate) validate: fn(&Value) -> Result<NewOrder, Invalid>,
    /// The answer's body.
    pub(crate) render: fn(&Order) -> String,
}

/// A version of the API, as [`place`] takes it.
pub(crate) trait Version: Send + Sync + 'static {
    /// How it places an order.
    const SHAPE: Shape;
}

/// Version 1.
pub(crate) enum V1 {}

impl Version for V1 {
    const SHAPE: Shape = Shape {
        route: PLACE_ROUTE,
        prefix: "/orders/v1",
        validate,
        render: |order| serde_json::to_string(order).unwrap_or_default(),
    };
}

/// What placing an order says of itself, in every version.
pub(crate) const PLACE_DESCRIPTION: &str = "Reserves the tickets in ticketing, then records the order and its `order.placed` event in one transaction. A retry with the same `Idempotency-Key` gets the first answer again, with `Idempotent-Replayed: true`.";
/// The `Idempotency-Key` header of placing an order.
pub(crate) const IDEMPOTENCY_KEY: &str =
    "1 to 255 of `A-Z a-z 0-9 . _ ~ : -`, unique per order the caller means.";
/// The grammar of the `Idempotency-Key` header, as a JSON Schema pattern.
pub(crate) const IDEMPOTENCY_KEY_PATTERN: &str = "^[A-Za-z0-9._~:-]{1,255}$";
/// The 422 of placing an order: the chassis' validation answer, and a key
/// reused for a different order.
pub(crate) const PLACE_UNPROCESSABLE: &str = "`invalid_fields`: `errors` names each invalid field (`no such ticket` for a ticket ticketing does not have); `idempotency_key_reused`: this `Idempotency-Key` was used for a different order.";
/// The 409 of placing an order.
pub(crate) const PLACE_CONFLICT: &str = "`sold_out`: not enough tickets left; `idempotency_key_in_use`: a request with this key is running (see `Retry-After`).";

/// The routes, under `/orders/v1`.
pub(crate) fn api() -> Api<Arc<State>> {
    Api::new()
        .route(
            api::post("/{account}/orders", place::<V1>)
                .requires("orders:{account}:create:order")
                .summary("Place an order")
                .description(PLACE_DESCRIPTION)
                .header_matching(
                    "Idempotency-Key",
                    true,
                    IDEMPOTENCY_KEY_PATTERN,
                    IDEMPOTENCY_KEY,
                )
                .body::<NewOrder>()
                .response::<Order>(201)
                .problem(409, PLACE_CONFLICT)
                .problem(422, PLACE_UNPROCESSABLE),
        )
        .route(
            api::get("/{account}/orders", list)
                .requires("orders:{account}:view:order")
                .summary("List the account's orders, newest first")
                .page::<Order>(),
        )
        .route(
            api::get("/{account}/orders/{id}", get)
                .requires("orders:{account}:view:order")
                .summary("An order")
                .operation_id("get_order")
                .param("id", "The order's id, `ord_<uuid v7>`.")
                .response::<Order>(200),
        )
}

/// The route template, part of every fingerprint.
const PLACE_ROUTE: &str = "/orders/v1/{account}/orders";

/// A storage failure: 503 with `Retry-After` when the database is busy,
/// logged and never shown (the chassis' mapping).
fn internal(e: &sqlx::Error) -> Response {
    chassis::db::problem(e).into_response()
}

/// Checks a new order; every problem at once.
pub(crate) fn validate(body: &Value) -> Result<NewOrder, Invalid> {
    let mut f = Fields::of(body)?;
    let ticket_id = f.required("ticket_id", |v| {
        let s = string(v)?;
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| s.to_owned())
            .ok_or("must be 1-64 characters of [A-Za-z0-9_-]")
    });
    let quantity = f.required("quantity", |v| {
        u32::try_from(integer(v)?)
            .ok()
            .filter(|q| (1..=100).contains(q))
            .ok_or("must be a whole number from 1 to 100")
    });
    let email = f.required("email", |v| {
        let s = string(v)?;
        valid_email(s)
            .then(|| s.to_owned())
            .ok_or("must be an e-mail address")
    });
    f.finish(|| {
        Some(NewOrder {
            ticket_id: ticket_id?,
            quantity: quantity?,
            email: email?,
        })
    })
}

/// A plausible address: `local@domain`, no spaces or control characters, at
/// most 254 characters. The mail service checks it fully.
fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    s.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && s.chars().all(|c| c.is_ascii_graphic())
}

/// Replays a stored answer.
fn replay(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        chassis::problem::CONTENT_TYPE
    };
    (
        status,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (idempotency::REPLAYED, HeaderValue::from_static("true")),
        ],
        body,
    )
        .into_response()
}

/// `POST /orders/v<N>/{account}/orders`: places an order as version `V`
/// takes and shows it.
pub(crate) async fn place<V: Version>(
    extract::State(state): extract::State<Arc<State>>,
    account: AccountId,
    principal: Principal,
    correlation: CorrelationId,
    cx: CallContext,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shape = &V::SHAPE;
    let key = match idempotency::key_of(&headers) {
        Ok(k) => k,
        Err(detail) => {
            return Problem::new(StatusCode::BAD_REQUEST)
                .with_detail(detail)
                .into_response();
        }
    };
    let Ok(json) = serde_json::from_slice::<Value>(&body) else {
        return Problem::new(StatusCode::BAD_REQUEST)
            .with_detail("The body must be a JSON object.")
            .into_response();
    };
    let new = match (shape.validate)(&json) {
        Ok(n) => n,
        Err(invalid) => return invalid.into_response(),
    };
    let scope = Scope {
        account: account.to_string(),
        principal: principal.subject().to_owned(),
        key,
    };
    let fingerprint = idempotency::fingerprint("POST", shape.route, &scope.account, &json);
    let system = state.db.backend().system_name();
    let mut claiming = Span::storage(cx.correlation().trace(), system, "claim key");
    let claim = idempotency::claim(&state.db, &scope, &fingerprint, state.lease).await;
    if claim.is_err() {
        claiming.set_error(system);
    }
    claiming.end();
    let lease = match claim {
        Err(e) => return internal(&e),
        Ok(Claim::Replay { status, body }) => return replay(status, body),
        Ok(Claim::Mismatch) => {
            return Problem::new(StatusCode::UNPROCESSABLE_ENTITY)
                .with_detail("This Idempotency-Key was used for a different request.")
                .with_member("reason", "idempotency_key_reused")
                .into_response();
        }
        Ok(Claim::InProgress { retry_after }) => return in_progress(retry_after),
        Ok(Claim::Run(lease)) => lease,
    };

    // Reserve, as the orders service, with a key derived from this one: a
    // run that takes over a dead one gets the same reservation back.
    let reservation = state
        .ticketing
        .as_service(&cx)
        .reserve(
            &account,
            &ticketing::client::NewReservation {
                ticket_id: new.ticket_id.clone(),
                quantity: new.quantity,
            },
            &scope.derived_key("reserve"),
        )
        .await;
    let reservation = match reservation {
        Ok(r) => r,
        Err(e) => return refused(&state, &scope, lease, e).await,
    };

    let order = Order {
        id: chassis::id::prefixed("ord"),
        account: scope.account.clone(),
        ticket_id: new.ticket_id,
        quantity: new.quantity,
        email: new.email,
        reservation_id: reservation.id,
        status: OrderStatus::Placed,
        created_at: chassis::time::now_rfc3339(),
    };
    let body = (shape.render)(&order);
    // The transaction is a span of its own; the outbox events it writes
    // carry it, and their delivery continues the trace from there.
    let mut span = Span::storage(cx.correlation().trace(), system, "place order");
    let placed = store::place(
        &state.db,
        &scope,
        lease,
        &order,
        correlation.as_str(),
        span.trace(),
        &body,
        state.crash,
    )
    .await;
    if placed.is_err() {
        span.set_error(system);
    }
    span.end();
    match placed {
        Ok(true) => {}
        // The lease ran out and a retry took the key over: that request
        // answers, with the same reservation (its key is derived from
        // this one); nothing of this one was committed.
        Ok(false) => return in_progress(Duration::from_secs(1)),
        Err(e) => {
            // Nothing was committed: give the key back so a retry runs again
            // (the held reservation is found again by its key, or expires).
            let _ = idempotency::release(&state.db, &scope, lease).await;
            return internal(&e);
        }
    }
    crate::CrashPoint::reached(state.crash, crate::CrashPoint::AfterCommit);
    tracing::info!(order_id = %order.id, account = %order.account, "order placed");
    metrics::counter!("orders_placed_total").increment(1);
    let location = format!("{}/{}/orders/{}", shape.prefix, order.account, order.id);
    (
        StatusCode::CREATED,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::LOCATION,
                HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/")),
            ),
        ],
        body,
    )
        .into_response()
}

/// 409: a request with the same key is running.
fn in_progress(retry_after: Duration) -> Response {
    Problem::new(StatusCode::CONFLICT)
        .with_detail("A request with this Idempotency-Key is in progress; retry later.")
        .with_member("reason", "idempotency_key_in_use")
        .with_header(header::RETRY_AFTER, idempotency::retry_after(retry_after))
        .into_response()
}

/// The answer when ticketing did not reserve: final answers (sold out, no
/// such ticket) are stored for replay; anything else gives the key back.
async fn refused(state: &State, scope: &Scope, lease: Lease, e: ClientError) -> Response {
    let final_answer = match e.status() {
        Some(StatusCode::CONFLICT) => Some(
            Problem::new(StatusCode::CONFLICT)
                .with_detail("Not enough tickets are left.")
                .with_member("reason", "sold_out"),
        ),
        Some(StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY) => Some(Problem::from(
            Invalid::from(FieldError::field("ticket_id", "no such ticket")),
        )),
        _ => None,
    };
    match final_answer {
        Some(problem) => {
            let status = problem.status();
            let body = serde_json::to_string(&problem).unwrap_or_default();
            // Not stored when the key was taken over meanwhile: the request
            // that took it stores its own answer.
            if let Err(db) =
                idempotency::complete(&state.db, scope, lease, status.as_u16(), &body).await
            {
                let _ = idempotency::release(&state.db, scope, lease).await;
                return internal(&db);
            }
            problem.into_response()
        }
        None => {
            let _ = idempotency::release(&state.db, scope, lease).await;
            e.into_response()
        }
    }
}

/// `GET /orders/v1/{account}/orders`: one page of the account's orders,
/// newest first (by `created_at`, then `id`), as the chassis' pagination
/// standard says (`?limit=` and `?cursor=`, `next` in the body and `Link`).
pub(crate) async fn list(
    extract::State(state): extract::State<Arc<State>>,
    account: AccountId,
    page: PageRequest,
) -> Response {
    match store::list(&state.db, account.as_str(), page.after(), page.fetch()).await {
        Ok(orders) => page
            .page(orders, |o| (o.created_at.clone(), o.id.clone()))
            .into_response(),
        Err(e) => internal(&e),
    }
}

/// `GET /orders/v1/{account}/orders/{id}`.
pub(crate) async fn get(
    extract::State(state): extract::State<Arc<State>>,
    account: AccountId,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    match store::get(&state.db, account.as_str(), &id).await {
        Ok(Some(order)) => Json(order).into_response(),
        Ok(None) => Problem::not_found().into_response(),
        Err(e) => internal(&e),
    }
}
