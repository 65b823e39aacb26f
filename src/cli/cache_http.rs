//! `granary serve-cache`: the store as a Nix binary cache over HTTP ([`crate::views::binary_cache`]).
//! A subcommand of its own rather than a `daemon --http` flag: it speaks a different protocol
//! to different clients, with its own auth and signing options.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::store::Store;
use crate::views::binary_cache::sign::NixSigningKey;
use crate::views::binary_cache::{serve, BinaryCache, CacheOptions};

#[derive(clap::Args, Debug)]
pub struct ServeCacheArgs {
    /// HOST:PORT to serve HTTP on (port 0 picks a free one; the bound address is printed
    /// on stderr). A non-loopback address needs --token-file.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7412")]
    listen: String,
    /// Sign every narinfo served with this Nix secret key (as written by
    /// `nix-store --generate-binary-cache-key NAME SECRET PUBLIC`), beside the stored
    /// signatures.
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    /// File holding the token requests must carry, as `Authorization: Bearer TOKEN` or as the
    /// password of HTTP Basic auth (a netrc entry for Nix clients).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// With --token-file: let GET and HEAD through without the token (uploads still need it).
    #[arg(long, requires = "token_file")]
    anonymous_read: bool,
    /// Refuse uploads (`nix copy --to`).
    #[arg(long)]
    read_only: bool,
    /// Priority advertised in nix-cache-info (lower is preferred by Nix).
    #[arg(long, value_name = "N", default_value_t = 40)]
    priority: u32,
    /// Largest NAR file accepted in one upload, in bytes (suffixes K, M, G, T).
    #[arg(long, value_name = "SIZE", default_value = "64G")]
    max_upload: String,
    /// How long an uploaded NAR is held waiting for its narinfo before it is forgotten
    /// (its objects are then left to `granary gc`).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pending_ttl: String,
    /// How long SIGTERM waits for transfers in flight before exiting anyway.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    drain_timeout: String,
    /// A path the store lacks is fetched from these upstream caches, stored deduplicated
    /// and served: a deduplicating caching proxy in front of a Nix cache.
    #[command(flatten)]
    substitute: super::substitute::SubstituteArgs,
}

fn read_secret(path: &PathBuf, what: &str) -> Result<String> {
    let t = std::fs::read_to_string(path).with_context(|| format!("{what} {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("{what} {} is empty", path.display());
    }
    Ok(t)
}

pub async fn cmd_serve_cache(store: Store, args: ServeCacheArgs) -> Result<ExitCode> {
    let parse_dur = |flag: &str, v: &str| -> Result<Duration> {
        crate::units::parse_duration(v).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    let drain = parse_dur("--drain-timeout", &args.drain_timeout)?;
    let pending_ttl = parse_dur("--pending-ttl", &args.pending_ttl)?;
    let max_upload = crate::units::parse_size(&args.max_upload)
        .map_err(|e| anyhow::anyhow!("--max-upload: {e}"))?;
    let token = match &args.token_file {
        Some(f) => Some(read_secret(f, "token file")?),
        None => None,
    };
    let sign_key = match &args.sign_key {
        Some(f) => Some(
            NixSigningKey::parse(&read_secret(f, "--sign-key")?)
                .with_context(|| format!("--sign-key {}", f.display()))?,
        ),
        None => None,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("--listen {}: not HOST:PORT", args.listen))?
        .collect();
    let Some(addr) = addrs.first().copied() else {
        bail!("--listen {}: resolves to no address", args.listen);
    };
    // An open non-loopback port without a token would let the network fill the store.
    if !addr.ip().is_loopback() && token.is_none() {
        bail!("--listen {addr}: a non-loopback address needs --token-file");
    }
    let public = sign_key.as_ref().map(|k| k.public());
    let upstream = args
        .substitute
        .build(&store, crate::views::nar::store_path::DEFAULT_STORE_DIR)?;
    let cache = BinaryCache::with_upstream(
        store,
        CacheOptions {
            priority: args.priority,
            sign_key,
            token,
            anonymous_read: args.anonymous_read,
            read_only: args.read_only,
            max_upload,
            pending_ttl,
            ..CacheOptions::default()
        },
        upstream,
    );
    let roots = cache.load_index().await.context("reading the roots")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let mut stderr = std::io::stderr();
    if let Some(p) = &public {
        writeln!(stderr, "granary serve-cache: signing with {p}")?;
    }
    writeln!(
        stderr,
        "granary serve-cache: {roots} store paths; listening on http://{bound}"
    )?;
    stderr.flush()?;

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut server = tokio::spawn(serve(cache, listener, async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = &mut server => {
            match r {
                Ok(Ok(())) => bail!("server stopped"),
                Ok(Err(e)) => bail!("server stopped: {e}"),
                Err(e) => bail!("server task failed: {e}"),
            }
        }
    }
    let _ = stop_tx.send(true);
    if tokio::time::timeout(drain, &mut server).await.is_err() {
        eprintln!("granary serve-cache: transfers still in flight after {drain:?}; exiting");
        server.abort();
    }
    Ok(ExitCode::SUCCESS)
}
