//! Shared by the integration tests: temporary data directories, the service
//! on a loopback socket, callers with test tokens, a scriptable SMTP relay,
//! and polling.

#![allow(dead_code, unreachable_pub)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chassis::{
    client::{CallContext, Downstream, TokenSource},
    config::{Config, Env, Reader, Secret},
    correlation::CorrelationId,
    db::{Database, DbConfig},
    testing::{TestDatabase, TestIssuer, TestServer},
};
#[allow(unused_imports)] // each test file uses some
pub use chassis::{
    testing::{eventually, refusal},
    time::now_millis as now_ms,
};
use mail::client::{MailClient, MailJob, OrderConfirmation};
use rustls::ServerConfig;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

/// The grant `orders` has.
pub const SEND: &str = "mail::send:message";
/// The grant `admin` has.
pub const VIEW: &str = "mail::view:message";

/// A data directory, removed when dropped, and what mail wrote into it;
/// with the service's database on the run's engine
/// (`CHASSIS_TEST_BACKEND`), dropped with it.
#[derive(Debug)]
pub struct TempDir {
    dir: chassis::testing::TempDir,
    db: TestDatabase,
}

impl TempDir {
    pub fn new(name: &str) -> Self {
        Self {
            dir: chassis::testing::TempDir::new(&format!("mail-{name}")),
            db: TestDatabase::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The settings that point the service at its database: nothing on
    /// SQLite (the file is in the data directory), `MAIL_DATABASE_URL` on
    /// Postgres.
    pub fn db_env(&self) -> Vec<(String, String)> {
        self.db.env("MAIL")
    }

    /// The service's database settings, as the service reads them.
    pub fn db_config(&self) -> DbConfig {
        self.db.configure(DbConfig::new(self.path(), "mail.db"))
    }

    pub fn outbox(&self) -> PathBuf {
        self.dir.join(mail::OUTBOX_DIR)
    }

    /// The names of the files in the outbox, sorted, temporary ones included.
    pub fn outbox_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.outbox())
            .map(|dir| {
                dir.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    pub fn eml(&self, message_id: &str) -> Option<String> {
        std::fs::read_to_string(self.outbox().join(format!("{message_id}.eml"))).ok()
    }
}

/// Settings read as the binary reads them, over `dir` and its database,
/// with quick polling.
pub fn settings(dir: &TempDir, env: &[(&str, &str)]) -> mail::Settings {
    let data = dir.path().to_str().unwrap().to_owned();
    let mut pairs: Vec<(String, String)> = vec![
        ("MAIL_DATA_DIR".to_owned(), data),
        ("MAIL_POLL_MS".to_owned(), "20".to_owned()),
    ];
    pairs.extend(dir.db_env());
    pairs.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let env = Env::from_pairs(pairs);
    let mut r = Reader::new(&env);
    let settings = mail::Settings::read(&mut r);
    r.finish().unwrap();
    settings
}

pub fn issuer() -> TestIssuer {
    TestIssuer::new()
}

/// The service on 127.0.0.1 at an ephemeral port.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    server: TestServer,
    downstream: Downstream,
}

impl Server {
    /// Starts the service over `dir` with the extra `MAIL_*` settings.
    pub async fn start(dir: &TempDir, env: &[(&str, &str)]) -> Self {
        Self::start_with(settings(dir, env)).await
    }

    pub async fn start_with(settings: mail::Settings) -> Self {
        let mut config = Config::default();
        config.shutdown_grace = Duration::from_secs(20);
        let builder = mail::app(settings)
            .await
            .unwrap()
            .verifier(issuer().verifier())
            .config(config);
        let server = TestServer::start(builder).await;
        let downstream = Downstream::builder("mail", &server.url(""))
            .build()
            .unwrap();
        Self {
            addr: server.addr(),
            server,
            downstream,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn downstream(&self) -> &Downstream {
        &self.downstream
    }

    /// The driver client, for calls made on behalf of a caller.
    pub fn client(&self) -> MailClient {
        MailClient::new(self.downstream.clone())
    }

    /// The driver client as `orders` builds it: its own token from the
    /// token endpoint of `auth`.
    pub fn orders_client(&self, auth: &TestAuth) -> MailClient {
        let tokens = TokenSource::client_credentials(
            &auth.url("/token"),
            "orders",
            Secret::new("orders-secret".to_owned()),
        )
        .unwrap();
        MailClient::new(
            Downstream::builder("mail", &format!("http://{}", self.addr))
                .token_source(tokens)
                .build()
                .unwrap(),
        )
    }

    /// Shuts down as SIGTERM would, and waits for a clean stop; returns how
    /// long it took.
    pub async fn stop(self) -> Duration {
        let started = tokio::time::Instant::now();
        self.server.stop().await;
        started.elapsed()
    }
}

/// A call context with a token for `subject` granting `perms`, continuing
/// the work of correlation id `correlation`.
pub async fn caller(subject: &str, perms: &[&str], correlation: &str) -> CallContext {
    let issuer = issuer();
    let token = issuer.service_token(subject, perms);
    let principal = issuer.verifier().verify_token(&token).await.unwrap();
    CallContext::continuing(CorrelationId::parse(correlation).unwrap()).with_principal(principal)
}

/// `orders`, as it calls mail.
pub async fn orders(correlation: &str) -> CallContext {
    caller("orders", &[SEND, "ticketing:*:reserve:ticket"], correlation).await
}

/// `admin`, who may look at messages.
pub async fn admin() -> CallContext {
    caller("admin", &[VIEW, "auth::rotate:key"], "admin-look").await
}

/// An order confirmation job.
pub fn job(message_id: &str, to: &str) -> MailJob {
    let mut order = OrderConfirmation::new(format!("ord_{message_id}"), "tkt_day", 2);
    order.ticket_name = Some("Day pass".to_owned());
    order.price_minor = Some(4500);
    order.currency = Some("EUR".to_owned());
    MailJob::order_confirmation(message_id, to, &order)
}

/// `GET url`: status and body.
pub async fn get(url: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let req = http::Request::get(url)
        .body(http_body_util::Empty::new())
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of the sample `name{labels}` in Prometheus text, 0 if absent.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The service's database, opened beside the service as another instance
/// would open it, for tests that play a crashed worker or inspect rows:
/// reads through `pool()`, writes through `writer()`.
pub async fn database(dir: &TempDir) -> Database {
    let mut config = dir.db_config();
    config.busy_timeout = Duration::from_secs(10);
    Database::open(&config).await.unwrap()
}

/// A row of the queue.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueRow {
    pub message_id: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub lease_until: Option<i64>,
    pub lease_owner: Option<String>,
    pub last_error: Option<String>,
    pub sent_at: Option<i64>,
    pub correlation_id: String,
}

pub async fn row(db: &Database, message_id: &str) -> QueueRow {
    sqlx::query_as(
        "SELECT message_id, status, attempts, next_attempt_at, lease_until, lease_owner,
                last_error, sent_at, correlation_id
         FROM messages WHERE message_id = $1",
    )
    .bind(message_id)
    .fetch_one(db.pool())
    .await
    .unwrap()
}

/// A port nothing listens on.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

// === a token endpoint and JWKS ===

/// The test issuer's public key, as its JWKS publishes it.
pub fn jwks() -> Value {
    issuer().jwks()
}

/// What `auth` does for these tests: a client-credentials token endpoint
/// answering tokens of the test issuer for `orders` (with
/// `mail::send:message`), and the JWKS that verifies them.
#[derive(Debug, Clone)]
pub struct TestAuth {
    pub addr: SocketAddr,
}

impl TestAuth {
    pub async fn start() -> Self {
        use axum::routing::{get, post};
        let app = axum::Router::new()
            .route(
                "/token",
                post(|| async {
                    axum::Json(json!({
                        "access_token": issuer().service_token("orders", &[SEND]),
                        "token_type": "Bearer",
                        "expires_in": 900,
                    }))
                }),
            )
            .route("/jwks", get(|| async { axum::Json(jwks()) }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

// === what the SMTP relay does, and what it took ===

/// What the relay does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Takes every message.
    Accept,
    /// Refuses (550) recipients containing the text; takes the others.
    RefuseRecipient(String),
    /// Never answers after a message's data: the client waits.
    HangAfterData,
    /// Takes every message, then closes the connection without a word,
    /// as a relay that drops idle clients does.
    CloseAfterEachMail,
}

/// A message the relay took.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
    /// Whether it came over TLS.
    pub tls: bool,
    /// When its data was taken.
    pub at: tokio::time::Instant,
}

impl Received {
    /// The value of header `name` (first occurrence).
    pub fn header(&self, name: &str) -> Option<String> {
        header(&self.data, name)
    }
}

/// The value of header `name` in a formatted message.
pub fn header(message: &str, name: &str) -> Option<String> {
    let head = message.split("\r\n\r\n").next()?;
    head.split("\r\n").find_map(|line| {
        let (k, v) = line.split_once(": ")?;
        k.eq_ignore_ascii_case(name).then(|| v.to_owned())
    })
}

// === certificates made at test time ===

/// A private CA (the chassis' [`chassis::testing::TestPki`]) and a relay
/// certificate it signed, made at test time.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The relay's TLS configuration: its certificate and key.
    pub server: Arc<ServerConfig>,
}

impl TestPki {
    /// A fresh CA, and a relay certificate for `names` (DNS names or IP
    /// addresses) signed by it.
    pub fn new(names: &[&str]) -> Self {
        let pki = chassis::testing::TestPki::new("mail test CA");
        Self {
            ca_pem: pki.ca_pem(),
            server: Arc::new(pki.server_cert(names).server_config(&[])),
        }
    }

    /// Writes the CA certificate to `<dir>/ca.pem`, for `CHASSIS_TLS_CA_FILE`.
    pub fn write_ca(&self, dir: &Path) -> String {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

// === a scriptable SMTP relay ===

/// How the relay speaks TLS.
#[derive(Debug, Clone)]
pub enum RelayTls {
    /// Plain SMTP; STARTTLS not offered.
    None,
    /// TLS from the first byte (smtps).
    Implicit(Arc<ServerConfig>),
    /// STARTTLS offered, and required before `MAIL`.
    StartTls(Arc<ServerConfig>),
}

/// An SMTP relay on loopback that records what it takes.
#[derive(Debug, Clone)]
pub struct FakeSmtp {
    pub addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    received: Arc<Mutex<Vec<Received>>>,
    /// Messages whose data arrived (taken, refused or left hanging).
    data_seen: Arc<Mutex<usize>>,
    seen: Arc<Notify>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    tls: RelayTls,
}

impl FakeSmtp {
    pub async fn start(behaviour: Behaviour) -> Self {
        Self::start_with(behaviour, RelayTls::None).await
    }

    pub async fn start_with(behaviour: Behaviour, tls: RelayTls) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let smtp = Self {
            addr: listener.local_addr().unwrap(),
            behaviour: Arc::new(Mutex::new(behaviour)),
            received: Arc::default(),
            data_seen: Arc::default(),
            seen: Arc::default(),
            connections: Arc::default(),
            tls,
        };
        let s = smtp.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = s.serve(stream).await;
                });
            }
        });
        smtp
    }

    /// `smtp://`, `smtps://` or `smtp://…?tls=required` to `host` (which
    /// must resolve to 127.0.0.1) at the relay's port.
    pub fn url_for(&self, host: &str) -> String {
        let port = self.addr.port();
        match self.tls {
            RelayTls::None => format!("smtp://{host}:{port}"),
            RelayTls::Implicit(_) => format!("smtps://{host}:{port}"),
            RelayTls::StartTls(_) => format!("smtp://{host}:{port}?tls=required"),
        }
    }

    pub fn url(&self) -> String {
        self.url_for("127.0.0.1")
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn data_seen(&self) -> usize {
        *self.data_seen.lock().unwrap()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    async fn serve(&self, stream: TcpStream) -> std::io::Result<()> {
        match &self.tls {
            RelayTls::None => {
                self.session(stream, true, false, false).await?;
            }
            RelayTls::Implicit(config) => {
                let tls = tokio_rustls::TlsAcceptor::from(config.clone())
                    .accept(stream)
                    .await?;
                self.session(tls, true, false, true).await?;
            }
            RelayTls::StartTls(config) => {
                if let Some(plain) = self.session(stream, true, true, false).await? {
                    let tls = tokio_rustls::TlsAcceptor::from(config.clone())
                        .accept(plain)
                        .await?;
                    self.session(tls, false, false, true).await?;
                }
            }
        }
        Ok(())
    }

    /// One SMTP session on `stream`; returns the stream when the client
    /// asked for STARTTLS (and `offer_starttls`), for the handshake.
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        greet: bool,
        offer_starttls: bool,
        tls: bool,
    ) -> std::io::Result<Option<S>> {
        let mut io = BufReader::new(stream);
        if greet {
            io.get_mut().write_all(b"220 fake.test ESMTP\r\n").await?;
        }
        let mut from = String::new();
        let mut to = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if io.read_line(&mut line).await? == 0 {
                return Ok(None);
            }
            let command = line.trim_end().to_owned();
            let upper = command.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") {
                if offer_starttls {
                    b"250-fake.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
                } else {
                    b"250-fake.test\r\n250 8BITMIME\r\n"
                }
            } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
                b"250 ok\r\n"
            } else if upper == "STARTTLS" && offer_starttls {
                io.get_mut().write_all(b"220 go ahead\r\n").await?;
                return Ok(Some(io.into_inner()));
            } else if upper.starts_with("MAIL FROM:") && offer_starttls {
                b"530 5.7.0 must issue a STARTTLS command first\r\n"
            } else if upper.starts_with("MAIL FROM:") {
                from = command["MAIL FROM:".len()..].to_owned();
                to.clear();
                b"250 ok\r\n"
            } else if upper.starts_with("RCPT TO:") {
                let rcpt = command["RCPT TO:".len()..].to_owned();
                let refused = matches!(
                    &*self.behaviour.lock().unwrap(),
                    Behaviour::RefuseRecipient(text) if rcpt.contains(text.as_str())
                );
                if refused {
                    b"550 5.1.1 mailbox unavailable\r\n"
                } else {
                    to.push(rcpt);
                    b"250 ok\r\n"
                }
            } else if upper == "DATA" {
                io.get_mut().write_all(b"354 go ahead\r\n").await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if io.read_line(&mut line).await? == 0 {
                        return Ok(None);
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                *self.data_seen.lock().unwrap() += 1;
                self.seen.notify_waiters();
                if *self.behaviour.lock().unwrap() == Behaviour::HangAfterData {
                    std::future::pending::<()>().await;
                }
                self.received.lock().unwrap().push(Received {
                    from: from.clone(),
                    to: std::mem::take(&mut to),
                    data,
                    tls,
                    at: tokio::time::Instant::now(),
                });
                if *self.behaviour.lock().unwrap() == Behaviour::CloseAfterEachMail {
                    io.get_mut().write_all(b"250 queued\r\n").await?;
                    return Ok(None);
                }
                b"250 queued\r\n"
            } else if upper.starts_with("RSET") {
                to.clear();
                b"250 ok\r\n"
            } else if upper.starts_with("QUIT") {
                io.get_mut().write_all(b"221 bye\r\n").await?;
                return Ok(None);
            } else {
                b"502 not implemented\r\n"
            };
            io.get_mut().write_all(reply).await?;
        }
    }
}
