//! Choosing a machine within an app: least requests in flight among started machines,
//! uniformly random among ties. No I/O, no locks: one pass over the app's machines.

use std::sync::Arc;

use crate::catalog::Machine;

/// The least-loaded started machine, skipping `exclude` (machines already tried). Ties are
/// broken uniformly at random (reservoir sampling), so equal machines share load evenly.
pub fn least_in_flight<'a>(machines: &'a [Arc<Machine>], exclude: &[&str]) -> Option<&'a Arc<Machine>> {
    let mut best: Option<&Arc<Machine>> = None;
    let mut best_load = u32::MAX;
    let mut ties = 0u32;
    for m in machines {
        if !m.routable() || exclude.contains(&&*m.id) {
            continue;
        }
        let load = m.live.in_flight();
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
