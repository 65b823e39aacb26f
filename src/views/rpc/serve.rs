//! Running the daemon: listeners (TCP and Unix sockets) bound and guarded, the service served
//! on each, and a drain on shutdown — a library function, so tests and tools can run a daemon
//! in-process; `granary daemon` is this plus argument parsing and signals.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tonic::transport::Server;

use super::ingest::{Limits, Sessions};
use super::server::{Auth, Counters, Daemon};
use crate::store::remote::wire::{proto::granary_server::GranaryServer, MAX_MESSAGE};
use crate::store::Store;
use crate::views::net_guard::{default_cap, Gate};

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// How the daemon runs; see `granary daemon --help`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listens: Vec<Listen>,
    /// The token that may do everything (TCP callers must present a token).
    pub token: Option<Arc<String>>,
    /// A token that may only read.
    pub read_only: Option<Arc<String>>,
    /// Serve loopback TCP without a token.
    pub allow_unauthenticated_tcp: bool,
    /// How long shutdown waits for calls and ingest sessions in flight.
    pub drain: Duration,
    /// How long a finished ingest session's outcome stays queryable.
    pub session_retention: Duration,
    pub spool_dir: PathBuf,
    pub max_ingest: u64,
    /// Protocol features not offered (testing clients against older daemons).
    pub disabled_features: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server stopped: {0}")]
    Stopped(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// `HOST:PORT` for TCP, `unix:/PATH` or an absolute path for a Unix socket.
pub async fn parse_listen(spec: &str) -> Result<Listen, ServeError> {
    if let Some(p) = spec.strip_prefix("unix:") {
        return Ok(Listen::Unix(PathBuf::from(p)));
    }
    if spec.starts_with('/') {
        return Ok(Listen::Unix(PathBuf::from(spec)));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(spec)
        .await
        .map_err(|e| {
            ServeError::Config(format!(
                "--listen {spec}: not HOST:PORT or unix:/PATH ({e})"
            ))
        })?
        .collect();
    addrs
        .first()
        .map(|a| Listen::Tcp(*a))
        .ok_or_else(|| ServeError::Config(format!("--listen {spec}: resolves to no address")))
}

/// Binds a Unix socket, replacing a stale socket file but never a live daemon's. The socket
/// is owner-only (0600), and a directory created for it is too (0700).
async fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(format!("creating {}", dir.display())))?;
        }
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::Config(format!(
                "{}: another daemon is listening there",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(io(format!("removing stale socket {}", path.display())))?;
    }
    // Created without group/other access from the start (no window before the chmod).
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let lis = bound.map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {}", path.display())))?;
    Ok(lis)
}

