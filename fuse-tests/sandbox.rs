//! `granary sandbox` end to end, as root: a busybox root filesystem is imported into a real
//! store and real sandboxes (FUSE + overlayfs + namespaces) run in it. Every sandbox runs
//! under a watchdog (SIGKILL past a limit, which the design says leaves nothing behind), and
//! every test checks the host's mount table for leftovers.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A sandbox that runs longer than this is killed and the test fails.
const LIMIT: Duration = Duration::from_secs(90);

/// The runtime directory (registry, shared servers) of a test's sandboxes: inside its
/// store's temp dir, so tests never see each other's servers or the machine's /run/granary.
fn runtime_dir(store: &TestStore) -> PathBuf {
    store.dir.path().join("rt")
}

/// Whether sandboxes can run here; panics under GRANARY_REQUIRE_FUSE=1 instead of skipping.
fn sandbox_usable() -> bool {
    if !fuse_usable() {
        return false;
    }
    // SAFETY: geteuid cannot fail.
    let why = if unsafe { libc::geteuid() } != 0 {
        "not running as root"
    } else if busybox().is_none() {
        "no statically linked busybox at /bin/busybox (apt-get install busybox-static)"
    } else {
        return true;
    };
    if std::env::var("GRANARY_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{why} (and GRANARY_REQUIRE_FUSE=1)");
    }
    eprintln!("skipping sandbox test: {why}");
    false
}

macro_rules! require_sandbox {
    () => {
        if !sandbox_usable() {
            return;
        }
    };
}

/// A statically linked busybox (a dynamic one cannot run in a tree without its libc).
fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| std::fs::read(p).is_ok_and(|elf| is_static_elf64(&elf)))
}

