//! A store's own figures: walked from its roots, its chunks read (`granary dedup --store`, `granary info --dedup`).

#[allow(unused_imports)]
use super::*;

/// What a walk of a store's roots found, metadata only.
#[derive(Default)]
pub(super) struct StoreWalk {
    /// Directories seen, with what their subtree holds (memoised: shared subtrees are
    /// fetched once but counted at every occurrence).
    pub(super) dir_logical: HashMap<B3Digest, SubtreeCounts>,
    /// Distinct non-empty blobs, in the order first met, with their size.
    pub(super) blobs: Vec<(B3Digest, u64)>,
    pub(super) blob_set: HashSet<B3Digest>,
    pub(super) files: u64,
    pub(super) dirs: u64,
    pub(super) symlinks: u64,
}

/// Totals over a subtree, the directory itself included.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SubtreeCounts {
    pub(super) logical: u64,
    pub(super) files: u64,
    pub(super) dirs: u64,
    pub(super) symlinks: u64,
}

impl StoreWalk {
    /// Walks the tree under `node`; returns its logical bytes. New directories are recorded
    /// in `shared`, new blobs appended to `self.blobs`.
    pub(super) async fn walk(
        &mut self,
        store: &Store,
        shared: &Shared,
        node: &Node,
    ) -> Result<u64, DedupError> {
        let top = match node {
            Node::File { digest, size, .. } => {
                self.files += 1;
                self.blob(digest, *size);
                return Ok(*size);
            }
            Node::Symlink { .. } => {
                self.symlinks += 1;
                return Ok(0);
            }
            Node::Directory { digest, .. } => *digest,
        };
        // Iterative post-order, as in tree::logical_size.
        let mut stack = vec![(top, false)];
        while let Some((d, expanded)) = stack.pop() {
            if self.dir_logical.contains_key(&d) {
                continue;
            }
            let dir = store
                .dirs
                .get(&d)
                .await?
                .ok_or_else(|| StoreError::not_found("directory", &d))?;
            let children: Vec<B3Digest> = dir
                .directories
                .iter()
                .map(|e| B3Digest::try_from(&e.digest[..]))
                .collect::<Result<_, _>>()
                .map_err(StoreError::from)?;
            if !expanded && children.iter().any(|c| !self.dir_logical.contains_key(c)) {
                stack.push((d, true));
                stack.extend(children.into_iter().map(|c| (c, false)));
                continue;
            }
            shared.add_dir(&dir);
            let mut total = SubtreeCounts {
                dirs: 1,
                files: dir.files.len() as u64,
                symlinks: dir.symlinks.len() as u64,
                logical: 0,
            };
            for f in &dir.files {
                let digest = B3Digest::try_from(&f.digest[..]).map_err(StoreError::from)?;
                self.blob(&digest, f.size);
                total.logical = total.logical.saturating_add(f.size);
            }
            for c in &children {
                let sub = self.dir_logical.get(c).copied().unwrap_or_default();
                total.logical = total.logical.saturating_add(sub.logical);
                total.files += sub.files;
                total.dirs += sub.dirs;
                total.symlinks += sub.symlinks;
            }
            self.dir_logical.insert(d, total);
        }
        let t = self.dir_logical.get(&top).copied().unwrap_or_default();
        self.files += t.files;
        self.dirs += t.dirs;
        self.symlinks += t.symlinks;
        Ok(t.logical)
    }

    pub(super) fn blob(&mut self, digest: &B3Digest, size: u64) {
        if size > 0 && self.blob_set.insert(*digest) {
            self.blobs.push((*digest, size));
        }
    }
}

/// Analyses the content of a store's named roots, each root an input in name order.
/// Each distinct blob is read once (via the store, digests checked); repeated files and
/// subtrees still count towards logical bytes. Async; the reading runs on blocking threads.
pub async fn analyse_store(
    store: &Store,
    opts: &DedupOptions,
    progress: Arc<Progress>,
) -> Result<Report, DedupError> {
    if opts.strategies.is_empty() {
        return Err(DedupError::Task("no strategy to measure".into()));
    }
    let shared = Arc::new(Shared::new(opts));
    let names = store.roots.list().await?;
    let mut walk = StoreWalk::default();
    // (root, logical, first new blob, end) per root.
    let mut plan = Vec::new();
    for name in &names {
        let rec = store
            .roots
            .get(name)
            .await?
            .ok_or_else(|| DedupError::Task(format!("root {name} vanished during the walk")))?;
        let start = walk.blobs.len();
        let logical = walk.walk(store, &shared, &rec.node).await?;
        plan.push((name.clone(), logical, start, walk.blobs.len()));
    }
    let total: u64 = walk.blobs.iter().map(|b| b.1).sum();
    shared.plan_groups(total);
    progress.bytes_total.fetch_add(total, Ordering::Relaxed);
    progress
        .files_total
        .fetch_add(walk.blobs.len() as u64, Ordering::Relaxed);
    // Directories were recorded during the walk; the marginal gains attribute them to the
    // first root that reaches them, so record them again per root below.
    let dirs_by_root = per_root_dirs(store, &names).await?;
    lock(&shared.dirs).clear();

    let jobs = default_jobs(opts);
    let rt = tokio::runtime::Handle::current();
    let blobs = Arc::new(walk.blobs);
    let mut per_input = Vec::new();
    for ((name, logical, start, end), dirs) in plan.into_iter().zip(dirs_by_root) {
        let _ = name;
        let (shared2, blobs2, rt2, progress2, store2) = (
            shared.clone(),
            blobs.clone(),
            rt.clone(),
            progress.clone(),
            store.clone(),
        );
        let totals = tokio::task::spawn_blocking(move || {
            run_parallel(&shared2, jobs, end - start, |worker, i| {
                let (digest, size) = blobs2[start + i];
                scan_blob(&rt2, &store2, worker, &digest, size, &progress2)
            })?;
            shared2.logical.fetch_add(logical, Ordering::Relaxed);
            {
                let mut d = lock(&shared2.dirs);
                for (k, v) in dirs {
                    d.insert(k, v);
                }
            }
            Ok::<_, DedupError>(shared2.totals())
        })
        .await
        .map_err(|e| DedupError::Task(e.to_string()))??;
        per_input.push((logical, totals));
    }
    let shared =
        Arc::try_unwrap(shared).map_err(|_| DedupError::Task("analysis still running".into()))?;
    let counts = (walk.files, walk.dirs, walk.symlinks, 0);
    Ok(build_report(shared, names, per_input, counts))
}

