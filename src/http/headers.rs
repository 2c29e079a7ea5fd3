//! Header hygiene, both directions: hop-by-hop headers are removed (RFC 9110 §7.6.1), the
//! fly-proxy forwarding headers are set, and a client cannot spoof `Fly-Client-IP` or the
//! last hop of `X-Forwarded-For`, because tern overwrites or appends them itself.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

use super::replay::{FLY_REPLAY_FAILED, FLY_REPLAY_SRC};

pub const TERN_ERROR: HeaderName = HeaderName::from_static("tern-error");
/// Routing headers a client may send (fly-proxy's): they steer the machine choice within
/// the app, never across apps.
pub const FORCE_INSTANCE: &str = "fly-force-instance-id";
pub const PREFER_INSTANCE: &str = "fly-prefer-instance-id";
pub const FORCE_REGION: &str = "fly-force-region";
pub const PREFER_REGION: &str = "fly-prefer-region";
/// Tells the machine that the instance the client preferred could not take the request.
pub const PREFERRED_UNAVAILABLE: HeaderName = HeaderName::from_static("fly-preferred-instance-unavailable");
pub const FLY_REQUEST_ID: HeaderName = HeaderName::from_static("fly-request-id");
const FLY_CLIENT_IP: HeaderName = HeaderName::from_static("fly-client-ip");
const FLY_FORWARDED_PORT: HeaderName = HeaderName::from_static("fly-forwarded-port");
const FLY_REGION: HeaderName = HeaderName::from_static("fly-region");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_SSL: HeaderName = HeaderName::from_static("x-forwarded-ssl");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Headers that describe one connection, never forwarded. (`Trailer` is not one of them: it
/// names the trailer fields of the message, end to end.) In the order of their bits in
/// [`Present`].
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    // Only meaningful with `Upgrade: h2c`, which tern never forwards.
    HTTP2_SETTINGS,
];

/// Which of the fields tern acts on a header map holds, found in one pass over the names it
/// holds. Looking a name up hashes it and probes the map, and most heads hold few of the
/// dozen names tern would look up: one look at each name present is cheaper than one
/// lookup of each name that might be. A clear bit means the field was absent when the map
/// was scanned; a set bit only that it was there then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Present(u32);

impl Present {
    // Bits 0 to 6 are [`HOP_BY_HOP`]'s fields, in its order.
    const CONNECTION: u32 = 1;
    const TE: u32 = 1 << 3;
    const TRANSFER_ENCODING: u32 = 1 << 4;
    const EXPECT: u32 = 1 << 7;
    const HOST: u32 = 1 << 8;
    const VIA: u32 = 1 << 9;
    const X_FORWARDED_FOR: u32 = 1 << 10;
    const CONTENT_LENGTH: u32 = 1 << 11;
    /// Any field named `fly-…`.
    const FLY: u32 = 1 << 12;
    /// Any field named `x-forwarded-…` but `x-forwarded-for`.
    const X_FORWARDED: u32 = 1 << 13;
    /// Any of the forwarding fields tern sets.
    const FORWARDING: u32 = Present::VIA | Present::X_FORWARDED_FOR | Present::FLY | Present::X_FORWARDED;

    pub fn scan(headers: &HeaderMap) -> Present {
        Present(headers.keys().fold(0, |bits, name| bits | Present::bit_of(name)))
    }

    fn bit_of(name: &HeaderName) -> u32 {
        match name.as_str() {
            "connection" => Present::CONNECTION,
            "keep-alive" => 1 << 1,
            "proxy-connection" => 1 << 2,
            "te" => Present::TE,
            "transfer-encoding" => Present::TRANSFER_ENCODING,
            "upgrade" => 1 << 5,
            "http2-settings" => 1 << 6,
            "expect" => Present::EXPECT,
            "host" => Present::HOST,
            "via" => Present::VIA,
            "x-forwarded-for" => Present::X_FORWARDED_FOR,
            "content-length" => Present::CONTENT_LENGTH,
            n if n.starts_with("fly-") => Present::FLY,
            n if n.starts_with("x-forwarded-") => Present::X_FORWARDED,
            _ => 0,
        }
    }

