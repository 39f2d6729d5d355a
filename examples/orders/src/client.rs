//! The driver client of `orders`, and the types of its API.
//!
//! ```no_run
//! use chassis::client::{CallContext, Downstream};
//! use orders::{NewOrder, OrdersClient};
//!
//! # async fn example(cx: CallContext) -> Result<(), chassis::client::ClientError> {
//! let orders = OrdersClient::new(Downstream::builder("orders", "http://127.0.0.1:8083").build().unwrap());
//! let placed = orders
//!     .on_behalf_of(&cx)
//!     .place("acme", &NewOrder { ticket_id: "tkt_1".into(), quantity: 2, email: "ann@example.com".into() }, "order-2026-11-22-1")
//!     .await?;
//! println!("{} ({})", placed.order.id, if placed.replayed { "replayed" } else { "new" });
//! # Ok(())
//! # }
//! ```

use chassis::{
    client::{ClientError, Pages},
    page::Page,
};
use serde::{Deserialize, Serialize};

pub mod events;
pub mod v2;

pub use events::{OrderPlaced, ReservationConfirm};

/// An order to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewOrder {
    /// The ticket product, in ticketing: 1 to 64 of `A-Z a-z 0-9 _ -`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub ticket_id: String,
    /// How many, 1 to 100.
    #[schema(minimum = 1, maximum = 100)]
    pub quantity: u32,
    /// Where the confirmation goes: `local@domain`, printable ASCII, the
    /// domain with a dot inside it, at most 254 characters (mail checks it
    /// fully).
    #[schema(
        max_length = 254,
        pattern = "^[!-~]+@[!-\\-/-?A-~][!-?A-~]*\\.[!-?A-~]*[!-\\-/-?A-~]$"
    )]
    pub email: String,
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Accepted: the tickets are held, the confirmation is on its way.
    Placed,
    /// Ticketing confirmed the reservation.
    Confirmed,
    /// An event of the order could not be delivered and was parked; an
    /// operator must look at it.
    Attention,
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Order {
    /// `ord_<uuid v7>`.
    pub id: String,
    /// The account.
    pub account: String,
    /// The ticket product.
    pub ticket_id: String,
    /// How many.
    pub quantity: u32,
    /// Where the confirmation goes.
    pub email: String,
    /// The reservation in ticketing.
    pub reservation_id: String,
    /// Where it stands.
    pub status: OrderStatus,
    /// When it was placed, RFC 3339.
    pub created_at: String,
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
    /// Calls to `orders`: `OrdersClient::new(downstream)`, then `as_service`
    /// or `on_behalf_of` for each call.
    pub type OrdersClient = DriverClient<Orders>;
    /// Calls with one identity; see [`OrdersClient`].
    pub struct Calls;
}

/// Posts `order` to `path` with `idempotency_key`: the order answered,
/// and whether the answer was a replay. Both versions' `place`.
pub(crate) async fn place_at<T: serde::de::DeserializeOwned>(
    calls: chassis::client::Calls<'_>,
    path: &str,
    order: &impl Serialize,
    idempotency_key: &str,
) -> Result<(T, bool), ClientError> {
    let res = calls
        .post(path)
        .idempotency_key(idempotency_key)
        .json(order)
        .send()
        .await?;
    let replayed = res
        .headers()
        .get(crate::idempotency::REPLAYED)
        .is_some_and(|v| v == "true");
    Ok((res.json()?, replayed))
}

impl<'a> Calls<'a> {
    /// Places an order with an idempotency key (safe to retry with the same
    /// key).
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
        let path = self.0.path("/orders/v1/{}/orders", &[&account])?;
        let (order, replayed) = place_at(self.0, &path, order, idempotency_key).await?;
        Ok(Placed { order, replayed })
    }

    /// An order.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 404 when the account has no such order.
    pub async fn get(self, account: &str, id: &str) -> Result<Order, ClientError> {
        let path = self.0.path("/orders/v1/{}/orders/{}", &[&account, &id])?;
        self.0.get_json(&path).await
    }

    /// The first page of the account's orders, newest first, `limit` of
    /// them (the service's default, 50, when `None`); its `next` leads to
    /// the rest (see [`pages`](Self::pages)).
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

    /// The account's orders page by page, newest first, `limit` each:
    /// [`Pages::next`] for one page at a time, [`Pages::all`] for every
    /// order.
    ///
    /// # Errors
    ///
    /// A [`ClientError`] for an account that cannot be a path segment.
    pub fn pages(self, account: &str, limit: Option<u32>) -> Result<Pages<'a, Order>, ClientError> {
        let path = self.0.path("/orders/v1/{}/orders", &[&account])?;
        Ok(self.0.pages(&path, limit))
    }

    /// Every order of the account, newest first, following every page.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn list_all(self, account: &str) -> Result<Vec<Order>, ClientError> {
        self.pages(account, Some(chassis::page::MAX_LIMIT))?
            .all()
            .await
    }
}
