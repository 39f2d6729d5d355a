//! What auth's tests share: the service on a real loopback socket (and the
//! same application in-process, without a peer address), raw HTTP calls
//! read to the end, token decoding, the demo's subjects and the grants
//! file (temporary directories and polling come from `chassis::testing`).

#![allow(dead_code, unreachable_pub)]

use std::{net::IpAddr, path::Path, time::Duration};

use auth::{HashCost, Settings};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
#[allow(unused_imports)] // each test file uses some
pub use chassis::testing::{TempDir, eventually};
use chassis::{
    auth::{Clock, ManualClock, SystemClock, Verifier},
    config::Config,
    db::{Database, DbConfig, Migrations},
    testing::{TestDatabase, TestServer},
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::Algorithm;
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};
use tower::ServiceExt as _;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

pub const FORM: &str = "application/x-www-form-urlencoded";
pub const ALICE_GRANTS: [&str; 2] = ["ticketing:acme:*:*", "orders:acme:*:*"];
pub const ORDERS_GRANTS: [&str; 5] = [
    "ticketing:*:reserve:ticket",
    "ticketing:*:view:ticket",
    "mail::send:message",
    "auth:ticketing:exchange:token",
    "auth:mail:exchange:token",
];
/// A stored argon2id hash of `password` (the reference implementation's
/// known answer), for subjects the tests add to the database themselves.
pub const PASSWORD_HASH: &str =
    "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4";
pub const TOKEN_EXCHANGE: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange";
pub const ACCESS_TOKEN_TYPE: &str = "urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token";

/// A user's grants with a deny, that every narrowing must keep.
pub const DORA_GRANTS: [&str; 3] = [
    "ticketing:acme:*:*",
    "orders:acme:*:*",
    "!ticketing:acme:delete:*",
];

/// A response read to the end.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    send_from(None, method, url, headers, body).await
}

