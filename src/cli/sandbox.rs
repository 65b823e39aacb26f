//! `granary sandbox`: checks arguments and privilege, finds the FUSE view (a running
//! `granary mount`, or the shared server), starts the sandbox process and passes its exit
//! status on; SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 from other processes are
//! forwarded to it (a terminal's go to CMD directly, as it is in the foreground group).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use crate::model::castore::Node;
use crate::store::Store;
use crate::tools::sandbox::{self, registry, share, Bind, ExecSpec, Lower, Placement};
use crate::trees;

#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    /// The tree to run in: a root name or a directory digest.
    #[arg(long, value_name = "NAME|DIGEST")]
    pub root: String,
    /// Make the tree CMD's root filesystem (with /proc, a minimal /dev and a tmpfs /tmp).
    #[arg(long, conflicts_with = "at")]
    pub as_root: bool,
    /// Show the tree at PATH (an existing directory) of the host's view instead.
    #[arg(long, value_name = "PATH")]
    pub at: Option<PathBuf>,
    /// Bind-mount host path SRC at DST inside the tree (read-only with :ro); repeatable.
    #[arg(long = "bind", value_name = "SRC:DST[:ro]")]
    pub binds: Vec<Bind>,
    /// Mount an empty tmpfs at DST inside the tree; repeatable.
    #[arg(long, value_name = "DST")]
    pub tmpfs: Vec<PathBuf>,
    /// Keep the writable layer: DIR/upper holds every change afterwards (DIR/work is
    /// overlayfs's scratch space). Default: a tmpfs, discarded.
    #[arg(long, value_name = "DIR")]
    pub keep_upper: Option<PathBuf>,
    /// Set an environment variable for CMD (which otherwise inherits granary's); repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Always use the sandbox's own shared FUSE server, even if a `granary mount` of the
    /// store is running.
    #[arg(long)]
    pub no_reuse: bool,
    /// How long the shared FUSE server stays after the last sandbox of the tree exits, so
    /// the next job starts with its caches warm (e.g. 30s, 5m; 0 = exit with the last
    /// sandbox). It then exits and leaves nothing behind.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = crate::units::parse_duration)]
    pub keep_warm: std::time::Duration,
    /// A file cache for the shared FUSE server (as `granary mount --file-cache`): binaries
    /// and libraries a job reads are kept verified on local disk and read by the kernel
    /// directly in every later job, also after the server has exited (e.g.
    /// /var/cache/granary/files; at most 4G, files of 256K and more).
    #[arg(long, value_name = "DIR")]
    pub file_cache: Option<PathBuf>,
    /// Replay this trace of the root (see `granary trace`) when the shared mount starts;
    /// default: the root's newest trace, if it has one.
    #[arg(long, value_name = "NAME", conflicts_with = "no_trace")]
    pub trace: Option<String>,
    /// Do not replay a trace.
    #[arg(long)]
    pub no_trace: bool,
    /// Record what CMD first reads of the tree and write it to FILE when the sandbox ends,
    /// for `granary trace save ROOT FILE`. The sandbox then gets a FUSE server of its own
    /// (no reuse, no keep-warm), so the recording holds this job's reads only.
    #[arg(long, value_name = "FILE")]
    pub record_trace: Option<PathBuf>,
    /// A capability CMD keeps (e.g. sys_ptrace), repeatable; replaces the default set: chown,
    /// dac_override, fowner, fsetid, kill, setgid, setuid, setpcap, net_bind_service, net_raw,
    /// sys_chroot, mknod, audit_write, setfcap (what container runtimes grant; no mounting,
    /// namespaces, ptrace, modules or network administration).
    #[arg(long = "cap", value_name = "CAP", conflicts_with = "all_caps")]
    pub caps: Vec<String>,
    /// Let CMD keep every capability granary has (as root: all of them).
    #[arg(long)]
    pub all_caps: bool,
    /// Give CMD a network namespace of its own, with only a loopback interface (default: the
    /// host's network).
    #[arg(long)]
    pub no_network: bool,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected K=V")),
    }
}

