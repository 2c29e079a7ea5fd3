//! Declarations: the apps, machines and certificates a `tern apply` file describes.
//!
//! Parsing and validation are pure (certificate files aside), so `tern check` and
//! `tern apply` report the same first problem, with its file, line and field. Nothing is
//! written unless the whole declaration is valid.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{self, AppSpec, CertSpec, MachineSpec, OrgSpec, names};

mod locate;
pub mod plan;

pub use plan::{Current, Plan, PlanError, Write, apply, dry_run};

/// A field inside a declaration: `apps[0].hostnames[1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(&'static str),
    Index(usize),
}

pub type FieldPath = Vec<Seg>;

pub fn path_string(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The first problem found in a declaration. Line 0: the file as a whole (it cannot be read,
/// say), printed without a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{}{}{message}",
    if *line == 0 { String::new() } else { format!("{line}:") },
    if field.is_empty() { " ".to_string() } else { format!(" {field}: ") })]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDecl {
    #[serde(default)]
    orgs: Vec<OrgSpec>,
    #[serde(default)]
    apps: Vec<AppSpec>,
    #[serde(default)]
    machines: Vec<MachineSpec>,
    #[serde(default)]
    certificates: Vec<RawCert>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    hostname: String,
    cert_file: Option<PathBuf>,
    cert_pem: Option<String>,
    key_file: Option<PathBuf>,
    key_pem: Option<String>,
}

/// A declaration that passed every check, normalised (hostnames lower-case, certificates
/// loaded from their files and verified).
#[derive(Debug, Clone, Default)]
pub struct Declaration {
    pub orgs: Vec<OrgSpec>,
    pub apps: Vec<AppSpec>,
    pub machines: Vec<MachineSpec>,
    pub certificates: Vec<CertSpec>,
    /// Where it was read from, so that problems found later (against the RIB) still name
    /// the file, line and field.
    file: String,
    text: String,
}

impl Declaration {
    /// A problem with `path` in this declaration, at the line where the field is written.
    fn problem_at(&self, path: &[Seg], message: String) -> Problem {
        Problem {
            file: self.file.clone(),
            line: locate::line_for(&self.text, path),
            field: path_string(path),
            message,
        }
    }
}

/// Reads and validates a declaration file. Relative certificate paths are resolved from
/// the file's directory.
pub fn load(path: &Path) -> Result<Declaration, Problem> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Problem {
        file: file.clone(),
        line: 0,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, &file, path.parent().unwrap_or(Path::new(".")))
}

/// Parses and validates declaration text; `base` resolves relative certificate paths.
pub fn parse(text: &str, file: &str, base: &Path) -> Result<Declaration, Problem> {
    let raw: RawDecl = toml::from_str(text).map_err(|e| Problem {
        file: file.to_string(),
        line: e.span().map_or(1, |s| locate::line_of(text, s.start)),
        field: String::new(),
        message: e.message().trim().to_string(),
    })?;
    let mut decl = validate(raw, base).map_err(|(path, message)| {
        let path = as_written(text, path);
        Problem {
            file: file.to_string(),
            line: locate::line_for(text, &path),
            field: path_string(&path),
            message,
        }
    })?;
    decl.file = file.to_string();
    decl.text = text.to_string();
    Ok(decl)
}

type Invalid = (FieldPath, String);

fn at(path: &[Seg], message: impl Into<String>) -> Invalid {
    (path.to_vec(), message.into())
}

