//! A session's journal: every record of output (and command start/exit) with a strictly
//! increasing `seq`, kept in memory up to a byte budget. Readers ask for records from a seq;
//! clients acknowledge what they consumed. When the budget is full, `block` mode makes the
//! writer wait until acknowledged records can be trimmed (the process stalls, nothing is
//! lost) and `drop` mode evicts the oldest records and counts the bytes evicted. `spill` mode
//! (agents with a relay) trims what the relay has persisted ([`Journal::persisted`]) rather
//! than what clients acknowledged, and otherwise blocks like `block`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use remote_proto::session::{Exit, Record, record};
use tokio::sync::watch;

use super::payload::{Arena, Payload};

/// Bytes counted for a record beyond its payload, so that floods of tiny records are bounded.
const RECORD_OVERHEAD: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Block,
    Drop,
    Spill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("the session is closed")]
    Closed,
}

struct Stored {
    /// The record, its output bytes moved to `payload`.
    record: Record,
    payload: Option<Payload>,
    size: usize,
    /// Acknowledged on its own (by a client following its command), ahead of `acked`.
    consumed: bool,
}

impl Stored {
    /// The record with its output bytes put back.
    fn to_record(&self) -> Record {
        let mut record = self.record.clone();
        if let (Some(record::Kind::Output(o)), Some(p)) = (record.kind.as_mut(), &self.payload) {
            o.data = p.bytes().to_vec();
        }
        record
    }
}

struct Inner {
    records: VecDeque<Stored>,
    arena: Arena,
    bytes: usize,
    next_seq: u64,
    acked: u64,
    /// Highest seq the relay has persisted (spill mode trims up to here).
    persisted: u64,
    /// Payload bytes evicted in drop mode that were never acknowledged, total.
    dropped: u64,
    /// Highest seq evicted in drop mode.
    evicted_upto: u64,
    /// Next seq each live reader will read; trimming never passes them.
    readers: HashMap<u64, u64>,
    next_reader: u64,
    closed: bool,
    last_output: Option<std::time::SystemTime>,
    /// How recent commands ended, by command id, whoever consumes their exit records: a
    /// reader that follows one command learns of its end even when another client already
    /// acknowledged the record. The oldest are forgotten beyond `MAX_EXITS`.
    exits: HashMap<u64, Exit>,
    exit_order: VecDeque<u64>,
}

/// Exits remembered per journal.
const MAX_EXITS: usize = 4096;

pub struct Journal {
    inner: Mutex<Inner>,
    capacity: usize,
    mode: Mode,
    /// Latest seq appended (0: none yet); readers wait on it.
    appended: watch::Sender<u64>,
    /// Bumped when space may have been freed; a blocked writer waits on it.
    freed: watch::Sender<u64>,
}

/// A snapshot of the journal's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub next_seq: u64,
    pub acked: u64,
    pub bytes: usize,
    pub capacity: usize,
    pub dropped: u64,
    /// When output was last appended.
    pub last_output: Option<std::time::SystemTime>,
}

/// What a reader gets: records from its position (skipping those already consumed on their
/// own), where to read next, and how many unacknowledged bytes were evicted in front of that
/// position (drop mode).
pub struct Batch {
    pub records: Vec<Record>,
    pub next: u64,
    pub dropped_before: u64,
}

