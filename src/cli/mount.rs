//! `granary mount`: checks the mount point, optionally imports, mounts, and serves until
//! SIGINT/SIGTERM, which unmount cleanly (exit 0).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::model::castore::Node;
use crate::store::Store;
use crate::trees;
use crate::trees::import::{self, ImportOptions, Progress};
use crate::units::parse_size;
use crate::views::fs::{self, MountOptions, Top};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "A Nix store on granary (see README \"Nix store on granary\"):\n  \
    granary mount /nix/store --nix --allow-other &\n  \
    granary nix-db | nix-store --load-db\n\
    With --substituter URL --trusted-public-key NAME:KEY, a store path the store lacks is \
    fetched from that binary cache on first lookup."
)]
pub struct MountArgs {
    /// Where to mount: an existing, empty directory that is not already a mount point
    /// (see --nonempty).
    pub mountpoint: PathBuf,
    /// Mount one tree (a root name or a directory digest) instead of the list of roots.
    #[arg(long, value_name = "NAME|DIGEST")]
    pub root: Option<String>,
    /// Make the top level unlistable (lookups by name still work), for stores with many roots.
    #[arg(long, conflicts_with = "root")]
    pub no_list_root: bool,
    /// Kernel request channels, each served by its own thread. These threads only answer
    /// from memory and hand anything that waits to the async runtime, so few are needed;
    /// default: half the CPUs, 1 to 8.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Memory for reading (e.g. 256M, 1G): decompressed, verified chunks, the directory
    /// listings kept beyond open ones, and the store's own read memory (36 MiB of
    /// decompressed compression groups and buffers on a local store, 80 MiB of pack extents
    /// and groups on s3://). Chunks get what the others leave, at least a quarter.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size::<usize>)]
    pub cache_size: usize,
    /// Let other users use the mount (allow_other).
    #[arg(long)]
    pub allow_other: bool,
    /// Deadline of each backend call in seconds; a read that misses it fails with EIO.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub timeout: f64,
    /// Bytes fetched ahead of a sequential read, concurrently (0 turns it off). Default 4M,
    /// or 16M over a remote store (s3://, grpc+...), where every batch costs a round trip.
    #[arg(long, value_name = "BYTES", value_parser = parse_size::<u64>)]
    pub readahead: Option<u64>,
    /// Keep whole files, verified, in this directory and let the kernel read them directly
    /// (FUSE passthrough, Linux 6.9+, as root): reads and mmaps of a cached file run at local
    /// disk speed, also after a remount and for every mount sharing the directory. A file is
    /// copied in, from verified chunks, the first time it is opened; each file is hashed
    /// again before a process first uses it. Without passthrough the mount reads as usual.
    #[arg(long, value_name = "DIR")]
    pub file_cache: Option<PathBuf>,
    /// Bytes the file cache may hold; the least recently used files go first.
    #[arg(long, value_name = "BYTES", default_value = "4G", value_parser = parse_size::<u64>,
          requires = "file_cache")]
    pub file_cache_size: u64,
    /// Smallest file the file cache takes.
    #[arg(long, value_name = "BYTES", default_value = "256K", value_parser = parse_size::<u64>,
          requires = "file_cache")]
    pub file_cache_min: u64,
    /// Never use FUSE passthrough, even with --file-cache (reads go through the mount).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Never poll the kernel for requests. By default, while lookups, listings or opens come
    /// back to back (a walk, a build's header search) and a CPU is spare, the FUSE thread
    /// polls for the next request instead of sleeping, and stops 2 ms after they stop, at the
    /// first read, or when other work needs the CPUs: on virtual machines each sleep costs an
    /// interrupt through the hypervisor per request (a cold `find` ran ≈ 1.4× faster). The
    /// price is one busy CPU while the walk lasts.
    #[arg(long)]
    pub no_poll: bool,
    /// Mount over a directory that is not empty (its entries are hidden while mounted).
    #[arg(long)]
    pub nonempty: bool,
    /// Present the mount as Nix's local store expects /nix/store to be: top directory owned
    /// by root and the build-users group with mode 1775, an empty .links, and only roots
    /// named like store paths. An unmodified Nix then opens it (read-only).
    #[arg(long, conflicts_with = "root")]
    pub nix: bool,
    /// With --nix: the build-users group owning the store directory (Nix's
    /// build-users-group setting).
    #[arg(long, value_name = "GROUP", default_value = "nixbld", requires = "nix")]
    pub nix_group: String,
    #[command(flatten)]
    pub substitute: super::substitute::SubstituteArgs,
    /// Record the order in which the mount's files are first read (directories, blob
    /// indexes, chunks) and write it to FILE at unmount, for `granary trace save`. Costs a
    /// hash-set insert per chunk read.
    #[arg(long, value_name = "FILE")]
    pub record_trace: Option<PathBuf>,
    /// With --root: replay this trace of the root (see `granary trace`) as prefetch; default:
    /// the root's newest trace, if it has one. Progress: `getfattr -n user.granary.trace`.
    #[arg(
        long,
        value_name = "NAME",
        requires = "root",
        conflicts_with = "no_trace"
    )]
    pub trace: Option<String>,
    /// Do not replay a trace.
    #[arg(long)]
    pub no_trace: bool,
    /// Import these paths first (each named after its basename), then mount.
    #[arg(long, value_name = "PATH", num_args = 1..)]
    pub import: Vec<PathBuf>,
}

