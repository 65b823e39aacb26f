//! The daemon's client: a bounded pool of connections, each opened with a handshake, reaped
//! when idle and replaced after a failure (so a restarted daemon is found again); every call
//! has a deadline covering its retries; idempotent calls retry with jittered backoff.
//! Nothing here trusts the daemon: chunks are hashed, directories validated by the caller.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

use super::wire::feature;
use super::wire::proto::{self, granary_client::GranaryClient};
use crate::model::castore::B3Digest;
use crate::model::chunking::ChunkParams;
use crate::model::chunking::MAX_CHUNK;
use crate::store::StoreError;

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(String),
    Unix(PathBuf),
}

/// Client settings, from the store URL's query (`?timeout=5s&pool=4&require=a,b`) and the
/// environment (`GRANARY_TOKEN_FILE`, `GRANARY_RPC_TIMEOUT`).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub target: Target,
    /// Deadline of one call, retries included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Most connections kept open.
    pub pool: usize,
    /// A connection unused this long is closed.
    pub idle: Duration,
    pub token: Option<String>,
    /// Features without which this client refuses to work.
    pub required: Vec<String>,
    /// Attempts of an idempotent call (the first included).
    pub attempts: u32,
}

/// Default deadline of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

use crate::units::parse_positive_duration as parse_duration;

impl ClientConfig {
    /// Parses a `grpc+tcp://host:port` or `grpc+unix:///path` URL.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let target = if let Some(hp) = base.strip_prefix("grpc+tcp://") {
            let hp = hp.trim_end_matches('/');
            if hp.is_empty() || !hp.contains(':') {
                return Err("grpc+tcp:// needs host:port".into());
            }
            Target::Tcp(hp.to_string())
        } else if let Some(p) = base.strip_prefix("grpc+unix://") {
            if !p.starts_with('/') {
                return Err(
                    "grpc+unix:// needs an absolute socket path (grpc+unix:///path)".into(),
                );
            }
            Target::Unix(PathBuf::from(p))
        } else {
            return Err("not a grpc+tcp:// or grpc+unix:// URL".into());
        };
        let mut cfg = ClientConfig {
            target,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(2),
            pool: 4,
            idle: Duration::from_secs(60),
            token: None,
            required: feature::REQUIRED.iter().map(|s| s.to_string()).collect(),
            attempts: 4,
        };
        if let Ok(t) = std::env::var("GRANARY_RPC_TIMEOUT") {
            if !t.is_empty() {
                cfg.timeout =
                    parse_duration(&t).map_err(|e| format!("GRANARY_RPC_TIMEOUT: {e}"))?;
            }
        }
        let mut token_file = std::env::var_os("GRANARY_TOKEN_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "timeout" => {
                    cfg.timeout = parse_duration(v).map_err(|e| format!("timeout: {e}"))?
                }
                "connect_timeout" => {
                    cfg.connect_timeout =
                        parse_duration(v).map_err(|e| format!("connect_timeout: {e}"))?
                }
                "pool" => {
                    cfg.pool = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| format!("pool={v:?}: want 1..=64"))?
                }
                "attempts" => {
                    cfg.attempts = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=20).contains(n))
                        .ok_or_else(|| format!("attempts={v:?}: want 1..=20"))?
                }
                "require" => cfg
                    .required
                    .extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string)),
                "token_file" => token_file = Some(PathBuf::from(v)),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        cfg.connect_timeout = cfg.connect_timeout.min(cfg.timeout);
        if let Some(f) = token_file {
            let t = std::fs::read_to_string(&f)
                .map_err(|e| format!("token file {}: {e}", f.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() {
                return Err(format!("token file {} is empty", f.display()));
            }
            cfg.token = Some(t);
        }
        Ok(cfg)
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A generated client over one connection.
pub type Api = GranaryClient<InterceptedService<Channel, BearerToken>>;

struct Conn {
    api: Api,
    generation: u64,
    last_used: Instant,
}

/// What the handshake told us.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    pub features: Vec<String>,
    pub chunking: ChunkParams,
}

struct Inner {
    cfg: ClientConfig,
    slots: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
    generation: AtomicU64,
    bearer: BearerToken,
    info: std::sync::Mutex<Option<DaemonInfo>>,
}

/// A pooled, retrying client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Why an attempt failed, and whether another attempt may help.
struct Failure {
    status: Status,
    slot: Option<(usize, u64)>,
}

fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::Internal
            | Code::ResourceExhausted
            | Code::DataLoss
            | Code::DeadlineExceeded
    )
}