/// The directories reachable from each root (encoded lengths), for per-root marginal gains.
pub(super) async fn per_root_dirs(
    store: &Store,
    names: &[String],
) -> Result<Vec<Vec<(B3Digest, u64)>>, DedupError> {
    let mut out = Vec::new();
    let mut seen: HashSet<B3Digest> = HashSet::new();
    for name in names {
        let mut mine = Vec::new();
        if let Some(rec) = store.roots.get(name).await? {
            if let Node::Directory { digest, .. } = rec.node {
                let mut stack = vec![digest];
                while let Some(d) = stack.pop() {
                    if !seen.insert(d) {
                        continue;
                    }
                    let dir = store
                        .dirs
                        .get(&d)
                        .await?
                        .ok_or_else(|| StoreError::not_found("directory", &d))?;
                    mine.push((d, dir.encode_canonical().len() as u64));
                    for e in &dir.directories {
                        stack.push(B3Digest::try_from(&e.digest[..]).map_err(StoreError::from)?);
                    }
                }
            }
        }
        out.push(mine);
    }
    Ok(out)
}

pub(super) fn scan_blob(
    rt: &tokio::runtime::Handle,
    store: &Store,
    worker: &mut Worker<'_>,
    digest: &B3Digest,
    size: u64,
    progress: &Progress,
) -> Result<(), DedupError> {
    let mut scan = worker.scan();
    rt.block_on(async {
        let reader = BlobReader::open(store.blobs.clone(), *digest).await?;
        if reader.size() != size {
            return Err(DedupError::Store(StoreError::corrupt(
                "blob",
                digest,
                format!("is {} bytes, its directory says {size}", reader.size()),
            )));
        }
        let mut s = std::pin::pin!(reader.stream());
        while let Some(piece) = s.next().await {
            let piece = piece?;
            scan.push(&piece)?;
            progress
                .bytes_done
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    })?;
    let (got, _) = scan.finish()?;
    if got != *digest {
        return Err(DedupError::Store(StoreError::corrupt(
            "blob",
            digest,
            format!("content hashes to {got}"),
        )));
    }
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// What a store holds as it is, from its metadata alone (no chunk is read): the `store`
/// strategy's figures for `granary info --dedup`. `zstd_bytes`, `stored_bytes`,
/// `packed_bytes` and `disk_bytes` are left 0: the caller knows the real sizes from the
/// backend.
pub async fn store_figures(store: &Store) -> Result<StrategyReport, DedupError> {
    let opts = DedupOptions {
        strategies: vec![Strategy::Store(store.params())],
        ..Default::default()
    };
    let shared = Shared::new(&opts);
    let names = store.roots.list().await?;
    let mut walk = StoreWalk::default();
    let mut per_input = Vec::new();
    let mut logical_total = 0u64;
    let mut indexes = (0u64, 0u64);
    let mut done = 0usize;
    for name in &names {
        let rec = store
            .roots
            .get(name)
            .await?
            .ok_or_else(|| DedupError::Task(format!("root {name} vanished during the walk")))?;
        let logical = walk.walk(store, &shared, &rec.node).await?;
        logical_total += logical;
        for (digest, size) in &walk.blobs[done..] {
            let meta = store
                .blobs
                .stat(digest)
                .await?
                .ok_or_else(|| StoreError::not_found("blob", digest))?;
            if meta.size != *size {
                return Err(DedupError::Store(StoreError::corrupt(
                    "blob",
                    digest,
                    format!("is {} bytes, its directory says {size}", meta.size),
                )));
            }
            if meta.chunks.len() > 1 {
                indexes.0 += 1;
                indexes.1 += meta.to_index().encode_sealed().len() as u64;
            }
            let mut s = lock(&shared.accs[0].seen);
            for c in &meta.chunks {
                if s.chunks.insert(c.digest, c.size).is_none() {
                    s.bytes += c.size;
                }
            }
        }
        done = walk.blobs.len();
        shared.accs[0]
            .blob_indexes
            .store(indexes.0, Ordering::Relaxed);
        shared.accs[0]
            .blob_index_bytes
            .store(indexes.1, Ordering::Relaxed);
        per_input.push((logical, shared.totals()));
    }
    shared.logical.store(logical_total, Ordering::Relaxed);
    let counts = (walk.files, walk.dirs, walk.symlinks, 0);
    let mut report = build_report(shared, names, per_input, counts);
    let mut s = report
        .strategies
        .pop()
        .ok_or_else(|| DedupError::Task("no figures".into()))?;
    s.zstd_bytes = 0;
    s.stored_bytes = 0;
    s.stored_ratio = 0.0;
    s.packed_bytes = 0;
    s.disk_bytes = 0;
    for m in &mut s.marginal {
        m.zstd_bytes = 0;
        m.stored_bytes = 0;
    }
    Ok(s)
}
