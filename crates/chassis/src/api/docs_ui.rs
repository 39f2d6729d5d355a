//! The docs page: each service renders its own OpenAPI document in Swagger
//! UI, from its own assets.
//!
//! # The standard
//!
//! **A contract a person can read, where the service is.** Next to its
//! OpenAPI document (`GET /<name>/v<N>/openapi.json`, see [`api`](super)),
//! every service serves a page that renders it, at `GET /<name>/v<N>/docs`:
//! each operation with its permission, parameters, bodies and answers, and
//! their schemas. Like the document, the page is public (no token), not
//! audited and outside the route table; it carries nothing the document
//! does not.
//!
//! **Nothing from elsewhere.** The page loads every script, style sheet and
//! icon from the service itself, never from a CDN: it works on a machine
//! without internet, shows the version of the UI that was reviewed and
//! shipped with the service, and tells no third party who reads which API.
//! Its `Content-Security-Policy` allows the service's own origin only, and
//! no inline script (the initializer is a file of its own), so that even a
//! description with markup in the document cannot load or run anything
//! else. The UI is told not to send the document to a validator
//! (`validatorUrl: null`) and not to take a document URL from the query
//! string.
//!
//! # Paths
//!
//! Under the API prefix, as the document, so that a gateway that routes
//! `/<name>/…` to the service routes its docs too:
//!
//! | request | answer |
//! |---|---|
//! | `GET /<name>/v<N>/docs` | the page (`text/html`), `Cache-Control: no-cache`, the security headers below |
//! | `GET /<name>/v<N>/docs/` | `308` to `../docs` (a relative `Location`, so it survives a proxy that rewrites the prefix) |
//! | `GET /<name>/v<N>/docs/<tag>/<file>` | an asset, `Cache-Control: public, max-age=31536000, immutable` |
//! | any other path under `docs/`, or an asset under an old tag | `404`, problem+json |
//!
//! The page names its assets and the document with relative URLs
//! (`docs/<tag>/swagger-ui.css`, `openapi.json`), so it works wherever the
//! service is mounted. `<tag>` is a hash of every asset's bytes
//! ([`asset_tag`]): a release that changes an asset changes the tag, so
//! the assets can be cached for a year and never revalidated, while the
//! page itself is revalidated on every visit. During a rolling update a
//! page from a new replica may ask an old replica for an asset under the
//! new tag; that answers `404` rather than old bytes under a new name
//! (which a cache would keep for a year), and a reload fixes it.
//!
//! | asset | type | bytes sent |
//! |---|---|---|
//! | `swagger-ui-bundle.js` | `text/javascript` | 458 KB gzip (1.73 MB plain) |
//! | `swagger-ui.css` | `text/css` | 27 KB gzip (188 KB plain) |
//! | `docs-ui.js` (the initializer) | `text/javascript` | < 1 KB |
//! | `favicon-32x32.png` | `image/png` | < 1 KB |
//!
//! **Compression.** The two large assets are kept gzip-compressed in the
//! crate (`gzip -9`), and sent as they are, with `Content-Encoding: gzip`
//! and `Vary: Accept-Encoding`, to a client whose `Accept-Encoding` allows
//! gzip (every browser): a quarter of the bytes on the wire and in the
//! binary, at no CPU cost per request. A client that does not accept gzip
//! (`curl` without `--compressed`) gets the plain bytes, inflated once
//! (with flate2) on its first request and kept. Brotli would save another
//! fifth of the bundle; it was left out so that the compressed form needs
//! no second codec and the fallback stays one decoder.
//!
//! **Security headers of the page.**
//! `Content-Security-Policy: default-src 'none'; script-src 'self';
//! style-src 'self'; img-src 'self' data:; font-src 'self'; connect-src
//! 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'`
//! ([`CONTENT_SECURITY_POLICY`]; `data:` images are the icons inside
//! Swagger UI's style sheet; `connect-src 'self'` lets the page fetch the
//! document and "Try it out" call the service), `X-Content-Type-Options:
//! nosniff`, `Referrer-Policy: no-referrer`, `X-Frame-Options: DENY`. The
//! assets carry `nosniff` too.
//!
//! # The assets
//!
//! Swagger UI ([`SWAGGER_UI_VERSION`], npm package `swagger-ui-dist`,
//! Apache-2.0) is vendored in the crate, in `assets/swagger-ui/`, with its
//! `LICENSE`, `NOTICE` and the licences of what its bundle contains, and
//! embedded in the binary: a crate from the registry has them too. Only
//! what the page loads is kept (no source maps, no ES-module builds, no
//! standalone preset: the page uses the base layout without the top bar).
//! `.ci/vendor-swagger-ui` writes the folder again from the npm registry,
//! checking the tarball against the sha512 it pins (npm's
//! `dist.integrity`); to update, change the version and the checksum
//! there, run it, run this module's browser test
//! (`crates/chassis/tests/docs_ui.rs`) and look at the screenshot it saves.
//! The initializer is the chassis' own, in `assets/docs-ui/docs-ui.js`.
//!
//! # Reserved paths, and the feature
//!
//! The page needs the `docs-ui` feature (on by default): about 490 KB of
//! assets in the binary. Without it, `/<name>/v<N>/docs` is not served
//! (`404`) and nothing of Swagger UI is built in. Either way an API route
//! at `/docs`, or under `/docs/`, is refused when the service is built,
//! as a route at `/openapi.json` is: turning the feature on never changes
//! which routes a service may declare. (A path such as `/{account}/…`
//! still matches other accounts; only `docs` itself is shadowed.)
//!
//! [`ServiceBuilder`](crate::ServiceBuilder) mounts [`router`] for the
//! service's API version; a plain axum application can merge it too.
//!
//! # Example
//!
//! ```
//! use axum::body::Body;
//! use chassis::api::docs_ui;
//! use http::{Request, header};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = docs_ui::router("/shop/v1", "openapi.json");
//!
//! let res = app.clone().oneshot(Request::get("/shop/v1/docs").body(Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.headers()[header::CONTENT_SECURITY_POLICY], docs_ui::CONTENT_SECURITY_POLICY);
//! let page = chassis::problem::body_bytes(res.into_body()).await;
//! let page = String::from_utf8(page.to_vec()).unwrap();
//! let bundle = format!("docs/{}/swagger-ui-bundle.js", docs_ui::asset_tag());
//! assert!(page.contains(&format!(r#"<script src="{bundle}">"#)));
//! assert!(page.contains(r#"data-openapi-url="openapi.json""#));
//!
//! // The bundle, gzip-compressed for a client that accepts it.
//! let req = Request::get(format!("/shop/v1/{bundle}"))
//!     .header(header::ACCEPT_ENCODING, "gzip, br")
//!     .body(Body::empty())
//!     .unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip");
//! assert_eq!(res.headers()[header::CACHE_CONTROL], "public, max-age=31536000, immutable");
//! # }
//! ```

