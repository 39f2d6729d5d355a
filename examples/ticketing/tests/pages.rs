//! The ticket list, page by page, over a real socket on the run's engine
//! (`CHASSIS_TEST_BACKEND`): every ticket reachable by following `next`,
//! none twice, in a stable order, while other tickets are being created;
//! and the refusals of a bad `limit` or `cursor`.

mod support;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use chassis::{
    client::{CallContext, ClientError},
    page::Page,
    permission::AccountId,
};
use serde_json::Value;
use support::{Data, Server, day_pass, eventually, user};
use ticketing::client::{Ticket, TicketingClient};

fn account(name: &str) -> AccountId {
    AccountId::parse(name).unwrap()
}

/// Carol may do anything in any account.
async fn carol() -> CallContext {
    user("carol", &["ticketing:*:*:*"]).await
}

/// Creates `n` tickets in `account`, named by their number.
async fn create(client: &TicketingClient, cx: &CallContext, account: &AccountId, n: usize) {
    for i in 0..n {
        let mut new = day_pass(10);
        new.name = format!("ticket {i}");
        client
            .on_behalf_of(cx)
            .create_ticket(account, &new)
            .await
            .unwrap();
    }
}

/// `GET path` as `cx`: a refusal's status and problem document, which must
/// have come as `application/problem+json`.
async fn problem(server: &Server, cx: &CallContext, path: &str) -> (u16, Value) {
    match server.downstream().on_behalf_of(cx).get(path).send().await {
        Err(ClientError::Status {
            status,
            problem: Some(_),
            body,
            ..
        }) => (status.as_u16(), serde_json::from_slice(&body).unwrap()),
        other => panic!("expected a problem+json refusal, got {other:?}"),
    }
}

