//! The `granary` command line: parses arguments, then calls one library function per
//! subcommand. Errors are printed as one line naming the thing and the reason.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::model::castore::{validate_root_name, Node};
use crate::store::{self, Store};
use crate::trees;
use crate::trees::import::{self, ImportOptions, Progress};

mod cache;
mod cache_http;
mod daemon;
mod dedup;
mod maintain;
mod mount;
mod nar;
mod progress;
mod sandbox;
mod substitute;
mod trace;

pub(crate) use progress::{spawn_bar, spawn_progress, spawn_steps};

#[derive(Parser, Debug)]
#[command(
    name = "granary",
    version,
    about = "A content-addressed, chunk-deduplicating store for file trees, and a read-only FUSE view of it",
    long_about = "A content-addressed, chunk-deduplicating store for file trees, and a read-only FUSE view of it.\n\n\
        Every file is cut into content-defined chunks (FastCDC, BLAKE3-addressed) stored once however many trees \
        share them. ROOT arguments are a root name (see `granary roots`) or a directory/blob digest (hex or \
        blake3-<base64>). Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
pub struct Cli {
    /// Store URL: file:///path, memory://, s3://BUCKET[/PREFIX]?endpoint=URL&region=R
    /// [&allow_http=true][&timeout=30s] (credentials from AWS_* variables),
    /// grpc+tcp://HOST:PORT or grpc+unix:///SOCKET
    /// (daemon URLs take ?timeout=5s&pool=4&token_file=PATH). Default: $GRANARY_STORE, else
    /// $XDG_DATA_HOME/granary, else ~/.local/share/granary.
    #[arg(long, global = true, value_name = "URL")]
    store: Option<String>,

    /// Keep a persistent disk cache of chunks, directories and blob layouts read from the
    /// store in DIR (for remote stores: s3://, grpc+...). Shared safely by several processes.
    #[arg(long, global = true, value_name = "DIR", env = "GRANARY_CACHE_DIR")]
    cache_dir: Option<PathBuf>,