/// [`send`] from the local address `from` (any of 127.0.0.0/8 reaches a
/// service on 127.0.0.1), or the system's choice.
pub async fn send_from(
    from: Option<IpAddr>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut connector = HttpConnector::new();
    connector.set_local_address(from);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .expect("request failed");
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

pub fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

/// Decodes a JWT's header and claims (no verification).
pub fn decode(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let mut part =
        || serde_json::from_slice(&B64URL.decode(parts.next().unwrap()).unwrap()).unwrap();
    (part(), part())
}

/// The grants in the access token of a token answer.
pub fn perms_of(res: &Answer) -> Value {
    decode(res.json()["access_token"].as_str().unwrap()).1["perms"].clone()
}

/// The results of `handles`, in order.
pub async fn futures_join<T: std::fmt::Debug>(handles: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// Where a test's `auth` keeps its data: a temporary directory (the grants
/// file goes there too) and its database on the run's engine
/// (`CHASSIS_TEST_BACKEND`: the SQLite file in the directory, or a Postgres
/// database of its own, dropped with this value). Every instance started on
/// it uses the same database: a restart, or two instances at once.
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

    /// The database's settings, as the service is given them.
    pub fn db_config(&self) -> DbConfig {
        self.db.configure(DbConfig::new(self.path(), "auth.db"))
    }

    /// `AUTH_DATABASE_URL` on Postgres, nothing on SQLite: for a process.
    pub fn env(&self) -> Vec<(String, String)> {
        self.db.env("AUTH")
    }

    /// Makes the service's schema, as its start-up would, without starting
    /// it: for tests that start several instances at once on a new
    /// database. (On Postgres instances starting together take turns at the
    /// migrations; SQLite, for one instance, has nothing of the kind.)
    pub async fn migrate(&self) {
        let migrations = Migrations::new(&SQLITE_MIGRATOR).postgres(&PG_MIGRATOR);
        Database::open_migrated(&self.db_config(), migrations)
            .await
            .unwrap()
            .close()
            .await;
    }

    /// The service's database, opened beside it, for a test to read or
    /// change rows as no API does.
    pub async fn open(&self) -> Database {
        Database::open(&self.db_config()).await.unwrap()
    }
}

/// `auth` serving on 127.0.0.1 at an ephemeral port, with peer addresses
/// (its throttle counts failures per address); requests through its
/// router in-process have none.
pub struct Auth {
    server: TestServer,
}

/// Settings for a test: the demo seed (off by default, asked for here), a
/// cheap hash (the tests check behaviour, not cost) and the service's own
/// URL.
pub fn settings(dir: &Data) -> Settings {
    let mut s = Settings::with_data_dir(dir.path());
    s.db = dir.db_config();
    s.seed_demo = true;
    s.hash_cost = HashCost {
        memory_kib: 256,
        iterations: 1,
    };
    s
}

pub async fn start(dir: &Data) -> Auth {
    start_with(dir, |_| {}).await
}

pub async fn start_with(dir: &Data, tweak: impl FnOnce(&mut Settings)) -> Auth {
    start_clocked(dir, SystemClock, tweak).await
}

/// A clock at the system's time, that the test moves by hand.
pub fn manual_clock() -> ManualClock {
    ManualClock::new(SystemClock.now())
}

/// Starts `auth` on `dir` with `clock`, its [`settings`]
/// changed by `tweak` (its public URL is its own address), and waits until
/// it is ready.
pub async fn start_clocked(
    dir: &Data,
    clock: impl Clock,
    tweak: impl FnOnce(&mut Settings),
) -> Auth {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut s = settings(dir);
    s.public_url = Some(format!("http://{}", listener.local_addr().unwrap()));
    tweak(&mut s);
    let builder = auth::app_with_clock(s, clock)
        .await
        .expect("auth starts")
        .config(Config::default());
    Auth {
        server: TestServer::start_on(builder, listener).await,
    }
}

impl Auth {
    /// Its URL followed by `path`.
    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    pub async fn post_form(&self, form: &str, headers: &[(&str, &str)]) -> Answer {
        let mut all = vec![("content-type", FORM)];
        all.extend_from_slice(headers);
        send(Method::POST, &self.url("/auth/v1/token"), &all, form).await
    }

    pub async fn login(&self, user: &str, password: &str) -> Answer {
        self.post_form(
            &format!("grant_type=password&username={user}&password={password}"),
            &[],
        )
        .await
    }

    /// [`Auth::login`] over a connection from the local address `from`.
    pub async fn login_from(&self, from: &str, user: &str, password: &str) -> Answer {
        send_from(
            Some(from.parse().unwrap()),
            Method::POST,
            &self.url("/auth/v1/token"),
            &[("content-type", FORM)],
            &format!("grant_type=password&username={user}&password={password}"),
        )
        .await
    }

    /// [`Auth::login`] through the router in-process, without a socket.
    pub async fn login_in_process(&self, user: &str, password: &str) -> Answer {
        let req = Request::post("/auth/v1/token")
            .header("content-type", FORM)
            .body(axum::body::Body::from(format!(
                "grant_type=password&username={user}&password={password}"
            )))
            .unwrap();
        let res = self.server.router().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// An access token for `user`, who must exist.
    pub async fn access_token(&self, user: &str) -> String {
        self.access_token_of(user, &format!("{user}-password"))
            .await
    }

    /// An access token for `user` with `password`.
    pub async fn access_token_of(&self, user: &str, password: &str) -> String {
        let res = self.login(user, password).await;
        assert_eq!(res.status, 200, "{res:?}");
        res.json()["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn refresh(&self, token: &str) -> Answer {
        self.post_form(
            &format!("grant_type=refresh_token&refresh_token={token}"),
            &[],
        )
        .await
    }

    pub async fn jwks(&self) -> Value {
        let res = send(Method::GET, &self.url("/auth/v1/jwks"), &[], "").await;
        assert_eq!(res.status, 200, "{res:?}");
        res.json()
    }

    pub async fn kids(&self) -> Vec<String> {
        self.jwks().await["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    pub async fn rotate(&self, token: Option<&str>) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("authorization", b)])
            .unwrap_or_default();
        send(
            Method::POST,
            &self.url("/auth/v1/keys/rotate"),
            &headers,
            "",
        )
        .await
    }

    /// A chassis verifier configured as the other services are.
    pub fn verifier(&self) -> Verifier {
        self.verifier_for("chassis-demo")
    }

    /// A chassis verifier of a service whose audience is `audience`.
    pub fn verifier_for(&self, audience: &str) -> Verifier {
        Verifier::builder()
            .jwks(
                "http://127.0.0.1:8081",
                audience,
                &self.url("/auth/v1/jwks"),
            )
            .algorithms(&[Algorithm::EdDSA])
            .build()
            .unwrap()
    }

    pub async fn failed_logins(&self, kind: &str) -> u64 {
        self.counter("auth_failed_logins_total", &format!("kind=\"{kind}\""))
            .await
    }

    /// The value of the counter `name` with the label `label` (`k="v"`).
    pub async fn counter(&self, name: &str, label: &str) -> u64 {
        let res = send(Method::GET, &self.url("/metrics"), &[], "").await;
        let text = String::from_utf8_lossy(&res.body).into_owned();
        text.lines()
            .find(|l| {
                (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                    && l.contains(label)
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
    }

    /// Logs in with the password grant and the extra form fields `extra`
    /// (already encoded, each starting with `&`).
    pub async fn login_with(&self, user: &str, password: &str, extra: &str) -> Answer {
        self.post_form(
            &format!("grant_type=password&username={user}&password={password}{extra}"),
            &[],
        )
        .await
    }

    /// Exchanges `subject` as the client `client` (HTTP Basic) with the
    /// extra form fields `extra`.
    pub async fn exchange(&self, client: (&str, &str), subject: &str, extra: &str) -> Answer {
        self.post_form(
            &format!(
                "grant_type={TOKEN_EXCHANGE}&subject_token={subject}\
                 &subject_token_type={ACCESS_TOKEN_TYPE}{extra}"
            ),
            &[("authorization", &basic(client.0, client.1))],
        )
        .await
    }

    /// Adds a user (or, with `client`, a service client) whose password is
    /// `password`, with `grants`, to the service's database.
    pub async fn add_subject(&self, dir: &Data, client: bool, name: &str, grants: &[&str]) {
        let db = dir.open().await;
        let sql = if client {
            "INSERT INTO clients (client_id, secret_hash, grants, created_at) VALUES ($1, $2, $3, 0)"
        } else {
            "INSERT INTO users (username, password_hash, grants, created_at) VALUES ($1, $2, $3, 0)"
        };
        sqlx::query(sql)
            .bind(name)
            .bind(PASSWORD_HASH)
            .bind(serde_json::to_string(grants).unwrap())
            .execute(&mut *db.writer().await.unwrap())
            .await
            .unwrap();
        db.close().await;
    }

    /// The claims of a token for the client `id`.
    pub async fn client_claims(&self, id: &str, secret: &str) -> Value {
        let res = self
            .post_form(
                "grant_type=client_credentials",
                &[("authorization", &basic(id, secret))],
            )
            .await;
        assert_eq!(res.status, 200, "{res:?}");
        decode(res.json()["access_token"].as_str().unwrap()).1
    }

    /// A call to the admin API with `token`.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("authorization", b));
        }
        send(method, &self.url(path), &headers, body).await
    }

    /// Shuts down as a signal would and waits until it has stopped (the
    /// database closed).
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

// === the grants file ===

/// Writes the grants file as editors and deployments do: whole, by a
/// rename, so that it is never read half-written.
pub fn write_grants(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// Settings with `file` as the grants file, without the demo grants, looked
/// at every 50 ms.
pub fn from_file(file: &Path) -> impl FnOnce(&mut Settings) {
    let file = file.to_owned();
    move |s| {
        s.seed_demo = false;
        s.grants_file = Some(file);
        s.grants_poll = Duration::from_millis(50);
    }
}

/// A client's or user's grants in the file, with the secret `password`.
pub fn entry(table: &str, name: &str, grants: &[&str]) -> String {
    let field = if table == "users" {
        "password_hash"
    } else {
        "secret_hash"
    };
    format!(
        "[{table}.{name}]\n{field} = \"{PASSWORD_HASH}\"\ngrants = {}\n\n",
        serde_json::to_string(grants).unwrap()
    )
}