    fn has(self, bits: u32) -> bool {
        self.0 & bits != 0
    }

    /// Whether any `fly-…` field may be present (the routing, replay and cache headers a
    /// client may send all are).
    pub fn fly(self) -> bool {
        self.has(Present::FLY)
    }
}

/// Whether `headers` holds a field named `name`, in any case: a pass over the names present,
/// for a name that is not a constant (a lookup by text lower-cases and hashes it first).
pub fn has_named(headers: &HeaderMap, name: &str) -> bool {
    headers.keys().any(|k| k.as_str().eq_ignore_ascii_case(name))
}

/// What tern knows about the client side of an exchange.
pub struct ClientSide<'a> {
    /// The client's address, as `Fly-Client-IP` sends it.
    pub client_ip: &'a HeaderValue,
    pub tls: bool,
    /// The port the client reached tern on, as `X-Forwarded-Port` sends it.
    pub local_port: &'a HeaderValue,
    pub region: &'a HeaderValue,
    pub request_id: &'a HeaderValue,
    pub version: Version,
    /// Handed over by another node (the backhaul), which already said who the client is:
    /// its forwarding headers are kept as they came, none are added.
    pub relayed: bool,
}

/// `Via` names the protocol the client spoke to tern ("1.1 tern", "2 tern").
pub fn via_value(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "2 tern",
        Version::HTTP_10 => "1.0 tern",
        _ => "1.1 tern",
    }
}

/// [`via_value`] as a header value, made once.
pub fn via_header(version: Version) -> &'static HeaderValue {
    static VIA: [HeaderValue; 3] = [
        HeaderValue::from_static("2 tern"),
        HeaderValue::from_static("1.0 tern"),
        HeaderValue::from_static("1.1 tern"),
    ];
    match version {
        Version::HTTP_2 => &VIA[0],
        Version::HTTP_10 => &VIA[1],
        _ => &VIA[2],
    }
}

/// Whether the client asks to switch protocols (WebSocket or any HTTP/1.1 Upgrade).
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

/// The protocols an `Upgrade` header lists, in order (RFC 9110 §7.8).
pub fn upgrade_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether a client asked `Expect: 100-continue`.
pub fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::EXPECT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.trim().eq_ignore_ascii_case("100-continue")))
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers and those the `Connection` header names; `present` is the
/// map's [`Present`].
fn strip_hop_by_hop(headers: &mut HeaderMap, present: Present) {
    // Mostly `keep-alive` or `close`: nothing beyond the fields always removed, and nothing
    // to collect (a name that is not a standard one costs an allocation).
    let others = present.has(Present::CONNECTION)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .any(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"close")
                    && !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h.as_str().as_bytes()))
            });
    if others {
        strip_named(headers);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present.has(1 << i) {
            headers.remove(n);
        }
    }
}

/// Removes the fields a `Connection` header names.
fn strip_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        // A client may not make tern drop what routes or frames the request.
        .filter(|n| *n != header::HOST && *n != header::CONTENT_LENGTH)
        .collect();
    for n in named {
        headers.remove(n);
    }
}

