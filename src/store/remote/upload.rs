//! The client side of ingest sessions: a local tree walked and streamed to the daemon in one
//! upload, then polled until the daemon has imported it.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::client::Client;
use super::wire::node_from_proto;
use super::wire::proto::{self, ingest_entry::Kind, ingest_frame::Frame};
use super::wire::FRAME_BYTES;
use crate::model::castore::Node;
use crate::store::{IngestOptions, IngestService, IngestStatus, StoreError};

/// One entry of the walked tree.
struct Walked {
    rel: Vec<u8>,
    kind: Kind,
    executable: bool,
    size: u64,
    target: Bytes,
    path: PathBuf,
    mtime: i64,
}

fn walk(top: &Path, skip_special: bool) -> Result<Vec<Walked>, String> {
    let mut out = Vec::new();
    let mut stack = vec![(top.to_path_buf(), Vec::new())];
    while let Some((path, rel)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| format!("{}: cannot stat: {e}", path.display()))?;
        let ft = meta.file_type();
        use std::os::unix::fs::MetadataExt;
        let mtime = meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec());
        let mut w = Walked {
            rel: rel.clone(),
            kind: Kind::File,
            executable: false,
            size: 0,
            target: Bytes::new(),
            path: path.clone(),
            mtime,
        };
        if ft.is_symlink() {
            let t = std::fs::read_link(&path)
                .map_err(|e| format!("{}: cannot read link: {e}", path.display()))?;
            w.kind = Kind::Symlink;
            w.target = Bytes::copy_from_slice(t.as_os_str().as_bytes());
            out.push(w);
        } else if ft.is_file() {
            w.size = meta.len();
            w.executable = meta.permissions().mode() & 0o100 != 0;
            out.push(w);
        } else if ft.is_dir() {
            w.kind = Kind::Directory;
            out.push(w);
            let rd = std::fs::read_dir(&path)
                .map_err(|e| format!("{}: cannot read directory: {e}", path.display()))?;
            let mut kids = Vec::new();
            for e in rd {
                let e = e.map_err(|e| format!("{}: {e}", path.display()))?;
                kids.push(e.path());
            }
            // Reverse order on the stack gives a sorted pre-order walk.
            kids.sort();
            for k in kids.into_iter().rev() {
                let name = k
                    .file_name()
                    .map(|n| n.as_bytes().to_vec())
                    .unwrap_or_default();
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(&name);
                stack.push((k, r));
            }
        } else if skip_special && !rel.is_empty() {
            tracing::warn!("skipping {} (special file)", path.display());
        } else {
            return Err(format!(
                "{}: is a special file; granary stores only files, directories and symlinks",
                path.display()
            ));
        }
    }
    Ok(out)
}

