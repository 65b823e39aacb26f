//! `granary daemon` (serve a store over gRPC) and the client commands that only make sense
//! against a daemon: importing through an ingest session, and asking for a session's status.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use tonic::transport::Server;

use crate::model::castore::Node;
use crate::store::remote::wire::proto::granary_server::GranaryServer;
use crate::store::{IngestService, IngestStatus, Store};
use crate::units::parse_duration;
use crate::views::rpc::ingest::{Limits, Sessions};
use crate::views::rpc::server::{Auth, Daemon};

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// Address to serve on: HOST:PORT for TCP, or unix:/PATH (or an absolute path) for a Unix
    /// socket. Repeatable. Default: only a Unix socket in $XDG_RUNTIME_DIR/granary (else the
    /// store directory), which only this user (and root) may connect to.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// File holding the bearer token TCP calls must carry (any TCP listener, loopback
    /// included, needs a token: every local user and sandbox can reach loopback). Clients read
    /// it from GRANARY_TOKEN_FILE or `?token_file=` in the URL. Unix sockets are guarded by
    /// their file permissions instead.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// File holding a second token that may only read: with it, calls that write or delete
    /// (put, ingest, rm, gc) are refused.
    #[arg(long, value_name = "FILE")]
    read_only_token_file: Option<PathBuf>,
    /// Serve TCP listeners on loopback without a token (anyone on this machine, sandboxes
    /// included, can then change the store).
    #[arg(long)]
    allow_unauthenticated_tcp: bool,
    /// How long SIGTERM waits for calls in flight before exiting anyway.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    drain_timeout: String,
    /// How long a finished ingest session's outcome stays queryable.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    session_retention: String,
    /// Directory where ingest uploads are spooled while they are imported (default: temp dir).
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Largest ingest upload, in bytes (suffixes K, M, G, T).
    #[arg(long, value_name = "SIZE", default_value = "64G")]
    max_ingest: String,
    /// Do not offer a protocol feature (for testing clients against older daemons).
    #[arg(long, value_name = "FEATURE", hide = true)]
    disable_feature: Vec<String>,
}

enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

fn default_socket(store_url: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return Path::new(&dir).join("granary").join("daemon.sock");
    }
    if let Some(p) = store_url.strip_prefix("file://") {
        return Path::new(p).join("daemon.sock");
    }
    std::env::temp_dir()
        .join(format!("granary-{}", current_uid()))
        .join("daemon.sock")
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

