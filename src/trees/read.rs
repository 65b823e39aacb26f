//! Stored trees read back: resolving `ROOT/PATH` (names escaped as `ls` prints them), listing,
//! and counting what a tree holds.

use bytes::Bytes;

use crate::model::castore::{B3Digest, Directory, Entry, Node, RootRecord};
use crate::model::times::{TimesPos, TimesRef};
use crate::store::{Result, Store, StoreError};

/// Finds a root by name, or takes a digest naming a directory or blob. A digest is tried
/// first: it needs no root record, so it resolves from a disk cache with the store offline.
pub async fn resolve_root(store: &Store, root: &str) -> Result<Node> {
    if let Some(node) = node_of_digest(store, root).await {
        return Ok(node);
    }
    if crate::model::castore::validate_root_name(root).is_ok() {
        if let Some(r) = store.roots.get(root).await? {
            return Ok(r.node);
        }
    }
    Err(StoreError::Backend(format!(
        "no root named {root:?} (and it is not the digest of a stored directory or blob)"
    )))
}

/// The node a digest names, if `root` is one and the store has it. A failed look (the store
/// unreachable) is `None`: the caller goes on to look for a root of that name.
async fn node_of_digest(store: &Store, root: &str) -> Option<Node> {
    let d = root.parse::<B3Digest>().ok()?;
    if let Ok(Some(dir)) = store.dirs.get(&d).await {
        return Some(Node::Directory {
            digest: d,
            size: dir.size().ok()?,
        });
    }
    if let Ok(Some(meta)) = store.blobs.stat(&d).await {
        return Some(Node::File {
            digest: d,
            size: meta.size,
            executable: false,
        });
    }
    None
}

/// The root record if `root` is a name, for commands that need its metadata.
pub async fn get_root(store: &Store, name: &str) -> Result<RootRecord> {
    store
        .roots
        .get(name)
        .await?
        .ok_or_else(|| StoreError::Backend(format!("no root named {name:?}")))
}

/// Node of an entry within a directory.
pub fn entry_node(e: Entry<'_>) -> Result<Node> {
    Ok(match e {
        Entry::Directory(d) => Node::try_from(d)?,
        Entry::File(f) => Node::try_from(f)?,
        Entry::Symlink(s) => Node::from(s),
    })
}

pub async fn get_dir(store: &Store, digest: &B3Digest) -> Result<Directory> {
    store
        .dirs
        .get(digest)
        .await?
        .ok_or_else(|| StoreError::not_found("directory", digest))
}

/// Resolves `ROOT[/PATH...]` (symlinks inside the tree are not followed).
pub async fn resolve(store: &Store, spec: &str) -> Result<Node> {
    Ok(resolve_timed(store, spec).await?.0)
}

/// Where a node's recorded times are: its root's table and the node's place in it.
pub type TimesAt = Option<(TimesRef, TimesPos)>;

/// A root by name or digest, with its table of times if it has one that fits its tree.
pub async fn resolve_root_timed(store: &Store, root: &str) -> Result<(Node, TimesAt)> {
    if let Some(node) = node_of_digest(store, root).await {
        return Ok((node, None));
    }
    if crate::model::castore::validate_root_name(root).is_ok() {
        if let Some(r) = store.roots.get(root).await? {
            let at = r
                .times
                .filter(|t| t.fits(&r.node))
                .map(|t| (t, TimesPos::TOP));
            return Ok((r.node, at));
        }
    }
    Ok((resolve_root(store, root).await?, None))
}

/// [`resolve`], keeping track of where the node's times are.
pub async fn resolve_timed(store: &Store, spec: &str) -> Result<(Node, TimesAt)> {
    let mut parts = spec.split('/').filter(|p| !p.is_empty());
    let root = parts
        .next()
        .ok_or_else(|| StoreError::Backend("empty path".into()))?;
    let (mut node, mut at) = resolve_root_timed(store, root).await?;
    let mut walked = root.to_string();
    for part in parts {
        let Node::Directory { digest, .. } = &node else {
            return Err(StoreError::Backend(format!("{walked} is not a directory")));
        };
        let name = unescape_name(part)
            .map_err(|why| StoreError::Backend(format!("{walked}/{part}: {why}")))?;
        let dir = get_dir(store, digest).await?;
        let mut entries = dir
            .entries()
            .map(entry_node_named)
            .collect::<Result<Vec<_>>>()?;
        let index = entries
            .iter()
            .position(|(n, _)| n[..] == name[..])
            .ok_or_else(|| StoreError::Backend(format!("{walked}/{part}: no such entry")))?;
        at = at.map(|(t, pos)| (t, pos.children(entries.iter().map(|(_, n)| n))[index]));
        node = entries.swap_remove(index).1;
        walked = format!("{walked}/{part}");
    }
    Ok((node, at))
}

