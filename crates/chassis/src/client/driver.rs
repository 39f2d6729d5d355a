//! What every service's driver client has in common: the identity chosen at
//! each call, JSON in and out, ids put into paths safely.

use std::{fmt, marker::PhantomData, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};

use super::{CallContext, Caller, ClientError, Downstream, Pages, RequestBuilder};

/// A service's API, as its driver client sees it: the type that holds its
/// calls. See [`DriverClient`]; [`driver_client!`](crate::driver_client)
/// implements it.
pub trait Api {
    /// The service's calls with one identity and context: a newtype over
    /// [`Calls`] with a method per operation.
    type Calls<'a>: From<Calls<'a>>;
}

/// A typed client of one service over a [`Downstream`]: the caller picks
/// the identity of each call ([`as_service`](Self::as_service),
/// [`on_behalf_of`](Self::on_behalf_of)), and gets the service's own
/// [`Api::Calls`]. Cheap to clone: it shares the downstream's pool,
/// breaker, bulkhead and retry budget.
///
/// A service's driver client is its request and response types, the
/// [`driver_client!`](crate::driver_client) declaration (the client type,
/// the marker type naming the API, and the calls' newtype), and a method
/// per operation:
///
/// ```
/// use chassis::client::ClientError;
/// use serde::{Deserialize, Serialize};
///
/// /// A lesson.
/// #[derive(Debug, Serialize, Deserialize)]
/// pub struct Lesson { pub id: String, pub seats: u32 }
///
/// chassis::driver_client! {
///     /// The driver client of `lessons`.
///     pub type LessonsClient = DriverClient<Lessons>;
///     /// The lessons API with one identity.
///     pub struct Calls;
/// }
///
/// impl Calls<'_> {
///     /// `GET /lessons/v1/{account}/lessons/{id}`.
///     pub async fn get(self, account: &str, id: &str) -> Result<Lesson, ClientError> {
///         let path = self.0.path("/lessons/v1/{}/lessons/{}", &[&account, &id])?;
///         self.0.get_json(&path).await
///     }
/// }
///
/// # async fn use_it(cx: chassis::client::CallContext) -> Result<(), ClientError> {
/// let lessons = LessonsClient::new(
///     chassis::client::Downstream::builder("lessons", "http://127.0.0.1:8085").build().unwrap(),
/// );
/// let lesson = lessons.on_behalf_of(&cx).get("acme", "lsn_1").await?;
/// # Ok(())
/// # }
/// ```
pub struct DriverClient<A> {
    downstream: Downstream,
    _api: PhantomData<fn() -> A>,
}

// === impl DriverClient ===

impl<A: Api> DriverClient<A> {
    /// A client calling through `downstream`, whose base URL is the
    /// service's root (e.g. `http://127.0.0.1:8082`).
    pub fn new(downstream: Downstream) -> Self {
        Self {
            downstream,
            _api: PhantomData,
        }
    }

    /// The downstream, e.g. to report its circuit breaker in readiness.
    pub fn downstream(&self) -> &Downstream {
        &self.downstream
    }

    /// Calls made with the calling service's own token (see
    /// [`Downstream::as_service`]).
    pub fn as_service<'a>(&'a self, cx: &'a CallContext) -> A::Calls<'a> {
        Calls::new(&self.downstream, self.downstream.as_service(cx)).into()
    }

    /// Calls made on behalf of the caller of `cx`, with its token (see
    /// [`Downstream::on_behalf_of`]).
    pub fn on_behalf_of<'a>(&'a self, cx: &'a CallContext) -> A::Calls<'a> {
        Calls::new(&self.downstream, self.downstream.on_behalf_of(cx)).into()
    }

    /// Calls made without a token, for public routes.
    pub fn anonymous<'a>(&'a self, cx: &'a CallContext) -> A::Calls<'a> {
        Calls::new(&self.downstream, self.downstream.anonymous(cx)).into()
    }
}

impl<A> Clone for DriverClient<A> {
    fn clone(&self) -> Self {
        Self {
            downstream: self.downstream.clone(),
            _api: PhantomData,
        }
    }
}

impl<A> fmt::Debug for DriverClient<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverClient")
            .field("downstream", &self.downstream.name())
            .finish()
    }
}

