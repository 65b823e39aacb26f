//! An unmodified Nix (Debian `nix-bin`) on a granary mount at `/nix/store`.
//!
//! Every Nix command runs in a private mount namespace (`unshare --mount --pid --fork`) where
//! test directories are bound over `/nix/store` and `/nix/var/nix`: the machine's own store
//! and database are never touched, and when the namespace's first process ends, everything in
//! it (granary, its mount) goes with it. The first namespace builds real store paths; the
//! second is a "fresh machine": an empty database, and a granary mount with `--nix` at
//! `/nix/store`, registered with `granary nix-db | nix-store --load-db`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn have_nix() -> bool {
    have_nix_tool("nix-store", "Nix on a mounted /nix/store")
        && have_nix_tool("unshare", "Nix on a mounted /nix/store")
}

/// Runs `script` with bash in a private mount and PID namespace, under a time limit; the
/// whole namespace dies with it.
fn in_namespace(script: &str, limit_secs: u32) -> Output {
    assert!(
        Path::new("/nix/store").is_dir() && Path::new("/nix/var/nix").is_dir(),
        "/nix/store and /nix/var/nix must exist to bind test directories over them"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.sh");
    std::fs::write(&file, format!("set -euo pipefail\n{script}")).unwrap();
    Command::new("timeout")
        .args(["-k", "5", &limit_secs.to_string()])
        .args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "bash",
        ])
        .arg(&file)
        .env("GRANARY", granary_bin())
        .env(
            "NIX_CONFIG",
            "build-users-group =\nsubstituters =\nsandbox = false\n\
             experimental-features = nix-command\n",
        )
        .output()
        .expect("run unshare")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(str::to_string).collect();
    v.sort();
    v
}