/// The sort key of the list: oldest first, by creation time then id.
fn key(t: &Ticket) -> (i128, String) {
    (t.created_at.unix_timestamp_nanos(), t.id.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ticket_is_reached_once_in_order_while_others_are_created() {
    let data = Data::new("ticketing-pages");
    let server = Server::start(&data, &[]).await;
    let client = server.client();
    let cx = carol().await;
    let acme = account("acme");
    create(&client, &cx, &acme, 250).await;
    // Another account's tickets, which acme's pages never show.
    create(&client, &cx, &account("globex"), 3).await;

    // Tickets keep being created in acme while the pages are read; each
    // page is read only after at least one more was created since the one
    // before, so the reads and the inserts interleave.
    let created = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicUsize::new(0));
    let inserter = {
        let (client, cx, acme) = (client.clone(), cx.clone(), acme.clone());
        let (created, stop) = (created.clone(), stop.clone());
        tokio::spawn(async move {
            while stop.load(Ordering::SeqCst) == 0 {
                let mut new = day_pass(10);
                new.name = "created while paging".to_owned();
                client
                    .on_behalf_of(&cx)
                    .create_ticket(&acme, &new)
                    .await
                    .unwrap();
                created.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let mut seen: Vec<Ticket> = Vec::new();
    let mut pages = client
        .on_behalf_of(&cx)
        .ticket_pages(&acme, Some(40))
        .unwrap();
    let mut sizes = Vec::new();
    loop {
        if stop.load(Ordering::SeqCst) == 0 {
            let before = created.load(Ordering::SeqCst);
            eventually("a ticket created between two pages", || async {
                created.load(Ordering::SeqCst) > before
            })
            .await;
        }
        let Some(page) = pages.next().await.unwrap() else {
            break;
        };
        assert!(page.items.len() <= 40);
        sizes.push(page.items.len());
        seen.extend(page.items);
        // The list grows as it is read; stop the inserts once past the
        // first 250 so that the reading ends.
        if seen.len() >= 250 {
            stop.store(1, Ordering::SeqCst);
        }
    }
    stop.store(1, Ordering::SeqCst);
    inserter.await.unwrap();
    assert!(sizes.len() >= 7, "{sizes:?}");

    // None twice, every one of the 250 that were there first, only acme's,
    // in a strictly increasing order.
    let ids: HashSet<&str> = seen.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids.len(), seen.len(), "a ticket was listed twice");
    for i in 0..250 {
        let name = format!("ticket {i}");
        assert_eq!(
            seen.iter().filter(|t| t.name == name).count(),
            1,
            "{name} was not listed once"
        );
    }
    assert!(seen.iter().all(|t| t.account == "acme"));
    assert!(
        seen.windows(2).all(|w| key(&w[0]) < key(&w[1])),
        "out of order"
    );
    // The first 250 come first (oldest first), and nothing was lost at the
    // end: the whole list, read again, is what was seen plus what came
    // after the last page.
    assert!(seen[..250].iter().all(|t| t.name.starts_with("ticket ")));
    let all = client.on_behalf_of(&cx).all_tickets(&acme).await.unwrap();
    assert_eq!(all.len(), 250 + created.load(Ordering::SeqCst));
    assert_eq!(all[..seen.len()], seen[..]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_page_the_link_header_and_the_last_page() {
    let data = Data::new("ticketing-page-shape");
    let server = Server::start(&data, &[]).await;
    let cx = carol().await;
    let acme = account("acme");
    create(&server.client(), &cx, &acme, 5).await;

    let res = server
        .downstream()
        .on_behalf_of(&cx)
        .get("/ticketing/v1/acme/tickets?limit=2")
        .send()
        .await
        .unwrap();
    let page: Page<Ticket> = res.json().unwrap();
    let next = page.next.clone().unwrap();
    assert!(next.starts_with("/ticketing/v1/acme/tickets?limit=2&cursor="));
    assert_eq!(
        res.headers()["link"],
        format!("<{next}>; rel=\"next\"").as_str()
    );
    assert_eq!(page.items.len(), 2);

    // The default limit holds all five; the page is the last.
    let first = server
        .client()
        .on_behalf_of(&cx)
        .list_tickets(&acme, None)
        .await
        .unwrap();
    assert_eq!(first.items.len(), 5);
    assert!(first.is_last());
    assert_eq!(first.items[..2], page.items[..]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_limit_or_cursor_is_a_problem_and_never_another_accounts_page() {
    let data = Data::new("ticketing-page-refusals");
    let server = Server::start(&data, &[]).await;
    let cx = carol().await;
    let client = server.client();
    create(&client, &cx, &account("acme"), 3).await;
    create(&client, &cx, &account("globex"), 3).await;

    for limit in ["0", "101", "-1", "x", ""] {
        let (status, p) = problem(
            &server,
            &cx,
            &format!("/ticketing/v1/acme/tickets?limit={limit}"),
        )
        .await;
        assert_eq!(status, 422, "{limit:?}: {p}");
        assert_eq!(p["reason"], "invalid_fields");
        assert_eq!(p["errors"][0]["parameter"], "limit");
        assert!(p["correlation_id"].as_str().is_some_and(|c| !c.is_empty()));
    }

    let first = client
        .on_behalf_of(&cx)
        .list_tickets(&account("acme"), Some(1))
        .await
        .unwrap();
    let next = first.next.unwrap();
    let cursor = next.split("cursor=").nth(1).unwrap();
    let mut edited = cursor.to_owned();
    edited.insert(3, 'A');
    for path in [
        "/ticketing/v1/acme/tickets?cursor=garbage".to_owned(),
        "/ticketing/v1/acme/tickets?cursor=%00%FF".to_owned(),
        format!("/ticketing/v1/acme/tickets?cursor={edited}"),
        // Acme's cursor on globex's list: refused, not globex's tickets.
        next.replace("/acme/", "/globex/"),
    ] {
        let (status, p) = problem(&server, &cx, &path).await;
        assert_eq!(status, 422, "{path}: {p}");
        assert_eq!(p["errors"][0]["parameter"], "cursor", "{path}");
        assert!(p.get("items").is_none(), "{path}: {p}");
        assert!(p["correlation_id"].as_str().is_some_and(|c| !c.is_empty()));
    }
    // Unchanged, it still works.
    let second = server
        .downstream()
        .on_behalf_of(&cx)
        .get(&next)
        .send()
        .await
        .unwrap()
        .json::<Page<Ticket>>()
        .unwrap();
    assert_eq!(second.items.len(), 1);
    assert_eq!(second.items[0].account, "acme");
    server.stop().await;
}
