//! The API: each route, the permission it requires, and its handler.
//!
//! By the time a handler runs, the chassis has authenticated the caller,
//! checked the route's permission for the account in the path, and
//! recorded the call for audit; the handler gets the checked account as an
//! [`AccountId`].

use axum::{
    Json,
    extract::{Path, State},
};
use chassis::{
    api::{Api, get, post},
    client::CallContext,
    context::TraceContext,
    otel::Span,
    page::{Page, PageRequest},
    permission::AccountId,
};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    AppState,
    alerts::Alerts,
    client::{NewReservation, NewTicket, Reservation, Ticket},
    error::ApiError,
    store::{self, Store},
    validation,
};

/// What an `Idempotency-Key` may be.
const IDEMPOTENCY_KEY: &str = "^[A-Za-z0-9._~:-]{1,255}$";

/// The routes, under `/ticketing/v1`.
pub(crate) fn api() -> Api<AppState> {
    let ticket_id = "The ticket's id, `tkt_<uuid v7>`.";
    let reservation_id = "The reservation's id, `rsv_<uuid v7>`.";
    let not_held = "`reservation_expired`, `reservation_released` or `reservation_confirmed`: the reservation's status does not allow it.";
    Api::new()
        .route(
            post("/{account}/tickets", create_ticket)
                .requires("ticketing:{account}:create:ticket")
                .summary("Create a ticket product")
                .body::<NewTicket>()
                .response::<Ticket>(201),
        )
        .route(
            get("/{account}/tickets", list_tickets)
                .requires("ticketing:{account}:view:ticket")
                .summary("List the account's tickets, oldest first")
                .page::<Ticket>(),
        )
        .route(
            get("/{account}/tickets/{id}", get_ticket)
                .requires("ticketing:{account}:view:ticket")
                .summary("A ticket")
                .param("id", ticket_id)
                .response::<Ticket>(200),
        )
        .route(
            post("/{account}/reservations", reserve)
                .requires("ticketing:{account}:reserve:ticket")
                .summary("Hold places of a ticket")
                .description("201 with a new reservation; 200 with the earlier one when the `Idempotency-Key` was seen before in this account.")
                .header_matching("Idempotency-Key", false, IDEMPOTENCY_KEY, "1 to 255 of `A-Z a-z 0-9 . _ ~ : -`; a retry with the same key gets the same reservation.")
                .body::<NewReservation>()
                .response::<Reservation>(201)
                .response::<Reservation>(200)
                .problem(409, "`sold_out`: fewer places left than asked for (`available` says how many).")
                .problem(422, "`invalid_fields`: `errors` names each invalid field; `idempotency_key_reused`: this `Idempotency-Key` was used for a different reservation."),
        )
        .route(
            get("/{account}/reservations/{id}", get_reservation)
                .requires("ticketing:{account}:view:ticket")
                .summary("A reservation")
                .param("id", reservation_id)
                .response::<Reservation>(200),
        )
        .route(
            post("/{account}/reservations/{id}/confirm", confirm)
                .requires("ticketing:{account}:reserve:ticket")
                .summary("Confirm a held reservation")
                .param("id", reservation_id)
                .response::<Reservation>(200)
                .problem(409, not_held),
        )
        .route(
            post("/{account}/reservations/{id}/release", release)
                .requires("ticketing:{account}:reserve:ticket")
                .summary("Release a held reservation")
                .param("id", reservation_id)
                .response::<Reservation>(200)
                .problem(409, not_held),
        )
}

/// The `{id}` of a path; the account comes checked, as an [`AccountId`].
#[derive(Debug, Deserialize)]
struct Id {
    id: String,
}

async fn create_ticket(
    account: AccountId,
    State(store): State<Store>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Ticket>), ApiError> {
    let new = validation::new_ticket(&body)?;
    let ticket = store.create_ticket(&account, new).await?;
    Ok((StatusCode::CREATED, Json(ticket)))
}

/// One page of the account's tickets, oldest first (by `created_at`, then
/// `id`), as the chassis' pagination standard says.
async fn list_tickets(
    account: AccountId,
    page: PageRequest,
    State(store): State<Store>,
) -> Result<Page<Ticket>, ApiError> {
    let tickets = store
        .list_tickets(&account, page.after(), page.fetch())
        .await?;
    Ok(page.page(tickets, store::sort_key))
}

async fn get_ticket(
    account: AccountId,
    Path(Id { id }): Path<Id>,
    State(store): State<Store>,
) -> Result<Json<Ticket>, ApiError> {
    Ok(Json(store.ticket(&account, &id).await?))
}

/// 201 with a new reservation; 200 with the earlier one when the
/// `Idempotency-Key` was seen before in this account.
///
/// A hold that takes the last places sends the sold-out notice, as this
/// service (see [`alerts`](crate::alerts)).
async fn reserve(
    account: AccountId,
    State(store): State<Store>,
    State(alerts): State<Alerts>,
    cx: CallContext,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Json<Reservation>), ApiError> {
    let key = validation::idempotency_key(&headers)?;
    let new = validation::new_reservation(&body)?;
    // The transaction, as a span of this request's trace.
    let span = Span::storage(cx.correlation().trace(), store.system(), "reserve");
    let result = traced(
        span,
        store.system(),
        store.reserve(&account, &new, key).await,
    );
    let outcome = match &result {
        Ok(held) if held.created => Some("held"),
        Ok(_) => Some("replayed"),
        Err(ApiError::SoldOut { .. }) => Some("sold_out"),
        Err(_) => None,
    };
    if let Some(outcome) = outcome {
        metrics::counter!(crate::RESERVATIONS_TOTAL, "outcome" => outcome).increment(1);
    }
    let held = result?;
    if held.sold_out
        && let Ok(ticket) = store.ticket(&account, &held.reservation.ticket_id).await
    {
        // The call to another service as this service (src/alerts.rs). Best
        // effort: the hold stands whatever becomes of the notice.
        alerts
            .sold_out(&cx, &account, &ticket.id, &ticket.name, ticket.capacity)
            .await;
    }
    let status = if held.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(held.reservation)))
}

async fn get_reservation(
    account: AccountId,
    Path(Id { id }): Path<Id>,
    State(store): State<Store>,
) -> Result<Json<Reservation>, ApiError> {
    Ok(Json(store.reservation(&account, &id).await?))
}

async fn confirm(
    account: AccountId,
    Path(Id { id }): Path<Id>,
    State(store): State<Store>,
    trace: TraceContext,
) -> Result<Json<Reservation>, ApiError> {
    let span = Span::storage(&trace, store.system(), "confirm");
    Ok(Json(traced(
        span,
        store.system(),
        store.confirm(&account, &id).await,
    )?))
}

async fn release(
    account: AccountId,
    Path(Id { id }): Path<Id>,
    State(store): State<Store>,
    trace: TraceContext,
) -> Result<Json<Reservation>, ApiError> {
    let span = Span::storage(&trace, store.system(), "release");
    Ok(Json(traced(
        span,
        store.system(),
        store.release(&account, &id).await,
    )?))
}

/// Ends a transaction's span, failed when the database failed.
fn traced<T>(
    mut span: Span,
    system: &'static str,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    if matches!(result, Err(ApiError::Database(_) | ApiError::Stored(_))) {
        span.set_error(system);
    }
    result
}
