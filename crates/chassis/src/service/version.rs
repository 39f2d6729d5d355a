//! [`ApiVersion`]: one version of a service's API, and what a deprecated
//! one adds to every answer (`Deprecation`, `Sunset`, `Link`), computed once
//! when the service is built.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::SystemTime,
};

use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue, header};

/// The `Deprecation` header (RFC 9745).
pub(super) static DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
/// The `Sunset` header (RFC 8594).
pub(super) static SUNSET: HeaderName = HeaderName::from_static("sunset");

/// One version of a service's API, as given to
/// [`ServiceBuilder::version`](super::ServiceBuilder::version): its number
/// and, for an old one, when it was (or will be) deprecated, when it goes
/// away, and where its deprecation is explained. A bare number converts
/// into a version that is not deprecated.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use chassis::service::ApiVersion;
///
/// let since = UNIX_EPOCH + Duration::from_secs(1_796_083_200); // 2026-12-01
/// let v1 = ApiVersion::new(1)
///     .deprecated(since)
///     .sunset(since + Duration::from_secs(180 * 86_400))
///     .deprecation_link("https://docs.example.com/orders/v1-to-v2");
/// assert_eq!(v1.number(), 1);
/// assert_eq!(v1.deprecated_at(), Some(since));
/// assert!(ApiVersion::from(2).deprecated_at().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct ApiVersion {
    number: u32,
    deprecated: Option<SystemTime>,
    sunset: Option<SystemTime>,
    link: Option<String>,
}

impl ApiVersion {
    /// Version `number` (at least 1), served under `/<name>/v<number>`.
    pub const fn new(number: u32) -> Self {
        Self {
            number,
            deprecated: None,
            sunset: None,
            link: None,
        }
    }

    /// Deprecated since `since` (a moment to come is allowed: RFC 9745 reads
    /// it as "will be deprecated then"). Its answers carry
    /// `Deprecation: @<seconds since the epoch>`.
    pub fn deprecated(mut self, since: SystemTime) -> Self {
        self.deprecated = Some(since);
        self
    }

    /// Expected to stop answering at `at` (no sooner than its deprecation).
    /// Its answers carry `Sunset: <HTTP-date>` (RFC 8594). The chassis keeps
    /// serving it past that moment: removing a version is a release of the
    /// service that drops it.
    pub fn sunset(mut self, at: SystemTime) -> Self {
        self.sunset = Some(at);
        self
    }

    /// Where people read about the deprecation and how to move (a URI, e.g.
    /// a migration guide): sent as `Link: <uri>; rel="deprecation"`
    /// (RFC 9745 §3).
    pub fn deprecation_link(mut self, uri: &str) -> Self {
        self.link = Some(uri.to_owned());
        self
    }

    /// The version's number.
    pub const fn number(&self) -> u32 {
        self.number
    }

    /// When it was (or will be) deprecated; `None` when it is not.
    pub const fn deprecated_at(&self) -> Option<SystemTime> {
        self.deprecated
    }

    /// When it is expected to stop answering, if said.
    pub const fn sunset_at(&self) -> Option<SystemTime> {
        self.sunset
    }

    /// What is wrong with this version, as build problems.
    fn problems(&self) -> Vec<String> {
        let n = self.number;
        let mut problems = Vec::new();
        if n == 0 {
            problems.push("API version must be at least 1 (got 0)".to_owned());
        }
        match (self.deprecated, self.sunset) {
            (None, Some(_)) => problems.push(format!(
                "API version {n} has a sunset but no deprecation: add `.deprecated(since)`"
            )),
            (Some(since), Some(sunset)) if sunset < since => problems.push(format!(
                "API version {n}: its sunset ({}) is before its deprecation ({})",
                crate::time::rfc3339_millis(crate::time::unix_millis(sunset)),
                crate::time::rfc3339_millis(crate::time::unix_millis(since)),
            )),
            _ => {}
        }
        if let Some(link) = &self.link {
            if self.deprecated.is_none() {
                problems.push(format!(
                    "API version {n} has a deprecation link but no deprecation: add `.deprecated(since)`"
                ));
            }
            if !valid_link(link) {
                problems.push(format!(
                    "API version {n}: deprecation link `{}` is not a URI",
                    link.escape_default()
                ));
            }
        }
        problems
    }
}

impl From<u32> for ApiVersion {
    fn from(number: u32) -> Self {
        Self::new(number)
    }
}

/// A URI reference that can sit between `<` and `>` in a `Link` header.
fn valid_link(uri: &str) -> bool {
    !uri.is_empty()
        && uri
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"'))
        && uri.parse::<http::Uri>().is_ok()
}

