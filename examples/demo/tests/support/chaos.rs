//! What the chaos tests share (`tests/replicas.rs`, `tests/chaos_nats.rs`):
//! replicas of the four services as processes on PostgreSQL, databases of
//! their own, an SMTP relay that records every mail, customers ordering
//! with their own idempotency keys, and the checks that nothing was lost,
//! nothing done twice and nothing oversold once the killing stops.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chassis::{
    client::{CallContext, ClientError, Downstream},
    testing::TestPostgres,
};
use demo::system::{Layout, SERVICES, System};
use orders::{NewOrder, Order, OrdersClient};
use sqlx::PgPool;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
    task::JoinHandle,
};

use super::{alice, exe, product, temp_dir};

/// The replicas of each service.
pub const REPLICAS: [(&str, usize); 4] =
    [("auth", 1), ("ticketing", 2), ("mail", 2), ("orders", 3)];

/// Customers placing orders at once.
pub const CUSTOMERS: usize = 4;

/// Places of the contested ticket: fewer than the customers ask for.
pub const SCARCE: u32 = 30;

/// The longest the test waits for anything: generous, for a busy machine.
pub const PATIENCE: Duration = Duration::from_secs(180);

/// How long the killing lasts: `DEMO_CHAOS_SECS`, else `default`.
pub fn chaos_secs(default: u64) -> u64 {
    std::env::var("DEMO_CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// [`REPLICAS`] running on PostgreSQL, a database per service, mailing to
/// an [`SmtpSink`], with two tickets on sale: one scarce, one plentiful.
pub struct Replicated {
    pub system: System,
    pub relay: SmtpSink,
    pub data: PathBuf,
    pub orders: OrdersClient,
    /// Alice, for calls to orders.
    pub cx: CallContext,
    pub scarce: String,
    pub plenty: String,
    databases: Vec<TestPostgres>,
}

impl Replicated {
    /// Starts every replica with `env` added to each one's environment, or
    /// `None` (the test not run) without the PostgreSQL server.
    pub async fn start(test: &str, env: &[(&str, &str)]) -> Option<Self> {
        let first = TestPostgres::or_skip(test)?;
        let mut databases = vec![first];
        for _ in 1..SERVICES.len() {
            databases.push(TestPostgres::create().expect("a second database on the same server"));
        }
        let mut layout = Layout::free(&REPLICAS).unwrap();
        for (s, db) in SERVICES.iter().zip(&databases) {
            layout = layout.postgres(s, db.url().to_owned());
        }
        let relay = SmtpSink::start().await;
        let data = temp_dir(test);
        let smtp_url = relay.url();
        let mut all = vec![
            ("MAIL_SMTP_URL", smtp_url.as_str()),
            // 8 processes × 3 connections at most: room on a server other
            // test runs share.
            ("AUTH_DB_POOL_SIZE", "2"),
            ("TICKETING_DB_POOL_SIZE", "2"),
            ("MAIL_DB_POOL_SIZE", "2"),
            ("ORDERS_DB_POOL_SIZE", "2"),
        ];
        all.extend_from_slice(env);
        let system = System::start_layout(&exe(), &data, layout, &all)
            .await
            .expect("every replica starts");
        let e = system.endpoints();
        let shop = alice(&e, "ticketing").await;
        let cx = alice(&e, "orders").await;
        let scarce = product(&e, &shop, SCARCE).await;
        let plenty = product(&e, &shop, 1_000_000).await;
        let orders = OrdersClient::new(
            Downstream::builder("orders", &e.balanced("orders"))
                .attempt_timeout(Duration::from_secs(5))
                .deadline(Duration::from_secs(15))
                .build()
                .unwrap(),
        );
        Some(Self {
            system,
            relay,
            data,
            orders,
            cx,
            scarce,
            plenty,
            databases,
        })
    }

    /// The database URL of `service`.
    pub fn url_of(&self, service: &str) -> &str {
        let i = SERVICES.iter().position(|s| *s == service).unwrap();
        self.databases[i].url()
    }

    /// A pool on the database of `service`.
    pub async fn db(&self, service: &str) -> PgPool {
        PgPool::connect(self.url_of(service)).await.unwrap()
    }

    /// Customers ordering until `stop` is set, every other order of each for
    /// the scarce ticket, each with keys of its own (`<name>-<c>-<i>`).
    pub fn customers(&self, name: &str, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<Placed>> {
        (0..CUSTOMERS)
            .map(|c| {
                let (orders, cx, stop) = (self.orders.clone(), self.cx.clone(), stop.clone());
                let tickets = [self.scarce.clone(), self.plenty.clone()];
                let name = name.to_owned();
                tokio::spawn(async move {
                    let mut placed = Placed::default();
                    for i in 0..10_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let ticket = &tickets[i % 2];
                        let key = format!("{name}-{c}-{i}");
                        match place_retrying(&orders, &cx, ticket, &key).await {
                            Some(order) => placed.orders.push(order),
                            None => placed.sold_out += 1,
                        }
                    }
                    placed
                })
            })
            .collect()
    }

    /// Every acknowledged order of `customers`, by id, and how many were
    /// refused as sold out.
    pub async fn acknowledged(
        customers: Vec<JoinHandle<Placed>>,
    ) -> (HashMap<String, Order>, usize) {
        let mut acknowledged = HashMap::new();
        let mut refused = 0;
        for c in customers {
            let placed = c.await.expect("a customer finished");
            refused += placed.sold_out;
            for order in placed.orders {
                assert!(
                    acknowledged.insert(order.id.clone(), order).is_none(),
                    "two keys answered with one order"
                );
            }
        }
        assert!(!acknowledged.is_empty(), "orders were placed");
        (acknowledged, refused)
    }

    /// Waits until nothing is left to deliver in orders' outbox or to send
    /// in mail's queue, every acknowledged order's mail is at the relay and
    /// `also` holds (what else a test drains, in words, or `None`).
    pub async fn drain<F, Fut>(&self, acknowledged: &HashMap<String, Order>, mut also: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<String>>,
    {
        let orders_db = self.db("orders").await;
        let mail_db = self.db("mail").await;
        let start = tokio::time::Instant::now();
        loop {
            let undelivered = count(
                &orders_db,
                "SELECT count(*) FROM outbox WHERE delivered_at IS NULL AND parked_at IS NULL",
            )
            .await;
            let unsent = count(
                &mail_db,
                "SELECT count(*) FROM messages WHERE status IN ('queued', 'sending')",
            )
            .await;
            let received = self.relay.received();
            let unmailed = acknowledged
                .keys()
                .filter(|id| !received.iter().any(|m| m.data.contains(id.as_str())))
                .count();
            let left = also().await;
            if undelivered == 0 && unsent == 0 && unmailed == 0 && left.is_none() {
                break;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "not drained after {} s: {undelivered} outbox events undelivered, {unsent} \
                 mails unsent, {unmailed} acknowledged orders without a mail at the relay, \
                 {} (logs in {})",
                PATIENCE.as_secs(),
                left.as_deref().unwrap_or("nothing else"),
                self.data.join("logs").display()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        orders_db.close().await;
        mail_db.close().await;
    }

    /// Once drained: exactly the acknowledged orders exist, no event was
    /// given up on, each order's confirmation reached the relay with one
    /// `Message-ID` of its own, copies beyond the first at most
    /// `mail_kills`.
    pub async fn each_order_mailed_once(
        &self,
        acknowledged: &HashMap<String, Order>,
        mail_kills: usize,
    ) {
        let orders_db = self.db("orders").await;
        let stored: HashSet<String> = sqlx::query_scalar("SELECT id FROM orders")
            .fetch_all(&orders_db)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let acked: HashSet<String> = acknowledged.keys().cloned().collect();
        assert_eq!(stored, acked, "one order per acknowledged key, no other");
        assert_eq!(
            count(
                &orders_db,
                "SELECT count(*) FROM outbox WHERE parked_at IS NOT NULL"
            )
            .await,
            0,
            "no event given up on"
        );
        orders_db.close().await;

        let received = self.relay.received();
        let mut extra = 0;
        let mut message_ids = HashSet::new();
        for id in &acked {
            let copies: Vec<&Received> = received
                .iter()
                .filter(|m| m.data.contains(id.as_str()))
                .collect();
            let ids: HashSet<&str> = copies.iter().map(|m| m.message_id.as_str()).collect();
            assert_eq!(ids.len(), 1, "order {id}: its mails carry {ids:?}");
            assert!(
                message_ids.insert(copies[0].message_id.clone()),
                "order {id} shares its Message-ID with another order"
            );
            extra += copies.len() - 1;
        }
        assert!(
            extra <= mail_kills,
            "{extra} mails sent again, more than the {mail_kills} kills of mail replicas"
        );
        eprintln!("{} mails at the relay, {extra} sent again", received.len());
    }

    /// Every acknowledged order's reservation is confirmed (waiting for it),
    /// each confirmation counted once in its ticket, and no ticket has more
    /// places held or confirmed than its capacity.
    pub async fn reservations_confirmed_nothing_oversold(
        &self,
        acknowledged: &HashMap<String, Order>,
    ) {
        let ticketing_db = self.db("ticketing").await;
        let start = tokio::time::Instant::now();
        loop {
            let mut unconfirmed = 0;
            for order in acknowledged.values() {
                let status: String =
                    sqlx::query_scalar("SELECT status FROM reservations WHERE id = $1")
                        .bind(&order.reservation_id)
                        .fetch_one(&ticketing_db)
                        .await
                        .unwrap();
                if status != "confirmed" {
                    unconfirmed += 1;
                }
            }
            if unconfirmed == 0 {
                break;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{unconfirmed} reservations of acknowledged orders not confirmed"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT t.id, t.capacity, t.confirmed, \
               COALESCE(CAST(SUM(r.quantity) FILTER (WHERE r.status = 'confirmed') AS BIGINT), 0) \
             FROM tickets t LEFT JOIN reservations r ON r.ticket_id = t.id \
             GROUP BY t.id, t.capacity, t.confirmed",
        )
        .fetch_all(&ticketing_db)
        .await
        .unwrap();
        assert_eq!(rows.len(), 2);
        for (ticket, capacity, counted, confirmed) in rows {
            assert_eq!(
                counted, confirmed,
                "ticket {ticket}: {counted} places counted confirmed, {confirmed} in \
                 confirmed reservations (a reservation confirmed twice?)"
            );
            let held: i64 = sqlx::query_scalar(
                "SELECT COALESCE(CAST(SUM(quantity) AS BIGINT), 0) FROM reservations \
                 WHERE ticket_id = $1 AND status IN ('held', 'confirmed')",
            )
            .bind(&ticket)
            .fetch_one(&ticketing_db)
            .await
            .unwrap();
            assert!(
                held <= capacity,
                "ticket {ticket}: {held} places of {capacity}"
            );
        }
        let scarce_sold: u32 = acknowledged
            .values()
            .filter(|o| o.ticket_id == self.scarce)
            .map(|o| o.quantity)
            .sum();
        assert!(
            scarce_sold <= SCARCE,
            "{scarce_sold} of {SCARCE} places sold"
        );
        ticketing_db.close().await;
    }

    /// Every replica still running stops cleanly on SIGTERM, the last
    /// started first; then the data directory and the databases go.
    pub async fn every_replica_exits_cleanly(mut self) {
        for service in SERVICES.iter().rev() {
            for index in 0..self.system.replicas(service) {
                let status = self
                    .system
                    .terminate(service, index)
                    .await
                    .unwrap_or_else(|| panic!("{service} replica {index} stops"));
                assert!(
                    status.success(),
                    "{service} replica {index} exits 0 on SIGTERM: {status}"
                );
            }
        }
        self.system.stop().await;
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// What a customer got.
#[derive(Debug, Default)]
pub struct Placed {
    pub orders: Vec<Order>,
    pub sold_out: usize,
}

/// Places an order as a careful client does: on an error or a timeout it
/// asks again with the same key, until the order is taken (`Some`) or the
/// ticket is sold out (`None`).
pub async fn place_retrying(
    orders: &OrdersClient,
    cx: &CallContext,
    ticket: &str,
    key: &str,
) -> Option<Order> {
    let order = NewOrder {
        ticket_id: ticket.to_owned(),
        quantity: 1,
        email: "alice@example.com".to_owned(),
    };
    let start = tokio::time::Instant::now();
    loop {
        match orders.on_behalf_of(cx).place("acme", &order, key).await {
            Ok(placed) => return Some(placed.order),
            Err(ClientError::Status {
                status,
                problem: Some(problem),
                ..
            }) if status == 409
                && problem.members.get("reason").and_then(|r| r.as_str()) == Some("sold_out") =>
            {
                return None;
            }
            Err(e) => {
                assert!(
                    start.elapsed() < PATIENCE,
                    "order {key} neither taken nor refused in {} s: {e}",
                    PATIENCE.as_secs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

pub async fn count(db: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

/// A mail the relay took.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub data: String,
}

/// An SMTP relay on loopback (plain SMTP, RFC 5321's commands the mail
/// service sends) that takes every mail and records it.
#[derive(Debug, Clone)]
pub struct SmtpSink {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

impl SmtpSink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink = Self {
            port: listener.local_addr().unwrap().port(),
            received: Arc::default(),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = s.session(stream).await;
                });
            }
        });
        sink
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    async fn session(&self, stream: tokio::net::TcpStream) -> std::io::Result<()> {
        let mut io = BufReader::new(stream);
        io.get_mut().write_all(b"220 relay.test ESMTP\r\n").await?;
        let mut line = String::new();
        loop {
            line.clear();
            if io.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let upper = line.trim_end().to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") {
                b"250-relay.test\r\n250 8BITMIME\r\n"
            } else if upper == "DATA" {
                io.get_mut().write_all(b"354 go ahead\r\n").await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if io.read_line(&mut line).await? == 0 {
                        // Cut off mid-mail: not taken.
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                let message_id = data
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(name, _)| name.eq_ignore_ascii_case("message-id"))
                            .map(|(_, v)| v.trim().to_owned())
                    })
                    .unwrap_or_default();
                self.received
                    .lock()
                    .unwrap()
                    .push(Received { message_id, data });
                b"250 taken\r\n"
            } else if upper == "QUIT" {
                io.get_mut().write_all(b"221 bye\r\n").await?;
                return Ok(());
            } else {
                // HELO, MAIL FROM, RCPT TO, RSET, NOOP.
                b"250 ok\r\n"
            };
            io.get_mut().write_all(reply).await?;
        }
    }
}
