//! Pagination: every list answers one page at a time, with a cursor to the
//! next.
//!
//! # The standard
//!
//! A list endpoint never answers "everything", nor silently "the first
//! hundred": it answers **one page and the way to the next**, the same way
//! in every service.
//!
//! * **A stable total order, documented per endpoint.** Items are sorted by
//!   a key that never changes for an item and ends with its unique id, so no
//!   two items tie: `(created_at, id)` with [UUIDv7 ids](crate::id), newest
//!   first or oldest first, as the endpoint's documentation says.
//! * **Keyset, not offset.** A page starts strictly after the sort key of
//!   the previous page's last item (`WHERE (created_at, id) < ($1, $2)
//!   ORDER BY created_at DESC, id DESC`). An offset shifts when rows are
//!   inserted or deleted meanwhile, so a client following it sees some items
//!   twice and misses others, and the database reads and throws away every
//!   row before the offset; a keyset page is one range scan of an index,
//!   however deep, and **every item that existed when the client began is
//!   seen exactly once**, whatever is inserted meanwhile.
//! * **An opaque cursor.** The position is a `cursor` query parameter that
//!   clients pass back unchanged and never build or read: base64url of a
//!   versioned sort key, bound by a check value to the list it came from
//!   (its path, so its account, and its other query parameters). A cursor
//!   that is garbled, edited, from an older format, from another list or
//!   another account answers **422 naming `cursor`**, never a 500, and never
//!   a page of something else. The cursor is neither a secret nor a
//!   capability: what a caller may list is decided by the route's
//!   permission, and the query stays scoped to the account in the path.
//! * **A bounded `limit`.** From 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when
//!   absent; any other value answers **422 naming `limit`**, never a page
//!   silently cut to the bound.
//! * **The next page, twice.** The body is `{"items": [...], "next":
//!   "/orders/v1/acme/orders?limit=40&cursor=WzEsWyIy…"}`, `next` being
//!   `null` on the last page, and the same link is in an RFC 8288 `Link:
//!   <…>; rel="next"` header, for generic clients and tools. The link is an
//!   absolute path that keeps the list's other query parameters.
//!
//! Query problems are answered as the [`validation`](crate::validation)
//! standard says: one 422 `invalid_fields` problem naming every bad
//! parameter (`{"parameter": "limit", "detail": "…"}`), with the request's
//! correlation id.
//!
//! # How the chassis does it
//!
//! * [`PageRequest`] is an axum extractor that reads and checks `limit` and
//!   `cursor` (rejection: [`Invalid`], a 422 problem). It gives the handler
//!   the limit, the number of rows to [`fetch`](PageRequest::fetch) (one
//!   more, to know whether a next page exists) and the sort key to start
//!   [`after`](PageRequest::after).
//! * The handler writes its keyset query (SQL stays in the service: the
//!   same statement runs on SQLite and Postgres, which both compare row
//!   values) and hands the rows to [`PageRequest::page`], which keeps
//!   `limit` of them and makes the cursor of the last.
//! * [`Page`] is the answer: its [`IntoResponse`] writes the JSON body and
//!   the `Link` header. It is also what a driver client reads back (it
//!   implements `Deserialize`); the downstream client follows `next` for
//!   you (`Calls::pages` with the `client` feature).
//!
//! # Example
//!
//! A list of lessons, oldest first, by `(created_at, id)`:
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use chassis::page::{Page, PageRequest};
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use serde::Serialize;
//! use tower::ServiceExt;
//!
//! #[derive(Clone, Serialize)]
//! struct Lesson { id: String, created_at: String }
//!
//! // The database's part: rows after the cursor, in order, at most `fetch`.
//! fn query(after: Option<&(String, String)>, fetch: i64) -> Vec<Lesson> {
//!     let all = (0..5).map(|n| Lesson { id: format!("lsn_{n}"), created_at: format!("2026-12-0{}", n + 1) });
//!     all.filter(|l| after.is_none_or(|(t, id)| (&l.created_at, &l.id) > (t, id)))
//!         .take(usize::try_from(fetch).unwrap())
//!         .collect()
//! }
//!
//! async fn list(page: PageRequest) -> Page<Lesson> {
//!     let rows = query(page.after(), page.fetch());
//!     page.page(rows, |l| (l.created_at.clone(), l.id.clone()))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new().route("/lessons/v1/acme/lessons", get(list));
//! let call = |uri: String| {
//!     let app = app.clone();
//!     async move { app.oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap() }
//! };
//!
//! let res = call("/lessons/v1/acme/lessons?limit=3".into()).await;
//! let link = res.headers()["link"].to_str().unwrap().to_owned();
//! let body: serde_json::Value =
//!     serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
//! assert_eq!(body["items"].as_array().unwrap().len(), 3);
//! let next = body["next"].as_str().unwrap();
//! assert!(next.starts_with("/lessons/v1/acme/lessons?limit=3&cursor="));
//! assert_eq!(link, format!("<{next}>; rel=\"next\""));
//!
//! // The last page: two items, no next link, no Link header.
//! let res = call(next.to_owned()).await;
//! assert!(res.headers().get("link").is_none());
//! let body: serde_json::Value =
//!     serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
//! assert_eq!(body["items"][0]["id"], "lsn_3");
//! assert_eq!(body["next"], serde_json::Value::Null);
//!
//! // The cursor of acme's list is not one of globex's; a limit out of range.
//! let foreign = next.replace("/acme/", "/globex/");
//! let app2 = Router::new().route("/lessons/v1/globex/lessons", get(list));
//! let res = app2.oneshot(Request::get(foreign).body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! assert_eq!(call("/lessons/v1/acme/lessons?limit=0".into()).await.status(), 422);
//! # }
//! ```
//!
//! # The query
//!
//! Newest first, on SQLite and Postgres alike (`$3` is one more than the
//! limit; without a cursor the `WHERE` has no keyset part):
//!
//! ```sql
//! SELECT … FROM orders
//!  WHERE account = $1 AND (created_at, id) < ($2, $3)
//!  ORDER BY created_at DESC, id DESC
//!  LIMIT $4
//! ```
//!
//! Oldest first is `>` and `ASC`. An index on `(account, created_at, id)`
//! (or `(account, created_at)` with a unique `id`) serves it.
//!
//! # How clients iterate
//!
//! Ask for the list (with a `limit`, or the default), then follow `next`
//! (from the body or the `Link` header) as it is, until it is `null` or
//! absent. Never build or edit a cursor, and do not keep one for long: it
//! marks a position in one list, and a 422 naming `cursor` means start
//! again from the first page. Items inserted while a client pages may or
//! may not appear (depending on where they sort), but no item appears
//! twice and none that existed at the start is missed.

