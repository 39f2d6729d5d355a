//! SMTP to a relay on loopback: TLS (implicit and STARTTLS) with
//! certificates made at test time, refusals that name their cause, and
//! connections reused across mails.

mod support;

use support::{
    Behaviour, FakeSmtp, RelayTls, Server, TempDir, TestPki, database, eventually, job, orders, row,
};

/// Queues `ids` (to alice) through the API.
async fn queue(server: &Server, ids: &[&str]) {
    let cx = orders("corr-smtp-tls").await;
    let mail = server.client();
    for id in ids {
        mail.on_behalf_of(&cx)
            .send(&job(id, "alice@example.com"))
            .await
            .unwrap();
    }
}

/// Waits until `id` has failed at least `attempts` times, and returns
/// its last error.
async fn failed_attempts(dir: &TempDir, id: &str, attempts: i64) -> String {
    let db = database(dir).await;
    eventually("failed attempts to be recorded", || async {
        let r = row(&db, id).await;
        r.attempts >= attempts && r.last_error.is_some()
    })
    .await;
    let r = row(&db, id).await;
    assert_ne!(r.status, "sent", "{r:?}");
    r.last_error.unwrap()
}

#[tokio::test]
async fn smtps_with_the_private_ca_delivers_over_tls() {
    let dir = TempDir::new("smtps");
    let pki = TestPki::new(&["localhost", "127.0.0.1"]);
    let smtp =
        FakeSmtp::start_with(Behaviour::Accept, RelayTls::Implicit(pki.server.clone())).await;
    let ca = pki.write_ca(dir.path());
    let url = smtp.url_for("localhost");
    let server = Server::start(
        &dir,
        &[("MAIL_SMTP_URL", &url), ("CHASSIS_TLS_CA_FILE", &ca)],
    )
    .await;
    queue(&server, &["evt-smtps-1", "evt-smtps-2", "evt-smtps-3"]).await;
    eventually("the relay to take three mails", || async {
        smtp.count() == 3
    })
    .await;
    let received = smtp.received();
    assert!(received.iter().all(|m| m.tls), "every mail came over TLS");
    assert_eq!(received[0].to, ["<alice@example.com>"]);
    // One worker, one connection reused for all three mails.
    assert_eq!(smtp.connections(), 1);
    let db = database(&dir).await;
    eventually("the messages to be marked sent", || async {
        row(&db, "evt-smtps-3").await.status == "sent"
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn required_starttls_delivers_over_tls() {
    let dir = TempDir::new("starttls");
    let pki = TestPki::new(&["127.0.0.1"]);
    let smtp =
        FakeSmtp::start_with(Behaviour::Accept, RelayTls::StartTls(pki.server.clone())).await;
    let ca = pki.write_ca(dir.path());
    let url = smtp.url();
    assert!(url.ends_with("?tls=required"), "{url}");
    let server = Server::start(
        &dir,
        &[("MAIL_SMTP_URL", &url), ("CHASSIS_TLS_CA_FILE", &ca)],
    )
    .await;
    queue(&server, &["evt-starttls-1", "evt-starttls-2"]).await;
    eventually("the relay to take two mails", || async {
        smtp.count() == 2
    })
    .await;
    assert!(smtp.received().iter().all(|m| m.tls));
    assert_eq!(smtp.connections(), 1);
    server.stop().await;
}

#[tokio::test]
async fn required_starttls_never_falls_back_to_plain_text() {
    let dir = TempDir::new("no-starttls");
    // A relay that does not offer STARTTLS (or an attacker who stripped it).
    let smtp = FakeSmtp::start(Behaviour::Accept).await;
    let url = format!("smtp://127.0.0.1:{}?tls=required", smtp.addr.port());
    let pki = TestPki::new(&["127.0.0.1"]);
    let ca = pki.write_ca(dir.path());
    let server = Server::start(
        &dir,
        &[
            ("MAIL_SMTP_URL", &url),
            ("CHASSIS_TLS_CA_FILE", &ca),
            ("MAIL_MAX_ATTEMPTS", "100"),
            ("MAIL_RETRY_BASE_MS", "20"),
            ("MAIL_RETRY_MAX_MS", "50"),
        ],
    )
    .await;
    queue(&server, &["evt-stripped"]).await;
    // Retried, and kept in the queue: not lost, never sent in plain text.
    let error = failed_attempts(&dir, "evt-stripped", 2).await;
    assert!(error.contains("does not offer STARTTLS"), "{error}");
    assert_eq!(smtp.data_seen(), 0, "nothing was sent");
    server.stop().await;
    let r = row(&database(&dir).await, "evt-stripped").await;
    assert_eq!(r.status, "queued", "{r:?}");
}

#[tokio::test]
async fn a_relay_certificate_from_an_unknown_ca_is_refused() {
    let dir = TempDir::new("unknown-ca");
    let relay_pki = TestPki::new(&["127.0.0.1"]);
    let other_pki = TestPki::new(&["127.0.0.1"]);
    let smtp = FakeSmtp::start_with(
        Behaviour::Accept,
        RelayTls::Implicit(relay_pki.server.clone()),
    )
    .await;
    let ca = other_pki.write_ca(dir.path());
    let url = smtp.url();
    let server = Server::start(
        &dir,
        &[
            ("MAIL_SMTP_URL", &url),
            ("CHASSIS_TLS_CA_FILE", &ca),
            ("MAIL_RETRY_BASE_MS", "20"),
            ("MAIL_RETRY_MAX_MS", "50"),
        ],
    )
    .await;
    queue(&server, &["evt-unknown-ca"]).await;
    let error = failed_attempts(&dir, "evt-unknown-ca", 1).await;
    assert!(
        error.contains("not signed by a trusted CA") && error.contains("CHASSIS_TLS_CA_FILE"),
        "{error}"
    );
    assert_eq!(smtp.data_seen(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    for tls in ["implicit", "starttls"] {
        let dir = TempDir::new("wrong-host");
        let pki = TestPki::new(&["relay.example"]);
        let mode = if tls == "implicit" {
            RelayTls::Implicit(pki.server.clone())
        } else {
            RelayTls::StartTls(pki.server.clone())
        };
        let smtp = FakeSmtp::start_with(Behaviour::Accept, mode).await;
        let ca = pki.write_ca(dir.path());
        let url = smtp.url();
        let server = Server::start(
            &dir,
            &[
                ("MAIL_SMTP_URL", &url),
                ("CHASSIS_TLS_CA_FILE", &ca),
                ("MAIL_RETRY_BASE_MS", "20"),
                ("MAIL_RETRY_MAX_MS", "50"),
            ],
        )
        .await;
        queue(&server, &["evt-wrong-host"]).await;
        let error = failed_attempts(&dir, "evt-wrong-host", 1).await;
        assert!(error.contains("does not name the host"), "{tls}: {error}");
        assert_eq!(smtp.data_seen(), 0, "{tls}");
        server.stop().await;
    }
}

#[tokio::test]
async fn connections_are_reused_unless_the_pool_is_off() {
    for (pool, connections) in [("4", 1), ("0", 4)] {
        let dir = TempDir::new("pool");
        let smtp = FakeSmtp::start(Behaviour::Accept).await;
        let url = smtp.url();
        let server = Server::start(
            &dir,
            &[("MAIL_SMTP_URL", &url), ("MAIL_SMTP_POOL_SIZE", pool)],
        )
        .await;
        // One at a time, so that one worker's connection is the only one.
        for i in 0..4 {
            let id = format!("evt-pool-{i}");
            queue(&server, &[&id]).await;
            eventually("the mail", || async { smtp.count() == i + 1 }).await;
        }
        assert_eq!(smtp.connections(), connections, "pool size {pool}");
        server.stop().await;
    }
}

#[tokio::test]
async fn a_pooled_connection_the_relay_closed_is_replaced_without_a_failed_attempt() {
    let dir = TempDir::new("stale");
    let smtp = FakeSmtp::start(Behaviour::CloseAfterEachMail).await;
    let url = smtp.url();
    let server = Server::start(&dir, &[("MAIL_SMTP_URL", &url)]).await;
    for i in 0..3 {
        let id = format!("evt-stale-{i}");
        queue(&server, &[&id]).await;
        eventually("the mail", || async { smtp.count() == i + 1 }).await;
    }
    let db = database(&dir).await;
    for i in 0..3 {
        let id = format!("evt-stale-{i}");
        eventually("sent", || async { row(&db, &id).await.status == "sent" }).await;
        assert_eq!(row(&db, &id).await.attempts, 0, "{id}: no failed attempt");
    }
    assert_eq!(smtp.connections(), 3);
    server.stop().await;
}
