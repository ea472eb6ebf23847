//! A map split into independently locked shards, so that work on one key
//! (a channel, a user) does not wait for work on another.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Mutex, MutexGuard};

const SHARDS: usize = 16;

pub(crate) struct Shards<K, V> {
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<K, V>>]>,
}

impl<K: Hash + Eq, V> Default for Shards<K, V> {
    fn default() -> Self {
        Shards {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl<K: Hash + Eq, V> Shards<K, V> {
    /// The locked shard that holds `key`.
    pub(crate) fn lock<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, HashMap<K, V>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        lock(&self.shards[index])
    }

    /// Every shard, one at a time.
    pub(crate) fn each(&self) -> impl Iterator<Item = MutexGuard<'_, HashMap<K, V>>> {
        self.shards.iter().map(lock)
    }

    /// Entries over all shards.
    pub(crate) fn len(&self) -> usize {
        self.each().map(|s| s.len()).sum()
    }
}

/// Locks a mutex; a panic elsewhere while holding it does not make the
/// data unusable (every update here is a single map operation).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