/// Whether a 64-bit little-endian ELF has no program interpreter (PT_INTERP).
fn is_static_elf64(elf: &[u8]) -> bool {
    let num = |at: usize, len: usize| -> Option<usize> {
        let b = elf.get(at..at + len)?;
        Some(b.iter().rev().fold(0usize, |acc, x| acc << 8 | *x as usize))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (num(0x20, 8), num(0x36, 2), num(0x38, 2))
    else {
        return false;
    };
    elf.starts_with(b"\x7fELF\x02\x01")
        && (0..phnum).all(|i| num(phoff + i * phentsize, 4).is_some_and(|t| t != 3))
}

/// A store holding `rootfs`: static busybox, its applet symlinks, /etc with two files.
fn rootfs_store() -> TestStore {
    let store = TestStore::new();
    let root = store.dir.path().join("rootfs");
    for d in ["bin", "etc", "proc", "dev", "tmp", "root", "usr/bin"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let bb = busybox().unwrap();
    std::fs::copy(&bb, root.join("bin/busybox")).unwrap();
    let list = Command::new(&bb).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(root.join("etc/motd"), "from the store\n").unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    store.ok(&["import", root.to_str().unwrap(), "--name", "rootfs"]);
    store
}

/// Host mount table lines that belong to sandboxes: their overlay, tmpfs and FUSE sources,
/// or anything under this binary's runtime directory.
fn sandbox_mounts(store: &TestStore) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rt = store.dir.path().to_string_lossy().into_owned();
    info.lines()
        .filter(|l| {
            l.contains("granary-overlay")
                || l.contains("granary-sandbox")
                || l.contains("granary-dev")
                || l.contains(&rt)
        })
        .map(str::to_string)
        .collect()
}

/// Kills a child past its deadline (the design promises SIGKILL leaves nothing behind).
struct Watched {
    child: Option<Child>,
    deadline: Instant,
}

impl Watched {
    fn spawn(mut cmd: Command) -> Watched {
        Watched {
            child: Some(cmd.spawn().expect("spawn granary")),
            deadline: Instant::now() + LIMIT,
        }
    }
    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    fn output(mut self) -> Output {
        let mut child = self.child.take().unwrap();
        // Read pipes on threads so a chatty sandbox cannot block on a full pipe.
        let out = child.stdout.take().map(|mut o| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut o, &mut v).ok();
                v
            })
        });
        let err = child.stderr.take().map(|mut o| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut o, &mut v).ok();
                v
            })
        });
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sandbox ran past {LIMIT:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: out.map(|t| t.join().unwrap()).unwrap_or_default(),
            stderr: err.map(|t| t.join().unwrap()).unwrap_or_default(),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `granary sandbox ARGS`; unless ARGS say otherwise, with `--keep-warm 0` (the server
/// exits with the last sandbox, so each test can check that nothing is left).
fn sandbox_cmd(store: &TestStore, args: &[&str]) -> Command {
    let mut c = store.cmd();
    c.env("GRANARY_RUNTIME_DIR", runtime_dir(store))
        .arg("sandbox");
    if !args.iter().any(|a| a.starts_with("--keep-warm")) {
        c.arg("--keep-warm=0");
    }
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `granary sandbox --root rootfs --as-root ARGS... -- sh -c SCRIPT`.
fn sh(store: &TestStore, extra: &[&str], script: &str) -> Output {
    let mut args = vec!["--root", "rootfs", "--as-root"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "/bin/sh", "-c", script]);
    Watched::spawn(sandbox_cmd(store, &args)).output()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits (bounded) until the shared FUSE servers of this store have all exited.
fn assert_servers_gone(store: &TestStore) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live: Vec<String> = std::fs::read_dir(runtime_dir(store).join("sandbox"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("server.pid")).ok())
            .filter(|pid| Path::new(&format!("/proc/{}", pid.trim())).exists())
            .chain(servers_of(store).iter().map(u32::to_string))
            .collect();
        if live.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for pid in &live {
                let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
            }
            panic!("shared FUSE servers still running: {live:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The store's files and their sizes: a sandbox must not change any of them.
fn store_snapshot(store: &TestStore) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<_> = walk_files(&store.path())
        .into_iter()
        .map(|p| {
            let len = std::fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn runs_in_the_tree_and_writes_vanish() {
    require_sandbox!();
    let store = rootfs_store();
    let before = store_snapshot(&store);

    let out = sh(&store, &[], "echo hi > /tmp/x; cat /tmp/x; ls /");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hi"));
    let listed: HashSet<&str> = lines.collect();
    for d in ["bin", "dev", "etc", "proc", "tmp", "root", "usr"] {
        assert!(listed.contains(d), "ls / lacks {d}: {stdout}");
    }
    // The minimal /dev and /proc work.
    let out = sh(
        &store,
        &[],
        "head -c 16 /dev/urandom | wc -c; echo x > /dev/null && echo null-ok; echo $$; ls /proc/$$/exe >/dev/null && test -d /proc/1 && echo proc-ok",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    let got: Vec<&str> = o.lines().map(str::trim).collect();
    // CMD is PID 2: PID 1 is the sandbox's init.
    assert_eq!(got, ["16", "null-ok", "2", "proc-ok"], "{o}");

    // Writes to /etc succeed inside...
    let out = sh(
        &store,
        &[],
        "echo changed > /etc/motd && echo new > /etc/newfile && rm /etc/passwd && cat /etc/motd /etc/newfile && ls /etc",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "changed\nnew\nmotd\nnewfile\n");
    // ...and are invisible to the next sandbox and to the store.
    let out = sh(&store, &[], "cat /etc/motd; ls /etc");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from the store\nmotd\npasswd\n");
    assert_eq!(
        text(&store.ok(&["cat", "rootfs/etc/motd"]).stdout),
        "from the store\n"
    );
    assert_servers_gone(&store);
    store.ok(&["verify"]);
    assert_eq!(store_snapshot(&store), before, "the store changed");
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
}

#[test]
fn exit_status_passes_through() {
    require_sandbox!();
    let store = rootfs_store();
    for (script, want) in [
        ("true", 0),
        ("exit 1", 1),
        ("exit 42", 42),
        ("kill -9 $$", 137),
        ("kill -TERM $$", 143),
    ] {
        let out = sh(&store, &[], script);
        assert_eq!(
            out.status.code(),
            Some(want),
            "{script}: {}",
            text(&out.stderr)
        );
    }
    assert_servers_gone(&store);
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
}

#[test]
fn clear_errors() {
    require_sandbox!();
    let store = rootfs_store();
    let err = store.fails(&[
        "sandbox",
        "--root",
        "nosuch",
        "--as-root",
        "--",
        "/bin/true",
    ]);
    assert!(
        err.contains("nosuch") && err.contains("no root named"),
        "{err}"
    );

    let out = Watched::spawn(sandbox_cmd(
        &store,
        &["--root", "rootfs", "--as-root", "--", "/usr/bin/not-there"],
    ))
    .output();
    assert_eq!(out.status.code(), Some(127));
    let err = text(&out.stderr);
    assert!(
        err.contains("/usr/bin/not-there: not found inside the tree"),
        "{err}"
    );

    let err = store.fails(&["sandbox", "--root", "rootfs", "--", "/bin/true"]);
    assert!(err.contains("--as-root or --at"), "{err}");

    // Without CAP_SYS_ADMIN, the error names the missing privilege.
    if Command::new("setpriv").arg("--version").output().is_ok() {
        let out = Command::new("setpriv")
            .args(["--inh-caps=-all", "--bounding-set=-sys_admin", "--"])
            .arg(granary_bin())
            .args(["--store", &store.url()])
            .args([
                "sandbox",
                "--root",
                "rootfs",
                "--as-root",
                "--",
                "/bin/true",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("CAP_SYS_ADMIN"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_servers_gone(&store);
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
}

/// Processes whose command line is exactly `argv`.
fn processes_running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_of_granary_leaves_nothing() {
    require_sandbox!();
    let store = rootfs_store();
    let before = store_snapshot(&store);
    let marker = format!("{}", 40000 + std::process::id() % 20000);
    let mut cmd = sandbox_cmd(
        &store,
        &["--root", "rootfs", "--as-root", "--", "/bin/sleep", &marker],
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let sandbox = Watched::spawn(cmd);
    wait_until("the sandboxed sleep", Duration::from_secs(30), || {
        !processes_running(&["/bin/sleep", &marker]).is_empty()
    });
    // While it runs, the host sees none of its mounts.
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
    // SAFETY: kill of our own child.
    unsafe { libc::kill(sandbox.pid(), libc::SIGKILL) };
    let status = sandbox.output().status;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    wait_until(
        "the sandbox's processes to die",
        Duration::from_secs(10),
        || processes_running(&["/bin/sleep", &marker]).is_empty(),
    );
    assert_servers_gone(&store);
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
    store.ok(&["verify"]);
    assert_eq!(store_snapshot(&store), before, "the store changed");
}

#[test]
fn signals_reach_cmd() {
    require_sandbox!();
    let store = rootfs_store();
    for (sig, name) in [(libc::SIGTERM, "TERM"), (libc::SIGINT, "INT")] {
        let script = format!(
            "trap 'echo got-{name}; exit 7' {name}; echo ready; while :; do sleep 0.05; done"
        );
        let cmd = sandbox_cmd(
            &store,
            &[
                "--root",
                "rootfs",
                "--as-root",
                "--",
                "/bin/sh",
                "-c",
                &script,
            ],
        );
        let mut sandbox = Watched::spawn(cmd);
        let mut stdout = sandbox.child.as_mut().unwrap().stdout.take().unwrap();
        let mut buf = [0u8; 6];
        std::io::Read::read_exact(&mut stdout, &mut buf).unwrap();
        assert_eq!(&buf, b"ready\n");
        // SAFETY: kill of our own child.
        unsafe { libc::kill(sandbox.pid(), sig) };
        let out = sandbox.output();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
        assert!(rest.starts_with(&format!("got-{name}\n")), "{rest:?}");
    }
    assert_servers_gone(&store);
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
}

/// Shared FUSE servers running for `store` (their command line names its URL).
fn servers_of(store: &TestStore) -> Vec<u32> {
    let url = store.url();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.contains(&b"__sandbox-serve".as_slice()) && args.contains(&url.as_bytes())
            })
        })
        .collect()
}

#[test]
fn eight_at_once_share_one_mount_and_see_only_their_own_writes() {
    require_sandbox!();
    let store = rootfs_store();
    let sync = tempfile::tempdir().unwrap();
    let bind = format!("{}:/sync", sync.path().display());
    let n = 8;
    // Each writes its number and says it is ready, then waits for the test's "go" (so all 8
    // run at once while the test looks at the servers), then reads back.
    let script = "echo $ID > /etc/id; echo $ID > /etc/only-$ID; touch /sync/ready-$ID; \
         i=0; while [ ! -e /sync/go ]; do sleep 0.05; i=$((i+1)); [ $i -gt 1200 ] && exit 9; done; \
         cat /etc/id; ls /etc | grep only-";
    let runs: Vec<Watched> = (0..n)
        .map(|i| {
            let id = format!("ID={i}");
            Watched::spawn(sandbox_cmd(
                &store,
                &[
                    "--root",
                    "rootfs",
                    "--as-root",
                    "--bind",
                    &bind,
                    "--env",
                    &id,
                    "--",
                    "/bin/sh",
                    "-c",
                    script,
                ],
            ))
        })
        .collect();
    wait_until("all 8 sandboxes to start", LIMIT, || {
        std::fs::read_dir(sync.path()).unwrap().count() == n
    });
    // All 8 are running on one FUSE server, so one mount and one page cache.
    let servers = servers_of(&store);
    std::fs::write(sync.path().join("go"), "").unwrap();
    assert_eq!(servers.len(), 1, "servers: {servers:?}");
    for (i, w) in runs.into_iter().enumerate() {
        let out = w.output();
        assert!(out.status.success(), "sandbox {i}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            format!("{i}\nonly-{i}\n"),
            "sandbox {i} saw another's writes"
        );
    }
    assert_servers_gone(&store);
    assert!(servers_of(&store).is_empty());
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
    store.ok(&["verify"]);
}

/// The number of live inodes of a granary mount (its root's `user.granary.inodes`).
fn live_inodes(mountpoint: &Path) -> u64 {
    let p = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = [0u8; 32];
    // SAFETY: valid strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"user.granary.inodes".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n > 0, "no inode count on {}", mountpoint.display());
    text(&buf[..n as usize]).trim().parse().unwrap()
}

#[test]
fn reuses_a_running_granary_mount() {
    require_sandbox!();
    let store = rootfs_store();
    // The mount guard's granary inherits this process's environment: point it at a shared
    // runtime dir, and this test's sandboxes at the same one (other tests set their own).
    let shared = std::env::temp_dir().join(format!("granary-sandbox-reuse-{}", std::process::id()));
    std::fs::create_dir_all(&shared).unwrap();
    std::env::set_var("GRANARY_RUNTIME_DIR", &shared);
    std::os::unix::fs::symlink(&shared, runtime_dir(&store)).unwrap();
    for (extra, etc) in [(&["--root", "rootfs"][..], "etc"), (&[][..], "rootfs/etc")] {
        let m = Mount::start(&store.url(), extra);
        let entry = shared.join(format!("mounts/{}.json", m.pid()));
        wait_until(
            "the mount's registry entry",
            Duration::from_secs(30),
            || entry.exists(),
        );
        // --no-reuse runs on the shared server: the mount sees no new lookups...
        let before = live_inodes(m.path());
        let out = sh(&store, &["--no-reuse"], "cat /etc/passwd");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "root:x:0:0:root:/root:/bin/sh\n");
        assert_eq!(live_inodes(m.path()), before);
        assert_servers_gone(&store);
        // ...by default the sandbox uses the mount: /etc and /etc/passwd are looked up in it.
        let out = sh(&store, &[], "cat /etc/passwd; echo x > /etc/motd");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "root:x:0:0:root:/root:/bin/sh\n");
        assert!(
            live_inodes(m.path()) >= before + 2,
            "the sandbox did not use the mount"
        );
        assert!(servers_of(&store).is_empty());
        assert_eq!(
            std::fs::read_to_string(m.path().join(etc).join("motd")).unwrap(),
            "from the store\n"
        );
        drop(m);
        wait_until("the registry entry to go", Duration::from_secs(10), || {
            !entry.exists()
        });
    }
    assert_servers_gone(&store);
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&shared);
}

#[test]
fn at_path_binds_tmpfs_env_keep_upper() {
    require_sandbox!();
    let store = rootfs_store();
    let tmp = tempfile::tempdir().unwrap();
    let at = tmp.path().join("at");
    let host = tmp.path().join("host");
    let keep = tmp.path().join("keep");
    std::fs::create_dir_all(&at).unwrap();
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("data"), "host data\n").unwrap();
    let bind = format!("{}:/mnt/host:ro", host.display());
    let script = format!(
        "cat {at}/etc/motd; cat {at}/mnt/host/data; touch {at}/mnt/host/nope 2>/dev/null || echo ro; \
         mount | grep -c ' {at}/scratch type tmpfs'; echo $GREETING; echo kept > {at}/etc/kept",
        at = at.display()
    );
    let out = Watched::spawn(sandbox_cmd(
        &store,
        &[
            "--root",
            "rootfs",
            "--at",
            at.to_str().unwrap(),
            "--bind",
            &bind,
            "--tmpfs",
            "/scratch",
            "--env",
            "GREETING=hello there",
            "--keep-upper",
            keep.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            &script,
        ],
    ))
    .output();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "from the store\nhost data\nro\n1\nhello there\n"
    );
    // The host's view of --at is untouched; the kept upper layer holds the write.
    assert_eq!(std::fs::read_dir(&at).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_to_string(keep.join("upper/etc/kept")).unwrap(),
        "kept\n"
    );
    assert!(!host.join("nope").exists());
    assert_servers_gone(&store);
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
}

#[test]
fn terminal_ctrl_c_reaches_cmd_once() {
    require_sandbox!();
    if Command::new("script").arg("--version").output().is_err() {
        assert_ne!(
            std::env::var("GRANARY_REQUIRE_FUSE").as_deref(),
            Ok("1"),
            "`script` (util-linux) is needed for the terminal test"
        );
        eprintln!("skipping: no `script` to make a terminal");
        return;
    }
    let store = rootfs_store();
    // `script` runs the sandbox on a pseudo-terminal and copies our stdin to it: a 0x03 byte
    // there is a Ctrl-C, which the kernel sends to the whole foreground process group.
    // `script` starts `$SHELL -c CMD`; a shell left in between (dash does not exec its last
    // command) would itself die of the Ctrl-C, so $SHELL is this script, which execs granary.
    let run = store.dir.path().join("run.sh");
    std::fs::write(
        &run,
        format!(
            "#!/bin/sh\nexec env GRANARY_RUNTIME_DIR='{}' '{}' --store '{}' sandbox --keep-warm=0 --root rootfs --as-root -- \
             /bin/sh -c 'n=0; trap \"n=$((n+1))\" INT; echo ready; sleep 1; sleep 1; echo n=$n; exit 3'\n",
            runtime_dir(&store).display(),
            granary_bin().display(),
            store.url()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("script");
    cmd.args(["-qec", "granary-sandbox", "/dev/null"])
        .env("SHELL", &run)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut w = Watched::spawn(cmd);
    let child = w.child.as_mut().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !text(&seen).contains("ready") {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "no 'ready': {}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    std::thread::sleep(Duration::from_millis(200));
    std::io::Write::write_all(&mut stdin, b"\x03").unwrap();
    std::io::Read::read_to_end(&mut stdout, &mut seen).unwrap();
    let out = w.output();
    let shown = text(&seen).replace('\r', "");
    assert!(
        shown.contains("n=1\n"),
        "CMD saw Ctrl-C other than once: {shown:?}"
    );
    assert_eq!(out.status.code(), Some(3), "{shown}");
    drop(stdin);
    assert_servers_gone(&store);
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
}

/// The capability bounding set CMD runs with, from its /proc/self/status.
fn cap_bnd(store: &TestStore, extra: &[&str]) -> u64 {
    let out = sh(store, extra, "grep CapBnd /proc/self/status");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    u64::from_str_radix(o.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

#[test]
fn cmd_runs_without_the_capabilities_it_does_not_need() {
    require_sandbox!();
    let store = rootfs_store();
    const SYS_ADMIN: u64 = 1 << 21;
    const CHOWN: u64 = 1;
    let default = cap_bnd(&store, &[]);
    assert_eq!(default & SYS_ADMIN, 0, "sys_admin kept: {default:x}");
    assert_ne!(default & CHOWN, 0, "chown dropped: {default:x}");
    // So CMD cannot mount (nor leave the sandbox that way).
    let out = sh(
        &store,
        &[],
        "mkdir -p /mnt/x && mount -t tmpfs t /mnt/x && echo mounted",
    );
    assert!(
        !text(&out.stdout).contains("mounted"),
        "{}",
        text(&out.stdout)
    );
    // Configurable both ways.
    assert_ne!(cap_bnd(&store, &["--all-caps"]) & SYS_ADMIN, 0);
    assert_eq!(cap_bnd(&store, &["--cap", "sys_ptrace"]), 1 << 19);
    let out = sandbox_cmd(
        &store,
        &[
            "--root",
            "rootfs",
            "--as-root",
            "--cap",
            "everything",
            "--",
            "true",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
}

#[test]
fn no_network_leaves_cmd_only_loopback() {
    require_sandbox!();
    let store = rootfs_store();
    let out = sh(&store, &["--no-network"], "cat /proc/net/dev");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    let ifaces: Vec<&str> = o
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"], "{o}");
    // And loopback is up.
    let out = sh(&store, &["--no-network"], "ip link show lo");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.contains("lo:") && o.contains("UP"), "{o}");
}

#[test]
fn links_in_the_tree_cannot_lead_binds_out_of_it() {
    require_sandbox!();
    let store = rootfs_store();
    let host = tempfile::tempdir().unwrap();
    let (abs, rel) = (host.path().join("abs"), host.path().join("rel"));
    std::fs::create_dir_all(&abs).unwrap();
    std::fs::create_dir_all(&rel).unwrap();
    // A tree whose links point at host directories, absolutely and relatively.
    let root = store.dir.path().join("rootfs");
    std::os::unix::fs::symlink(&abs, root.join("evil")).unwrap();
    let up = "../".repeat(root.components().count() + 2);
    std::os::unix::fs::symlink(format!("{up}{}", rel.display()), root.join("evil2")).unwrap();
    store.ok(&["import", root.to_str().unwrap(), "--name", "hostile"]);
    let src = store.dir.path().join("bind-src");
    std::fs::create_dir_all(&src).unwrap();
    let file = store.dir.path().join("bind-file");
    std::fs::write(&file, b"x").unwrap();
    std::os::unix::fs::symlink("/etc", root.join("inside")).unwrap();
    store.ok(&["import", root.to_str().unwrap(), "--name", "hostile2"]);
    let run = |root: &str, args: &[String]| {
        let mut a: Vec<&str> = vec!["--root", root, "--as-root"];
        a.extend(args.iter().map(String::as_str));
        a.extend([
            "--",
            "/bin/sh",
            "-c",
            "ls -d /etc/newdir /etc/newfile /etc/t",
        ]);
        Watched::spawn(sandbox_cmd(&store, &a)).output()
    };
    // Through links out of the tree: refused, saying why, with the setup status.
    for (dst, kind) in [
        ("/evil/newdir", "--bind"),
        ("/evil2/newfile", "--bind"),
        ("/evil/t", "--tmpfs"),
    ] {
        let arg = if kind == "--bind" {
            let s = if dst.ends_with("file") { &file } else { &src };
            format!("{}:{dst}", s.display())
        } else {
            dst.to_string()
        };
        let out = run("hostile", &[kind.to_string(), arg]);
        assert_eq!(out.status.code(), Some(125), "{dst}: {}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.contains(dst) && err.contains("inside the tree"),
            "{err}"
        );
    }
    // Links that stay inside the tree are followed there, as they would be inside it.
    let out = run(
        "hostile2",
        &[
            "--bind".into(),
            format!("{}:/inside/newdir", src.display()),
            "--bind".into(),
            format!("{}:/inside/newfile", file.display()),
            "--tmpfs".into(),
            "/inside/t".into(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // On the host, nothing was created.
    let made: Vec<_> = walk_files(host.path())
        .into_iter()
        .chain(
            std::fs::read_dir(&abs)
                .unwrap()
                .chain(std::fs::read_dir(&rel).unwrap())
                .map(|e| e.unwrap().path()),
        )
        .collect();
    assert!(made.is_empty(), "created on the host: {made:?}");
}

#[test]
fn a_fuse_view_that_dies_under_cmd_fails_the_sandbox() {
    require_sandbox!();
    let store = rootfs_store();
    // CMD ignores read errors and exits 0 either way.
    let running = Watched::spawn(sandbox_cmd(
        &store,
        &[
            "--root",
            "rootfs",
            "--as-root",
            "--",
            "/bin/sh",
            "-c",
            "sleep 2; cat /etc/motd; exit 0",
        ],
    ));
    // Find the shared server by its pid file, then kill it.
    let sandbox_dir = runtime_dir(&store).join("sandbox");
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid: i32 = loop {
        let found = walk_files(&sandbox_dir)
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n == "server.pid"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse().ok());
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no shared server appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let out = running.output();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("FUSE view of the tree went away"),
        "{}",
        text(&out.stderr)
    );
    assert_servers_gone(&store);
}

/// What is left of shared servers in the runtime directory: state directories, and the
/// servers and reapers of this store.
fn leftovers(store: &TestStore) -> (Vec<PathBuf>, Vec<u32>, Vec<u32>) {
    let dirs: Vec<PathBuf> = std::fs::read_dir(runtime_dir(store).join("sandbox"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    let rt = runtime_dir(store).to_string_lossy().into_owned();
    let reapers: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).into_owned();
                c.contains("__sandbox-reap") && c.contains(&rt)
            })
        })
        .collect();
    (dirs, servers_of(store), reapers)
}

#[test]
fn sequential_sandboxes_reuse_a_warm_server_that_then_leaves_nothing() {
    require_sandbox!();
    let store = rootfs_store();
    let run = || {
        let out = sh(&store, &["--keep-warm", "3s"], "cat /etc/motd");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "from the store\n");
    };
    run();
    let first = servers_of(&store);
    assert_eq!(first.len(), 1, "one server stays warm after the sandbox");
    for _ in 0..2 {
        run();
        assert_eq!(
            servers_of(&store),
            first,
            "a later job started another server"
        );
    }
    // Past the keep-warm time: no server, no reaper, no state directory, no mount.
    wait_until("the warm server to leave", Duration::from_secs(20), || {
        leftovers(&store) == (vec![], vec![], vec![])
    });
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());

    // SIGKILL of the server while it is warm: its reaper removes what it left.
    run();
    let server = servers_of(&store);
    assert_eq!(server.len(), 1);
    assert_eq!(
        leftovers(&store).2.len(),
        1,
        "a reaper runs beside the server"
    );
    // SAFETY: kill of a process this test started (through granary).
    unsafe { libc::kill(server[0] as i32, libc::SIGKILL) };
    wait_until(
        "the killed server's leftovers to go",
        Duration::from_secs(20),
        || leftovers(&store) == (vec![], vec![], vec![]),
    );
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
    // And the next job simply starts a new one.
    run();
    assert_eq!(servers_of(&store).len(), 1);
    for pid in servers_of(&store) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    wait_until(
        "the server to stop on SIGTERM",
        Duration::from_secs(20),
        || leftovers(&store).1.is_empty(),
    );
}

#[test]
fn setup_failures_exit_125_with_one_line() {
    require_sandbox!();
    let store = rootfs_store();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--root", "nosuch", "--as-root", "--", "/bin/true"],
            "no root named",
        ),
        (
            &["--root", "rootfs", "--", "/bin/true"],
            "--as-root or --at",
        ),
        (
            &[
                "--root",
                "rootfs",
                "--at",
                "/nonexistent-at",
                "--",
                "/bin/true",
            ],
            "/nonexistent-at",
        ),
        (
            &[
                "--root",
                "rootfs",
                "--as-root",
                "--bind",
                "/nonexistent-src:/x",
                "--",
                "/bin/true",
            ],
            "/nonexistent-src",
        ),
        (
            &[
                "--root",
                "rootfs",
                "--as-root",
                "--cap",
                "not_a_cap",
                "--",
                "/bin/true",
            ],
            "not_a_cap",
        ),
        (
            &[
                "--root",
                "rootfs",
                "--as-root",
                "--keep-warm",
                "soon",
                "--",
                "/bin/true",
            ],
            "soon",
        ),
        (
            &[
                "--root",
                "rootfs",
                "--as-root",
                "--no-such-flag",
                "--",
                "/bin/true",
            ],
            "--no-such-flag",
        ),
        (&["--root", "rootfs", "--as-root"], "CMD"),
    ];
    for (args, needle) in cases {
        let out = Watched::spawn(sandbox_cmd(&store, args)).output();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }
    assert_eq!(leftovers(&store), (vec![], vec![], vec![]));
}

/// A root filesystem holding the host's python3 with what `import json` needs (and the
/// bytecode of it), copied with its times; `None` where the host has no python3.
fn python_rootfs(dest: &Path) -> Option<PathBuf> {
    let list = Command::new("python3")
        .args([
            "-c",
            "import sys, os, importlib.util, json\n\
             print(os.path.realpath(sys.executable))\n\
             for m in list(sys.modules.values()):\n\
             \x20   f = getattr(m, '__file__', None)\n\
             \x20   if f:\n\
             \x20       print(f)\n\
             \x20       if f.endswith('.py'):\n\
             \x20           print(importlib.util.cache_from_source(f))\n",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8(list.stdout).ok()?;
    let mut lines = text.lines();
    let exe = PathBuf::from(lines.next()?);
    let mut files: Vec<PathBuf> = vec![exe.clone()];
    files.extend(lines.map(PathBuf::from).filter(|p| p.exists()));
    files.sort();
    files.dedup();
    // The shared libraries of the interpreter and of every extension module.
    let mut libs = Vec::new();
    for f in &files {
        if f == &exe || f.extension().is_some_and(|e| e == "so") {
            let out = Command::new("ldd").arg(f).output().ok()?;
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                let path = l.split("=>").last().unwrap_or(l).split_whitespace().next();
                if let Some(p) = path.filter(|p| p.starts_with('/')) {
                    libs.push(PathBuf::from(p));
                }
            }
        }
    }
    let copy = |args: &[&str], paths: &[PathBuf]| {
        // From /: GNU cp 9.1 fails to set the attributes of --parents directories of
        // absolute sources otherwise.
        let st = Command::new("cp")
            .current_dir("/")
            .args(args)
            .args(paths)
            .arg(dest)
            .status()
            .unwrap();
        assert!(st.success(), "cp {args:?}");
    };
    std::fs::create_dir_all(dest.join("tmp")).unwrap();
    // With their times (-a), so each .pyc matches its source.
    copy(&["-a", "--parents"], &files);
    libs.sort();
    libs.dedup();
    copy(&["-L", "--parents"], &libs);
    // Bytecode the host lacks is made now, against the copied (time-kept) sources.
    let lib = files
        .iter()
        .find(|f| f.ends_with("json/__init__.py"))?
        .parent()?
        .parent()?
        .to_path_buf();
    let inside = dest.join(lib.strip_prefix("/").ok()?);
    let st = Command::new("python3")
        .args(["-m", "compileall", "-q"])
        .arg(&inside)
        .status()
        .ok()?;
    assert!(st.success());
    Some(exe)
}

#[test]
fn python_in_a_sandbox_uses_its_shipped_bytecode() {
    require_sandbox!();
    let store = TestStore::new();
    let root = store.dir.path().join("py");
    let Some(python) = python_rootfs(&root) else {
        eprintln!("skipping: no python3 on this host");
        return;
    };
    store.ok(&["import", "--name", "py", root.to_str().unwrap()]);
    store.ok(&[
        "import",
        "--no-times",
        "--name",
        "py-untimed",
        root.to_str().unwrap(),
    ]);
    let run = |name: &str| {
        let out = Watched::spawn(sandbox_cmd(
            &store,
            &[
                "--root",
                name,
                "--as-root",
                "--",
                python.to_str().unwrap(),
                "-v",
                "-c",
                "import json; print(json.dumps([1]))",
            ],
        ))
        .output();
        let err = text(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert_eq!(text(&out.stdout), "[1]\n");
        err
    };
    let log = run("py");
    let json_pyc = log
        .lines()
        .filter(|l| l.contains("json/__pycache__") && l.contains(" matches "))
        .count();
    assert!(json_pyc >= 3, "json's bytecode was not used:\n{log}");
    assert!(
        !log.contains("bytecode is stale") && !log.contains("# wrote "),
        "bytecode was found stale and rewritten:\n{log}"
    );
    // The same tree imported without times (mtime 1): every module's bytecode is stale.
    let log = run("py-untimed");
    assert!(log.contains("bytecode is stale"), "{log}");
    assert_servers_gone(&store);
}

#[test]
fn a_file_cache_outlives_the_server_and_serves_the_next_one_identical_bytes() {
    require_sandbox!();
    let store = rootfs_store();
    let cache = store.dir.path().join("file-cache");
    let cache_arg = cache.to_str().unwrap().to_string();
    let busybox = std::fs::read(busybox().unwrap()).unwrap();
    let want = format!("{}\n", busybox.len());
    let job = |keep: &str| {
        let out = sh(
            &store,
            &["--file-cache", &cache_arg, "--keep-warm", keep],
            "wc -c < /bin/busybox; cat /bin/busybox > /tmp/copy; cmp /tmp/copy /bin/busybox && echo same",
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{want}same\n"));
    };
    let cached = || -> Vec<Vec<u8>> {
        std::fs::read_dir(&cache)
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    // The warm server copies busybox (above the cache's smallest size) into the cache.
    job("5s");
    wait_until("busybox in the file cache", Duration::from_secs(20), || {
        cached().contains(&busybox)
    });
    for pid in servers_of(&store) {
        // SAFETY: a server this test started (through granary).
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    wait_until("the server to leave", Duration::from_secs(20), || {
        leftovers(&store) == (vec![], vec![], vec![])
    });
    // A new server serves the cached copy: same bytes, the cache unchanged, nothing left.
    job("0");
    assert_eq!(cached(), vec![busybox]);
    wait_until(
        "the second server to leave",
        Duration::from_secs(20),
        || leftovers(&store) == (vec![], vec![], vec![]),
    );
    assert_eq!(sandbox_mounts(&store), Vec::<String>::new());
}

#[test]
fn a_sandbox_records_a_trace_and_the_next_sandbox_replays_it() {
    require_sandbox!();
    let store = rootfs_store();
    let rec = store.dir.path().join("rec");
    let out = sh(
        &store,
        &["--record-trace", rec.to_str().unwrap()],
        "cat /bin/busybox > /dev/null; cat /etc/motd",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from the store\n");
    // Written by the sandbox's own server, which the sandbox waited for.
    assert!(rec.is_file(), "no recording");
    store.ok(&["trace", "save", "rootfs", rec.to_str().unwrap()]);
    let listed = text(&store.ok(&["trace", "list", "rootfs", "--entries"]).stdout);
    let busybox = std::fs::read(busybox().unwrap()).unwrap();
    let motd = blake3::hash(b"from the store\n").to_hex().to_string();
    assert!(listed.contains(&format!("chunk {motd}")), "{listed}");
    let bb = blake3::hash(&busybox).to_hex().to_string();
    assert!(
        listed.contains(&format!("blob {bb}")) || listed.contains(&format!("chunk {bb}")),
        "{listed}"
    );
    wait_until(
        "the recording server to leave",
        Duration::from_secs(20),
        || leftovers(&store) == (vec![], vec![], vec![]),
    );

    // The next sandbox's server replays the root's trace: its FUSE view (the overlay's lower
    // layer, seen from a sandbox placed --at a directory) says so, and the job's reads hit.
    let at = store.dir.path().join("at");
    std::fs::create_dir_all(&at).unwrap();
    let lower = runtime_dir(&store)
        .canonicalize()
        .unwrap()
        .join("work/lower");
    let script = format!(
        "for i in $(seq 400); do getfattr --only-values -n user.granary.trace {l} 2>/dev/null | grep -q '^state done' && break; sleep 0.05; done; \
         cat {a}/bin/busybox {a}/etc/motd > /dev/null; getfattr --only-values -n user.granary.trace {l}",
        l = lower.display(),
        a = at.display()
    );
    let out = Watched::spawn(sandbox_cmd(
        &store,
        &[
            "--root",
            "rootfs",
            "--at",
            at.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            &script,
        ],
    ))
    .output();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let state = text(&out.stdout);
    assert!(
        state.contains("replay default") && state.contains("state done"),
        "{state}"
    );
    let hits: u64 = state
        .lines()
        .find_map(|l| l.strip_prefix("hits "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(hits >= 2, "{state}");
    // --no-trace: no replay.
    let out = sh(&store, &["--no-trace"], "cat /etc/motd");
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the servers to leave", Duration::from_secs(20), || {
        leftovers(&store) == (vec![], vec![], vec![])
    });
}