/// A connection-level failure: the connection is dropped and the next call opens a new one.
fn breaks_connection(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
            | Code::DeadlineExceeded
    )
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Result<Self, String> {
        let bearer = match &cfg.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "the token holds characters a header cannot carry".to_string())?,
            ),
            None => None,
        };
        let slots = (0..cfg.pool).map(|_| Mutex::new(None)).collect();
        let inner = Arc::new(Inner {
            cfg,
            slots,
            next: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            bearer: BearerToken(bearer),
            info: std::sync::Mutex::new(None),
        });
        spawn_reaper(Arc::downgrade(&inner));
        Ok(Client { inner })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// The daemon's features and parameters, connecting if no connection was made yet.
    pub async fn info(&self) -> Result<DaemonInfo, StoreError> {
        if let Some(i) = self.cached_info() {
            return Ok(i);
        }
        self.call("handshake", true, |_api| async { Ok(()) })
            .await?;
        self.cached_info()
            .ok_or_else(|| StoreError::Backend("daemon handshake gave no information".into()))
    }

    fn cached_info(&self) -> Option<DaemonInfo> {
        self.inner.info.lock().ok().and_then(|i| i.clone())
    }

    pub fn has_feature(&self, f: &str) -> bool {
        self.cached_info()
            .is_some_and(|i| i.features.iter().any(|x| x == f))
    }

    /// Number of pool slots holding an open connection.
    pub async fn open_connections(&self) -> usize {
        let mut n = 0;
        for s in &self.inner.slots {
            if s.lock().await.is_some() {
                n += 1;
            }
        }
        n
    }

    fn describe(&self) -> String {
        match &self.inner.cfg.target {
            Target::Tcp(hp) => format!("daemon at {hp}"),
            Target::Unix(p) => format!("daemon at {}", p.display()),
        }
    }

    async fn connect(&self) -> Result<Api, Status> {
        let cfg = &self.inner.cfg;
        let unavailable = |e: tonic::transport::Error| {
            // tonic's own message is just "transport error": name the cause too.
            let mut msg = format!("cannot connect: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                let part = s.to_string();
                if !msg.contains(&part) {
                    msg.push_str(&format!(": {part}"));
                }
                src = s.source();
            }
            Status::unavailable(msg)
        };
        let channel = match &cfg.target {
            Target::Tcp(hp) => Endpoint::from_shared(format!("http://{hp}"))
                .map_err(|e| Status::invalid_argument(format!("bad address {hp:?}: {e}")))?
                .connect_timeout(cfg.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(unavailable)?,
            Target::Unix(path) => {
                let path = path.clone();
                Endpoint::from_static("http://granary.sock")
                    .connect_timeout(cfg.connect_timeout)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(&path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(s))
                        }
                    }))
                    .await
                    .map_err(unavailable)?
            }
        };
        let mut api = GranaryClient::with_interceptor(channel, self.inner.bearer.clone())
            .max_decoding_message_size(super::wire::MAX_MESSAGE)
            .max_encoding_message_size(super::wire::MAX_MESSAGE);
        // The handshake is the first call on every connection.
        let resp = api
            .handshake(proto::HandshakeRequest {
                features: feature::ALL.iter().map(|s| s.to_string()).collect(),
                required: cfg.required.clone(),
            })
            .await?
            .into_inner();
        if let Some(missing) = cfg.required.iter().find(|f| !resp.features.contains(f)) {
            return Err(Status::failed_precondition(format!(
                "daemon lacks required feature {missing:?}"
            )));
        }
        let chunking = resp
            .chunking
            .map(|c| ChunkParams {
                min: c.min,
                avg: c.avg,
                max: c.max,
            })
            .ok_or_else(|| Status::internal("handshake: daemon sent no chunking parameters"))?;
        chunking
            .validate()
            .map_err(|e| Status::internal(format!("handshake: daemon's chunking: {e}")))?;
        if let Ok(mut i) = self.inner.info.lock() {
            *i = Some(DaemonInfo {
                features: resp.features,
                chunking,
            });
        }
        Ok(api)
    }

    /// A connection from the pool, opened (with a handshake) if its slot is empty or idle.
    async fn acquire(&self) -> Result<(Api, usize, u64), Failure> {
        let n = self.inner.slots.len();
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut slot = self.inner.slots[i].lock().await;
        if let Some(c) = slot.as_mut() {
            if c.last_used.elapsed() < self.inner.cfg.idle {
                c.last_used = Instant::now();
                return Ok((c.api.clone(), i, c.generation));
            }
        }
        *slot = None;
        let api = self
            .connect()
            .await
            .map_err(|status| Failure { status, slot: None })?;
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed);
        *slot = Some(Conn {
            api: api.clone(),
            generation,
            last_used: Instant::now(),
        });
        Ok((api, i, generation))
    }

    async fn drop_conn(&self, i: usize, generation: u64) {
        let mut slot = self.inner.slots[i].lock().await;
        if slot.as_ref().is_some_and(|c| c.generation == generation) {
            *slot = None;
        }
    }

    /// Runs one call under the deadline; retries idempotent calls on transient failures.
    pub async fn call<T, F, Fut>(&self, what: &str, idempotent: bool, f: F) -> Result<T, StoreError>
    where
        F: FnMut(Api) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.call_with_timeout(what, idempotent, self.inner.cfg.timeout, f)
            .await
    }

    /// [`Client::call`] with a deadline of its own (uploads whose size sets their duration).
    pub async fn call_with_timeout<T, F, Fut>(
        &self,
        what: &str,
        idempotent: bool,
        timeout: Duration,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Api) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + timeout;
        let max = if idempotent {
            self.inner.cfg.attempts
        } else {
            1
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let used = std::sync::Mutex::new(None);
            let res = tokio::time::timeout_at(deadline, async {
                let (api, i, g) = self.acquire().await?;
                if let Ok(mut u) = used.lock() {
                    *u = Some((i, g));
                }
                f(api).await.map_err(|status| Failure {
                    status,
                    slot: Some((i, g)),
                })
            })
            .await;
            let failure = match res {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(f)) => f,
                Err(_) => {
                    // A connection that let a call run out its deadline may be stalled:
                    // the next call gets a fresh one.
                    let slot = used.lock().ok().and_then(|u| *u);
                    if let Some((i, g)) = slot {
                        self.drop_conn(i, g).await;
                    }
                    return Err(StoreError::Timeout {
                        what: format!("{what} ({})", self.describe()),
                        secs: timeout.as_secs_f64(),
                    });
                }
            };
            if breaks_connection(&failure.status) {
                if let Some((i, g)) = failure.slot {
                    self.drop_conn(i, g).await;
                }
            }
            let now = Instant::now();
            if attempt >= max || !retryable(&failure.status) || now >= deadline {
                return Err(self.error(what, failure.status));
            }
            // Jittered exponential backoff, never past the deadline.
            let base = Duration::from_millis(25u64 << attempt.min(6));
            let pause = base.mul_f64(0.5 + rand::random::<f64>());
            let pause = pause.min(deadline.saturating_duration_since(now));
            tracing::debug!(
                "{what}: attempt {attempt} failed ({}); retrying",
                failure.status
            );
            tokio::time::sleep(pause).await;
        }
    }

    fn error(&self, what: &str, s: Status) -> StoreError {
        let msg = s.message().replace('\n', " ");
        match s.code() {
            Code::NotFound => StoreError::Backend(format!("{what}: {msg}")),
            Code::DataLoss => StoreError::Backend(format!("{what}: corrupt data: {msg}")),
            Code::Unauthenticated => StoreError::Backend(format!(
                "{what}: {} refused the call: unauthenticated: {msg}",
                self.describe()
            )),
            code => StoreError::Backend(format!("{what} ({}): {code:?}: {msg}", self.describe())),
        }
    }

    /// Reads chunks by digest in one streamed call. Every chunk is reassembled from its
    /// frames, bounded by [`MAX_CHUNK`], and hashed before it is returned.
    pub async fn read_chunks(
        &self,
        digests: &[B3Digest],
    ) -> Result<Vec<Option<Bytes>>, StoreError> {
        let wanted: Vec<Bytes> = digests.iter().map(super::wire::digest_bytes).collect();
        self.call("read chunks", true, |mut api| {
            let wanted = wanted.clone();
            async move {
                let mut stream = api
                    .read_chunks(proto::ReadChunksRequest {
                        digests: wanted.clone(),
                    })
                    .await?
                    .into_inner();
                let mut out = Vec::with_capacity(wanted.len());
                let mut cur: Option<(usize, BytesMut, u64)> = None;
                let proto_err = |m: String| Status::data_loss(format!("daemon stream: {m}"));
                while let Some(frame) = stream.message().await? {
                    let idx = out.len();
                    let Some(want) = wanted.get(idx) else {
                        return Err(proto_err("more chunks than asked for".into()));
                    };
                    if frame.digest != *want {
                        return Err(proto_err("chunk out of order".into()));
                    }
                    if !frame.found {
                        if cur.is_some() {
                            return Err(proto_err("absent chunk inside a chunk".into()));
                        }
                        out.push(None);
                        continue;
                    }
                    if frame.total > MAX_CHUNK as u64 {
                        return Err(proto_err(format!("chunk of {} bytes", frame.total)));
                    }
                    let (_, buf, total) = cur.get_or_insert_with(|| {
                        (
                            idx,
                            BytesMut::with_capacity(frame.total as usize),
                            frame.total,
                        )
                    });
                    if frame.offset != buf.len() as u64 || frame.total != *total {
                        return Err(proto_err("chunk frames out of order".into()));
                    }
                    if buf.len() as u64 + frame.data.len() as u64 > *total {
                        return Err(proto_err("chunk longer than announced".into()));
                    }
                    buf.extend_from_slice(&frame.data);
                    if buf.len() as u64 == *total {
                        let Some((i, buf, _)) = cur.take() else {
                            return Err(proto_err("lost chunk state".into()));
                        };
                        let data = buf.freeze();
                        let d = B3Digest::try_from(&wanted[i][..])
                            .map_err(|e| proto_err(e.to_string()))?;
                        let actual = B3Digest::of(&data);
                        if actual != d {
                            tracing::error!("chunk {d} from the daemon hashes to {actual}");
                            return Err(Status::data_loss(format!(
                                "chunk {d} received from the daemon hashes to {actual}"
                            )));
                        }
                        out.push(Some(data));
                    }
                }
                if cur.is_some() || out.len() != wanted.len() {
                    return Err(Status::unavailable(format!(
                        "chunk stream ended early ({} of {} chunks)",
                        out.len(),
                        wanted.len()
                    )));
                }
                Ok(out)
            }
        })
        .await
    }

    /// Uploads bytes as a blob (or as exactly one chunk); returns the digest the daemon
    /// computed, which the caller compares with its own.
    pub async fn put_blob(&self, data: Bytes, single_chunk: bool) -> Result<B3Digest, StoreError> {
        // Content-addressed, so repeating it is harmless.
        self.call("put blob", true, |mut api| {
            let data = data.clone();
            async move {
                use proto::put_blob_frame::Frame;
                let mut frames = vec![proto::PutBlobFrame {
                    frame: Some(Frame::Header(proto::PutBlobHeader {
                        size: data.len() as u64,
                        single_chunk,
                    })),
                }];
                for off in (0..data.len()).step_by(super::wire::FRAME_BYTES) {
                    let end = (off + super::wire::FRAME_BYTES).min(data.len());
                    frames.push(proto::PutBlobFrame {
                        frame: Some(Frame::Data(data.slice(off..end))),
                    });
                }
                let resp = api
                    .put_blob(futures::stream::iter(frames))
                    .await?
                    .into_inner();
                B3Digest::try_from(&resp.digest[..])
                    .map_err(|e| Status::data_loss(format!("put blob: daemon answered {e}")))
            }
        })
        .await
    }
}

