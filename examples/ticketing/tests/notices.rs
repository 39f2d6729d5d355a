//! Sold-out notices: ticketing calls mail as itself. Both services run in
//! this process on loopback; ticketing's own token comes from the test
//! issuer's token endpoint (client credentials), so the call goes through
//! the real client, the real token and mail's real permission check. What
//! stands mail up is `support::mail`; the ticket domain is only in the
//! triggers below.

mod support;

use chassis::{
    config::{Env, Reader},
    permission::AccountId,
};
use support::{
    Data, Server, alice, day_pass, eventually, mail::Mail, refusal, reservation, sell_out_again,
    settings,
};

#[tokio::test]
async fn the_hold_that_takes_the_last_places_tells_the_operators_once() {
    let mail = Mail::start().await;
    let dir = Data::new("ticketing-notices");
    let mut settings = settings(&dir, &[]);
    settings.sold_out = Some(mail.notices(&["mail::send:message"]).await);
    let server = Server::start_with(settings).await;
    let alice = alice().await;
    let calls = server.client();
    let acme = AccountId::parse("acme").unwrap();
    let ticket = calls
        .on_behalf_of(&alice)
        .create_ticket(&acme, &day_pass(3))
        .await
        .unwrap();
    let notice_id = format!("sold-out.{}", ticket.id);

    // Places left: no notice.
    calls
        .on_behalf_of(&alice)
        .reserve(&acme, &reservation(&ticket.id, 2), "first")
        .await
        .unwrap();
    let (status, _) = refusal(mail.message(&notice_id).await);
    assert_eq!(status, 404);

    // The last place: the notice was accepted before the hold was answered,
    // asked for by ticketing itself (alice may not send mail).
    let last = calls
        .on_behalf_of(&alice)
        .reserve(&acme, &reservation(&ticket.id, 1), "last")
        .await
        .unwrap();
    let notice = mail.message(&notice_id).await.unwrap();
    assert_eq!(notice.to, "ops@acme.example");
    eventually("the notice is sent", || async { !mail.sent().is_empty() }).await;
    let eml = mail.sent().remove(0);
    assert!(eml.contains("Subject: Sold out: Day pass"), "{eml}");
    assert!(eml.contains(&ticket.id), "{eml}");

    // Sold out again after a release: mail has this product's notice
    // already, so no second one is queued.
    sell_out_again(&calls, &alice, &acme, &ticket.id, &last.id).await;
    let notices = "ticketing_sold_out_notices_total";
    let sent = server.metric(notices, r#"outcome="sent""#).await;
    assert_eq!(sent.as_deref(), Some("1"));
    let duplicate = server.metric(notices, r#"outcome="duplicate""#).await;
    assert_eq!(duplicate.as_deref(), Some("1"));
    assert_eq!(mail.sent().len(), 1);
    server.stop().await;
    mail.stop().await;
}

#[tokio::test]
async fn a_notice_that_fails_never_fails_the_hold() {
    // Without `mail::send:message`, mail refuses ticketing with 403.
    let mail = Mail::start().await;
    let dir = Data::new("ticketing-notices-refused");
    let mut settings = settings(&dir, &[]);
    settings.sold_out = Some(mail.notices(&["mail::view:message"]).await);
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
    assert!(mail.stop().await.is_empty());
}

#[test]
fn notices_need_an_address_and_the_services_own_identity() {
    let env = Env::from_pairs([("TICKETING_SOLD_OUT_MAIL_TO", "not an address")]);
    let mut r = Reader::new(&env);
    ticketing::Settings::read(&mut r);
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