/// Calls to one downstream with one identity and context, the building
/// block of a service's [`Api::Calls`]: requests by method, JSON in and
/// out, and [`path`](Self::path) to put ids into a path.
#[derive(Debug, Clone, Copy)]
pub struct Calls<'a> {
    downstream: &'a Downstream,
    caller: Caller<'a>,
}

// === impl Calls ===

impl<'a> Calls<'a> {
    /// Calls through `caller`, which was made by `downstream`.
    pub fn new(downstream: &'a Downstream, caller: Caller<'a>) -> Self {
        Self { downstream, caller }
    }

    /// The downstream called.
    pub fn downstream(&self) -> &'a Downstream {
        self.downstream
    }

    /// The caller, for a request the helpers below do not cover.
    pub fn caller(&self) -> Caller<'a> {
        self.caller
    }

    /// `template` with each `{}` replaced by the next of `segments`.
    ///
    /// A segment is an identifier: 1 to 128 characters of
    /// `[A-Za-z0-9._~:-]` (RFC 3986's unreserved characters and `:`), and
    /// neither `.` nor `..`. Anything else (a `/`, a space, `?`, an empty
    /// string) is refused before a byte is sent, so no value a caller
    /// passes can change which resource the path names.
    ///
    /// ```
    /// # use chassis::client::{CallContext, Calls, Downstream};
    /// let downstream = Downstream::builder("ticketing", "http://127.0.0.1:8082").build().unwrap();
    /// let cx = CallContext::background();
    /// let calls = Calls::new(&downstream, downstream.anonymous(&cx));
    /// assert_eq!(
    ///     calls.path("/ticketing/v1/{}/tickets/{}", &[&"acme", &"tkt_1"]).unwrap(),
    ///     "/ticketing/v1/acme/tickets/tkt_1"
    /// );
    /// assert!(calls.path("/ticketing/v1/acme/tickets/{}", &[&"../reservations"]).is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidRequest`] for a segment that is not an
    /// identifier, or when the number of `{}` and of segments differ.
    pub fn path(
        &self,
        template: &str,
        segments: &[&dyn fmt::Display],
    ) -> Result<String, ClientError> {
        let invalid = |message: String| ClientError::InvalidRequest {
            downstream: Arc::from(self.downstream.name()),
            message,
        };
        let mut parts = template.split("{}");
        let mut path = String::with_capacity(template.len() + 16 * segments.len());
        path.push_str(parts.next().unwrap_or_default());
        for (n, segment) in segments.iter().enumerate() {
            let Some(next) = parts.next() else {
                return Err(invalid(format!(
                    "{} segments for a path with {n} placeholders",
                    segments.len()
                )));
            };
            let start = path.len();
            fmt::Write::write_fmt(&mut path, format_args!("{segment}"))
                .map_err(|_| invalid(format!("path segment {} cannot be written", n + 1)))?;
            if !is_identifier(&path[start..]) {
                return Err(invalid(format!(
                    "path segment {} must be 1-128 characters of [A-Za-z0-9._~:-], not . or ..",
                    n + 1
                )));
            }
            path.push_str(next);
        }
        if parts.next().is_some() {
            return Err(invalid(format!(
                "{} segments for a path with more placeholders",
                segments.len()
            )));
        }
        #[cfg(feature = "contract")]
        if let Some(recorder) = self.downstream.recorder() {
            recorder.template(&path, template);
        }
        Ok(path)
    }

    /// A `GET` of `path`.
    pub fn get(&self, path: &str) -> RequestBuilder<'a> {
        self.caller.get(path)
    }

    /// A `POST` to `path`.
    pub fn post(&self, path: &str) -> RequestBuilder<'a> {
        self.caller.post(path)
    }

    /// A `PUT` to `path`.
    pub fn put(&self, path: &str) -> RequestBuilder<'a> {
        self.caller.put(path)
    }

    /// A `DELETE` of `path`.
    pub fn delete(&self, path: &str) -> RequestBuilder<'a> {
        self.caller.delete(path)
    }

    /// `GET path`, the answer read as JSON.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]: a refusal is [`ClientError::Status`].
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.get(path).send().await?.json()
    }

    /// The pages of the list at `path` (see [`page`](crate::page)), `limit`
    /// items each (the service's default when `None`): read them one at a
    /// time with [`Pages::next`], or all with [`Pages::all`].
    ///
    /// ```no_run
    /// # use chassis::client::{CallContext, Calls, ClientError, Downstream};
    /// # async fn f(calls: Calls<'_>) -> Result<(), ClientError> {
    /// let mut pages = calls.pages::<serde_json::Value>("/orders/v1/acme/orders", Some(40));
    /// while let Some(page) = pages.next().await? {
    ///     println!("{} orders", page.items.len());
    /// }
    /// let everything = calls.pages::<serde_json::Value>("/orders/v1/acme/orders", None).all().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn pages<T: DeserializeOwned>(&self, path: &str, limit: Option<u32>) -> Pages<'a, T> {
        Pages::new(*self, path, limit)
    }

    /// `POST path` with `body` as JSON, the answer read as JSON. Not
    /// retried unless the request is made safe to retry: for that, build
    /// it with [`post`](Self::post) and
    /// [`idempotency_key`](RequestBuilder::idempotency_key).
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn post_json<B, T>(&self, path: &str, body: &B) -> Result<T, ClientError>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        self.post(path).json(body).send().await?.json()
    }

    /// `PUT path` with `body` as JSON, the answer read as JSON.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn put_json<B, T>(&self, path: &str, body: &B) -> Result<T, ClientError>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        self.put(path).json(body).send().await?.json()
    }

    /// `DELETE path`; the answer's body is not read.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn delete_path(&self, path: &str) -> Result<(), ClientError> {
        self.delete(path).send().await.map(drop)
    }
}

