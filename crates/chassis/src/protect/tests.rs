use super::*;
use axum::response::Response;
use axum::{Router, body::Body, routing::get};
use http::{Request, StatusCode, header};
use std::sync::Arc;
use std::{
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
    time::Duration,
};
use tokio::sync::Notify;
use tower::{Layer as _, Service};
use tower::{ServiceBuilder, ServiceExt};

fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn sheds_above_the_limit_and_recovers() {
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let shed = LoadShedLayer::new(2);
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let r = r.clone();
                async move {
                    r.notified().await;
                    "ok"
                }
            }),
        )
        .layer(shed.clone());
    let a = tokio::spawn(app.clone().oneshot(get_req("/")));
    let b = tokio::spawn(app.clone().oneshot(get_req("/")));
    while shed.in_flight() < 2 {
        tokio::task::yield_now().await;
    }
    let res = app.clone().oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[header::RETRY_AFTER], "1");
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        crate::problem::CONTENT_TYPE
    );
    assert_eq!(shed.in_flight(), 2);
    release.notify_waiters();
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    assert_eq!(b.await.unwrap().unwrap().status(), 200);
    assert_eq!(shed.in_flight(), 0);
    let c = tokio::spawn(app.oneshot(get_req("/")));
    while shed.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    release.notify_waiters();
    assert_eq!(c.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn dropped_requests_free_their_place() {
    let shed = LoadShedLayer::new(1);
    let app = Router::new()
        .route("/", get(std::future::pending::<&'static str>))
        .layer(shed.clone());
    let fut = app.clone().oneshot(get_req("/"));
    let task = tokio::spawn(fut);
    while shed.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    task.abort();
    let _ = task.await;
    assert_eq!(shed.in_flight(), 0);
}

fn limited(max: usize) -> Router {
    Router::new()
        .route(
            "/",
            axum::routing::post(|body: bytes::Bytes| async move { body.len().to_string() }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(BodyLimitLayer::new(max))
                .layer(axum::extract::DefaultBodyLimit::max(max)),
        )
}

#[tokio::test]
async fn declared_length_over_limit_is_413_before_the_handler() {
    let req = Request::post("/")
        .header(header::CONTENT_LENGTH, "11")
        .body(Body::from("01234567890"))
        .unwrap();
    let res = limited(10).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        crate::problem::CONTENT_TYPE
    );
}

#[tokio::test]
async fn streamed_body_over_limit_is_413() {
    let body = chunked(&["0123456", "789012"]);
    let res = limited(10)
        .oneshot(Request::post("/").body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn bodies_within_limit_pass() {
    let res = limited(10)
        .oneshot(Request::post("/").body(Body::from("0123456789")).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = limited(10)
        .oneshot(Request::post("/").body(chunked(&["01234", "5"])).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(crate::problem::body_bytes(res.into_body()).await, "6");
}

/// A body of several chunks and no declared length.
fn chunked(chunks: &[&'static str]) -> Body {
    struct Chunks(std::collections::VecDeque<bytes::Bytes>);
    impl http_body::Body for Chunks {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }
    Body::new(Chunks(
        chunks
            .iter()
            .map(|c| bytes::Bytes::from_static(c.as_bytes()))
            .collect(),
    ))
}

#[tokio::test(start_paused = true)]
async fn slow_requests_get_504_and_are_cancelled() {
    struct Flag(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = dropped.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let flag = Flag(d.clone());
                async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    drop(flag);
                    "late"
                }
            }),
        )
        .route("/fast", get(|| async { "fast" }))
        .layer(RequestTimeoutLayer::new(Duration::from_secs(5)));
    let res = app.clone().oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        dropped.load(Ordering::SeqCst),
        "the handler's future was dropped"
    );
    let res = app.oneshot(get_req("/fast")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_shortens_the_timeout() {
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = started.clone();
    let app = Router::new()
        .route(
            "/",
            get(move |deadline: Option<axum::Extension<Deadline>>| {
                s.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    format!("{}", deadline.is_some())
                }
            }),
        )
        .layer(RequestTimeoutLayer::new(Duration::from_secs(30)));
    let with = |v: &str| {
        Request::get("/")
            .header(X_TIMEOUT_MS, v)
            .body(Body::empty())
            .unwrap()
    };

    let start = tokio::time::Instant::now();
    let res = app.clone().oneshot(with("100")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(100));

    let res = app.clone().oneshot(with("0")).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "work whose time is up is not started"
    );

    // A longer caller budget than ours changes nothing; a deadline is set.
    let res = app.clone().oneshot(with("999999")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(crate::problem::body_bytes(res.into_body()).await, "true");
    // Invalid values are ignored.
    for bad in ["-1", "1.5", "abc", ""] {
        let res = app.clone().oneshot(with(bad)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{bad:?}");
        assert_eq!(crate::problem::body_bytes(res.into_body()).await, "false");
    }
}

#[tokio::test]
async fn panics_become_500_without_the_message() {
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                if true {
                    panic!("secret database password is hunter2");
                }
                "unreachable"
            }),
        )
        .layer(CatchPanicLayer::new());
    let res = app.clone().oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = crate::problem::body_bytes(res.into_body()).await;
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("\"status\":500"));
    // The service keeps serving.
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn panics_in_call_are_caught() {
    #[derive(Clone)]
    struct Boom;
    impl Service<Request<Body>> for Boom {
        type Response = Response;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Response, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<Body>) -> Self::Future {
            panic!("in call")
        }
    }
    let res = CatchPanicLayer::new()
        .layer(Boom)
        .oneshot(get_req("/"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_noted_in_the_request_context() {
    use crate::context::RequestContext;
    let app = Router::new()
        .route(
            "/",
            get(|ctx: RequestContext| async move {
                let left = ctx.deadline().unwrap() - ctx.received();
                left.as_millis().to_string()
            }),
        )
        .layer(RequestTimeoutLayer::new(Duration::from_secs(1)));
    let res = app
        .clone()
        .oneshot(
            Request::get("/")
                .header("x-timeout-ms", "250")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(crate::problem::body_bytes(res.into_body()).await, "250");
    let res = app.oneshot(get_req("/")).await.unwrap();
    assert_eq!(crate::problem::body_bytes(res.into_body()).await, "1000");
}
