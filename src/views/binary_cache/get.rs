//! Reading the cache: nix-cache-info, narinfos (rendered and signed on the fly) and NARs (rendered from the store as they are sent, with ranges).

#[allow(unused_imports)]
use super::*;

pub(super) fn text_response(method: &Method, content_type: &'static str, text: String) -> Response {
    let len = text.len();
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(text)
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

pub(super) async fn get_cache_info(State(c): State<Arc<BinaryCache>>, method: Method) -> Response {
    let text = format!(
        "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
        c.opts.store_dir, c.opts.priority
    );
    text_response(&method, "text/x-nix-cache-info", text)
}

/// Nix writes `nix-cache-info` only into a cache that has none; ours is generated, so the
/// upload is accepted if it names the same store directory and otherwise refused.
pub(super) async fn put_cache_info(
    State(c): State<Arc<BinaryCache>>,
    body: Body,
) -> Result<StatusCode, HttpError> {
    let text = read_limited(body, 64 << 10).await?;
    for line in text.lines() {
        if let Some(dir) = line.strip_prefix("StoreDir: ") {
            if dir != c.opts.store_dir {
                return Err(HttpError(
                    StatusCode::CONFLICT,
                    format!("this cache serves {}, not {dir}", c.opts.store_dir),
                ));
            }
        }
    }
    Ok(StatusCode::OK)
}

/// The hash part of `<hash>.narinfo`, if it is one.
pub(super) fn narinfo_hash(file: &str) -> Option<&str> {
    let hash = file.strip_suffix(".narinfo")?;
    (hash.len() == HASH_PART_LEN && hash.bytes().all(is_nix32_char)).then_some(hash)
}

pub(super) async fn get_file(
    State(c): State<Arc<BinaryCache>>,
    method: Method,
    Path(file): Path<String>,
) -> Result<Response, HttpError> {
    let Some(hash) = narinfo_hash(&file) else {
        return Err(HttpError::not_found(format!("{file}: not in this cache")));
    };
    let Some(name) = c.name_by_hash(hash).await? else {
        return Err(HttpError::not_found(format!("{hash}: no such store path")));
    };
    let nix = match c.store.roots.get(&name).await? {
        Some(RootRecord { nix: Some(nix), .. }) => nix,
        _ => {
            c.index.forget(&name).await;
            return Err(HttpError::not_found(format!("{hash}: no such store path")));
        }
    };
    let text = c.render_narinfo(&name, &nix)?;
    Ok(text_response(&method, "text/x-nix-narinfo", text))
}

/// A single `Range: bytes=...` as a half-open window, `Ok(None)` for no (or an ignored
/// multi-part) range, `Err` for one that cannot be satisfied.
pub(super) fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let Some(spec) = v.to_str().ok().and_then(|s| s.strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multi-part ranges are optional; the whole body is a valid answer.
        return Ok(None);
    }
    let (a, b) = spec.trim().split_once('-').ok_or(())?;
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let n: u64 = b.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size)
        }
        (false, _) => {
            let s: u64 = a.parse().map_err(|_| ())?;
            let e = if b.is_empty() {
                size
            } else {
                let last: u64 = b.parse().map_err(|_| ())?;
                if last < s {
                    return Err(());
                }
                last.saturating_add(1).min(size)
            };
            (s, e)
        }
        (true, true) => return Err(()),
    };
    if start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

pub(super) async fn get_nar(
    State(c): State<Arc<BinaryCache>>,
    method: Method,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Result<Response, HttpError> {
    if method == Method::HEAD {
        // Nix asks before uploading whether the file is already there.
        if let Some(p) = c.pending().get(&format!("nar/{file}")) {
            let mut r = Response::new(Body::empty());
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(p.file_size));
            return Ok(r);
        }
    }
    let not_found = || HttpError::not_found(format!("nar/{file}: not in this cache"));
    let uploaded_xz = c.uploaded().get(&file).copied();
    let Some(want) = uploaded_xz.or_else(|| {
        file.strip_suffix(".nar")
            .and_then(nix32_decode::<32>)
            .map(NarHash)
    }) else {
        return Err(not_found());
    };
    let Some(name) = c.index.by_nar(&c.store, &want).await? else {
        return Err(not_found());
    };
    let (node, nix) = match c.store.roots.get(&name).await? {
        Some(RootRecord {
            node,
            nix: Some(nix),
            ..
        }) if nix.nar_sha256[..] == want.0 => (node, nix),
        _ => {
            c.index.forget(&name).await;
            return Err(not_found());
        }
    };
    let size = nix.nar_size;
    let summary = NarSummary {
        nar_size: size,
        nar_sha256: want,
    };
    if uploaded_xz.is_some() {
        // Nix does not check FileHash when it downloads, only the NarHash of what it
        // decompresses, so a fresh (fast) xz rendering of the same NAR serves.
        let body = if method == Method::HEAD {
            Body::empty()
        } else {
            let nar = StreamReader::new(nar_stream(c.store.clone(), node, summary, None, name));
            let xz = async_compression::tokio::bufread::XzEncoder::with_quality(
                nar,
                async_compression::Level::Fastest,
            );
            Body::from_stream(ReaderStream::with_capacity(xz, 256 << 10))
        };
        let mut r = Response::new(body);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-nix-nar"),
        );
        return Ok(r);
    }
    let range = parse_range(&headers, size).map_err(|()| {
        HttpError(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("nar/{file}: range not satisfiable (size {size})"),
        )
    })?;
    let (status, len) = match range {
        None => (StatusCode::OK, size),
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, e - s),
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(nar_stream(c.store.clone(), node, summary, range, name))
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some((s, e)) = range {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {s}-{}/{size}", e - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(r)
}

