//! Corrosion's HTTP API on the wire: the NDJSON lines of `/v1/queries` and
//! `/v1/subscriptions`, the statements tern sends, and the answers of `/v1/transactions` and
//! `/v1/health`. Hand-written serde types: Corrosion's own client crates pull in another HTTP
//! client and a second SQLite for what is five small shapes. The tests hold lines recorded
//! from a running agent (docs/rib-corrosion.md), so a drift in the format shows here.

use serde::Deserialize;
use serde_json::Value;

use crate::rib::{Record, Table};

/// The one query tern subscribes to: every row of the RIB's table. Cells come in this order.
pub const SUBSCRIPTION: &str = "SELECT tbl, key, body FROM tern_rib";
/// The columns [`SUBSCRIPTION`] answers with.
pub const COLUMNS: [&str; 3] = ["tbl", "key", "body"];

/// What a subscription says happened to one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
}

/// The end of a query's rows. A subscription's carries the change id its changes continue
/// from; a plain query's has none.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Eoq {
    #[serde(default)]
    pub time: f64,
    #[serde(default)]
    pub change_id: Option<i64>,
}

/// One NDJSON line of a query or a subscription.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// `{"columns":["tbl","key","body"]}`: first, before any row.
    Columns(Vec<String>),
    /// `{"row":[rowid,[cells]]}`: one row of the initial result.
    Row(i64, Vec<Value>),
    /// `{"eoq":{"time":…,"change_id":N}}`: the initial result is complete.
    Eoq(Eoq),
    /// `{"change":["insert"|"update"|"delete",rowid,[all cells],change_id]}`: a later change.
    /// A delete carries the row's last cells, so the row it removes is known from the line.
    Change(ChangeKind, i64, Vec<Value>, i64),
    /// `{"error":"…"}`: the agent cannot go on with this stream (a subscription whose
    /// changes from the asked id were purged says so here, with HTTP 200).
    Error(String),
}

/// Parses one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<Event, String> {
    serde_json::from_slice(line).map_err(|e| {
        let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
        format!("unreadable line from the agent ({e}): {shown}")
    })
}

/// A row of [`SUBSCRIPTION`] as a RIB record; `None` for a row of a table tern does not know
/// (another tern's newer table, or someone else's rows) or cells of the wrong shape.
pub fn record(cells: &[Value]) -> Option<Record> {
    let [Value::String(tbl), Value::String(key), Value::String(body)] = cells else { return None };
    Some(Record { table: Table::parse(tbl)?, key: key.clone(), body: body.clone() })
}

/// A statement as `/v1/transactions`, `/v1/queries` and `/v1/subscriptions` take it:
/// `["SQL", [params]]`. Parameters are positional (`?`), values untagged JSON.
pub fn statement(sql: &str, params: &[&str]) -> Value {
    Value::Array(vec![Value::from(sql), Value::Array(params.iter().map(|p| Value::from(*p)).collect())])
}

/// One statement's result in a transaction's answer.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TxResult {
    Done {
        rows_affected: u64,
        #[serde(default)]
        time: f64,
    },
    Failed {
        error: String,
    },
}

/// `POST /v1/transactions`' answer: `{"results":[…],"time":…,"version":N|null,"actor_id":"…"}`.
/// On failure (HTTP 500) the whole batch was rolled back and a result carries the error.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct TxAnswer {
    pub results: Vec<TxResult>,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub actor_id: Option<String>,
}

impl TxAnswer {
    /// The first error any statement reported.
    pub fn error(&self) -> Option<&str> {
        self.results.iter().find_map(|r| match r {
            TxResult::Failed { error } => Some(error.as_str()),
            TxResult::Done { .. } => None,
        })
    }

    /// Rows each statement changed, in order.
    pub fn rows_affected(&self) -> Vec<u64> {
        self.results
            .iter()
            .map(|r| match r {
                TxResult::Done { rows_affected, .. } => *rows_affected,
                TxResult::Failed { .. } => 0,
            })
            .collect()
    }
}

/// `GET /v1/health`: `{"response":{"gaps":0,"members":1,"p99_lag":0.0,"queue_size":0}}`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Health {
    pub response: HealthResponse,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct HealthResponse {
    #[serde(default)]
    pub gaps: i64,
    #[serde(default)]
    pub members: i64,
    #[serde(default)]
    pub p99_lag: f64,
    #[serde(default)]
    pub queue_size: i64,
}