/// Closes connections idle past the limit, for as long as the client lives.
fn spawn_reaper(inner: Weak<Inner>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        loop {
            let period = match inner.upgrade() {
                Some(i) => (i.cfg.idle / 2).max(Duration::from_millis(100)),
                None => return,
            };
            tokio::time::sleep(period).await;
            let Some(i) = inner.upgrade() else { return };
            for s in &i.slots {
                if let Ok(mut slot) = s.try_lock() {
                    if slot
                        .as_ref()
                        .is_some_and(|c| c.last_used.elapsed() >= i.cfg.idle)
                    {
                        *slot = None;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_durations() {
        let c =
            ClientConfig::from_url("grpc+tcp://127.0.0.1:7411?timeout=250ms&pool=2&require=x,y")
                .unwrap();
        assert_eq!(c.target, Target::Tcp("127.0.0.1:7411".into()));
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.pool, 2);
        assert!(c.required.contains(&"x".to_string()) && c.required.contains(&"y".to_string()));
        let c = ClientConfig::from_url("grpc+unix:///run/g.sock").unwrap();
        assert_eq!(c.target, Target::Unix("/run/g.sock".into()));
        for bad in [
            "grpc+tcp://",
            "grpc+tcp://hostonly",
            "grpc+unix://relative",
            "grpc+tcp://h:1?pool=0",
            "grpc+tcp://h:1?what=1",
            "grpc+tcp://h:1?timeout=-3s",
            "grpc+tcp://h:1?token_file=/nonexistent/token",
        ] {
            assert!(ClientConfig::from_url(bad).is_err(), "{bad}");
        }
    }
}