pub async fn run(store: &Store, args: SandboxArgs) -> Result<ExitCode> {
    if !args.as_root && args.at.is_none() {
        bail!("say where the tree goes: --as-root or --at PATH");
    }
    let caps = if args.all_caps {
        None
    } else if args.caps.is_empty() {
        let default: Vec<String> = sandbox::DEFAULT_CAPS
            .iter()
            .map(|s| s.to_string())
            .collect();
        Some(sandbox::cap_mask(&default).map_err(anyhow::Error::msg)?)
    } else {
        Some(sandbox::cap_mask(&args.caps).map_err(anyhow::Error::msg)?)
    };
    sandbox::check_privilege()?;
    if store.url.starts_with("memory:") {
        bail!("a memory:// store lives in one process; a sandbox needs a store other processes can open (file:// or grpc+...)");
    }
    let (digest, times) = match trees::resolve_root_timed(store, &args.root)
        .await
        .with_context(|| format!("--root {}", args.root))?
    {
        (Node::Directory { digest, .. }, at) => (digest, at.map(|(t, _)| t)),
        _ => bail!(
            "--root {}: not a directory; a sandbox needs a directory",
            args.root
        ),
    };
    let trace_ref =
        trees::trace::to_replay(store, &args.root, args.trace.as_deref(), args.no_trace)
            .await
            .context("--trace")?;
    let placement = match &args.at {
        None => Placement::AsRoot,
        Some(p) => {
            let c = std::fs::canonicalize(p).with_context(|| format!("--at {}", p.display()))?;
            if !c.is_dir() {
                bail!("--at {}: not a directory", p.display());
            }
            Placement::At(c)
        }
    };
    let mut binds = Vec::new();
    for b in args.binds {
        let src =
            std::fs::canonicalize(&b.src).with_context(|| format!("--bind {}", b.src.display()))?;
        binds.push(Bind { src, ..b });
    }
    let keep_upper = match &args.keep_upper {
        None => None,
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("--keep-upper {}", d.display()))?;
            Some(
                std::fs::canonicalize(d)
                    .with_context(|| format!("--keep-upper {}", d.display()))?,
            )
        }
    };
    let runtime = sandbox::runtime_dir();
    let work_dir = runtime.join("work");
    std::fs::create_dir_all(&work_dir).with_context(|| format!("{}", work_dir.display()))?;
    // Canonical, so paths compare equal to what mountinfo shows.
    let runtime =
        std::fs::canonicalize(&runtime).with_context(|| format!("{}", runtime.display()))?;
    let work_dir = runtime.join("work");
    let exe = std::env::current_exe().context("locating the granary binary")?;

    let record = args
        .record_trace
        .as_deref()
        .map(super::trace::record_path)
        .transpose()?;
    let reuse = if args.no_reuse || record.is_some() {
        None
    } else {
        let (rt, url, root) = (runtime.clone(), store.url.clone(), args.root.clone());
        let t = times.map(|t| t.digest);
        tokio::task::spawn_blocking(move || registry::find(&rt, &url, &digest, t.as_ref(), &root))
            .await
            .context("looking for a running granary mount")?
    };
    let (lower, lease) = match reuse {
        Some(path) => (Lower::Path(path), None),
        None => {
            let (exe, rt, url) = (exe.clone(), runtime.clone(), store.url.clone());
            let settings = share::ServerSettings {
                keep_warm: if record.is_some() {
                    std::time::Duration::ZERO
                } else {
                    args.keep_warm
                },
                file_cache: args.file_cache.clone(),
                trace: trace_ref.clone(),
                record: record.clone(),
            };
            let (pid, path, lease) = tokio::task::spawn_blocking(move || {
                share::join(&exe, &rt, &url, &digest, times, settings)
            })
            .await
            .context("joining the shared FUSE mount")??;
            (Lower::Server { pid, path }, Some(lease))
        }
    };
    // Checked after CMD: a FUSE view that died under it means its reads failed, whatever
    // status CMD chose to exit with.
    let view = lower.clone();
    let spec = ExecSpec {
        parent: std::process::id(),
        lower,
        placement,
        binds,
        tmpfs: args.tmpfs,
        keep_upper,
        env: args.env,
        cmd: args.cmd,
        cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        work_dir,
        caps,
        private_net: args.no_network,
    };
    // Signals from other processes go to the sandbox (and on to CMD); a terminal's reach
    // CMD directly.
    sandbox::exec::install_forwarding();
    // Spawned from this (the main) thread: the sandbox's PR_SET_PDEATHSIG follows the thread
    // that forked it, and this one lives as long as the process.
    let mut child = tokio::process::Command::new(&exe)
        .arg(sandbox::EXEC_SUBCOMMAND)
        .arg(serde_json::to_string(&spec)?)
        .spawn()
        .context("starting the sandbox")?;
    let pid = child.id().context("sandbox process")? as libc::pid_t;
    sandbox::exec::forward_to(pid);
    let status = child.wait().await.context("waiting for the sandbox")?;
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => sandbox::EXIT_SETUP,
    };
    let died = match &view {
        Lower::Server { pid, .. } => !alive(*pid),
        Lower::Path(p) => {
            std::fs::metadata(p).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
        }
    };
    if died {
        eprintln!(
            "granary: error: the FUSE view of the tree went away while CMD ran (its reads failed); CMD exited with {code}"
        );
        return Ok(ExitCode::from(sandbox::EXIT_SETUP as u8));
    }
    if let (Some(path), Lower::Server { pid, .. }) = (&record, &view) {
        // The server writes the recording as it exits, once this lease is gone.
        drop(lease);
        let since = std::time::Instant::now();
        while alive(*pid) && since.elapsed() < std::time::Duration::from_secs(30) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if !path.is_file() {
            eprintln!(
                "granary: error: no trace recorded at {} (the FUSE server did not write it; see its log)",
                path.display()
            );
            return Ok(ExitCode::from(sandbox::EXIT_SETUP as u8));
        }
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

/// Whether process `pid` is running (not gone, not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}