fn entry_node_named(e: Entry<'_>) -> Result<(Bytes, Node)> {
    Ok((e.name().clone(), entry_node(e)?))
}

/// A name as `granary ls` prints it and `ROOT/PATH` arguments take it back: printable text as
/// it is; a backslash as `\\`; control characters and bytes that are not UTF-8 as `\xNN`.
/// So a listing never sends raw control characters to a terminal, and every name can be
/// addressed exactly.
pub fn escape_name(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The bytes of a name written as [`escape_name`] prints it.
pub fn unescape_name(s: &str) -> std::result::Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hex = s
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("\\x must be followed by two hex digits")?;
                out.push(hex);
                i += 4;
            }
            _ => return Err("a backslash starts \\\\ or \\xNN (write a backslash as \\\\)".into()),
        }
    }
    Ok(out)
}

/// One line of `granary ls`.
pub struct Listing {
    pub name: Bytes,
    pub node: Node,
}

pub async fn list(store: &Store, node: &Node) -> Result<Vec<Listing>> {
    match node {
        Node::Directory { digest, .. } => {
            let dir = get_dir(store, digest).await?;
            dir.entries()
                .map(|e| {
                    Ok(Listing {
                        name: e.name().clone(),
                        node: entry_node(e)?,
                    })
                })
                .collect()
        }
        other => Ok(vec![Listing {
            name: Bytes::new(),
            node: other.clone(),
        }]),
    }
}

/// Bytes of file content under a node, counting every occurrence (what a plain copy holds).
/// Directories are memoised by digest, so shared subtrees are walked once.
pub async fn logical_size(
    store: &Store,
    node: &Node,
    memo: &mut std::collections::HashMap<B3Digest, u64>,
) -> Result<u64> {
    let top = match node {
        Node::File { size, .. } => return Ok(*size),
        Node::Symlink { .. } => return Ok(0),
        Node::Directory { digest, .. } => *digest,
    };
    // Iterative post-order over directory digests.
    let mut stack = vec![(top, false)];
    while let Some((d, expanded)) = stack.pop() {
        if memo.contains_key(&d) {
            continue;
        }
        let dir = get_dir(store, &d).await?;
        let children: Vec<B3Digest> = dir
            .directories
            .iter()
            .map(|e| B3Digest::try_from(&e.digest[..]))
            .collect::<Result<_, _>>()?;
        if !expanded && children.iter().any(|c| !memo.contains_key(c)) {
            stack.push((d, true));
            stack.extend(children.into_iter().map(|c| (c, false)));
            continue;
        }
        let mut total: u64 = dir.files.iter().map(|f| f.size).sum();
        for c in &children {
            total += memo.get(c).copied().unwrap_or(0);
        }
        memo.insert(d, total);
    }
    Ok(memo.get(&top).copied().unwrap_or(0))
}

#[cfg(test)]
mod escape_tests {
    use super::*;

    #[test]
    fn names_round_trip_through_their_escaped_form() {
        for name in [
            &b"plain.txt"[..],
            b"tab\there",
            b"\x1b[31mred",
            b"back\\slash",
            b"\xff\xfe latin1 \xe9",
            "caf\u{e9} \u{1f600}".as_bytes(),
        ] {
            let shown = escape_name(name);
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
            assert_eq!(unescape_name(&shown).unwrap(), name, "{shown}");
        }
        assert_eq!(escape_name(b"a\x1bb"), "a\\x1bb");
        assert!(unescape_name("a\\q").is_err());
        assert!(unescape_name("a\\x4").is_err());
    }
}