impl Journal {
    pub fn new(capacity: usize, mode: Mode) -> Journal {
        Journal {
            inner: Mutex::new(Inner {
                records: VecDeque::new(),
                arena: Arena::default(),
                bytes: 0,
                next_seq: 1,
                acked: 0,
                persisted: 0,
                dropped: 0,
                evicted_upto: 0,
                readers: HashMap::new(),
                next_reader: 0,
                closed: false,
                last_output: None,
                exits: HashMap::new(),
                exit_order: VecDeque::new(),
            }),
            capacity: capacity.max(RECORD_OVERHEAD * 4),
            mode,
            appended: watch::channel(0).0,
            freed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn stats(&self) -> Stats {
        let g = self.lock();
        Stats {
            next_seq: g.next_seq,
            acked: g.acked,
            bytes: g.bytes,
            capacity: self.capacity,
            dropped: g.dropped,
            last_output: g.last_output,
        }
    }

    /// Append a record (its seq is assigned here). In block mode this waits while the journal
    /// is full of unacknowledged output; control records (start, exit) never wait.
    pub async fn append(
        &self,
        command_id: u64,
        mut kind: record::Kind,
    ) -> Result<u64, JournalError> {
        let size = RECORD_OVERHEAD
            + match &kind {
                record::Kind::Output(o) => o.data.len(),
                _ => 0,
            };
        let control = !matches!(kind, record::Kind::Output(_));
        let mut freed = self.freed.subscribe();
        loop {
            {
                let mut g = self.lock();
                if g.closed {
                    return Err(JournalError::Closed);
                }
                self.trim(&mut g, size);
                if g.bytes + size <= self.capacity || control || g.records.is_empty() {
                    let seq = g.next_seq;
                    g.next_seq += 1;
                    g.bytes += size;
                    if !control {
                        g.last_output = Some(std::time::SystemTime::now());
                    }
                    let payload = match &mut kind {
                        record::Kind::Output(o) => Some(g.arena.store(std::mem::take(&mut o.data))),
                        record::Kind::Exit(e) => {
                            g.exits.insert(command_id, e.clone());
                            g.exit_order.push_back(command_id);
                            if g.exit_order.len() > MAX_EXITS
                                && let Some(old) = g.exit_order.pop_front()
                            {
                                g.exits.remove(&old);
                            }
                            None
                        }
                        _ => None,
                    };
                    g.records.push_back(Stored {
                        record: Record {
                            seq,
                            command_id,
                            kind: Some(kind),
                        },
                        payload,
                        size,
                        consumed: false,
                    });
                    drop(g);
                    self.appended.send_replace(seq);
                    return Ok(seq);
                }
            }
            // Block mode and full: wait for an acknowledgement (or close).
            if freed.changed().await.is_err() {
                return Err(JournalError::Closed);
            }
        }
    }

    /// Make room for `size` bytes: drop acknowledged records no live reader still needs; in
    /// drop mode, then evict the oldest records whatever their state.
    fn trim(&self, g: &mut Inner, size: usize) {
        let reader_floor = g.readers.values().copied().min().unwrap_or(u64::MAX);
        while g.bytes + size > self.capacity {
            let Some(front) = g.records.front() else {
                break;
            };
            let seq = front.record.seq;
            let done = match self.mode {
                Mode::Spill => g.persisted,
                Mode::Block | Mode::Drop => g.acked,
            };
            let consumed = seq <= done && seq < reader_floor;
            if consumed || self.mode == Mode::Drop {
                let Some(old) = g.records.pop_front() else {
                    break;
                };
                g.bytes -= old.size;
                if !consumed {
                    if seq > g.acked {
                        g.dropped += (old.size - RECORD_OVERHEAD) as u64;
                    }
                    g.evicted_upto = seq;
                }
            } else {
                break;
            }
        }
    }

    /// Records with `seq >= from` (at most `max_bytes` of payload, at least one record),
    /// and the unacknowledged bytes evicted before `from`.
    pub fn read(&self, from: u64, max_bytes: usize) -> Batch {
        let g = self.lock();
        let dropped_before = if from <= g.evicted_upto { g.dropped } else { 0 };
        let mut records = Vec::new();
        let mut total = 0;
        let mut next = from;
        let start = g
            .records
            .front()
            .map(|r| from.saturating_sub(r.record.seq) as usize)
            .unwrap_or(0);
        for stored in g.records.iter().skip(start) {
            if stored.record.seq < from {
                continue;
            }
            if !records.is_empty() && total + stored.size > max_bytes {
                break;
            }
            next = stored.record.seq + 1;
            if stored.consumed {
                continue;
            }
            total += stored.size;
            records.push(stored.to_record());
        }
        Batch {
            records,
            next,
            dropped_before,
        }
    }

    /// How command `command` ended, once its exit record is in the journal (remembered for
    /// the last few thousand commands, even after the record was consumed and trimmed).
    pub fn exit_of(&self, command: u64) -> Option<Exit> {
        self.lock().exits.get(&command).cloned()
    }

    /// The first seq a client resuming after its last acknowledgement should read.
    pub fn resume_seq(&self) -> u64 {
        self.lock().acked + 1
    }

    /// Record that everything up to `seq` was consumed.
    pub fn ack(&self, seq: u64) {
        let mut g = self.lock();
        let seq = seq.min(g.next_seq - 1);
        if seq > g.acked {
            g.acked = seq;
            drop(g);
            self.freed.send_modify(|n| *n += 1);
        }
    }

    /// Record that command `command`'s records up to `seq` were consumed (by a client that
    /// follows only that command): others' records in between stay unconsumed.
    pub fn ack_command(&self, command: u64, seq: u64) {
        let mut g = self.lock();
        let Some(front) = g.records.front().map(|r| r.record.seq) else {
            return;
        };
        let seq = seq.min(g.next_seq - 1);
        let from = (g.acked + 1).max(front);
        if seq < from {
            return;
        }
        let (lo, hi) = ((from - front) as usize, (seq - front) as usize);
        for stored in g.records.range_mut(lo..=hi) {
            if stored.record.command_id == command {
                stored.consumed = true;
            }
        }
        // The contiguous consumed prefix becomes acknowledged.
        let mut acked = g.acked;
        while let Some(stored) = g.records.get((acked + 1).saturating_sub(front) as usize) {
            if stored.record.seq != acked + 1 || !stored.consumed {
                break;
            }
            acked += 1;
        }
        if acked > g.acked {
            g.acked = acked;
            drop(g);
            self.freed.send_modify(|n| *n += 1);
        }
    }

    /// Record that the relay persisted every record up to `seq` (spill mode trims them).
    pub fn persisted(&self, seq: u64) {
        let mut g = self.lock();
        let seq = seq.min(g.next_seq - 1);
        if seq > g.persisted {
            g.persisted = seq;
            drop(g);
            self.freed.send_modify(|n| *n += 1);
        }
    }

    /// The highest seq the relay persisted, and the first seq still held (what a spill
    /// resumes from after a reconnect).
    pub fn spill_state(&self) -> (u64, u64) {
        let g = self.lock();
        let first = g.records.front().map_or(g.next_seq, |r| r.record.seq);
        (g.persisted, first)
    }

    /// Every record from `from` on, whether or not a client consumed it on its own (at most
    /// `max_bytes` of payload, at least one record): what the relay persists.
    pub fn read_raw(&self, from: u64, max_bytes: usize) -> Vec<Record> {
        let g = self.lock();
        let start = g
            .records
            .front()
            .map(|r| from.saturating_sub(r.record.seq) as usize)
            .unwrap_or(0);
        let mut out = Vec::new();
        let mut total = 0;
        for stored in g.records.iter().skip(start) {
            if stored.record.seq < from {
                continue;
            }
            if !out.is_empty() && total + stored.size > max_bytes {
                break;
            }
            total += stored.size;
            out.push(stored.to_record());
        }
        out
    }

    /// Register a live reader positioned at `from`; trimming will not pass it.
    pub fn register_reader(&self, from: u64) -> u64 {
        let mut g = self.lock();
        let id = g.next_reader;
        g.next_reader += 1;
        g.readers.insert(id, from);
        id
    }

    pub fn move_reader(&self, id: u64, next: u64) {
        let mut g = self.lock();
        if let Some(pos) = g.readers.get_mut(&id) {
            *pos = next;
        }
        drop(g);
        self.freed.send_modify(|n| *n += 1);
    }

    pub fn unregister_reader(&self, id: u64) {
        self.lock().readers.remove(&id);
        self.freed.send_modify(|n| *n += 1);
    }

    /// Wait until a record with seq >= `seq` exists (or the journal closes).
    pub async fn wait_for(&self, seq: u64) -> Result<(), JournalError> {
        let mut rx = self.appended.subscribe();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            if self.lock().closed {
                return Err(JournalError::Closed);
            }
            if rx.changed().await.is_err() {
                return Err(JournalError::Closed);
            }
        }
    }

    /// Close: blocked writers and waiting readers return `Closed` (readers first drain what
    /// is left with `read`).
    pub fn close(&self) {
        self.lock().closed = true;
        self.freed.send_modify(|n| *n += 1);
        self.appended.send_modify(|_| {});
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remote_proto::session::{Output, Stream};
    use std::sync::Arc;
    use std::time::Duration;

    fn out(n: usize) -> record::Kind {
        record::Kind::Output(Output {
            stream: Stream::Stdout as i32,
            data: vec![b'x'; n],
        })
    }

    #[tokio::test]
    async fn seqs_increase_and_reads_resume() {
        let j = Journal::new(1 << 20, Mode::Block);
        for i in 1..=5 {
            assert_eq!(j.append(0, out(10)).await.unwrap(), i);
        }
        let b = j.read(3, usize::MAX);
        assert_eq!(
            b.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(j.resume_seq(), 1);
        j.ack(3);
        assert_eq!(j.resume_seq(), 4);
        j.ack(100); // beyond the end: capped
        assert_eq!(j.stats().acked, 5);
    }

    #[tokio::test]
    async fn spill_mode_trims_what_the_relay_persisted_not_what_clients_acked() {
        let j = Arc::new(Journal::new(1000, Mode::Spill));
        let writer = {
            let j = j.clone();
            tokio::spawn(async move {
                for _ in 0..40 {
                    j.append(0, out(100)).await.unwrap();
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "writer must block when full");
        // A client's acknowledgement frees nothing: the relay has not got the records yet.
        j.ack(j.stats().next_seq - 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !writer.is_finished(),
            "client acks must not trim a spill journal"
        );
        // The relay persists what it read, batch by batch; nothing is lost.
        let mut next = 1;
        while next <= 40 {
            j.wait_for(next).await.unwrap();
            let records = j.read_raw(next, usize::MAX);
            for r in &records {
                assert_eq!(r.seq, next);
                next += 1;
            }
            j.persisted(next - 1);
            assert_eq!(j.spill_state().0, next - 1);
        }
        writer.await.unwrap();
        assert_eq!(j.stats().dropped, 0);
    }

    #[tokio::test]
    async fn block_mode_waits_for_acks_and_loses_nothing() {
        let j = Arc::new(Journal::new(1000, Mode::Block));
        let writer = {
            let j = j.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    j.append(0, out(100)).await.unwrap();
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "writer must block when full");
        let mut next = 1;
        let mut got = 0;
        while got < 100 {
            j.wait_for(next).await.unwrap();
            let b = j.read(next, usize::MAX);
            assert_eq!(b.dropped_before, 0);
            for r in &b.records {
                assert_eq!(r.seq, next);
                next += 1;
                got += 1;
            }
            j.ack(next - 1);
        }
        writer.await.unwrap();
        assert_eq!(j.stats().dropped, 0);
    }

    #[tokio::test]
    async fn command_acks_consume_only_that_command() {
        let j = Journal::new(1 << 20, Mode::Block);
        for cmd in [1, 2, 1, 2, 1] {
            j.append(cmd, out(1)).await.unwrap();
        }
        j.ack_command(1, 3); // seqs 1 and 3 are command 1's
        assert_eq!(j.resume_seq(), 2, "seq 2 (command 2) is not consumed");
        let b = j.read(j.resume_seq(), usize::MAX);
        assert_eq!(
            b.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![2, 4, 5]
        );
        assert_eq!(b.next, 6);
        j.ack_command(2, 4);
        assert_eq!(j.resume_seq(), 5);
        // Reading only consumed records still moves the reader on.
        j.ack_command(1, 5);
        let b = j.read(5, usize::MAX);
        assert!(b.records.is_empty());
        assert_eq!(b.next, 6);
    }

    #[tokio::test]
    async fn drop_mode_evicts_and_counts() {
        let j = Journal::new(1000, Mode::Drop);
        for _ in 0..100 {
            j.append(0, out(100)).await.unwrap();
        }
        let b = j.read(j.resume_seq(), usize::MAX);
        assert!(b.records.first().unwrap().seq > 1);
        let kept: u64 = b.records.len() as u64;
        assert_eq!(b.dropped_before, (100 - kept) * 100);
    }

    #[tokio::test]
    async fn live_readers_hold_back_trimming_and_close_wakes() {
        let j = Arc::new(Journal::new(1000, Mode::Block));
        let reader = j.register_reader(1);
        for _ in 0..5 {
            j.append(0, out(100)).await.unwrap();
        }
        j.ack(5); // acknowledged by someone, but the live reader has not read them
        let j2 = j.clone();
        let w = tokio::spawn(async move { j2.append(0, out(900)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!w.is_finished());
        assert_eq!(j.read(1, usize::MAX).records.len(), 5);
        j.move_reader(reader, 6);
        assert_eq!(w.await.unwrap().unwrap(), 6);
        let waiter = {
            let j = j.clone();
            tokio::spawn(async move { j.wait_for(100).await })
        };
        j.close();
        assert_eq!(waiter.await.unwrap(), Err(JournalError::Closed));
        assert_eq!(j.append(0, out(1)).await, Err(JournalError::Closed));
    }
}
