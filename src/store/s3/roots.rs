//! Root records in the bucket, replaced with conditional writes where the server supports them.

#[allow(unused_imports)]
use super::*;

/// Tries a conditional put this many times before giving up on a root that keeps changing.
pub(super) const ROOT_PUT_ATTEMPTS: usize = 8;

#[async_trait]
impl RootService for S3Store {
    async fn get(&self, name: &str) -> Result<Option<RootRecord>> {
        let key = self.root_key(name)?;
        let Some(raw) = self.get_raw(&key, None).await? else {
            return Ok(None);
        };
        crate::store::decode_root(name, &raw).map(Some)
    }

    /// Replaces the version it saw (or creates the root if there was none); if another writer
    /// got in between, looks again and retries, so the put is ordered after every write it
    /// replaces. Servers that cannot do conditional puts get a plain put (last writer wins).
    async fn put(&self, root: &RootRecord) -> Result<()> {
        let key = self.root_key(&root.name)?;
        // What the root points at is committed first.
        self.flush_staged().await?;
        let body = Bytes::from(root.encode());
        for _ in 0..ROOT_PUT_ATTEMPTS {
            let mode = match self.head(&key).await? {
                Some(m) => PutMode::Update(UpdateVersion {
                    e_tag: m.e_tag,
                    version: m.version,
                }),
                None => PutMode::Create,
            };
            match self.put_raw(&key, body.clone(), mode).await? {
                Ok(_) => return Ok(()),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => continue,
                Err(object_store::Error::NotImplemented { .. })
                | Err(object_store::Error::NotSupported { .. }) => {
                    return match self.put_raw(&key, body, PutMode::Overwrite).await? {
                        Ok(_) => Ok(()),
                        Err(e) => Err(self.fail(&format!("PUT {key}"), &e)),
                    };
                }
                Err(e) => return Err(self.fail(&format!("PUT {key}"), &e)),
            }
        }
        Err(StoreError::Backend(format!(
            "{}: root {:?} kept changing under {ROOT_PUT_ATTEMPTS} conditional puts; not written",
            self.where_(),
            root.name
        )))
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .list_under("roots")
            .await?
            .into_iter()
            .filter_map(|m| m.location.filename().map(percent_decode))
            .filter(|n| validate_root_name(n).is_ok() && !n.starts_with(".tmp-"))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let key = self.root_key(name)?;
        if self.head(&key).await?.is_none() {
            return Ok(false);
        }
        self.delete_key(&key).await?;
        Ok(true)
    }
}
