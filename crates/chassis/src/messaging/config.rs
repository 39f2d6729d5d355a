//! `CHASSIS_NATS_*`: where the broker is and how consumers behave.

use std::{fmt, time::Duration};

use crate::config::{Reader, Secret};

/// Messaging settings from the environment.
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `CHASSIS_NATS_URL` | unset | the broker, `nats://[user:password@]host:port` (or `tls://`), several separated by commas; **unset: no broker**, and the service keeps its HTTP relay. A secret: never printed |
/// | `CHASSIS_NATS_DUPLICATE_WINDOW_SECS` | `120` | how long a publisher's stream remembers event ids (`Nats-Msg-Id`) to drop a re-published event |
/// | `CHASSIS_NATS_MAX_DELIVER` | `5` | deliveries of a message before it is dead-lettered with its last error |
/// | `CHASSIS_NATS_BACKOFF_MS` | `1000,5000,30000` | delay before each redelivery after a retryable failure; the last value repeats |
/// | `CHASSIS_NATS_MAX_IN_FLIGHT` | `64` | messages a consumer handles at once (JetStream's `max_ack_pending` too); `1` handles one message at a time, one per fetch |
/// | `CHASSIS_NATS_BATCH` | `16` | messages asked for per fetch, at most the in-flight bound |
/// | `CHASSIS_NATS_ACK_WAIT_SECS` | `30` | how long a delivered message may go unacknowledged before the broker delivers it again (a consumer that died) |
/// | `CHASSIS_NATS_MAX_LAG` | `10000` | a consumer with more messages waiting or unacknowledged than this is not ready |
/// | `CHASSIS_NATS_LAG_POLL_MS` | `2000` | how often a consumer asks the broker for its lag |
/// | `CHASSIS_NATS_PREFIX` | unset | a name (`[a-z][a-z0-9_-]{0,31}`) put before every service's name on the broker, `<prefix>-<service>` ([`name`](Self::name)): several systems (test runs, demos) share one server, each with its own streams, subjects and consumers |
///
/// ```
/// use chassis::config::{Env, Reader};
/// use chassis::messaging::MessagingConfig;
///
/// let env = Env::from_pairs([
///     ("CHASSIS_NATS_URL", "nats://svc:s3cret@127.0.0.1:4222"),
///     ("CHASSIS_NATS_MAX_IN_FLIGHT", "1"),
/// ]);
/// let mut r = Reader::new(&env);
/// let config = MessagingConfig::read(&mut r).unwrap();
/// r.finish().unwrap();
/// assert_eq!(config.max_in_flight, 1);
/// assert_eq!(config.batch(), 1, "one at a time is one setting");
/// assert!(!format!("{config:?}").contains("s3cret"));
///
/// // No URL, no broker: the service keeps its HTTP relay.
/// let empty = Env::from_pairs::<&str, &str>([]);
/// assert!(MessagingConfig::read(&mut Reader::new(&empty)).is_none());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct MessagingConfig {
    /// `CHASSIS_NATS_URL`.
    pub url: Secret<String>,
    /// `CHASSIS_NATS_DUPLICATE_WINDOW_SECS`.
    pub duplicate_window: Duration,
    /// `CHASSIS_NATS_MAX_DELIVER`.
    pub max_deliver: u32,
    /// `CHASSIS_NATS_BACKOFF_MS`.
    pub backoff: Vec<Duration>,
    /// `CHASSIS_NATS_MAX_IN_FLIGHT`.
    pub max_in_flight: u32,
    /// `CHASSIS_NATS_BATCH`.
    pub batch: u32,
    /// `CHASSIS_NATS_ACK_WAIT_SECS`.
    pub ack_wait: Duration,
    /// `CHASSIS_NATS_MAX_LAG`.
    pub max_lag: u64,
    /// `CHASSIS_NATS_LAG_POLL_MS`.
    pub lag_poll: Duration,
    /// `CHASSIS_NATS_PREFIX`.
    pub prefix: Option<String>,
}

impl fmt::Debug for MessagingConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessagingConfig")
            .field("url", &redacted_url(self.url.expose()))
            .field("duplicate_window", &self.duplicate_window)
            .field("max_deliver", &self.max_deliver)
            .field("backoff", &self.backoff)
            .field("max_in_flight", &self.max_in_flight)
            .field("batch", &self.batch)
            .field("ack_wait", &self.ack_wait)
            .field("max_lag", &self.max_lag)
            .field("lag_poll", &self.lag_poll)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// `url` without its credentials: what may be logged.
pub(crate) fn redacted_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let one = one.trim();
            let (scheme, rest) = one.split_once("://").unwrap_or(("", one));
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            if scheme.is_empty() {
                host.to_owned()
            } else {
                format!("{scheme}://{host}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A comma-separated list of milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MillisList(Vec<Duration>);

impl std::str::FromStr for MillisList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let list = s
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("`{}` is not a number of milliseconds", v.trim()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(list))
    }
}