/// Prepares a client's request headers for a machine.
///
/// `host` is the client's Host or :authority, which is forwarded unchanged so the app
/// sees the name it was reached by; `upgrade` is the one protocol the client may switch to
/// (any other it asked for is dropped); `expect` keeps `Expect: 100-continue`, for a
/// machine whose 100 tern relays; `to_h2` means the machine speaks h2c.
///
/// Returns true when the forwarding fields are left to whoever sends the request, as
/// `side`'s [`Extra`]: the client sent none of them (nor any `fly-…` or `Via`), so they are
/// only added, with nothing to join or replace. Otherwise they are set here, and it returns
/// false (as it does for a relayed request, which gets none).
pub fn prepare_request(
    headers: &mut HeaderMap,
    side: &ClientSide<'_>,
    host: &str,
    upgrade: Option<&str>,
    expect: bool,
    to_h2: bool,
) -> bool {
    let upgrade_value = upgrade.and_then(|u| HeaderValue::from_str(u).ok());
    // Stripping removes only hop-by-hop fields and what `Connection` names (never `Host`):
    // a bit clear here still means absent below.
    let present = Present::scan(headers);
    let te_trailers = present.has(Present::TE)
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")))
        });
    strip_hop_by_hop(headers, present);
    // Only tern says where a replay came from, or that a preferred machine was missed (an
    // edge that handed the request over already did).
    if !side.relayed && present.fly() {
        for name in [FLY_REPLAY_SRC, FLY_REPLAY_FAILED, PREFERRED_UNAVAILABLE] {
            headers.remove(name);
        }
    }
    if !expect && present.has(Present::EXPECT) {
        headers.remove(header::EXPECT);
    }
    if let Some(u) = upgrade_value {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        // The machine sends trailers only to a client that says it takes them (gRPC servers
        // require it); it is also the one TE value HTTP/2 allows.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !present.has(Present::HOST) && !to_h2 {
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(header::HOST, v);
        }
    }
    if side.relayed {
        return false;
    }
    if !present.has(Present::FORWARDING) {
        return true;
    }

    // The values are made once (per connection, per node, per request) and shared here: a
    // clone is a reference count, not a copy.
    let ip = side.client_ip.to_str().unwrap_or_default();
    match present.has(Present::X_FORWARDED_FOR).then(|| joined(headers, &X_FORWARDED_FOR)).flatten() {
        Some(prior) => set(headers, X_FORWARDED_FOR, &format!("{prior}, {ip}")),
        None => {
            headers.insert(X_FORWARDED_FOR, side.client_ip.clone());
        }
    }
    headers.insert(FLY_CLIENT_IP, side.client_ip.clone());
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if side.tls { "https" } else { "http" }));
    headers.insert(X_FORWARDED_SSL, HeaderValue::from_static(if side.tls { "on" } else { "off" }));
    headers.insert(X_FORWARDED_PORT, side.local_port.clone());
    headers.insert(FLY_FORWARDED_PORT, side.local_port.clone());
    headers.insert(FLY_REGION, side.region.clone());
    headers.insert(FLY_REQUEST_ID, side.request_id.clone());
    append_via(headers, via_value(side.version), present);
    false
}

static HTTPS: HeaderValue = HeaderValue::from_static("https");
static HTTP: HeaderValue = HeaderValue::from_static("http");
static ON: HeaderValue = HeaderValue::from_static("on");
static OFF: HeaderValue = HeaderValue::from_static("off");
static VIA_2: HeaderValue = HeaderValue::from_static("2 tern");
static VIA_1_1: HeaderValue = HeaderValue::from_static("1.1 tern");
static VIA_1_0: HeaderValue = HeaderValue::from_static("1.0 tern");

impl ClientSide<'_> {
    /// The forwarding fields for a request that had none, in the order they are sent.
    fn each_field(&self, mut f: impl FnMut(&HeaderName, &HeaderValue)) {
        f(&X_FORWARDED_FOR, self.client_ip);
        f(&FLY_CLIENT_IP, self.client_ip);
        f(&X_FORWARDED_PROTO, if self.tls { &HTTPS } else { &HTTP });
        f(&X_FORWARDED_SSL, if self.tls { &ON } else { &OFF });
        f(&X_FORWARDED_PORT, self.local_port);
        f(&FLY_FORWARDED_PORT, self.local_port);
        f(&FLY_REGION, self.region);
        f(&FLY_REQUEST_ID, self.request_id);
        let via = match self.version {
            Version::HTTP_2 => &VIA_2,
            Version::HTTP_10 => &VIA_1_0,
            _ => &VIA_1_1,
        };
        debug_assert_eq!(via, via_value(self.version));
        f(&header::VIA, via);
    }
}

