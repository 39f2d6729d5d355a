//! Replicas on PostgreSQL, as real processes: three of orders, two of mail,
//! two of ticketing and one auth, each service's replicas sharing its
//! database, while customers place orders and replicas of orders and mail
//! are killed (SIGKILL) and restarted at random.
//!
//! What must hold once the killing stops and the outboxes drain:
//!
//! - every order a customer was answered 201 (or its replay) for exists,
//!   and nothing else does: one order per Idempotency-Key, whatever the
//!   retries after errors and timeouts;
//! - every such order's confirmation reached the SMTP relay, every copy of
//!   it with the one `Message-ID` of that order; copies beyond the first are
//!   at most as many as mail replicas were killed (a worker killed after its
//!   relay took the mail, before it marked it sent, leaves it to another
//!   replica, which sends it again with the same `Message-ID`);
//! - every order's reservation is confirmed, and no ticket has more places
//!   held or confirmed than its capacity;
//! - every replica still running exits 0 on SIGTERM.
//!
//! It needs the PostgreSQL server of `CHASSIS_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`): four databases of its own,
//! dropped at the end. Without the server it prints `NOT RUN` and passes,
//! unless `CHASSIS_REQUIRE_SERVERS` is set. The killing lasts
//! `DEMO_CHAOS_SECS` (default 30).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chassis::{
    client::{ClientError, Downstream},
    testing::TestPostgres,
};
use demo::system::{Layout, SERVICES, System};
use orders::{NewOrder, OrdersClient};
use sqlx::PgPool;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

mod support;

use support::*;

/// The replicas of each service.
const REPLICAS: [(&str, usize); 4] = [("auth", 1), ("ticketing", 2), ("mail", 2), ("orders", 3)];

/// Customers placing orders at once.
const CUSTOMERS: usize = 4;

/// Places of the contested ticket: fewer than the customers ask for.
const SCARCE: u32 = 30;

/// The longest the test waits for anything: generous, for a busy machine.
const PATIENCE: Duration = Duration::from_secs(180);