/// An error answer (`{"error":"…"}`, as a 404 for an unknown subscription or a 400 for bad
/// SQL), or the body as text when it is not one.
pub fn error_text(body: &[u8]) -> String {
    match serde_json::from_slice::<Event>(body) {
        Ok(Event::Error(e)) => e,
        _ => String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as a running agent wrote them (docs/rib-corrosion.md quotes them).
    #[test]
    fn reads_a_subscriptions_lines_as_the_agent_writes_them() {
        assert_eq!(
            parse_line(br#"{"columns":["tbl","key","body"]}"#).unwrap(),
            Event::Columns(vec!["tbl".into(), "key".into(), "body".into()])
        );
        let row = parse_line(br#"{"row":[1,["apps","hello","{\"name\":\"hello\"}"]]}"#).unwrap();
        let Event::Row(1, cells) = row else { panic!("{row:?}") };
        let r = record(&cells).unwrap();
        assert_eq!((r.table, r.key.as_str(), r.body.as_str()), (Table::Apps, "hello", r#"{"name":"hello"}"#));
        assert_eq!(
            parse_line(br#"{"eoq":{"time":2.21e-7,"change_id":0}}"#).unwrap(),
            Event::Eoq(Eoq { time: 2.21e-7, change_id: Some(0) })
        );
        // A plain query's end carries no change id.
        assert_eq!(
            parse_line(br#"{"eoq":{"time":2.21e-7}}"#).unwrap(),
            Event::Eoq(Eoq { time: 2.21e-7, change_id: None })
        );
        // The observed shape is [kind, rowid, cells, change_id] (the docs' example is not).
        let change = parse_line(br#"{"change":["update",1,["m1","started"],2]}"#).unwrap();
        assert_eq!(change, Event::Change(ChangeKind::Update, 1, vec!["m1".into(), "started".into()], 2));
        let delete = parse_line(br#"{"change":["delete",8,["machines","m5","{}"],41]}"#).unwrap();
        let Event::Change(ChangeKind::Delete, 8, cells, 41) = delete else { panic!("{delete:?}") };
        assert_eq!(record(&cells).unwrap().key, "m5");
        assert!(parse_line(br#"{"change":[2,"insert",["m1"]]}"#).is_err(), "the docs' wrong shape");
    }

    #[test]
    fn reads_the_errors_a_stream_or_an_answer_carries() {
        let purged = br#"{"error":"subscription already deleted older changes, min change id: 108"}"#;
        assert_eq!(
            parse_line(purged).unwrap(),
            Event::Error("subscription already deleted older changes, min change id: 108".into())
        );
        let missing =
            br#"{"error":"could not find subscription with id 5f9e1c2a-0000-4000-8000-000000000000"}"#;
        assert!(error_text(missing).starts_with("could not find subscription with id"));
        assert_eq!(error_text(b"max concurrency limit reached"), "max concurrency limit reached");
        let e = parse_line(b"{\"row\":").unwrap_err();
        assert!(e.contains("unreadable line"), "{e}");
    }

    #[test]
    fn reads_transaction_and_health_answers() {
        let ok: TxAnswer = serde_json::from_str(
            r#"{"results":[{"rows_affected":1,"time":0.000021}],"time":0.00012,"version":1,"actor_id":"3226a6c8"}"#,
        )
        .unwrap();
        assert_eq!((ok.rows_affected(), ok.version, ok.error()), (vec![1], Some(1), None));
        let failed: TxAnswer = serde_json::from_str(
            r#"{"results":[{"error":"NOT NULL constraint failed: tern_rib.body"}],"time":0.0001,"version":null,"actor_id":"3226a6c8"}"#,
        )
        .unwrap();
        assert_eq!(failed.error(), Some("NOT NULL constraint failed: tern_rib.body"));
        assert_eq!(failed.version, None);
        let h: Health =
            serde_json::from_str(r#"{"response":{"gaps":0,"members":2,"p99_lag":0.0995,"queue_size":0}}"#)
                .unwrap();
        assert_eq!((h.response.gaps, h.response.members), (0, 2));
    }

    #[test]
    fn rows_of_other_tables_or_shapes_are_not_records() {
        assert!(record(&["nat_rules".into(), "k".into(), "{}".into()]).is_none());
        assert!(record(&["apps".into(), "k".into()]).is_none());
        assert!(record(&["apps".into(), Value::Null, "{}".into()]).is_none());
        assert_eq!(
            statement("SELECT 1 WHERE ? = ?", &["a", "b"]).to_string(),
            r#"["SELECT 1 WHERE ? = ?",["a","b"]]"#
        );
    }
}