/// Streams the tree at `top` to the daemon; returns the session token.
async fn start(
    client: &Client,
    top: &Path,
    root_name: Option<&str>,
    opts: IngestOptions,
) -> Result<String, StoreError> {
    let top_owned = top.to_path_buf();
    let skip_special = opts.skip_special;
    let entries = tokio::task::spawn_blocking(move || walk(&top_owned, skip_special))
        .await
        .map_err(|e| StoreError::Backend(format!("walk task failed: {e}")))?
        .map_err(StoreError::Backend)?;
    let total: u64 = entries.iter().map(|e| e.size).sum();
    let count = entries.len() as u64;
    let (tx, rx) = mpsc::channel::<proto::IngestFrame>(8);
    let header = proto::IngestFrame {
        frame: Some(Frame::Header(proto::IngestHeader {
            root_name: root_name.unwrap_or_default().to_string(),
        })),
    };
    // Files are read on a blocking thread and handed over frame by frame; if one cannot
    // be read in full the stream stops without its end frame, which the daemon refuses.
    let producer = tokio::task::spawn_blocking(move || -> Result<(), String> {
        use std::io::Read;
        let send = |f: Frame| {
            tx.blocking_send(proto::IngestFrame { frame: Some(f) })
                .map_err(|_| "the upload stopped".to_string())
        };
        send(header.frame.unwrap_or(Frame::Header(Default::default())))?;
        for e in &entries {
            send(Frame::Entry(proto::IngestEntry {
                path: Bytes::copy_from_slice(&e.rel),
                kind: e.kind as i32,
                executable: e.executable,
                size: e.size,
                target: e.target.clone(),
                mtime_ns: (!opts.no_times).then_some(e.mtime),
            }))?;
            if e.kind != Kind::File || e.size == 0 {
                continue;
            }
            let mut f = std::fs::File::open(&e.path)
                .map_err(|err| format!("{}: cannot open: {err}", e.path.display()))?
                .take(e.size);
            let mut left = e.size;
            while left > 0 {
                let mut buf = vec![0u8; (left as usize).min(FRAME_BYTES)];
                f.read_exact(&mut buf).map_err(|err| {
                    format!("{}: changed while uploading: {err}", e.path.display())
                })?;
                left -= buf.len() as u64;
                send(Frame::Data(Bytes::from(buf)))?;
            }
        }
        send(Frame::End(proto::IngestEnd {
            entries: count,
            bytes: total,
        }))?;
        Ok(())
    });
    let rx = std::sync::Mutex::new(Some(rx));
    // Allow the upload time in proportion to its size (at least 1 MiB/s) on top of the
    // call deadline; the stream cannot be replayed, so it is not retried.
    let budget = client.config().timeout + Duration::from_secs(total >> 20);
    let res = client
        .call_with_timeout("ingest start", false, budget, |mut api| {
            let rx = rx.lock().ok().and_then(|mut r| r.take());
            async move {
                let rx = rx.ok_or_else(|| tonic::Status::aborted("upload already used"))?;
                let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                Ok(api.ingest_start(stream).await?.into_inner().token)
            }
        })
        .await;
    let produced = producer
        .await
        .map_err(|e| StoreError::Backend(format!("upload task failed: {e}")))?;
    if let Err(e) = produced {
        return Err(StoreError::Backend(format!(
            "upload of {}: {e}",
            top.display()
        )));
    }
    res
}

/// A session's state, as the daemon reports it.
pub async fn status(client: &Client, token: &str) -> Result<IngestStatus, StoreError> {
    use proto::ingest_status_response::State;
    let req = proto::IngestStatusRequest {
        token: token.to_string(),
    };
    let resp = client
        .call("ingest status", true, |mut api| {
            let req = req.clone();
            async move { Ok(api.ingest_status(req).await?.into_inner()) }
        })
        .await?;
    Ok(match resp.state {
        Some(State::Running(r)) => IngestStatus::Running {
            bytes_done: r.bytes_done,
            bytes_total: r.bytes_total,
        },
        Some(State::Done(d)) => {
            let root = d
                .root
                .ok_or_else(|| StoreError::Backend("ingest status: done without a root".into()))?;
            IngestStatus::Done(node_from_proto(&root)?)
        }
        Some(State::Failed(reason)) => IngestStatus::Failed(reason),
        None => return Err(StoreError::Backend("ingest status: empty answer".into())),
    })
}

#[async_trait::async_trait]
impl IngestService for super::RemoteStore {
    async fn start(
        &self,
        path: &Path,
        root_name: Option<&str>,
        opts: IngestOptions,
    ) -> Result<String, StoreError> {
        start(self.client(), path, root_name, opts).await
    }

    async fn status(&self, token: &str) -> Result<IngestStatus, StoreError> {
        status(self.client(), token).await
    }

    /// Polls with backoff (20 ms doubling to 1 s).
    async fn wait(
        &self,
        token: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<Node, StoreError> {
        let mut pause = Duration::from_millis(20);
        loop {
            match status(self.client(), token).await? {
                IngestStatus::Running {
                    bytes_done,
                    bytes_total,
                } => progress(bytes_done, bytes_total),
                IngestStatus::Done(node) => return Ok(node),
                IngestStatus::Failed(reason) => {
                    return Err(StoreError::Backend(format!(
                        "ingest session {token} failed: {reason}"
                    )))
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}