/// The forwarding fields of a request [`prepare_request`] left them to.
impl crate::upstream::Extra for ClientSide<'_> {
    /// The lines [`ClientSide::each_field`] gives, in its order, with the text between two
    /// values written as one piece: thirteen copies where a copy of each name, separator,
    /// value and line end would be thirty-six. (A test holds the two to the same bytes.)
    fn write(&self, buf: &mut bytes::BytesMut) {
        use bytes::BufMut;
        let proto_to_port: &[u8] = if self.tls {
            b"\r\nx-forwarded-proto: https\r\nx-forwarded-ssl: on\r\nx-forwarded-port: "
        } else {
            b"\r\nx-forwarded-proto: http\r\nx-forwarded-ssl: off\r\nx-forwarded-port: "
        };
        let via: &[u8] = match self.version {
            Version::HTTP_2 => b"\r\nvia: 2 tern\r\n",
            Version::HTTP_10 => b"\r\nvia: 1.0 tern\r\n",
            _ => b"\r\nvia: 1.1 tern\r\n",
        };
        buf.reserve(
            200 + 2 * self.client_ip.len()
                + 2 * self.local_port.len()
                + self.region.len()
                + self.request_id.len(),
        );
        buf.put_slice(b"x-forwarded-for: ");
        buf.put_slice(self.client_ip.as_bytes());
        buf.put_slice(b"\r\nfly-client-ip: ");
        buf.put_slice(self.client_ip.as_bytes());
        buf.put_slice(proto_to_port);
        buf.put_slice(self.local_port.as_bytes());
        buf.put_slice(b"\r\nfly-forwarded-port: ");
        buf.put_slice(self.local_port.as_bytes());
        buf.put_slice(b"\r\nfly-region: ");
        buf.put_slice(self.region.as_bytes());
        buf.put_slice(b"\r\nfly-request-id: ");
        buf.put_slice(self.request_id.as_bytes());
        buf.put_slice(via);
    }

    fn add_to(&self, headers: &mut HeaderMap) {
        self.each_field(|name, value| {
            headers.insert(name.clone(), value.clone());
        });
    }
}

/// Prepares a machine's response headers for the client. Returns true when the machine
/// framed the body two ways at once (`Content-Length` and `Transfer-Encoding`): the chunked
/// framing is what the body was read by, so the length is dropped (RFC 9112 §6.3), and the
/// caller should not reuse that machine connection.
pub fn prepare_response(
    headers: &mut HeaderMap,
    client_version: Version,
    request_id: &HeaderValue,
    upgraded: bool,
) -> bool {
    prepare_response_via(headers, Some(via_value(client_version)), request_id, upgraded)
}

