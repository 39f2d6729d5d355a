//! The whole system in one test process: real auth, ticketing, mail and
//! orders, each on its own loopback port with its own database (on the
//! run's engine, `CHASSIS_TEST_BACKEND`) and data directory, talking HTTP
//! to each other.

#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, path::Path};

// Re-exported so that a test file takes all its helpers from `support`; a
// file that uses some of them must not fail `-D warnings` over the others.
#[allow(unused_imports)]
pub use chassis::testing::{TempDir, eventually};
use chassis::{
    ServiceBuilder,
    client::Downstream,
    config::{Config, Env, Reader},
    db::{Database, DbConfig},
    testing::{TestDatabase, TestServer},
};
use tokio::net::TcpListener;

pub const ISSUER: &str = "http://auth.test";
pub const AUDIENCE: &str = "chassis-demo";

/// One running service.
pub struct Node {
    pub addr: SocketAddr,
    server: Option<TestServer>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it gracefully and waits for a clean stop.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }
}

/// Serves `builder` on `addr` (port 0 for any), once it is ready.
pub async fn serve(builder: ServiceBuilder, config: Config, addr: SocketAddr) -> Node {
    let listener = TcpListener::bind(addr).await.expect("bind");
    serve_on(builder, config, listener).await
}

/// Serves `builder` on a bound listener, once it is ready.
pub async fn serve_on(builder: ServiceBuilder, config: Config, listener: TcpListener) -> Node {
    let server = TestServer::start_on(builder.config(config), listener).await;
    Node {
        addr: server.addr(),
        server: Some(server),
    }
}