use axum::{
    Json,
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderValue, Uri, header, request::Parts};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::validation::{FieldError, Invalid};

/// The page size when a request gives no `limit`.
pub const DEFAULT_LIMIT: u32 = 50;

/// The largest `limit` a request may ask for.
pub const MAX_LIMIT: u32 = 100;

/// The query parameter of the page size.
pub const LIMIT: &str = "limit";

/// The query parameter of the position.
pub const CURSOR: &str = "cursor";

/// The longest cursor read (a key of a timestamp and an id is about 110
/// characters); longer ones are refused before any decoding.
const MAX_CURSOR_LEN: usize = 1024;

/// The version of the cursor format, inside every cursor.
const VERSION: u8 = 1;

/// The bytes of the check value at the end of a cursor.
const CHECK_LEN: usize = 8;

/// The detail of a refused cursor: the same for every reason, so nothing
/// is learnt by trying.
const BAD_CURSOR: &str = "must be the cursor of a `next` link of this list, unchanged";

/// One page of a list: its items, and the link to the next page (`None` on
/// the last). See the [module docs](self).
///
/// As a response, the JSON body `{"items": [...], "next": "…" | null}`
/// plus, when there is a next page, `Link: <next>; rel="next"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    /// The items, in the list's order.
    pub items: Vec<T>,
    /// The absolute path (with its query) of the next page; `None` on the
    /// last page.
    #[serde(default)]
    pub next: Option<String>,
}

/// A request for one page of a list: the checked `limit` and the sort key
/// to start after. An axum extractor; see the [module docs](self).
///
/// `K` is the list's sort key, `(created_at, id)` as text by default; any
/// type that serializes to JSON and back will do (`(i64, String)`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest<K = (String, String)> {
    limit: u32,
    after: Option<K>,
    /// The list: the request's path and its query parameters other than
    /// `limit` and `cursor`, as sent. A cursor is bound to it.
    list: String,
}

