//! The response cache (the seed's Redis layer, in process): the last answer per viewer,
//! keyed by the request's parameters and the bundle that produced it, for a time to live.
//! A viewer's new interaction invalidates their entry, so a cached answer never ignores
//! something the viewer just did.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What makes two GET requests the same question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// How many results.
    pub n: u32,
    /// Whether watched videos were left out (`None`: the bundle's rule).
    pub exclude_watched: Option<bool>,
    /// sha256 of the bundle that answered.
    pub bundle: String,
}

#[derive(Debug, Clone)]
struct Entry {
    key: CacheKey,
    response: serde_json::Value,
    stored: Instant,
}

/// The cache.
#[derive(Debug)]
pub struct ResponseCache {
    entries: HashMap<u64, Entry>,
    ttl: Duration,
    capacity: usize,
}

impl ResponseCache {
    /// Entries live `ttl`; at most `capacity` viewers are kept (the oldest entry goes).
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            ttl,
            capacity: capacity.max(1),
        }
    }

    /// The viewer's cached answer to `key`, if fresh.
    pub fn get(&self, user: u64, key: &CacheKey) -> Option<&serde_json::Value> {
        self.entries
            .get(&user)
            .filter(|entry| &entry.key == key && entry.stored.elapsed() < self.ttl)
            .map(|entry| &entry.response)
    }

    /// The viewer's last cached answer, whatever it answered, if fresh.
    pub fn latest(&self, user: u64) -> Option<&serde_json::Value> {
        self.entries
            .get(&user)
            .filter(|entry| entry.stored.elapsed() < self.ttl)
            .map(|entry| &entry.response)
    }

    /// Stores an answer.
    pub fn put(&mut self, user: u64, key: CacheKey, response: serde_json::Value) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&user) {
            let ttl = self.ttl;
            self.entries.retain(|_, entry| entry.stored.elapsed() < ttl);
            if self.entries.len() >= self.capacity {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, entry)| entry.stored)
                    .map(|(&user, _)| user);
                if let Some(oldest) = oldest {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(
            user,
            Entry {
                key,
                response,
                stored: Instant::now(),
            },
        );
    }

    /// Forgets the viewer's answer.
    pub fn invalidate(&mut self, user: u64) {
        self.entries.remove(&user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> CacheKey {
        CacheKey {
            n,
            exclude_watched: None,
            bundle: "b".into(),
        }
    }

    #[test]
    fn hits_only_the_same_question_until_invalidated() {
        let mut cache = ResponseCache::new(Duration::from_secs(60), 10);
        cache.put(1, key(5), serde_json::json!({"a": 1}));
        assert!(cache.get(1, &key(5)).is_some());
        assert!(cache.get(1, &key(6)).is_none());
        assert!(cache.get(2, &key(5)).is_none());
        assert!(cache.latest(1).is_some());
        cache.invalidate(1);
        assert!(cache.get(1, &key(5)).is_none());
    }

    #[test]
    fn expires_and_stays_bounded() {
        let mut cache = ResponseCache::new(Duration::ZERO, 10);
        cache.put(1, key(5), serde_json::json!(1));
        assert!(cache.get(1, &key(5)).is_none());
        let mut cache = ResponseCache::new(Duration::from_secs(60), 2);
        for user in 0..5 {
            cache.put(user, key(5), serde_json::json!(user));
        }
        assert_eq!(cache.entries.len(), 2);
        assert!(cache.get(4, &key(5)).is_some());
    }
}