/// One version as the built service serves it.
#[derive(Debug, Clone)]
pub(super) struct Served {
    pub(super) version: ApiVersion,
    /// `/<name>/v<N>`.
    pub(super) prefix: String,
    /// The newest version above this one that is not deprecated, for a
    /// deprecated one.
    pub(super) successor: Option<u32>,
    /// What its answers carry, for a deprecated one.
    pub(super) notice: Option<Arc<Notice>>,
}

impl Served {
    /// The layer that marks the answers of `route` (a template, the
    /// `http_route` of the count) of a deprecated version; `None` for one
    /// that is not, whose routes get nothing.
    pub(super) fn layer(&self, service: &str, route: &str) -> Option<DeprecatedLayer> {
        let notice = self.notice.clone()?;
        Some(DeprecatedLayer {
            notice,
            calls: Some(metrics::counter!(
                crate::metrics::HTTP_SERVER_DEPRECATED_REQUESTS,
                "service" => service.to_owned(),
                "api_version" => self.version.number.to_string(),
                "http_route" => route.to_owned(),
            )),
        })
    }

    /// The layer that marks the answers of a deprecated version's standard
    /// routes (its OpenAPI document), without counting them.
    pub(super) fn notice_layer(&self) -> Option<DeprecatedLayer> {
        Some(DeprecatedLayer {
            notice: self.notice.clone()?,
            calls: None,
        })
    }

    /// What `/info` says of it.
    pub(super) fn info(&self) -> serde_json::Value {
        let at = |t: SystemTime| crate::time::rfc3339_millis(crate::time::unix_millis(t));
        let mut v = serde_json::json!({
            "version": self.version.number,
            "prefix": self.prefix,
            "openapi": format!("{}{}", self.prefix, crate::api::OPENAPI_PATH),
            "deprecated": self.version.deprecated.is_some(),
        });
        if let Some(since) = self.version.deprecated {
            v["deprecated_at"] = at(since).into();
        }
        if let Some(sunset) = self.version.sunset {
            v["sunset_at"] = at(sunset).into();
        }
        if let Some(link) = &self.version.link {
            v["deprecation_link"] = link.clone().into();
        }
        if let Some(successor) = self.successor {
            v["successor"] = successor.into();
        }
        v
    }
}

/// Checks the versions of a service called `name` and resolves each one's
/// prefix, successor and headers, oldest first; with every problem found
/// (the versions are resolved anyway, so that their routes are checked
/// too and every problem is listed at once).
pub(super) fn resolve<A>(
    name: &str,
    versions: Vec<(ApiVersion, A)>,
) -> (Vec<(Served, A)>, Vec<String>) {
    let mut problems: Vec<String> = Vec::new();
    for (v, _) in &versions {
        problems.extend(v.problems());
    }
    let mut numbers: Vec<u32> = versions.iter().map(|(v, _)| v.number).collect();
    numbers.sort_unstable();
    let mut reported = None;
    for pair in numbers.windows(2) {
        if pair[0] == pair[1] && reported != Some(pair[0]) {
            reported = Some(pair[0]);
            problems.push(format!(
                "API version {} is declared twice (`ServiceBuilder::new` names the current version, whose routes `.api(..)` adds; `.version(..)` adds each other one once)",
                pair[0]
            ));
        }
    }
    let current: Vec<u32> = versions
        .iter()
        .filter(|(v, _)| v.deprecated.is_none())
        .map(|(v, _)| v.number)
        .collect();
    let mut served: Vec<(Served, A)> = versions
        .into_iter()
        .map(|(version, api)| {
            let successor = version.deprecated.and_then(|_| {
                current
                    .iter()
                    .copied()
                    .filter(|n| *n > version.number)
                    .max()
            });
            let prefix = format!("/{name}/v{}", version.number);
            let notice = version
                .deprecated
                .map(|since| Arc::new(Notice::new(name, &version, since, successor)));
            (
                Served {
                    version,
                    prefix,
                    successor,
                    notice,
                },
                api,
            )
        })
        .collect();
    served.sort_by_key(|(s, _)| s.version.number);
    (served, problems)
}

/// The headers of a deprecated version's answers, made once.
#[derive(Debug)]
pub(super) struct Notice {
    deprecation: HeaderValue,
    sunset: Option<HeaderValue>,
    link: Option<HeaderValue>,
}

impl Notice {
    fn new(name: &str, version: &ApiVersion, since: SystemTime, successor: Option<u32>) -> Self {
        // RFC 9745: a structured-field Date, `@` and seconds since the epoch.
        let secs = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut links = Vec::new();
        if let Some(uri) = &version.link {
            links.push(format!("<{uri}>; rel=\"deprecation\""));
        }
        if let Some(n) = successor {
            links.push(format!(
                "</{name}/v{n}{}>; rel=\"successor-version\"; type=\"application/json\"",
                crate::api::OPENAPI_PATH
            ));
        }
        // Made of digits, a checked service name and a checked URI: valid
        // header values.
        let value = |s: String| HeaderValue::try_from(s).ok();
        Self {
            deprecation: value(format!("@{secs}")).expect("digits are a header value"),
            sunset: version
                .sunset
                .and_then(|t| value(crate::time::http_date(t))),
            link: (!links.is_empty())
                .then(|| links.join(", "))
                .and_then(value),
        }
    }

