//! In-memory lookup from what a Nix client asks for to the root that answers it: store path
//! hash part -> root name (for `<hash>.narinfo`) and NAR hash -> root name (for
//! `nar/<narhash>.nar`). Clients ask for many paths a cache does not have, so a miss must be
//! cheap: the index is refreshed from the root service on a miss, at most once per
//! [`MIN_REFRESH`], and concurrent misses share one refresh.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::{Mutex, RwLock};

use crate::store::{Store, StoreError};
use crate::views::nar::store_path::parse_basename;
use crate::views::nar::NarHash;

/// Shortest time between two refreshes triggered by misses.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Root records read at once while refreshing.
const READ_AHEAD: usize = 16;

#[derive(Default)]
struct Maps {
    /// Hash part -> root name.
    by_hash: HashMap<String, String>,
    /// NAR hash -> root name.
    by_nar: HashMap<NarHash, String>,
    /// Root names already looked at (with or without Nix metadata) -> their NAR hash.
    seen: HashMap<String, Option<NarHash>>,
}

pub struct RootIndex {
    maps: RwLock<Maps>,
    /// When the last refresh started; held during a refresh so misses wait for it.
    last_refresh: Mutex<Option<Instant>>,
}

impl Default for RootIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl RootIndex {
    pub fn new() -> Self {
        Self {
            maps: RwLock::new(Maps::default()),
            last_refresh: Mutex::new(None),
        }
    }

    /// Reads every root name, and the record of each name not seen before.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let mut last = self.last_refresh.lock().await;
        self.refresh_locked(store).await?;
        *last = Some(Instant::now());
        Ok(())
    }

    async fn refresh_locked(&self, store: &Store) -> Result<(), StoreError> {
        let names = store.roots.list().await?;
        let mut found = Vec::new();
        {
            let maps = self.maps.read().await;
            for n in &names {
                if !maps.seen.contains_key(n) {
                    found.push(n.clone());
                }
            }
        }
        // Records are read a few at a time: a store with many roots starts faster.
        let fresh: Vec<(String, Option<NarHash>)> = futures::stream::iter(found)
            .map(|name| async move {
                if parse_basename(&name).is_err() {
                    return Ok((name, None));
                }
                let nar = store
                    .roots
                    .get(&name)
                    .await?
                    .and_then(|r| r.nix)
                    .and_then(|n| NarHash::try_from(&n.nar_sha256[..]).ok());
                Ok::<_, StoreError>((name, nar))
            })
            .buffer_unordered(READ_AHEAD)
            .try_collect()
            .await?;
        let mut maps = self.maps.write().await;
        let live: std::collections::HashSet<&String> = names.iter().collect();
        let gone: Vec<String> = maps
            .seen
            .keys()
            .filter(|n| !live.contains(n))
            .cloned()
            .collect();
        for n in gone {
            maps.forget(&n);
        }
        for (name, nar) in fresh {
            maps.insert(name, nar);
        }
        Ok(())
    }

    /// Records a root this server has just written.
    pub async fn insert(&self, name: &str, nar: NarHash) {
        let mut maps = self.maps.write().await;
        maps.forget(name);
        maps.insert(name.to_string(), Some(nar));
    }

    /// Drops a name whose root turned out to be gone.
    pub async fn forget(&self, name: &str) {
        self.maps.write().await.forget(name);
    }

    /// The root whose store path has this hash part, refreshing on a miss.
    pub async fn by_hash(&self, store: &Store, hash: &str) -> Result<Option<String>, StoreError> {
        if let Some(n) = self.maps.read().await.by_hash.get(hash) {
            return Ok(Some(n.clone()));
        }
        self.refresh_if_stale(store).await?;
        Ok(self.maps.read().await.by_hash.get(hash).cloned())
    }

    /// A root whose NAR has this hash, refreshing on a miss.
    pub async fn by_nar(&self, store: &Store, nar: &NarHash) -> Result<Option<String>, StoreError> {
        if let Some(n) = self.maps.read().await.by_nar.get(nar) {
            return Ok(Some(n.clone()));
        }
        self.refresh_if_stale(store).await?;
        Ok(self.maps.read().await.by_nar.get(nar).cloned())
    }

    async fn refresh_if_stale(&self, store: &Store) -> Result<(), StoreError> {
        let mut last = self.last_refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < MIN_REFRESH) {
            return Ok(());
        }
        self.refresh_locked(store).await?;
        *last = Some(Instant::now());
        Ok(())
    }

    /// Number of roots with Nix metadata indexed.
    pub async fn len(&self) -> usize {
        self.maps.read().await.by_hash.len()
    }

    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }
}

impl Maps {
    fn insert(&mut self, name: String, nar: Option<NarHash>) {
        if let Some(h) = nar {
            if let Ok((hash, _)) = parse_basename(&name) {
                self.by_hash.insert(hash.to_string(), name.clone());
                self.by_nar.insert(h, name.clone());
            }
        }
        self.seen.insert(name, nar);
    }

    fn forget(&mut self, name: &str) {
        let Some(nar) = self.seen.remove(name) else {
            return;
        };
        if let Ok((hash, _)) = parse_basename(name) {
            if self.by_hash.get(hash).is_some_and(|n| n == name) {
                self.by_hash.remove(hash);
            }
        }
        if let Some(h) = nar {
            if self.by_nar.get(&h).is_some_and(|n| n == name) {
                self.by_nar.remove(&h);
                // Another root may hold the same NAR: keep it findable.
                if let Some((other, _)) = self.seen.iter().find(|(_, v)| **v == Some(h)) {
                    let other = other.clone();
                    self.by_nar.insert(h, other);
                }
            }
        }
    }
}
