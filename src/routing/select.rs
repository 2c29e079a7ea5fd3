//! Choosing a machine within an app: least requests in flight among started machines,
//! uniformly random among ties, never one at its hard limit, and not one ejected after a
//! failed connect while another is left. No I/O, no locks: one pass over the app's
//! machines.
//!
//! Both concurrency types count the same thing at the machine: exchanges tern has in flight
//! on it (a request awaiting or streaming its response, an open WebSocket). Over HTTP/1.1
//! each holds its own machine connection, so "requests" and "connections" agree; they only
//! differ for h2c machines, where tern multiplexes, and tern counts requests there too.
//!
//! An ejected machine (see [`crate::catalog::outlier`]) is still routable: it does not make
//! an app look empty, so it never sets off a wake, and when every routable machine is
//! ejected, selection goes on among all of them. That is Envoy's panic threshold, here at
//! 100%: refusing every request would turn a short fault, or a wrong ejection, into an
//! outage, and requests that go out are how a machine that is back gets seen again.

use std::cell::OnceCell;
use std::sync::Arc;

use crate::catalog::outlier::Admit;
use crate::catalog::{InFlight, Machine};
use crate::model::Concurrency;

use super::decide::Eligible;

/// A machine chosen for an exchange, already counted against its limits.
pub struct Pick {
    pub machine: Arc<Machine>,
    pub guard: InFlight,
    /// Whether the machine was already at or over its soft limit: every routable machine
    /// of the app is, so it is time to wake another.
    pub over_soft: bool,
    /// Whether this exchange is the one that tries the machine after its ejection ran out:
    /// its connect failing ejects the machine for longer.
    pub probe: bool,
}

/// The least-loaded routable machine below the hard limit, skipping `exclude`, counted in
/// flight atomically so that racing requests cannot push it past the limit.
pub fn acquire(machines: &[Arc<Machine>], exclude: &[&str], limits: &Concurrency) -> Option<Pick> {
    acquire_where(machines, &|m: &Machine| !exclude.contains(&&*m.id), limits)
}

/// Like [`acquire`], among the machines `eligible` admits.
pub fn acquire_among(
    machines: &[Arc<Machine>],
    eligible: &Eligible<'_>,
    limits: &Concurrency,
) -> Option<Pick> {
    if eligible.is_all() {
        return acquire_where(machines, &|_: &Machine| true, limits);
    }
    acquire_where(machines, &|m: &Machine| eligible.admits(m), limits)
}

fn acquire_where(
    machines: &[Arc<Machine>],
    admit: &dyn Fn(&Machine) -> bool,
    limits: &Concurrency,
) -> Option<Pick> {
    let hard = limits.hard_limit.unwrap_or(u32::MAX);
    let now = OnceCell::new();
    let now = || *now.get_or_init(crate::clock::now_ms);
    // A lost race for the last slot on a machine (or for its probe) means another look, not
    // a failure.
    for _ in 0..8 {
        let (m, panic) = least_loaded(machines, admit, hard, &now)?;
        let load = m.live.in_flight();
        if let Some(guard) = m.live.try_begin(hard) {
            // Counted first, then checked again: a machine cordoned for a stop in between
            // either sees this exchange (and stays) or is seen here as out of rotation.
            if !m.routable() {
                drop(guard);
                continue;
            }
            let clear = panic || m.live.outlier().is_clear();
            let probe = match if clear { Admit::Yes } else { m.live.outlier().admit(now()) } {
                Admit::Yes => false,
                Admit::Probe => true,
                Admit::No => {
                    drop(guard);
                    continue;
                }
            };
            return Some(Pick { machine: m.clone(), guard, over_soft: load >= limits.soft_limit, probe });
        }
    }
    None
}

/// The least-loaded started machine, skipping `exclude` (machines already tried) and
/// ejected ones while others are left. Ties are broken uniformly at random (reservoir
/// sampling), so equal machines share load evenly.
pub fn least_in_flight<'a>(machines: &'a [Arc<Machine>], exclude: &[&str]) -> Option<&'a Arc<Machine>> {
    let now = OnceCell::new();
    let admit = |m: &Machine| !exclude.contains(&&*m.id);
    least_loaded(machines, &admit, u32::MAX, &|| *now.get_or_init(crate::clock::now_ms)).map(|(m, _)| m)
}

/// The least-loaded of the machines in rotation and, when every routable machine is
/// ejected, of all of them (then `true`: a panic pick, which takes no probe).
fn least_loaded<'a>(
    machines: &'a [Arc<Machine>],
    admit: &dyn Fn(&Machine) -> bool,
    hard: u32,
    now: &dyn Fn() -> u64,
) -> Option<(&'a Arc<Machine>, bool)> {
    let mut in_rotation = Least::default();
    let mut ejected = Least::default();
    // Whether any routable machine is in rotation, at its hard limit or not: one that is
    // full means waiting for room on it, not sending requests to the ejected ones.
    let mut any_in_rotation = false;
    for m in machines {
        if !m.routable() || !admit(m) {
            continue;
        }
        let out = m.live.outlier().ejected(now);
        any_in_rotation |= !out;
        let load = m.live.in_flight();
        if load < hard {
            if out { ejected.offer(m, load) } else { in_rotation.offer(m, load) }
        }
    }
    if any_in_rotation { in_rotation.best.map(|m| (m, false)) } else { ejected.best.map(|m| (m, true)) }
}

/// The least-loaded machine offered so far, random among ties.
struct Least<'a> {
    best: Option<&'a Arc<Machine>>,
    load: u32,
    ties: u32,
}

impl Default for Least<'_> {
    fn default() -> Self {
        Least { best: None, load: u32::MAX, ties: 0 }
    }
}

