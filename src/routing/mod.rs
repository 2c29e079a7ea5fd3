//! Routing decides app → machine: host normalisation, selection over a catalog snapshot,
//! and reading `fly-replay` directives and remembering them. No I/O, so it can be fuzzed
//! and benchmarked directly. It reads the catalog and nothing else of the request path.

use std::sync::Arc;

use tokio::time::Instant;

use crate::catalog::{AppEntry, Catalog, Machine};

use decide::{Decision, Routed, Steering, WaitError, Wakes, Why};

pub mod decide;
pub mod host;
pub mod nearest;
pub mod replay;
pub mod replay_cache;
pub mod seal;
pub mod select;

pub use host::{HostError, normalize};

/// Routes requests over the published catalog.
pub struct Router {
    catalog: Arc<Catalog>,
    nearest: Option<Arc<nearest::Nearest>>,
}

impl Router {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Router { catalog, nearest: None }
    }

    /// Routes new work to the nearest region with room first (`[regions] rtt_ms`).
    pub fn with_nearest(mut self, nearest: Option<Arc<nearest::Nearest>>) -> Self {
        self.nearest = nearest;
        self
    }

    pub fn nearest(&self) -> Option<&Arc<nearest::Nearest>> {
        self.nearest.as_ref()
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// An app by name, as the catalog holds it now.
    pub fn app(&self, name: &str) -> Option<Arc<AppEntry>> {
        self.catalog.load().app(name).cloned()
    }

    /// The app serving `host` (already normalised), exact name first, then wildcard.
    pub fn app_for(&self, host: &str) -> Option<Arc<AppEntry>> {
        self.catalog.load().route(host).cloned()
    }

    /// The app a private listener serves on destination address `addr`.
    pub fn private_app(&self, addr: std::net::IpAddr) -> Option<Arc<AppEntry>> {
        self.catalog.load().private_app(addr).cloned()
    }

    /// An organisation by name, as the catalog holds it now.
    pub fn org(&self, name: &str) -> Option<Arc<crate::model::OrgSpec>> {
        self.catalog.load().org(name).cloned()
    }

    /// The machine for the next exchange, skipping machines already tried, counted in
    /// flight on it; `None` when no routable machine has room under its hard limit.
    pub fn pick(&self, app: &AppEntry, exclude: &[&str]) -> Option<select::Pick> {
        select::acquire(&app.machines, exclude, &app.spec.concurrency)
    }

    /// The app named `name`, as the catalog holds it now.
    pub fn app_named(&self, name: &str) -> Option<Arc<AppEntry>> {
        self.catalog.load().app(name).cloned()
    }

    /// The session keys as the catalog holds them now.
    pub fn keyring(&self) -> Arc<seal::Keyring> {
        self.catalog.load().keyring().clone()
    }

    /// A machine of `app` by id, as the catalog holds it now; never one of another app.
    pub fn machine_of(&self, app: &AppEntry, id: &str) -> Option<Arc<Machine>> {
        self.catalog.load().machine(id).filter(|m| *m.spec.app == *app.name).cloned()
    }

    /// The one routing decision: the machine that takes this request, counted in flight on
    /// it, after waiting for room or a wake (through `wakes`, if `may_wake`) until
    /// `deadline` when none can take it at once.
    pub async fn route(
        &self,
        app: &AppEntry,
        steer: &Steering,
        wakes: &dyn Wakes,
        deadline: Instant,
        may_wake: bool,
    ) -> Result<Routed, Refusal> {
        // Requests already waiting for room on this app go first: a free choice joins them
        // rather than take a slot that frees ahead of them. (Every waiter registers on every
        // machine, so the first machine tells.)
        let free = steer.pinned.is_none() && steer.preferred.is_none();
        let waiting = free && app.machines.first().is_some_and(|m| m.live.has_queued());
        let decision = if waiting {
            Decision::WaitAny { preferred_missed: steer.preferred_missing.clone() }
        } else {
            decide::decide(app, steer)
        };
        match decision {
            Decision::Go(routed) => {
                if routed.pick.over_soft && may_wake {
                    wakes.wake_spare(app);
                }
                Ok(routed)
            }
            // Only a wait is timed (a clock read): a request routed at once waited for nothing.
            Decision::WaitFor(m, why) => {
                let began = Instant::now();
                match wakes.wait_for(app, &m, deadline, may_wake).await {
                    Ok(pick) => {
                        Ok(Routed { pick, why, waited: Some(began.elapsed()), preferred_missed: None })
                    }
                    Err(e) => Err(Refusal::Wait(e, Some(m.id.clone()), began.elapsed())),
                }
            }
            Decision::WaitAny { preferred_missed } => {
                let began = Instant::now();
                match wakes.wait_any(app, steer.eligible(), deadline, may_wake).await {
                    Ok(pick) => {
                        let why = match (&steer.regions, steer.why) {
                            (decide::Regions::Force(_), Why::LeastLoaded) => Why::Region,
                            (_, why) => why,
                        };
                        Ok(Routed { pick, why, waited: Some(began.elapsed()), preferred_missed })
                    }
                    Err(e) => Err(Refusal::Wait(e, None, began.elapsed())),
                }
            }
            Decision::NoRegion => Err(Refusal::NoRegion),
        }
    }
}

/// Why no machine takes the request.
#[derive(Debug)]
pub enum Refusal {
    /// Waiting ended without room: for the pinned machine (named), or for any; and how long
    /// the request waited.
    Wait(WaitError, Option<Arc<str>>, std::time::Duration),
    /// The regions the request must go to hold no machine of the app.
    NoRegion,
}