/// The id of group `name`, if the system knows it.
fn group_id(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getgrnam_r writes only into grp and buf.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// An exclusive lock on the directory a mount goes over, held while mounted: two `granary
/// mount`s of one mount point started at the same moment cannot both pass the checks and
/// stack two mounts.
struct MountLock(#[allow(dead_code)] std::fs::File);

fn lock_mountpoint(path: &Path) -> Result<MountLock> {
    let shown = path.display();
    let dir = std::fs::File::open(path).with_context(|| format!("mount point {shown}"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!("mount point {shown}: another granary is mounting it right now");
        }
        bail!("mount point {shown}: cannot lock it: {e}");
    }
    Ok(MountLock(dir))
}

/// Refuses mount points that are missing, not directories, not empty (unless `nonempty`), or
/// already mounts.
fn check_mountpoint(path: &Path, nonempty: bool) -> Result<PathBuf> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mount point {shown}: does not exist")
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "mount point {shown}: a dead FUSE mount is still there; remove it with `fusermount3 -uz {shown}` or `umount -l {shown}`"
        ),
        Err(e) => bail!("mount point {shown}: {e}"),
    };
    if !meta.is_dir() {
        bail!("mount point {shown}: not a directory");
    }
    let canon = std::fs::canonicalize(path).with_context(|| format!("mount point {shown}"))?;
    if fs::is_mount_point(&canon) {
        bail!("mount point {shown}: already a mount point");
    }
    let mut entries = std::fs::read_dir(&canon).with_context(|| format!("mount point {shown}"))?;
    if !nonempty && entries.next().is_some() {
        bail!("mount point {shown}: not empty (--nonempty mounts over it, hiding what is there)");
    }
    Ok(canon)
}

async fn import_first(store: &Store, paths: &[PathBuf]) -> Result<()> {
    let mut named = Vec::new();
    for p in paths {
        let name = import::default_root_name(p)
            .with_context(|| format!("{}: basename is not a valid root name", p.display()))?;
        named.push((p.clone(), Some(name)));
    }
    let opts = ImportOptions::default();
    import::import_named(store, &named, &opts, Arc::new(Progress::default())).await?;
    for (p, name) in &named {
        eprintln!(
            "granary: imported {} as {}",
            p.display(),
            name.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn run(store: &Store, args: MountArgs) -> Result<ExitCode> {
    // Locked first, then checked: a racing mount either waits out our check or sees our mount.
    let _lock = match std::fs::metadata(&args.mountpoint) {
        Ok(m) if m.is_dir() => Some(lock_mountpoint(&args.mountpoint)?),
        _ => None,
    };
    let mountpoint = check_mountpoint(&args.mountpoint, args.nonempty)?;
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    import_first(store, &args.import).await?;
    let top = match &args.root {
        Some(r) => match trees::resolve_root_timed(store, r).await? {
            (node @ Node::Directory { .. }, at) => Top::Tree(node, at),
            _ => bail!("--root {r}: not a directory; a mount needs a directory"),
        },
        None => Top::Roots {
            listable: !args.no_list_root,
        },
    };
    let replay = match &args.root {
        Some(r) => trees::trace::to_replay(store, r, args.trace.as_deref(), args.no_trace)
            .await
            .context("--trace")?,
        None => None,
    };
    // Checked now rather than at unmount, when the recording would be lost.
    let record = args
        .record_trace
        .as_deref()
        .map(super::trace::record_path)
        .transpose()?;
    let nix = args.nix.then(|| {
        let gid = group_id(&args.nix_group).unwrap_or_else(|| {
            // Nix itself then only warns and leaves the directory's group alone.
            tracing::warn!(
                "group {:?} does not exist; the store directory's group is 0",
                args.nix_group
            );
            0
        });
        fs::NixTop { gid }
    });
    let substituting;
    let store = match args
        .substitute
        .build(store, crate::views::nar::store_path::DEFAULT_STORE_DIR)?
    {
        Some(sub) => {
            substituting = crate::views::binary_cache::substitute::layer(store, sub);
            &substituting
        }
        None => store,
    };
    let opts_top = top.clone();
    let opts = MountOptions {
        top,
        threads: args.threads.unwrap_or_else(fs::default_threads).max(1),
        cache_size: args.cache_size,
        allow_other: args.allow_other,
        deadline: Duration::from_secs_f64(args.timeout),
        readahead: args.readahead,
        nix,
        file_cache: args.file_cache.as_ref().map(|dir| fs::FileCacheOptions {
            dir: dir.clone(),
            limit: args.file_cache_size,
            min_size: args.file_cache_min,
        }),
        passthrough: !args.no_passthrough,
        poll: !args.no_poll,
        record_trace: record,
        replay,
        ..MountOptions::default()
    };
    // Handlers before mounting: a signal that arrives while mounting is then seen once the
    // mount is up and unmounts it, instead of killing the process and leaving a dead mount.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    };
    let exe = std::env::current_exe().ok();
    // Announced, once mounted, so `granary sandbox` can reuse the mount (best effort).
    let mut registration = None;
    let on_mounted = || {
        let tree_digest = match &opts_top {
            Top::Tree(node, _) => node.digest(),
            Top::Roots { .. } => None,
        };
        registration = crate::tools::sandbox::registry::register(
            &crate::tools::sandbox::runtime_dir(),
            &store.url,
            &mountpoint,
            tree_digest.as_ref(),
        )
        .map_err(|e| tracing::warn!("not announcing the mount to sandboxes: {e}"))
        .ok();
        eprintln!(
            "granary: {} mounted at {}; stop with Ctrl-C or SIGTERM",
            store.url,
            mountpoint.display()
        );
    };
    fs::mount_session(
        store,
        &opts,
        &mountpoint,
        exe.as_deref(),
        on_mounted,
        shutdown,
    )
    .await?;
    drop(registration);
    Ok(ExitCode::SUCCESS)
}