impl<'a> Least<'a> {
    fn offer(&mut self, m: &'a Arc<Machine>, load: u32) {
        if load < self.load {
            self.best = Some(m);
            self.load = load;
            self.ties = 1;
        } else if load == self.load {
            self.ties += 1;
            if fastrand::u32(..self.ties) == 0 {
                self.best = Some(m);
            }
        }
    }
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
                id: format!("m{i}").into(),
                app: "a".into(),
                region: "".into(),
                addr: format!("127.0.0.1:{}", 1000 + i).parse::<MachineAddr>().unwrap(),
                state: *st,
                cmd: None,
                node: None,
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

    /// A paused tokio clock, so back-offs pass at once and exactly. The clock's zero is set
    /// first, outside the runtime: a paused clock that started before it would read 0 for a
    /// while and shift every deadline.
    fn paused() -> tokio::runtime::Runtime {
        let _ = crate::clock::now_ms();
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap()
    }

    fn pick(ms: &[Arc<Machine>], exclude: &[&str]) -> (String, bool) {
        let p = acquire(ms, exclude, &Concurrency::default()).expect("a machine");
        (p.machine.id.to_string(), p.probe)
    }

    #[test]
    fn an_ejected_machine_is_skipped_until_its_backoff_ends_then_probed_once() {
        paused().block_on(async {
            let s = snapshot(&[MachineState::Started; 2]);
            let ms = &s.app("a").unwrap().machines;
            // m1 is busy, so least-in-flight would send everything to m0, as it does to a
            // dead machine that refuses at once.
            let _busy = ms[1].live.begin();
            assert_eq!(pick(ms, &[]), ("m0".into(), false));
            ms[0].live.outlier().failed(crate::clock::now_ms(), false);
            for _ in 0..50 {
                assert_eq!(pick(ms, &[]), ("m1".into(), false), "ejected: not tried again");
            }
            tokio::time::advance(std::time::Duration::from_millis(999)).await;
            assert_eq!(pick(ms, &[]), ("m1".into(), false), "still within its back-off");
            tokio::time::advance(std::time::Duration::from_millis(1)).await;
            let probe = acquire(ms, &[], &Concurrency::default()).unwrap();
            assert_eq!((&*probe.machine.id, probe.probe), ("m0", true), "the back-off is over: one probe");
            for _ in 0..10 {
                assert_eq!(pick(ms, &[]), ("m1".into(), false), "the others wait for the probe");
            }
            // The probe connected: back in rotation for everyone.
            assert!(ms[0].live.outlier().clear());
            drop(probe);
            assert_eq!(pick(ms, &[]), ("m0".into(), false));
        });
    }

    #[test]
    fn a_failed_probe_ejects_for_twice_as_long() {
        paused().block_on(async {
            let s = snapshot(&[MachineState::Started; 2]);
            let ms = &s.app("a").unwrap().machines;
            let _busy = ms[1].live.begin();
            ms[0].live.outlier().failed(crate::clock::now_ms(), false);
            tokio::time::advance(std::time::Duration::from_secs(1)).await;
            let probe = acquire(ms, &[], &Concurrency::default()).unwrap();
            assert!(probe.probe);
            ms[0].live.outlier().failed(crate::clock::now_ms(), true);
            drop(probe);
            tokio::time::advance(std::time::Duration::from_millis(1999)).await;
            assert_eq!(pick(ms, &[]), ("m1".into(), false));
            tokio::time::advance(std::time::Duration::from_millis(1)).await;
            assert_eq!(pick(ms, &[]), ("m0".into(), true));
        });
    }

    #[test]
    fn when_every_machine_is_ejected_they_are_all_still_tried() {
        paused().block_on(async {
            let s = snapshot(&[MachineState::Started, MachineState::Stopped, MachineState::Started]);
            let ms = &s.app("a").unwrap().machines;
            let _busy = ms[2].live.begin();
            for m in ms.iter() {
                m.live.outlier().failed(crate::clock::now_ms(), false);
            }
            // Least loaded among the ejected (m2 is busy), and no probe: no back-off ran out.
            assert_eq!(pick(ms, &[]), ("m0".into(), false));
            assert_eq!(pick(ms, &["m0"]), ("m2".into(), false), "a retry tries the other, ejected or not");
            assert!(acquire(ms, &["m0", "m2"], &Concurrency::default()).is_none(), "stopped stays out");
        });
    }

    #[test]
    fn a_full_machine_in_rotation_means_waiting_for_room_not_the_ejected_one() {
        let s = snapshot(&[MachineState::Started; 2]);
        let ms = &s.app("a").unwrap().machines;
        let limits = Concurrency { soft_limit: 1, hard_limit: Some(1), ..Concurrency::default() };
        let _full = ms[1].live.begin();
        ms[0].live.outlier().failed(crate::clock::now_ms(), false);
        assert!(
            acquire(ms, &[], &limits).is_none(),
            "wait for room on m1 rather than go to a machine whose connects fail"
        );
        ms[0].live.outlier().clear();
        assert_eq!(&*acquire(ms, &[], &limits).unwrap().machine.id, "m0");
    }

    #[test]
    fn an_ejection_ends_when_the_machine_starts_again() {
        let s = snapshot(&[MachineState::Started]);
        let m = &s.app("a").unwrap().machines[0];
        m.live.outlier().failed(crate::clock::now_ms(), false);
        m.live.transition(MachineState::Stopped, 1);
        assert!(m.live.outlier().ejected(crate::clock::now_ms), "stopping changes nothing");
        m.live.transition(MachineState::Started, 1);
        assert_eq!(m.live.outlier().status(crate::clock::now_ms()).failures, 0, "started afresh");
    }
}