fn validate(raw: RawDecl, base: &Path) -> Result<Declaration, Invalid> {
    let mut decl = Declaration { orgs: validate_orgs(raw.orgs)?, ..Declaration::default() };
    let mut hosts: HashMap<String, String> = HashMap::new();
    let mut taken = Taken::default();
    let mut app_names = HashSet::new();
    for (i, mut app) in raw.apps.into_iter().enumerate() {
        let p = |k: &'static str| vec![Seg::Key("apps"), Seg::Index(i), Seg::Key(k)];
        names::check_app_name(&app.name).map_err(|m| at(&p("name"), m))?;
        if !app_names.insert(app.name.clone()) {
            return Err(at(&p("name"), format!("app {:?} is declared twice", app.name)));
        }
        if let Some(r) = &app.primary_region {
            names::check_region(r).map_err(|m| at(&p("primary_region"), m))?;
        }
        for (j, h) in app.hostnames.iter_mut().enumerate() {
            let hp = [Seg::Key("apps"), Seg::Index(i), Seg::Key("hostnames"), Seg::Index(j)];
            *h = names::normalize_hostname(h).map_err(|m| at(&hp, m))?;
            if let Some(other) = hosts.insert(h.clone(), app.name.clone()) {
                return Err(at(&hp, format!("hostname {h:?} is already claimed by app {other:?}")));
            }
        }
        validate_addresses(&app, i, &mut taken)?;
        if app.internal_port == 0 {
            return Err(at(&p("internal_port"), "must be a port number from 1 to 65535"));
        }
        app.concurrency.check().map_err(|m| at(&p("concurrency"), m))?;
        app.http_options.check().map_err(|m| at(&p("http_options"), m))?;
        app.check_start_timeout().map_err(|m| at(&p("start_timeout"), m))?;
        for (j, c) in app.checks.iter().enumerate() {
            let cp = [Seg::Key("apps"), Seg::Index(i), Seg::Key("checks"), Seg::Index(j)];
            c.check().map_err(|m| at(&cp, m))?;
        }
        app.check_sessions().map_err(|(f, m)| at(&session_path(i, f), m))?;
        decl.apps.push(app);
    }
    let mut ids = HashSet::new();
    for (i, m) in raw.machines.into_iter().enumerate() {
        let p = |k: &'static str| vec![Seg::Key("machines"), Seg::Index(i), Seg::Key(k)];
        names::check_machine_id(&m.id).map_err(|e| at(&p("id"), e))?;
        if !ids.insert(m.id.clone()) {
            return Err(at(&p("id"), format!("machine {:?} is declared twice", m.id)));
        }
        names::check_app_name(&m.app).map_err(|e| at(&p("app"), e))?;
        if !m.region.is_empty() {
            names::check_region(&m.region).map_err(|e| at(&p("region"), e))?;
        }
        if let Some(node) = &m.node {
            names::check_node_name(node).map_err(|e| at(&p("node"), e))?;
        }
        if m.state == model::MachineState::Destroyed {
            return Err(at(&p("state"), "to remove a machine, leave it out and apply with --prune"));
        }
        if m.cmd.as_ref().is_some_and(|c| c.is_empty() || c[0].is_empty()) {
            return Err(at(&p("cmd"), "needs at least a program to run"));
        }
        decl.machines.push(m);
    }
    for (i, c) in raw.certificates.into_iter().enumerate() {
        decl.certificates.push(load_cert(c, i, base)?);
    }
    let mut cert_hosts = HashSet::new();
    for (i, c) in decl.certificates.iter().enumerate() {
        if !cert_hosts.insert(c.hostname.clone()) {
            let p = [Seg::Key("certificates"), Seg::Index(i), Seg::Key("hostname")];
            return Err(at(&p, format!("a certificate for {:?} is declared twice", c.hostname)));
        }
    }
    Ok(decl)
}

fn validate_orgs(raw: Vec<OrgSpec>) -> Result<Vec<OrgSpec>, Invalid> {
    let mut orgs: Vec<OrgSpec> = Vec::with_capacity(raw.len());
    for (i, o) in raw.into_iter().enumerate() {
        let p = |k: &'static str| vec![Seg::Key("orgs"), Seg::Index(i), Seg::Key(k)];
        names::check_org_name(&o.name).map_err(|m| at(&p("name"), m))?;
        if orgs.iter().any(|d| d.name == o.name) {
            return Err(at(&p("name"), format!("org {:?} is declared twice", o.name)));
        }
        orgs.push(o);
    }
    Ok(orgs)
}

/// The addresses the apps before the current one claimed.
#[derive(Default)]
struct Taken {
    private: HashMap<std::net::IpAddr, String>,
    tcp: HashMap<(std::net::IpAddr, u16), String>,
}