/// [`prepare_response`], with `via` `None` for a response going back over the backhaul
/// (the edge adds its own `Via`, once).
pub fn prepare_response_via(
    headers: &mut HeaderMap,
    via: Option<&'static str>,
    request_id: &HeaderValue,
    upgraded: bool,
) -> bool {
    let upgrade_value = if upgraded { headers.get(header::UPGRADE).cloned() } else { None };
    let present = Present::scan(headers);
    let both_framings = strip_for_client(headers, present);
    if let Some(u) = upgrade_value {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    add_ours(headers, via, request_id, present);
    both_framings
}

/// Drops what is the machine's hop alone; true when it framed the body two ways (see
/// [`prepare_response`]), the length dropped.
fn strip_for_client(headers: &mut HeaderMap, present: Present) -> bool {
    let both_framings = present.has(Present::TRANSFER_ENCODING) && present.has(Present::CONTENT_LENGTH);
    if both_framings {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers, present);
    both_framings
}

fn add_ours(headers: &mut HeaderMap, via: Option<&'static str>, request_id: &HeaderValue, present: Present) {
    if let Some(via) = via {
        append_via(headers, via, present);
    }
    headers.insert(FLY_REQUEST_ID, request_id.clone());
}

/// The fields tern adds at the end of a response head (`Via`, `fly-request-id`), when the
/// machine sent neither: written by tern's own HTTP/1.1 server after the map's fields as it
/// writes the head, or put into the map ([`Late::settle`]) for a response hyper sends. A
/// request spares two map insertions (a hash and a probe each, and the map's growth).
#[derive(Debug)]
pub struct Late {
    via: Option<&'static HeaderValue>,
    id: HeaderValue,
}

impl Late {
    /// The fields in the order the map would have had them.
    pub fn fields(&self) -> impl Iterator<Item = (HeaderName, &HeaderValue)> {
        let via = self.via.map(|v| (header::VIA, v));
        via.into_iter().chain(std::iter::once((FLY_REQUEST_ID, &self.id)))
    }

    pub fn settle(self, headers: &mut HeaderMap) {
        if let Some(via) = self.via {
            headers.insert(header::VIA, via.clone());
        }
        headers.insert(FLY_REQUEST_ID, self.id);
    }
}

/// [`prepare_response_via`] for a response that is not a 101, with `Via` and
/// `fly-request-id` left out of the map as a [`Late`] when the machine sent neither (nor any
/// other `fly-…` field); else as [`prepare_response_via`] puts them.
pub fn prepare_response_late(
    headers: &mut HeaderMap,
    via: Option<&'static HeaderValue>,
    request_id: &HeaderValue,
) -> (bool, Option<Late>) {
    let present = Present::scan(headers);
    let both_framings = strip_for_client(headers, present);
    if present.has(Present::VIA | Present::FLY) {
        add_ours(headers, via.and_then(|v| v.to_str().ok()), request_id, present);
        return (both_framings, None);
    }
    let late = Late { via, id: request_id.clone() };
    (both_framings, Some(late))
}

/// Makes each value a copy of its own. A value parsed from a machine's response shares the
/// buffer its head was read into (8 KiB or more), and whatever keeps the value keeps that
/// buffer: an HTTP/2 client's HPACK table keeps the values it indexes for as long as the
/// connection lives, so each idle HTTP/2 connection held a machine connection's buffer.
pub fn own_values(headers: &mut HeaderMap) {
    for value in headers.values_mut() {
        if let Ok(mut owned) = HeaderValue::from_bytes(value.as_bytes()) {
            owned.set_sensitive(value.is_sensitive());
            *value = owned;
        }
    }
}

/// The `fly-request-id` a response carries to a client speaking `version`. Over HTTP/2 it is
/// marked never to be indexed by HPACK: each id is unique, so indexing it would only push
/// entries later responses could use out of the connection's table, and each response's
/// encoding would compare it with every earlier id still there (about 3% of tern's CPU under
/// h2load). It costs about 11 bytes a response on the wire.
pub fn response_request_id(id: &HeaderValue, version: Version) -> HeaderValue {
    let mut id = id.clone();
    if version == Version::HTTP_2 {
        id.set_sensitive(true);
    }
    id
}

fn append_via(headers: &mut HeaderMap, ours: &'static str, present: Present) {
    match present.has(Present::VIA).then(|| joined(headers, &header::VIA)).flatten() {
        Some(prior) => set(headers, header::VIA, &format!("{prior}, {ours}")),
        None => {
            headers.insert(header::VIA, HeaderValue::from_static(ours));
        }
    }
}

/// All values of a header joined by ", " (RFC 9110 list syntax), if any.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    Some(values.fold(first.to_string(), |acc, v| acc + ", " + v))
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// The size of a response head as a machine sent it: status line plus headers.
pub fn response_head_size<B>(resp: &http::Response<B>) -> usize {
    resp.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>() + 17
}

/// The size of a request head as a client sent it: request line plus headers.
pub fn head_size<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>() + line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak(v: &'static str) -> &'static HeaderValue {
        Box::leak(Box::new(HeaderValue::from_static(v)))
    }

    /// What the machine is sent: the map as prepared, with the fields left to the sender.
    fn prepare(h: &mut HeaderMap, side: &ClientSide<'_>, upgrade: Option<&str>, expect: bool, to_h2: bool) {
        if prepare_request(h, side, "a.test", upgrade, expect, to_h2) {
            crate::upstream::Extra::add_to(side, h);
        }
    }

    fn side(tls: bool) -> ClientSide<'static> {
        ClientSide {
            client_ip: leak("203.0.113.7"),
            tls,
            local_port: leak("443"),
            region: leak("ams"),
            request_id: leak("01ABC-ams"),
            version: Version::HTTP_11,
            relayed: false,
        }
    }

    #[test]
    fn forwarding_headers_cannot_be_spoofed() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.append("x-forwarded-for", "2.2.2.2".parse().unwrap());
        h.insert("fly-client-ip", "6.6.6.6".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("fly-region", "evil".parse().unwrap());
        prepare_request(&mut h, &side(false), "a.test", None, false, false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 203.0.113.7");
        assert_eq!(h["fly-client-ip"], "203.0.113.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-ssl"], "off");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(h["fly-forwarded-port"], "443");
        assert_eq!(h["fly-region"], "ams");
        assert_eq!(h["fly-request-id"], "01ABC-ams");
        assert_eq!(h["via"], "1.1 tern");
        assert_eq!(h["host"], "a.test");
    }

    #[test]
    fn hop_by_hop_headers_are_removed_including_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret, host".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("te", "gzip".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA".parse().unwrap());
        h.insert("expect", "100-continue".parse().unwrap());
        h.insert("host", "a.test".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        h.insert("trailer", "x-sum".parse().unwrap());
        prepare(&mut h, &side(true), None, false, false);
        for gone in
            ["connection", "keep-alive", "x-secret", "te", "transfer-encoding", "http2-settings", "expect"]
        {
            assert!(!h.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(h["host"], "a.test");
        assert_eq!(h["x-keep"], "1");
        assert_eq!(h["trailer"], "x-sum", "Trailer is end to end");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn upgrades_keep_their_upgrade_and_h2c_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "h2c, websocket".parse().unwrap());
        prepare_request(&mut h, &side(false), "a.test", Some("websocket"), false, false);
        assert_eq!(h["upgrade"], "websocket", "only the protocol tern allows");
        assert_eq!(h["connection"], "upgrade");

        let mut h = HeaderMap::new();
        h.insert("te", "trailers, deflate".parse().unwrap());
        h.insert("expect", "100-continue".parse().unwrap());
        prepare_request(&mut h, &side(false), "a.test", None, true, false);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["expect"], "100-continue");

        let mut h = HeaderMap::new();
        h.insert("te", "trailers".parse().unwrap());
        prepare_request(&mut h, &side(false), "a.test", None, false, true);
        assert_eq!(h["te"], "trailers");
        assert!(!h.contains_key("host"), "h2c carries :authority, not Host");
    }

    #[test]
    fn responses_get_via_and_request_id() {
        let mut h = HeaderMap::new();
        h.insert("via", "1.1 cdn".parse().unwrap());
        h.insert("connection", "close".parse().unwrap());
        assert!(!prepare_response(&mut h, Version::HTTP_2, leak("id-ams"), false));
        assert_eq!(h["via"], "1.1 cdn, 2 tern");
        assert_eq!(h["fly-request-id"], "id-ams");
        assert!(!h.contains_key("connection"));

        let mut h = HeaderMap::new();
        h.insert("content-length", "5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        assert!(prepare_response(&mut h, Version::HTTP_11, leak("id-ams"), false), "framed two ways");
        assert!(!h.contains_key("content-length") && !h.contains_key("transfer-encoding"));
    }

    #[test]
    fn late_fields_end_the_head_as_the_map_would_have_had_them() {
        // Neither field from the machine: both left out of the map, in the map's order.
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/plain".parse().unwrap());
        h.insert("connection", "keep-alive".parse().unwrap());
        let (two_ways, late) =
            prepare_response_late(&mut h, Some(via_header(Version::HTTP_11)), leak("id-ams"));
        assert!(!two_ways);
        let late = late.expect("nothing of tern's in the map");
        assert!(!h.contains_key("via") && !h.contains_key("fly-request-id") && !h.contains_key("connection"));
        let fields: Vec<_> = late.fields().map(|(n, v)| (n.to_string(), v.clone())).collect();
        assert_eq!(
            fields,
            [
                ("via".to_owned(), "1.1 tern".parse().unwrap()),
                ("fly-request-id".into(), "id-ams".parse().unwrap())
            ]
        );
        let mut settled = h.clone();
        late.settle(&mut settled);
        let mut mapped = h.clone();
        prepare_response_via(&mut mapped, Some("1.1 tern"), leak("id-ams"), false);
        assert_eq!(settled, mapped, "settled, the map is the one prepare_response_via makes");

        for v in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
            assert_eq!(via_header(v), via_value(v), "{v:?}");
        }
        // Over the backhaul: no Via of tern's.
        let (_, late) = prepare_response_late(&mut HeaderMap::new(), None, leak("id-ams"));
        assert_eq!(late.expect("late").fields().count(), 1);

        // A machine's Via is joined, its fly-request-id replaced, in the map as before.
        for (name, value) in [("via", "1.1 cdn"), ("fly-request-id", "the-machine's")] {
            let mut h = HeaderMap::new();
            h.insert(name, value.parse().unwrap());
            h.insert("content-length", "5".parse().unwrap());
            h.insert("transfer-encoding", "chunked".parse().unwrap());
            let mut mapped = h.clone();
            let (two_ways, late) =
                prepare_response_late(&mut h, Some(via_header(Version::HTTP_11)), leak("id-ams"));
            assert!(late.is_none(), "{name} from the machine");
            assert!(two_ways && prepare_response_via(&mut mapped, Some("1.1 tern"), leak("id-ams"), false));
            assert_eq!(h, mapped);
            assert_eq!(h["fly-request-id"], "id-ams");
        }
    }

    #[test]
    fn a_scan_finds_each_field_tern_acts_on_and_only_those() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(Present::bit_of(name), 1 << i, "{name} is bit {i}, in HOP_BY_HOP's order");
        }
        let mut h = HeaderMap::new();
        h.insert("accept", "*/*".parse().unwrap());
        h.insert("x-real-ip", "192.0.2.1".parse().unwrap());
        assert_eq!(Present::scan(&h), Present::default());
        assert!(!Present::scan(&h).fly());
        h.insert("x-forwarded-host", "a.test".parse().unwrap());
        assert!(Present::scan(&h).has(Present::FORWARDING));
        h.insert("Fly-Prefer-Region", "ams".parse().unwrap());
        assert!(Present::scan(&h).fly());
        assert!(has_named(&h, "FLY-prefer-region") && !has_named(&h, "fly-prefer"));
    }

    #[test]
    fn fields_a_client_may_not_send_go_only_when_present() {
        // Each removal is skipped when the scan saw no such field; with one, it still goes.
        let mut h = HeaderMap::new();
        h.insert("host", "a.test".parse().unwrap());
        h.insert("fly-replay-src", "instance=m1".parse().unwrap());
        h.insert("fly-preferred-instance-unavailable", "m2".parse().unwrap());
        h.insert("expect", "100-continue".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-forwarded-for", "198.51.100.1".parse().unwrap());
        prepare_request(&mut h, &side(false), "a.test", None, false, false);
        for gone in ["fly-replay-src", "fly-preferred-instance-unavailable", "expect", "keep-alive"] {
            assert!(!h.contains_key(gone), "{gone} is removed");
        }
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 203.0.113.7");
        assert_eq!(h.get_all("host").iter().count(), 1);
    }

    #[test]
    fn a_request_without_forwarding_fields_leaves_them_to_the_sender_who_writes_the_same() {
        use crate::upstream::Extra;
        let mut bare = HeaderMap::new();
        bare.insert("host", "a.test".parse().unwrap());
        bare.insert("accept", "*/*".parse().unwrap());
        let side = side(true);
        assert!(prepare_request(&mut bare, &side, "a.test", None, false, false), "left to the sender");
        assert_eq!(bare.len(), 2, "nothing added to the map: {bare:?}");

        let mut written = bytes::BytesMut::new();
        side.write(&mut written);
        assert_eq!(
            &written[..],
            b"x-forwarded-for: 203.0.113.7\r\nfly-client-ip: 203.0.113.7\r\nx-forwarded-proto: https\r\n\
              x-forwarded-ssl: on\r\nx-forwarded-port: 443\r\nfly-forwarded-port: 443\r\n\
              fly-region: ams\r\nfly-request-id: 01ABC-ams\r\nvia: 1.1 tern\r\n"
        );

        // The same fields, with the same values, as a request that had one of them gets
        // them set in its map.
        let mut added = bare.clone();
        side.add_to(&mut added);
        side.add_to(&mut added);
        let mut set = bare.clone();
        set.insert("x-forwarded-ssl", "maybe".parse().unwrap());
        assert!(!prepare_request(&mut set, &side, "a.test", None, false, false), "set here");
        assert_eq!(added, set);
        assert_eq!(added.len(), 2 + 9);
    }

    /// `write` spells out what `each_field` gives, pieces merged: the two agree byte for byte
    /// for either scheme and every version.
    #[test]
    fn the_written_fields_are_each_field_in_order() {
        use crate::upstream::Extra;
        for tls in [true, false] {
            for version in [Version::HTTP_10, Version::HTTP_11, Version::HTTP_2] {
                let side = ClientSide { version, ..side(tls) };
                let mut one_by_one = Vec::new();
                side.each_field(|n, v| {
                    one_by_one.extend_from_slice(format!("{}: {}\r\n", n, v.to_str().unwrap()).as_bytes());
                });
                let mut written = bytes::BytesMut::new();
                written.extend_from_slice(b"GET / HTTP/1.1\r\n");
                side.write(&mut written);
                let written = &written[b"GET / HTTP/1.1\r\n".len()..];
                assert_eq!(
                    String::from_utf8_lossy(written),
                    String::from_utf8_lossy(&one_by_one),
                    "tls {tls}, {version:?}"
                );
            }
        }
    }

    #[test]
    fn any_field_tern_would_set_or_join_makes_it_set_them_all_itself() {
        for (name, value) in [
            ("via", "1.1 cdn"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-port", "1"),
            ("fly-request-id", "forged"),
            ("fly-prefer-region", "ams"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, value.parse().unwrap());
            assert!(!prepare_request(&mut h, &side(false), "a.test", None, false, false), "{name}");
            assert_eq!(h["fly-client-ip"], "203.0.113.7", "{name}");
            assert_eq!(h.get_all(name).iter().count(), 1, "{name}");
        }
        let mut relayed = HeaderMap::new();
        let side = ClientSide { relayed: true, ..side(false) };
        assert!(!prepare_request(&mut relayed, &side, "a.test", None, false, false));
        assert!(!relayed.contains_key("fly-client-ip"), "a relayed request gets none");
    }

    #[test]
    fn only_an_http2_client_gets_its_request_id_unindexed() {
        let id = HeaderValue::from_static("01ABC-ams");
        let h2 = response_request_id(&id, Version::HTTP_2);
        assert!(h2.is_sensitive() && h2 == id);
        assert!(!response_request_id(&id, Version::HTTP_11).is_sensitive());
    }

    /// Values shared with a machine's read buffer become copies of their own (an HTTP/2
    /// client's HPACK table would otherwise keep the buffer): same bytes, same sensitivity,
    /// same order, no byte of the buffer referenced.
    #[test]
    fn owned_values_keep_nothing_of_the_buffer_they_were_read_from() {
        let buf = bytes::Bytes::from(b"server: m\r\ndate: today\r\nset-cookie: a=1".to_vec());
        let inside = |v: &HeaderValue| buf.as_ptr_range().contains(&v.as_bytes().as_ptr());
        let mut h = HeaderMap::new();
        h.append("server", HeaderValue::from_maybe_shared(buf.slice(8..9)).unwrap());
        h.append("date", HeaderValue::from_maybe_shared(buf.slice(17..22)).unwrap());
        let mut cookie = HeaderValue::from_maybe_shared(buf.slice(36..39)).unwrap();
        cookie.set_sensitive(true);
        h.append("set-cookie", cookie);
        assert!(h.values().all(inside), "the fixture shares the buffer");
        own_values(&mut h);
        assert!(!h.values().any(inside), "a value still points into the buffer: {h:?}");
        let seen: Vec<_> =
            h.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap(), v.is_sensitive())).collect();
        assert_eq!(seen, [("server", "m", false), ("date", "today", false), ("set-cookie", "a=1", true)]);
    }
}
