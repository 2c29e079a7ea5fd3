//! Choosing a machine within an app: least requests in flight among started machines,
//! uniformly random among ties, never one at its hard limit. No I/O, no locks: one pass
//! over the app's machines.
//!
//! Both concurrency types count the same thing at the machine: exchanges tern has in flight
//! on it (a request awaiting or streaming its response, an open WebSocket). Over HTTP/1.1
//! each holds its own machine connection, so "requests" and "connections" agree; they only
//! differ for h2c machines, where tern multiplexes, and tern counts requests there too.

use std::sync::Arc;

use crate::catalog::{InFlight, Machine};
use crate::model::Concurrency;

/// A machine chosen for an exchange, already counted against its limits.
pub struct Pick {
    pub machine: Arc<Machine>,
    pub guard: InFlight,
    /// Whether the machine was already at or over its soft limit: every routable machine
    /// of the app is, so it is time to wake another.
    pub over_soft: bool,
}

/// The least-loaded routable machine below the hard limit, skipping `exclude`, counted in
/// flight atomically so that racing requests cannot push it past the limit.
pub fn acquire(machines: &[Arc<Machine>], exclude: &[&str], limits: &Concurrency) -> Option<Pick> {
    let hard = limits.hard_limit.unwrap_or(u32::MAX);
    // A lost race for the last slot on a machine means another look, not a failure.
    for _ in 0..8 {
        let m = least_loaded(machines, exclude, hard)?;
        let load = m.live.in_flight();
        if let Some(guard) = m.live.try_begin(hard) {
            // Counted first, then checked again: a machine cordoned for a stop in between
            // either sees this exchange (and stays) or is seen here as out of rotation.
            if !m.routable() {
                drop(guard);
                continue;
            }
            return Some(Pick { machine: m.clone(), guard, over_soft: load >= limits.soft_limit });
        }
    }
    None
}

/// The least-loaded started machine, skipping `exclude` (machines already tried). Ties are
/// broken uniformly at random (reservoir sampling), so equal machines share load evenly.
pub fn least_in_flight<'a>(machines: &'a [Arc<Machine>], exclude: &[&str]) -> Option<&'a Arc<Machine>> {
    least_loaded(machines, exclude, u32::MAX)
}

fn least_loaded<'a>(machines: &'a [Arc<Machine>], exclude: &[&str], hard: u32) -> Option<&'a Arc<Machine>> {
    let mut best: Option<&Arc<Machine>> = None;
    let mut best_load = u32::MAX;
    let mut ties = 0u32;
    for m in machines {
        if !m.routable() || exclude.contains(&&*m.id) {
            continue;
        }
        let load = m.live.in_flight();
        if load >= hard {
            continue;
        }
        if load < best_load {
            best = Some(m);
            best_load = load;
            ties = 1;
        } else if load == best_load {
            ties += 1;
            if fastrand::u32(..ties) == 0 {
                best = Some(m);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Event, Snapshot};
    use crate::model::{AppSpec, MachineAddr, MachineSpec, MachineState};

    fn snapshot(states: &[MachineState]) -> Snapshot {
        let mut s = Snapshot::default();
        let app: AppSpec = toml::from_str("name = \"a\"\nhostnames = [\"a.test\"]").unwrap();
        s.apply(Event::App(app));
        for (i, st) in states.iter().enumerate() {
            s.apply(Event::Machine(MachineSpec {
                id: format!("m{i}"),
                app: "a".into(),
                region: String::new(),
                addr: format!("127.0.0.1:{}", 1000 + i).parse::<MachineAddr>().unwrap(),
                state: *st,
                cmd: None,
            }));
        }
        s
    }

    #[test]
    fn only_started_machines_and_least_loaded_first() {
        use MachineState::*;
        let s = snapshot(&[Stopped, Started, Started, Suspended]);
        let ms = &s.app("a").unwrap().machines;
        let _busy = ms[1].live.begin();
        for _ in 0..50 {
            assert_eq!(&*least_in_flight(ms, &[]).unwrap().id, "m2");
        }
        assert_eq!(&*least_in_flight(ms, &["m2"]).unwrap().id, "m1");
        assert!(least_in_flight(ms, &["m1", "m2"]).is_none());
    }

    #[test]
    fn hard_limit_excludes_and_soft_limit_is_reported() {
        let s = snapshot(&[MachineState::Started; 2]);
        let ms = &s.app("a").unwrap().machines;
        let limits = Concurrency { soft_limit: 1, hard_limit: Some(2), ..Concurrency::default() };
        let a = acquire(ms, &[], &limits).unwrap();
        assert!(!a.over_soft, "first exchange finds an empty machine");
        let b = acquire(ms, &[], &limits).unwrap();
        assert!(!b.over_soft, "the second goes to the other, still empty, machine");
        assert_ne!(a.machine.id, b.machine.id);
        let c = acquire(ms, &[], &limits).unwrap();
        assert!(c.over_soft, "both machines were at soft limit");
        let d = acquire(ms, &[], &limits).unwrap();
        assert!(d.over_soft);
        assert!(acquire(ms, &[], &limits).is_none(), "both at hard limit: no room");
        drop(c);
        let e = acquire(ms, &[], &limits).expect("room again once an exchange ends");
        assert_eq!(ms.iter().map(|m| m.live.in_flight()).sum::<u32>(), 4);
        drop((a, b, d, e));
        assert_eq!(ms.iter().map(|m| m.live.in_flight()).sum::<u32>(), 0);
    }

    #[test]
    fn ties_are_spread() {
        let s = snapshot(&[MachineState::Started; 4]);
        let ms = &s.app("a").unwrap().machines;
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            let m = least_in_flight(ms, &[]).unwrap();
            counts[m.id[1..].parse::<usize>().unwrap()] += 1;
        }
        // Each should get ~1000; 700 is far outside random variation (σ ≈ 27).
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }
}
