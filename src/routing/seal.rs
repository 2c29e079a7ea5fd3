//! Sealed session tokens, for session affinity: see [`crate::model::seal`] for the format
//! and the nonce scheme. Defined beside the RIB's records because the catalog prepares the
//! keyring ([`crate::catalog::Snapshot::keyring`]) and may not import routing; routing is
//! where tokens are sealed and opened, so this is where callers find them.

pub use crate::model::seal::{Keyring, MAX_TOKEN_LEN, Opened, SealError, SessionKey, TOKEN_PREFIX};