async fn parse_listen(spec: &str) -> Result<Vec<Listen>> {
    if let Some(p) = spec.strip_prefix("unix:") {
        return Ok(vec![Listen::Unix(PathBuf::from(p))]);
    }
    if spec.starts_with('/') {
        return Ok(vec![Listen::Unix(PathBuf::from(spec))]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(spec)
        .await
        .with_context(|| format!("--listen {spec}: not HOST:PORT or unix:/PATH"))?
        .collect();
    match addrs.first() {
        Some(a) => Ok(vec![Listen::Tcp(*a)]),
        None => bail!("--listen {spec}: resolves to no address"),
    }
}

/// Binds a Unix socket, replacing a stale socket file but never a live daemon's. The socket
/// is owner-only (0600), and a directory created for it is too (0700).
async fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("{}: another daemon is listening there", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    // Created without group/other access from the start (no window before the chmod).
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let lis = bound.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
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

pub async fn cmd_daemon(store: Store, args: DaemonArgs) -> Result<ExitCode> {
    let drain = parse_duration(&args.drain_timeout).map_err(anyhow::Error::msg)?;
    let retention = parse_duration(&args.session_retention).map_err(anyhow::Error::msg)?;
    let max_bytes: u64 = crate::units::parse_size(&args.max_ingest)
        .map_err(|e| anyhow::anyhow!("--max-ingest: {e}"))?;
    let read_token = |f: &Option<PathBuf>| -> Result<Option<Arc<String>>> {
        let Some(f) = f else { return Ok(None) };
        let t =
            std::fs::read_to_string(f).with_context(|| format!("token file {}", f.display()))?;
        let t = t.trim().to_string();
        if t.is_empty() {
            bail!("token file {} is empty", f.display());
        }
        Ok(Some(Arc::new(t)))
    };
    let token = read_token(&args.token_file)?;
    let read_only = read_token(&args.read_only_token_file)?;
    if token.is_some() && token == read_only {
        bail!("--token-file and --read-only-token-file hold the same token");
    }
    let specs = if args.listen.is_empty() {
        vec![format!("unix:{}", default_socket(&store.url).display())]
    } else {
        args.listen.clone()
    };
    let mut listens = Vec::new();
    for s in &specs {
        listens.extend(parse_listen(s).await?);
    }
    // Refuse before binding anything: an open port without a token is the whole store
    // readable and writable by the network, or by every user and sandbox of this machine.
    for l in &listens {
        if let Listen::Tcp(a) = l {
            if token.is_none() && read_only.is_none() {
                if !a.ip().is_loopback() {
                    bail!("--listen {a}: a non-loopback address needs --token-file");
                }
                if !args.allow_unauthenticated_tcp {
                    bail!(
                        "--listen {a}: TCP needs --token-file (every local user and sandbox can \
                         reach loopback); --allow-unauthenticated-tcp serves it without one"
                    );
                }
            }
        }
    }
    let spool_dir = args.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    let sessions = Sessions::new(
        retention,
        spool_dir,
        Limits {
            max_bytes,
            ..Limits::default()
        },
    );
    sessions.spawn_gc();
    let daemon = Daemon::new(store, &args.disable_feature, sessions.clone());
    let counters = daemon.counters();
    // TCP callers prove who they are with a token; Unix callers got past the socket's
    // permissions (a read-only token still limits them if they present one).
    let tcp_auth = Auth {
        token: token.clone(),
        read_only: read_only.clone(),
        required: !(token.is_none() && read_only.is_none() && args.allow_unauthenticated_tcp),
    };
    let unix_auth = Auth {
        token,
        read_only,
        required: false,
    };
    // Connections open at once, and how long they may be silent: one gate for TCP, one for
    // Unix sockets, so a flood over the network cannot lock out the socket's owner.
    let tcp_gate = crate::views::net_guard::Gate::new(crate::views::net_guard::default_cap() / 2);
    let unix_gate = crate::views::net_guard::Gate::new(crate::views::net_guard::default_cap() / 2);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let mut sockets = SocketFiles(Vec::new());
    let mut stderr = std::io::stderr();
    for l in listens {
        let auth = match l {
            Listen::Tcp(_) => tcp_auth.clone(),
            Listen::Unix(_) => unix_auth.clone(),
        };
        let svc = tonic::service::interceptor::InterceptedService::new(
            GranaryServer::new(daemon.clone())
                .max_decoding_message_size(crate::store::remote::wire::MAX_MESSAGE)
                .max_encoding_message_size(crate::store::remote::wire::MAX_MESSAGE),
            auth,
        );
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let builder = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        let counters = counters.clone();
        match l {
            Listen::Tcp(addr) => {
                let lis = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                let bound = lis.local_addr()?;
                writeln!(stderr, "granary daemon: listening on {bound}")?;
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
                let mut b = builder;
                servers.spawn(async move {
                    b.add_service(svc)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                });
            }
            Listen::Unix(path) => {
                let lis = bind_unix(&path).await?;
                writeln!(
                    stderr,
                    "granary daemon: listening on unix:{}",
                    path.display()
                )?;
                sockets.0.push(path);
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
                let mut b = builder;
                servers.spawn(async move {
                    b.add_service(svc)
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                });
            }
        }
    }
    stderr.flush()?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let failed = tokio::select! {
        _ = term.recv() => None,
        _ = int.recv() => None,
        r = servers.join_next() => Some(r),
    };
    if let Some(r) = failed {
        match r {
            Some(Ok(Err(e))) => bail!("server stopped: {e}"),
            Some(Err(e)) => bail!("server task failed: {e}"),
            _ => bail!("server stopped"),
        }
    }
    // Stop accepting, let calls in flight finish, but not for longer than the drain time.
    let _ = stop_tx.send(true);
    // Ingest sessions already accepted are finished too, within the same bound.
    let drained = tokio::time::timeout(drain, async {
        while servers.join_next().await.is_some() {}
        while sessions.counts().running > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(sockets);
    if drained.is_err() {
        eprintln!(
            "granary daemon: {} calls still in flight after {:?}; exiting",
            counters.in_flight.load(Ordering::Relaxed),
            drain
        );
        servers.abort_all();
    }
    Ok(ExitCode::SUCCESS)
}

/// `granary import --store grpc+...`: each tree goes up in one ingest session.
pub async fn cmd_import_remote(
    ingest: &dyn IngestService,
    paths: &[PathBuf],
    names: Vec<Option<String>>,
    skip_special: bool,
    no_wait: bool,
) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    let mut out = std::io::stdout().lock();
    for (p, name) in paths.iter().zip(names) {
        let token = ingest
            .start(p, name.as_deref(), skip_special)
            .await
            .with_context(|| format!("uploading {}", p.display()))?;
        if no_wait {
            writeln!(out, "{token}\t{}", p.display())?;
            out.flush()?;
            continue;
        }
        let shown = p.display().to_string();
        let node = ingest
            .wait(&token, &|done, total| {
                if tty {
                    eprint!("\rimporting {shown}: {done}/{total} bytes");
                }
            })
            .await
            .with_context(|| format!("importing {}", p.display()))?;
        if tty {
            eprintln!();
        }
        writeln!(out, "{}\t{}", show_node(&node), p.display())?;
        out.flush()?;
    }
    Ok(ExitCode::SUCCESS)
}

fn show_node(node: &Node) -> String {
    match node {
        Node::Directory { digest, .. } | Node::File { digest, .. } => digest.to_hex(),
        Node::Symlink { target } => format!("symlink -> {}", String::from_utf8_lossy(target)),
    }
}

/// `granary ingest-status TOKEN`.
pub async fn cmd_ingest_status(store: &Store, token: &str) -> Result<ExitCode> {
    let Some(ingest) = &store.ingest else {
        bail!("ingest sessions need a daemon store (grpc+tcp:// or grpc+unix://)");
    };
    let st = ingest.status(token).await?;
    let mut out = std::io::stdout().lock();
    match st {
        IngestStatus::Running {
            bytes_done,
            bytes_total,
        } => writeln!(out, "running {bytes_done}/{bytes_total}")?,
        IngestStatus::Done(node) => writeln!(out, "done {}", show_node(&node))?,
        IngestStatus::Failed(reason) => {
            writeln!(out, "failed {reason}")?;
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}
