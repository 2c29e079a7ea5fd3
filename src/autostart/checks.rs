//! Health checks: one probe of a machine, HTTP or TCP, bounded by the check's timeout.
//!
//! An HTTP check passes on a 2xx answer to `GET path` (redirects are not followed, as on
//! Fly.io); a TCP check passes when the port accepts a connection. A failing machine takes
//! no new requests until it passes again; a check never stops or restarts a machine.

use std::net::SocketAddr;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::model::{Check, CheckType};

/// Runs one check against `addr`; `host` goes in the HTTP check's `Host` header.
pub async fn probe(check: &Check, addr: SocketAddr, host: &str) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, attempt(check, addr, host)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

async fn attempt(check: &Check, addr: SocketAddr, host: &str) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    if check.kind == CheckType::Tcp {
        return Ok(());
    }
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http: {e}"))?;
    // The connection closes after the answer (`Connection: close`), which ends the task;
    // a machine that never answers is cut off at the check's timeout.
    tokio::spawn(tokio::time::timeout(check.timeout, conn));
    let path = check.path.as_deref().unwrap_or("/");
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "tern-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("bad check request: {e}"))?;
    let status = send.send_request(req).await.map_err(|e| format!("http: {e}"))?.status();
    if status.is_success() { Ok(()) } else { Err(format!("answered {status}")) }
}

/// The `Host` a check sends: the app's first exact hostname, else the machine's address.
pub fn host_for(spec: &crate::model::AppSpec, addr: SocketAddr) -> String {
    spec.hostnames.iter().find(|h| !h.starts_with('*')).cloned().unwrap_or_else(|| addr.to_string())
}

/// Whether every check of the app passes now, and the first failure if not.
pub async fn all_pass(checks: &[Check], addr: SocketAddr, host: &str) -> Result<(), String> {
    for check in checks {
        probe(check, addr, host).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A one-shot HTTP/1.1 server that answers `status` to whatever it is asked.
    async fn server(status: u16) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let mut r =
                        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"x")));
                    *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
                    Ok::<_, std::convert::Infallible>(r)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        addr
    }

    fn check(kind: CheckType) -> Check {
        Check {
            kind,
            path: Some("/healthz".into()),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            grace_period: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn http_checks_need_a_2xx_and_tcp_checks_a_listener() {
        let ok = server(200).await;
        let bad = server(503).await;
        assert_eq!(probe(&check(CheckType::Http), ok, "a.test").await, Ok(()));
        let err = probe(&check(CheckType::Http), bad, "a.test").await.unwrap_err();
        assert!(err.contains("503"), "{err}");
        assert_eq!(probe(&check(CheckType::Tcp), bad, "a.test").await, Ok(()));
        // Bound but never listening, and kept for the test: connecting is refused, and no
        // other test can take the port meanwhile (as it could after a bind and release).
        let closed =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        closed.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
        let closed_addr = closed.local_addr().ok().and_then(|a| a.as_socket()).expect("addr");
        assert!(probe(&check(CheckType::Tcp), closed_addr, "a.test").await.is_err());
    }
}