use std::{
    io::Read as _,
    sync::{LazyLock, OnceLock},
};

use axum::{
    Router,
    extract::{Path, State},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::problem::Problem;

/// The release of Swagger UI (`swagger-ui-dist`) the page is built with.
pub const SWAGGER_UI_VERSION: &str = include_str!("../../assets/swagger-ui/VERSION").trim_ascii();

/// The page's `Content-Security-Policy`: the service's own origin only,
/// no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// One file the page loads.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    /// As embedded: gzip-compressed when `gzip` is set.
    bytes: &'static [u8],
    gzip: bool,
    /// The plain bytes of a compressed asset, inflated on first demand.
    plain: OnceLock<Bytes>,
}

static ASSETS: [Asset; 4] = [
    Asset {
        name: "swagger-ui-bundle.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js.gz"),
        gzip: true,
        plain: OnceLock::new(),
    },
    Asset {
        name: "swagger-ui.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../assets/swagger-ui/swagger-ui.css.gz"),
        gzip: true,
        plain: OnceLock::new(),
    },
    Asset {
        name: "docs-ui.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../assets/docs-ui/docs-ui.js"),
        gzip: false,
        plain: OnceLock::new(),
    },
    Asset {
        name: "favicon-32x32.png",
        content_type: "image/png",
        bytes: include_bytes!("../../assets/swagger-ui/favicon-32x32.png"),
        gzip: false,
        plain: OnceLock::new(),
    },
];

