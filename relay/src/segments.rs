//! Journal segment files: where a file-backed SQLite store keeps the payloads of spilled
//! journal records ([`crate::store::RecordRow::data`]), so that each payload byte is written
//! once instead of twice (SQLite's WAL, then its checkpoint into the database file).
//!
//! This module owns the `journal/` directory beside the store's database file (mode 0700; one
//! store per directory, because files no row references are removed at open) and the
//! segment files in it (mode 0600): how they are named, written, read, synced and removed.
//! The SQLite side (which segment holds which record, which segments a session owns) is in
//! [`crate::store`], which also decides when a segment is created or deleted.
//!
//! Layout: each session appends to its own current segment, `<id>.seg` with `id` a
//! store-wide number in 16 hex digits (never anything from the peer), until it holds
//! [`ROLL_BYTES`]; then a new segment starts. Every entry is a 20-byte header (magic,
//! CRC-32 of seq + length + payload, seq, payload length) followed by the payload, and the
//! index row of the record names the segment, the entry's offset and the payload length;
//! reading checks all of them, so that a short, misplaced or damaged entry is reported as
//! [`StoreError::Corrupt`]. Bytes no index row points to (a batch written just before a
//! crash, a resend) are never read and go with their segment.
//!
//! Durability: payloads are written (one positioned write per batch) before the index rows
//! are committed, without a sync, like SQLite's own `synchronous=NORMAL` commits: they
//! survive the relay being killed (the page cache keeps them). [`Segments::sync`] fdatasyncs
//! every segment written since it last ran (and the directory when a segment was created),
//! then drops their cached pages (written once, read rarely). The store's checkpointer calls
//! it before it checkpoints the WAL, so that what the database file holds after a checkpoint
//! points at payload synced before it. Like `synchronous=NORMAL` itself, this is not proof
//! against a power loss in the last moments:
//! WAL pages may reach the disk before the payload pages they point to, and a commit made
//! while the sync runs is checkpointed by that round, synced by the next. A record whose
//! payload was lost that way reads as [`StoreError::Corrupt`] (the checksum), never as
//! other bytes.
//!
//! Concurrency: one writer per session, a `tokio` mutex held from the file write until the
//! index rows are committed (the write itself runs in `spawn_blocking`, holding the owned
//! guard, so a cancelled append never leaves a write racing the next one). Reads are
//! positioned reads on their own file handles and run beside writes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;

use crate::store::StoreError;

/// The segment directory's name, beside the database file.
pub const DIR_NAME: &str = "journal";
/// A session starts a new segment before one would grow beyond this (a single batch larger
/// than it still goes into one segment).
pub const ROLL_BYTES: u64 = 64 << 20;
/// Largest payload kept in a segment; larger records stay inline in the database. Also the
/// bound on any payload length read back.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Bytes before each payload: magic, CRC-32, seq, payload length.
pub const HEADER_LEN: usize = 20;
/// Writers idle this long are closed by [`Segments::close_idle`].
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);

const MAGIC: [u8; 4] = *b"RJS1";
/// Adjacent entries are read with one positioned read up to this many bytes.
const READ_RUN_MAX: u64 = 8 << 20;
const SUFFIX: &str = ".seg";

/// Where a record's payload is: segment id, offset of its entry (header), payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub segment: i64,
    pub offset: u64,
    pub len: u64,
}

/// The segment files of one store.
pub struct Segments {
    dir: PathBuf,
    next_id: AtomicI64,
    /// [`ROLL_BYTES`] (tests use less).
    roll_bytes: AtomicU64,
    writers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Writer>>>>,
    dirty: Mutex<Dirty>,
}

/// What [`Segments::sync`] has to flush.
#[derive(Default)]
struct Dirty {
    files: HashMap<i64, Arc<File>>,
    dir: bool,
}

/// A session's writer: its current segment, once known.
pub struct Writer {
    /// Whether the store was asked for the session's latest segment (to resume it).
    pub looked_up: bool,
    /// The journal's `(stored_seq, max_seq)` as last committed by this writer (`None`:
    /// unknown, read them). Only appends, which hold the writer, change them.
    pub counters: Option<(i64, i64)>,
    current: Option<Current>,
    last_write: Instant,
}

