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
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

mod support;

use support::chaos::{Replicated, chaos_secs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_at_random_lose_no_order_send_no_confirmation_twice_and_oversell_nothing() {
    let Some(mut r) = Replicated::start("replicas_killed_at_random", &[]).await else {
        return;
    };

    // Customers order until the killing stops.
    let stop = Arc::new(AtomicBool::new(false));
    let customers = r.customers("replica", &stop);

    // Kill a replica of orders or mail, restart it, again and again.
    let victims: Vec<(&str, usize)> = [("orders", 3), ("mail", 2)]
        .into_iter()
        .flat_map(|(s, n)| (0..n).map(move |i| (s, i)))
        .collect();
    let mut kills: HashMap<&str, usize> = HashMap::new();
    let chaos = tokio::time::Instant::now();
    while chaos.elapsed() < Duration::from_secs(chaos_secs(30)) {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(500..2000))).await;
        let (service, index) = victims[fastrand::usize(..victims.len())];
        r.system.kill(service, index).await;
        *kills.entry(service).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..1000))).await;
        r.system
            .restart(service, index)
            .await
            .unwrap_or_else(|e| panic!("{service} replica {index} restarts: {e}"));
    }
    stop.store(true, Ordering::SeqCst);

    let (acknowledged, refused) = Replicated::acknowledged(customers).await;
    eprintln!(
        "{} orders acknowledged, {refused} sold out; kills: {kills:?}",
        acknowledged.len()
    );
    r.drain(&acknowledged, || async { None }).await;
    r.each_order_mailed_once(&acknowledged, kills.get("mail").copied().unwrap_or(0))
        .await;
    r.reservations_confirmed_nothing_oversold(&acknowledged)
        .await;
    r.every_replica_exits_cleanly().await;
}
