//! A root's traces in the store: reading one (bounded, verified, decoded), saving a recorded
//! trace (merged into the one of the same name), listing and dropping them.

use crate::model::castore::RootRecord;
use crate::model::trace::{Trace, TraceRef, MAX_TRACE_BYTES};
use crate::store::{Result, Store, StoreError};

/// Why a trace cannot be used, naming it.
fn trace_error(t: &TraceRef, why: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("trace {} ({}): {why}", t.name, t.digest))
}

/// Reads and decodes the trace `t` names.
pub async fn load(store: &Store, t: &TraceRef) -> Result<Trace> {
    if t.size > MAX_TRACE_BYTES {
        return Err(trace_error(
            t,
            format!("{} bytes is over the limit", t.size),
        ));
    }
    let reader = crate::store::BlobReader::open_sized(store.blobs.clone(), t.digest, t.size)
        .await
        .map_err(|e| trace_error(t, e))?;
    let bytes = reader
        .read_at(0, t.size as usize)
        .await
        .map_err(|e| trace_error(t, e))?;
    Trace::decode(&bytes).map_err(|e| trace_error(t, format!("corrupt: {e}")))
}

/// The record of root `name`, which must exist (traces attach to named roots only).
async fn root_record(store: &Store, root: &str) -> Result<RootRecord> {
    crate::model::castore::validate_root_name(root)
        .map_err(|e| StoreError::Backend(format!("root {root:?}: {e}")))?;
    store
        .roots
        .get(root)
        .await?
        .ok_or_else(|| StoreError::Backend(format!("root {root:?}: no such root")))
}

/// What [`save`] did.
#[derive(Debug, Clone)]
pub struct Saved {
    pub trace: TraceRef,
    pub entries: usize,
    pub runs: u32,
    pub chunk_bytes: u64,
}

/// Saves `recorded` as trace `name` of root `root`, merged into the trace of that name if
/// there is one (unless `replace`). The trace blob is durable before the root record names
/// it. A stored trace that cannot be read is an error unless `replace`.
pub async fn save(
    store: &Store,
    root: &str,
    name: &str,
    recorded: &Trace,
    replace: bool,
) -> Result<Saved> {
    crate::model::castore::validate_root_name(name)
        .map_err(|e| StoreError::Backend(format!("trace name {name:?}: {e}")))?;
    let mut rec = root_record(store, root).await?;
    let trace = match rec.traces.iter().find(|t| t.name == name) {
        Some(old) if !replace => load(store, old)
            .await
            .map_err(|e| StoreError::Backend(format!("{e} (save with --replace to overwrite it)")))?
            .merge(recorded),
        _ => recorded.clone(),
    };
    let written = crate::store::blob_writer::write_all(store, &trace.encode()).await?;
    store.flush().await?;
    let saved = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let r = TraceRef {
        name: name.to_string(),
        digest: written.digest,
        size: written.size,
        saved,
    };
    rec.traces.retain(|t| t.name != name);
    rec.traces.push(r.clone());
    store.roots.put(&rec).await?;
    Ok(Saved {
        trace: r,
        entries: trace.entries.len(),
        runs: trace.runs,
        chunk_bytes: trace.chunk_bytes(),
    })
}

/// The traces of root `root`, each with its content or why it cannot be read.
pub async fn list(store: &Store, root: &str) -> Result<Vec<(TraceRef, Result<Trace>)>> {
    let rec = root_record(store, root).await?;
    let mut out = Vec::with_capacity(rec.traces.len());
    for t in rec.traces {
        let loaded = load(store, &t).await;
        out.push((t, loaded));
    }
    Ok(out)
}

/// Removes trace `name` from root `root` (its blob goes at the next gc). False if it had none.
pub async fn remove(store: &Store, root: &str, name: &str) -> Result<bool> {
    let mut rec = root_record(store, root).await?;
    let before = rec.traces.len();
    rec.traces.retain(|t| t.name != name);
    if rec.traces.len() == before {
        return Ok(false);
    }
    store.roots.put(&rec).await?;
    Ok(true)
}

/// The trace a mount or sandbox of `root` replays: none when `off`; the one called `name` (an
/// error if the root has none by that name); else the root's newest, if any. Without a name,
/// a store that cannot be asked is not an error (a trace only speeds a start up): logged.
pub async fn to_replay(
    store: &Store,
    root: &str,
    name: Option<&str>,
    off: bool,
) -> Result<Option<TraceRef>> {
    if off {
        return Ok(None);
    }
    match name {
        Some(n) => match for_mount(store, root, Some(n)).await? {
            Some(t) => Ok(Some(t)),
            None => Err(StoreError::Backend(format!(
                "root {root} has no trace named {n:?}"
            ))),
        },
        None => Ok(for_mount(store, root, None).await.unwrap_or_else(|e| {
            tracing::warn!("not replaying a trace: {e}");
            None
        })),
    }
}

/// The trace of `root` called `name`, or its newest; `None` when `root` is a digest (traces
/// belong to named roots) or has no such trace.
async fn for_mount(store: &Store, root: &str, name: Option<&str>) -> Result<Option<TraceRef>> {
    if crate::model::castore::validate_root_name(root).is_err()
        || root.parse::<crate::model::castore::B3Digest>().is_ok()
    {
        return Ok(None);
    }
    Ok(match store.roots.get(root).await? {
        Some(rec) => crate::model::trace::pick(&rec.traces, name).cloned(),
        None => None,
    })
}