/// Declares a service's driver client: the client type (a
/// [`DriverClient`]), the marker type naming its API, and the newtype of
/// its calls over [`Calls`], to which the service adds a method per
/// operation (`self.0` is the [`Calls`]). See [`DriverClient`] for a whole
/// client.
///
/// ```
/// chassis::driver_client! {
///     /// The driver client of `lessons`.
///     pub type LessonsClient = DriverClient<Lessons>;
///     /// The lessons API with one identity.
///     pub struct Calls;
/// }
/// # let _ = |c: LessonsClient, cx: chassis::client::CallContext| { let _: Calls<'_> = c.as_service(&cx); };
/// ```
#[macro_export]
macro_rules! driver_client {
    (
        $(#[$client_meta:meta])*
        $vis:vis type $client:ident = DriverClient<$api:ident>;
        $(#[$calls_meta:meta])*
        $calls_vis:vis struct $calls:ident;
    ) => {
        #[doc = concat!("The API that [`", stringify!($client), "`] calls.")]
        #[derive(Debug)]
        $vis enum $api {}

        impl $crate::client::Api for $api {
            type Calls<'a> = $calls<'a>;
        }

        $(#[$client_meta])*
        $vis type $client = $crate::client::DriverClient<$api>;

        $(#[$calls_meta])*
        #[derive(Debug, Clone, Copy)]
        $calls_vis struct $calls<'a>($crate::client::Calls<'a>);

        impl<'a> ::core::convert::From<$crate::client::Calls<'a>> for $calls<'a> {
            fn from(calls: $crate::client::Calls<'a>) -> Self {
                Self(calls)
            }
        }
    };
}

fn is_identifier(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_calls(check: impl FnOnce(Calls<'_>)) {
        let downstream = Downstream::builder("svc", "http://127.0.0.1:9")
            .build()
            .unwrap();
        let cx = CallContext::background();
        check(Calls::new(&downstream, downstream.anonymous(&cx)));
    }

    #[test]
    fn paths_take_identifiers_only() {
        with_calls(|calls| {
            assert_eq!(calls.path("/a/{}/b/{}", &[&"x", &7]).unwrap(), "/a/x/b/7");
            assert_eq!(
                calls.path("/a/{}", &[&"v1.2~x:y-z_"]).unwrap(),
                "/a/v1.2~x:y-z_"
            );
            assert_eq!(calls.path("/a", &[]).unwrap(), "/a");
            for bad in [
                "",
                ".",
                "..",
                "a/b",
                "a b",
                "a?b",
                "é",
                "%2F",
                &"k".repeat(129),
            ] {
                let e = calls.path("/a/{}/b", &[&bad]).unwrap_err();
                assert!(
                    matches!(e, ClientError::InvalidRequest { .. }),
                    "{bad:?}: {e}"
                );
                assert_eq!(e.downstream(), "svc");
            }
            assert!(calls.path("/a/{}/{}", &[&"x"]).is_err());
            assert!(calls.path("/a/{}", &[&"x", &"y"]).is_err());
        });
    }
}
