//! `[rib]`: which store holds the RIB and how tern reaches it. SQLite is the embedded
//! default; etcd and Corrosion are followed over the network and share the liveness probe's
//! settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::de_duration;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RibKind {
    Sqlite,
    Etcd,
    Corrosion,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rib {
    #[serde(default = "default_rib_kind")]
    pub kind: RibKind,
    #[serde(default = "default_rib_path")]
    pub path: PathBuf,
    /// SQLite: how often the RIB is checked for commits when no file event announced one.
    /// Commits are noticed from the events (inotify) as they happen; this only bounds how
    /// late one is seen where events do not arrive (a network filesystem, inotify limits
    /// used up).
    #[serde(default = "default_rib_poll", deserialize_with = "de_duration")]
    pub poll_interval: Duration,
    /// etcd: the cluster's client URLs (`http://host:port`); any member will do.
    #[serde(default = "default_etcd_endpoints")]
    pub endpoints: Vec<String>,
    /// etcd: the key prefix the RIB lives under.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Corrosion: the API address of this node's agent (`http://host:port`).
    #[serde(default = "default_corrosion_url")]
    pub url: String,
    /// etcd and Corrosion: a stream quiet this long is probed (etcd: a progress request;
    /// Corrosion: `GET /v1/health`).
    #[serde(default = "default_probe_after", deserialize_with = "de_duration")]
    pub probe_after: Duration,
    /// etcd and Corrosion: a probe unanswered this long means the stream is dead; it is
    /// re-established from where it was.
    #[serde(default = "default_probe_timeout", deserialize_with = "de_duration")]
    pub probe_timeout: Duration,
}

/// `http://host:port` with nothing after it: what both etcd and Corrosion serve plainly.
fn is_http_host_port(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') {
        return false;
    }
    rest.parse::<SocketAddr>().is_ok()
        || rest.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

impl Rib {
    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        match self.kind {
            RibKind::Sqlite => return Ok(()),
            RibKind::Etcd => self.validate_etcd()?,
            RibKind::Corrosion => {
                if !is_http_host_port(&self.url) {
                    return Err((
                        "url",
                        format!(
                            "{:?} is not a Corrosion API address (\"http://host:port\", the agent's [api] addr; \
                             the API serves plain HTTP)",
                            self.url
                        ),
                    ));
                }
            }
        }
        if self.probe_after < Duration::from_millis(100) || self.probe_timeout < Duration::from_millis(100) {
            return Err(("probe_after", "probe_after and probe_timeout must be at least 100ms".into()));
        }
        Ok(())
    }

    fn validate_etcd(&self) -> Result<(), (&'static str, String)> {
        if self.endpoints.is_empty() {
            return Err(("endpoints", "name at least one etcd member (\"http://127.0.0.1:2379\")".into()));
        }
        if let Some(bad) = self.endpoints.iter().find(|e| !is_http_host_port(e)) {
            return Err((
                "endpoints",
                format!(
                    "{bad:?} is not an etcd client URL (\"http://host:port\"; TLS to etcd is not supported yet)"
                ),
            ));
        }
        if self.prefix.is_empty() {
            return Err(("prefix", "must not be empty (\"/tern/\")".into()));
        }
        Ok(())
    }
}

impl Default for Rib {
    fn default() -> Self {
        Rib {
            kind: RibKind::Sqlite,
            path: default_rib_path(),
            poll_interval: default_rib_poll(),
            endpoints: default_etcd_endpoints(),
            prefix: default_etcd_prefix(),
            url: default_corrosion_url(),
            probe_after: default_probe_after(),
            probe_timeout: default_probe_timeout(),
        }
    }
}

fn default_rib_kind() -> RibKind {
    RibKind::Sqlite
}
fn default_rib_path() -> PathBuf {
    PathBuf::from("tern.db")
}
fn default_rib_poll() -> Duration {
    Duration::from_secs(1)
}
fn default_etcd_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
fn default_etcd_prefix() -> String {
    "/tern/".into()
}
fn default_corrosion_url() -> String {
    "http://127.0.0.1:8081".into()
}
fn default_probe_after() -> Duration {
    Duration::from_secs(5)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(3)
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn an_etcd_rib_needs_client_urls_it_can_reach() {
        let c = Config::parse("[rib]\nkind = \"etcd\"\n").unwrap();
        assert_eq!(
            (c.rib.endpoints.as_slice(), c.rib.prefix.as_str()),
            (["http://127.0.0.1:2379".to_string()].as_slice(), "/tern/")
        );
        let c = Config::parse(
            "[rib]\nkind = \"etcd\"\nendpoints = [\"http://etcd-1.internal:2379\", \"http://[::1]:2379\"]\n",
        )
        .unwrap();
        assert_eq!(c.rib.endpoints.len(), 2);
        let (line, msg) =
            Config::parse("[rib]\nkind = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(msg.contains("not an etcd client URL") && msg.contains("TLS"), "{msg}");
        let (_, msg) = Config::parse("[rib]\nkind = \"etcd\"\nendpoints = []\n").unwrap_err();
        assert!(msg.contains("at least one etcd member"), "{msg}");
        let (_, msg) = Config::parse("[rib]\nkind = \"zookeeper\"\n").unwrap_err();
        assert!(msg.contains("sqlite") && msg.contains("etcd") && msg.contains("corrosion"), "{msg}");
    }

    #[test]
    fn a_corrosion_rib_names_its_agents_api_by_http_host_and_port() {
        let c = Config::parse("[rib]\nkind = \"corrosion\"\n").unwrap();
        assert_eq!(c.rib.url, "http://127.0.0.1:8081", "the agent beside the node, by default");
        let c = Config::parse(
            "[rib]\nkind = \"corrosion\"\nurl = \"http://corrosion.internal:8081\"\nprobe_after = \"2s\"\n",
        )
        .unwrap();
        assert_eq!((c.rib.url.as_str(), c.rib.probe_after.as_secs()), ("http://corrosion.internal:8081", 2));
        assert!(Config::parse("[rib]\nkind = \"corrosion\"\nurl = \"http://[::1]:8081/\"\n").is_ok());
        for bad in ["https://10.0.0.1:8081", "http://10.0.0.1", "http://10.0.0.1:8081/v1", "10.0.0.1:8081"] {
            let text = format!("region = \"ams\"\n[rib]\nkind = \"corrosion\"\nurl = \"{bad}\"\n");
            let (line, msg) = Config::parse(&text).unwrap_err();
            assert_eq!(line, 4, "{bad}");
            assert!(msg.contains("not a Corrosion API address") && msg.contains("http://host:port"), "{msg}");
        }
        let (_, msg) = Config::parse("[rib]\nkind = \"corrosion\"\nprobe_timeout = \"10ms\"\n").unwrap_err();
        assert!(msg.contains("at least 100ms"), "{msg}");
        // A SQLite RIB ignores the network settings, as before.
        assert!(Config::parse("[rib]\nurl = \"nonsense\"\n").is_ok());
    }
}
