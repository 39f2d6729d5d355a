//! Mails per second from the queue to an SMTP sink on loopback.
//!
//! `cargo bench -p mail --bench smtp_throughput` (on Postgres:
//! `CHASSIS_TEST_BACKEND=postgres`). For each case: a fresh data
//! directory (and database) is filled with `MESSAGES` queued jobs (written straight into the
//! database, so only delivery is measured), the service starts with its
//! workers pointed at a sink that takes every mail, and the rate is taken
//! between the first and the last mail the sink receives. Each case stops by
//! itself after its messages (or after a minute).
//!
//! Cases: plain SMTP, implicit TLS (smtps) and required STARTTLS, each with
//! connections reused (`MAIL_SMTP_POOL_SIZE=4`) and with one connection per
//! mail (`MAIL_SMTP_POOL_SIZE=0`), with one worker and with four.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use tokio::time::Instant;

use support::{Behaviour, FakeSmtp, RelayTls, Server, TempDir, TestPki, database};

/// Messages per case.
const MESSAGES: usize = 2000;

#[derive(Debug, Clone, Copy)]
enum Security {
    Plain,
    Smtps,
    StartTls,
}

struct Case {
    security: Security,
    pool: &'static str,
    workers: &'static str,
}

impl Case {
    fn name(&self) -> String {
        let security = match self.security {
            Security::Plain => "smtp",
            Security::Smtps => "smtps",
            Security::StartTls => "starttls",
        };
        let reuse = if self.pool == "0" {
            "new connection per mail"
        } else {
            "connections reused"
        };
        format!("{security}, {reuse}, {} worker(s)", self.workers)
    }
}

async fn fill(dir: &TempDir, n: usize) {
    // Creates and migrates the database; no worker runs.
    Server::start(dir, &[("MAIL_WORKERS", "0")])
        .await
        .stop()
        .await;
    let db = database(dir).await;
    let now = support::now_ms();
    let mut tx = db.begin_write().await.unwrap();
    for i in 0..n {
        sqlx::query(
            "INSERT INTO messages (message_id, recipient, template, data, correlation_id,
                                   status, attempts, next_attempt_at, created_at)
             VALUES ($1, 'alice@example.com', 'order_confirmation', $2, 'bench', 'queued', 0, $3, $4)",
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
    let pki = TestPki::new(&["127.0.0.1"]);
    let tls = match case.security {
        Security::Plain => RelayTls::None,
        Security::Smtps => RelayTls::Implicit(pki.server.clone()),
        Security::StartTls => RelayTls::StartTls(pki.server.clone()),
    };
    let smtp = FakeSmtp::start_with(Behaviour::Accept, tls).await;
    let url = smtp.url();
    let ca = pki.write_ca(dir.path());
    let server = Server::start(
        &dir,
        &[
            ("MAIL_SMTP_URL", &url),
            ("CHASSIS_TLS_CA_FILE", &ca),
            ("MAIL_SMTP_POOL_SIZE", case.pool),
            ("MAIL_WORKERS", case.workers),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while smtp.received().len() < MESSAGES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
    let times: Vec<Instant> = smtp.received().iter().map(|r| r.at).collect();
    assert_eq!(times.len(), MESSAGES, "{}: every mail arrives", case.name());
    let span = times[times.len() - 1].duration_since(times[0]);
    (MESSAGES - 1) as f64 / span.as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut cases = Vec::new();
    for security in [Security::Plain, Security::Smtps, Security::StartTls] {
        for workers in ["1", "4"] {
            for pool in ["0", "4"] {
                cases.push(Case {
                    security,
                    pool,
                    workers,
                });
            }
        }
    }
    println!("{MESSAGES} mails per case");
    for case in &cases {
        let rate = rt.block_on(run(case));
        println!("{:<50} {rate:>8.1} mails/s", case.name());
    }
}