/// What the building machine's Nix says of each path of the closure.
struct Oracle {
    out: String,
    drv: String,
    closure: Vec<String>,
    refs: BTreeMap<String, Vec<String>>,
    deriver: BTreeMap<String, String>,
    sigs: BTreeMap<String, Vec<String>>,
    /// Content address, empty for input-addressed paths.
    ca: BTreeMap<String, String>,
    dir: PathBuf,
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Builds real store paths in a private namespace: two `nix-store --add`ed trees, a static
/// busybox as a store path, and a `nix-build` whose output is a script run by that busybox
/// (so it refers to it). Returns what Nix recorded.
fn build_store(t: &Path) -> Oracle {
    let src = t.join("src");
    gen_tree(&src.join("data"), 1 << 20);
    write(
        &src.join("notes/README"),
        b"hello from a store path\n",
        false,
    );
    let bb = src.join("busybox");
    std::fs::create_dir_all(bb.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", bb.join("bin/busybox")).expect("busybox-static");
    std::os::unix::fs::symlink("busybox", bb.join("bin/sh")).unwrap();
    let a = t.join("a");
    for d in ["store", "var", "home", "oracle"] {
        std::fs::create_dir_all(a.join(d)).unwrap();
    }
    let script = format!(
        r#"
T={a}
mount --bind $T/store /nix/store
mount --bind $T/var /nix/var/nix
export HOME=$T/home
data=$(nix-store --add {src}/data)
notes=$(nix-store --add {src}/notes)
bb=$(nix-store --add {src}/busybox)
cat > $T/hello.nix <<EOF
derivation {{
  name = "hello";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  bb = builtins.storePath "$bb";
  notes = builtins.storePath "$notes";
  args = [ "-c" "/bin/mkdir -p \$out/bin && printf '#!%s/bin/sh\\necho hello from %s\\ncat %s/README\\n' \$bb \$out \$notes > \$out/bin/hello && /bin/chmod +x \$out/bin/hello" ];
}}
EOF
out=$(nix-build $T/hello.nix --no-out-link)
drv=$(nix-store -q --deriver $out)
nix-store --generate-binary-cache-key test-key-1 $T/sk $T/pk
nix store sign --key-file $T/sk $out $data
echo $out > $T/oracle/out
echo $drv > $T/oracle/drv
nix-store -qR $out $drv $data > $T/oracle/closure
nix-store -qR $out > $T/oracle/closure-out
for p in $(cat $T/oracle/closure); do
  b=$(basename $p)
  nix-store -q --references $p > $T/oracle/refs-$b
  nix-store -q --deriver $p > $T/oracle/deriver-$b
  # A .drv installable means its outputs unless --derivation says otherwise.
  if [[ $p == *.drv ]]; then d=--derivation; else d=; fi
  nix path-info $d --sigs $p > $T/oracle/sigs-$b
  nix-store --dump $p > $T/oracle/nar-$b
done
"#,
        a = a.display(),
        src = src.display()
    );
    ok(&in_namespace(&script, 240), "building store paths");
    let o = a.join("oracle");
    let closure = lines(&read(&o.join("closure")));
    let mut refs = BTreeMap::new();
    let mut deriver = BTreeMap::new();
    let mut sigs = BTreeMap::new();
    let mut ca = BTreeMap::new();
    for p in &closure {
        let b = basename(p).to_string();
        refs.insert(b.clone(), lines(&read(&o.join(format!("refs-{b}")))));
        let d = read(&o.join(format!("deriver-{b}"))).trim().to_string();
        deriver.insert(b.clone(), d);
        // `nix path-info --sigs` prints the path, "ultimate" for paths built here (a trust
        // flag, not a signature), "ca:CA" for content-addressed ones, then the signatures.
        let text = read(&o.join(format!("sigs-{b}")));
        let tokens = text.split_ascii_whitespace().skip(1);
        let s: Vec<String> = tokens
            .clone()
            .filter(|s| *s != "ultimate" && !s.starts_with("ca:"))
            .map(str::to_string)
            .collect();
        let c = tokens
            .filter_map(|s| s.strip_prefix("ca:"))
            .collect::<Vec<_>>()
            .join("");
        sigs.insert(b.clone(), s);
        ca.insert(b, c);
    }
    Oracle {
        out: read(&o.join("out")).trim().to_string(),
        drv: read(&o.join("drv")).trim().to_string(),
        closure,
        refs,
        deriver,
        sigs,
        ca,
        dir: o,
    }
}

/// A field of `granary narinfo NAME`.
fn narinfo_field(ts: &TestStore, name: &str, key: &str) -> Vec<String> {
    let text = String::from_utf8(ts.ok(&["narinfo", name]).stdout).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}: ")))
        .map(str::to_string)
        .collect()
}

#[test]
fn nix_runs_on_a_mounted_store_registered_with_nix_db() {
    require_fuse!();
    if !have_nix() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let o = build_store(t);
    assert!(o.closure.len() >= 4, "closure: {:?}", o.closure);
    assert!(o.drv.ends_with(".drv"));
    let out_b = basename(&o.out).to_string();
    let drv_b = basename(&o.drv).to_string();
    // The build really refers to another store path, and Nix did not count the .drv's
    // own output as one of its references.
    assert!(o.refs[&out_b].iter().any(|r| r.ends_with("-busybox")));
    assert!(!o.refs[&drv_b].iter().any(|r| r.ends_with(&out_b)));
    assert!(!o.sigs[&out_b].is_empty(), "the output was signed");
    assert!(o.ca[&drv_b].starts_with("text:sha256:"), "{:?}", o.ca);

    // import-store with Nix's database: Nix's metadata, no word about .links.
    let ts = TestStore::new();
    let db = t.join("a/var/db/db.sqlite");
    let store_dir = t.join("a/store");
    std::fs::create_dir_all(store_dir.join(".links")).unwrap();
    let imp = ts.ok(&[
        "import-store",
        store_dir.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&imp.stderr);
    assert!(!err.contains(".links"), "{err}");
    for p in &o.closure {
        let b = basename(p);
        let refs = narinfo_field(&ts, b, "References");
        let refs: Vec<String> = refs
            .first()
            .map(|r| {
                r.split_ascii_whitespace()
                    .map(|x| format!("/nix/store/{x}"))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(lines(&refs.join("\n")), o.refs[b], "references of {b}");
        let deriver = narinfo_field(&ts, b, "Deriver");
        let want = if o.deriver[b] == "unknown-deriver" {
            vec![]
        } else {
            vec![basename(&o.deriver[b]).to_string()]
        };
        assert_eq!(deriver, want, "deriver of {b}");
        let mut sigs = narinfo_field(&ts, b, "Sig");
        sigs.sort();
        let mut want = o.sigs[b].clone();
        want.sort();
        assert_eq!(sigs, want, "signatures of {b}");
        let ca = narinfo_field(&ts, b, "CA").join("");
        assert_eq!(ca, o.ca[b], "CA of {b}");
    }

    // A path changed after Nix registered it fails, by name; the others are imported.
    let changed = t.join("changed");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&store_dir)
        .arg(&changed)
        .status()
        .unwrap();
    assert!(cp.success());
    let notes = o
        .closure
        .iter()
        .map(|p| basename(p))
        .find(|b| b.ends_with("-notes"))
        .unwrap();
    let readme = changed.join(notes).join("README");
    let mut perm = std::fs::metadata(&readme).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&readme, perm).unwrap();
    std::fs::write(&readme, b"changed behind Nix's back\n").unwrap();
    let other = TestStore::new();
    let out = other
        .cmd()
        .args([
            "import-store",
            changed.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains(notes) && l.contains("changed since Nix registered it")),
        "{err}"
    );
    let held = String::from_utf8(other.ok(&["roots"]).stdout).unwrap();
    assert!(!held.contains(notes) && held.contains(&out_b), "{held}");

    // Without the database, a .drv's references are still its inputs, not its outputs.
    let scan = TestStore::new();
    scan.ok(&["import-store", store_dir.to_str().unwrap(), "--no-db"]);
    let refs = narinfo_field(&scan, &drv_b, "References");
    let refs: Vec<String> = refs
        .first()
        .map(|r| {
            r.split_ascii_whitespace()
                .map(|x| format!("/nix/store/{x}"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(lines(&refs.join("\n")), o.refs[&drv_b]);

    // A fresh machine: empty store directory, empty database, a granary mount.
    let b = t.join("b");
    for d in ["var", "home", "res"] {
        std::fs::create_dir_all(b.join(d)).unwrap();
    }
    let paths: Vec<String> = o.closure.clone();
    let script = format!(
        r#"
T={b}
mount --bind $T/var /nix/var/nix
export HOME=$T/home
# Straight over this namespace's view of /nix/store, whatever it holds.
"$GRANARY" --store {url} mount /nix/store --nix --nonempty 2> $T/res/mount.err &
mounted() {{ awk '$5 == "/nix/store" && / - fuse/ {{ f = 1 }} END {{ exit !f }}' /proc/self/mountinfo; }}
for i in $(seq 300); do
  mounted && break
  sleep 0.05
done
mounted || {{ echo "granary did not mount /nix/store" >&2; exit 1; }}
stat -c '%u %g %a' /nix/store > $T/res/stat
getent group nixbld | cut -d: -f3 > $T/res/nixbld || true
ls -a /nix/store > $T/res/ls
"$GRANARY" --store {url} nix-db > $T/res/db.txt
nix-store --load-db < $T/res/db.txt
set +e
nix-store --verify --check-contents > $T/res/verify.out 2>&1
echo $? > $T/res/verify.rc
set -e
nix-store -qR {out} > $T/res/closure
for p in {paths}; do
  b=$(basename $p)
  nix-store -q --references $p > $T/res/refs-$b
  nix-store -q --deriver $p > $T/res/deriver-$b
  nix-store --dump $p > $T/res/nar-$b
done
{out}/bin/hello > $T/res/hello
touch /nix/store/x 2> $T/res/touch.err || true
kill %1
wait %1 || true
"#,
        b = b.display(),
        url = ts.url(),
        out = o.out,
        paths = paths.join(" "),
    );
    let run = in_namespace(&script, 240);
    let res = b.join("res");
    let mount_err = std::fs::read_to_string(res.join("mount.err")).unwrap_or_default();
    ok(
        &run,
        &format!("Nix on the mount (granary said: {mount_err})"),
    );

    // The top level is what Nix expects of its store directory.
    let stat = read(&res.join("stat"));
    let gid = read(&res.join("nixbld")).trim().to_string();
    let gid = if gid.is_empty() { "0".to_string() } else { gid };
    assert_eq!(stat.trim(), format!("0 {gid} 1775"));
    let listing = lines(&read(&res.join("ls")));
    assert!(listing.contains(&".links".to_string()), "{listing:?}");
    assert_eq!(listing.len(), 2 + 1 + o.closure.len(), "{listing:?}");
    assert!(read(&res.join("touch.err")).contains("Read-only file system"));

    let verify = read(&res.join("verify.out"));
    assert_eq!(read(&res.join("verify.rc")).trim(), "0", "{verify}");
    assert!(
        !verify.to_lowercase().contains("error"),
        "nix-store --verify --check-contents: {verify}"
    );
    assert_eq!(
        lines(&read(&res.join("closure"))),
        lines(&read(&o.dir.join("closure-out")))
    );
    for p in &o.closure {
        let b = basename(p);
        assert_eq!(
            lines(&read(&res.join(format!("refs-{b}")))),
            o.refs[b],
            "references of {b}"
        );
        assert_eq!(
            read(&res.join(format!("deriver-{b}"))).trim(),
            o.deriver[b],
            "deriver of {b}"
        );
        let got = std::fs::read(res.join(format!("nar-{b}"))).unwrap();
        let want = std::fs::read(o.dir.join(format!("nar-{b}"))).unwrap();
        assert!(
            got == want,
            "nix-store --dump of {b} differs from the original"
        );
    }
    let hello = read(&res.join("hello"));
    assert!(
        hello.contains(&format!("hello from {}", o.out))
            && hello.contains("hello from a store path"),
        "{hello}"
    );
}