    /// Puts the headers on an answer; a `Link` of the answer's own (a
    /// page's `next`) is kept.
    pub(super) fn stamp(&self, headers: &mut HeaderMap) {
        headers.insert(DEPRECATION.clone(), self.deprecation.clone());
        if let Some(sunset) = &self.sunset {
            headers.insert(SUNSET.clone(), sunset.clone());
        }
        if let Some(link) = &self.link {
            headers.append(header::LINK, link.clone());
        }
    }
}

/// Marks every answer of one route of a deprecated version and counts it
/// (`http_server_deprecated_requests_total`); the routes of other versions
/// do not have it.
#[derive(Debug, Clone)]
pub(super) struct DeprecatedLayer {
    notice: Arc<Notice>,
    calls: Option<metrics::Counter>,
}

impl DeprecatedLayer {
    /// Counts one call and marks `res`, for an answer made outside a route
    /// (the fallback's 404 under the version's prefix).
    pub(super) fn mark(&self, res: &mut Response) {
        if let Some(calls) = &self.calls {
            calls.increment(1);
        }
        self.notice.stamp(res.headers_mut());
    }
}

impl<S> tower::Layer<S> for DeprecatedLayer {
    type Service = Deprecated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deprecated {
            inner,
            layer: self.clone(),
        }
    }
}

/// Service built by [`DeprecatedLayer`].
#[derive(Debug, Clone)]
pub(super) struct Deprecated<S> {
    inner: S,
    layer: DeprecatedLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Deprecated<S>
where
    S: tower::Service<http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = DeprecatedFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(calls) = &self.layer.calls {
            calls.increment(1);
        }
        DeprecatedFuture {
            inner: self.inner.call(req),
            notice: self.layer.notice.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Deprecated`].
    pub(super) struct DeprecatedFuture<F> {
        #[pin]
        inner: F,
        notice: Arc<Notice>,
    }
}

impl<F, E> Future for DeprecatedFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        this.notice.stamp(res.headers_mut());
        Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn every_problem_of_the_versions_is_listed() {
        let (_, err) = resolve(
            "orders",
            vec![
                (ApiVersion::new(0), ()),
                (ApiVersion::new(2), ()),
                (ApiVersion::new(2).deprecated(at(10)), ()),
                (ApiVersion::new(3).deprecated(at(10)).sunset(at(5)), ()),
                (ApiVersion::new(4).sunset(at(5)), ()),
                (
                    ApiVersion::new(5)
                        .deprecated(at(1))
                        .deprecation_link("not a <uri>"),
                    (),
                ),
            ],
        );
        let text = err.join("\n");
        assert_eq!(err.len(), 5, "{text}");
        for expected in [
            "at least 1",
            "version 2 is declared twice",
            "version 3: its sunset (1970-01-01T00:00:05.000Z) is before its deprecation",
            "version 4 has a sunset but no deprecation",
            "version 5: deprecation link `not a <uri>` is not a URI",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
    }

    #[test]
    fn a_deprecated_version_names_its_newest_current_successor() {
        let (served, problems) = resolve(
            "orders",
            vec![
                (ApiVersion::new(3), ()),
                (
                    ApiVersion::new(1)
                        .deprecated(at(1_688_169_599))
                        .sunset(at(1_700_000_000))
                        .deprecation_link("https://docs.example.com/orders/v1"),
                    (),
                ),
                (ApiVersion::new(2).deprecated(at(1_700_000_000)), ()),
            ],
        );
        assert!(problems.is_empty(), "{problems:?}");
        let numbers: Vec<u32> = served.iter().map(|(s, _)| s.version.number).collect();
        assert_eq!(numbers, [1, 2, 3]);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::LINK,
            HeaderValue::from_static("</next>; rel=\"next\""),
        );
        served[0].0.notice.as_ref().unwrap().stamp(&mut headers);
        assert_eq!(headers[&DEPRECATION], "@1688169599");
        assert_eq!(headers[&SUNSET], "Tue, 14 Nov 2023 22:13:20 GMT");
        let links: Vec<&str> = headers
            .get_all(header::LINK)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            links,
            [
                "</next>; rel=\"next\"",
                "<https://docs.example.com/orders/v1>; rel=\"deprecation\", </orders/v3/openapi.json>; rel=\"successor-version\"; type=\"application/json\""
            ]
        );
        assert_eq!(served[1].0.successor, Some(3));
        assert!(served[2].0.notice.is_none() && served[2].0.successor.is_none());
        assert_eq!(served[0].0.info()["sunset_at"], "2023-11-14T22:13:20.000Z");
    }
}