/// Socket files this daemon created, removed however it exits.
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Checks a configuration before anything is bound: an open port without a token is the whole
/// store readable and writable by the network, or by every user and sandbox of this machine.
pub fn check(cfg: &ServeConfig) -> Result<(), ServeError> {
    if cfg.token.is_some() && cfg.token == cfg.read_only {
        return Err(ServeError::Config(
            "--token-file and --read-only-token-file hold the same token".into(),
        ));
    }
    for l in &cfg.listens {
        if let Listen::Tcp(a) = l {
            if cfg.token.is_none() && cfg.read_only.is_none() {
                if !a.ip().is_loopback() {
                    return Err(ServeError::Config(format!(
                        "--listen {a}: a non-loopback address needs --token-file"
                    )));
                }
                if !cfg.allow_unauthenticated_tcp {
                    return Err(ServeError::Config(format!(
                        "--listen {a}: TCP needs --token-file (every local user and sandbox can \
                         reach loopback); --allow-unauthenticated-tcp serves it without one"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Serves `store` as `cfg` says until `shutdown` completes, then drains (calls and ingest
/// sessions in flight get at most `cfg.drain`). `on_listening` is told each bound address
/// (`127.0.0.1:7411`, `unix:/path`) once it accepts connections. Returns the counters and
/// whether the drain finished in time.
pub async fn serve(
    store: Store,
    cfg: ServeConfig,
    mut on_listening: impl FnMut(&str),
    shutdown: impl Future<Output = ()>,
) -> Result<(Arc<Counters>, bool), ServeError> {
    check(&cfg)?;
    let sessions = Sessions::new(
        cfg.session_retention,
        cfg.spool_dir.clone(),
        Limits {
            max_bytes: cfg.max_ingest,
            ..Limits::default()
        },
    );
    sessions.spawn_gc();
    let daemon = Daemon::new(store, &cfg.disabled_features, sessions.clone());
    let counters = daemon.counters();
    // TCP callers prove who they are with a token; Unix callers got past the socket's
    // permissions (a read-only token still limits them if they present one).
    let tcp_auth = Auth {
        token: cfg.token.clone(),
        read_only: cfg.read_only.clone(),
        required: !(cfg.token.is_none()
            && cfg.read_only.is_none()
            && cfg.allow_unauthenticated_tcp),
    };
    let unix_auth = Auth {
        token: cfg.token.clone(),
        read_only: cfg.read_only.clone(),
        required: false,
    };
    // Connections open at once, and how long they may be silent: one gate for TCP, one for
    // Unix sockets, so a flood over the network cannot lock out the socket's owner.
    let tcp_gate = Gate::new(default_cap() / 2);
    let unix_gate = Gate::new(default_cap() / 2);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let mut sockets = SocketFiles(Vec::new());
    for l in cfg.listens.clone() {
        let auth = match l {
            Listen::Tcp(_) => tcp_auth.clone(),
            Listen::Unix(_) => unix_auth.clone(),
        };
        let svc = tonic::service::interceptor::InterceptedService::new(
            GranaryServer::new(daemon.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            auth,
        );
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        let counters = counters.clone();
        match l {
            Listen::Tcp(addr) => {
                let lis = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(io(format!("binding {addr}")))?;
                let bound = lis.local_addr().map_err(io("reading the bound address"))?;
                let gate = tcp_gate.clone();
                let incoming =
                    tokio_stream::wrappers::TcpListenerStream::new(lis).filter_map(move |s| {
                        let s = s.inspect(|s| {
                            let _ = s.set_nodelay(true);
                            counters.connections.fetch_add(1, Ordering::Relaxed);
                        });
                        futures::future::ready(match s {
                            Ok(s) => gate.admit(s, "daemon").map(Ok),
                            Err(e) => Some(Err(e)),
                        })
                    });
                servers.spawn(async move {
                    builder
                        .add_service(svc)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                });
                on_listening(&bound.to_string());
            }
            Listen::Unix(path) => {
                let lis = bind_unix(&path).await?;
                sockets.0.push(path.clone());
                let gate = unix_gate.clone();
                let incoming =
                    tokio_stream::wrappers::UnixListenerStream::new(lis).filter_map(move |s| {
                        let s = s.inspect(|_| {
                            counters.connections.fetch_add(1, Ordering::Relaxed);
                        });
                        futures::future::ready(match s {
                            Ok(s) => gate.admit(s, "daemon").map(Ok),
                            Err(e) => Some(Err(e)),
                        })
                    });
                servers.spawn(async move {
                    builder
                        .add_service(svc)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                });
                on_listening(&format!("unix:{}", path.display()));
            }
        }
    }
    let failed = tokio::select! {
        _ = shutdown => None,
        r = servers.join_next() => Some(r),
    };
    if let Some(r) = failed {
        return Err(ServeError::Stopped(match r {
            Some(Ok(Err(e))) => e.to_string(),
            Some(Err(e)) => format!("task failed: {e}"),
            _ => "no listener left".into(),
        }));
    }
    // Stop accepting, let calls in flight finish, but not for longer than the drain time.
    let _ = stop_tx.send(true);
    // Ingest sessions already accepted are finished too, within the same bound.
    let drained = tokio::time::timeout(cfg.drain, async {
        while servers.join_next().await.is_some() {}
        while sessions.counts().running > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok();
    drop(sockets);
    if !drained {
        servers.abort_all();
    }
    Ok((counters, drained))
}
