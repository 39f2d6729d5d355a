//! Nothing lost under chaos, through NATS JetStream: three replicas of
//! orders, two of mail, two of ticketing and one auth, as real processes on
//! PostgreSQL, each reaching the broker through a [`TcpProxy`], while
//! customers place orders (retrying with their own idempotency keys),
//! publishers (orders' relays) and consumers (mail, ticketing) are killed
//! with SIGKILL at random and restarted, and the broker connection of every
//! service is cut and restored a few times.
//!
//! What must hold once the chaos stops and everything drains:
//!
//! - every order a customer was answered for exists, and nothing else;
//! - every such order got exactly one confirmation: its mail is at the
//!   SMTP relay, every copy with the one `Message-ID` of that order, copies
//!   beyond the first at most as many as mail replicas were killed;
//! - nothing was processed twice: one mail job per order, whose id is the
//!   order's `order.placed` event id; every order's reservation confirmed,
//!   each counted once in its ticket's confirmed places; no ticket
//!   oversold;
//! - nothing is left: orders' outbox delivered, mail's queue sent, the
//!   consumers' lag on the broker back to 0 and no dead letter in mail's or
//!   ticketing's dead-letter stream;
//! - every replica still running exits 0 on SIGTERM.
//!
//! It needs the PostgreSQL server of `CHASSIS_TEST_POSTGRES_URL` (four
//! databases of its own, dropped at the end) and the NATS server of
//! `CHASSIS_TEST_NATS_URL` (streams under a prefix of its own,
//! `CHASSIS_NATS_PREFIX`, deleted at the end). Without either it prints
//! `NOT RUN` and passes, unless `CHASSIS_REQUIRE_SERVERS` is set. The chaos
//! lasts `DEMO_CHAOS_SECS` (default 20).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream;
use chassis::{
    messaging::{dead_letter_stream_name, stream_name},
    testing::{TcpProxy, TestNats},
};

mod support;

use support::chaos::{Replicated, chaos_secs};

