//! The benchmark upstream (`bench/run`): a small, fast hyper server. Not part of the product.
//!
//! - `GET` anything → a fixed 1 KiB JSON body (the request/s subjects).
//! - `GET …/__auth` → `{"bearer": true|false}`: whether an `Authorization: Bearer` header arrived
//!   (the suite checks that injection works before it measures).
//! - `GET …/stream?bytes=N` → N bytes streamed in 64 KiB chunks (the 1 GiB download check).
//! - `POST`/`PUT` anything → reads the whole body, answers `{"received": N}` (the 1 GiB upload check).
//!
//! ```text
//! bench_upstream --plain 127.0.0.1:9100 [--tls 127.0.0.1:9101 --cert C --key K] [--threads N]
//! ```
//! The TLS listener speaks HTTP/1.1 and HTTP/2 (ALPN); the plain one HTTP/1.1 (what the proxies use).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Size of every answer to a plain `GET`.
const BODY_BYTES: usize = 1024;
/// Chunk size of `/stream`.
const CHUNK: usize = 64 * 1024;

type BoxStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static>,
>;
type Body = Either<Full<Bytes>, StreamBody<BoxStream>>;

struct Args {
    plain: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        plain: None,
        tls: None,
        cert: None,
        key: None,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--plain" => a.plain = Some(value()?.parse().map_err(|e| format!("--plain: {e}"))?),
            "--tls" => a.tls = Some(value()?.parse().map_err(|e| format!("--tls: {e}"))?),
            "--cert" => a.cert = Some(value()?.into()),
            "--key" => a.key = Some(value()?.into()),
            "--threads" => a.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.plain.is_none() && a.tls.is_none() {
        return Err("give --plain and/or --tls".into());
    }
    Ok(a)
}

fn fixed_body() -> Bytes {
    let head = "{\"data\":\"";
    let tail = "\"}";
    let pad = BODY_BYTES - head.len() - tail.len();
    Bytes::from(format!("{head}{}{tail}", "x".repeat(pad)))
}

async fn handle(req: Request<Incoming>, body: Bytes) -> Response<Body> {
    let json = |b: Bytes| {
        let mut r = Response::new(Either::Left(Full::new(b)));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    if req.method() == Method::POST || req.method() == Method::PUT {
        let mut received: u64 = 0;
        let mut incoming = req.into_body();
        while let Some(frame) = incoming.frame().await {
            match frame {
                Ok(f) => received += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        return json(Bytes::from(format!("{{\"received\":{received}}}")));
    }
    match req.uri().path() {
        p if p.ends_with("/__auth") => {
            let bearer = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 20);
            json(Bytes::from(format!("{{\"bearer\":{bearer}}}")))
        }
        p if p.ends_with("/stream") => {
            let total: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let chunk = Bytes::from(vec![b'z'; CHUNK]);
            let stream = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let n = left.min(CHUNK as u64);
                    Some((Ok(Frame::data(chunk.slice(..n as usize))), left - n))
                }
            });
            let mut r = Response::new(Either::Right(
                StreamBody::new(Box::pin(stream) as BoxStream),
            ));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        _ => json(body),
    }
}

async fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    let body = fixed_body();
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let body = body.clone();
        let tls = tls.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(handle(req, body).await) }
            });
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_upstream: {e}");
            std::process::exit(64);
        }
    };
    coatcheck::tls::install_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        if let Some(addr) = args.plain {
            let l = TcpListener::bind(addr).await.expect("bind --plain");
            eprintln!("bench_upstream: http://{}", l.local_addr().expect("addr"));
            tasks.push(tokio::spawn(serve(l, None)));
        }
        if let Some(addr) = args.tls {
            let (Some(cert), Some(key)) = (&args.cert, &args.key) else {
                eprintln!("bench_upstream: --tls needs --cert and --key");
                std::process::exit(64);
            };
            let cert =
                coatcheck::tls::ServerCert::load(cert, key).expect("TLS certificate and key");
            let cfg = coatcheck::tls::server_config(Arc::new(cert)).expect("TLS configuration");
            let l = TcpListener::bind(addr).await.expect("bind --tls");
            eprintln!("bench_upstream: https://{}", l.local_addr().expect("addr"));
            tasks.push(tokio::spawn(serve(
                l,
                Some(tokio_rustls::TlsAcceptor::from(cfg)),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}
