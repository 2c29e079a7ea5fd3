//! A STAND-IN for a Corrosion agent's HTTP API, for tests. It is not Corrosion: no CRDTs, no
//! gossip, one node. Corrosion has no package in any registry this project can install
//! from, so tests cannot run a real agent; this serves the same endpoints with the same wire
//! format over one SQLite database, so that tern's Corrosion RIB is tested against real HTTP
//! and real SQL, with faults a real agent shows only after minutes or under partitions:
//!
//! - `POST /v1/transactions`: a JSON array of statements, one SQLite transaction;
//!   `{"results":[{"rows_affected":…,"time":…}],"time":…,"version":…,"actor_id":"…"}`, or
//!   HTTP 500 with the batch rolled back.
//! - `POST /v1/queries`: NDJSON `{"columns":[…]}`, `{"row":[rowid,[cells]]}`, `{"eoq":{"time":…}}`;
//!   bad SQL is HTTP 400 `{"error":"…"}`.
//! - `POST /v1/subscriptions[?from=N&skip_rows=true]` and `GET /v1/subscriptions/{id}[?from=N]`:
//!   headers `corro-query-id`, `corro-query-hash`; rows, `{"eoq":{"time":…,"change_id":N}}`,
//!   then `{"change":[kind,rowid,[cells],change_id]}` lines. Subscriptions are deduplicated by
//!   their SQL with parameters inlined; change ids are contiguous per subscription; the newest
//!   `retention` changes are kept, and a `from` older than that gets
//!   `{"error":"subscription already deleted older changes, min change id: N"}` with HTTP 200;
//!   an unknown id is HTTP 404 `{"error":"could not find subscription with id …"}`. The
//!   changes one transaction makes come out in a shuffled order, as Corrosion's do.
//! - `GET /v1/health`: `{"response":{"gaps":0,"members":1,"p99_lag":0.0,"queue_size":0}}`.
//!
//! How it finds changes (where it differs from Corrosion): after each transaction it runs
//! every subscription's query again and compares the rows by the result columns named like a
//! primary-key column of the schema (`tbl`, `key` for tern's query).
//!
//! Faults, from tests (methods) or over HTTP (`POST /standin/faults/{name}`): `drop`
//! (every stream breaks), `drop-after?k=K` (the next transaction's changes: K lines, then every
//! stream breaks), `gap` (the next change id is skipped), `trim?keep=N` (only the newest N
//! changes stay), `forget` (every subscription is forgotten), `silent?health=hang|fail`
//! (streams say nothing and subscription requests hang; health hangs or fails) and `speak`.

#![allow(dead_code)] // the example binary uses a part of it, the tests another

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rusqlite::types::{Value as Sql, ValueRef};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What `/v1/health` does while the stand-in is silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Never answers (until the stand-in speaks again).
    Hang,
    /// Answers 503.
    Fail,
}

/// A running stand-in. Dropping it stops it (its runtime is its own, so a test may block
/// on a `tern apply` process while the stand-in answers it).
pub struct Standin {
    pub addr: SocketAddr,
    state: Arc<State>,
    rt: Option<tokio::runtime::Runtime>,
}

struct State {
    inner: parking_lot::Mutex<Inner>,
    /// `Some` while silent; request handlers wait on it.
    silent: watch::Sender<Option<Health>>,
    actor_id: String,
}

type Line = Result<Bytes, std::io::Error>;

struct Inner {
    db: rusqlite::Connection,
    subs: HashMap<String, Sub>,
    by_sql: HashMap<String, String>,
    /// Column names that are part of some table's primary key.
    pk_columns: HashSet<String>,
    retention: usize,
    version: u64,
    drop_after: Option<usize>,
    skip_next: bool,
    silent: bool,
    /// ("METHOD /path?query", body) of every API request, for tests that count reads.
    requests: Vec<(String, String)>,
    rng: fastrand::Rng,
}

