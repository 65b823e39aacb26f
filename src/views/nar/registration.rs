//! `granary nix-db`: the store's Nix paths in the registration format that
//! `nix-store --load-db` and `nix-store --register-validity --hash-given` read, so that a
//! Nix whose `/nix/store` is a granary mount considers those paths valid.
//!
//! Per path: the store path, its NAR hash (base16), NAR size, deriver (or an empty line), the
//! number of references and one line per reference. Nix refuses a registration whose
//! references are not valid, so the output is always a closed set.

use std::collections::{BTreeMap, VecDeque};

use crate::model::castore::NixInfo;
use crate::store::{Store, StoreError};
use crate::views::nar::NarHash;

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("root {0}: not in the store")]
    NoRoot(String),
    #[error("root {0}: has no Nix metadata (import it with import-store or import-nar)")]
    NotNix(String),
    #[error("{from} refers to {to}, which the store does not hold as a Nix path")]
    Dangling { from: String, to: String },
    #[error("{0}: recorded NAR hash is not 32 bytes")]
    BadHash(String),
}

/// The closure of `roots` (every root carrying Nix metadata when `roots` is empty), sorted by
/// name.
pub async fn closure(
    store: &Store,
    roots: &[String],
) -> Result<BTreeMap<String, NixInfo>, RegistrationError> {
    let mut out: BTreeMap<String, NixInfo> = BTreeMap::new();
    let mut queue: VecDeque<(Option<String>, String)> = VecDeque::new();
    if roots.is_empty() {
        for name in store.roots.list().await? {
            if let Some(nix) = store.roots.get(&name).await?.and_then(|r| r.nix) {
                queue.extend(
                    nix.references
                        .iter()
                        .map(|r| (Some(name.clone()), r.clone())),
                );
                out.insert(name, nix);
            }
        }
    } else {
        queue.extend(roots.iter().map(|r| (None, r.clone())));
    }
    while let Some((from, name)) = queue.pop_front() {
        if out.contains_key(&name) {
            continue;
        }
        let rec = store.roots.get(&name).await?;
        let nix = match (rec, &from) {
            (Some(r), _) if r.nix.is_some() => r.nix.unwrap_or_default(),
            (Some(_), None) => return Err(RegistrationError::NotNix(name)),
            (None, None) => return Err(RegistrationError::NoRoot(name)),
            (_, Some(f)) => {
                return Err(RegistrationError::Dangling {
                    from: f.clone(),
                    to: name,
                })
            }
        };
        queue.extend(
            nix.references
                .iter()
                .map(|r| (Some(name.clone()), r.clone())),
        );
        out.insert(name, nix);
    }
    Ok(out)
}

/// The registration text for `paths`.
pub fn render(
    paths: &BTreeMap<String, NixInfo>,
    store_dir: &str,
) -> Result<String, RegistrationError> {
    let mut s = String::new();
    for (name, nix) in paths {
        let hash = NarHash::try_from(&nix.nar_sha256[..])
            .map_err(|_| RegistrationError::BadHash(name.clone()))?;
        s.push_str(&format!(
            "{store_dir}/{name}\n{}\n{}\n",
            hash.to_hex(),
            nix.nar_size
        ));
        if !nix.deriver.is_empty() {
            s.push_str(&format!("{store_dir}/{}", nix.deriver));
        }
        s.push('\n');
        s.push_str(&format!("{}\n", nix.references.len()));
        for r in &nix.references {
            s.push_str(&format!("{store_dir}/{r}\n"));
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::castore::{Node, RootRecord};

    fn nix(refs: &[&str], deriver: &str) -> NixInfo {
        NixInfo {
            nar_size: 8,
            nar_sha256: vec![1u8; 32].into(),
            references: refs.iter().map(|r| r.to_string()).collect(),
            deriver: deriver.into(),
            ..Default::default()
        }
    }

    async fn put(store: &Store, name: &str, info: Option<NixInfo>) {
        let node = Node::Symlink { target: "x".into() };
        let rec = RootRecord {
            name: name.into(),
            node,
            nix: info,
            times: None,
            times_head: Vec::new(),
            traces: Vec::new(),
        };
        store.roots.put(&rec).await.unwrap();
    }

    #[tokio::test]
    async fn closure_is_closed_and_rendered_as_nix_reads_it() {
        let store = crate::store::open("memory://").await.unwrap();
        let (a, b, c) = (
            "0000000000000000000000000000000a-a",
            "0000000000000000000000000000000b-b",
            "0000000000000000000000000000000c-c",
        );
        put(
            &store,
            a,
            Some(nix(&[a, b], "0000000000000000000000000000000d-a.drv")),
        )
        .await;
        put(&store, b, Some(nix(&[], ""))).await;
        put(&store, c, Some(nix(&[], ""))).await;
        put(&store, "rootfs", None).await;
        let got = closure(&store, &[a.to_string()]).await.unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), vec![a, b]);
        let text = render(&got, "/nix/store").unwrap();
        let ones = "01".repeat(32);
        assert_eq!(
            text,
            format!(
                "/nix/store/{a}\n{ones}\n8\n/nix/store/0000000000000000000000000000000d-a.drv\n2\n\
                 /nix/store/{a}\n/nix/store/{b}\n/nix/store/{b}\n{ones}\n8\n\n0\n"
            )
        );
        // Everything with Nix metadata, and nothing else.
        let all = closure(&store, &[]).await.unwrap();
        assert_eq!(all.len(), 3);
        // A reference the store lacks is an error naming both paths.
        put(
            &store,
            c,
            Some(nix(&["0000000000000000000000000000000e-gone"], "")),
        )
        .await;
        let e = closure(&store, &[c.to_string()])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(c) && e.contains("e-gone"), "{e}");
        let e = closure(&store, &["rootfs".to_string()]).await.unwrap_err();
        assert!(e.to_string().contains("no Nix metadata"));
    }
}