/// Bytes of rendered NAR in flight between the writer task and the connection.
pub(super) const PIPE_BYTES: usize = 1 << 20;

/// The NAR of `node` (or the `window` of it), rendered by a task as the client reads. The
/// last piece is held until the writer has finished and its size and hash check out.
pub(super) fn nar_stream(
    store: Store,
    node: Node,
    want: NarSummary,
    window: Option<(u64, u64)>,
    name: String,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (w, r) = tokio::io::duplex(PIPE_BYTES);
    let task = tokio::spawn(async move {
        match window {
            None => {
                let mut w = w;
                let got = write_nar(&store, &node, &mut w)
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                if got != want {
                    return Err(format!(
                        "{name}: NAR rendered as {} ({} bytes), the root records {} ({} bytes)",
                        got.nar_sha256, got.nar_size, want.nar_sha256, want.nar_size
                    ));
                }
                Ok(())
            }
            Some((start, end)) => {
                let mut win = Window {
                    inner: w,
                    pos: 0,
                    start,
                    end,
                };
                match write_nar(&store, &node, &mut win).await {
                    Ok(got) if got.nar_size >= end => Ok(()),
                    Ok(got) => Err(format!(
                        "{name}: NAR rendered as {} bytes, the root records {}",
                        got.nar_size, want.nar_size
                    )),
                    Err(_) if win.pos >= win.end => Ok(()),
                    Err(e) => Err(format!("{name}: {e}")),
                }
            }
        }
    });
    pub(super) struct St {
        chunks: ReaderStream<tokio::io::DuplexStream>,
        held: Option<Bytes>,
        task: Option<tokio::task::JoinHandle<Result<(), String>>>,
    }
    let st = St {
        chunks: ReaderStream::with_capacity(r, 256 << 10),
        held: None,
        task: Some(task),
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            match st.chunks.next().await {
                Some(Ok(b)) => {
                    if let Some(prev) = st.held.replace(b) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.task = None;
                    return Some((Err(e), st));
                }
                None => {
                    let task = st.task.take()?;
                    let verdict = match task.await {
                        Ok(v) => v,
                        Err(e) => Err(format!("NAR writer task failed: {e}")),
                    };
                    return match verdict {
                        Ok(()) => st.held.take().map(|last| (Ok(last), st)),
                        Err(e) => {
                            tracing::warn!("serving NAR: {e}; cutting the transfer short");
                            Some((Err(io::Error::other(e)), st))
                        }
                    };
                }
            }
        }
    })
}

/// Passes on only the bytes in `[start, end)` of what is written; fails once past `end` so
/// the writer stops rendering what nobody asked for.
pub(super) struct Window<W> {
    pub(super) inner: W,
    pub(super) pos: u64,
    pub(super) start: u64,
    pub(super) end: u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Window<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.pos >= me.end {
            return Poll::Ready(Err(io::Error::other("range complete")));
        }
        let len = buf.len() as u64;
        if me.pos + len <= me.start {
            me.pos += len;
            return Poll::Ready(Ok(buf.len()));
        }
        let skip = me.start.saturating_sub(me.pos);
        let take = (len - skip).min(me.end - (me.pos + skip));
        let part = &buf[skip as usize..(skip + take) as usize];
        match Pin::new(&mut me.inner).poll_write(cx, part) {
            Poll::Ready(Ok(n)) => {
                me.pos += skip + n as u64;
                Poll::Ready(Ok(skip as usize + n))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
