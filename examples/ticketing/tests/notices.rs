//! Sold-out notices: ticketing calls mail as itself. Both services run in
//! this process on loopback; ticketing's own token comes from the test
//! issuer's token endpoint (client credentials), so the call goes through
//! the real client, the real token and mail's real permission check.

mod support;

use std::time::Duration;

use chassis::{
    client::Downstream,
    config::{Config, Env, Reader},
    permission::AccountId,
    testing::{TestIssuer, TestServer},
};
use mail::client::MailClient;
use support::{Server, TempDir, alice, day_pass, eventually, refusal, settings, user};
use ticketing::{SoldOutNotices, client::NewReservation};

/// mail, writing what it sends to files under `dir`.
async fn mail(dir: &TempDir) -> TestServer {
    let builder = mail::app(mail::Settings::new(dir.path()))
        .await
        .expect("mail starts")
        .verifier(TestIssuer::new().verifier())
        .config(Config::default());
    TestServer::start(builder).await
}

/// Notices to `ops@acme.example` through the mail at `url`, with
/// ticketing's own token holding `grants`.
async fn notices(url: &str, grants: &[&str]) -> SoldOutNotices {
    let tokens = TestIssuer::new().token_source("ticketing", grants).await;
    SoldOutNotices {
        to: "ops@acme.example".to_owned(),
        mail: Downstream::builder("mail", url)
            .token_source(tokens)
            .attempt_timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    }
}

fn reservation(ticket_id: &str, quantity: u32) -> NewReservation {
    NewReservation {
        ticket_id: ticket_id.to_owned(),
        quantity,
    }
}

/// The body of `GET path` on `downstream`'s service, anonymously.
async fn get_text(downstream: &Downstream, path: &str) -> String {
    let cx = chassis::client::CallContext::background();
    let res = downstream.anonymous(&cx).get(path).send().await.unwrap();
    String::from_utf8(res.body().to_vec()).unwrap()
}

/// The `.eml` files mail has written.
fn sent(dir: &TempDir) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join(mail::OUTBOX_DIR)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect()
}

#[tokio::test]
async fn the_hold_that_takes_the_last_places_tells_the_operators_once() {
    let mail_dir = TempDir::new("ticketing-notices-mail");
    let mail = mail(&mail_dir).await;
    let dir = TempDir::new("ticketing-notices");
    let mut settings = settings(dir.path(), &[]);
    settings.sold_out = Some(notices(&mail.url(""), &["mail::send:message"]).await);
    let server = Server::start_with(settings).await;
    let alice = alice().await;
    let calls = server.client();
    let acme = AccountId::parse("acme").unwrap();
    let ticket = calls
        .on_behalf_of(&alice)
        .create_ticket(&acme, &day_pass(3))
        .await
        .unwrap();
    let reader = MailClient::new(Downstream::builder("mail", &mail.url("")).build().unwrap());
    let ops = user("ops", &["mail::view:message"]).await;
    let notice_id = format!("sold-out.{}", ticket.id);

    // Places left: no notice.
    calls
        .on_behalf_of(&alice)
        .reserve(&acme, &reservation(&ticket.id, 2), "first")
        .await
        .unwrap();
    let (status, _) = refusal(reader.on_behalf_of(&ops).get(&notice_id).await);
    assert_eq!(status, 404);

    // The last place: the notice was accepted before the hold was answered,
    // asked for by ticketing itself (alice may not send mail).
    let last = calls
        .on_behalf_of(&alice)
        .reserve(&acme, &reservation(&ticket.id, 1), "last")
        .await
        .unwrap();
    let notice = reader.on_behalf_of(&ops).get(&notice_id).await.unwrap();
    assert_eq!(notice.to, "ops@acme.example");
    eventually("the notice is sent", || async {
        !sent(&mail_dir).is_empty()
    })
    .await;
    let eml = sent(&mail_dir).remove(0);
    assert!(eml.contains("Subject: Sold out: Day pass"), "{eml}");
    assert!(eml.contains(&ticket.id), "{eml}");

    // Sold out again after a release: mail has this product's notice
    // already, so no second one is queued.
    calls
        .on_behalf_of(&alice)
        .release(&acme, &last.id)
        .await
        .unwrap();
    calls
        .on_behalf_of(&alice)
        .reserve(&acme, &reservation(&ticket.id, 1), "again")
        .await
        .unwrap();
    let metrics = get_text(&server.downstream().clone(), "/metrics").await;
    let line = |outcome: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("ticketing_sold_out_notices_total")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    assert_eq!(line("sent").as_deref(), Some("1"), "{metrics}");
    assert_eq!(line("duplicate").as_deref(), Some("1"), "{metrics}");
    assert_eq!(sent(&mail_dir).len(), 1);
    server.stop().await;
    mail.stop().await;
}

#[tokio::test]
async fn a_notice_that_fails_never_fails_the_hold() {
    // Without `mail::send:message`, mail refuses ticketing with 403.
    let mail_dir = TempDir::new("ticketing-notices-refused-mail");
    let mail = mail(&mail_dir).await;
    let dir = TempDir::new("ticketing-notices-refused");
    let mut settings = settings(dir.path(), &[]);
    settings.sold_out = Some(notices(&mail.url(""), &["mail::view:message"]).await);
    let server = Server::start_with(settings).await;
    let alice = alice().await;
    let acme = AccountId::parse("acme").unwrap();
    let ticket = server
        .client()
        .on_behalf_of(&alice)
        .create_ticket(&acme, &day_pass(1))
        .await
        .unwrap();
    let held = server
        .client()
        .on_behalf_of(&alice)
        .reserve(&acme, &reservation(&ticket.id, 1), "only")
        .await
        .unwrap();
    assert_eq!(held.quantity, 1);
    server.stop().await;
    mail.stop().await;
    assert!(sent(&mail_dir).is_empty());
}

#[test]
fn notices_need_an_address_and_the_services_own_identity() {
    let env = Env::from_pairs([("TICKETING_SOLD_OUT_MAIL_TO", "not an address")]);
    let mut r = Reader::new(&env);
    let settings = ticketing::Settings::read(&mut r);
    assert!(settings.sold_out.is_none());
    let problems = r.finish().unwrap_err().to_string();
    for name in [
        "TICKETING_SOLD_OUT_MAIL_TO",
        "CHASSIS_CLIENT_TOKEN_URL",
        "CHASSIS_CLIENT_ID",
        "CHASSIS_CLIENT_SECRET",
    ] {
        assert!(problems.contains(name), "{name} missing from {problems}");
    }
    // Unset, there are no notices and nothing more is required.
    let env = Env::from_pairs(Vec::<(String, String)>::new());
    let mut r = Reader::new(&env);
    assert!(ticketing::Settings::read(&mut r).sold_out.is_none());
    r.finish().unwrap();
}
