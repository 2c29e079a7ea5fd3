//! The one place where an error becomes a response. Every response tern makes itself
//! carries `tern-error: <code>`, the request id and `Via`, and its body is shaped by
//! `Accept`: JSON for `application/json`, a small HTML page for browsers, plain text
//! otherwise.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, Version};

use crate::error::ProxyError;

use super::body::ProxyBody;
use super::headers::{FLY_REQUEST_ID, TERN_ERROR, via_value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Json,
    Html,
    Text,
}

fn shape(accept: Option<&HeaderValue>) -> Shape {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else { return Shape::Text };
    let accept = accept.to_ascii_lowercase();
    if accept.contains("application/json") {
        Shape::Json
    } else if accept.contains("text/html") {
        Shape::Html
    } else {
        Shape::Text
    }
}

/// Seconds a client should wait before retrying, for errors a retry can fix.
fn retry_after(err: &ProxyError) -> Option<u32> {
    err.retry_safe().then_some(2)
}

pub fn error(
    err: &ProxyError,
    accept: Option<&HeaderValue>,
    request_id: &str,
    version: Version,
) -> Response<ProxyBody> {
    let code = err.code();
    let status = err.status();
    let message = err.public_message();
    let retry = retry_after(err);
    let (content_type, body) = match shape(accept) {
        Shape::Json => (
            "application/json",
            serde_json::json!({
                "error": code,
                "status": status.as_u16(),
                "message": message,
                "request_id": request_id,
                "retry_after": retry,
            })
            .to_string()
                + "\n",
        ),
        Shape::Html => {
            ("text/html; charset=utf-8", html_page(status.as_u16(), message, code, request_id, retry))
        }
        Shape::Text => {
            ("text/plain; charset=utf-8", format!("{} {message}\n{code} {request_id}\n", status.as_u16()))
        }
    };
    let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(TERN_ERROR, HeaderValue::from_static(code));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::VIA, HeaderValue::from_static(via_value(version)));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(FLY_REQUEST_ID, v);
    }
    if let Some(secs) = retry {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if status == http::StatusCode::METHOD_NOT_ALLOWED {
        // RFC 9110 §15.5.6: a 405 lists what is served; tern forwards every method but CONNECT.
        h.insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"),
        );
    }
    resp
}

/// A whole HTTP/1.1 response for `err`, as bytes, for a refusal made below the handler (a
/// head hyper could not parse), where no `Accept` was read: plain text, and the connection
/// closes after it. `date` is the `Date` value to send.
pub fn http1_bytes(err: &ProxyError, request_id: &str, date: &str) -> Vec<u8> {
    let status = err.status();
    let body = format!("{} {}\n{} {request_id}\n", status.as_u16(), err.public_message(), err.code());
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n{TERN_ERROR}: {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         cache-control: no-store\r\nvia: {}\r\n{FLY_REQUEST_ID}: {request_id}\r\nconnection: close\r\n\
         content-length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        err.code(),
        via_value(Version::HTTP_11),
        body.len(),
    );
    if !date.is_empty() {
        out += &format!("date: {date}\r\n");
    }
    out += "\r\n";
    out += &body;
    out.into_bytes()
}

fn html_page(status: u16, message: &str, code: &str, request_id: &str, retry: Option<u32>) -> String {
    // The message and code are static strings of ours; the id is ULID characters and a
    // region code: nothing here needs escaping.
    let refresh = retry.map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">")).unwrap_or_default();
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">{refresh}<title>{status}</title>\
         <style>body{{font:16px system-ui,sans-serif;margin:15vh auto;max-width:32em;color:#333}}\
         small{{color:#888}}</style></head>\n<body><h1>{status}</h1><p>{message}</p>\
         <p><small>{code} &middot; {request_id}</small></p></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(r: Response<ProxyBody>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn shaped_by_accept() {
        let err = ProxyError::NoMachine { app: "a".into() };
        let json = error(&err, Some(&HeaderValue::from_static("application/json")), "id-1", Version::HTTP_11);
        assert_eq!(json.status(), 503);
        assert_eq!(json.headers()["tern-error"], "no_machine");
        assert_eq!(json.headers()["retry-after"], "2");
        let v: serde_json::Value = serde_json::from_str(&body_of(json).await).unwrap();
        assert_eq!(v["error"], "no_machine");
        assert_eq!(v["request_id"], "id-1");

        let html = error(&err, Some(&HeaderValue::from_static("text/html,*/*")), "id-1", Version::HTTP_2);
        assert_eq!(html.headers()["via"], "2 tern");
        let page = body_of(html).await;
        assert!(page.contains("http-equiv=\"refresh\""), "{page}");

        let text = error(&ProxyError::NoApp { host: "x".into() }, None, "id-1", Version::HTTP_11);
        assert!(!text.headers().contains_key("retry-after"));
        assert!(body_of(text).await.starts_with("404 "));
    }
}
