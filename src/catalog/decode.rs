//! Turning RIB rows into catalog events. A row that does not decode is reported to the
//! caller, which logs, counts and skips it; the rest of the change still applies.

use crate::model::session_key::{SessionKeyRow, parse_id};
use crate::model::{self, AppSpec, CertSpec, MachineSpec, StateRow, names};
use crate::rib::Table;

use super::Snapshot;
use super::apply::Event;
use super::snapshot::{CertEntry, StateRecord};

#[derive(Debug, thiserror::Error)]
#[error("{table} row {key:?} skipped: {reason}")]
pub struct DecodeError {
    pub table: &'static str,
    pub key: String,
    pub reason: String,
}

/// Decodes one row (`body` = None for a deletion) into an event, or `None` when the catalog
/// already holds exactly this. Comparing before the expensive part (certificate parsing)
/// keeps a full resync cheap when little changed.
pub fn decode(
    current: &Snapshot,
    table: Table,
    key: &str,
    body: Option<&str>,
) -> Result<Option<Event>, DecodeError> {
    let fail = |reason: String| DecodeError { table: table.as_str(), key: key.to_string(), reason };
    let Some(body) = body else {
        return Ok(Some(match table {
            Table::Apps => Event::RemoveApp(key.into()),
            Table::Machines => Event::RemoveMachine(key.into()),
            Table::Certificates => Event::RemoveCert(key.into()),
            Table::MachineStates => Event::RemoveMachineState(key.into()),
            // A key that is no id was never held: nothing to remove.
            Table::SessionKeys => match parse_id(key) {
                Some(id) => Event::RemoveSessionKey(id),
                None => return Ok(None),
            },
            Table::Nodes => Event::RemoveNode(key.into()),
            Table::Orgs => Event::RemoveOrg(key.into()),
        }));
    };
    match table {
        Table::Apps => {
            let spec = decode_app(key, body).map_err(fail)?;
            let unchanged = current.apps.get(key).is_some_and(|a| *a.spec == spec);
            Ok((!unchanged).then(|| Event::App(spec)))
        }
        Table::Machines => {
            let spec = decode_machine(key, body).map_err(fail)?;
            let unchanged = current.machines.get(key).is_some_and(|m| m.spec == spec);
            Ok((!unchanged).then(|| Event::Machine(spec)))
        }
        Table::Certificates => {
            let spec: CertSpec = serde_json::from_str(body).map_err(|e| fail(format!("bad JSON: {e}")))?;
            if spec.hostname != key {
                return Err(fail(format!("body names hostname {:?}", spec.hostname)));
            }
            let unchanged = current.cert_for_key(key).is_some_and(|c| c.spec == spec);
            if unchanged {
                return Ok(None);
            }
            let parsed = model::cert::parse(&spec).map_err(|e| fail(e.to_string()))?;
            Ok(Some(Event::Cert(Box::new(CertEntry {
                spec,
                key: parsed.key,
                names: parsed.names,
                not_after: parsed.not_after,
            }))))
        }
        Table::MachineStates => {
            let row: StateRow = serde_json::from_str(body).map_err(|e| fail(format!("bad JSON: {e}")))?;
            let record = StateRecord { state: row.state, version: row.version };
            let unchanged = current.recorded_state(key) == Some(record);
            Ok((!unchanged).then(|| Event::MachineState { id: key.into(), record }))
        }
        Table::SessionKeys => {
            let id = parse_id(key).ok_or_else(|| fail("the key is not a key id (a decimal u32)".into()))?;
            let row: SessionKeyRow =
                serde_json::from_str(body).map_err(|e| fail(format!("bad JSON: {e}")))?;
            let key = row.to_key(id);
            let unchanged = current.session_keys.get(&id) == Some(&key);
            Ok((!unchanged).then(|| Event::SessionKey(key)))
        }
        Table::Nodes => {
            let row: model::NodeRow =
                serde_json::from_str(body).map_err(|e| fail(format!("bad JSON: {e}")))?;
            if row.node != key {
                return Err(fail(format!("body names node {:?}", row.node)));
            }
            // The same beat again (a resync) is not a new sign of life.
            let unchanged = current.node(key).is_some_and(|n| n.row.as_ref() == Some(&row));
            Ok((!unchanged).then(|| Event::Node(row)))
        }
        Table::Orgs => {
            let org: model::OrgSpec =
                serde_json::from_str(body).map_err(|e| fail(format!("bad JSON: {e}")))?;
            if org.name != key {
                return Err(fail(format!("body names org {:?}", org.name)));
            }
            names::check_org_name(&org.name).map_err(fail)?;
            let unchanged = current.orgs.get(key).is_some_and(|o| **o == org);
            Ok((!unchanged).then(|| Event::Org(org)))
        }
    }
}

