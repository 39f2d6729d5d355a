//! Sold-out notices: the call this service makes to another **as itself**.
//!
//! When a hold takes a product's last places, ticketing asks `mail` to tell
//! the operators (`TICKETING_SOLD_OUT_MAIL_TO`). The buyer whose request
//! sold the product out may not send mail, so the call is made with the
//! service's own token (client credentials, `CHASSIS_CLIENT_*`, holding
//! `mail::send:message`), through mail's driver client:
//! `MailClient::as_service(&cx)`. The request's correlation id and trace
//! go with it, and its deadline bounds it.
//!
//! A notice is best effort: the hold stands whatever becomes of it. A
//! failure is logged with its reason and counted in
//! `ticketing_sold_out_notices_total{outcome="failed"}`; `outcome="sent"`
//! counts accepted notices, `"duplicate"` the ones mail had already. The
//! notice's id is `sold-out.<ticket id>`, so mail sends at most one per
//! product however many requests race for its last places. A notice that
//! must never be lost goes through an outbox instead (see `orders`).
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `TICKETING_SOLD_OUT_MAIL_TO` | unset: no notices | where sold-out notices go |
//! | `CHASSIS_DOWNSTREAM_MAIL_URL` | `http://127.0.0.1:8084` | mail, with its other `CHASSIS_DOWNSTREAM_MAIL_*` settings |
//! | `CHASSIS_CLIENT_TOKEN_URL`, `CHASSIS_CLIENT_ID`, `CHASSIS_CLIENT_SECRET` | required with notices | this service's own identity |
//!
//! # Apart from the ticket domain
//!
//! Nothing here knows a ticket: [`Alerts::sold_out`] takes plain values,
//! and its one caller is the line under "The call to another service" in
//! the `reserve` handler. A service made from this template that keeps the
//! call keeps this file, `Settings::sold_out`, `AppState::alerts`, the
//! `mail` dependency and `tests/support/mail.rs`, and calls
//! [`Alerts::sold_out`] from its own handler (`docs/new-service.md`, "Keep
//! the call to another service").

use std::sync::Arc;

use chassis::{
    client::{CallContext, Downstream, TokenSource},
    config::Reader,
    permission::AccountId,
};
use mail::client::{MailClient, MailJob, SoldOut};

/// Sold-out notices by `outcome`: `sent`, `duplicate`, `failed`.
const NOTICES_TOTAL: &str = "ticketing_sold_out_notices_total";

/// Where sold-out notices go, and how they get there.
#[derive(Debug, Clone)]
pub struct SoldOutNotices {
    /// The operators' address.
    pub to: String,
    /// `mail`, called with this service's own token.
    pub mail: Downstream,
}

impl SoldOutNotices {
    /// Reads `TICKETING_SOLD_OUT_MAIL_TO` and, when it is set, the mail
    /// downstream and this service's identity; problems go to `r`. `None`
    /// when notices are off.
    pub fn read(r: &mut Reader<'_>) -> Option<Self> {
        let to: String = r.maybe(
            "TICKETING_SOLD_OUT_MAIL_TO",
            "where sold-out notices go (unset: none are sent)",
        )?;
        if to.is_empty() || to.len() > 254 || !to.contains('@') || to.contains(char::is_whitespace)
        {
            r.problem("TICKETING_SOLD_OUT_MAIL_TO", "must be one mail address");
        }
        let tokens = TokenSource::read_required(
            r,
            "ticketing sends sold-out notices to mail as itself (TICKETING_SOLD_OUT_MAIL_TO is set)",
        );
        let mail = Downstream::builder("mail", "http://127.0.0.1:8084")
            .token_source(tokens)
            .read(r);
        Some(Self { to, mail })
    }
}

/// The handlers' view of the notices: off, or a mail client and an
/// address.
#[derive(Debug, Clone, Default)]
pub(crate) struct Alerts(Option<Arc<(MailClient, String)>>);

impl Alerts {
    pub(crate) fn new(settings: Option<SoldOutNotices>) -> Self {
        Self(settings.map(|s| Arc::new((MailClient::new(s.mail), s.to))))
    }

    /// Tells the operators that product `id` (`name`, `capacity` places)
    /// of `account` is sold out, as this service, within `cx`'s deadline;
    /// never fails the caller. Mail sends at most one notice per `id`.
    pub(crate) async fn sold_out(
        &self,
        cx: &CallContext,
        account: &AccountId,
        id: &str,
        name: &str,
        capacity: u32,
    ) {
        let Some(inner) = &self.0 else { return };
        let (mail, to) = &**inner;
        let job = MailJob::sold_out(
            format!("sold-out.{id}"),
            to.clone(),
            &SoldOut {
                account: account.to_string(),
                ticket_id: id.to_owned(),
                ticket_name: name.to_owned(),
                capacity,
            },
        );
        let outcome = match mail.as_service(cx).send(&job).await {
            Ok(accepted) if accepted.duplicate => "duplicate",
            Ok(_) => "sent",
            Err(e) => {
                tracing::warn!(id, error = %e, "the sold-out notice was not sent");
                "failed"
            }
        };
        metrics::counter!(NOTICES_TOTAL, "outcome" => outcome).increment(1);
    }
}