// === impl Page ===

impl<T> Page<T> {
    /// Whether this is the last page.
    pub fn is_last(&self) -> bool {
        self.next.is_none()
    }
}

impl<T: Serialize> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        // The link is the request's own path and query plus a base64url
        // cursor, so it is always a valid header value.
        let link = self
            .next
            .as_deref()
            .and_then(|next| HeaderValue::try_from(format!("<{next}>; rel=\"next\"")).ok());
        let mut res = Json(self).into_response();
        if let Some(link) = link {
            res.headers_mut().insert(header::LINK, link);
        }
        res
    }
}

// === impl PageRequest ===

impl<K: DeserializeOwned> PageRequest<K> {
    /// The page that `uri` asks for.
    ///
    /// # Errors
    ///
    /// [`Invalid`] naming `limit` when it is not a whole number from 1 to
    /// [`MAX_LIMIT`] or is given twice, and `cursor` when it is not one
    /// this list gave out.
    pub fn from_uri(uri: &Uri) -> Result<Self, Invalid> {
        let mut list = uri.path().to_owned();
        let mut limit = None;
        let mut cursor = None;
        let mut invalid = Invalid::new();
        for piece in uri.query().unwrap_or_default().split('&') {
            if piece.is_empty() {
                continue;
            }
            let (name, value) = form_urlencoded::parse(piece.as_bytes())
                .next()
                .unwrap_or_default();
            let slot = match &*name {
                LIMIT => &mut limit,
                CURSOR => &mut cursor,
                _ => {
                    list.push(if list.contains('?') { '&' } else { '?' });
                    list.push_str(piece);
                    continue;
                }
            };
            if slot.replace(value).is_some() {
                let name = if &*name == LIMIT { LIMIT } else { CURSOR };
                invalid.push(FieldError::parameter(name, "must be given once"));
            }
        }
        let limit = match limit.as_deref() {
            None => Some(DEFAULT_LIMIT),
            Some(text) => text.parse::<u32>().ok().filter(|n| {
                text.bytes().all(|b| b.is_ascii_digit()) && (1..=MAX_LIMIT).contains(n)
            }),
        };
        if limit.is_none() {
            invalid.push(FieldError::parameter(
                LIMIT,
                format!("must be a whole number from 1 to {MAX_LIMIT}"),
            ));
        }
        let after = match cursor.as_deref() {
            None => None,
            Some(token) => {
                let key = decode(&list, token);
                if key.is_none() {
                    invalid.push(FieldError::parameter(CURSOR, BAD_CURSOR));
                }
                key
            }
        };
        invalid.into_result()?;
        Ok(Self {
            limit: limit.unwrap_or(DEFAULT_LIMIT),
            after,
            list,
        })
    }
}

impl<K> PageRequest<K> {
    /// The most items the page holds.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// How many rows to ask the database for: one more than
    /// [`limit`](Self::limit), so that [`page`](Self::page) knows whether
    /// a next page exists without asking again.
    pub fn fetch(&self) -> i64 {
        i64::from(self.limit) + 1
    }

    /// The sort key of the previous page's last item, to start strictly
    /// after; `None` for the first page.
    pub fn after(&self) -> Option<&K> {
        self.after.as_ref()
    }

    /// The list's path, with its query parameters other than `limit` and
    /// `cursor`: what a cursor is bound to.
    pub fn list(&self) -> &str {
        &self.list
    }
}

impl<K: Serialize> PageRequest<K> {
    /// The page of `rows`, the rows the query found after
    /// [`after`](Self::after) in the list's order (at most
    /// [`fetch`](Self::fetch) of them): the first [`limit`](Self::limit)
    /// rows, and, when there were more, the link to the page that starts
    /// after the last one kept, whose sort key `key` gives.
    ///
    /// # Panics
    ///
    /// When `K`'s `Serialize` fails (a key of strings and numbers never
    /// does).
    pub fn page<T>(&self, mut rows: Vec<T>, key: impl FnOnce(&T) -> K) -> Page<T> {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = match rows.last() {
            Some(last) if more => Some(self.link(&key(last))),
            _ => None,
        };
        Page { items: rows, next }
    }

    /// The link to the page after the item whose sort key is `key`.
    fn link(&self, key: &K) -> String {
        let sep = if self.list.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}{LIMIT}={}&{CURSOR}={}",
            self.list,
            self.limit,
            encode(&self.list, key)
        )
    }
}

