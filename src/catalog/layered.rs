//! A map for the catalog: an immutable flat hash map (the base) under a small persistent map
//! of recent changes (the delta).
//!
//! Why two layers: a persistent trie alone makes every lookup walk one node per level and
//! every change copy one node per level, so both grow with the catalog (log₃₂ n levels, and
//! more of them cold in cache). A flat hash map has flat lookups but must be copied whole to
//! publish a change. Here a lookup is one probe of the delta (skipped while it is empty; it
//! is small and recently written, so it stays in cache) and one probe of the flat base; a
//! change writes only to the delta, whose size is bounded, so its cost does not depend on
//! the size of the catalog. When the delta grows past a bound, [`Layered::compacted`] folds
//! it into a new base (O(n), off the request path and off the apply path), and
//! [`Layered::rebase`] carries over whatever changed meanwhile, identified by generation.
//!
//! Cloning is O(1): the base is behind an `Arc` and the delta is persistent.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use foldhash::fast::RandomState;
use imbl::shared_ptr::DefaultSharedPtr;

type Delta<K, V> = imbl::GenericHashMap<K, Slot<V>, RandomState, DefaultSharedPtr>;

/// A delta entry: a value or a tombstone, and the generation that wrote it.
#[derive(Clone, Debug)]
struct Slot<V> {
    generation: u64,
    value: Option<V>,
}

pub struct Layered<K, V> {
    base: Arc<HashMap<K, V, RandomState>>,
    delta: Delta<K, V>,
    len: usize,
}

impl<K: Clone, V: Clone> Clone for Layered<K, V> {
    fn clone(&self) -> Self {
        Layered { base: self.base.clone(), delta: self.delta.clone(), len: self.len }
    }
}

impl<K, V> Default for Layered<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    fn default() -> Self {
        Layered { base: Arc::new(HashMap::default()), delta: Delta::default(), len: 0 }
    }
}