/// App `i`'s private addresses, dedicated addresses and services. Its `org` is not held to
/// org-name syntax: it was free text before `[[orgs]]` existed, and only an app with private
/// addresses needs it to name a declared org (which the plan checks).
fn validate_addresses(app: &AppSpec, i: usize, taken: &mut Taken) -> Result<(), Invalid> {
    let p = |k: &'static str| vec![Seg::Key("apps"), Seg::Index(i), Seg::Key(k)];
    let path = |j| [Seg::Key("apps"), Seg::Index(i), Seg::Key("private_addrs"), Seg::Index(j)];
    app.check_private_addrs().map_err(|(j, m)| at(&path(j), m))?;
    for (j, a) in app.private_addrs.iter().enumerate() {
        if let Some(other) = taken.private.insert(*a, app.name.clone()) {
            return Err(at(&path(j), format!("private address {a} is already app {other:?}'s")));
        }
    }
    app.check_services().map_err(|m| {
        let field = if m.starts_with("addrs") { "addrs" } else { "services" };
        at(&p(field), m)
    })?;
    for a in &app.addrs {
        for port in app.services.iter().flat_map(|s| &s.ports) {
            if let Some(other) = taken.tcp.insert((*a, port.port), app.name.clone()) {
                return Err(at(&p("addrs"), format!("{a} port {} is already app {other:?}'s", port.port)));
            }
        }
    }
    Ok(())
}

/// `path` as the author wrote it: a `replay_buffer` written inside `[apps.affinity]` (as
/// CONTRACT.md's example does) was moved to the top level of the app while reading.
fn as_written(text: &str, mut path: FieldPath) -> FieldPath {
    if let [Seg::Key("apps"), Seg::Index(_), Seg::Key("replay_buffer")] = path.as_slice() {
        if !locate::is_written(text, &path) {
            let inner = [&path[..2], &[Seg::Key("affinity"), Seg::Key("replay_buffer")]].concat();
            if locate::is_written(text, &inner) {
                path = inner;
            }
        }
    }
    path
}

/// Where a broken session setting of app `i` is written.
fn session_path(i: usize, field: model::SessionField) -> FieldPath {
    use model::SessionField as F;
    let mut path = vec![Seg::Key("apps"), Seg::Index(i)];
    match field {
        F::AffinityHeader(j) => path.extend([Seg::Key("affinity"), Seg::Key("headers"), Seg::Index(j)]),
        F::AffinityCookie => path.extend([Seg::Key("affinity"), Seg::Key("cookie")]),
        F::ReplayBuffer => path.push(Seg::Key("replay_buffer")),
        F::ReplayCache(j, k) => path.extend([Seg::Key("replay_cache"), Seg::Index(j), Seg::Key(k)]),
    }
    path
}

fn load_cert(c: RawCert, i: usize, base: &Path) -> Result<CertSpec, Invalid> {
    let p = |k: &'static str| vec![Seg::Key("certificates"), Seg::Index(i), Seg::Key(k)];
    let hostname = names::normalize_hostname(&c.hostname).map_err(|m| at(&p("hostname"), m))?;
    let read =
        |file: Option<PathBuf>, inline: Option<String>, field: &'static str, inline_field: &'static str| {
            match (file, inline) {
                (Some(_), Some(_)) => Err(at(&p(field), format!("give {field} or {inline_field}, not both"))),
                (None, None) => Err(at(&p(field), format!("{field} (or {inline_field}) is required"))),
                (None, Some(pem)) => Ok(pem),
                (Some(f), None) => {
                    let full = if f.is_relative() { base.join(&f) } else { f };
                    std::fs::read_to_string(&full)
                        .map_err(|e| at(&p(field), format!("cannot read {}: {e}", full.display())))
                }
            }
        };
    let cert_pem = read(c.cert_file, c.cert_pem, "cert_file", "cert_pem")?;
    let key_pem = read(c.key_file, c.key_pem, "key_file", "key_pem")?;
    let spec = CertSpec { hostname, cert_pem, key_pem };
    model::cert::parse(&spec).map_err(|e| {
        let field = match e {
            model::cert::CertError::BadKeyPem(_) | model::cert::CertError::UnsupportedKey => "key_file",
            model::cert::CertError::NameNotCovered { .. } => "hostname",
            _ => "cert_file",
        };
        at(&p(field), e.to_string())
    })?;
    Ok(spec)
}

/// The fuzz target's property: any input either parses into a declaration that
/// re-validates, or yields a problem with a line inside the text. Never panics.
pub fn fuzz_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse(text, "fuzz.toml", Path::new("/nonexistent")) {
        Ok(d) => {
            for a in &d.apps {
                for h in &a.hostnames {
                    assert_eq!(names::normalize_hostname(h).as_deref(), Ok(h.as_str()));
                }
            }
        }
        Err(p) => assert!(p.line >= 1 && p.line <= text.lines().count().max(1) + 1, "{p:?}"),
    }
}

#[cfg(test)]
mod tests;