impl<S, K> FromRequestParts<S> for PageRequest<K>
where
    S: Send + Sync,
    K: DeserializeOwned + Send,
{
    type Rejection = Invalid;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Self::from_uri(&parts.uri)
    }
}

/// The cursor of `key` in `list`: base64url of the JSON `[VERSION, key]`
/// followed by the check value of both.
fn encode<K: Serialize>(list: &str, key: &K) -> String {
    let mut bytes = serde_json::to_vec(&(VERSION, key)).expect("a sort key serializes to JSON");
    let check = check(list, &bytes);
    bytes.extend_from_slice(&check.to_be_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The key in `token`, when it is a cursor of `list` in this format.
fn decode<K: DeserializeOwned>(list: &str, token: &str) -> Option<K> {
    if token.len() > MAX_CURSOR_LEN {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let (payload, given) = bytes.split_at_checked(bytes.len().checked_sub(CHECK_LEN)?)?;
    if given != check(list, payload).to_be_bytes() {
        return None;
    }
    let (version, key): (u8, K) = serde_json::from_slice(payload).ok()?;
    (version == VERSION).then_some(key)
}

/// The check value binding `payload` to `list`: FNV-1a (64 bits) of both.
/// Not a signature (the cursor protects nothing; see the [module
/// docs](self)): it catches a cursor that was damaged, edited or taken from
/// another list, so that it is refused instead of read as a position.
fn check(list: &str, payload: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let len = u64::try_from(list.len()).unwrap_or(u64::MAX).to_be_bytes();
    [b"chassis-page".as_slice(), &len, list.as_bytes(), payload]
        .iter()
        .flat_map(|part| part.iter())
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::Problem;

    type Key = (String, String);

    fn request(uri: &str) -> Result<PageRequest, Invalid> {
        PageRequest::from_uri(&uri.parse().unwrap())
    }

    fn key(t: &str, id: &str) -> Key {
        (t.to_owned(), id.to_owned())
    }

    /// The parameters an [`Invalid`] names, with their details.
    fn named(invalid: &Invalid) -> Vec<(&str, &str)> {
        invalid
            .errors()
            .iter()
            .map(|e| (e.parameter_name().unwrap(), e.detail()))
            .collect()
    }

    #[test]
    fn a_cursor_round_trips_and_keeps_the_other_parameters() {
        let first = request("/o/v1/acme/orders?status=placed&limit=2").unwrap();
        assert_eq!(first.limit(), 2);
        assert_eq!(first.fetch(), 3);
        assert_eq!(first.after(), None);
        assert_eq!(first.list(), "/o/v1/acme/orders?status=placed");

        let rows = vec!["a", "b", "c"];
        let page = first.page(rows, |r| key("2026-12-01T00:00:00.000Z", r));
        assert_eq!(page.items, ["a", "b"]);
        let next = page.next.unwrap();
        assert!(
            next.starts_with("/o/v1/acme/orders?status=placed&limit=2&cursor="),
            "{next}"
        );
        let second = request(&next).unwrap();
        assert_eq!(second.after(), Some(&key("2026-12-01T00:00:00.000Z", "b")));
        assert_eq!(second.list(), first.list());

        // Another key type.
        let typed: PageRequest<(i64, String)> =
            PageRequest::from_uri(&"/l".parse().unwrap()).unwrap();
        let link = typed.link(&(-7, "x".to_owned()));
        let back: PageRequest<(i64, String)> =
            PageRequest::from_uri(&link.parse().unwrap()).unwrap();
        assert_eq!(back.after(), Some(&(-7, "x".to_owned())));
        assert_eq!(back.limit(), DEFAULT_LIMIT);
    }

    #[test]
    fn the_last_page_has_no_next_link() {
        let req = request("/l?limit=3").unwrap();
        for n in 0..=3 {
            let page = req.page((0..n).collect::<Vec<_>>(), |i| key("t", &i.to_string()));
            assert_eq!(page.items.len(), n);
            assert!(page.is_last(), "{n} rows");
        }
        let page = req.page((0..4).collect::<Vec<_>>(), |i| key("t", &i.to_string()));
        assert_eq!(page.items, [0, 1, 2]);
        assert!(!page.is_last());
    }

    #[test]
    fn limits_outside_the_bounds_are_named() {
        assert_eq!(request("/l").unwrap().limit(), DEFAULT_LIMIT);
        assert_eq!(request("/l?limit=1").unwrap().limit(), 1);
        assert_eq!(request("/l?limit=100").unwrap().limit(), MAX_LIMIT);
        assert_eq!(request("/l?limit=007").unwrap().limit(), 7);
        for bad in [
            "0",
            "101",
            "-1",
            "+5",
            "",
            "1.5",
            "ten",
            "99999999999",
            "%30",
        ] {
            let invalid = request(&format!("/l?limit={bad}")).unwrap_err();
            assert_eq!(
                named(&invalid),
                [("limit", "must be a whole number from 1 to 100")],
                "{bad:?}"
            );
        }
        let twice = request("/l?limit=5&limit=5").unwrap_err();
        assert_eq!(named(&twice), [("limit", "must be given once")]);
    }

    #[test]
    fn a_tampered_or_foreign_cursor_is_refused_never_read() {
        let req = request("/o/v1/acme/orders?limit=2").unwrap();
        let token = encode(req.list(), &key("2026-12-01T00:00:00.000Z", "ord_1"));
        assert!(request(&format!("/o/v1/acme/orders?cursor={token}")).is_ok());

        let mut bad = vec![
            String::new(),
            "x".into(),
            "!!!!".into(),
            "a".repeat(MAX_CURSOR_LEN + 4),
            // Another account's list, another list, another filter.
            format!("{token}"),
        ];
        // Every byte of the cursor changed in turn.
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..raw.len() {
            let mut edited = raw.clone();
            edited[i] ^= 0x20;
            bad.push(URL_SAFE_NO_PAD.encode(edited));
        }
        // A well-formed payload with a wrong check value, or none.
        bad.push(URL_SAFE_NO_PAD.encode(&raw[..raw.len() - CHECK_LEN]));
        // A correct check value over a payload of another version or shape.
        for payload in [json!([2, ["t", "id"]]), json!([1, "t"]), json!({"a": 1})] {
            let mut bytes = serde_json::to_vec(&payload).unwrap();
            let c = check("/o/v1/acme/orders", &bytes);
            bytes.extend_from_slice(&c.to_be_bytes());
            bad.push(URL_SAFE_NO_PAD.encode(bytes));
        }
        for (n, cursor) in bad.iter().enumerate() {
            let path = if n == 4 {
                "/o/v1/globex/orders"
            } else {
                "/o/v1/acme/orders"
            };
            let invalid = request(&format!("{path}?cursor={cursor}")).unwrap_err();
            assert_eq!(named(&invalid), [("cursor", BAD_CURSOR)], "cursor {n}");
        }
        for other in ["/o/v1/acme/tickets", "/o/v1/acme/orders?status=placed"] {
            let sep = if other.contains('?') { '&' } else { '?' };
            assert!(
                request(&format!("{other}{sep}cursor={token}")).is_err(),
                "{other}"
            );
        }
    }

    #[test]
    fn every_bad_parameter_is_named_in_one_422() {
        let invalid = request("/l?limit=0&cursor=nope").unwrap_err();
        let problem = Problem::from(invalid);
        assert_eq!(problem.status(), 422);
        assert_eq!(
            problem.member("errors"),
            Some(&json!([
                {"parameter": "limit", "detail": "must be a whole number from 1 to 100"},
                {"parameter": "cursor", "detail": BAD_CURSOR},
            ]))
        );
    }

    #[test]
    fn the_response_carries_the_link_header_and_the_body() {
        let page = Page {
            items: vec![1, 2],
            next: Some("/l?limit=2&cursor=abc".to_owned()),
        };
        let res = page.clone().into_response();
        assert_eq!(
            res.headers()[header::LINK],
            "</l?limit=2&cursor=abc>; rel=\"next\""
        );
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
        let last = Page::<u8> {
            items: vec![],
            next: None,
        };
        assert!(last.into_response().headers().get(header::LINK).is_none());
        let json = serde_json::to_value(&page).unwrap();
        assert_eq!(
            json,
            json!({"items": [1, 2], "next": "/l?limit=2&cursor=abc"})
        );
        let back: Page<u8> = serde_json::from_value(json!({"items": [3]})).unwrap();
        assert_eq!(back.next, None);
    }
}
