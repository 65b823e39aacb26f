//! Uploads (`nix copy --to`): a NAR streamed into the store and checked, held until its narinfo names it, then recorded as a root.

use super::substitute::FileTap;
#[allow(unused_imports)]
use super::*;

/// Reads a small request body whole, refusing one over `limit` bytes.
pub(super) async fn read_limited(body: Body, limit: usize) -> Result<String, HttpError> {
    let mut out = Vec::new();
    let mut s = body.into_data_stream();
    while let Some(piece) = s.next().await {
        let piece = piece.map_err(|e| HttpError::bad(format!("reading the request: {e}")))?;
        if out.len() + piece.len() > limit {
            return Err(HttpError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {limit} bytes"),
            ));
        }
        out.extend_from_slice(&piece);
    }
    String::from_utf8(out).map_err(|_| HttpError::bad("request body is not UTF-8"))
}

pub(super) fn nar_status(e: &NarError) -> StatusCode {
    match e {
        NarError::Invalid { .. } | NarError::Read { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(super) async fn put_nar(
    State(c): State<Arc<BinaryCache>>,
    Path(file): Path<String>,
    body: Body,
) -> Result<StatusCode, HttpError> {
    let (stem, xz) = if let Some(s) = file.strip_suffix(".nar") {
        (s, false)
    } else if let Some(s) = file.strip_suffix(".nar.xz") {
        (s, true)
    } else {
        return Err(HttpError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "nar/{file}: granary takes .nar and .nar.xz uploads \
                 (use ?compression=none or ?compression=xz in the store URL)"
            ),
        ));
    };
    let stream = body.into_data_stream().map_err(io::Error::other);
    let mut tap = FileTap {
        inner: StreamReader::new(stream),
        sha: Sha256::new(),
        size: 0,
        limit: c.opts.max_upload,
    };
    let imported = if xz {
        let mut dec = async_compression::tokio::bufread::XzDecoder::new(
            tokio::io::BufReader::with_capacity(256 << 10, &mut tap),
        );
        import_nar(&c.store, &mut dec).await
    } else {
        import_nar(&c.store, &mut tap).await
    };
    let import = imported.map_err(|e| HttpError(nar_status(&e), format!("nar/{file}: {e}")))?;
    // Whatever follows the compressed stream still counts towards the file hash.
    tokio::io::copy(&mut tap, &mut tokio::io::sink())
        .await
        .map_err(|e| HttpError::bad(format!("nar/{file}: reading the upload: {e}")))?;
    let file_hash = NarHash(tap.sha.finalize().into());
    if let Some(named) = nix32_decode::<32>(stem).map(NarHash) {
        if named != file_hash {
            return Err(HttpError::bad(format!(
                "nar/{file}: the upload hashes to {file_hash}, not the hash in its name; \
                 nothing recorded"
            )));
        }
    }
    tracing::info!(
        "nar/{file}: received {} bytes, NAR {} ({} bytes); waiting for its narinfo",
        tap.size,
        import.nar_sha256,
        import.nar_size
    );
    c.add_pending(
        format!("nar/{file}"),
        Pending {
            import,
            file_hash,
            file_size: tap.size,
            at: Instant::now(),
        },
    );
    Ok(StatusCode::OK)
}

pub(super) async fn put_file(
    State(c): State<Arc<BinaryCache>>,
    Path(file): Path<String>,
    body: Body,
) -> Result<StatusCode, HttpError> {
    let Some(hash) = narinfo_hash(&file) else {
        if file.ends_with(".ls") {
            // NAR listings are derived from the tree; nothing to keep.
            return Ok(StatusCode::OK);
        }
        return Err(HttpError::bad(format!(
            "{file}: granary takes only narinfo and NAR uploads"
        )));
    };
    let text = read_limited(body, narinfo::MAX_NARINFO_BYTES).await?;
    let info = narinfo::parse(&text, &c.opts.store_dir)
        .map_err(|e| HttpError::bad(format!("{file}: {e}")))?;
    let name = info.basename.clone();
    if !name.starts_with(hash) {
        return Err(HttpError::bad(format!(
            "{file}: StorePath {name} does not have hash part {hash}"
        )));
    }
    let reject = |why: String| HttpError::bad(format!("{file}: {why}; {name} not recorded"));
    let pending = c.pending().remove(&info.url);
    let upload_file = pending.as_ref().and_then(|_| {
        info.url
            .strip_prefix("nar/")
            .filter(|f| f.ends_with(".nar.xz"))
            .map(str::to_string)
    });
    let node = match pending {
        Some(p) => {
            let got = &p.import;
            if got.nar_sha256 != info.nar_hash || got.nar_size != info.nar_size {
                return Err(reject(format!(
                    "narinfo says NAR {} ({} bytes), {} held {} ({} bytes)",
                    info.nar_hash, info.nar_size, info.url, got.nar_sha256, got.nar_size
                )));
            }
            if info.file_hash.is_some_and(|h| h != p.file_hash)
                || info.file_size.is_some_and(|s| s != p.file_size)
            {
                return Err(reject(format!(
                    "FileHash/FileSize do not match the {} bytes uploaded to {}",
                    p.file_size, info.url
                )));
            }
            got.node.clone()
        }
        None => {
            // The same NAR may be held already under another store path (Nix skips the
            // upload when the file exists).
            let existing = match c.index.by_nar(&c.store, &info.nar_hash).await? {
                Some(other) => c.store.roots.get(&other).await?,
                None => None,
            };
            match existing {
                Some(RootRecord {
                    node, nix: Some(n), ..
                }) if n.nar_sha256[..] == info.nar_hash.0 && n.nar_size == info.nar_size => node,
                _ => {
                    return Err(reject(format!(
                        "its NAR {} was not uploaded (PUT it first)",
                        info.url
                    )))
                }
            }
        }
    };
    if let Some(old) = c.store.roots.get(&name).await? {
        let same = old
            .nix
            .as_ref()
            .is_some_and(|n| n.nar_sha256[..] == info.nar_hash.0);
        if !same {
            return Err(HttpError(
                StatusCode::CONFLICT,
                format!("{file}: {name} is already recorded with different contents"),
            ));
        }
    }
    let root = RootRecord {
        name: name.clone(),
        node,
        nix: Some(NixInfo {
            nar_size: info.nar_size,
            nar_sha256: Bytes::copy_from_slice(&info.nar_hash.0),
            references: info.references,
            deriver: info.deriver,
            signatures: info.signatures,
            ca: info.ca,
        }),
        times: None,
        times_head: Vec::new(),
        traces: Vec::new(),
    };
    c.store.roots.put(&root).await?;
    c.index.insert(&name, info.nar_hash).await;
    if let Some(f) = upload_file {
        let mut up = c.uploaded();
        if up.len() >= MAX_UPLOADED {
            up.clear();
        }
        up.insert(f, info.nar_hash);
    }
    tracing::info!("recorded {name} ({} NAR bytes)", info.nar_size);
    Ok(StatusCode::OK)
}
