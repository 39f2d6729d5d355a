//! What the tests share: the service on a real loopback socket, callers
//! with test tokens, and a driver client (temporary directories, polling
//! and refusals come from `chassis::testing`); `mail` is the downstream of
//! the call the service makes as itself.

// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code, unreachable_pub)]

use std::{path::Path, time::Duration};

use chassis::{
    client::{CallContext, Downstream},
    config::{Config, Env, Reader},
    testing::{TestDatabase, TestIssuer, TestServer},
};
use ticketing::client::{NewTicket, TicketingClient};

pub mod mail;

// Re-exported so that a test file takes all its helpers from `support`; a
// file that uses some of them must not fail `-D warnings` over the others.
#[allow(unused_imports)]
pub use chassis::testing::{TempDir, eventually, refusal};

/// Where a test's service keeps its data: a temporary directory, and its
/// database on the run's engine (`CHASSIS_TEST_BACKEND`: the SQLite file in
/// the directory, or a Postgres database of its own, dropped with this
/// value). Every service started on it uses the same database: a restart,
/// or two instances at once.
#[derive(Debug)]
pub struct Data {
    dir: TempDir,
    db: TestDatabase,
}

impl Data {
    /// A new directory named after `name`, and a new database.
    pub fn new(name: &str) -> Self {
        Self {
            dir: TempDir::new(name),
            db: TestDatabase::new(),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The database.
    pub fn db(&self) -> &TestDatabase {
        &self.db
    }
}

/// The service serving on 127.0.0.1 at an ephemeral port.
#[derive(Debug)]
pub struct Server {
    pub addr: std::net::SocketAddr,
    server: TestServer,
    downstream: Downstream,
}

impl Server {
    /// Starts the service on `data`, with `TICKETING_*` settings from
    /// `env`, trusting [`TestIssuer`]'s tokens.
    pub async fn start(dir: &Data, env: &[(&str, &str)]) -> Self {
        Self::start_with(settings(dir, env)).await
    }

    /// Starts the service with `settings`, trusting [`TestIssuer`]'s tokens.
    pub async fn start_with(settings: ticketing::Settings) -> Self {
        let builder = ticketing::app(settings)
            .await
            .expect("the app starts")
            .verifier(TestIssuer::new().verifier())
            .config(Config::default());
        let server = TestServer::start(builder).await;
        let downstream = Downstream::builder("ticketing", &server.url(""))
            .attempt_timeout(Duration::from_secs(30))
            .deadline(Duration::from_secs(60))
            .build()
            .unwrap();
        Self {
            addr: server.addr(),
            server,
            downstream,
        }
    }

    /// Shuts down as on SIGTERM and waits until the service has stopped.
    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// A downstream to this server, for raw calls.
    pub fn downstream(&self) -> &Downstream {
        &self.downstream
    }

    /// The driver client, calling this server.
    pub fn client(&self) -> TicketingClient {
        TicketingClient::new(self.downstream.clone())
    }

    /// The value of the first sample of metric `name` whose labels include
    /// `label` (`outcome="sent"`), from `/metrics`.
    pub async fn metric(&self, name: &str, label: &str) -> Option<String> {
        let cx = CallContext::background();
        let res = self.downstream.anonymous(&cx).get("/metrics").send().await;
        let text = String::from_utf8(res.unwrap().body().to_vec()).unwrap();
        text.lines()
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    }
}

/// The settings of a service on `data`, with `TICKETING_*` settings from
/// `env`.
pub fn settings(data: &Data, env: &[(&str, &str)]) -> ticketing::Settings {
    let mut pairs = vec![(
        "TICKETING_DATA_DIR".to_owned(),
        data.path().display().to_string(),
    )];
    pairs.extend(data.db.env("TICKETING"));
    pairs.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let env = Env::from_pairs(pairs);
    let mut r = Reader::new(&env);
    let mut settings = ticketing::Settings::read(&mut r);
    r.finish().expect("valid test settings");
    // A busy test machine may keep the write lock or a connection longer
    // than the default 5 s allows; the tests are about answers, not speed.
    settings.db.busy_timeout = Duration::from_secs(30);
    settings.db.acquire_timeout = Duration::from_secs(30);
    settings
}

/// The context of calls made by user `subject` with grants `perms`,
/// carrying a real token from [`TestIssuer`].
pub async fn user(subject: &str, perms: &[&str]) -> CallContext {
    TestIssuer::new().user_context(subject, perms).await
}

/// Alice, who may do anything in account `acme` and nothing elsewhere.
pub async fn alice() -> CallContext {
    user("alice", &["ticketing:acme:*:*"]).await
}

/// A valid ticket with `capacity` places.
/// Releases the hold `held` of one place of `ticket`, then holds that
/// place again as `cx`: the product sells out a second time.
pub async fn sell_out_again(
    calls: &TicketingClient,
    cx: &CallContext,
    account: &chassis::permission::AccountId,
    ticket: &str,
    held: &str,
) {
    calls.on_behalf_of(cx).release(account, held).await.unwrap();
    calls
        .on_behalf_of(cx)
        .reserve(account, &reservation(ticket, 1), "again")
        .await
        .unwrap();
}

/// A reservation of `quantity` places of `ticket_id`.
pub fn reservation(ticket_id: &str, quantity: u32) -> ticketing::client::NewReservation {
    ticketing::client::NewReservation {
        ticket_id: ticket_id.to_owned(),
        quantity,
    }
}

pub fn day_pass(capacity: u32) -> NewTicket {
    NewTicket {
        name: "Day pass".to_owned(),
        price_minor: 4500,
        currency: "EUR".to_owned(),
        capacity,
        valid_from: time::macros::date!(2026 - 12 - 01),
        valid_until: time::macros::date!(2027 - 04 - 30),
    }
}

/// Sends `request` (an HTTP/1.1 request without its `Host`, `Connection`
/// and `Content-Length` headers) as raw bytes; returns the whole answer as
/// text.
pub async fn raw_http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (head, body) = request.split_once("\r\n\r\n").unwrap_or((request, ""));
    let text = format!(
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}
