//! The service's own metrics.

/// Messages by what happened to them: `queued` (accepted), `sent`,
/// `failed` (an attempt failed), `dead` (given up).
pub(crate) const MESSAGES_TOTAL: &str = "mail_messages_total";
/// Messages queued or being sent.
pub(crate) const QUEUE_DEPTH: &str = "mail_queue_depth";
/// Jobs whose `message_id` had been accepted before.
pub(crate) const DUPLICATES_TOTAL: &str = "mail_duplicates_total";

/// Describes the metrics, for the `# HELP` lines.
pub(crate) fn describe() {
    metrics::describe_counter!(
        MESSAGES_TOTAL,
        "Mail messages by outcome: queued (accepted), sent, failed (one attempt), dead"
    );
    metrics::describe_gauge!(QUEUE_DEPTH, "Mail messages queued or being sent");
    metrics::describe_counter!(
        DUPLICATES_TOTAL,
        "Mail jobs whose message_id had been accepted before"
    );
}

/// Counts one message with `status`.
pub(crate) fn message(status: &'static str) {
    metrics::counter!(
        MESSAGES_TOTAL,
        "service" => chassis::metrics::service_label(),
        "status" => status,
    )
    .increment(1);
}

/// Counts one duplicate job.
pub(crate) fn duplicate() {
    metrics::counter!(DUPLICATES_TOTAL, "service" => chassis::metrics::service_label())
        .increment(1);
}

/// Sets the queue depth.
pub(crate) fn queue_depth(depth: i64) {
    #[allow(clippy::cast_precision_loss)] // a queue of 2^53 messages is not a concern
    metrics::gauge!(QUEUE_DEPTH, "service" => chassis::metrics::service_label()).set(depth as f64);
}