struct Sub {
    id: String,
    hash: String,
    sql: String,
    columns: Vec<String>,
    identity: Vec<usize>,
    /// The current result: identity → (rowid, cells).
    rows: BTreeMap<String, (i64, Vec<Value>)>,
    next_rowid: i64,
    last_change_id: i64,
    log: VecDeque<(i64, Bytes)>,
    listeners: Vec<Listener>,
}

struct Listener {
    tx: mpsc::UnboundedSender<Line>,
    /// Lines held back while the stand-in is silent.
    held: Vec<Bytes>,
}

fn ndjson(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn broken() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "stand-in fault: stream dropped")
}

impl Listener {
    fn send(&mut self, lines: Bytes, silent: bool) -> bool {
        if silent {
            self.held.push(lines);
            return !self.tx.is_closed();
        }
        self.tx.send(Ok(lines)).is_ok()
    }
}

/// A JSON value as an SQLite value (a blob is an array of bytes).
fn to_sql(v: &Value) -> Sql {
    match v {
        Value::Null => Sql::Null,
        Value::Bool(b) => Sql::Integer(i64::from(*b)),
        Value::Number(n) => n.as_i64().map_or_else(|| Sql::Real(n.as_f64().unwrap_or(0.0)), Sql::Integer),
        Value::String(s) => Sql::Text(s.clone()),
        Value::Array(a) => Sql::Blob(a.iter().map(|b| b.as_u64().unwrap_or(0) as u8).collect()),
        Value::Object(_) => Sql::Text(v.to_string()),
    }
}

fn to_json(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(f) => json!(f),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => json!(b),
    }
}

/// Prepares a statement in any of Corrosion's forms, with its parameters bound.
fn prepare<'c>(conn: &'c rusqlite::Connection, stmt: &Value) -> Result<rusqlite::Statement<'c>, String> {
    let (sql, params, named) = match stmt {
        Value::String(s) => (s.as_str(), None, None),
        Value::Array(a) => match (a.first(), a.get(1)) {
            (Some(Value::String(s)), Some(Value::Array(p))) => (s.as_str(), Some(p), None),
            (Some(Value::String(s)), Some(Value::Object(n))) => (s.as_str(), None, Some(n)),
            (Some(Value::String(s)), None) => (s.as_str(), None, None),
            _ => return Err(format!("not a statement: {stmt}")),
        },
        Value::Object(o) => match o.get("query") {
            Some(Value::String(s)) => (
                s.as_str(),
                o.get("params").and_then(Value::as_array),
                o.get("named_params").and_then(Value::as_object),
            ),
            _ => return Err(format!("not a statement: {stmt}")),
        },
        _ => return Err(format!("not a statement: {stmt}")),
    };
    let mut st = conn.prepare(sql).map_err(|e| e.to_string())?;
    for (i, p) in params.into_iter().flatten().enumerate() {
        st.raw_bind_parameter(i + 1, to_sql(p)).map_err(|e| e.to_string())?;
    }
    for (k, v) in named.into_iter().flatten() {
        let Some(i) = st.parameter_index(k).map_err(|e| e.to_string())? else {
            return Err(format!("Invalid parameter name: {k}"));
        };
        st.raw_bind_parameter(i, to_sql(v)).map_err(|e| e.to_string())?;
    }
    Ok(st)
}

/// The columns and rows a query gives.
fn run_query(conn: &rusqlite::Connection, stmt: &Value) -> Result<(Vec<String>, Vec<Vec<Value>>), String> {
    let mut st = prepare(conn, stmt)?;
    let columns: Vec<String> = st.column_names().map(str::to_string).collect();
    let n = columns.len();
    let mut rows = st.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        out.push((0..n).map(|i| row.get_ref(i).map(to_json).unwrap_or(Value::Null)).collect());
    }
    Ok((columns, out))
}

