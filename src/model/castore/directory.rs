//! Directory rules (DESIGN.md §1): canonical encoding, digest, recursive size, validation.

use bytes::Bytes;
use prost::Message;

use super::{
    decode_bounded, show, B3Digest, Directory, DirectoryEntry, FileEntry, ModelError, Node,
    SymlinkEntry, MAX_NAME_LEN, MAX_TARGET_LEN,
};

/// Checks one entry name: 1..=255 bytes, no `/`, no NUL, not `.` or `..`.
pub fn validate_name(name: &[u8]) -> Result<(), ModelError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_NAME_LEN {
        "longer than 255 bytes"
    } else if name.contains(&b'/') {
        "contains '/'"
    } else if name.contains(&0) {
        "contains NUL"
    } else if name == b"." || name == b".." {
        "is '.' or '..'"
    } else {
        return Ok(());
    };
    Err(ModelError::Name {
        name: show(name),
        reason,
    })
}

pub(crate) fn validate_target(name: &[u8], target: &[u8]) -> Result<(), ModelError> {
    let reason = if target.is_empty() {
        "empty target"
    } else if target.len() > MAX_TARGET_LEN {
        "target longer than 4095 bytes"
    } else if target.contains(&0) {
        "target contains NUL"
    } else {
        return Ok(());
    };
    Err(ModelError::Target {
        name: show(name),
        reason,
    })
}

/// One entry of a directory, whatever its kind, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    Directory(&'a DirectoryEntry),
    File(&'a FileEntry),
    Symlink(&'a SymlinkEntry),
}

impl<'a> Entry<'a> {
    pub fn name(&self) -> &'a Bytes {
        match self {
            Entry::Directory(d) => &d.name,
            Entry::File(f) => &f.name,
            Entry::Symlink(s) => &s.name,
        }
    }
}

fn check_sorted<'a>(names: impl Iterator<Item = &'a Bytes>) -> Result<(), ModelError> {
    let mut prev: Option<&Bytes> = None;
    for n in names {
        validate_name(n)?;
        if let Some(p) = prev {
            if p >= n {
                return Err(if p == n {
                    ModelError::Duplicate(show(n))
                } else {
                    ModelError::Unsorted {
                        prev: show(p),
                        next: show(n),
                    }
                });
            }
        }
        prev = Some(n);
    }
    Ok(())
}

