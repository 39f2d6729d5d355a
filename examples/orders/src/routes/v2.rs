//! Version 2's routes, under `/orders/v2`: the same orders and the same
//! permissions as v1, in v2's shape ([`crate::client::v2`]).

use std::sync::Arc;

use axum::{
    Json,
    extract::{self, Path},
    response::{IntoResponse, Response},
};
use chassis::{
    Problem,
    api::{self, Api},
    page::{Page, PageRequest},
    permission::AccountId,
    validation::{FieldError, Fields, Invalid},
};
use serde_json::{Value, json};

use super::{
    IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_PATTERN, PLACE_CONFLICT, PLACE_DESCRIPTION,
    PLACE_UNPROCESSABLE, Shape, Version, place,
};
use crate::{
    State,
    client::{
        NewOrder,
        v2::{NewOrder as NewOrderV2, Order},
    },
    store,
};

/// The route template of placing an order in v2.
const PLACE_ROUTE: &str = "/orders/v2/{account}/orders";

/// Version 2.
pub(crate) enum V2 {}

impl Version for V2 {
    const SHAPE: Shape = Shape {
        route: PLACE_ROUTE,
        prefix: "/orders/v2",
        validate,
        render: |order| serde_json::to_string(&Order::from(order)).unwrap_or_default(),
    };
}

/// The routes, under `/orders/v2`.
pub(crate) fn api() -> Api<Arc<State>> {
    Api::new()
        .route(
            api::post("/{account}/orders", place::<V2>)
                .requires("orders:{account}:create:order")
                .summary("Place an order")
                .description(PLACE_DESCRIPTION)
                .header_matching(
                    "Idempotency-Key",
                    true,
                    IDEMPOTENCY_KEY_PATTERN,
                    IDEMPOTENCY_KEY,
                )
                .body::<NewOrderV2>()
                .response::<Order>(201)
                .problem(409, PLACE_CONFLICT)
                .problem(422, PLACE_UNPROCESSABLE),
        )
        .route(
            api::get("/{account}/orders", list)
                .requires("orders:{account}:view:order")
                .summary("List the account's orders, newest first")
                .page::<Order>(),
        )
        .route(
            api::get("/{account}/orders/{id}", get)
                .requires("orders:{account}:view:order")
                .summary("An order")
                .operation_id("get_order")
                .param("id", "The order's id, `ord_<uuid v7>`.")
                .response::<Order>(200),
        )
}

/// Checks a v2 order: its shape here, its values by v1's rules, each
/// problem named where it is in the v2 body (`#/lines/0/quantity`).
fn validate(body: &Value) -> Result<NewOrder, Invalid> {
    let mut f = Fields::of(body)?;
    let line = f.required("lines", |v| match v.as_array().map(Vec::as_slice) {
        Some([line]) if line.is_object() => Ok(line),
        Some([_]) => Err("must hold one object with `ticket_id` and `quantity`"),
        Some(_) => Err("must hold exactly one line (orders of several tickets are not taken yet)"),
        None => Err("must be an array"),
    });
    let contact = f.required("contact", |v| {
        if v.is_object() {
            Ok(v)
        } else {
            Err("must be an object with `email`")
        }
    });
    let (line, contact) = f.finish(|| Some((line?, contact?)))?;
    let flat = json!({
        "ticket_id": line.get("ticket_id"),
        "quantity": line.get("quantity"),
        "email": contact.get("email"),
    });
    super::validate(&flat).map_err(|invalid| {
        invalid.errors().iter().fold(Invalid::new(), |all, e| {
            let at: &[&str] = match e.pointer() {
                "#/email" => &["contact", "email"],
                "#/ticket_id" => &["lines", "0", "ticket_id"],
                _ => &["lines", "0", "quantity"],
            };
            all.with(FieldError::at(at, e.detail().to_owned()))
        })
    })
}

/// `GET /orders/v2/{account}/orders`: v1's list, in v2's shape.
async fn list(
    extract::State(state): extract::State<Arc<State>>,
    account: AccountId,
    page: PageRequest,
) -> Response {
    match store::list(&state.db, account.as_str(), page.after(), page.fetch()).await {
        Ok(orders) => {
            let page = page.page(orders, |o| (o.created_at.clone(), o.id.clone()));
            Page {
                items: page.items.iter().map(Order::from).collect::<Vec<_>>(),
                next: page.next,
            }
            .into_response()
        }
        Err(e) => chassis::db::problem(&e).into_response(),
    }
}

/// `GET /orders/v2/{account}/orders/{id}`.
async fn get(
    extract::State(state): extract::State<Arc<State>>,
    account: AccountId,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    match store::get(&state.db, account.as_str(), &id).await {
        Ok(Some(order)) => Json(Order::from(&order)).into_response(),
        Ok(None) => Problem::not_found().into_response(),
        Err(e) => chassis::db::problem(&e).into_response(),
    }
}
