//! What the system tests share: the demo binary, the four services started
//! as processes, and a customer's calls.

#![allow(dead_code, unreachable_pub)]

use std::{
    collections::HashSet,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    time::Duration,
};

pub mod chaos;

use chassis::{
    auth::Verifier,
    client::{CallContext, Downstream},
    permission::AccountId,
    testing::TestDatabase,
};
use demo::system::{Endpoints, Layout, Ports, SERVICES, System};
use orders::{NewOrder, OrdersClient};
use ticketing::client::{NewTicket, TicketingClient};
use time::{Date, Month};

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_demo"))
}

pub fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("demo-test-{name}-{}", chassis::id::uuid_v7()))
}

/// The system of one test, with the databases it runs on.
pub struct Running {
    pub system: System,
    /// Each service's database on the run's engine
    /// (`CHASSIS_TEST_BACKEND`): dropped after the system stops.
    _databases: Vec<TestDatabase>,
}

impl Deref for Running {
    type Target = System;

    fn deref(&self) -> &System {
        &self.system
    }
}

impl DerefMut for Running {
    fn deref_mut(&mut self) -> &mut System {
        &mut self.system
    }
}

/// One process of each service, on the run's engine: SQLite files in a
/// fresh data directory, or a fresh PostgreSQL database per service.
pub async fn start(name: &str) -> Running {
    start_with_env(name, &[]).await
}

/// [`start`], with `env` added to every service's environment.
pub async fn start_with_env(name: &str, env: &[(&str, &str)]) -> Running {
    let databases: Vec<TestDatabase> = SERVICES.iter().map(|_| TestDatabase::new()).collect();
    let mut layout = Layout::from(Ports::free().unwrap());
    for (service, db) in SERVICES.iter().zip(&databases) {
        if let Some(url) = db.url() {
            layout = layout.postgres(service, url);
        }
    }
    let system = System::start_layout(&exe(), &temp_dir(name), layout, env)
        .await
        .expect("the system starts");
    Running {
        system,
        _databases: databases,
    }
}

pub fn downstream(name: &str, url: &str) -> Downstream {
    Downstream::builder(name, url)
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Alice, logged in through auth for calls to `audience` (each service
/// accepts only tokens minted for it), as a context for calls on her behalf.
pub async fn alice(e: &Endpoints, audience: &str) -> CallContext {
    user(e, "alice", audience).await
}

/// A demo user (whose password is `<name>-password`), logged in for calls
/// to `audience`.
pub async fn user(e: &Endpoints, name: &str, audience: &str) -> CallContext {
    let cx = CallContext::background();
    let tokens = auth::client::AuthClient::new(downstream("auth", &e.auth))
        .password_login_for(&cx, name, &format!("{name}-password"), audience)
        .await
        .expect("the user logs in");
    let verifier = Verifier::builder()
        .discover(&e.issuer(), audience)
        .build()
        .unwrap();
    let principal = verifier.verify_token(&tokens.access_token).await.unwrap();
    cx.with_principal(principal)
}

pub async fn product(e: &Endpoints, cx: &CallContext, capacity: u32) -> String {
    let date = |y, m, d| Date::from_calendar_date(y, m, d).unwrap();
    TicketingClient::new(downstream("ticketing", &e.ticketing))
        .on_behalf_of(cx)
        .create_ticket(
            &AccountId::parse("acme").unwrap(),
            &NewTicket {
                name: "Day pass".to_owned(),
                price_minor: 4500,
                currency: "EUR".to_owned(),
                capacity,
                valid_from: date(2026, Month::December, 1),
                valid_until: date(2027, Month::April, 30),
            },
        )
        .await
        .expect("product created")
        .id
}

pub async fn available(e: &Endpoints, cx: &CallContext, ticket: &str) -> u32 {
    TicketingClient::new(downstream("ticketing", &e.ticketing))
        .on_behalf_of(cx)
        .get_ticket(&AccountId::parse("acme").unwrap(), ticket)
        .await
        .expect("ticket read")
        .available
}

/// Places an order, retrying with the same key until it is accepted, as a
/// careful client does.
pub async fn place(orders: &OrdersClient, cx: &CallContext, ticket: &str, key: &str) -> String {
    let order = NewOrder {
        ticket_id: ticket.to_owned(),
        quantity: 1,
        email: "alice@example.com".to_owned(),
    };
    let start = tokio::time::Instant::now();
    loop {
        match orders.on_behalf_of(cx).place("acme", &order, key).await {
            Ok(placed) => return placed.order.id,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(90),
                    "order {key} never accepted: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The mails in mail's outbox, by file.
pub fn mails(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("mail").join("outbox"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every order has exactly one mail, then checks it stays so.
pub async fn every_order_mailed_once(data: &Path, ids: &HashSet<String>) {
    let start = tokio::time::Instant::now();
    loop {
        let all = mails(data);
        let done = ids
            .iter()
            .all(|id| all.iter().filter(|m| m.contains(id.as_str())).count() == 1);
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "not every order mailed once: {} mails for {} orders",
            all.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = mails(data);
    for id in ids {
        assert_eq!(
            all.iter().filter(|m| m.contains(id.as_str())).count(),
            1,
            "{id}"
        );
    }
}
