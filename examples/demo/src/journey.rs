//! The customer journey: log in, create a ticket product, order it, get the
//! confirmation mail. Every call goes through the services' own driver
//! clients, on behalf of the user.

use std::{fmt, time::Duration};

use chassis::{
    auth::Verifier,
    client::{CallContext, Downstream},
    permission::AccountId,
};
use time::{Date, Month};

use crate::system::{Endpoints, Layout, SERVICES};

/// Why the journey failed: the step and what went wrong.
#[derive(Debug)]
pub struct JourneyError {
    /// The step, e.g. `log in as alice`.
    pub step: &'static str,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for JourneyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

impl std::error::Error for JourneyError {}

fn step<T, E: fmt::Display>(step: &'static str, r: Result<T, E>) -> Result<T, JourneyError> {
    r.map_err(|e| JourneyError {
        step,
        message: e.to_string(),
    })
}

/// What a successful journey did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Alice's access token.
    pub token: String,
    /// The ticket product created.
    pub ticket_id: String,
    /// The order placed.
    pub order_id: String,
    /// The confirmation mail written.
    pub mail: std::path::PathBuf,
    /// How long it took.
    pub took: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  logged in as alice")?;
        writeln!(f, "  created ticket product {}", self.ticket_id)?;
        writeln!(f, "  placed order {}", self.order_id)?;
        writeln!(f, "  confirmation mail: {}", self.mail.display())?;
        write!(f, "  in {:.2} s", self.took.as_secs_f64())
    }
}

fn downstream(name: &str, url: &str) -> Result<Downstream, JourneyError> {
    step(
        "configure the clients",
        Downstream::builder(name, url)
            .deadline(Duration::from_secs(10))
            .build(),
    )
}

fn date(year: i32, month: Month, day: u8) -> Date {
    Date::from_calendar_date(year, month, day).unwrap_or(Date::MIN)
}

/// Logs in as alice for calls to `audience` (each service accepts only
/// tokens minted for it) and returns her token and a context acting on her
/// behalf.
async fn login(e: &Endpoints, audience: &str) -> Result<(String, CallContext), JourneyError> {
    let cx = CallContext::background();
    let auth = auth::client::AuthClient::new(downstream("auth", &e.balanced("auth"))?);
    let tokens = step(
        "log in as alice",
        auth.password_login_for(&cx, "alice", "alice-password", audience)
            .await,
    )?;
    let verifier = step(
        "load auth's keys",
        Verifier::builder().discover(&e.issuer(), audience).build(),
    )?;
    let alice = step(
        "verify alice's token",
        verifier.verify_token(&tokens.access_token).await,
    )?;
    Ok((tokens.access_token, cx.with_principal(alice)))
}

/// Runs the journey once: log in, create a product, place an order, wait
/// for the confirmation mail and the order's confirmation.
///
/// # Errors
///
/// The first step that failed.
pub async fn run(e: &Endpoints) -> Result<Report, JourneyError> {
    let start = tokio::time::Instant::now();
    let (_, shop) = login(e, "ticketing").await?;
    let ticket = create_product(e, &shop, "Day pass", 100).await?;
    let (token, cx) = login(e, "orders").await?;
    let orders = orders::OrdersClient::new(downstream("orders", &e.balanced("orders"))?);
    let key = format!("journey-{}", chassis::id::uuid_v7());
    let placed = step(
        "place an order",
        orders
            .on_behalf_of(&cx)
            .place(
                "acme",
                &orders::NewOrder {
                    ticket_id: ticket.id.clone(),
                    quantity: 2,
                    email: "alice@example.com".to_owned(),
                },
                &key,
            )
            .await,
    )?;
    let order_id = placed.order.id;
    let mail = step(
        "receive the confirmation mail",
        wait_for_mail(e, &order_id, Duration::from_secs(30)).await,
    )?;
    step(
        "see the order confirmed",
        wait_confirmed(&orders, &cx, &order_id, Duration::from_secs(30)).await,
    )?;
    Ok(Report {
        token,
        ticket_id: ticket.id,
        order_id,
        mail,
        took: start.elapsed(),
    })
}

