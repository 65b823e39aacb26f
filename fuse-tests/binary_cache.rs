//! `nix copy --to http://...` into `granary serve-cache`, then `granary mount` of the same
//! store: the uploaded store path appears as a root and its mounted tree has the `nix-hash`
//! of the original. Needs FUSE and Nix (each skips loudly unless required).

#[path = "../tests/binary_cache_common/mod.rs"]
mod binary_cache_common;
mod common;

use binary_cache_common::{have_nix, nix_hash, real, Nix, Server};
use common::*;

#[test]
fn uploaded_store_path_mounts_with_its_nix_hash() {
    require_fuse!();
    if !have_nix() {
        return;
    }
    let nix = Nix::new();
    let work = nix.dir.path().join("src");
    gen_tree(&work.join("pkg"), 0);
    let src_store = nix.chroot("src-store");
    let path = nix.add(&src_store, &work.join("pkg"));
    let ts = TestStore::new();
    {
        let server = Server::start(&ts, &[]);
        let src = src_store.to_str().unwrap();
        nix.ok(
            "nix",
            &["copy", "--from", src, "--to", &server.url(), &path],
        );
    }
    let base = &path["/nix/store/".len()..];
    let roots = String::from_utf8(ts.ok(&["roots"]).stdout).unwrap();
    assert!(roots.lines().any(|r| r == base), "{base} not in {roots}");
    let m = Mount::start(&ts.url(), &[]);
    assert_eq!(
        nix_hash(&m.path().join(base)),
        nix_hash(&real(&src_store, &path))
    );
    assert_same_tree(&real(&src_store, &path), &m.path().join(base));
}