fn fnv(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Loads `schema` and refuses what Corrosion refuses: anything but tables and indexes, a
/// unique index, a nullable primary-key column, a NOT NULL column without a default.
fn load_schema(conn: &rusqlite::Connection, schema: &str) -> Result<HashSet<String>, String> {
    conn.execute_batch(schema).map_err(|e| format!("schema: {e}"))?;
    let (_, objects) =
        run_query(conn, &json!("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))?;
    let mut pk_columns = HashSet::new();
    for o in objects {
        let (kind, name) = (o[0].as_str().unwrap_or(""), o[1].as_str().unwrap_or(""));
        match kind {
            "table" => {}
            "index" => continue,
            other => {
                return Err(format!("schema: Corrosion takes only tables and indexes, not {other} {name}"));
            }
        }
        let (_, idx) = run_query(conn, &json!(format!("PRAGMA index_list({name})")))?;
        if idx.iter().any(|i| i[2] == json!(1) && i[3] == json!("c")) {
            return Err(format!("schema: table {name} has a unique index, which Corrosion refuses"));
        }
        // cid, name, type, notnull, dflt_value, pk
        let (_, cols) = run_query(conn, &json!(format!("PRAGMA table_info({name})")))?;
        for c in cols {
            let col = c[1].as_str().unwrap_or("").to_string();
            let (notnull, default, pk) = (c[3] == json!(1), !c[4].is_null(), c[5] != json!(0));
            if pk && !notnull {
                return Err(format!("schema: primary-key column {name}.{col} must be NOT NULL"));
            }
            if !pk && notnull && !default {
                return Err(format!("schema: NOT NULL column {name}.{col} needs a DEFAULT"));
            }
            if pk {
                pk_columns.insert(col);
            }
        }
    }
    Ok(pk_columns)
}

impl Inner {
    fn uuid(&mut self) -> String {
        let (a, b) = (self.rng.u64(..), self.rng.u64(..));
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    /// The current rows of a subscription's query, by identity.
    fn current(&self, sql: &str, identity: &[usize]) -> Result<BTreeMap<String, Vec<Value>>, String> {
        let (_, rows) = run_query(&self.db, &json!(sql))?;
        Ok(rows
            .into_iter()
            .map(|r| (Value::from(identity.iter().map(|i| r[*i].clone()).collect::<Vec<_>>()).to_string(), r))
            .collect())
    }

    /// A subscription for `stmt`: the one with the same expanded SQL, or a new one.
    fn subscription(&mut self, stmt: &Value, from: Option<i64>) -> Result<String, (StatusCode, String)> {
        let bad = |e: String| (StatusCode::BAD_REQUEST, e);
        let sql = prepare(&self.db, stmt)
            .map_err(bad)?
            .expanded_sql()
            .ok_or_else(|| bad("could not expand sql statement".into()))?;
        if let Some(id) = self.by_sql.get(&sql) {
            return Ok(id.clone());
        }
        if from.is_some() {
            return Err(bad("a `from` query param was supplied, but no existing subscription found".into()));
        }
        let (columns, _) = run_query(&self.db, &json!(sql)).map_err(bad)?;
        let identity: Vec<usize> =
            (0..columns.len()).filter(|i| self.pk_columns.contains(&columns[*i])).collect();
        if identity.is_empty() {
            return Err(bad("the stand-in needs a subscription to select a primary-key column".into()));
        }
        let mut sub = Sub {
            id: self.uuid(),
            hash: fnv(&sql),
            sql: sql.clone(),
            columns,
            identity,
            rows: BTreeMap::new(),
            next_rowid: 1,
            last_change_id: 0,
            log: VecDeque::new(),
            listeners: Vec::new(),
        };
        for (ident, cells) in self.current(&sql, &sub.identity).map_err(bad)? {
            sub.rows.insert(ident, (sub.next_rowid, cells));
            sub.next_rowid += 1 + self.rng.i64(0..3);
        }
        let id = sub.id.clone();
        self.by_sql.insert(sql, id.clone());
        self.subs.insert(id.clone(), sub);
        Ok(id)
    }

    /// Opens a stream on subscription `id`: a snapshot, or the changes after `from`.
    fn open(
        &mut self,
        id: &str,
        from: Option<i64>,
        skip_rows: bool,
    ) -> Option<mpsc::UnboundedReceiver<Line>> {
        let silent = self.silent;
        let sub = self.subs.get_mut(id)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut out = Vec::new();
        match from {
            Some(from) => {
                let min = sub.log.front().map_or(sub.last_change_id + 1, |(id, _)| *id);
                if from < sub.last_change_id && from + 1 < min {
                    let e = json!({"error": format!("subscription already deleted older changes, min change id: {min}")});
                    let _ = tx.send(Ok(ndjson(&e)));
                    return Some(rx); // and the stream ends there
                }
                out.extend(sub.log.iter().filter(|(id, _)| *id > from).map(|(_, l)| l.clone()));
            }
            None if skip_rows => {}
            None => {
                let started = Instant::now();
                out.push(ndjson(&json!({"columns": sub.columns})));
                let mut rows: Vec<_> = sub.rows.values().collect();
                rows.sort_by_key(|(rowid, _)| *rowid);
                out.extend(rows.into_iter().map(|(rowid, cells)| ndjson(&json!({"row": [rowid, cells]}))));
                let time = started.elapsed().as_secs_f64();
                out.push(ndjson(&json!({"eoq": {"time": time, "change_id": sub.last_change_id}})));
            }
        }
        let mut l = Listener { tx, held: Vec::new() };
        if !out.is_empty() {
            l.send(Bytes::from(out.concat()), silent);
        }
        sub.listeners.push(l);
        Some(rx)
    }

    /// Runs `stmts` as one transaction; after a commit, every subscription hears its changes.
    fn transact(&mut self, stmts: &[Value]) -> Result<(Vec<usize>, Option<u64>), String> {
        let tx = self.db.transaction().map_err(|e| e.to_string())?;
        let mut counts = Vec::new();
        for s in stmts {
            let n = prepare(&tx, s)?.raw_execute().map_err(|e| e.to_string())?;
            counts.push(n);
        }
        tx.commit().map_err(|e| e.to_string())?;
        if counts.iter().all(|n| *n == 0) {
            return Ok((counts, None));
        }
        self.version += 1;
        let ids: Vec<String> = self.subs.keys().cloned().collect();
        for id in ids {
            self.publish(&id)?;
        }
        self.drop_after = None;
        Ok((counts, Some(self.version)))
    }

    /// Compares a subscription's rows with its query's and sends the difference.
    fn publish(&mut self, id: &str) -> Result<(), String> {
        let Some(sub) = self.subs.get(id) else { return Ok(()) };
        let now = self.current(&sub.sql, &sub.identity)?;
        let sub = self.subs.get_mut(id).ok_or("gone")?;
        let mut changes = Vec::new();
        for (ident, cells) in &now {
            match sub.rows.get(ident) {
                None => changes.push(("insert", ident.clone(), cells.clone())),
                Some((_, old)) if old != cells => changes.push(("update", ident.clone(), cells.clone())),
                Some(_) => {}
            }
        }
        for (ident, (_, cells)) in &sub.rows {
            if !now.contains_key(ident) {
                changes.push(("delete", ident.clone(), cells.clone()));
            }
        }
        // Corrosion gives no statement order within a transaction, and neither does this.
        self.rng.shuffle(&mut changes);
        let mut lines = Vec::new();
        for (kind, ident, cells) in changes {
            let rowid = match kind {
                "insert" => {
                    let r = sub.next_rowid;
                    sub.next_rowid += 1 + self.rng.i64(0..3);
                    sub.rows.insert(ident, (r, cells.clone()));
                    r
                }
                "update" => sub.rows.get_mut(&ident).map_or(0, |e| {
                    e.1 = cells.clone();
                    e.0
                }),
                _ => sub.rows.remove(&ident).map_or(0, |e| e.0),
            };
            if std::mem::take(&mut self.skip_next) {
                sub.last_change_id += 1; // the fault: this id is never sent
            }
            sub.last_change_id += 1;
            let line = ndjson(&json!({"change": [kind, rowid, cells, sub.last_change_id]}));
            sub.log.push_back((sub.last_change_id, line.clone()));
            lines.push(line);
        }
        while sub.log.len() > self.retention {
            sub.log.pop_front();
        }
        if lines.is_empty() {
            return Ok(());
        }
        let (silent, cut) = (self.silent, self.drop_after);
        let sent = Bytes::from(lines[..cut.unwrap_or(lines.len()).min(lines.len())].concat());
        sub.listeners.retain_mut(|l| {
            let alive = sent.is_empty() || l.send(sent.clone(), silent);
            if cut.is_some() {
                let _ = l.tx.send(Err(broken()));
                return false;
            }
            alive
        });
        Ok(())
    }

    fn drop_streams(&mut self) {
        for sub in self.subs.values_mut() {
            for l in sub.listeners.drain(..) {
                let _ = l.tx.send(Err(broken()));
            }
        }
    }
}

/// A body fed line by line; an error aborts the connection (no last chunk), as a dropped
/// stream looks to a client.
struct Stream(mpsc::UnboundedReceiver<Line>);

impl Body for Stream {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|l| l.map(|r| r.map(Frame::data)))
    }
}

type Reply = Response<BoxBody<Bytes, std::io::Error>>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let body = Full::new(body.into()).map_err(|never: Infallible| match never {}).boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, e: &str) -> Reply {
    reply(status, json!({"error": e}).to_string())
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_string())
    })
}