impl Directory {
    /// Checks every rule that can be checked without looking at children.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_sorted(self.directories.iter().map(|d| &d.name))?;
        check_sorted(self.files.iter().map(|f| &f.name))?;
        check_sorted(self.symlinks.iter().map(|s| &s.name))?;
        for d in &self.directories {
            B3Digest::try_from(&d.digest[..])?;
        }
        for f in &self.files {
            B3Digest::try_from(&f.digest[..])?;
        }
        for s in &self.symlinks {
            validate_target(&s.name, &s.target)?;
        }
        // A name may appear in only one list: a three-way merge over the sorted lists.
        let mut all: Vec<&Bytes> = self.entries().map(|e| e.name()).collect();
        all.sort_unstable();
        if let Some(w) = all.windows(2).find(|w| w[0] == w[1]) {
            return Err(ModelError::Duplicate(show(w[0])));
        }
        self.size()?;
        Ok(())
    }

    /// Entries in this directory plus the recorded sizes of its child directories.
    pub fn size(&self) -> Result<u64, ModelError> {
        let mut n = (self.directories.len() as u64)
            .checked_add(self.files.len() as u64)
            .and_then(|n| n.checked_add(self.symlinks.len() as u64))
            .ok_or(ModelError::SizeOverflow)?;
        for d in &self.directories {
            n = n.checked_add(d.size).ok_or(ModelError::SizeOverflow)?;
        }
        Ok(n)
    }

    /// Canonical encoding: prost writes fields in tag order and omits defaults.
    pub fn encode_canonical(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Adds an entry named `name` for `node` to the list its kind belongs in (callers add
    /// in name order, or sort before putting).
    pub fn add(&mut self, name: Bytes, node: &Node) {
        match node {
            Node::Directory { digest, size } => self.directories.push(DirectoryEntry {
                name,
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                size: *size,
            }),
            Node::File {
                digest,
                size,
                executable,
            } => self.files.push(FileEntry {
                name,
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                size: *size,
                executable: *executable,
            }),
            Node::Symlink { target } => self.symlinks.push(SymlinkEntry {
                name,
                target: target.clone(),
            }),
        }
    }

    pub fn digest(&self) -> B3Digest {
        B3Digest::of(&self.encode_canonical())
    }

    /// Decodes untrusted bytes and validates the result.
    pub fn decode_valid(bytes: &[u8]) -> Result<Self, ModelError> {
        let d: Directory = decode_bounded("directory", bytes)?;
        d.validate()?;
        Ok(d)
    }

    /// All entries in name order (the lists are each sorted; this merges them).
    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        let mut v: Vec<Entry<'_>> = self
            .directories
            .iter()
            .map(Entry::Directory)
            .chain(self.files.iter().map(Entry::File))
            .chain(self.symlinks.iter().map(Entry::Symlink))
            .collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v.into_iter()
    }

    /// Finds an entry by name (binary search in each sorted list).
    pub fn lookup(&self, name: &[u8]) -> Option<Entry<'_>> {
        if let Ok(i) = self.directories.binary_search_by(|d| d.name[..].cmp(name)) {
            return Some(Entry::Directory(&self.directories[i]));
        }
        if let Ok(i) = self.files.binary_search_by(|f| f.name[..].cmp(name)) {
            return Some(Entry::File(&self.files[i]));
        }
        if let Ok(i) = self.symlinks.binary_search_by(|s| s.name[..].cmp(name)) {
            return Some(Entry::Symlink(&self.symlinks[i]));
        }
        None
    }

    /// Checks a child entry against the child directory it names.
    pub fn check_child(entry: &DirectoryEntry, child: &Directory) -> Result<(), ModelError> {
        let actual = child.size()?;
        if entry.size != actual {
            return Err(ModelError::SizeMismatch {
                name: show(&entry.name),
                recorded: entry.size,
                actual,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str, digest: B3Digest, size: u64) -> DirectoryEntry {
        DirectoryEntry {
            name: Bytes::copy_from_slice(name.as_bytes()),
            digest: Bytes::copy_from_slice(digest.as_bytes()),
            size,
        }
    }
    fn f(name: &[u8], size: u64, exec: bool) -> FileEntry {
        FileEntry {
            name: Bytes::copy_from_slice(name),
            digest: Bytes::copy_from_slice(B3Digest::of(b"x").as_bytes()),
            size,
            executable: exec,
        }
    }
    fn s(name: &[u8], target: &[u8]) -> SymlinkEntry {
        SymlinkEntry {
            name: Bytes::copy_from_slice(name),
            target: Bytes::copy_from_slice(target),
        }
    }

    // Independent protobuf writer for golden digests: varint + length-delimited fields.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn ld(tag: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(tag << 3 | 2, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }
    fn vi(tag: u64, v: u64, out: &mut Vec<u8>) {
        if v != 0 {
            varint(tag << 3, out);
            varint(v, out);
        }
    }

    #[test]
    fn golden_empty_directory() {
        let dir = Directory::default();
        assert!(dir.encode_canonical().is_empty());
        assert_eq!(dir.digest().to_hex(), blake3::hash(b"").to_hex().as_str());
        assert_eq!(
            dir.digest().to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn golden_files_symlinks_nested() {
        let leaf = Directory {
            files: vec![f(b"a", 3, false), f(b"b", 0, true)],
            ..Default::default()
        };
        let top = Directory {
            directories: vec![d("sub", leaf.digest(), 2)],
            files: vec![],
            symlinks: vec![s(b"link", b"/abs/target")],
        };
        top.validate().unwrap();

        let x = B3Digest::of(b"x");
        let mut leaf_bytes = Vec::new();
        for (name, size, exec) in [(&b"a"[..], 3u64, false), (&b"b"[..], 0, true)] {
            let mut e = Vec::new();
            ld(1, name, &mut e);
            ld(2, x.as_bytes(), &mut e);
            vi(3, size, &mut e);
            vi(4, exec as u64, &mut e);
            ld(2, &e, &mut leaf_bytes);
        }
        assert_eq!(leaf.encode_canonical(), leaf_bytes);
        let leaf_digest = blake3::hash(&leaf_bytes);
        assert_eq!(leaf.digest().as_bytes(), leaf_digest.as_bytes());

        let mut top_bytes = Vec::new();
        let mut de = Vec::new();
        ld(1, b"sub", &mut de);
        ld(2, leaf_digest.as_bytes(), &mut de);
        vi(3, 2, &mut de);
        ld(1, &de, &mut top_bytes);
        let mut se = Vec::new();
        ld(1, b"link", &mut se);
        ld(2, b"/abs/target", &mut se);
        ld(3, &se, &mut top_bytes);
        assert_eq!(top.encode_canonical(), top_bytes);
        assert_eq!(top.digest().as_bytes(), blake3::hash(&top_bytes).as_bytes());
        assert_eq!(top.size().unwrap(), 4);
        // Decoding the canonical bytes gives the same directory back.
        assert_eq!(Directory::decode_valid(&top_bytes).unwrap(), top);
    }

    fn err(dir: Directory) -> ModelError {
        dir.validate().unwrap_err()
    }

    #[test]
    fn rejects_bad_names() {
        let long = vec![b'a'; 256];
        let cases: [(&[u8], &str); 6] = [
            (b"", "empty"),
            (&long, "longer than 255 bytes"),
            (b"a/b", "contains '/'"),
            (b"a\0b", "contains NUL"),
            (b".", "is '.' or '..'"),
            (b"..", "is '.' or '..'"),
        ];
        for (name, want) in cases {
            let e = err(Directory {
                files: vec![f(name, 0, false)],
                ..Default::default()
            });
            assert!(
                matches!(e, ModelError::Name { reason, .. } if reason == want),
                "{e}"
            );
        }
        assert!(validate_name(&[b'a'; 255]).is_ok());
        assert!(validate_name(b"with space \xff").is_ok());
    }

    #[test]
    fn rejects_unsorted_and_duplicates() {
        let e = err(Directory {
            files: vec![f(b"b", 0, false), f(b"a", 0, false)],
            ..Default::default()
        });
        assert!(matches!(e, ModelError::Unsorted { .. }), "{e}");
        let e = err(Directory {
            files: vec![f(b"a", 0, false), f(b"a", 0, false)],
            ..Default::default()
        });
        assert_eq!(e, ModelError::Duplicate("a".into()));
        let e = err(Directory {
            files: vec![f(b"a", 0, false)],
            symlinks: vec![s(b"a", b"t")],
            ..Default::default()
        });
        assert_eq!(e, ModelError::Duplicate("a".into()));
        let e = err(Directory {
            directories: vec![d("a", B3Digest::of(b""), 0)],
            files: vec![f(b"a", 0, false)],
            ..Default::default()
        });
        assert_eq!(e, ModelError::Duplicate("a".into()));
    }

    #[test]
    fn rejects_bad_symlink_targets() {
        let long = vec![b'a'; 4096];
        for (t, want) in [
            (&b""[..], "empty target"),
            (&long[..], "target longer than 4095 bytes"),
            (b"a\0", "target contains NUL"),
        ] {
            let e = err(Directory {
                symlinks: vec![s(b"l", t)],
                ..Default::default()
            });
            assert!(
                matches!(e, ModelError::Target { reason, .. } if reason == want),
                "{e}"
            );
        }
        assert!(Directory {
            symlinks: vec![s(b"l", &[b'a'; 4095])],
            ..Default::default()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn rejects_bad_digest_lengths() {
        let mut bad = f(b"a", 0, false);
        bad.digest = Bytes::from_static(&[1; 31]);
        assert_eq!(
            err(Directory {
                files: vec![bad],
                ..Default::default()
            }),
            ModelError::DigestLength(31)
        );
        let mut bad = d("a", B3Digest::of(b""), 0);
        bad.digest = Bytes::from_static(&[1; 33]);
        assert_eq!(
            err(Directory {
                directories: vec![bad],
                ..Default::default()
            }),
            ModelError::DigestLength(33)
        );
    }

    #[test]
    fn size_overflow_and_mismatch() {
        let e = err(Directory {
            directories: vec![
                d("a", B3Digest::of(b""), u64::MAX - 1),
                d("b", B3Digest::of(b""), 5),
            ],
            ..Default::default()
        });
        assert_eq!(e, ModelError::SizeOverflow);

        let child = Directory {
            files: vec![f(b"x", 1, false)],
            ..Default::default()
        };
        let good = d("c", child.digest(), 1);
        assert!(Directory::check_child(&good, &child).is_ok());
        let lying = d("c", child.digest(), 7);
        assert!(matches!(
            Directory::check_child(&lying, &child),
            Err(ModelError::SizeMismatch {
                recorded: 7,
                actual: 1,
                ..
            })
        ));
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        let mut state = 0x1234_5678_u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (state >> 33) as u8
                })
                .collect();
            let _ = Directory::decode_valid(&bytes);
        }
        // A huge declared length must not allocate.
        let mut b = vec![0x0a];
        varint(1 << 62, &mut b);
        assert!(Directory::decode_valid(&b).is_err());
    }

    #[test]
    fn lookup_and_entries_in_name_order() {
        let dir = Directory {
            directories: vec![d("b", B3Digest::of(b""), 0)],
            files: vec![f(b"a", 0, false), f(b"c", 0, false)],
            symlinks: vec![s(b"bb", b"t")],
        };
        let names: Vec<_> = dir.entries().map(|e| e.name().clone()).collect();
        assert_eq!(
            names,
            [&b"a"[..], b"b", b"bb", b"c"].map(Bytes::from_static)
        );
        assert!(matches!(dir.lookup(b"bb"), Some(Entry::Symlink(_))));
        assert!(dir.lookup(b"zz").is_none());
    }
}
