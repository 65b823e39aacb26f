//! Requests to the bucket: keys, one deadline per request, errors in one line, request counters.

#[allow(unused_imports)]
use super::*;

impl S3Store {
    pub(super) fn key(&self, rel: &str) -> Key {
        if self.loc.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.loc.prefix))
        }
    }

    pub(super) fn object_key(&self, kind: Kind, digest: &B3Digest) -> Key {
        let hex = digest.to_hex();
        self.key(&format!("{}/{}/{hex}", kind.dir(), &hex[..2]))
    }

    pub(super) fn where_(&self) -> String {
        if self.loc.prefix.is_empty() {
            format!("s3://{}", self.loc.bucket)
        } else {
            format!("s3://{}/{}", self.loc.bucket, self.loc.prefix)
        }
    }

    /// The error for a failed request: one line, naming the bucket and what was asked.
    pub(super) fn fail(&self, what: &str, e: &dyn std::fmt::Display) -> StoreError {
        let msg = one_line(e);
        if msg.contains("NoSuchBucket") {
            return StoreError::Backend(format!(
                "{}: bucket {:?} does not exist ({what})",
                self.where_(),
                self.loc.bucket
            ));
        }
        if msg.contains("InvalidAccessKeyId")
            || msg.contains("SignatureDoesNotMatch")
            || msg.contains("403 Forbidden")
        {
            return StoreError::Backend(format!(
                "{}: access denied ({what}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: {msg}",
                self.where_()
            ));
        }
        if msg.contains("error sending request") {
            return StoreError::Backend(format!(
                "{}: cannot reach endpoint {} ({what}): {msg}",
                self.where_(),
                self.loc.endpoint.as_deref().unwrap_or("(AWS default)")
            ));
        }
        StoreError::Backend(format!("{}: {what}: {msg}", self.where_()))
    }

    /// Runs one request under the store's deadline (object_store's own timeouts and retries
    /// should end it first; this is the backstop against anything that would wait forever).
    pub(super) async fn timed<T>(
        &self,
        what: impl Fn() -> String,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>> {
        let limit = self.loc.timeout + Duration::from_secs(2);
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => Ok(r),
            Err(_) => Err(StoreError::Timeout {
                what: format!("{}: {}", self.where_(), what()),
                secs: limit.as_secs_f64(),
            }),
        }
    }

    /// GETs an object (or a range of it); `Ok(None)` if absent.
    pub(super) async fn get_raw(
        &self,
        key: &Key,
        range: Option<GetRange>,
    ) -> Result<Option<Bytes>> {
        // Closed only if the store is dropped mid-request; then the GET simply goes ahead.
        let _permit = self.gets.acquire().await.ok();
        GETS.fetch_add(1, Ordering::Relaxed);
        let what = || format!("GET {key}");
        let opts = GetOptions {
            range,
            ..GetOptions::default()
        };
        let res = self
            .timed(what, async {
                let r = self.os.get_opts(key, opts).await?;
                r.bytes().await
            })
            .await?;
        match res {
            Ok(b) => {
                GET_BYTES.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.fail(&what(), &e)),
        }
    }

    /// HEADs an object: its metadata, or `None` if absent.
    pub(super) async fn head(&self, key: &Key) -> Result<Option<object_store::ObjectMeta>> {
        HEADS.fetch_add(1, Ordering::Relaxed);
        let what = || format!("HEAD {key}");
        match self.timed(what, self.os.head(key)).await? {
            Ok(m) => Ok(Some(m)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.fail(&what(), &e)),
        }
    }

    pub(super) async fn put_raw(
        &self,
        key: &Key,
        data: Bytes,
        mode: PutMode,
    ) -> Result<object_store::Result<object_store::PutResult>> {
        PUTS.fetch_add(1, Ordering::Relaxed);
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        self.timed(
            || format!("PUT {key}"),
            self.os.put_opts(key, PutPayload::from(data), opts),
        )
        .await
    }

    pub(super) async fn delete_key(&self, key: &Key) -> Result<()> {
        DELETES.fetch_add(1, Ordering::Relaxed);
        let what = || format!("DELETE {key}");
        match self.timed(what, self.os.delete(key)).await? {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.fail(&what(), &e)),
        }
    }

    /// Every object under `rel/` (listing pages are fetched in turn).
    pub(super) async fn list_under(&self, rel: &str) -> Result<Vec<object_store::ObjectMeta>> {
        LISTS.fetch_add(1, Ordering::Relaxed);
        let prefix = self.key(rel);
        let what = || format!("LIST {prefix}/");
        let res = self
            .timed(what, self.os.list(Some(&prefix)).try_collect::<Vec<_>>())
            .await?;
        res.map_err(|e| self.fail(&what(), &e))
    }
}