/// Creates a ticket product in account acme, on behalf of `cx`'s user.
async fn create_product(
    e: &Endpoints,
    cx: &CallContext,
    name: &str,
    capacity: u32,
) -> Result<ticketing::client::Ticket, JourneyError> {
    let acme = step("name the account", AccountId::parse("acme"))?;
    let ticketing =
        ticketing::client::TicketingClient::new(downstream("ticketing", &e.balanced("ticketing"))?);
    step(
        "create a ticket product",
        ticketing
            .on_behalf_of(cx)
            .create_ticket(
                &acme,
                &ticketing::client::NewTicket {
                    name: name.to_owned(),
                    price_minor: 4500,
                    currency: "EUR".to_owned(),
                    capacity,
                    valid_from: date(2026, Month::December, 1),
                    valid_until: date(2027, Month::April, 30),
                },
            )
            .await,
    )
}

/// Alice's token and a product with a capacity that load will not exhaust.
///
/// # Errors
///
/// A step failed.
pub async fn load_setup(e: &Endpoints) -> Result<(String, String), JourneyError> {
    let (_, shop) = login(e, "ticketing").await?;
    let ticket = create_product(e, &shop, "Load pass", 1_000_000).await?;
    let (token, _) = login(e, "orders").await?;
    Ok((token, ticket.id))
}