/// Settings read from `pairs` as the service would read its environment.
pub fn env(pairs: &[(String, String)]) -> Env {
    Env::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

fn pairs(list: &[(&str, String)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The chassis settings of a service that trusts the test system's auth.
fn verifying(auth: &str) -> Vec<(String, String)> {
    pairs(&[
        ("CHASSIS_AUTH_ISSUER", ISSUER.to_owned()),
        ("CHASSIS_AUTH_AUDIENCE", AUDIENCE.to_owned()),
        ("CHASSIS_AUTH_JWKS_URL", format!("{auth}/auth/v1/jwks")),
        ("CHASSIS_AUTH_ALGORITHMS", "EdDSA".to_owned()),
    ])
}

fn chassis_config(env: &Env) -> Config {
    let mut r = Reader::new(env);
    let c = Config::read(&mut r);
    r.finish().expect("valid chassis settings");
    c
}

/// The services' databases, one each, dropped with the system.
pub struct Databases {
    pub auth: TestDatabase,
    pub ticketing: TestDatabase,
    pub mail: TestDatabase,
    pub orders: TestDatabase,
}

pub struct System {
    pub dir: TempDir,
    pub dbs: Databases,
    pub auth: Node,
    pub ticketing: Node,
    pub mail: Node,
    pub orders: Node,
    /// Orders' client for ticketing.
    pub to_ticketing: Downstream,
    /// Orders' client for mail.
    pub to_mail: Downstream,
    orders_env: Vec<(String, String)>,
}

impl System {
    /// Starts the four services; `orders_env` adds or overrides orders'
    /// settings.
    pub async fn start(name: &str, orders_env: &[(&str, &str)]) -> Self {
        let dir = TempDir::new(&format!("orders-{name}"));
        let dbs = Databases {
            auth: TestDatabase::new(),
            ticketing: TestDatabase::new(),
            mail: TestDatabase::new(),
            orders: TestDatabase::new(),
        };
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();

        // Auth checks tokens on its own routes with its own key set, so it
        // must know where it listens before it starts.
        let listener = TcpListener::bind(any).await.expect("bind");
        let auth_url = format!("http://{}", listener.local_addr().unwrap());
        let mut auth_pairs = pairs(&[
            ("AUTH_DATA_DIR", dir.join("auth").display().to_string()),
            ("AUTH_ISSUER", ISSUER.to_owned()),
            ("AUTH_AUDIENCE", AUDIENCE.to_owned()),
            ("AUTH_PUBLIC_URL", auth_url),
            ("AUTH_SEED_DEMO", "true".to_owned()),
        ]);
        auth_pairs.extend(dbs.auth.env("AUTH"));
        let auth_env = env(&auth_pairs);
        let mut r = Reader::new(&auth_env);
        let settings = auth::Settings::read(&mut r);
        r.finish().expect("auth settings");
        let auth = serve_on(
            auth::app(settings).await.expect("auth starts"),
            chassis_config(&auth_env),
            listener,
        )
        .await;
        let auth_url = auth.url();

        let ticketing = start_ticketing(dir.path(), &dbs.ticketing, &auth_url, any).await;

        let mail = start_mail(dir.path(), &dbs.mail, &auth_url, any).await;

        let mut orders_pairs = verifying(&auth_url);
        orders_pairs.extend(pairs(&[
            ("ORDERS_DATA_DIR", dir.join("orders").display().to_string()),
            (
                "CHASSIS_AUDIT_FILE",
                dir.join("orders-audit.log").display().to_string(),
            ),
            (
                "CHASSIS_CLIENT_TOKEN_URL",
                format!("{auth_url}/auth/v1/token"),
            ),
            ("CHASSIS_CLIENT_ID", "orders".to_owned()),
            ("CHASSIS_CLIENT_SECRET", "orders-secret".to_owned()),
            ("CHASSIS_DOWNSTREAM_TICKETING_URL", ticketing.url()),
            ("CHASSIS_DOWNSTREAM_MAIL_URL", mail.url()),
            ("ORDERS_RELAY_POLL_MS", "50".to_owned()),
            ("ORDERS_RELAY_RETRY_BASE_MS", "50".to_owned()),
            ("ORDERS_RELAY_RETRY_MAX_MS", "500".to_owned()),
        ]));
        orders_pairs.extend(dbs.orders.env("ORDERS"));
        for (k, v) in orders_env {
            orders_pairs.retain(|(key, _)| key != k);
            orders_pairs.push(((*k).to_owned(), (*v).to_owned()));
        }
        let (orders, to_ticketing, to_mail) = start_orders(&orders_pairs, any).await;
        Self {
            orders,
            to_ticketing,
            to_mail,
            dir,
            dbs,
            auth,
            ticketing,
            mail,
            orders_env: orders_pairs,
        }
    }

    /// Stops ticketing (its port then refuses connections).
    pub async fn stop_ticketing(&mut self) {
        self.ticketing.stop().await;
    }

    /// Starts ticketing again on the same port and data.
    pub async fn restart_ticketing(&mut self) {
        self.ticketing = start_ticketing(
            self.dir.path(),
            &self.dbs.ticketing,
            &self.auth.url(),
            self.ticketing.addr,
        )
        .await;
    }

    /// Stops mail.
    pub async fn stop_mail(&mut self) {
        self.mail.stop().await;
    }

    /// Starts mail again on the same port and data.
    pub async fn restart_mail(&mut self) {
        self.mail = start_mail(
            self.dir.path(),
            &self.dbs.mail,
            &self.auth.url(),
            self.mail.addr,
        )
        .await;
    }

    /// Restarts orders on the same port and data (a new process would read
    /// the same database).
    pub async fn restart_orders(&mut self) {
        self.orders.stop().await;
        let (orders, to_ticketing, to_mail) =
            start_orders(&self.orders_env, self.orders.addr).await;
        self.orders = orders;
        self.to_ticketing = to_ticketing;
        self.to_mail = to_mail;
    }

    /// The confirmation mails sent so far.
    pub fn mails(&self) -> Vec<String> {
        let dir = self.dir.join("mail").join("outbox");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
    }

    /// Another instance of orders on the same database (a replica), on
    /// a port of its own, with the same settings.
    pub async fn start_replica(&self) -> Node {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        start_orders(&self.orders_env, any).await.0
    }

    /// Orders' database settings, as the service reads them.
    pub fn orders_db(&self) -> DbConfig {
        self.dbs
            .orders
            .configure(DbConfig::new(self.dir.join("orders"), "orders.db"))
    }

    /// A number orders' database answers to `sql` (a `SELECT COUNT(*)`, or
    /// a sum cast to BIGINT), read beside the service.
    pub async fn count(&self, sql: &'static str) -> i64 {
        let db = Database::open(&self.orders_db())
            .await
            .expect("open the database");
        let n: i64 = sqlx::query_scalar(sql)
            .fetch_one(db.pool())
            .await
            .expect("count");
        db.close().await;
        n
    }
}

async fn start_ticketing(dir: &Path, db: &TestDatabase, auth: &str, addr: SocketAddr) -> Node {
    let mut p = verifying(auth);
    p.extend(pairs(&[(
        "TICKETING_DATA_DIR",
        dir.join("ticketing").display().to_string(),
    )]));
    p.extend(db.env("TICKETING"));
    let e = env(&p);
    let mut r = Reader::new(&e);
    let settings = ticketing::Settings::read(&mut r);
    r.finish().expect("ticketing settings");
    serve(
        ticketing::app(settings).await.expect("ticketing starts"),
        chassis_config(&e),
        addr,
    )
    .await
}

/// Orders, and the clients it calls ticketing and mail with (their
/// breakers are the service's own, not copies).
async fn start_orders(p: &[(String, String)], addr: SocketAddr) -> (Node, Downstream, Downstream) {
    let e = env(p);
    let mut r = Reader::new(&e);
    let settings = orders::Settings::read(&mut r);
    r.finish().expect("orders settings");
    let (ticketing, mail) = (settings.ticketing.clone(), settings.mail.clone());
    let node = serve(
        orders::app(settings).await.expect("orders starts"),
        chassis_config(&e),
        addr,
    )
    .await;
    (node, ticketing, mail)
}

/// An answer read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: serde_json::Value,
}

/// Sends one request on a fresh connection.
pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_owned(),
            )))
            .unwrap(),
        )
        .await
        .expect("request sent");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