impl<K, V> Layered<K, V>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// A map holding exactly `base`, with nothing in its delta: a catalog built whole.
    pub fn from_base(base: Arc<HashMap<K, V, RandomState>>) -> Layered<K, V> {
        let len = base.len();
        Layered { base, delta: Delta::default(), len }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.delta.is_empty() {
            if let Some(slot) = self.delta.get(key) {
                return slot.value.as_ref();
            }
        }
        self.base.get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    pub fn insert(&mut self, key: K, value: V, generation: u64) {
        if !self.contains_key(&key) {
            self.len += 1;
        }
        self.delta.insert(key, Slot { generation, value: Some(value) });
    }

    pub fn remove<Q>(&mut self, key: &Q, generation: u64) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let old = self.get(key).cloned()?;
        let owned = match self.delta.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => self.base.get_key_value(key).map(|(k, _)| k.clone())?,
        };
        self.len -= 1;
        // Always a tombstone, even when the base lacks the key: a compaction taken before
        // this removal may hold it, and rebasing onto it must not bring it back. The next
        // compaction folds the tombstone in.
        self.delta.insert(owned, Slot { generation, value: None });
        Some(old)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries in the delta, tombstones included: what the next compaction folds in.
    pub fn delta_len(&self) -> usize {
        self.delta.len()
    }

    /// Every live entry, in no particular order. O(n): for resyncs and admin views only.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let live = self.delta.iter().filter_map(|(k, s)| s.value.as_ref().map(|v| (k, v)));
        let base = self.base.iter().filter(|(k, _)| self.delta.is_empty() || !self.delta.contains_key(*k));
        live.chain(base)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// A new base with the delta folded in. O(n); run it off the request and apply paths.
    pub fn compacted(&self) -> Arc<HashMap<K, V, RandomState>> {
        if self.delta.is_empty() {
            return self.base.clone();
        }
        let mut base: HashMap<K, V, RandomState> = (*self.base).clone();
        for (k, slot) in self.delta.iter() {
            match &slot.value {
                Some(v) => {
                    base.insert(k.clone(), v.clone());
                }
                None => {
                    base.remove(k);
                }
            }
        }
        // A hash map keeps its room after removals: without this, a catalog that once held
        // many more entries (a burst of apps, since pruned) would hold their room for good.
        if base.capacity() > 2 * base.len() + 16 {
            base.shrink_to_fit();
        }
        Arc::new(base)
    }

    /// This map on top of `base`, a compaction taken when the catalog was at generation
    /// `at`: delta entries written after `at` are kept, older ones are already in `base`.
    pub fn rebase(&self, base: Arc<HashMap<K, V, RandomState>>, at: u64) -> Layered<K, V> {
        let mut delta = Delta::default();
        for (k, slot) in self.delta.iter().filter(|(_, s)| s.generation > at) {
            delta.insert(k.clone(), slot.clone());
        }
        Layered { base, delta, len: self.len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(m: &Layered<String, u32>) -> Vec<(String, u32)> {
        let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort();
        v
    }

    /// Prints the seed of a randomised test that panics, so the failure can be replayed
    /// with `TERN_TEST_SEED=<seed>`.
    struct SeedOnPanic(u64);

    impl Drop for SeedOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("randomised test failed with seed {0}; replay: TERN_TEST_SEED={0}", self.0);
            }
        }
    }

    /// `TERN_TEST_SEED` if set, else a fresh seed (each run tries new cases).
    fn seeded() -> (fastrand::Rng, SeedOnPanic) {
        let seed = std::env::var("TERN_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        (fastrand::Rng::with_seed(seed), SeedOnPanic(seed))
    }

    #[test]
    fn behaves_like_a_map_across_compactions() {
        let (mut rng, _seed) = seeded();
        let mut m: Layered<String, u32> = Layered::default();
        let mut model = std::collections::BTreeMap::new();
        let mut generation = 0;
        for round in 0..2000u32 {
            generation += 1;
            let key = format!("k{}", rng.u32(..64));
            if rng.bool() {
                m.insert(key.clone(), round, generation);
                model.insert(key, round);
            } else {
                assert_eq!(m.remove(key.as_str(), generation), model.remove(&key));
            }
            if round % 97 == 0 {
                // A compaction taken now, while more changes arrive before it is applied.
                let taken_at = generation;
                let base = m.compacted();
                for _ in 0..5 {
                    generation += 1;
                    let key = format!("k{}", rng.u32(..64));
                    m.insert(key.clone(), round + 10_000, generation);
                    model.insert(key, round + 10_000);
                }
                m = m.rebase(base, taken_at);
                assert!(m.delta_len() <= 5);
            }
            assert_eq!(m.len(), model.len());
            for (k, v) in &model {
                assert_eq!(m.get(k.as_str()), Some(v));
            }
        }
        let want: Vec<_> = model.into_iter().collect();
        assert_eq!(contents(&m), want);
    }

    #[test]
    fn a_compaction_gives_back_the_room_of_what_was_removed() {
        let mut m: Layered<String, u32> = Layered::default();
        for i in 0..10_000 {
            m.insert(format!("k{i}"), i, 1);
        }
        m = m.rebase(m.compacted(), 1);
        for i in 1..10_000 {
            m.remove(format!("k{i}").as_str(), 2);
        }
        let base = m.compacted();
        assert_eq!(base.len(), 1);
        assert!(base.capacity() < 64, "room for {} entries kept", base.capacity());
    }

    #[test]
    fn clones_are_independent() {
        let mut a: Layered<String, u32> = Layered::default();
        a.insert("x".into(), 1, 1);
        let b = a.clone();
        a.remove("x", 2);
        a.insert("y".into(), 2, 3);
        assert_eq!(b.get("x"), Some(&1));
        assert_eq!(b.get("y"), None);
        assert_eq!(a.get("x"), None);
    }
}