impl MessagingConfig {
    /// Settings for the broker at `url` with every default: for tests and
    /// programs that configure themselves.
    pub fn new(url: &str) -> Self {
        Self {
            url: Secret::new(url.to_owned()),
            duplicate_window: Duration::from_secs(120),
            max_deliver: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            max_in_flight: 64,
            batch: 16,
            ack_wait: Duration::from_secs(30),
            max_lag: 10_000,
            lag_poll: Duration::from_secs(2),
            prefix: None,
        }
    }

    /// The longest [`prefix`](Self::prefix).
    pub const MAX_PREFIX_LEN: usize = 32;

    /// The name service `service` has on the broker: `<prefix>-<service>`
    /// with a [`prefix`](Self::prefix), `service` without. Give it
    /// wherever a service is named to the broker (a [`Publisher`]'s
    /// service and the [`Subject`]s it publishes, a [`Consumer`]'s service
    /// and its [`Subscription`]'s publisher), so that everything of one
    /// system carries its prefix: `t1-orders.v1.67000001.order.placed` in
    /// the stream `t1-orders-events`, dead letters in `t1-mail-dlq`.
    ///
    /// ```
    /// use chassis::messaging::MessagingConfig;
    ///
    /// let mut config = MessagingConfig::new("nats://127.0.0.1:4222");
    /// assert_eq!(config.name("orders"), "orders");
    /// config.prefix = Some("demo7".to_owned());
    /// assert_eq!(config.name("orders"), "demo7-orders");
    /// ```
    ///
    /// [`Publisher`]: super::Publisher
    /// [`Subject`]: super::Subject
    /// [`Consumer`]: super::Consumer
    /// [`Subscription`]: super::Subscription
    pub fn name(&self, service: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}-{service}"),
            None => service.to_owned(),
        }
    }

    /// Reads the `CHASSIS_NATS_*` settings; `None` when `CHASSIS_NATS_URL`
    /// is unset (no broker) or invalid (the problem is in `r`). Every
    /// problem is recorded in `r`, and the URL's credentials never appear
    /// in one.
    pub fn read(r: &mut Reader<'_>) -> Option<Self> {
        let url = r.maybe_secret(
            "CHASSIS_NATS_URL",
            "the NATS server(s), nats://host:port; unset: no broker",
        );
        let d = Self::new("");
        let window: u64 = r.optional(
            "CHASSIS_NATS_DUPLICATE_WINDOW_SECS",
            d.duplicate_window.as_secs(),
            "seconds a stream remembers event ids",
        );
        if window == 0 {
            r.problem("CHASSIS_NATS_DUPLICATE_WINDOW_SECS", "must be at least 1");
        }
        let max_deliver: u32 = r.optional(
            "CHASSIS_NATS_MAX_DELIVER",
            d.max_deliver,
            "deliveries before a message is dead-lettered",
        );
        if max_deliver == 0 {
            r.problem("CHASSIS_NATS_MAX_DELIVER", "must be at least 1");
        }
        let backoff = r.optional(
            "CHASSIS_NATS_BACKOFF_MS",
            MillisList(d.backoff.clone()),
            "delays before redeliveries, milliseconds, comma-separated",
        );
        if backoff.0.is_empty() {
            r.problem("CHASSIS_NATS_BACKOFF_MS", "must name at least one delay");
        }
        let max_in_flight: u32 = r.optional(
            "CHASSIS_NATS_MAX_IN_FLIGHT",
            d.max_in_flight,
            "messages a consumer handles at once",
        );
        if max_in_flight == 0 {
            r.problem("CHASSIS_NATS_MAX_IN_FLIGHT", "must be at least 1");
        }
        let batch: u32 = r.optional("CHASSIS_NATS_BATCH", d.batch, "messages per fetch");
        if batch == 0 {
            r.problem("CHASSIS_NATS_BATCH", "must be at least 1");
        }
        let ack_wait: u64 = r.optional(
            "CHASSIS_NATS_ACK_WAIT_SECS",
            d.ack_wait.as_secs(),
            "seconds before an unacknowledged message is delivered again",
        );
        if ack_wait == 0 {
            r.problem("CHASSIS_NATS_ACK_WAIT_SECS", "must be at least 1");
        }
        let max_lag: u64 = r.optional(
            "CHASSIS_NATS_MAX_LAG",
            d.max_lag,
            "messages waiting above which a consumer is not ready",
        );
        let lag_poll: u64 = r.optional(
            "CHASSIS_NATS_LAG_POLL_MS",
            d.lag_poll.as_millis() as u64,
            "milliseconds between lag polls",
        );
        if lag_poll == 0 {
            r.problem("CHASSIS_NATS_LAG_POLL_MS", "must be at least 1");
        }
        let prefix: Option<String> = r.maybe(
            "CHASSIS_NATS_PREFIX",
            "a name before every service's name on the broker, to share a server",
        );
        if let Some(p) = &prefix
            && !(crate::permission::is_name(p) && p.len() <= Self::MAX_PREFIX_LEN)
        {
            r.problem(
                "CHASSIS_NATS_PREFIX",
                format!(
                    "must be 1 to {} of [a-z0-9_-], starting with a letter",
                    Self::MAX_PREFIX_LEN
                ),
            );
        }
        let url = url?;
        if let Err(problem) = check_url(url.expose()) {
            r.problem("CHASSIS_NATS_URL", problem);
            return None;
        }
        Some(Self {
            url,
            duplicate_window: Duration::from_secs(window.max(1)),
            max_deliver: max_deliver.max(1),
            backoff: if backoff.0.is_empty() {
                d.backoff
            } else {
                backoff.0
            },
            max_in_flight: max_in_flight.max(1),
            batch: batch.max(1),
            ack_wait: Duration::from_secs(ack_wait.max(1)),
            max_lag,
            lag_poll: Duration::from_millis(lag_poll.max(1)),
            prefix,
        })
    }

    /// Messages asked for per fetch: the batch setting, at most the
    /// in-flight bound (so `CHASSIS_NATS_MAX_IN_FLIGHT=1` alone means one
    /// message at a time, one per fetch).
    pub fn batch(&self) -> u32 {
        self.batch.min(self.max_in_flight).max(1)
    }

    /// The delay before the delivery after delivery number `delivered`
    /// (from 1) failed: the `delivered`-th backoff value, the last one
    /// repeating.
    pub fn backoff_after(&self, delivered: u64) -> Duration {
        let i = usize::try_from(delivered.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }

    /// Connects to the broker. The client reconnects by itself when the
    /// connection drops, and keeps trying when the broker is not yet up at
    /// start-up, so a service starts (unready) without its broker.
    ///
    /// # Errors
    ///
    /// When the URL cannot be used (the error never contains its
    /// credentials).
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, super::MessagingError> {
        let url = self.url.expose();
        async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url.split(',').map(str::trim).collect::<Vec<_>>().as_slice())
            .await
            .map_err(|e| {
                super::MessagingError::Connect(format!(
                    "cannot connect to NATS at {}: {}",
                    redacted_url(url),
                    e.kind()
                ))
            })
    }
}

