//! Guards for the servers' connections (`granary daemon`, `granary serve-cache`): a cap on
//! connections open at once, and a deadline on silence, so that clients which connect and
//! then say nothing (or trickle) cannot hold descriptors forever and starve the server of
//! them.
//!
//! A connection must send its first bytes within [`FIRST_BYTES`] and may then be silent for
//! at most [`IDLE`] (HTTP/2 keepalive pings every 30 s keep a healthy client talking).
//! Connections past the cap are closed at once, with a log line.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How long a new connection may take to send anything.
pub const FIRST_BYTES: Duration = Duration::from_secs(10);
/// How long an established connection may stay silent.
pub const IDLE: Duration = Duration::from_secs(120);

/// Connections allowed at once: half the descriptors this process may open (the rest are
/// for the store's files), at least 16.
pub fn default_cap() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    usize::try_from(soft / 2)
        .unwrap_or(usize::MAX)
        .clamp(16, 1 << 16)
}

/// Admits connections up to a cap.
#[derive(Clone)]
pub struct Gate {
    permits: Arc<Semaphore>,
    refused: Arc<AtomicU64>,
    first: Duration,
    idle: Duration,
}

impl Gate {
    pub fn new(cap: usize) -> Self {
        Self::with_timeouts(cap, FIRST_BYTES, IDLE)
    }

    pub fn with_timeouts(cap: usize, first: Duration, idle: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(cap.max(1))),
            refused: Arc::new(AtomicU64::new(0)),
            first,
            idle,
        }
    }

    /// The connection, guarded; `None` (the connection dropped, so closed) past the cap.
    pub fn admit<S>(&self, io: S, what: &str) -> Option<Guarded<S>> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Guarded::new(io, permit, self.first, self.idle)),
            Err(_) => {
                let n = self.refused.fetch_add(1, Ordering::Relaxed);
                // Once, then every 1000th: a flood must not flood the log too.
                if n % 1000 == 0 {
                    tracing::warn!(
                        "{what}: too many connections open at once; closing new ones ({} so far)",
                        n + 1
                    );
                }
                None
            }
        }
    }

    /// Connections closed for being past the cap.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A connection that fails once silent too long, holding its place under the cap.
pub struct Guarded<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
    sleep: Pin<Box<Sleep>>,
    idle: Duration,
    /// Whether the peer has sent anything: until then only its bytes count as activity
    /// (servers speak first, e.g. HTTP/2's settings frame).
    heard: bool,
}

impl<S> Guarded<S> {
    fn new(inner: S, permit: OwnedSemaphorePermit, first: Duration, idle: Duration) -> Self {
        Self {
            inner,
            _permit: permit,
            sleep: Box::pin(tokio::time::sleep(first)),
            idle,
            heard: false,
        }
    }

    fn active(&mut self) {
        let next = Instant::now() + self.idle;
        self.sleep.as_mut().reset(next);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        use std::future::Future;
        self.sleep.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connection silent too long")
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.heard = true;
                    self.active();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                // A download the peer keeps reading is activity too (an HTTP/1 client sends
                // nothing while it reads a long answer), once the peer has spoken.
                if self.heard && matches!(r, Ok(n) if n > 0) {
                    self.active();
                }
                Poll::Ready(r)
            }
            // A client that stops reading is as silent as one that stops writing.
            Poll::Pending => match self.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A TCP listener for `axum::serve` whose connections pass through a [`Gate`].
pub struct GuardedListener {
    pub inner: tokio::net::TcpListener,
    pub gate: Gate,
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((s, addr)) => {
                    if let Some(g) = self.gate.admit(s, "serve-cache") {
                        return (g, addr);
                    }
                }
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn silence_ends_a_connection_and_the_cap_holds() {
        let gate = Gate::with_timeouts(2, Duration::from_millis(200), Duration::from_millis(300));
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let (c, _c_peer) = tokio::io::duplex(64);
        let mut a = gate.admit(a, "test").unwrap();
        let b = gate.admit(b, "test").unwrap();
        assert!(gate.admit(c, "test").is_none(), "past the cap");
        assert_eq!(gate.refused(), 1);
        // Talking keeps it alive past the first deadline.
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            a_peer.write_all(b"x").await.unwrap();
            assert_eq!(a.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // Then silence: an error after the idle time.
        let t0 = Instant::now();
        let e = a.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(100));
        // A closed connection gives its place back.
        drop(b);
        let (d, _d_peer) = tokio::io::duplex(64);
        assert!(gate.admit(d, "test").is_some());
    }
}
