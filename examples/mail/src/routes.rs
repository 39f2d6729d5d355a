//! The API: each route, the permission it requires, and its handler:
//! `POST /messages` and `GET /messages/{id}`.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    response::{IntoResponse, Response},
};
use chassis::{
    Problem,
    api::{self, Api},
    correlation::{CorrelationId, TraceContext},
};
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;
use tokio::sync::Notify;

use crate::{
    client::{Accepted, MESSAGES_PATH, MailJob, Message, MessageStatus, is_valid_message_id},
    job::{self, ValidJob},
    meters,
    store::{Inserted, NewMessage, Row, Store, parse_status},
};

/// What the handlers share.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) store: Store,
    /// Wakes idle workers when a job is stored.
    pub(crate) wake: Arc<Notify>,
}

/// The routes, under `/mail/v1`.
pub(crate) fn api() -> Api<AppState> {
    Api::new()
        .route(
            api::post("/messages", send)
                .requires("mail::send:message")
                .summary("Queue a mail, once per `message_id`")
                .description("202 when queued; 200 when a job with this `message_id` exists (`duplicate: true`), which stands.")
                .body::<MailJob>()
                .response::<Accepted>(202)
                .response::<Accepted>(200),
        )
        .route(
            api::get("/messages/{id}", get)
                .requires("mail::view:message")
                .summary("A queued, sent or dead-lettered mail")
                .operation_id("get_message")
                .param("id", "The job's `message_id`.")
                .response::<Message>(200),
        )
}

/// Stores a job, once per `message_id`.
async fn send(
    State(state): State<AppState>,
    request_id: CorrelationId,
    trace: TraceContext,
    Json(body): Json<Value>,
) -> Result<Response, Problem> {
    let job = job::validate(&body)?;
    let (status, new) = accept(&state, &job, &request_id, &trace)
        .await
        .map_err(|e| unavailable(&e))?;
    let code = if new {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = HeaderValue::from_str(&format!("{MESSAGES_PATH}/{}", job.message_id))
        .map_err(|_| Problem::internal())?;
    Ok((
        code,
        [(header::LOCATION, location)],
        Json(Accepted {
            message_id: job.message_id,
            status,
            duplicate: !new,
        }),
    )
        .into_response())
}

/// Queues a valid job once per `message_id`, however it arrived (a
/// request, or an `order.placed` event): the job's correlation id, or
/// `fallback` (the request's or the message's), is stored with it, and
/// the worker's send continues `trace`. Its status, and whether it is new
/// (not a duplicate). Returns once the job is committed.
pub(crate) async fn accept(
    state: &AppState,
    job: &ValidJob,
    fallback: &CorrelationId,
    trace: &TraceContext,
) -> Result<(MessageStatus, bool), sqlx::Error> {
    if job.correlation_id_rejected {
        tracing::warn!(
            message_id = %job.message_id,
            correlation_id_rejected = true,
            "the job's correlation_id is not valid; the request's is stored instead"
        );
    }
    let correlation_id = job.correlation_id.as_ref().unwrap_or(fallback);
    let now = chassis::time::now_millis();
    let inserted = state
        .store
        .insert(
            &NewMessage {
                message_id: &job.message_id,
                recipient: job.to.as_ref(),
                template: &job.template,
                data: &job.data,
                correlation_id: correlation_id.as_str(),
                // The worker's send continues this trace.
                traceparent: trace.traceparent().to_str().ok(),
                tracestate: trace.tracestate().and_then(|v| v.to_str().ok()),
            },
            now,
        )
        .await?;
    Ok(match inserted {
        Inserted::New => {
            meters::message("queued");
            state.wake.notify_waiters();
            tracing::info!(
                message_id = %job.message_id,
                template = %job.template,
                job_correlation_id = %correlation_id,
                "mail job queued"
            );
            (MessageStatus::Queued, true)
        }
        Inserted::Existing { status, differs } => {
            meters::duplicate();
            if differs {
                tracing::warn!(
                    message_id = %job.message_id,
                    status = %status,
                    "duplicate message_id with another recipient or template; the first job stands"
                );
            } else {
                tracing::info!(message_id = %job.message_id, status = %status, "duplicate mail job; nothing queued");
            }
            (status, false)
        }
    })
}

/// A stored message.
async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Message>, Problem> {
    if !is_valid_message_id(&id) {
        return Err(Problem::not_found().with_detail("no such message"));
    }
    let row = state
        .store
        .get(&id)
        .await
        .map_err(|e| unavailable(&e))?
        .ok_or_else(|| Problem::not_found().with_detail("no such message"))?;
    message(row).map(Json).map_err(|e| unavailable(&e))
}

fn message(row: Row) -> Result<Message, sqlx::Error> {
    let status = parse_status(&row.status)?;
    Ok(Message {
        message_id: row.message_id,
        to: row.recipient,
        template: row.template,
        status,
        attempts: u32::try_from(row.attempts).unwrap_or(0),
        last_error: row.last_error,
        correlation_id: row.correlation_id,
        created_at: chassis::time::rfc3339_millis(row.created_at),
        next_attempt_at: (status == MessageStatus::Queued)
            .then(|| chassis::time::rfc3339_millis(row.next_attempt_at)),
        sent_at: row.sent_at.map(chassis::time::rfc3339_millis),
    })
}

/// A database failure: 503 with `Retry-After` when it is busy, logged and
/// never shown to the caller (the chassis' mapping).
fn unavailable(e: &sqlx::Error) -> Problem {
    chassis::db::problem(e)
}
