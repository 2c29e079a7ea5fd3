//! One routing decision: which machine of the app takes this request, and why.
//!
//! Everything that can steer a request within its app meets here, in one order:
//!
//! ```text
//!  pinned (session token, affinity cookie, fly-force-instance-id, a replay's instance)
//!     └─ that machine: now if it has room; else wait for it (woken if stopped), never another
//!  preferred (fly-prefer-instance-id, a replay's prefer_instance)
//!     └─ that machine if it has room now; else on below, and the machine hears it was missed
//!  regions (fly-force-region / a replay's region: only those; fly-prefer-region: those first)
//!  excluded (a replay's elsewhere=true: not the machine that asked)
//!     └─ least loaded among the rest; none with room: wait for one (queue, or wake one)
//! ```
//!
//! [`decide`] looks once, without waiting; [`Router::route`](super::Router::route) acts on
//! what it says, asking for waits and wakes through [`Wakes`], which the lifecycle manager
//! implements. Routing never imports it: it only knows that something can hold a request
//! until a machine has room.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::time::Instant;

use super::select::{self, Pick};
use crate::catalog::{AppEntry, Machine};
use crate::model::MachineState;

/// Why a machine was chosen: an access-log field and a metric label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Why {
    #[default]
    LeastLoaded,
    /// A sealed session token (an affinity header) named it.
    Session,
    /// The app's affinity cookie named it.
    Cookie,
    /// `fly-force-instance-id`.
    Forced,
    /// `fly-prefer-instance-id`.
    Preferred,
    /// `fly-prefer-region` or `fly-force-region` narrowed the choice.
    Region,
    /// A machine answered `fly-replay`.
    Replay,
    /// A cached `fly-replay` decision.
    ReplayCache,
    /// The nearest region with room (`[regions] rtt_ms`).
    Nearest,
}

impl Why {
    pub const ALL: [Why; 9] = [
        Why::LeastLoaded,
        Why::Session,
        Why::Cookie,
        Why::Forced,
        Why::Preferred,
        Why::Region,
        Why::Replay,
        Why::ReplayCache,
        Why::Nearest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Why::LeastLoaded => "least_loaded",
            Why::Session => "session",
            Why::Cookie => "cookie",
            Why::Forced => "forced",
            Why::Preferred => "preferred",
            Why::Region => "region",
            Why::Replay => "replay",
            Why::ReplayCache => "replay_cache",
            Why::Nearest => "nearest",
        }
    }
}

/// Which regions the machine may (or should) be in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Regions {
    #[default]
    Any,
    /// Those first, others when none of them can take the request.
    Prefer(Vec<String>),
    /// Only those.
    Force(Vec<String>),
}

/// What steers a request to a machine within its app, read from its head, its session
/// and any replay. The default steers nowhere: least loaded.
#[derive(Clone, Debug, Default)]
pub struct Steering {
    /// This machine and no other.
    pub pinned: Option<(Arc<Machine>, Why)>,
    /// This machine if it can take the request at once; else any other.
    pub preferred: Option<(Arc<Machine>, Why)>,
    /// An id asked for as preferred that names no machine of the app: the machine that
    /// takes the request hears it, as for one that could not take it.
    pub preferred_missing: Option<Arc<str>>,
    pub regions: Regions,
    /// Not these machines (a replay's `elsewhere`, a machine whose connect just failed).
    pub exclude: Vec<Arc<str>>,
    /// The reason when the choice was otherwise free (a replay to a region is `Replay`).
    pub why: Why,
    /// With no region asked for: the regions by distance, tried nearest first.
    pub nearest: Option<Arc<super::nearest::Nearest>>,
}

impl Steering {
    /// Which machines the choice is among (pinned and preferred aside).
    pub fn eligible(&self) -> Eligible<'_> {
        let regions = match &self.regions {
            Regions::Force(r) => Some(r.as_slice()),
            Regions::Any | Regions::Prefer(_) => None,
        };
        Eligible { regions, exclude: &self.exclude }
    }
}

/// A filter over an app's machines.
#[derive(Clone, Copy, Debug, Default)]
pub struct Eligible<'a> {
    pub regions: Option<&'a [String]>,
    pub exclude: &'a [Arc<str>],
}

impl Eligible<'_> {
    pub fn admits(&self, m: &Machine) -> bool {
        !self.exclude.contains(&m.id)
            && self.regions.is_none_or(|r| super::replay::region_matches(r, m.region()))
    }

    pub fn is_all(&self) -> bool {
        self.regions.is_none() && self.exclude.is_empty()
    }
}

/// A machine chosen, counted in flight on it, with why.
pub struct Routed {
    pub pick: Pick,
    pub why: Why,
    /// How long the request waited for room or a wake, if it did.
    pub waited: Option<std::time::Duration>,
    /// A preferred machine that could not take the request (its id goes to the machine as
    /// `fly-preferred-instance-unavailable`).
    pub preferred_missed: Option<Arc<str>>,
}