/// A user's access token from auth's password grant.
pub async fn login(auth: &str, user: &str) -> String {
    let a = send(
        "POST",
        &format!("{auth}/auth/v1/token"),
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("grant_type=password&username={user}&password={user}-password"),
    )
    .await;
    assert_eq!(a.status, 200, "login of {user}: {:?}", a.body);
    a.body["access_token"].as_str().unwrap().to_owned()
}

async fn start_mail(dir: &Path, db: &TestDatabase, auth: &str, addr: SocketAddr) -> Node {
    let mut p = verifying(auth);
    p.extend(pairs(&[
        ("MAIL_DATA_DIR", dir.join("mail").display().to_string()),
        ("MAIL_POLL_MS", "50".to_owned()),
        ("MAIL_RETRY_BASE_MS", "50".to_owned()),
    ]));
    p.extend(db.env("MAIL"));
    let e = env(&p);
    let mut r = Reader::new(&e);
    let settings = mail::Settings::read(&mut r);
    r.finish().expect("mail settings");
    serve(
        mail::app(settings).await.expect("mail starts"),
        chassis_config(&e),
        addr,
    )
    .await
}

/// A ticket product with `capacity` places in `account`, created in
/// ticketing with `token`.
pub async fn product(sys: &System, token: &str, account: &str, capacity: u32) -> String {
    let a = send(
        "POST",
        &format!("{}/ticketing/v1/{account}/tickets", sys.ticketing.url()),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "application/json"),
        ],
        &serde_json::json!({
            "name": "Day pass",
            "price_minor": 4500,
            "currency": "EUR",
            "capacity": capacity,
            "valid_from": "2026-12-01",
            "valid_until": "2027-04-30",
        })
        .to_string(),
    )
    .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    a.body["id"].as_str().unwrap().to_owned()
}

/// A client's way to orders (one attempt of up to 30 s), and the context
/// of calls on behalf of `token`'s user, verified with auth's keys.
pub async fn orders_on_behalf_of(
    sys: &System,
    token: &str,
) -> (Downstream, chassis::client::CallContext) {
    let verifier = chassis::auth::Verifier::builder()
        .jwks(
            ISSUER,
            AUDIENCE,
            &format!("{}/auth/v1/jwks", sys.auth.url()),
        )
        .build()
        .unwrap();
    let principal = verifier.verify_token(token).await.unwrap();
    let downstream = Downstream::builder("orders", &sys.orders.url())
        .attempt_timeout(std::time::Duration::from_secs(30))
        .deadline(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    (
        downstream,
        chassis::client::CallContext::background().with_principal(principal),
    )
}
