//! The RIB's `session_keys` rows, and the rules every store applies to them: a node makes
//! sure one key exists before it serves, and a rotation adds a key and retires the others
//! after a grace period. The rules are pure functions here so that each store (SQLite now,
//! a distributed store later) runs the same ones inside its own transaction.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::seal::SessionKey;

/// Retired keys stay in the RIB this long after they stopped opening tokens (so `tern keys
/// list` still shows what happened), then the next rotation deletes them.
pub const KEEP_RETIRED_MS: i64 = 24 * 3600 * 1000;

/// One `session_keys` row's body: `{"secret":"<base64>","created_ms":…,"retire_at_ms":…|null}`.
/// The key id is the row's key, in decimal.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionKeyRow {
    #[serde(serialize_with = "ser_secret", deserialize_with = "de_secret")]
    pub secret: [u8; 32],
    pub created_ms: i64,
    pub retire_at_ms: Option<i64>,
}

impl std::fmt::Debug for SessionKeyRow {
    /// Never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeyRow")
            .field("created_ms", &self.created_ms)
            .field("retire_at_ms", &self.retire_at_ms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the system random source failed; no session key was made")]
pub struct NoRandom;

impl SessionKeyRow {
    /// A new key with a secret from the system random source, made at `now_ms`.
    pub fn fresh(now_ms: i64) -> Result<SessionKeyRow, NoRandom> {
        let mut secret = [0u8; 32];
        SystemRandom::new().fill(&mut secret).map_err(|_| NoRandom)?;
        Ok(SessionKeyRow { secret, created_ms: now_ms, retire_at_ms: None })
    }

    pub fn to_key(&self, id: u32) -> SessionKey {
        SessionKey { id, secret: self.secret, created_ms: self.created_ms, retire_at_ms: self.retire_at_ms }
    }

    pub fn to_json(&self) -> String {
        // A struct of plain fields always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A row key as a key id: canonical decimal only ("7", not "07" or "+7"), so one id has one
/// row.
pub fn parse_id(key: &str) -> Option<u32> {
    let id: u32 = key.parse().ok()?;
    (id.to_string() == key).then_some(id)
}

fn ser_secret<S: Serializer>(secret: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(secret))
}

fn de_secret<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
    let text = String::deserialize(d)?;
    let bytes = STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| serde::de::Error::custom(format!("secret is {} bytes, not 32", b.len())))
}

/// What a rotation writes, worked out from the rows as they are.
#[derive(Debug)]
pub struct Rotation {
    /// The new key's id (one more than the highest id present) and row.
    pub id: u32,
    pub row: SessionKeyRow,
    /// Keys that sealed until now, with `retire_at_ms` set to the end of the grace period.
    pub retire: Vec<(u32, SessionKeyRow)>,
    /// Keys retired more than [`KEEP_RETIRED_MS`] ago: their rows go.
    pub delete: Vec<u32>,
    /// When the keys in `retire` stop opening tokens.
    pub retire_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("session key ids are exhausted (the highest is {})", u32::MAX)]
pub struct IdsExhausted;

/// Plans a rotation over the present rows (`(key, body)`), adding `fresh` (its `created_ms`
/// is "now"). Rows whose key is not an id or whose body does not decode are left alone, but
/// an id is never reused.
pub fn plan_rotation(
    rows: &[(String, String)],
    fresh: SessionKeyRow,
    grace_ms: i64,
) -> Result<Rotation, IdsExhausted> {
    let now = fresh.created_ms;
    let retire_at_ms = now.saturating_add(grace_ms);
    let mut max = 0u32;
    let mut retire = Vec::new();
    let mut delete = Vec::new();
    for (key, body) in rows {
        let Some(id) = parse_id(key) else { continue };
        max = max.max(id);
        let Ok(mut row) = serde_json::from_str::<SessionKeyRow>(body) else { continue };
        match row.retire_at_ms {
            None => {
                row.retire_at_ms = Some(retire_at_ms);
                retire.push((id, row));
            }
            Some(at) if at.saturating_add(KEEP_RETIRED_MS) < now => delete.push(id),
            Some(_) => {}
        }
    }
    let id = max.checked_add(1).ok_or(IdsExhausted)?;
    Ok(Rotation { id, row: SessionKeyRow { retire_at_ms: None, ..fresh }, retire, delete, retire_at_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(created_ms: i64, retire_at_ms: Option<i64>) -> SessionKeyRow {
        SessionKeyRow { secret: [9; 32], created_ms, retire_at_ms }
    }

    #[test]
    fn a_row_round_trips_through_its_documented_json() {
        let r = row(5, None);
        let json = r.to_json();
        assert!(json.contains(r#""retire_at_ms":null"#), "{json}");
        assert!(json.contains(&format!(r#""secret":"{}""#, STANDARD.encode([9u8; 32]))));
        assert_eq!(serde_json::from_str::<SessionKeyRow>(&json).unwrap(), r);
        let short = r#"{"secret":"AAAA","created_ms":1,"retire_at_ms":null}"#;
        assert!(serde_json::from_str::<SessionKeyRow>(short).is_err());
        assert!(!format!("{r:?}").contains("secret"));
    }

    #[test]
    fn ids_are_canonical_decimals() {
        assert_eq!(parse_id("7"), Some(7));
        assert_eq!(parse_id("4294967295"), Some(u32::MAX));
        for bad in ["07", "+7", "-1", "", "x", "4294967296", " 7"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_rotation_retires_the_sealing_keys_and_deletes_long_retired_ones() {
        let now = 10 * KEEP_RETIRED_MS;
        let rows: Vec<(String, String)> = vec![
            ("1".into(), row(0, Some(now - KEEP_RETIRED_MS - 1)).to_json()), // long gone
            ("2".into(), row(0, Some(now - 5)).to_json()),                   // recently retired
            ("3".into(), row(0, None).to_json()),                            // sealing
            ("9".into(), "{not json".into()),                                // left alone, id kept
            ("x".into(), row(0, None).to_json()),                            // not an id
        ];
        let plan = plan_rotation(&rows, row(now, Some(1)), 1000).unwrap();
        assert_eq!(plan.id, 10);
        assert_eq!(plan.row.retire_at_ms, None);
        assert_eq!(plan.retire_at_ms, now + 1000);
        assert_eq!(
            plan.retire.iter().map(|(id, r)| (*id, r.retire_at_ms)).collect::<Vec<_>>(),
            [(3, Some(now + 1000))]
        );
        assert_eq!(plan.delete, [1]);
        assert_eq!(plan_rotation(&[], row(now, None), 0).unwrap().id, 1);
        assert!(plan_rotation(&[(u32::MAX.to_string(), "{}".into())], row(now, None), 0).is_err());
    }
}
