//! Echo server tests over loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::*;

type ClientBody = BoxBody<Bytes, io::Error>;

async fn server() -> EchoServer {
    EchoServer::start("127.0.0.1:0".parse().unwrap()).await.unwrap()
}

fn h1() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> Client<HttpConnector, ClientBody> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

fn body(bytes: impl Into<Bytes>) -> ClientBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

async fn json(resp: Response<Incoming>) -> Value {
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test]
async fn default_echoes_the_request_as_json() {
    let echo = server().await;
    let req = Request::post(echo.url("/some/path?a=1&b=two"))
        .header("x-test", "one")
        .header("x-test", "two")
        .header("x-portcullis-user", "alice")
        .body(body(vec![7u8; 1000]))
        .unwrap();
    let resp = h1().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let v = json(resp).await;
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(v["query"], "a=1&b=two");
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["headers"]["x-test"], serde_json::json!(["one", "two"]));
    assert_eq!(v["headers"]["x-portcullis-user"], serde_json::json!(["alice"]));
    assert_eq!(v["headers"]["host"], serde_json::json!([echo.addr().to_string()]));
    assert_eq!(v["body_bytes"], 1000);

    let v = json(h1().request(Request::get(echo.url("/")).body(body("")).unwrap()).await.unwrap())
        .await;
    assert_eq!(v["query"], Value::Null);
    assert_eq!(v["body_bytes"], 0);
}

#[tokio::test]
async fn speaks_h2c() {
    let echo = server().await;
    let req = Request::get(echo.url("/h2?x")).body(body("")).unwrap();
    let resp = h2c().request(req).await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let v = json(resp).await;
    assert_eq!(v["version"], "HTTP/2.0");
    assert_eq!(v["authority"], echo.addr().to_string());
    assert_eq!(v["path"], "/h2");
}

#[tokio::test]
async fn stream_sends_n_patterned_bytes_in_chunks() {
    let echo = server().await;
    for client in [h1(), h2c()] {
        let n = 100_000u64;
        let req = Request::get(echo.url(&format!("/stream/{n}"))).body(body("")).unwrap();
        let mut resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let (mut got, mut frames) = (Vec::new(), 0);
        while let Some(frame) = resp.body_mut().frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                got.extend_from_slice(&data);
                frames += 1;
            }
        }
        assert_eq!(got.len() as u64, n);
        assert!(got.iter().enumerate().all(|(i, b)| *b == stream_byte(i as u64)));
        assert!(frames > 1, "streamed in chunks, got {frames} frame(s)");
    }
    let resp = h1().request(Request::get(echo.url("/stream/x")).body(body("")).unwrap()).await;
    assert_eq!(resp.unwrap().status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn echo_body_streams_the_request_body_back() {
    let echo = server().await;
    for client in [h1(), h2c()] {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, io::Error>>(4);
        let req_body = BodyExt::boxed(StreamBody::new(tokio_stream_from(rx)));
        let req = Request::post(echo.url("/echo-body"))
            .header(header::CONTENT_TYPE, "application/x-test")
            .body(req_body)
            .unwrap();
        let pending = tokio::spawn(client.request(req));

        // The first chunk comes back before the rest of the body has even been sent.
        tx.send(Ok(Frame::data(Bytes::from_static(b"first chunk")))).await.unwrap();
        let mut resp = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("response head before the body ends")
            .unwrap()
            .unwrap();
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-test");
        let first = resp.body_mut().frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"first chunk");

        // Then a large remainder, all of it echoed.
        let sender = tokio::spawn(async move {
            for i in 0..64u8 {
                tx.send(Ok(Frame::data(Bytes::from(vec![i; 64 * 1024])))).await.unwrap();
            }
        });
        let rest = resp.into_body().collect().await.unwrap().to_bytes();
        sender.await.unwrap();
        assert_eq!(rest.len(), 64 * 64 * 1024);
        assert!(rest.chunks(64 * 1024).enumerate().all(|(i, c)| c.iter().all(|b| *b == i as u8)));
    }
}

/// A `Stream` over an mpsc receiver (no tokio-stream dependency for one test).
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

#[tokio::test]
async fn status_answers_with_the_code() {
    let echo = server().await;
    let cases = [
        ("/status/418", StatusCode::IM_A_TEAPOT),
        ("/status/503", StatusCode::SERVICE_UNAVAILABLE),
        ("/status/204", StatusCode::NO_CONTENT),
        ("/status/101", StatusCode::BAD_REQUEST),
        ("/status/999", StatusCode::BAD_REQUEST),
        ("/status/teapot", StatusCode::BAD_REQUEST),
    ];
    for (path, want) in cases {
        let resp = h1().request(Request::get(echo.url(path)).body(body("")).unwrap()).await;
        assert_eq!(resp.unwrap().status(), want, "{path}");
    }
}

#[tokio::test]
async fn slow_sleeps_then_echoes() {
    let echo = server().await;
    let start = Instant::now();
    let resp = h1().request(Request::get(echo.url("/slow/300")).body(body("")).unwrap()).await;
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(json(resp.unwrap()).await["path"], "/slow/300");
}

#[tokio::test]
async fn websocket_echoes_messages() {
    let echo = server().await;
    let tcp = tokio::net::TcpStream::connect(echo.addr()).await.unwrap();
    let (mut ws, resp) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", echo.addr()), tcp).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![1u8, 2, 3]));
    ws.send(Message::Ping(Bytes::from_static(b"p"))).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Pong(Bytes::from_static(b"p")));
    ws.close(None).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(_))) | None));

    // A plain GET is told to upgrade.
    let resp = h1().request(Request::get(echo.url("/ws")).body(body("")).unwrap()).await;
    assert_eq!(resp.unwrap().status(), StatusCode::UPGRADE_REQUIRED);
}

#[tokio::test]
async fn close_drops_the_connection_without_a_response() {
    let echo = server().await;
    for client in [h1(), h2c()] {
        let resp = client.request(Request::get(echo.url("/close")).body(body("")).unwrap()).await;
        assert!(resp.is_err(), "got a response: {resp:?}");
    }
}

#[tokio::test]
async fn drop_stops_the_server() {
    let echo = server().await;
    let addr = echo.addr();
    // An open WebSocket session ends too.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp).await.unwrap();
    drop(echo);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => break,
            Ok(_) if Instant::now() > deadline => panic!("still accepting after drop"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let next = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap();
    assert!(!matches!(next, Some(Ok(Message::Text(_) | Message::Binary(_)))), "{next:?}");
}
