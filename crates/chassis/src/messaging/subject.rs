//! Subjects: `<service>.v<N>.<account>.<event>`, validated.

use std::{fmt, str::FromStr, sync::Arc};

use crate::permission::{AccountId, is_name};

/// Why a subject, event name or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// The publishing service's name is outside `[a-z][a-z0-9_-]{0,63}`.
    #[error("the service `{0}` is not a valid name ([a-z][a-z0-9_-]{{0,63}})")]
    Service(String),
    /// The version is 0, or not `v<N>`.
    #[error("the version must be `v<N>` with N at least 1")]
    Version,
    /// The account is outside `[A-Za-z0-9_-]{1,64}`.
    #[error("not a valid account id")]
    Account,
    /// The event name is empty, too long, or has a token outside
    /// `[a-z][a-z0-9_-]{0,63}`.
    #[error("the event name `{0}` is not dot-separated names ([a-z][a-z0-9_-]{{0,63}} each)")]
    Event(String),
    /// Fewer than four dot-separated parts.
    #[error("expected `<service>.v<N>.<account>.<event>`")]
    Shape,
}

/// The longest event name.
pub const MAX_EVENT_LEN: usize = 128;

/// An event name: one or more dot-separated names, each
/// `[a-z][a-z0-9_-]{0,63}`, at most 128 bytes (`order.placed`,
/// `reservation.confirm`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EventName(Arc<str>);

impl EventName {
    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// When it is not an event name.
    pub fn parse(name: &str) -> Result<Self, SubjectError> {
        let ok = !name.is_empty() && name.len() <= MAX_EVENT_LEN && name.split('.').all(is_name);
        if ok {
            Ok(Self(name.into()))
        } else {
            Err(SubjectError::Event(
                name.chars().take(MAX_EVENT_LEN).collect(),
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventName({})", self.0)
    }
}

impl FromStr for EventName {
    type Err = SubjectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated subject `<service>.v<N>.<account>.<event>`, e.g.
/// `orders.v1.67000001.order.placed`: the service that publishes it, the
/// version of its payload, the account it belongs to, and the event.
///
/// ```
/// use chassis::messaging::Subject;
/// use chassis::permission::AccountId;
///
/// let account = AccountId::parse("67000001").unwrap();
/// let subject = Subject::new("orders", 1, &account, "order.placed").unwrap();
/// assert_eq!(subject.as_str(), "orders.v1.67000001.order.placed");
///
/// let parsed = Subject::parse("orders.v1.67000001.order.placed").unwrap();
/// assert_eq!((parsed.service(), parsed.version(), parsed.event()), ("orders", 1, "order.placed"));
/// assert_eq!(parsed.account(), &account);
///
/// // A wildcard or an empty token can never be a subject.
/// assert!(Subject::parse("orders.v1.*.order.placed").is_err());
/// assert!(Subject::parse("orders.v1..order.placed").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    text: Arc<str>,
    service_len: usize,
    version: u32,
    account: AccountId,
    event_at: usize,
}

impl Subject {
    /// The subject of `event` in `account`, published by `service` in
    /// version `version` of its events.
    ///
    /// # Errors
    ///
    /// When the service or event name is invalid, or the version is 0.
    pub fn new(
        service: &str,
        version: u32,
        account: &AccountId,
        event: &str,
    ) -> Result<Self, SubjectError> {
        if !is_name(service) {
            return Err(SubjectError::Service(service.chars().take(64).collect()));
        }
        if version == 0 {
            return Err(SubjectError::Version);
        }
        let event = EventName::parse(event)?;
        let text = format!("{service}.v{version}.{account}.{event}");
        let event_at = text.len() - event.as_str().len();
        Ok(Self {
            text: text.into(),
            service_len: service.len(),
            version,
            account: account.clone(),
            event_at,
        })
    }

    /// Parses a subject as it arrived.
    ///
    /// # Errors
    ///
    /// When it does not follow the convention.
    pub fn parse(subject: &str) -> Result<Self, SubjectError> {
        let mut parts = subject.splitn(4, '.');
        let (Some(service), Some(version), Some(account), Some(event)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SubjectError::Shape);
        };
        let version = parse_version(version)?;
        let account = AccountId::parse(account).map_err(|_| SubjectError::Account)?;
        Self::new(service, version, &account, event)
    }

    /// The whole subject.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The publishing service.
    pub fn service(&self) -> &str {
        &self.text[..self.service_len]
    }

    /// The version of the payload.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The account.
    pub fn account(&self) -> &AccountId {
        &self.account
    }

    /// The event name.
    pub fn event(&self) -> &str {
        &self.text[self.event_at..]
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subject({})", self.text)
    }
}

impl FromStr for Subject {
    type Err = SubjectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// `v<N>`, N ≥ 1, without leading zeros.
fn parse_version(v: &str) -> Result<u32, SubjectError> {
    let digits = v.strip_prefix('v').ok_or(SubjectError::Version)?;
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SubjectError::Version);
    }
    match digits.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(SubjectError::Version),
    }
}

/// The subjects one version of a service's events are published to:
/// `<service>.v<N>.>`, all captured by the service's stream.
pub(crate) fn version_filter(service: &str, version: u32) -> String {
    format!("{service}.v{version}.>")
}

/// The name of the stream holding the events `service` publishes:
/// `<service>-events`.
pub fn stream_name(service: &str) -> String {
    format!("{service}-events")
}

/// The name of the stream holding the dead letters of `service`'s
/// consumers: `<service>-dlq`.
pub fn dead_letter_stream_name(service: &str) -> String {
    format!("{service}-dlq")
}

/// The dead-letter subject of a message on `original` refused or given up
/// by a consumer of `consumer_service`: `<consumer_service>.dlq.<original>`.
pub fn dead_letter_subject(consumer_service: &str, original: &str) -> String {
    format!("{consumer_service}.dlq.{original}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_convention() {
        let s = Subject::parse("orders.v12.acme_1.reservation.confirm").unwrap();
        assert_eq!(s.service(), "orders");
        assert_eq!(s.version(), 12);
        assert_eq!(s.account().as_str(), "acme_1");
        assert_eq!(s.event(), "reservation.confirm");
        for bad in [
            "",
            "orders",
            "orders.v1.acme",
            "orders.v0.acme.order.placed",
            "orders.v01.acme.order.placed",
            "orders.1.acme.order.placed",
            "orders.v1x.acme.order.placed",
            "Orders.v1.acme.order.placed",
            "orders.v1.*.order.placed",
            "orders.v1.>",
            "orders.v1.acme.>",
            "orders.v1.acme.order.*",
            "orders.v1.acme.order..placed",
            "orders.v1.acme.order.placed.",
            "orders.v1.ac me.order.placed",
            "orders.v1.acme.Order.placed",
            "orders.v99999999999.acme.order.placed",
        ] {
            assert!(Subject::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("orders.v1.acme.{}", "a".repeat(129));
        assert!(Subject::parse(&long).is_err());
    }

    #[test]
    fn names_of_streams_and_dead_letters() {
        assert_eq!(stream_name("orders"), "orders-events");
        assert_eq!(dead_letter_stream_name("mail"), "mail-dlq");
        assert_eq!(
            dead_letter_subject("mail", "orders.v1.acme.order.placed"),
            "mail.dlq.orders.v1.acme.order.placed"
        );
        assert_eq!(version_filter("orders", 2), "orders.v2.>");
    }
}
