//! `granary daemon` (serve a store over gRPC) and the client commands that only make sense
//! against a daemon: importing through an ingest session, and asking for a session's status.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::model::castore::Node;
use crate::store::{IngestService, IngestStatus, Store};
use crate::units::parse_duration;
use crate::views::rpc::serve::{self, ServeConfig};

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

fn default_socket(store_url: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return Path::new(&dir).join("granary").join("daemon.sock");
    }
    if let Some(p) = store_url.strip_prefix("file://") {
        return Path::new(p).join("daemon.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir()
        .join(format!("granary-{uid}"))
        .join("daemon.sock")
}

fn read_token(f: &Option<PathBuf>) -> Result<Option<Arc<String>>> {
    let Some(f) = f else { return Ok(None) };
    let t = std::fs::read_to_string(f).with_context(|| format!("token file {}", f.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("token file {} is empty", f.display());
    }
    Ok(Some(Arc::new(t)))
}

pub async fn cmd_daemon(store: Store, args: DaemonArgs) -> Result<ExitCode> {
    let specs = if args.listen.is_empty() {
        vec![format!("unix:{}", default_socket(&store.url).display())]
    } else {
        args.listen.clone()
    };
    let mut listens = Vec::new();
    for s in &specs {
        listens.push(serve::parse_listen(s).await?);
    }
    let cfg = ServeConfig {
        listens,
        token: read_token(&args.token_file)?,
        read_only: read_token(&args.read_only_token_file)?,
        allow_unauthenticated_tcp: args.allow_unauthenticated_tcp,
        drain: parse_duration(&args.drain_timeout).map_err(anyhow::Error::msg)?,
        session_retention: parse_duration(&args.session_retention).map_err(anyhow::Error::msg)?,
        spool_dir: args.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
        max_ingest: crate::units::parse_size(&args.max_ingest)
            .map_err(|e| anyhow::anyhow!("--max-ingest: {e}"))?,
        disabled_features: args.disable_feature.clone(),
    };
    let drain = cfg.drain;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let announce = |addr: &str| eprintln!("granary daemon: listening on {addr}");
    let (counters, drained) = serve::serve(store, cfg, announce, shutdown).await?;
    if !drained {
        eprintln!(
            "granary daemon: {} calls still in flight after {drain:?}; exiting",
            counters
                .in_flight
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `granary import --store grpc+...`: each tree goes up in one ingest session.
pub async fn cmd_import_remote(
    ingest: &dyn IngestService,
    paths: &[PathBuf],
    names: Vec<Option<String>>,
    opts: crate::store::IngestOptions,
    no_wait: bool,
) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    let mut out = std::io::stdout().lock();
    for (p, name) in paths.iter().zip(names) {
        let token = ingest
            .start(p, name.as_deref(), opts)
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