/// The path segment that names this build's assets: 16 hex digits of a
/// 64-bit FNV-1a hash of every asset's name and bytes, the same on every
/// machine for the same assets (replicas behind one balancer agree).
pub fn asset_tag() -> &'static str {
    static TAG: LazyLock<String> = LazyLock::new(|| {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for asset in &ASSETS {
            for &b in asset.name.as_bytes().iter().chain(&[0]).chain(asset.bytes) {
                hash ^= u64::from(b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        format!("{hash:016x}")
    });
    &TAG
}

/// The docs page and its assets for the API under `prefix` (e.g.
/// `/orders/v1`; empty for the root), showing the document at
/// `openapi_url` as the page sees it: relative to `<prefix>/docs`
/// (`openapi.json` for `<prefix>/openapi.json`), or an absolute path. The
/// routes are those of the [module docs](self); they carry no state and no
/// layers, and are merged into a service's standard routes.
///
/// # Panics
///
/// If `prefix` is not empty and does not start with `/`, or ends with `/`
/// (a programming error: the builder passes a valid prefix).
#[track_caller]
pub fn router(prefix: &str, openapi_url: &str) -> Router {
    assert!(
        prefix.is_empty() || (prefix.starts_with('/') && !prefix.ends_with('/')),
        "the docs prefix must be empty or start with `/` and not end with it: {prefix:?}"
    );
    let page = Bytes::from(page(prefix, openapi_url));
    let path = format!("{prefix}{}", super::DOCS_PATH);
    Router::new()
        .route(&path, get(page_endpoint).with_state(page))
        .route(&format!("{path}/"), get(to_page))
        .route(&format!("{path}/{{tag}}/{{file}}"), get(asset_endpoint))
}

/// The page: Swagger UI's style sheet and scripts from `docs/<tag>/`, the
/// document's URL in a data attribute for the initializer (no inline
/// script).
fn page(prefix: &str, openapi_url: &str) -> String {
    let tag = asset_tag();
    let title = escape(&format!("API docs: {}", prefix.trim_start_matches('/')));
    let openapi = escape(openapi_url);
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" type="image/png" href="docs/{tag}/favicon-32x32.png">
<link rel="stylesheet" href="docs/{tag}/swagger-ui.css">
</head>
<body>
<noscript>This page needs JavaScript. The API's OpenAPI document is at <a href="{openapi}">{openapi}</a>.</noscript>
<div id="swagger-ui" data-openapi-url="{openapi}"></div>
<script src="docs/{tag}/swagger-ui-bundle.js"></script>
<script src="docs/{tag}/docs-ui.js"></script>
</body>
</html>
"#
    )
}

/// `text` with the characters that mean something in HTML text and
/// attribute values replaced by references.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `GET <prefix>/docs`.
async fn page_endpoint(State(page): State<Bytes>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        page,
    )
        .into_response()
}

/// `GET <prefix>/docs/`: the page is `docs`, without the slash, so that
/// its relative URLs resolve under the prefix.
async fn to_page() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, HeaderValue::from_static("../docs"))],
    )
        .into_response()
}