impl State {
    async fn until_speaking(&self) {
        let mut rx = self.silent.subscribe();
        let _ = rx.wait_for(Option::is_none).await;
    }

    fn stream(&self, id: &str, from: Option<i64>, skip_rows: bool) -> Reply {
        let mut inner = self.inner.lock();
        let hash = inner.subs.get(id).map(|s| s.hash.clone()).unwrap_or_default();
        let Some(rx) = inner.open(id, from, skip_rows) else {
            return error(StatusCode::NOT_FOUND, &format!("could not find subscription with id {id}"));
        };
        let mut r = Response::new(Stream(rx).boxed());
        r.headers_mut().insert("corro-query-id", id.parse().expect("a uuid is a header value"));
        r.headers_mut().insert("corro-query-hash", hash.parse().expect("hex is a header value"));
        r
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Reply, Infallible> {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let target = req.uri().path_and_query().map_or(path.clone(), ToString::to_string);
        let from = query_param(&req, "from").and_then(|f| f.parse().ok());
        let skip_rows = query_param(&req, "skip_rows").is_some_and(|v| v == "true");
        let fault = path.strip_prefix("/standin/faults/").map(str::to_string);
        let (keep, k, health) =
            (query_param(&req, "keep"), query_param(&req, "k"), query_param(&req, "health"));
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Ok(error(StatusCode::BAD_REQUEST, &e.to_string())),
        };
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        // Copied out: the watch's guard must not be held across a wait.
        let silent = *self.silent.borrow();
        if fault.is_none() {
            let text = String::from_utf8_lossy(&body).into_owned();
            self.inner.lock().requests.push((format!("{method} {target}"), text));
        }
        Ok(match (method, path.as_str()) {
            (Method::GET, "/v1/health") => match silent {
                Some(Health::Fail) => reply(StatusCode::SERVICE_UNAVAILABLE, HEALTH),
                Some(Health::Hang) => {
                    self.until_speaking().await;
                    reply(StatusCode::OK, HEALTH)
                }
                None => reply(StatusCode::OK, HEALTH),
            },
            (Method::POST, "/v1/transactions") => self.transactions(json),
            (Method::POST, "/v1/queries") => self.queries(json),
            (Method::POST, "/v1/subscriptions") => {
                self.until_speaking().await;
                let Some(stmt) = json else { return Ok(error(StatusCode::BAD_REQUEST, "not a statement")) };
                let id = self.inner.lock().subscription(&stmt, from);
                match id {
                    Ok(id) => self.stream(&id, from, skip_rows),
                    Err((status, e)) => error(status, &e),
                }
            }
            (Method::GET, p) if p.starts_with("/v1/subscriptions/") => {
                self.until_speaking().await;
                self.stream(&p["/v1/subscriptions/".len()..], from, skip_rows)
            }
            (Method::POST, _) if fault.is_some() => {
                let n = |v: Option<String>| v.and_then(|v| v.parse().ok()).unwrap_or(0);
                match fault.as_deref().unwrap_or("") {
                    "drop" => self.drop_streams(),
                    "drop-after" => self.drop_streams_after(n(k)),
                    "gap" => self.skip_change_id(),
                    "trim" => self.trim_changes(n(keep)),
                    "forget" => self.forget_subscriptions(),
                    "silent" if health.as_deref() == Some("fail") => self.go_silent(Health::Fail),
                    "silent" => self.go_silent(Health::Hang),
                    "speak" => self.speak(),
                    other => return Ok(error(StatusCode::NOT_FOUND, &format!("no fault {other}"))),
                }
                reply(StatusCode::OK, "{}")
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        })
    }

    fn transactions(&self, json: Option<Value>) -> Reply {
        let started = Instant::now();
        let mut inner = self.inner.lock();
        let Some(Value::Array(stmts)) = json else {
            return error(StatusCode::BAD_REQUEST, "expected a JSON array of statements");
        };
        let time = || started.elapsed().as_secs_f64();
        match inner.transact(&stmts) {
            Ok((counts, version)) => {
                let results: Vec<Value> =
                    counts.iter().map(|n| json!({"rows_affected": n, "time": time()})).collect();
                let v = json!({"results": results, "time": time(), "version": version, "actor_id": self.actor_id});
                reply(StatusCode::OK, v.to_string())
            }
            Err(e) => {
                let v = json!({"results": [{"error": e}], "time": time(), "version": null, "actor_id": self.actor_id});
                reply(StatusCode::INTERNAL_SERVER_ERROR, v.to_string())
            }
        }
    }

    fn queries(&self, json: Option<Value>) -> Reply {
        let started = Instant::now();
        let inner = self.inner.lock();
        let Some(stmt) = json else { return error(StatusCode::BAD_REQUEST, "not a statement") };
        match run_query(&inner.db, &stmt) {
            Ok((columns, rows)) => {
                let mut out = vec![ndjson(&json!({"columns": columns}))];
                out.extend(rows.into_iter().enumerate().map(|(i, r)| ndjson(&json!({"row": [i + 1, r]}))));
                out.push(ndjson(&json!({"eoq": {"time": started.elapsed().as_secs_f64()}})));
                reply(StatusCode::OK, out.concat())
            }
            Err(e) => error(StatusCode::BAD_REQUEST, &e),
        }
    }
}

const HEALTH: &str = r#"{"response":{"gaps":0,"members":1,"p99_lag":0.0,"queue_size":0}}"#;

impl Standin {
    /// Starts a stand-in on `listen` (port 0 picks one) over the SQLite database at `db`,
    /// created with `schema` (the schema file's text). Keeps the newest `retention` changes
    /// of each subscription.
    pub fn start(listen: SocketAddr, db: &Path, schema: &str, retention: usize) -> Result<Standin, String> {
        let conn = rusqlite::Connection::open(db).map_err(|e| format!("{}: {e}", db.display()))?;
        let pk_columns = load_schema(&conn, schema)?;
        let mut rng = fastrand::Rng::new();
        let actor_id = format!("{:032x}", u128::from(rng.u64(..)) << 64 | u128::from(rng.u64(..)));
        let inner = Inner {
            db: conn,
            subs: HashMap::new(),
            by_sql: HashMap::new(),
            pk_columns,
            retention,
            version: 0,
            drop_after: None,
            skip_next: false,
            silent: false,
            requests: Vec::new(),
            rng,
        };
        let state = Arc::new(State {
            inner: parking_lot::Mutex::new(inner),
            silent: watch::channel(None).0,
            actor_id,
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("corrosion-standin")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        // Bound here, served there: a test may start it from inside its own runtime.
        let listener = std::net::TcpListener::bind(listen).map_err(|e| format!("{listen}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        rt.spawn(serve(listener, state.clone()));
        Ok(Standin { addr, state, rt: Some(rt) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every stream breaks now (resumable: the subscriptions stay).
    pub fn drop_streams(&self) {
        self.state.drop_streams();
    }

    /// The next transaction's changes reach each stream only `k` lines far, then every
    /// stream breaks (a disconnect in the middle of a transaction's changes).
    pub fn drop_streams_after(&self, k: usize) {
        self.state.drop_streams_after(k);
    }

    /// The next change id is skipped (a gap a subscriber must notice).
    pub fn skip_change_id(&self) {
        self.state.skip_change_id();
    }

    /// Keeps only the newest `keep` changes of each subscription (Corrosion's purge).
    pub fn trim_changes(&self, keep: usize) {
        self.state.trim_changes(keep);
    }

    /// Forgets every subscription (their streams break; their ids answer 404).
    pub fn forget_subscriptions(&self) {
        self.state.forget_subscriptions();
    }

    /// Streams say nothing (lines are held back) and subscription requests wait; health
    /// hangs or fails.
    pub fn go_silent(&self, health: Health) {
        self.state.go_silent(health);
    }

    /// Ends a silence: held lines go out, waiting requests are answered.
    pub fn speak(&self) {
        self.state.speak();
    }

    /// Runs `stmts` as one transaction, as `POST /v1/transactions` would.
    pub fn execute(&self, stmts: &[Value]) -> Result<Vec<usize>, String> {
        self.state.inner.lock().transact(stmts).map(|(counts, _)| counts)
    }

    /// The rows `sql` selects, cells as JSON.
    pub fn rows(&self, sql: &str) -> Vec<Vec<Value>> {
        run_query(&self.state.inner.lock().db, &json!(sql)).map(|(_, r)| r).unwrap_or_default()
    }

    /// The API requests received so far, as ("METHOD /path?query", body).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.state.inner.lock().requests.clone()
    }

    /// Open streams across all subscriptions (a client that went away counts until the next send).
    pub fn streams(&self) -> usize {
        self.state
            .inner
            .lock()
            .subs
            .values()
            .map(|s| s.listeners.iter().filter(|l| !l.tx.is_closed()).count())
            .sum()
    }

    /// (id, last change id) of each subscription.
    pub fn subscriptions(&self) -> Vec<(String, i64)> {
        self.state.inner.lock().subs.values().map(|s| (s.id.clone(), s.last_change_id)).collect()
    }
}

impl State {
    fn drop_streams(&self) {
        self.inner.lock().drop_streams();
    }
    fn drop_streams_after(&self, k: usize) {
        self.inner.lock().drop_after = Some(k);
    }
    fn skip_change_id(&self) {
        self.inner.lock().skip_next = true;
    }
    fn trim_changes(&self, keep: usize) {
        for sub in self.inner.lock().subs.values_mut() {
            while sub.log.len() > keep {
                sub.log.pop_front();
            }
        }
    }
    fn forget_subscriptions(&self) {
        let mut inner = self.inner.lock();
        inner.drop_streams();
        inner.subs.clear();
        inner.by_sql.clear();
    }
    fn go_silent(&self, health: Health) {
        self.inner.lock().silent = true;
        self.silent.send_replace(Some(health));
    }
    fn speak(&self) {
        let mut inner = self.inner.lock();
        inner.silent = false;
        for sub in inner.subs.values_mut() {
            sub.listeners
                .retain_mut(|l| std::mem::take(&mut l.held).into_iter().all(|b| l.tx.send(Ok(b)).is_ok()));
        }
        drop(inner);
        self.silent.send_replace(None);
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<State>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("corrosion stand-in: listening: {e}");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("corrosion stand-in: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| state.clone().handle(req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // A fault ends connections on purpose; nothing to report.
            let _ = conn.await;
        });
    }
}
