//! Mails per second from the queue to an SMTP sink on loopback.
//!
//! `cargo bench -p mail --bench smtp_throughput`. For each case: a fresh data
//! directory is filled with `MESSAGES` queued jobs (written straight into the
//! database, so only delivery is measured), the service starts with its
//! workers pointed at a sink that takes every mail, and the rate is taken
//! between the first and the last mail the sink receives. Each case stops by
//! itself after its messages (or after a minute).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{Behaviour, FakeSmtp, Server, TempDir, database};

/// Messages per case.
const MESSAGES: usize = 300;

struct Case {
    name: &'static str,
    workers: &'static str,
}

async fn fill(dir: &TempDir, n: usize) {
    // Creates and migrates the database; no worker runs.
    Server::start(dir.path(), &[("MAIL_WORKERS", "0")])
        .await
        .stop()
        .await;
    let db = database(dir.path()).await;
    let now = support::now_ms();
    let mut tx = db.begin().await.unwrap();
    for i in 0..n {
        sqlx::query(
            "INSERT INTO messages (message_id, recipient, template, data, correlation_id,
                                   status, attempts, next_attempt_at, created_at)
             VALUES (?, 'alice@example.com', 'order_confirmation', ?, 'bench', 'queued', 0, ?, ?)",
        )
        .bind(format!("evt-bench-{i:05}"))
        .bind(format!(
            r#"{{"order_id": "ord_{i}", "ticket_id": "tkt_day", "quantity": 2, "ticket_name": "Day pass", "price_minor": 4500, "currency": "EUR"}}"#
        ))
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    db.close().await;
}

async fn run(case: &Case) -> f64 {
    let dir = TempDir::new("bench");
    fill(&dir, MESSAGES).await;
    let smtp = FakeSmtp::start(Behaviour::Accept).await;
    let url = smtp.url();
    let server = Server::start(
        dir.path(),
        &[("MAIL_SMTP_URL", &url), ("MAIL_WORKERS", case.workers)],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while smtp.received().len() < MESSAGES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
    let times: Vec<Instant> = smtp.received().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), MESSAGES, "{}: every mail arrives", case.name);
    let span = times[times.len() - 1].duration_since(times[0]);
    (MESSAGES - 1) as f64 / span.as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cases = [
        Case {
            name: "smtp, 1 worker",
            workers: "1",
        },
        Case {
            name: "smtp, 4 workers",
            workers: "4",
        },
    ];
    println!("{MESSAGES} mails per case");
    for case in &cases {
        let rate = rt.block_on(run(case));
        println!("{:<40} {rate:>8.1} mails/s", case.name);
    }
}