struct Current {
    id: i64,
    file: Arc<File>,
    len: u64,
}

/// A failed read: a segment file gone (trimmed or deleted while the read ran: read again),
/// or anything else.
pub enum ReadError {
    Missing(PathBuf),
    Store(StoreError),
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        ReadError::Store(e)
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Segment {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Open `path` for reading and writing, creating it with mode 0600 if missing (an existing
/// file keeps its contents).
pub(crate) fn open_private(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt {
        what: "reading a journal segment",
        detail,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Segments {
    /// The segment directory beside the database file `db_path`, created (0700) if missing.
    pub fn open(db_path: &Path) -> Result<Segments, StoreError> {
        let parent = match db_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = parent.join(DIR_NAME);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create the directory", &dir)(e)),
        }
        let meta = std::fs::metadata(&dir).map_err(io_err("inspect", &dir))?;
        if !meta.is_dir() {
            return Err(StoreError::Segment {
                action: "use as a directory",
                path: dir,
                source: io::Error::other("it exists and is not a directory; move it away"),
            });
        }
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("restrict the mode of", &dir))?;
        }
        Ok(Segments {
            dir,
            next_id: AtomicI64::new(1),
            roll_bytes: AtomicU64::new(ROLL_BYTES),
            writers: Mutex::new(HashMap::new()),
            dirty: Mutex::new(Dirty::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[cfg(test)]
    pub(crate) fn set_roll_bytes(&self, bytes: u64) {
        self.roll_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Whether `bytes` more need a segment other than the writer's current one (none yet, or
    /// it would grow past the roll size).
    pub fn needs_segment(&self, writer: &Writer, bytes: u64) -> bool {
        match &writer.current {
            None => true,
            Some(c) => {
                c.len > 0 && c.len.saturating_add(bytes) > self.roll_bytes.load(Ordering::Relaxed)
            }
        }
    }

    /// The file of segment `id`.
    pub fn path(&self, id: i64) -> PathBuf {
        self.dir.join(format!("{id:016x}{SUFFIX}"))
    }

    /// Ids of the segment files present (other names are left alone).
    pub fn list(&self) -> Result<Vec<i64>, StoreError> {
        let mut ids = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
                continue;
            };
            if stem.len() == 16
                && let Ok(id) = i64::from_str_radix(stem, 16)
                && id > 0
            {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// At open: remove the files in `files` (listed before `known` was read) that no segment
    /// row knows (their rows were deleted, and the unlink did not happen), and start
    /// numbering new segments after every id in use. A segment's row is committed before its
    /// file is created, so a file being written by another process is never removed here.
    pub fn recover(&self, files: &[i64], known: &HashSet<i64>) {
        for id in files.iter().filter(|id| !known.contains(id)) {
            let path = self.path(*id);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!("removed the orphaned journal segment {}", path.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    "cannot remove the orphaned journal segment {}: {e}",
                    path.display()
                ),
            }
        }
        let top = files.iter().chain(known.iter()).copied().max().unwrap_or(0);
        self.next_id
            .fetch_max(top.saturating_add(1), Ordering::SeqCst);
    }

    /// A new segment id, never used before by this store (while it runs) nor present on disk
    /// at open.
    pub fn allocate_id(&self, at_least: i64) -> i64 {
        self.next_id.fetch_max(at_least, Ordering::SeqCst);
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// The writer of `session`.
    pub fn writer(&self, session: &str) -> Arc<tokio::sync::Mutex<Writer>> {
        let mut map = lock(&self.writers);
        map.entry(session.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Writer {
                    looked_up: false,
                    counters: None,
                    current: None,
                    last_write: Instant::now(),
                }))
            })
            .clone()
    }

    /// Make segment `id` the writer's current one, creating its file (0600) if missing and
    /// appending after whatever it holds. The store commits the segment's row first.
    pub fn open_segment(&self, writer: &mut Writer, id: i64) -> Result<(), StoreError> {
        let path = self.path(id);
        let file = open_private(&path).map_err(io_err("open", &path))?;
        let len = file.metadata().map_err(io_err("inspect", &path))?.len();
        writer.current = Some(Current {
            id,
            file: Arc::new(file),
            len,
        });
        lock(&self.dirty).dir = true;
        Ok(())
    }

    /// Append the payloads of `records` (`(seq, payload)`) to the writer's current segment
    /// with one write; returns where each went. The caller made sure there is a current
    /// segment ([`Segments::needs_segment`]).
    pub async fn write(
        self: &Arc<Self>,
        mut writer: OwnedMutexGuard<Writer>,
        records: &[(u64, &[u8])],
    ) -> Result<(OwnedMutexGuard<Writer>, Vec<Loc>), StoreError> {
        let Some(current) = &writer.current else {
            return Err(StoreError::Segment {
                action: "append to",
                path: self.dir.clone(),
                source: io::Error::other("no current segment (a bug in the relay)"),
            });
        };
        let (id, start) = (current.id, current.len);
        if let Some((seq, d)) = records.iter().find(|(_, d)| d.len() > MAX_PAYLOAD) {
            return Err(StoreError::Segment {
                action: "append to",
                path: self.path(id),
                source: io::Error::other(format!(
                    "record seq {seq} has {} bytes, more than a segment entry holds ({MAX_PAYLOAD}; a bug in the relay)",
                    d.len()
                )),
            });
        }
        let total: usize = records.iter().map(|(_, d)| HEADER_LEN + d.len()).sum();
        let mut buf = Vec::with_capacity(total);
        let mut locs = Vec::with_capacity(records.len());
        for (seq, data) in records {
            locs.push(Loc {
                segment: id,
                offset: start + buf.len() as u64,
                len: data.len() as u64,
            });
            encode(&mut buf, *seq, data);
        }
        let me = Arc::clone(self);
        let done = tokio::task::spawn_blocking(move || {
            let path = me.path(id);
            let Some(current) = writer.current.as_mut() else {
                return (writer, Ok(()));
            };
            let file = Arc::clone(&current.file);
            // Mark first: a write that fails halfway still leaves bytes to flush.
            lock(&me.dirty).files.insert(id, Arc::clone(&file));
            let result = file
                .write_all_at(&buf, start)
                .map_err(io_err("write to", &path));
            if result.is_ok() {
                current.len = start + buf.len() as u64;
            }
            writer.last_write = Instant::now();
            (writer, result)
        })
        .await;
        match done {
            Ok((writer, Ok(()))) => Ok((writer, locs)),
            Ok((_, Err(e))) => Err(e),
            Err(join) => Err(StoreError::Segment {
                action: "write to",
                path: self.path(id),
                source: io::Error::other(join.to_string()),
            }),
        }
    }

    /// Read the payloads at `locs` (`(seq, loc)`, any order), checking every entry.
    pub async fn read(&self, locs: Vec<(u64, Loc)>) -> Result<Vec<Vec<u8>>, ReadError> {
        let dir = self.dir.clone();
        let paths: HashMap<i64, PathBuf> = locs
            .iter()
            .map(|(_, l)| (l.segment, self.path(l.segment)))
            .collect();
        tokio::task::spawn_blocking(move || read_blocking(&dir, &paths, &locs))
            .await
            .map_err(|e| {
                ReadError::Store(StoreError::Segment {
                    action: "read from",
                    path: self.dir.clone(),
                    source: io::Error::other(e.to_string()),
                })
            })?
    }

    /// fdatasync every segment written since the last call, and the directory if a segment
    /// was created. On failure the files stay marked for the next call.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (files, dir_dirty) = {
            let mut dirty = lock(&self.dirty);
            let dir = std::mem::take(&mut dirty.dir);
            (std::mem::take(&mut dirty.files), dir)
        };
        if files.is_empty() && !dir_dirty {
            return Ok(());
        }
        let dir = self.dir.clone();
        let paths: HashMap<i64, PathBuf> = files.keys().map(|id| (*id, self.path(*id))).collect();
        let result = tokio::task::spawn_blocking(move || {
            let mut failed: Option<(PathBuf, io::Error)> = None;
            let mut remaining = HashMap::new();
            for (id, file) in files {
                match file.sync_data() {
                    Ok(()) => drop_cached(&file),
                    Err(e) => {
                        let path = paths.get(&id).cloned().unwrap_or_else(|| dir.clone());
                        failed.get_or_insert((path, e));
                        remaining.insert(id, file);
                    }
                }
            }
            if dir_dirty && let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
                failed.get_or_insert((dir.clone(), e));
            }
            (remaining, dir_dirty && failed.is_some(), failed)
        })
        .await;
        let (remaining, dir_again, failed) = match result {
            Ok(r) => r,
            Err(e) => {
                return Err(StoreError::Segment {
                    action: "sync",
                    path: self.dir.clone(),
                    source: io::Error::other(e.to_string()),
                });
            }
        };
        if let Some((path, source)) = failed {
            let mut dirty = lock(&self.dirty);
            for (id, file) in remaining {
                dirty.files.entry(id).or_insert(file);
            }
            dirty.dir |= dir_again;
            return Err(StoreError::Segment {
                action: "sync",
                path,
                source,
            });
        }
        Ok(())
    }

    /// Drop the writers of sessions that wrote nothing for `idle` (closing their files); a
    /// later append resumes the session's latest segment.
    pub fn close_idle(&self, idle: Duration) {
        let mut map = lock(&self.writers);
        map.retain(|_, w| {
            if Arc::strong_count(w) > 1 {
                return true;
            }
            match w.try_lock() {
                Ok(g) => g.last_write.elapsed() < idle,
                Err(_) => true,
            }
        });
    }

    /// A session was deleted: close its current segment and forget its writer (unless
    /// another append is waiting for it).
    pub fn forget(&self, session: &str, mut writer: OwnedMutexGuard<Writer>) {
        writer.current = None;
        writer.looked_up = false;
        writer.counters = None;
        let mut map = lock(&self.writers);
        // Ours (in the guard) and the map's: nobody else waits for this writer.
        if map.get(session).is_some_and(|w| Arc::strong_count(w) <= 2) {
            map.remove(session);
        }
    }

    /// Delete segments `ids` (their rows are gone). Failures are logged: the files are
    /// orphans then, removed at the next open.
    pub async fn remove(&self, ids: Vec<i64>) {
        if ids.is_empty() {
            return;
        }
        {
            let mut dirty = lock(&self.dirty);
            for id in &ids {
                dirty.files.remove(id);
            }
        }
        let paths: Vec<PathBuf> = ids.iter().map(|id| self.path(*id)).collect();
        let done = tokio::task::spawn_blocking(move || {
            for path in paths {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(
                        "cannot remove the journal segment {}: {e}; it is removed at the next start",
                        path.display()
                    ),
                }
            }
        })
        .await;
        if let Err(e) = done {
            tracing::warn!("removing journal segments did not complete: {e}");
        }
    }
}

/// Let the kernel drop the cached pages of a synced segment. A journal is written once and
/// read rarely (when a client catches up), so its pages are better reused for the next
/// writes than kept: with it, the spill benchmark's relay spent 3.0-3.5 s of CPU per GiB
/// instead of 4.0-5.0 s (page cache allocation dominated). Advisory: failures are ignored.
fn drop_cached(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; `file` is an open descriptor
    // for the duration of the call.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Append one entry (header + payload) to `buf`.
fn encode(buf: &mut Vec<u8>, seq: u64, data: &[u8]) {
    let len = data.len() as u32;
    let crc = checksum(seq, len, data);
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(data);
}

fn checksum(seq: u64, len: u32, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(data);
    h.finalize()
}

/// Check the entry `entry` (header + payload) read from `path` at `offset` for record `seq`
/// of `len` payload bytes; returns the payload.
fn decode(
    entry: &[u8],
    seq: u64,
    len: u64,
    path: &Path,
    offset: u64,
) -> Result<Vec<u8>, StoreError> {
    let at = || format!("{} at offset {offset} (record seq {seq})", path.display());
    let bad = |what: String| {
        corrupt(format!(
            "{what} in the journal segment {}; the segment is damaged: the session's records from there on cannot be read (deleting the session discards them)",
            at()
        ))
    };
    let word = |i: usize| {
        entry
            .get(i..i + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let (Some(crc), Some(hseq), Some(hlen)) = (
        word(4),
        entry
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes),
        word(16),
    ) else {
        return Err(bad("a truncated entry header".into()));
    };
    if entry.get(..4) != Some(&MAGIC[..]) {
        return Err(bad("no entry header".into()));
    }
    if hseq != seq {
        return Err(bad(format!("an entry for seq {hseq}")));
    }
    if u64::from(hlen) != len {
        return Err(bad(format!("an entry of {hlen} bytes, not {len}")));
    }
    let Some(data) = entry.get(HEADER_LEN..) else {
        return Err(bad("a truncated entry".into()));
    };
    if data.len() as u64 != len {
        return Err(bad("a truncated entry".into()));
    }
    if checksum(seq, hlen, data) != crc {
        return Err(bad("a checksum mismatch".into()));
    }
    Ok(data.to_vec())
}

fn read_blocking(
    dir: &Path,
    paths: &HashMap<i64, PathBuf>,
    locs: &[(u64, Loc)],
) -> Result<Vec<Vec<u8>>, ReadError> {
    for (seq, l) in locs {
        if l.len > MAX_PAYLOAD as u64 {
            return Err(ReadError::Store(corrupt(format!(
                "the index gives record seq {seq} {} bytes in segment {} (at most {MAX_PAYLOAD}); the database is damaged",
                l.len, l.segment
            ))));
        }
    }
    let mut order: Vec<usize> = (0..locs.len()).collect();
    order.sort_by_key(|&i| (locs[i].1.segment, locs[i].1.offset));
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); locs.len()];
    let mut files: HashMap<i64, File> = HashMap::new();
    let mut i = 0;
    while i < order.len() {
        // A run of adjacent entries of one segment, read at once.
        let first = locs[order[i]].1;
        let mut end = first.offset + HEADER_LEN as u64 + first.len;
        let mut j = i + 1;
        while j < order.len() {
            let l = locs[order[j]].1;
            let next_end = l.offset + HEADER_LEN as u64 + l.len;
            if l.segment != first.segment
                || l.offset != end
                || next_end - first.offset > READ_RUN_MAX
            {
                break;
            }
            end = next_end;
            j += 1;
        }
        let path = paths
            .get(&first.segment)
            .cloned()
            .unwrap_or_else(|| dir.to_path_buf());
        let file = match files.entry(first.segment) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match File::open(&path) {
                Ok(f) => v.insert(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ReadError::Missing(path));
                }
                Err(e) => {
                    return Err(ReadError::Store(StoreError::Segment {
                        action: "open",
                        path,
                        source: e,
                    }));
                }
            },
        };
        let mut buf = vec![0u8; (end - first.offset) as usize];
        if let Err(e) = file.read_exact_at(&mut buf, first.offset) {
            let (seq, _) = locs[order[i]];
            return Err(ReadError::Store(
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    corrupt(format!(
                        "the journal segment {} ends before the entries from offset {} to {end} (records from seq {seq}); it was truncated: those records are lost",
                        path.display(),
                        first.offset
                    ))
                } else {
                    StoreError::Segment {
                        action: "read",
                        path,
                        source: e,
                    }
                },
            ));
        }
        for &k in &order[i..j] {
            let (seq, l) = locs[k];
            let from = (l.offset - first.offset) as usize;
            let to = from + HEADER_LEN + l.len as usize;
            let entry = buf.get(from..to).unwrap_or(&[]);
            out[k] = decode(entry, seq, l.len, &path, l.offset).map_err(ReadError::Store)?;
        }
        i = j;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip_and_checks() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, b"hello");
        assert_eq!(buf.len(), HEADER_LEN + 5);
        let p = Path::new("/x.seg");
        assert_eq!(decode(&buf, 7, 5, p, 0).unwrap(), b"hello");
        assert!(matches!(
            decode(&buf, 8, 5, p, 0),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            decode(&buf, 7, 4, p, 0),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            decode(&buf[..10], 7, 5, p, 0),
            Err(StoreError::Corrupt { .. })
        ));
        let mut flipped = buf.clone();
        flipped[HEADER_LEN + 1] ^= 1;
        assert!(matches!(
            decode(&flipped, 7, 5, p, 0),
            Err(StoreError::Corrupt { .. })
        ));
        let mut magic = buf.clone();
        magic[0] = b'X';
        assert!(matches!(
            decode(&magic, 7, 5, p, 0),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