/// A NATS URL: `nats://`, `tls://`, `ws://` or `wss://` with a host.
fn check_url(url: &str) -> Result<(), String> {
    for one in url.split(',') {
        let one = one.trim();
        let Some((scheme, rest)) = one.split_once("://") else {
            return Err(format!(
                "`{}` is not a URL (nats://host:port)",
                redacted_url(one)
            ));
        };
        if !matches!(scheme, "nats" | "tls") {
            return Err(format!(
                "`{}`: the scheme must be nats:// or tls://",
                redacted_url(one)
            ));
        }
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        if host.is_empty() || host.starts_with(':') {
            return Err(format!("`{}` names no host", redacted_url(one)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    #[test]
    fn every_problem_at_once_and_no_secret_in_any() {
        let env = Env::from_pairs([
            ("CHASSIS_NATS_URL", "http://u:s3cret@host:4222"),
            ("CHASSIS_NATS_MAX_DELIVER", "0"),
            ("CHASSIS_NATS_BACKOFF_MS", "10,soon"),
            ("CHASSIS_NATS_MAX_IN_FLIGHT", "0"),
        ]);
        let mut r = Reader::new(&env);
        assert!(MessagingConfig::read(&mut r).is_none());
        let e = r.finish().unwrap_err().to_string();
        for name in [
            "CHASSIS_NATS_URL",
            "CHASSIS_NATS_MAX_DELIVER",
            "CHASSIS_NATS_BACKOFF_MS",
            "CHASSIS_NATS_MAX_IN_FLIGHT",
        ] {
            assert!(e.contains(name), "{name} missing from {e}");
        }
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn defaults_and_backoff() {
        let env = Env::from_pairs([
            ("CHASSIS_NATS_URL", "nats://a:1, nats://b:2"),
            ("CHASSIS_NATS_BACKOFF_MS", "10,20"),
        ]);
        let mut r = Reader::new(&env);
        let c = MessagingConfig::read(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(c.batch(), 16);
        assert_eq!(c.backoff_after(1), Duration::from_millis(10));
        assert_eq!(c.backoff_after(2), Duration::from_millis(20));
        assert_eq!(c.backoff_after(9), Duration::from_millis(20));
        assert_eq!(
            redacted_url("nats://u:p@a:1,tls://b:2"),
            "nats://a:1,tls://b:2"
        );
    }
}