/// `GET <prefix>/docs/<tag>/<file>`.
async fn asset_endpoint(Path((tag, file)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let asset = ASSETS.iter().find(|a| a.name == file);
    let Some(asset) = asset.filter(|_| tag == asset_tag()) else {
        return Problem::not_found().into_response();
    };
    let mut res = if !asset.gzip {
        Bytes::from_static(asset.bytes).into_response()
    } else if accepts_gzip(&headers) {
        let mut res = Bytes::from_static(asset.bytes).into_response();
        res.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        res
    } else {
        asset
            .plain
            .get_or_init(|| inflate(asset.bytes))
            .clone()
            .into_response()
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if asset.gzip {
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    res
}

fn inflate(gzip: &[u8]) -> Bytes {
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(gzip)
        .read_to_end(&mut plain)
        .expect("the vendored assets are valid gzip (checked by the module's tests)");
    Bytes::from(plain)
}

/// Whether `Accept-Encoding` allows gzip (RFC 9110 §12.5.3): an entry for
/// `gzip` (or `x-gzip`) decides, else one for `*`; `q=0`, or a weight that
/// does not parse, refuses. No header: no compression.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    let entries = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for entry in entries {
        let mut parts = entry.split(';').map(str::trim);
        let coding = parts.next().unwrap_or_default();
        let weight = parts
            .find_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
            .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok());
        let acceptable = weight.is_some_and(|q| q > 0.0);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(acceptable);
        } else if coding == "*" {
            any = Some(acceptable);
        }
    }
    gzip.or(any).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get(app: &Router, path: &str, accept_encoding: Option<&str>) -> Response {
        let mut req = Request::get(path);
        if let Some(ae) = accept_encoding {
            req = req.header(header::ACCEPT_ENCODING, ae);
        }
        app.clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    async fn body(res: Response) -> Bytes {
        crate::problem::body_bytes(res.into_body()).await
    }

    #[test]
    fn gzip_is_accepted_as_rfc_9110_says() {
        let accepts = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            accepts_gzip(&h)
        };
        for yes in [
            "gzip",
            "gzip, deflate, br, zstd",
            "br;q=1.0, GZIP;q=0.5",
            "*",
            "x-gzip",
            "identity, *;q=0.1",
        ] {
            assert!(accepts(yes), "{yes}");
        }
        for no in [
            "",
            "br",
            "identity",
            "gzip;q=0",
            "gzip;q=0.000",
            "*;q=0",
            "gzip;q=0, *",
            "gzip;q=x",
        ] {
            assert!(!accepts(no), "{no}");
        }
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn every_asset_is_served_compressed_or_plain_with_its_type() {
        let app = router("/shop/v1", "openapi.json");
        let tag = asset_tag();
        for asset in &ASSETS {
            let path = format!("/shop/v1/docs/{tag}/{}", asset.name);
            let plain = get(&app, &path, None).await;
            assert_eq!(plain.status(), 200, "{path}");
            assert_eq!(plain.headers()[header::CONTENT_TYPE], asset.content_type);
            assert_eq!(plain.headers()[header::CACHE_CONTROL], IMMUTABLE);
            assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
            let plain = body(plain).await;
            let zipped = get(&app, &path, Some("gzip")).await;
            if asset.gzip {
                assert_eq!(zipped.headers()[header::CONTENT_ENCODING], "gzip");
                assert_eq!(zipped.headers()[header::VARY], "accept-encoding");
                let zipped = body(zipped).await;
                assert!(
                    zipped.len() * 3 < plain.len(),
                    "{}: compressed well",
                    asset.name
                );
                assert_eq!(inflate(&zipped), plain);
            } else {
                assert!(zipped.headers().get(header::CONTENT_ENCODING).is_none());
                assert_eq!(body(zipped).await, plain);
            }
        }
        let bundle = get(
            &app,
            &format!("/shop/v1/docs/{tag}/swagger-ui-bundle.js"),
            None,
        )
        .await;
        let bundle = String::from_utf8(body(bundle).await.to_vec()).unwrap();
        assert!(
            bundle.contains("SwaggerUIBundle"),
            "the bundle defines SwaggerUIBundle"
        );
    }

    #[tokio::test]
    async fn unknown_files_and_old_tags_are_404_problems() {
        let app = router("/shop/v1", "openapi.json");
        let tag = asset_tag();
        for path in [
            format!("/shop/v1/docs/{tag}/index.html"),
            format!("/shop/v1/docs/{tag}/swagger-ui-bundle.js.map"),
            "/shop/v1/docs/0000000000000000/swagger-ui-bundle.js".to_owned(),
            format!("/shop/v1/docs/{tag}/..%2F..%2Fopenapi.json"),
        ] {
            let res = get(&app, &path, Some("gzip")).await;
            assert_eq!(res.status(), 404, "{path}");
            assert_eq!(
                res.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
        }
    }

    #[tokio::test]
    async fn the_page_names_its_assets_relatively_and_escapes_the_document_url() {
        let app = router("/shop/v2", "x\"><script>alert(1)</script>");
        let res = get(&app, "/shop/v2/docs", None).await;
        assert_eq!(res.status(), 200);
        for (name, value) in [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ] {
            assert_eq!(res.headers()[&name], value, "{name}");
        }
        let page = String::from_utf8(body(res).await.to_vec()).unwrap();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(
            page.contains("data-openapi-url=\"x&quot;&gt;&lt;script&gt;"),
            "{page}"
        );
        assert!(
            !page.contains("http:") && !page.contains("https:") && !page.contains("//"),
            "{page}"
        );
        assert_eq!(
            page.matches("<script").count(),
            2,
            "two scripts, both files: {page}"
        );
        for asset in &ASSETS {
            assert!(
                page.contains(&format!("\"docs/{}/{}\"", asset_tag(), asset.name)),
                "{page}"
            );
        }
    }

    #[tokio::test]
    async fn the_slash_form_redirects_to_the_page() {
        let app = router("/shop/v1", "openapi.json");
        let res = get(&app, "/shop/v1/docs/", None).await;
        assert_eq!(res.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(res.headers()[header::LOCATION], "../docs");
        let root = router("", "openapi.json");
        assert_eq!(get(&root, "/docs", None).await.status(), 200);
    }

    #[test]
    fn the_tag_is_stable_and_hex() {
        assert_eq!(asset_tag().len(), 16);
        assert!(asset_tag().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(asset_tag(), asset_tag());
        assert!(!SWAGGER_UI_VERSION.is_empty() && SWAGGER_UI_VERSION.split('.').count() == 3);
    }
}