    /// Size limit of the disk cache (e.g. 512M, 10G); least recently used entries go first.
    #[arg(long, global = true, value_name = "BYTES", default_value = "10G",
          value_parser = crate::units::parse_size::<u64>)]
    cache_max: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Import file trees; prints each tree's digest. With --name, records a named root.
    Import {
        /// Directories, files or symlinks to import.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Record the (single) imported tree as a root of this name.
        #[arg(long)]
        name: Option<String>,
        /// Name each imported tree after its basename.
        #[arg(long, conflicts_with = "name")]
        named: bool,
        /// Skip devices, fifos and sockets with a warning instead of failing.
        #[arg(long)]
        skip_special: bool,
        /// Files imported at once (default: twice the number of cores).
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// With a daemon store: print each upload's ingest session token and exit without
        /// waiting for the import to finish (see `granary ingest-status`).
        #[arg(long)]
        no_wait: bool,
        /// Record no modification times: the tree then shows mtime 1 in mounts and exports,
        /// as a Nix store path does. By default each entry's mtime (to the nanosecond) is
        /// kept in a table beside the tree; digests and dedup are the same either way.
        #[arg(long)]
        no_times: bool,
    },
    /// Serve the store over gRPC to other granary clients (grpc+tcp:// and grpc+unix:// URLs).
    Daemon(daemon::DaemonArgs),
    /// Serve the store as a Nix binary cache over HTTP (for `nix copy`, substituters).
    ServeCache(cache_http::ServeCacheArgs),
    /// Show an ingest session of a daemon store: running, done (with the root) or failed.
    IngestStatus { token: String },
    /// List the named roots.
    Roots,
    /// List a directory: ROOT[/PATH].
    Ls {
        path: String,
        /// Show type, mode, size and digest.
        #[arg(short, long)]
        long: bool,
    },
    /// Print a file's content: ROOT/PATH.
    Cat { path: String },
    /// Materialise a tree (ROOT[/PATH]) at DEST, which must not exist.
    Export { path: String, dest: PathBuf },
    /// Show what the store holds: objects, logical bytes, unique bytes, bytes stored.
    Info {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also report unique chunks, chunk sizes and metadata bytes as `granary dedup`
        /// does for the `store` strategy (walks every root's metadata).
        #[arg(long)]
        dedup: bool,
    },
    /// Remove named roots (their objects stay until `granary gc`).
    Rm {
        #[arg(required = true)]
        roots: Vec<String>,
    },
    /// Delete objects no root reaches. Safe while imports run, if none runs longer than --grace.
    ///
    /// A local store rewrites the packs holding garbage at once. On s3:// a gc copies the live
    /// objects of packs that are at least a quarter garbage into new packs (and moves a store
    /// from before packs into packs), and the first gc a grace period later deletes the old
    /// packs, after keeping anything imports reused meanwhile: when nothing imports,
    /// `gc --grace 0s` twice frees the space at once.
    Gc {
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Never delete objects written or reused more recently than this (e.g. 30m, 1h, 2d).
        #[arg(long, default_value = "1h", value_parser = crate::units::parse_duration)]
        grace: Duration,
    },
    /// Rewrite a local store's packs: small objects compressed together in groups, and with
    /// --level everything compressed again at that zstd level.
    ///
    /// Imports compress at the store's fast level; a repack at a higher one later (e.g.
    /// --level 9) stores fewer bytes for the same objects. A store written without groups
    /// (format 2) is switched to them (format 3: granary versions before groups then refuse
    /// it). Every object is verified on the way; copies are durable before an original goes;
    /// mounts and imports may run meanwhile. Needs free space for one copy of the packs.
    Repack {
        /// zstd level to compress everything again at (1..=22; default: chunks stored alone
        /// are kept as they are, and groups are formed anew at the store's level).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=22))]
        level: Option<i32>,
    },
    /// Check every object (or the named roots' closures); exit non-zero on any problem.
    Verify {
        /// Roots to check (default: every root and every stored object).
        roots: Vec<String>,
        /// Replace damaged or missing objects with verified copies from this store.
        #[arg(long, value_name = "URL")]
        repair_from: Option<String>,
    },
    /// Mount the store read-only at MOUNTPOINT (its named roots, or one tree with --root);
    /// serves until SIGINT/SIGTERM, which unmount cleanly.
    Mount(mount::MountArgs),
    /// Import a NAR (FILE, or - for stdin) as the root named by a store path basename, with
    /// its NAR size and sha256. Prints NAME, NAR size, sha256:<nix32> and the SRI hash.
    ImportNar {
        /// The NAR file, or - to read stdin.
        file: String,
        /// Store path basename to record the root as: <32 nix-base32 chars>-<name>.
        #[arg(long, value_name = "STOREPATH_BASENAME")]
        name: String,
        /// Store paths this one refers to (basenames or /nix/store/... paths).
        #[arg(long, num_args = 1.., value_name = "STOREPATH")]
        references: Vec<String>,
        /// The derivation that built it (basename or full path).
        #[arg(long, value_name = "STOREPATH")]
        deriver: Option<String>,
        /// A signature (`keyname:base64`), repeatable.
        #[arg(long = "sig", value_name = "SIG")]
        signatures: Vec<String>,
        /// Content address, as Nix writes it (e.g. fixed:r:sha256:...).
        #[arg(long)]
        ca: Option<String>,
        /// Refuse the NAR unless its sha256 is this (nix32, hex, base64 or SRI).
        #[arg(long, value_name = "HASH")]
        nar_hash: Option<String>,
    },
    /// Write ROOT as a NAR (byte-identical to `nix-store --dump`) to stdout or FILE. If the
    /// root records a NAR hash, the output is checked against it.
    ExportNar {
        root: String,
        /// Write to FILE (atomically, only if complete and checked) instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Import every <hash>-<name> entry of a Nix store directory as a root with its Nix
    /// metadata. Where Nix's database is found (/nix/store -> /nix/var/nix/db/db.sqlite; a
    /// chroot store ROOT/nix/store -> ROOT/nix/var/nix/db/db.sqlite) or given with --db, only
    /// the paths it registers are imported, with their references, deriver, signatures and
    /// CA, and each NAR hash is checked against it. Without one, references are found by
    /// scanning (a .drv's are its inputs). Other entries are reported and skipped.
    ImportStore {
        dir: PathBuf,
        /// Store paths imported at once (default: number of cores).
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Nix's database to take metadata from (default: found beside DIR, as above).
        #[arg(long, value_name = "DB_SQLITE", conflicts_with = "no_db")]
        db: Option<PathBuf>,
        /// Ignore Nix's database even if there is one; scan for references instead.
        #[arg(long)]
        no_db: bool,
        /// Store directory the database's paths are under.
        #[arg(long, default_value = "/nix/store", value_name = "DIR")]
        store_dir: String,
    },
    /// Print the registration of Nix paths the store holds (every root with Nix metadata, or
    /// the closure of ROOTs) in the format `nix-store --load-db` reads: on a machine whose
    /// /nix/store is a granary mount, `granary nix-db | nix-store --load-db` makes Nix
    /// consider those paths valid (hash, size, references, deriver).
    NixDb {
        /// Store paths (basenames) whose closures to print (default: all).
        roots: Vec<String>,
        /// Store directory to print the paths under.
        #[arg(long, default_value = "/nix/store", value_name = "DIR")]
        store_dir: String,
    },
    /// Print the .narinfo of a root that carries Nix metadata.
    Narinfo {
        root: String,
        /// Store directory for the StorePath line.
        #[arg(long, default_value = "/nix/store", value_name = "DIR")]
        store_dir: String,
    },
    /// Measure how much each chunking strategy would save on some trees (writes nothing).
    Dedup(dedup::DedupArgs),
    /// Run CMD inside a stored tree (overlayfs over the FUSE view, a private writable layer,
    /// private mount and PID namespaces); exits with CMD's status. Needs root.
    Sandbox(sandbox::SandboxArgs),
    /// Recorded read orders of a root, replayed as prefetch by mounts and sandboxes: save,
    /// list, remove.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// (internal) The shared FUSE server of `granary sandbox`.
    #[command(name = crate::tools::sandbox::SERVE_SUBCOMMAND, hide = true)]
    SandboxServe {
        #[arg(long)]
        digest: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        times: Option<String>,
        #[arg(long, default_value_t = 0)]
        keep_warm_ms: u64,
        #[arg(long)]
        file_cache: Option<PathBuf>,
        /// The trace to replay: NAME:DIGEST:SIZE.
        #[arg(long)]
        trace: Option<String>,
        /// Where to write the trace recorded while serving.
        #[arg(long)]
        record_trace: Option<PathBuf>,
    },
    /// Inspect or empty a disk cache (--cache-dir DIR).
    #[command(subcommand)]
    Cache(cache::CacheCommand),
}