fn chaos_secs() -> u64 {
    std::env::var("DEMO_CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_at_random_lose_no_order_send_no_confirmation_twice_and_oversell_nothing() {
    let test = "replicas_killed_at_random";
    let Some(first) = TestPostgres::or_skip(test) else {
        return;
    };
    let mut databases = vec![first];
    for _ in 1..SERVICES.len() {
        databases.push(TestPostgres::create().expect("a second database on the same server"));
    }
    let url_of = |service: &str| {
        let i = SERVICES.iter().position(|s| *s == service).unwrap();
        databases[i].url().to_owned()
    };
    let mut layout = Layout::free(&REPLICAS).unwrap();
    for s in SERVICES {
        layout = layout.postgres(s, url_of(s));
    }
    let relay = SmtpSink::start().await;
    let data = temp_dir("replicas");
    let smtp_url = relay.url();
    let mut system = System::start_layout(
        &exe(),
        &data,
        layout,
        &[
            ("MAIL_SMTP_URL", smtp_url.as_str()),
            // 8 processes × 3 connections at most: room on a server other
            // test runs share.
            ("AUTH_DB_POOL_SIZE", "2"),
            ("TICKETING_DB_POOL_SIZE", "2"),
            ("MAIL_DB_POOL_SIZE", "2"),
            ("ORDERS_DB_POOL_SIZE", "2"),
        ],
    )
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

    // Customers order until the killing stops: every other order of each
    // is for the scarce ticket.
    let stop = Arc::new(AtomicBool::new(false));
    let customers: Vec<_> = (0..CUSTOMERS)
        .map(|c| {
            let (orders, cx, stop) = (orders.clone(), cx.clone(), stop.clone());
            let tickets = [scarce.clone(), plenty.clone()];
            tokio::spawn(async move {
                let mut placed = Vec::new();
                let mut sold_out = 0;
                for i in 0..10_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let ticket = &tickets[i % 2];
                    let key = format!("replica-{c}-{i}");
                    match place_retrying(&orders, &cx, ticket, &key).await {
                        Some(order) => placed.push(order),
                        None => sold_out += 1,
                    }
                }
                (placed, sold_out)
            })
        })
        .collect();

    // Kill a replica of orders or mail, restart it, again and again.
    let victims: Vec<(&str, usize)> = [("orders", 3), ("mail", 2)]
        .into_iter()
        .flat_map(|(s, n)| (0..n).map(move |i| (s, i)))
        .collect();
    let mut kills: HashMap<&str, usize> = HashMap::new();
    let chaos = tokio::time::Instant::now();
    while chaos.elapsed() < Duration::from_secs(chaos_secs()) {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(500..2000))).await;
        let (service, index) = victims[fastrand::usize(..victims.len())];
        system.kill(service, index).await;
        *kills.entry(service).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..1000))).await;
        system
            .restart(service, index)
            .await
            .unwrap_or_else(|e| panic!("{service} replica {index} restarts: {e}"));
    }
    stop.store(true, Ordering::SeqCst);

    let mut acknowledged: HashMap<String, orders::Order> = HashMap::new();
    let mut refused = 0;
    for c in customers {
        let (placed, sold_out) = c.await.expect("a customer finished");
        refused += sold_out;
        for order in placed {
            assert!(
                acknowledged.insert(order.id.clone(), order).is_none(),
                "two keys answered with one order"
            );
        }
    }
    let mail_kills = kills.get("mail").copied().unwrap_or(0);
    eprintln!(
        "{} orders acknowledged, {refused} sold out; kills: {kills:?}",
        acknowledged.len()
    );
    assert!(!acknowledged.is_empty(), "orders were placed");

    // Drain: nothing left to deliver in orders' outbox or to send in
    // mail's queue, and every acknowledged order's mail at the relay.
    let orders_db = PgPool::connect(&url_of("orders")).await.unwrap();
    let mail_db = PgPool::connect(&url_of("mail")).await.unwrap();
    let ticketing_db = PgPool::connect(&url_of("ticketing")).await.unwrap();
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
        let received = relay.received();
        let unmailed = acknowledged
            .keys()
            .filter(|id| !received.iter().any(|m| m.data.contains(id.as_str())))
            .count();
        if undelivered == 0 && unsent == 0 && unmailed == 0 {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "not drained after {} s: {undelivered} outbox events undelivered, {unsent} \
             mails unsent, {unmailed} acknowledged orders without a mail at the relay \
             (logs in {})",
            PATIENCE.as_secs(),
            data.join("logs").display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Exactly the acknowledged orders exist.
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

    // One confirmation per order, its copies sharing one Message-ID.
    let received = relay.received();
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

    // Every order's reservation confirmed; no ticket oversold.
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
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT t.id, t.capacity, COALESCE(CAST(SUM(r.quantity) AS BIGINT), 0) \
         FROM tickets t LEFT JOIN reservations r \
           ON r.ticket_id = t.id AND r.status IN ('held', 'confirmed') \
         GROUP BY t.id, t.capacity",
    )
    .fetch_all(&ticketing_db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    for (ticket, capacity, used) in rows {
        assert!(
            used <= capacity,
            "ticket {ticket}: {used} places of {capacity}"
        );
    }
    let scarce_sold: u32 = acknowledged
        .values()
        .filter(|o| o.ticket_id == scarce)
        .map(|o| o.quantity)
        .sum();
    assert!(
        scarce_sold <= SCARCE,
        "{scarce_sold} of {SCARCE} places sold"
    );

    orders_db.close().await;
    mail_db.close().await;
    ticketing_db.close().await;

    // Every replica still running stops cleanly, the last started first.
    for service in SERVICES.iter().rev() {
        for index in 0..system.replicas(service) {
            let status = system
                .terminate(service, index)
                .await
                .unwrap_or_else(|| panic!("{service} replica {index} stops"));
            assert!(
                status.success(),
                "{service} replica {index} exits 0 on SIGTERM: {status}"
            );
        }
    }
    system.stop().await;
    let _ = std::fs::remove_dir_all(&data);
    drop(databases);
}

/// Places an order as a careful client does: on an error or a timeout it
/// asks again with the same key, until the order is taken (`Some`) or the
/// ticket is sold out (`None`).
async fn place_retrying(
    orders: &OrdersClient,
    cx: &chassis::client::CallContext,
    ticket: &str,
    key: &str,
) -> Option<orders::Order> {
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

async fn count(db: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

/// A mail the relay took.
#[derive(Debug, Clone)]
struct Received {
    message_id: String,
    data: String,
}

/// An SMTP relay on loopback (plain SMTP, RFC 5321's commands the mail
/// service sends) that takes every mail and records it.
#[derive(Debug, Clone)]
struct SmtpSink {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

impl SmtpSink {
    async fn start() -> Self {
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

    fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    fn received(&self) -> Vec<Received> {
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