/// What one look at the catalog says to do.
pub enum Decision {
    Go(Routed),
    /// The pinned machine cannot take the request now: wait for it (waking it if it is
    /// stopped), never for another.
    WaitFor(Arc<Machine>, Why),
    /// No eligible machine has room: wait for one (queue for room, or wake one).
    WaitAny {
        preferred_missed: Option<Arc<str>>,
    },
    /// `fly-force-region` (or a replay) names regions where the app has no machine.
    NoRegion,
}

/// Looks at the app once and decides, counting the request in flight on the machine it
/// picks. No waiting, no I/O.
pub fn decide(app: &AppEntry, steer: &Steering) -> Decision {
    let limits = &app.spec.concurrency;
    let hard = limits.hard_limit.unwrap_or(u32::MAX);
    if let Some((m, why)) = &steer.pinned {
        return match take(m, hard, limits.soft_limit) {
            Some(pick) => Decision::Go(Routed { pick, why: *why, waited: None, preferred_missed: None }),
            None => Decision::WaitFor(m.clone(), *why),
        };
    }
    let mut preferred_missed = steer.preferred_missing.clone();
    if let Some((m, why)) = &steer.preferred {
        if let Some(pick) = take(m, hard, limits.soft_limit) {
            return Decision::Go(Routed { pick, why: *why, waited: None, preferred_missed: None });
        }
        preferred_missed = Some(m.id.clone());
    }
    let eligible = steer.eligible();
    let go = |pick, why| {
        Decision::Go(Routed { pick, why, waited: None, preferred_missed: preferred_missed.clone() })
    };
    if let Regions::Prefer(regions) = &steer.regions {
        let near = Eligible { regions: Some(regions), ..eligible };
        if let Some(pick) = select::acquire_among(&app.machines, &near, limits) {
            return go(pick, Why::Region);
        }
    }
    // A region is left only when none of its machines is started, healthy and below its
    // hard limit; then the next tier, and last the regions the table does not list.
    if let (Regions::Any, Some(nearest)) = (&steer.regions, &steer.nearest) {
        for tier in nearest.tiers() {
            let near = Eligible { regions: Some(tier), ..eligible };
            if let Some(pick) = select::acquire_among(&app.machines, &near, limits) {
                return go(pick, if steer.why == Why::LeastLoaded { Why::Nearest } else { steer.why });
            }
        }
    }
    if let Some(pick) = select::acquire_among(&app.machines, &eligible, limits) {
        let why = if matches!(steer.regions, Regions::Force(_)) && steer.why == Why::LeastLoaded {
            Why::Region
        } else {
            steer.why
        };
        return go(pick, why);
    }
    if eligible.regions.is_some() && !app.machines.iter().any(|m| eligible.admits(m)) {
        return Decision::NoRegion;
    }
    Decision::WaitAny { preferred_missed }
}

/// The machine itself, if it is routable and below its hard limit, counted in flight.
fn take(m: &Arc<Machine>, hard: u32, soft: u32) -> Option<Pick> {
    if !m.routable() {
        return None;
    }
    let load = m.live.in_flight();
    let guard = m.live.try_begin(hard)?;
    // Counted, then checked again: a cordon for a stop in between sees this exchange.
    if !m.routable() {
        return None;
    }
    Some(Pick { machine: m.clone(), guard, over_soft: load >= soft, probe: false })
}

/// Why waiting for a machine ended without one.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("no machine became ready before the request's deadline")]
    Timeout,
    #[error("the app already holds {0} requests")]
    QueueFull(u32),
    #[error("no stopped or suspended machine to wake")]
    NothingToWake,
    #[error("every machine stayed at its hard limit ({0})")]
    NoRoom(u32),
    #[error("every machine tried failed to start; last: {0}")]
    Failed(Arc<str>),
    /// The machine waited for left the catalog.
    #[error("the machine is no longer in the catalog")]
    Gone,
    /// The machine waited for is not started and tern may not (or cannot) start it.
    #[error("the machine is {0} and cannot be started for this request")]
    Unavailable(&'static str),
}

pub type WaitFuture<'a> = Pin<Box<dyn Future<Output = Result<Pick, WaitError>> + Send + 'a>>;

/// What holds a request until a machine has room: the lifecycle manager.
pub trait Wakes: Send + Sync {
    /// Every routable machine of the app is over its soft limit: start another if there
    /// is one to start. Does not wait.
    fn wake_spare(&self, app: &AppEntry);

    /// Holds the request until a machine of the app that `eligible` admits has room,
    /// queueing for room or waking one (if `may_wake`), until `deadline`.
    fn wait_any<'a>(
        &'a self,
        app: &'a AppEntry,
        eligible: Eligible<'a>,
        deadline: Instant,
        may_wake: bool,
    ) -> WaitFuture<'a>;

    /// Holds the request until this machine has room, waking it if it is stopped or
    /// suspended (and `may_wake`), until `deadline`.
    fn wait_for<'a>(
        &'a self,
        app: &'a AppEntry,
        machine: &'a Arc<Machine>,
        deadline: Instant,
        may_wake: bool,
    ) -> WaitFuture<'a>;

    /// A machine declared started whose connect failed: start it if this node runs it and
    /// has not yet. Returns whether a start is under way.
    fn start_declared(&self, app: &AppEntry, machine: &Arc<Machine>) -> bool;
}

