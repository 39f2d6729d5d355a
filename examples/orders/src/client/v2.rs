//! Version 2 of the orders API (`/orders/v2`), and its driver client.
//!
//! What changed from v1, and why it needed a new version: an order holds
//! **lines** (`lines: [{ticket_id, quantity}]`) instead of one ticket and
//! quantity at the top, so that orders of several tickets can come without
//! another break, and the confirmation address moved into `contact`
//! (`contact: {email}`), where a phone number can join it. Both are
//! changes a v1 client would break on (required members renamed and
//! moved), so v1 stays served, deprecated, beside v2. The data is the same:
//! an order placed through v2 reads through v1 and the other way round.
//! Orders take one line for now: a v2 request with several is refused with
//! 422, until the store holds more.
//!
//! ```no_run
//! use chassis::client::{CallContext, Downstream};
//! use orders::client::v2::{Contact, NewOrder, OrderLine, OrdersClient};
//!
//! # async fn example(cx: CallContext) -> Result<(), chassis::client::ClientError> {
//! let orders = OrdersClient::new(Downstream::builder("orders", "http://127.0.0.1:8083").build().unwrap());
//! let new = NewOrder {
//!     lines: vec![OrderLine { ticket_id: "tkt_1".into(), quantity: 2 }],
//!     contact: Contact { email: "ann@example.com".into() },
//! };
//! let placed = orders.on_behalf_of(&cx).place("acme", &new, "order-2026-12-06-1").await?;
//! println!("{} ({} line)", placed.order.id, placed.order.lines.len());
//! # Ok(())
//! # }
//! ```

use chassis::{
    client::{ClientError, Pages},
    page::Page,
};
use serde::{Deserialize, Serialize};

pub use super::OrderStatus;

/// One line of an order: a ticket product and how many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderLine {
    /// The ticket product, in ticketing: 1 to 64 of `A-Z a-z 0-9 _ -`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub ticket_id: String,
    /// How many, 1 to 100.
    #[schema(minimum = 1, maximum = 100)]
    pub quantity: u32,
}

/// Whom an order's messages go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Contact {
    /// Where the confirmation goes: `local@domain`, printable ASCII, the
    /// domain with a dot inside it, at most 254 characters (mail checks it
    /// fully).
    #[schema(
        max_length = 254,
        pattern = "^[!-~]+@[!-\\-/-?A-~][!-?A-~]*\\.[!-?A-~]*[!-\\-/-?A-~]$"
    )]
    pub email: String,
}

/// An order to place (v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewOrder {
    /// What is ordered: exactly one line for now.
    #[schema(min_items = 1, max_items = 1)]
    pub lines: Vec<OrderLine>,
    /// Whom to confirm it to.
    pub contact: Contact,
}

/// An order (v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Order {
    /// `ord_<uuid v7>`.
    pub id: String,
    /// The account.
    pub account: String,
    /// What is ordered.
    pub lines: Vec<OrderLine>,
    /// Whom it is confirmed to.
    pub contact: Contact,
    /// The reservation in ticketing.
    pub reservation_id: String,
    /// Where it stands.
    pub status: OrderStatus,
    /// When it was placed, RFC 3339.
    pub created_at: String,
}

impl From<&super::Order> for Order {
    fn from(o: &super::Order) -> Self {
        Self {
            id: o.id.clone(),
            account: o.account.clone(),
            lines: vec![OrderLine {
                ticket_id: o.ticket_id.clone(),
                quantity: o.quantity,
            }],
            contact: Contact {
                email: o.email.clone(),
            },
            reservation_id: o.reservation_id.clone(),
            status: o.status,
            created_at: o.created_at.clone(),
        }
    }
}

/// The answer to placing an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// The order.
    pub order: Order,
    /// Whether this was a replay of an earlier request with the same key.
    pub replayed: bool,
}

chassis::driver_client! {
    /// Calls to version 2 of `orders`: `OrdersClient::new(downstream)`,
    /// then `as_service` or `on_behalf_of` for each call.
    pub type OrdersClient = DriverClient<OrdersV2>;
    /// Calls with one identity; see [`OrdersClient`].
    pub struct Calls;
}

impl<'a> Calls<'a> {
    /// Places an order with an idempotency key (safe to retry with the same
    /// key; a key used with v1 is not reused here: 422).
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 422 `invalid_fields` for an invalid order.
    pub async fn place(
        self,
        account: &str,
        order: &NewOrder,
        idempotency_key: &str,
    ) -> Result<Placed, ClientError> {
        let path = self.0.path("/orders/v2/{}/orders", &[&account])?;
        let (order, replayed) = super::place_at(self.0, &path, order, idempotency_key).await?;
        Ok(Placed { order, replayed })
    }

    /// An order.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 404 when the account has no such order.
    pub async fn get(self, account: &str, id: &str) -> Result<Order, ClientError> {
        let path = self.0.path("/orders/v2/{}/orders/{}", &[&account, &id])?;
        self.0.get_json(&path).await
    }

    /// The account's orders page by page, newest first, `limit` each.
    ///
    /// # Errors
    ///
    /// A [`ClientError`] for an account that cannot be a path segment.
    pub fn pages(self, account: &str, limit: Option<u32>) -> Result<Pages<'a, Order>, ClientError> {
        let path = self.0.path("/orders/v2/{}/orders", &[&account])?;
        Ok(self.0.pages(&path, limit))
    }

    /// The first page of the account's orders, newest first.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 422 `invalid_fields` for a `limit` outside 1 to
    /// 100.
    pub async fn list(self, account: &str, limit: Option<u32>) -> Result<Page<Order>, ClientError> {
        Ok(self.pages(account, limit)?.next().await?.unwrap_or(Page {
            items: Vec::new(),
            next: None,
        }))
    }
}