/// A trace reference as the sandbox passes it to its server: NAME:DIGEST:SIZE.
fn parse_trace_ref(s: &str) -> Result<crate::model::trace::TraceRef> {
    let mut parts = s.rsplitn(3, ':');
    let (Some(size), Some(digest), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        anyhow::bail!("--trace {s:?}: want NAME:DIGEST:SIZE");
    };
    Ok(crate::model::trace::TraceRef {
        name: name.to_string(),
        digest: digest.parse().context("--trace")?,
        size: size.parse().context("--trace")?,
        saved: 0,
    })
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // The sandbox process must stay single-threaded: no runtime, no logging setup.
    let mut argv = std::env::args_os();
    if argv.nth(1).as_deref() == Some(std::ffi::OsStr::new(crate::tools::sandbox::EXEC_SUBCOMMAND))
    {
        let spec = argv.next().unwrap_or_default();
        let code = crate::tools::sandbox::exec::exec_main(&spec.to_string_lossy());
        return ExitCode::from(u8::try_from(code).unwrap_or(255));
    }
    let mut argv = std::env::args_os().skip(1);
    let first = argv.next();
    if first.as_deref()
        == Some(std::ffi::OsStr::new(
            crate::tools::sandbox::share::REAP_SUBCOMMAND,
        ))
    {
        let args: Vec<_> = argv.collect();
        return ExitCode::from(
            u8::try_from(crate::tools::sandbox::share::reap_main(&args)).unwrap_or(1),
        );
    }
    if first.as_deref() == Some(std::ffi::OsStr::new(crate::views::fs::reaper::SUBCOMMAND)) {
        let args: Vec<_> = argv.collect();
        return ExitCode::from(
            u8::try_from(crate::views::fs::reaper::reap_main(&args)).unwrap_or(1),
        );
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // `granary sandbox` with bad arguments is a setup failure too (status 125, one
            // line, like its other setup failures).
            let sandbox = <Cli as clap::CommandFactory>::command()
                .ignore_errors(true)
                .try_get_matches()
                .is_ok_and(|m| m.subcommand_name() == Some("sandbox"));
            if e.use_stderr() && sandbox {
                // The message is the rendering's first paragraph (usage and tips follow).
                let text = e.render().to_string();
                let first: Vec<&str> = text
                    .lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                eprintln!(
                    "granary: {} (see granary sandbox --help)",
                    first.join(" ").trim_end_matches('.')
                );
                return ExitCode::from(crate::tools::sandbox::EXIT_SETUP as u8);
            }
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if matches!(
        cli.command,
        Command::Mount(_) | Command::Sandbox(_) | Command::SandboxServe { .. }
    ) {
        crate::views::fs::bound_heap();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("granary-rt")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("granary: error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(run(cli));
    let requests = store::request_counts();
    if std::env::var_os("GRANARY_S3_STATS").is_some() && !requests.is_empty() {
        let counts: Vec<String> = requests
            .iter()
            .map(|(k, v)| format!("{}={v}", k.trim_start_matches("s3 ").replace(' ', "_")))
            .collect();
        eprintln!("granary: s3 requests: {}", counts.join(" "));
    }
    // Do not wait for blocking tasks that may still be draining (e.g. after an error).
    rt.shutdown_timeout(Duration::from_secs(1));
    match res {
        Ok(code) => code,
        // The reader of our output went away (`granary ... | head`): stop quietly, with the
        // status a process killed by SIGPIPE would have.
        Err(e) if is_broken_pipe(&e) => ExitCode::from(141),
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("granary: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Whether an error comes from writing to a pipe nobody reads any more.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<crate::store::StoreError>()
                .is_some_and(|s| {
                    matches!(s, crate::store::StoreError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::BrokenPipe)
                })
    })
}

async fn open_store(
    url: Option<&str>,
    cache_dir: Option<&std::path::Path>,
    cache_max: u64,
) -> Result<Store> {
    let url = url.map_or_else(store::default_url, str::to_string);
    match cache_dir {
        Some(dir) => store::cache::open(&url, dir, cache_max).await,
        None => store::open(&url).await,
    }
    .with_context(|| format!("opening store {url}"))
}

async fn run(cli: Cli) -> Result<ExitCode> {
    // dedup reads a store only if asked to, and must not create one.
    if let Command::Dedup(args) = &cli.command {
        return dedup::cmd_dedup(cli.store.as_deref(), args).await;
    }
    if let Command::Cache(cmd) = &cli.command {
        return cache::run(cmd, cli.cache_dir.as_deref(), cli.cache_max).await;
    }
    let store = match open_store(
        cli.store.as_deref(),
        cli.cache_dir.as_deref(),
        cli.cache_max,
    )
    .await
    {
        Ok(s) => s,
        Err(e) if matches!(cli.command, Command::Sandbox(_)) => {
            eprintln!("granary: error: {}", format!("{e:#}").replace('\n', " "));
            return Ok(ExitCode::from(crate::tools::sandbox::EXIT_SETUP as u8));
        }
        Err(e) => return Err(e),
    };
    match cli.command {
        Command::Import {
            paths,
            name,
            named,
            skip_special,
            jobs,
            no_wait,
            no_times,
        } => {
            if let Some(ingest) = &store.ingest {
                let names = root_names(&paths, name, named)?;
                let opts = crate::store::IngestOptions {
                    skip_special,
                    no_times,
                };
                return daemon::cmd_import_remote(&**ingest, &paths, names, opts, no_wait).await;
            }
            if no_wait {
                bail!("--no-wait needs a daemon store offering ingest sessions");
            }
            let opts = ImportOptions {
                skip_special,
                parallelism: jobs,
                no_times,
            };
            cmd_import(&store, &paths, name, named, &opts).await
        }
        Command::Roots => {
            let mut out = std::io::stdout().lock();
            for name in store.roots.list().await? {
                writeln!(out, "{name}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { path, long } => cmd_ls(&store, &path, long).await,
        Command::Cat { path } => {
            let node = trees::resolve(&store, &path).await?;
            let Node::File { digest, size, .. } = node else {
                bail!("{path}: not a regular file");
            };
            let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::io::stdout());
            trees::write_blob(&store, &digest, size, &mut out)
                .await
                .with_context(|| path.clone())?;
            tokio::io::AsyncWriteExt::flush(&mut out)
                .await
                .context("writing output")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { path, dest } => {
            let (node, times) = trees::resolve_timed(&store, &path).await?;
            if dest.symlink_metadata().is_ok() {
                bail!(
                    "{}: already exists; export needs a new path",
                    dest.display()
                );
            }
            trees::export(&store, &node, times, &dest)
                .await
                .with_context(|| format!("exporting {path} to {}", dest.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { roots } => maintain::rm(&store, &roots).await,
        Command::Gc { dry_run, grace } => maintain::gc(&store, grace, dry_run).await,
        Command::Repack { level } => maintain::repack(&store, level).await,
        Command::Verify { roots, repair_from } => {
            maintain::verify(&store, &roots, repair_from.as_deref()).await
        }
        Command::Mount(args) => mount::run(&store, args).await,
        // A failure before CMD runs has its own status, so CI tells it from CMD's.
        Command::Sandbox(args) => match sandbox::run(&store, args).await {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("granary: error: {}", format!("{e:#}").replace('\n', " "));
                Ok(ExitCode::from(crate::tools::sandbox::EXIT_SETUP as u8))
            }
        },
        Command::SandboxServe {
            digest,
            dir,
            times,
            keep_warm_ms,
            file_cache,
            trace,
            record_trace,
        } => {
            let settings = crate::tools::sandbox::share::ServerSettings {
                keep_warm: Duration::from_millis(keep_warm_ms),
                file_cache,
                trace: trace.as_deref().map(parse_trace_ref).transpose()?,
                record: record_trace,
            };
            crate::tools::sandbox::share::serve(&store, &digest, times.as_deref(), &dir, settings)
                .await
        }
        Command::Trace(cmd) => trace::run(&store, cmd).await,
        Command::ImportNar {
            file,
            name,
            references,
            deriver,
            signatures,
            ca,
            nar_hash,
        } => {
            let args = nar::NixArgs {
                references,
                deriver,
                signatures,
                ca,
                nar_hash,
            };
            nar::cmd_import_nar(&store, &file, &name, args).await
        }
        Command::ExportNar { root, output } => {
            nar::cmd_export_nar(&store, &root, output.as_deref()).await
        }
        Command::ImportStore {
            dir,
            jobs,
            db,
            no_db,
            store_dir,
        } => {
            let db = nar::DbChoice::pick(&dir, db, no_db);
            nar::cmd_import_store(&store, &dir, jobs, db, &store_dir).await
        }
        Command::NixDb { roots, store_dir } => nar::cmd_nix_db(&store, &roots, &store_dir).await,
        Command::Narinfo { root, store_dir } => nar::cmd_narinfo(&store, &root, &store_dir).await,
        Command::Daemon(args) => daemon::cmd_daemon(store, args).await,
        Command::ServeCache(args) => cache_http::cmd_serve_cache(store, args).await,
        Command::IngestStatus { token } => daemon::cmd_ingest_status(&store, &token).await,
        Command::Info { json, dedup } => cmd_info(&store, json, dedup).await,
        Command::Dedup(_) | Command::Cache(_) => unreachable!("handled above"),
    }
}

/// The root name of each path, decided before anything is imported so a bad one fails early.
fn root_names(paths: &[PathBuf], name: Option<String>, named: bool) -> Result<Vec<Option<String>>> {
    if name.is_some() && paths.len() != 1 {
        bail!("--name takes exactly one PATH (use --named to name several by basename)");
    }
    if let Some(n) = &name {
        validate_root_name(n).with_context(|| format!("root name {n:?}"))?;
    }
    let mut names = Vec::new();
    for p in paths {
        names.push(match (&name, named) {
            (Some(n), _) => Some(n.clone()),
            (None, true) => {
                Some(import::default_root_name(p).with_context(|| {
                    format!("{}: basename is not a valid root name", p.display())
                })?)
            }
            _ => None,
        });
    }
    Ok(names)
}

async fn cmd_import(
    store: &Store,
    paths: &[PathBuf],
    name: Option<String>,
    named: bool,
    opts: &ImportOptions,
) -> Result<ExitCode> {
    let names = root_names(paths, name, named)?;
    let progress = Arc::new(Progress::default());
    let bar = spawn_progress(progress.clone(), "import");
    let named: Vec<(PathBuf, Option<String>)> = paths.iter().cloned().zip(names).collect();
    let nodes = import::import_named(store, &named, opts, progress.clone()).await;
    drop(progress);
    if let Some(b) = bar {
        let _ = b.await;
    }
    let mut out = std::io::stdout().lock();
    for (p, imported) in paths.iter().zip(nodes?) {
        let shown = match imported.node {
            Node::Directory { digest, .. } | Node::File { digest, .. } => digest.to_hex(),
            Node::Symlink { target } => {
                format!("symlink -> {}", String::from_utf8_lossy(&target))
            }
        };
        writeln!(out, "{shown}\t{}", p.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(node: &Node) -> (char, &'static str, u64, String) {
    match node {
        Node::Directory { digest, size } => ('d', "r-xr-xr-x", *size, digest.to_hex()),
        Node::File {
            digest,
            size,
            executable,
        } => (
            '-',
            if *executable {
                "r-xr-xr-x"
            } else {
                "r--r--r--"
            },
            *size,
            digest.to_hex(),
        ),
        Node::Symlink { target } => (
            'l',
            "rwxrwxrwx",
            target.len() as u64,
            format!("-> {}", trees::escape_name(target)),
        ),
    }
}

async fn cmd_ls(store: &Store, path: &str, long: bool) -> Result<ExitCode> {
    let node = trees::resolve(store, path).await?;
    let mut out = std::io::stdout().lock();
    for l in trees::list(store, &node).await? {
        let name = if l.name.is_empty() {
            path.rsplit('/').next().unwrap_or(path).to_string()
        } else {
            trees::escape_name(&l.name)
        };
        if long {
            let (t, mode, size, what) = describe(&l.node);
            writeln!(out, "{t}{mode} {size:>12} {name} {what}")?;
        } else {
            writeln!(out, "{name}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cmd_info(store: &Store, json: bool, dedup: bool) -> Result<ExitCode> {
    let info = trees::info::store_info(store).await?;
    let figures = if dedup {
        Some(dedup::info_figures(store).await?)
    } else {
        None
    };
    let mut out = std::io::stdout().lock();
    if json {
        let mut v = serde_json::to_value(&info)?;
        if let (Some(f), Some(obj)) = (&figures, v.as_object_mut()) {
            obj.insert("dedup".into(), serde_json::to_value(f)?);
        }
        writeln!(out, "{v}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let c = &info.chunking;
    writeln!(out, "store              {}", info.store)?;
    writeln!(out, "chunking (fastcdc) {}/{}/{}", c.min, c.avg, c.max)?;
    writeln!(out, "roots              {}", info.roots)?;
    writeln!(out, "logical bytes      {}", info.logical_bytes)?;
    if info.counted {
        writeln!(out, "chunks             {}", info.chunks)?;
        writeln!(out, "blob indexes       {}", info.blob_indexes)?;
        writeln!(out, "directories        {}", info.directories)?;
        writeln!(out, "unique chunk bytes {}", info.unique_chunk_bytes)?;
        writeln!(out, "stored bytes       {}", info.stored_bytes)?;
        writeln!(out, "dedup ratio        {:.3}", info.dedup_ratio)?;
        let comp = if info.stored_bytes == 0 {
            1.0
        } else {
            info.logical_bytes as f64 / info.stored_bytes as f64
        };
        writeln!(out, "logical / stored   {comp:.3}")?;
    }
    for (k, v) in &info.counters {
        writeln!(out, "{k:<18} {v}")?;
    }
    if let Some(f) = &figures {
        writeln!(
            out,
            "reachable from the roots (as `granary dedup` counts the store strategy):"
        )?;
        writeln!(out, "  unique chunks      {}", f.unique_chunks)?;
        writeln!(out, "  unique chunk bytes {}", f.unique_bytes)?;
        writeln!(out, "  dedup ratio        {:.3}", f.dedup_ratio)?;
        writeln!(out, "  chunk size mean    {}", f.mean_chunk)?;
        writeln!(out, "  chunk size median  {}", f.median_chunk)?;
        writeln!(out, "  chunk size p99     {}", f.p99_chunk)?;
        writeln!(
            out,
            "  blob indexes       {} ({} bytes)",
            f.blob_indexes, f.blob_index_bytes
        )?;
        writeln!(
            out,
            "  directories        {} ({} bytes)",
            f.directories, f.directory_bytes
        )?;
        for m in &f.marginal {
            writeln!(
                out,
                "  root {} adds {} unique chunk bytes of {} logical",
                m.input, m.unique_bytes, m.logical_bytes
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