fn decode_app(key: &str, body: &str) -> Result<AppSpec, String> {
    let mut spec: AppSpec = serde_json::from_str(body).map_err(|e| format!("bad JSON: {e}"))?;
    if spec.name != key {
        return Err(format!("body names app {:?}", spec.name));
    }
    names::check_app_name(&spec.name)?;
    spec.concurrency.check().map_err(|e| format!("concurrency: {e}"))?;
    spec.http_options.check().map_err(|e| format!("http_options: {e}"))?;
    spec.check_start_timeout().map_err(|e| format!("start_timeout: {e}"))?;
    for c in &spec.checks {
        c.check().map_err(|e| format!("checks: {e}"))?;
    }
    spec.check_sessions().map_err(|(field, e)| format!("{field}: {e}"))?;
    spec.check_private_addrs().map_err(|(i, e)| format!("private_addrs[{i}]: {e}"))?;
    spec.check_services().map_err(|e| if e.starts_with("addrs") { e } else { format!("services{e}") })?;
    for h in &mut spec.hostnames {
        *h = names::normalize_hostname(h)?;
    }
    Ok(spec)
}

fn decode_machine(key: &str, body: &str) -> Result<MachineSpec, String> {
    let spec: MachineSpec = serde_json::from_str(body).map_err(|e| format!("bad JSON: {e}"))?;
    if *spec.id != *key {
        return Err(format!("body names machine {:?}", spec.id));
    }
    names::check_machine_id(&spec.id)?;
    names::check_app_name(&spec.app)?;
    Ok(spec)
}

impl Snapshot {
    /// Whether the catalog holds a version of this RIB row (a row that later fails to
    /// decode leaves that version serving).
    pub(super) fn holds(&self, table: Table, key: &str) -> bool {
        match table {
            Table::Apps => self.apps.contains_key(key),
            Table::Machines => self.machines.contains_key(key),
            Table::Certificates => self.cert_for_key(key).is_some(),
            Table::MachineStates => self.states.contains_key(key),
            Table::SessionKeys => parse_id(key).is_some_and(|id| self.session_keys.contains_key(&id)),
            Table::Nodes => self.nodes.get(key).is_some_and(|n| n.row.is_some()),
            Table::Orgs => self.orgs.contains_key(key),
        }
    }

    /// The certificate stored under exactly this hostname key (exact or "*.suffix").
    pub(super) fn cert_for_key(&self, key: &str) -> Option<&std::sync::Arc<CertEntry>> {
        match key.strip_prefix("*.") {
            Some(suffix) => self.wild_certs.get(suffix),
            None => self.certs.get(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_row(body: &str) -> Result<Option<Event>, DecodeError> {
        decode(&Snapshot::default(), Table::Apps, "a", Some(body))
    }

    #[test]
    fn rows_with_broken_session_settings_are_skipped_naming_the_field() {
        let bad = [
            (r#"{"name":"a","affinity":{"headers":["Host"]}}"#, "affinity.headers[0]"),
            (r#"{"name":"a","affinity":{"headers":["X-S","x-s"]}}"#, "affinity.headers[1]"),
            (r#"{"name":"a","affinity":{"cookie":"a b"}}"#, "affinity.cookie"),
            (r#"{"name":"a","replay_buffer":67108865}"#, "replay_buffer"),
            (
                r#"{"name":"a","replay_cache":[{"path_prefix":"/","type":"cookie","name":"s","ttl_seconds":5}]}"#,
                "replay_cache[0].ttl_seconds",
            ),
            (
                r#"{"name":"a","replay_cache":[{"path_prefix":"x","type":"header","name":"h","ttl_seconds":60}]}"#,
                "replay_cache[0].path_prefix",
            ),
        ];
        for (body, field) in bad {
            let e = app_row(body).unwrap_err();
            assert!(e.reason.starts_with(&format!("{field}: ")), "{body}: {e}");
            assert!(e.to_string().starts_with("apps row \"a\" skipped: "), "{e}");
        }
        let e = app_row(r#"{"name":"a","affinity":{"headers":[],"sticky":true}}"#).unwrap_err();
        assert!(e.reason.contains("unknown field"), "{e}");
    }

    #[test]
    fn rows_without_session_settings_get_the_defaults() {
        let Ok(Some(Event::App(spec))) = app_row(r#"{"name":"a"}"#) else { panic!("decodes") };
        assert_eq!(spec.affinity, model::Affinity::default());
        assert_eq!(spec.replay_buffer, 1 << 20);
        assert!(spec.replay_cache.is_empty());
        let body = r#"{"name":"a","replay_buffer":"2MiB","affinity":{"headers":[],"cookie":"c"},
            "replay_cache":[{"path_prefix":"a.test/x","type":"header","name":"X-T","ttl_seconds":10,"allow_bypass":true}]}"#;
        let Ok(Some(Event::App(spec))) = app_row(body) else { panic!("decodes") };
        assert_eq!(spec.replay_buffer, 2 << 20);
        assert_eq!(spec.affinity.cookie.as_deref(), Some("c"));
        assert_eq!(spec.replay_cache[0].kind, model::ReplayCacheKind::Header);
    }
}
