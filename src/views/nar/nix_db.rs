//! Reading Nix's own database (`db.sqlite`): what Nix registered about each valid store path
//! (NAR hash and size, references, deriver, signatures, content address).
//!
//! Read directly with SQLite rather than through `nix-store --dump-db` or `nix path-info`:
//! it needs no Nix installation, works on a copied store (`root/nix/var/nix/db`), and gives
//! signatures and CA, which the dump format drops. The database is opened read-only; if
//! Nix's write-ahead log cannot be used read-only (no write access to the `-shm` file), it
//! is opened as immutable (a snapshot).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::store_path::to_basename;
use super::NarHash;

/// What Nix's database says of one valid path. Paths are basenames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbPath {
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: Vec<String>,
    pub deriver: String,
    pub signatures: Vec<String>,
    pub ca: String,
}

#[derive(Debug, thiserror::Error)]
#[error("Nix database {path}: {reason}")]
pub struct DbError {
    pub path: PathBuf,
    pub reason: String,
}

/// Where Nix keeps the database of a store directory, if it is there: `/nix/store` uses
/// `/nix/var/nix/db/db.sqlite`, a chroot store's `ROOT/nix/store` uses
/// `ROOT/nix/var/nix/db/db.sqlite`.
pub fn find_db(store_dir: &Path) -> Option<PathBuf> {
    let canon = std::fs::canonicalize(store_dir).ok()?;
    let nix = canon.parent()?;
    let db = nix.join("var/nix/db/db.sqlite");
    db.is_file().then_some(db)
}

fn open(path: &Path) -> Result<Connection, rusqlite::Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    // A read-only connection to a WAL database fails on its first query when it cannot map
    // the shared-memory file; try one now.
    match conn.query_row("SELECT count(*) FROM ValidPaths", [], |_| Ok(())) {
        Ok(()) => Ok(conn),
        Err(_) => {
            let uri = format!("file:{}?immutable=1", path.display());
            Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI)
        }
    }
}

/// Every valid path the database at `path` registers under `store_dir`, by basename.
pub fn read_db(path: &Path, store_dir: &str) -> Result<HashMap<String, DbPath>, DbError> {
    let err = |reason: String| DbError {
        path: path.to_path_buf(),
        reason,
    };
    let conn = open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let sql = |e: rusqlite::Error| err(format!("cannot read: {e}"));
    let mut by_id: HashMap<i64, String> = HashMap::new();
    let mut out: HashMap<String, DbPath> = HashMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT id, path, hash, narSize, deriver, sigs, ca FROM ValidPaths")
            .map_err(sql)?;
        let mut rows = stmt.query([]).map_err(sql)?;
        while let Some(row) = rows.next().map_err(sql)? {
            let id: i64 = row.get(0).map_err(sql)?;
            let full: String = row.get(1).map_err(sql)?;
            let hash: String = row.get(2).map_err(sql)?;
            let size: Option<i64> = row.get(3).map_err(sql)?;
            let deriver: Option<String> = row.get(4).map_err(sql)?;
            let sigs: Option<String> = row.get(5).map_err(sql)?;
            let ca: Option<String> = row.get(6).map_err(sql)?;
            let Ok(name) = to_basename(&full, store_dir) else {
                // Another store directory's path: not ours to import.
                continue;
            };
            let nar_hash = NarHash::parse(&hash)
                .ok_or_else(|| err(format!("{full}: hash {hash:?} is not a sha256 hash")))?;
            let deriver = match deriver.filter(|d| !d.is_empty()) {
                Some(d) => to_basename(&d, store_dir)
                    .map_err(|e| err(format!("{full}: deriver: {e}")))?
                    .to_string(),
                None => String::new(),
            };
            by_id.insert(id, name.to_string());
            out.insert(
                name.to_string(),
                DbPath {
                    nar_hash,
                    nar_size: size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    references: Vec::new(),
                    deriver,
                    signatures: sigs
                        .unwrap_or_default()
                        .split_ascii_whitespace()
                        .map(str::to_string)
                        .collect(),
                    ca: ca.unwrap_or_default(),
                },
            );
        }
    }
    let mut stmt = conn
        .prepare("SELECT referrer, reference FROM Refs")
        .map_err(sql)?;
    let mut rows = stmt.query([]).map_err(sql)?;
    while let Some(row) = rows.next().map_err(sql)? {
        let (from, to): (i64, i64) = (row.get(0).map_err(sql)?, row.get(1).map_err(sql)?);
        let (Some(from), Some(to)) = (by_id.get(&from), by_id.get(&to)) else {
            continue;
        };
        let to = to.clone();
        if let Some(p) = out.get_mut(from) {
            p.references.push(to);
        }
    }
    for p in out.values_mut() {
        p.references.sort();
        p.references.dedup();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database with Nix's schema (the columns granary reads) and two paths.
    fn make_db(path: &Path) {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "CREATE TABLE ValidPaths (id integer primary key autoincrement not null, path text unique not null, \
             hash text not null, registrationTime integer not null, deriver text, narSize integer, \
             ultimate integer, sigs text, ca text);
             CREATE TABLE Refs (referrer integer not null, reference integer not null, primary key (referrer, reference));",
        )
        .unwrap();
        let h = format!("sha256:{}", "ab".repeat(32));
        c.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize, sigs, ca) VALUES (?1, ?2, 1, ?3, 120, 'k:AAAA k2:BBBB', NULL)",
            rusqlite::params![
                "/nix/store/0000000000000000000000000000000a-x",
                h,
                "/nix/store/0000000000000000000000000000000c-x.drv"
            ],
        )
        .unwrap();
        c.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES ('/nix/store/0000000000000000000000000000000b-dep', ?1, 1, 8)",
            [&h],
        )
        .unwrap();
        c.execute_batch("INSERT INTO Refs VALUES (1, 2); INSERT INTO Refs VALUES (1, 1);")
            .unwrap();
    }

    #[test]
    fn reads_paths_references_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        make_db(&db);
        let got = read_db(&db, "/nix/store").unwrap();
        assert_eq!(got.len(), 2);
        let x = &got["0000000000000000000000000000000a-x"];
        assert_eq!(x.nar_size, 120);
        assert_eq!(x.nar_hash.0, [0xab; 32]);
        assert_eq!(
            x.references,
            vec![
                "0000000000000000000000000000000a-x".to_string(),
                "0000000000000000000000000000000b-dep".to_string()
            ]
        );
        assert_eq!(x.deriver, "0000000000000000000000000000000c-x.drv");
        assert_eq!(x.signatures, vec!["k:AAAA", "k2:BBBB"]);
        let dep = &got["0000000000000000000000000000000b-dep"];
        assert!(dep.references.is_empty() && dep.deriver.is_empty());
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        std::fs::write(&db, b"not a database at all, not at all").unwrap();
        let e = read_db(&db, "/nix/store").unwrap_err().to_string();
        assert!(e.contains("db.sqlite"), "{e}");
    }
}
