//! A NATS JetStream server for tests, with names of its own per test.

use std::time::Duration;

use super::support::REQUIRE_VAR;
use crate::messaging::MessagingConfig;

/// The variable naming the NATS server tests use.
pub const NATS_VAR: &str = "CHASSIS_TEST_NATS_URL";

/// The NATS server tests use when [`NATS_VAR`] is unset: the project
/// machines' server on loopback, with JetStream.
pub const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

/// A connection to the test NATS server ([`NATS_VAR`]) and a prefix of
/// names of its own, so tests running at once never share a stream:
/// [`service`](Self::service)`("orders")` is `t<12 hex>-orders`, whose
/// streams (`t…-orders-events`, `t…-orders-dlq`) are deleted when this
/// value is dropped.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let Some(nats) = chassis::testing::TestNats::or_skip("my_test").await else { return };
/// let orders = nats.service("orders");
/// assert!(orders.ends_with("-orders"));
/// # }
/// ```
#[derive(Debug)]
pub struct TestNats {
    url: String,
    prefix: String,
    client: async_nats::Client,
}

impl TestNats {
    /// Connects.
    ///
    /// # Errors
    ///
    /// A sentence saying which server could not be used and why.
    pub async fn connect() -> Result<Self, String> {
        let url = std::env::var(NATS_VAR).unwrap_or_else(|_| DEFAULT_NATS.to_owned());
        let client = tokio::time::timeout(
            Duration::from_secs(5),
            async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(3))
                .connect(url.as_str()),
        )
        .await
        .map_err(|_| format!("the test NATS server at {url} ({NATS_VAR}) did not answer"))?
        .map_err(|e| {
            format!("the test NATS server at {url} ({NATS_VAR}) cannot be reached: {e}")
        })?;
        let js = async_nats::jetstream::new(client.clone());
        let mut names = js.stream_names();
        if let Some(Err(e)) = futures_util::StreamExt::next(&mut names).await {
            return Err(format!(
                "the test NATS server at {url} has no JetStream: {e}"
            ));
        }
        let prefix = format!("t{:012x}", fastrand::u64(..) >> 16);
        Ok(Self {
            url,
            prefix,
            client,
        })
    }

    /// For a test that needs NATS: the server, or `None` with a line on
    /// standard error saying the test did not run and why.
    ///
    /// # Panics
    ///
    /// When the server cannot be reached and [`REQUIRE_VAR`] is set.
    pub async fn or_skip(test: &str) -> Option<Self> {
        match Self::connect().await {
            Ok(n) => Some(n),
            Err(e) if std::env::var_os(REQUIRE_VAR).is_some() => {
                panic!("{test}: {e} ({REQUIRE_VAR} is set, so it cannot be skipped)")
            }
            Err(e) => {
                eprintln!("NOT RUN: {test}: {e}");
                None
            }
        }
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connected client.
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// This test's prefix, `t<12 hex>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The name this test gives service `name`: `<prefix>-<name>`.
    pub fn service(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Settings for this server, every default kept, with this test's
    /// prefix (`CHASSIS_NATS_PREFIX`): `config().name("orders")` is
    /// [`service`](Self::service)`("orders")`.
    pub fn config(&self) -> MessagingConfig {
        let mut config = MessagingConfig::new(&self.url);
        config.prefix = Some(self.prefix.clone());
        config
    }

    /// Deletes this test's streams (also done on drop).
    pub async fn clean_up(&self) {
        clean_up(&self.client, &self.prefix).await;
    }
}

/// Deletes the streams named `<prefix>-…`.
async fn clean_up(client: &async_nats::Client, prefix: &str) {
    let js = async_nats::jetstream::new(client.clone());
    let mut names = js.stream_names();
    let mut mine = Vec::new();
    let own = format!("{prefix}-");
    while let Some(Ok(name)) = futures_util::StreamExt::next(&mut names).await {
        if name.starts_with(&own) {
            mine.push(name);
        }
    }
    for name in mine {
        let _ = js.delete_stream(&name).await;
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        // Drop cannot wait on the test's runtime: a thread with its own
        // deletes the streams.
        let url = self.url.clone();
        let prefix = self.prefix.clone();
        let cleaner = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url)).await
                else {
                    return;
                };
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), clean_up(&client, &prefix)).await;
            });
        });
        let _ = cleaner.join();
    }
}
