//! The response cache (the seed's Redis layer): the last answer per viewer, keyed by the
//! request's parameters and the bundle that produced it, for a time to live. A viewer's
//! new interaction invalidates their entry, so a cached answer never ignores something
//! the viewer just did. In process by default; in Redis with `USE_REDIS=true`, where
//! every host of a region shares it and it survives restarts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What makes two GET requests the same question.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    response: Value,
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
    pub fn get(&self, user: u64, key: &CacheKey) -> Option<&Value> {
        self.entries
            .get(&user)
            .filter(|entry| &entry.key == key && entry.stored.elapsed() < self.ttl)
            .map(|entry| &entry.response)
    }

    /// The viewer's last cached answer, whatever it answered, if fresh.
    pub fn latest(&self, user: u64) -> Option<&Value> {
        self.entries
            .get(&user)
            .filter(|entry| entry.stored.elapsed() < self.ttl)
            .map(|entry| &entry.response)
    }

    /// Stores an answer.
    pub fn put(&mut self, user: u64, key: CacheKey, response: Value) {
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

/// The cache the service uses.
#[derive(Debug)]
pub enum Cache {
    /// In this process.
    Local(Mutex<ResponseCache>),
    /// In Redis.
    Redis(RedisCache),
}

/// The Redis cache: one key per viewer, `edgerec:answer:<user>`, holding
/// `{"key": CacheKey, "response": ...}` as JSON with the time to live as its expiry.
#[derive(Clone)]
pub struct RedisCache {
    connection: redis::aio::MultiplexedConnection,
    ttl: Duration,
    address: String,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("address", &self.address)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    key: CacheKey,
    response: Value,
}

fn redis_key(user: u64) -> String {
    format!("edgerec:answer:{user}")
}

impl RedisCache {
    /// Connects (and checks the server answers a PING within 5 seconds).
    pub async fn connect(host: &str, port: u16, ttl: Duration) -> anyhow::Result<Self> {
        let address = format!("redis://{host}:{port}/");
        let client = redis::Client::open(address.as_str())
            .with_context(|| format!("Redis address {address}"))?;
        let mut connection = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .with_context(|| format!("no answer from Redis at {address} in 5 s"))?
        .with_context(|| format!("connecting to Redis at {address}"))?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .with_context(|| format!("PING to Redis at {address}"))?;
        anyhow::ensure!(
            pong == "PONG",
            "Redis at {address} answered PING with {pong:?}"
        );
        Ok(Self {
            connection,
            ttl,
            address,
        })
    }

    async fn load(&self, user: u64) -> redis::RedisResult<Option<Stored>> {
        let text: Option<String> = redis::cmd("GET")
            .arg(redis_key(user))
            .query_async(&mut self.connection.clone())
            .await?;
        // An entry this host cannot read (another version wrote it) is a miss.
        Ok(text.and_then(|text| serde_json::from_str(&text).ok()))
    }
}

impl Cache {
    /// The viewer's cached answer to `key`.
    pub async fn get(&self, user: u64, key: &CacheKey) -> redis::RedisResult<Option<Value>> {
        match self {
            Cache::Local(cache) => Ok(cache.lock().expect("cache lock").get(user, key).cloned()),
            Cache::Redis(redis) => Ok(redis
                .load(user)
                .await?
                .filter(|stored| &stored.key == key)
                .map(|stored| stored.response)),
        }
    }

    /// The viewer's last cached answer.
    pub async fn latest(&self, user: u64) -> redis::RedisResult<Option<Value>> {
        match self {
            Cache::Local(cache) => Ok(cache.lock().expect("cache lock").latest(user).cloned()),
            Cache::Redis(redis) => Ok(redis.load(user).await?.map(|stored| stored.response)),
        }
    }

    /// Stores an answer.
    pub async fn put(&self, user: u64, key: CacheKey, response: Value) -> redis::RedisResult<()> {
        match self {
            Cache::Local(cache) => {
                cache.lock().expect("cache lock").put(user, key, response);
                Ok(())
            }
            Cache::Redis(redis) => {
                let text = serde_json::to_string(&Stored { key, response })
                    .expect("JSON values serialize");
                redis::cmd("SET")
                    .arg(redis_key(user))
                    .arg(text)
                    .arg("PX")
                    .arg(redis.ttl.as_millis().max(1) as u64)
                    .query_async::<()>(&mut redis.connection.clone())
                    .await
            }
        }
    }

    /// Forgets the viewers' answers.
    pub async fn invalidate(&self, users: &[u64]) -> redis::RedisResult<()> {
        match self {
            Cache::Local(cache) => {
                let mut cache = cache.lock().expect("cache lock");
                for &user in users {
                    cache.invalidate(user);
                }
                Ok(())
            }
            Cache::Redis(redis) if !users.is_empty() => {
                let mut command = redis::cmd("DEL");
                for &user in users {
                    command.arg(redis_key(user));
                }
                command
                    .query_async::<()>(&mut redis.connection.clone())
                    .await
            }
            Cache::Redis(_) => Ok(()),
        }
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