/// The services killed at random: the publishers and the consumers.
const VICTIMS: [(&str, usize); 3] = [("orders", 3), ("mail", 2), ("ticketing", 2)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_publishers_and_consumers_and_a_dropped_broker_lose_no_event_and_do_nothing_twice() {
    let test = "chaos_nats";
    let Some(nats) = TestNats::or_skip(test).await else {
        return;
    };
    let proxy = TcpProxy::start(broker_address(nats.url()).await).await;
    let url = format!("nats://{}", proxy.addr());
    let Some(mut r) = Replicated::start(
        test,
        &[
            ("CHASSIS_NATS_URL", url.as_str()),
            ("CHASSIS_NATS_PREFIX", nats.prefix()),
            // A killed consumer's messages come back soon.
            ("CHASSIS_NATS_ACK_WAIT_SECS", "5"),
            ("CHASSIS_NATS_BACKOFF_MS", "200,500,1000"),
            ("CHASSIS_NATS_LAG_POLL_MS", "500"),
        ],
    )
    .await
    else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let customers = r.customers("chaos", &stop);

    // Kill a publisher or a consumer and restart it, again and again; every
    // third turn, the first included, cut every service's broker
    // connection for a while.
    let victims: Vec<(&str, usize)> = VICTIMS
        .into_iter()
        .flat_map(|(s, n)| (0..n).map(move |i| (s, i)))
        .collect();
    let mut kills: HashMap<&str, usize> = HashMap::new();
    let mut cuts = 0;
    let chaos = tokio::time::Instant::now();
    let mut turn = 0;
    while chaos.elapsed() < Duration::from_secs(chaos_secs(20)) {
        turn += 1;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..1500))).await;
        if turn % 3 == 1 {
            eprintln!("{:?}: broker cut", chaos.elapsed());
            proxy.cut();
            cuts += 1;
            tokio::time::sleep(Duration::from_millis(fastrand::u64(500..3000))).await;
            proxy.restore();
            continue;
        }
        let (service, index) = victims[fastrand::usize(..victims.len())];
        eprintln!("{:?}: {service} {index} killed", chaos.elapsed());
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
        "{} orders acknowledged, {refused} sold out; kills: {kills:?}; {cuts} broker cuts, \
         {} broker connections",
        acknowledged.len(),
        proxy.connections()
    );
    assert!(cuts > 0, "the broker connection was cut");

    // Drained: besides the outbox and mail's queue, nothing waiting for or
    // unacknowledged by the consumers on the broker.
    let js = jetstream::new(nats.client());
    let consumers = [
        format!(
            "{}-{}-v1-order_placed",
            nats.service("mail"),
            nats.service("orders")
        ),
        format!(
            "{}-{}-v1-reservation_confirm",
            nats.service("ticketing"),
            nats.service("orders")
        ),
    ];
    let events = stream_name(&nats.service("orders"));
    r.drain(&acknowledged, || async {
        let stream = match js.get_stream(&events).await {
            Ok(s) => s,
            Err(e) => return Some(format!("orders' stream unreadable: {e}")),
        };
        let mut lag = Vec::new();
        for name in &consumers {
            match stream.consumer_info(name).await {
                Ok(i) if i.num_pending == 0 && i.num_ack_pending == 0 => {}
                Ok(i) => lag.push(format!(
                    "{name}: {} pending, {} unacknowledged",
                    i.num_pending, i.num_ack_pending
                )),
                Err(e) => lag.push(format!("{name}: {e}")),
            }
        }
        (!lag.is_empty()).then(|| lag.join("; "))
    })
    .await;

    // No dead letter: every event was valid.
    for service in ["mail", "ticketing"] {
        let dlq = dead_letter_stream_name(&nats.service(service));
        let dead = match js.get_stream(&dlq).await {
            Ok(mut s) => s.info().await.unwrap().state.messages,
            Err(_) => 0,
        };
        assert_eq!(dead, 0, "{dead} dead letters in {dlq}");
    }

    r.each_order_mailed_once(&acknowledged, kills.get("mail").copied().unwrap_or(0))
        .await;

    // One mail job per order: the one of its order.placed event.
    let orders_db = r.db("orders").await;
    let placed_events: HashSet<String> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE kind = 'order.placed'")
            .fetch_all(&orders_db)
            .await
            .unwrap()
            .into_iter()
            .collect();
    orders_db.close().await;
    assert_eq!(
        placed_events.len(),
        acknowledged.len(),
        "one event per order"
    );
    let mail_db = r.db("mail").await;
    // (Besides the order confirmations, the sold-out notice of the scarce
    // ticket, once: its id is the ticket's.)
    let jobs: Vec<(String, String, String)> =
        sqlx::query_as("SELECT message_id, template, status FROM messages")
            .fetch_all(&mail_db)
            .await
            .unwrap();
    mail_db.close().await;
    let job_ids: HashSet<String> = jobs
        .iter()
        .filter(|(_, template, _)| template == "order_confirmation")
        .map(|(id, _, _)| id.clone())
        .collect();
    let unqueued: Vec<&String> = placed_events.difference(&job_ids).collect();
    let strange: Vec<&String> = job_ids.difference(&placed_events).collect();
    assert!(
        unqueued.is_empty() && strange.is_empty(),
        "one mail job per order.placed event: events without a job {unqueued:?}, \
         jobs of no event {strange:?}"
    );
    assert!(
        jobs.iter().all(|(_, _, status)| status == "sent"),
        "every job sent: {jobs:?}"
    );

    r.reservations_confirmed_nothing_oversold(&acknowledged)
        .await;
    r.every_replica_exits_cleanly().await;
    drop(proxy);
    nats.clean_up().await;
}

/// The socket address of the first server of a `nats://` URL.
async fn broker_address(url: &str) -> SocketAddr {
    let first = url.split(',').next().unwrap_or_default().trim();
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host = host.split('/').next().unwrap_or_default();
    let host = if host.contains(':') && !host.ends_with(']') {
        host.to_owned()
    } else {
        format!("{host}:4222")
    };
    tokio::net::lookup_host(&host)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("the NATS server {url} resolves"))
}
