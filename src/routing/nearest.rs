//! Distance from this node to each region (`[regions] rtt_ms`), for choosing where new work
//! goes: the nearest region that has a started machine with room, and, when a machine must
//! be woken, the nearest one that can be.
//!
//! Regions at the same distance form one tier and share load among them; a region the
//! table does not list is farther than every listed one. This node's own region is at
//! distance 0 unless the table says otherwise.

use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Nearest {
    rtt: BTreeMap<String, u32>,
    /// Listed regions grouped by distance, nearest first.
    tiers: Vec<Vec<String>>,
}

impl Nearest {
    /// `None` without a table: choices stay least-loaded across regions, as they were.
    pub fn new(own: &str, table: &BTreeMap<String, u32>) -> Option<Nearest> {
        if table.is_empty() {
            return None;
        }
        let mut rtt: BTreeMap<String, u32> =
            table.iter().map(|(r, d)| (r.to_ascii_lowercase(), *d)).collect();
        rtt.entry(own.to_ascii_lowercase()).or_insert(0);
        let mut by_distance: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (r, d) in &rtt {
            by_distance.entry(*d).or_default().push(r.clone());
        }
        Some(Nearest { rtt, tiers: by_distance.into_values().collect() })
    }

    /// Round-trip milliseconds to `region`; `u32::MAX` for one the table does not list.
    pub fn rtt(&self, region: &str) -> u32 {
        if let Some(d) = self.rtt.get(region) {
            return *d;
        }
        self.rtt.iter().find(|(r, _)| r.eq_ignore_ascii_case(region)).map_or(u32::MAX, |(_, d)| *d)
    }

    /// The listed regions, nearest tier first.
    pub fn tiers(&self) -> &[Vec<String>] {
        &self.tiers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_tiered_by_distance_and_unlisted_ones_come_last() {
        let table: BTreeMap<String, u32> =
            [("FRA".to_string(), 9), ("iad".to_string(), 80), ("cdg".to_string(), 9)].into_iter().collect();
        let n = Nearest::new("ams", &table).unwrap();
        assert_eq!(
            n.tiers(),
            [vec!["ams".to_string()], vec!["cdg".into(), "fra".into()], vec!["iad".into()]]
        );
        assert_eq!((n.rtt("ams"), n.rtt("fra"), n.rtt("FRA"), n.rtt("syd")), (0, 9, 9, u32::MAX));
        assert!(Nearest::new("ams", &BTreeMap::new()).is_none(), "no table: no tiers");
    }
}