/// A short name for a machine state, for errors.
pub fn state_name(m: &Machine) -> &'static str {
    match m.state() {
        MachineState::Started if !m.live.healthy() => "failing its checks",
        MachineState::Started if !m.live.in_rotation() => "being stopped",
        s => s.as_str(),
    }
}

#[cfg(test)]
mod nearest_tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::catalog::{Event, Snapshot};
    use crate::model::{AppSpec, MachineAddr, MachineSpec};
    use crate::routing::nearest::Nearest;

    /// App `a` (hard limit 2) with machines `(id, region, state)`.
    fn app(machines: &[(&str, &str, MachineState)]) -> Arc<AppEntry> {
        let mut s = Snapshot::default();
        let spec: AppSpec = toml::from_str(
            "name = \"a\"\nhostnames = [\"a.test\"]\nconcurrency = { type = \"requests\", soft_limit = 1, hard_limit = 2 }",
        )
        .unwrap();
        s.apply(Event::App(spec));
        for (i, (id, region, state)) in machines.iter().enumerate() {
            s.apply(Event::Machine(MachineSpec {
                id: (*id).into(),
                app: "a".into(),
                region: (*region).into(),
                addr: format!("127.0.0.1:{}", 1000 + i).parse::<MachineAddr>().unwrap(),
                state: *state,
                cmd: None,
                node: None,
            }));
        }
        s.app("a").unwrap().clone()
    }

    fn steer() -> Steering {
        let table: BTreeMap<String, u32> =
            [("fra".to_string(), 9), ("iad".to_string(), 80)].into_iter().collect();
        Steering { nearest: Nearest::new("ams", &table).map(Arc::new), ..Steering::default() }
    }

    fn go(app: &AppEntry, steer: &Steering) -> (Pick, Why) {
        match decide(app, steer) {
            Decision::Go(r) => (r.pick, r.why),
            _ => panic!("a machine has room"),
        }
    }

    use MachineState::{Started, Stopped};

    #[test]
    fn new_work_goes_to_the_nearest_region_with_room_and_spills_at_the_hard_limit() {
        let a = app(&[("iad-1", "iad", Started), ("fra-1", "fra", Started), ("ams-1", "ams", Started)]);
        let s = steer();
        let (first, why) = go(&a, &s);
        assert_eq!((&*first.machine.id, why), ("ams-1", Why::Nearest), "own region, though all are idle");
        let (second, _) = go(&a, &s);
        assert_eq!(&*second.machine.id, "ams-1", "still room below the hard limit (2)");
        let (third, _) = go(&a, &s);
        assert_eq!(&*third.machine.id, "fra-1", "ams at its hard limit: the next nearest");
        let held = [go(&a, &s).0];
        let (fifth, _) = go(&a, &s);
        assert_eq!(&*fifth.machine.id, "iad-1", "fra full too: the farthest");
        drop((first, held));
        assert_eq!(&*go(&a, &s).0.machine.id, "ams-1", "room in the nearest again: back there");
        drop((second, third, fifth));
    }

    #[test]
    fn a_region_is_left_when_its_machines_fail_checks_or_are_not_started() {
        let a = app(&[("ams-1", "ams", Started), ("ams-2", "ams", Stopped), ("fra-1", "fra", Started)]);
        let s = steer();
        a.machines.iter().find(|m| &*m.id == "ams-1").unwrap().live.set_healthy(false);
        let (p, _) = go(&a, &s);
        assert_eq!(&*p.machine.id, "fra-1", "a started machine next door beats waking one here");
        a.machines.iter().find(|m| &*m.id == "ams-1").unwrap().live.set_healthy(true);
        assert_eq!(&*go(&a, &s).0.machine.id, "ams-1", "healthy again: home");
    }

    #[test]
    fn unlisted_regions_come_last_and_asking_for_a_region_wins_over_distance() {
        let a = app(&[("syd-1", "syd", Started), ("fra-1", "fra", Started)]);
        let mut s = steer();
        assert_eq!(&*go(&a, &s).0.machine.id, "fra-1");
        s.regions = Regions::Prefer(vec!["syd".into()]);
        let (p, why) = go(&a, &s);
        assert_eq!((&*p.machine.id, why), ("syd-1", Why::Region), "fly-prefer-region is the client's word");
        // Without a table, least loaded across regions, as before.
        let plain = Steering::default();
        let _busy = go(&a, &s).0;
        let (p, why) = go(&a, &plain);
        assert_eq!((&*p.machine.id, why), ("fra-1", Why::LeastLoaded));
    }
}