/// Waits for a mail in mail's outbox that names the order.
async fn wait_for_mail(
    e: &Endpoints,
    order_id: &str,
    limit: Duration,
) -> Result<std::path::PathBuf, String> {
    let dir = e.data.join("mail").join("outbox");
    let start = tokio::time::Instant::now();
    loop {
        if let Ok(mut entries) = tokio::fs::read_dir(&dir).await {
            while let Ok(Some(entry)) = entries.next_entry().await {
                let path = entry.path();
                if path.extension().is_some_and(|x| x == "eml")
                    && tokio::fs::read_to_string(&path)
                        .await
                        .is_ok_and(|text| text.contains(order_id))
                {
                    return Ok(path);
                }
            }
        }
        if start.elapsed() > limit {
            return Err(format!(
                "no mail naming {order_id} in {} after {} s",
                dir.display(),
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_confirmed(
    orders: &orders::OrdersClient,
    cx: &CallContext,
    order_id: &str,
    limit: Duration,
) -> Result<(), String> {
    let start = tokio::time::Instant::now();
    loop {
        match orders.on_behalf_of(cx).get("acme", order_id).await {
            Ok(o) if o.status == orders::OrderStatus::Confirmed => return Ok(()),
            Ok(o) if start.elapsed() > limit => {
                return Err(format!("still {:?} after {} s", o.status, limit.as_secs()));
            }
            Err(e) if start.elapsed() > limit => return Err(e.to_string()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// What `demo` prints once the system is up.
#[derive(Debug, Clone)]
pub struct Intro {
    /// Alice's token.
    pub token: String,
    /// A ticket product to order.
    pub ticket_id: String,
}

/// Logs in and creates a product to order, for the printed instructions.
///
/// # Errors
///
/// A step failed.
pub async fn prepare(e: &Endpoints) -> Result<Intro, JourneyError> {
    let report = run(e).await?;
    Ok(Intro {
        token: report.token,
        ticket_id: report.ticket_id,
    })
}

/// Where the services run when some have several replicas: every
/// replica's URL and each service's database; empty for one process of
/// each on SQLite.
pub fn replicas_text(e: &Endpoints, layout: &Layout) -> String {
    let several = SERVICES.iter().any(|s| e.urls(s).len() > 1);
    let postgres = SERVICES.iter().any(|s| layout.database(s).is_some());
    if !several && !postgres {
        return String::new();
    }
    let mut text = String::from(
        "\n\nReplicas (every client balances its calls over every replica of its downstream):\n\n",
    );
    for s in SERVICES {
        let db = layout
            .database(s)
            .map_or_else(|| "SQLite".to_owned(), crate::postgres::redact);
        text.push_str(&format!("  {s:<10} {}\n", e.urls(s).join("  ")));
        text.push_str(&format!("  {:<10} database {db}\n", ""));
    }
    if e.urls("auth").len() > 1 {
        text.push_str(
            "\n  auth's issuer, token URL and key set name its first replica; in production a\n  \
             load balancer or a Kubernetes Service in front of auth's replicas takes that place.\n",
        );
    }
    text
}

/// The ready-to-paste journey.
pub fn instructions(e: &Endpoints, intro: &Intro, layout: &Layout) -> String {
    format!(
        r#"The system is up.

  auth       {auth}      (discovery: {auth}/auth/v1/.well-known/openid-configuration)
  ticketing  {ticketing}
  orders     {orders}
  mail       {mail}      (sent mail: {outbox})
  each one:  /health/live  /health/ready  /metrics  /info{replicas}
  API docs:  {auth}/auth/v1/docs
             {ticketing}/ticketing/v1/docs
             {orders}/orders/v2/docs   (v1, deprecated: {orders}/orders/v1/docs)
             {mail}/mail/v1/docs
             (each page renders its version's openapi.json beside it; open one in a browser)
  logs:      {logs}
  grants:    {grants}
             (users, service clients and their grants: an edit reaches the next token)

Alice's token for orders (15 minutes; get another with the first command):

  TOKEN={token}

The journey (each service accepts only tokens minted for it: `audience`):

  # log in (password grant), once for ticketing and once for orders
  login() {{ curl -s {auth}/auth/v1/token -d grant_type=password -d username=$1 -d password=$1-password -d audience=$2 | sed 's/.*"access_token":"\([^"]*\)".*/\1/'; }}
  SHOP=$(login alice ticketing); TOKEN=$(login alice orders)

  # create a ticket product in account acme
  curl -s {ticketing}/ticketing/v1/acme/tickets -H "authorization: Bearer $SHOP" -H 'content-type: application/json' \
    -d '{{"name":"Season pass","price_minor":59000,"currency":"EUR","capacity":50,"valid_from":"2026-12-01","valid_until":"2027-04-30"}}'

  # a token for ticketing is refused by orders: 401 bad_audience
  curl -s {orders}/orders/v1/acme/orders -H "authorization: Bearer $SHOP"

  # order 2 of the demo's day pass (send it twice: the same key gives the same order)
  curl -si {orders}/orders/v1/acme/orders -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -H 'idempotency-key: my-first-order' -d '{{"ticket_id":"{ticket}","quantity":2,"email":"alice@example.com"}}'

  # list the orders (a page, newest first; follow "next" for more), then read the confirmation mail
  curl -s "{orders}/orders/v1/acme/orders?limit=20" -H "authorization: Bearer $TOKEN"
  ls {outbox}

  # bob may not see acme's orders: 403
  curl -si {orders}/orders/v1/acme/orders -H "authorization: Bearer $(login bob orders)"

The synthetic monitor runs this journey every minute: see synthetic_journey_* at http://127.0.0.1:{demo_port}/metrics.
Press Ctrl-C to stop."#,
        auth = e.auth,
        ticketing = e.ticketing,
        orders = e.orders,
        mail = e.mail,
        outbox = e.data.join("mail").join("outbox").display(),
        logs = e.data.join("logs").display(),
        grants = crate::system::grants_file(&e.data).display(),
        token = intro.token,
        ticket = intro.ticket_id,
        demo_port = std::env::var("DEMO_PORT").unwrap_or_else(|_| "8080".to_owned()),
        replicas = replicas_text(e, layout),
    )
}
