//! Reading a log from its end: the last lines, the lines since a time, and
//! (follow) new lines as they are written, across one rotation.
//!
//! A log is a file and, when it was rotated, its predecessor `<file>.1`.
//! Nothing here loads a file whole: where to start is found by reading
//! backwards in [`BLOCK`]s, and lines are then read forwards and handed on
//! in chunks.
//!
//! Where `since` starts: the reader walks back from the end, line by line,
//! until it meets a stamped line older than `since` by more than
//! [`DISORDER_SLACK_MS`]. That costs what the answer costs (every line in
//! the window is sent anyway, plus the slack), and unlike a binary search
//! over byte offsets it does not need the stamps in order: PostgreSQL's
//! processes write concurrently (a line may follow a later-stamped one),
//! and continuation lines carry no stamp. Lines after the start whose stamp
//! is older than `since` are left out as they are read.

use super::stamp::{line_time, Family};
use corral_proto::pb;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How much is read at a time, backwards and forwards.
pub const BLOCK: usize = 64 * 1024;
/// The longest line sent whole; the rest of a longer one is dropped and a
/// marker says how much.
pub const MAX_LINE: usize = 16 * 1024;
/// A chunk holds at most this many lines or bytes of text.
pub const CHUNK_LINES: usize = 512;
pub const CHUNK_BYTES: usize = 256 * 1024;
/// `tail` when neither it nor `since` is given, and its ceiling.
pub const DEFAULT_TAIL: u32 = 100;
pub const MAX_TAIL: u32 = 100_000;
/// How often a followed file is checked for growth.
pub const POLL: Duration = Duration::from_millis(250);
/// Follow: a last line without its newline is sent once it has stayed so
/// this long (the writer may be mid-line; a file may simply end so).
const PARTIAL_GRACE: Duration = Duration::from_secs(1);
/// How far out of order stamps may be: the backward walk for `since` goes
/// on past older lines until one is older than `since` by this much.
const DISORDER_SLACK_MS: i64 = 10_000;
/// When the first line sent is a continuation, how far back to look for
/// the stamped line it belongs to.
const PREV_STAMP_LOOKBACK: u64 = 1 << 20;

/// What the caller asked for.
#[derive(Debug, Clone, Copy)]
pub struct Query {
    /// 0: none.
    pub since_ms: i64,
    /// 0: [`DEFAULT_TAIL`] without `since`, no limit with it.
    pub tail: u32,
    pub follow: bool,
}

/// The log at `path` and its rotated predecessor `<path>.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// A place in the pair of files: `file` 0 is the rotated one, 1 the current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    file: usize,
    offset: u64,
}

/// An open file and the length it had when opened: growth after that is
/// for the forward reader to see.
struct Opened {
    file: File,
    len: u64,
    ino: u64,
}

fn open(path: &Path) -> io::Result<Option<Opened>> {
    match File::open(path) {
        Ok(file) => {
            let m = file.metadata()?;
            Ok(Some(Opened {
                len: m.len(),
                ino: m.ino(),
                file,
            }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a backward walk tells the visitor about each line.
enum Walk {
    Go,
    Stop,
}

/// Visits the starts of the lines of `f[..end]`, last line first, with the
/// first bytes of each line (for its stamp). Returns whether it reached the
/// file's start.
fn walk_back(
    f: &File,
    end: u64,
    mut visit: impl FnMut(u64, &[u8]) -> io::Result<Walk>,
) -> io::Result<bool> {
    const PREFIX: usize = 64;
    let mut buf = vec![0u8; BLOCK];
    let mut spill = [0u8; PREFIX];
    let mut hi = end;
    let mut prefix_of = |start: u64, block: &[u8], lo: u64| -> io::Result<Vec<u8>> {
        let at = (start - lo) as usize;
        if at + PREFIX <= block.len() || lo + block.len() as u64 >= end {
            Ok(block[at..block.len().min(at + PREFIX)].to_vec())
        } else {
            // The line's start is at the end of this block: its first bytes
            // are in the block read before.
            let n = read_at_most(f, &mut spill, start, end)?;
            Ok(spill[..n].to_vec())
        }
    };
    while hi > 0 {
        let lo = hi.saturating_sub(BLOCK as u64);
        let block = &mut buf[..(hi - lo) as usize];
        f.read_exact_at(block, lo)?;
        for i in (0..block.len()).rev() {
            if block[i] != b'\n' {
                continue;
            }
            let start = lo + i as u64 + 1;
            if start >= end {
                continue; // the newline ending the last line
            }
            let prefix = prefix_of(start, block, lo)?;
            if let Walk::Stop = visit(start, &prefix)? {
                return Ok(false);
            }
        }
        if lo == 0 && end > 0 {
            let prefix = prefix_of(0, block, lo)?;
            if let Walk::Stop = visit(0, &prefix)? {
                return Ok(false);
            }
        }
        hi = lo;
    }
    Ok(true)
}

fn read_at_most(f: &File, buf: &mut [u8], at: u64, end: u64) -> io::Result<usize> {
    let n = buf.len().min(end.saturating_sub(at) as usize);
    f.read_exact_at(&mut buf[..n], at)?;
    Ok(n)
}

/// Where `since` starts in one file: Some(offset, stamp of the line before)
/// when a stamped line older than the window (and its slack) was met, None
/// when the whole file may hold lines of the window.
fn since_start(
    f: &Opened,
    family: Family,
    since_ms: i64,
) -> io::Result<Option<(u64, Option<i64>)>> {
    let mut after = f.len;
    let mut found = None;
    walk_back(&f.file, f.len, |start, prefix| {
        if let Some(t) = line_time(family, prefix) {
            if t < since_ms.saturating_sub(DISORDER_SLACK_MS) {
                found = Some((after, Some(t)));
                return Ok(Walk::Stop);
            }
        }
        after = start;
        Ok(Walk::Go)
    })?;
    Ok(found)
}

/// Where the last `n` lines of one file start: Ok(offset) when the file
/// has that many, Err(lines it has) otherwise.
fn tail_start(f: &Opened, n: u32) -> io::Result<Result<u64, u32>> {
    let mut seen = 0u32;
    let mut found = None;
    if n == 0 {
        return Ok(Ok(f.len));
    }
    walk_back(&f.file, f.len, |start, _| {
        seen += 1;
        if seen == n {
            found = Some(start);
            return Ok(Walk::Stop);
        }
        Ok(Walk::Go)
    })?;
    Ok(found.ok_or(seen))
}

/// The stamp of the last stamped line before `offset`, looking back at most
/// [`PREV_STAMP_LOOKBACK`] bytes.
fn stamp_before(f: &Opened, family: Family, offset: u64) -> io::Result<Option<i64>> {
    let mut t = None;
    walk_back(&f.file, offset, |start, prefix| {
        if offset - start > PREV_STAMP_LOOKBACK {
            return Ok(Walk::Stop);
        }
        t = line_time(family, prefix);
        Ok(if t.is_some() { Walk::Stop } else { Walk::Go })
    })?;
    Ok(t)
}

/// Where to start reading for `q`, and the stamp in force there.
fn start(files: &[Option<Opened>; 2], family: Family, q: &Query) -> io::Result<(Pos, Option<i64>)> {
    let mut from = Pos { file: 0, offset: 0 };
    if q.since_ms > 0 {
        for i in [1, 0] {
            if let Some(f) = &files[i] {
                if let Some((offset, _)) = since_start(f, family, q.since_ms)? {
                    from = Pos { file: i, offset };
                    break;
                }
            }
        }
    }
    let tail = match (q.tail, q.since_ms) {
        (0, 0) => DEFAULT_TAIL,
        (0, _) => 0,
        (n, _) => n.min(MAX_TAIL),
    };
    if tail > 0 {
        let mut want = tail;
        let mut tail_from = Pos { file: 0, offset: 0 };
        for i in [1, 0] {
            if let Some(f) = &files[i] {
                match tail_start(f, want)? {
                    Ok(offset) => {
                        tail_from = Pos { file: i, offset };
                        break;
                    }
                    Err(seen) => want -= seen,
                }
            }
        }
        from = from.max(tail_from);
    }
    let prev = match &files[from.file] {
        Some(f) => stamp_before(f, family, from.offset)?,
        None => None,
    };
    Ok((from, prev))
}

/// Reads lines forwards from an offset of one file, keeping the start of a
/// line not yet ended.
struct Forward {
    file: File,
    ino: u64,
    offset: u64,
    /// The first [`MAX_LINE`] bytes of the line being read.
    partial: Vec<u8>,
    /// Bytes of that line past [`MAX_LINE`], dropped.
    dropped: u64,
    /// When `partial` last grew (follow sends a stale one).
    partial_at: Instant,
}

impl Forward {
    fn new(f: Opened, offset: u64) -> Forward {
        Forward {
            file: f.file,
            ino: f.ino,
            offset,
            partial: Vec::new(),
            dropped: 0,
            partial_at: Instant::now(),
        }
    }

    /// Reads the file from `offset` to its current end; every completed
    /// line goes to `out`. Returns false when `out` wants no more.
    fn read(&mut self, buf: &mut [u8], out: &mut Out) -> io::Result<bool> {
        loop {
            let n = self.file.read_at(buf, self.offset)?;
            if n == 0 {
                return Ok(true);
            }
            self.offset += n as u64;
            self.partial_at = Instant::now();
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let (piece, ended) = match rest.iter().position(|b| *b == b'\n') {
                    Some(i) => (&rest[..i], Some(i + 1)),
                    None => (rest, None),
                };
                let room = MAX_LINE.saturating_sub(self.partial.len());
                let keep = piece.len().min(room);
                self.partial.extend_from_slice(&piece[..keep]);
                self.dropped += (piece.len() - keep) as u64;
                match ended {
                    Some(i) => {
                        rest = &rest[i..];
                        if !self.emit(out)? {
                            return Ok(false);
                        }
                    }
                    None => rest = &[],
                }
            }
        }
    }

    /// Hands the line in `partial` on (it may lack its newline).
    fn emit(&mut self, out: &mut Out) -> io::Result<bool> {
        let line = std::mem::take(&mut self.partial);
        let dropped = std::mem::take(&mut self.dropped);
        out.line(&line, dropped)
    }

    fn flush_partial(&mut self, out: &mut Out) -> io::Result<bool> {
        if self.partial.is_empty() && self.dropped == 0 {
            return Ok(true);
        }
        self.emit(out)
    }
}

/// Where lines go: stamped, filtered by `since`, gathered into chunks and
/// handed to `send` (which returns false once the caller has gone).
pub struct Out<'a> {
    family: Family,
    since_ms: i64,
    /// The stamp of the last stamped line: a continuation's time.
    prev: Option<i64>,
    chunk: pb::LogLines,
    bytes: usize,
    send: &'a mut dyn FnMut(pb::LogLines) -> bool,
}

impl Out<'_> {
    fn line(&mut self, line: &[u8], dropped: u64) -> io::Result<bool> {
        if let Some(t) = line_time(self.family, line) {
            self.prev = Some(t);
        }
        if self.since_ms > 0 && self.prev.is_some_and(|t| t < self.since_ms) {
            return Ok(true);
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut text = String::from_utf8_lossy(line).into_owned();
        if dropped > 0 {
            text.push_str(&format!(" [… {dropped} more bytes of this line left out]"));
        }
        self.bytes += text.len();
        self.chunk.lines.push(pb::LogLine {
            at_ms: self.prev.unwrap_or(0),
            text,
        });
        if self.chunk.lines.len() >= CHUNK_LINES || self.bytes >= CHUNK_BYTES {
            return Ok(self.flush());
        }
        Ok(true)
    }

    /// Sends what is gathered; false once the caller has gone.
    fn flush(&mut self) -> bool {
        if self.chunk.lines.is_empty() {
            return true;
        }
        self.bytes = 0;
        (self.send)(std::mem::take(&mut self.chunk))
    }
}

/// Streams the log at `path` (and `<path>.1`) for `q` into `send`, chunk by
/// chunk. Without `follow` it returns at the end of the file; with it, it
/// polls for growth every [`POLL`] until `send` reports the caller gone or
/// `gone()` says so (checked between polls, so an idle follow notices a
/// caller that left).
pub fn stream(
    path: &Path,
    family: Family,
    q: Query,
    send: &mut dyn FnMut(pb::LogLines) -> bool,
    gone: &dyn Fn() -> bool,
) -> io::Result<()> {
    let old_path = rotated(path);
    let files = [open(&old_path)?, open(path)?];
    let (from, prev) = start(&files, family, &q)?;
    let mut out = Out {
        family,
        since_ms: q.since_ms,
        prev,
        chunk: pb::LogLines::default(),
        bytes: 0,
        send,
    };
    let mut buf = vec![0u8; BLOCK];
    let [old, current] = files;
    if from.file == 0 {
        if let Some(f) = old {
            // The rotated file no longer grows: read it to its end as it is.
            let mut fwd = Forward::new(f, from.offset);
            if !fwd.read(&mut buf, &mut out)? || !fwd.flush_partial(&mut out)? {
                return Ok(());
            }
        }
    }
    let offset = if from.file == 1 { from.offset } else { 0 };
    let mut fwd = current.map(|f| Forward::new(f, offset));
    loop {
        if let Some(f) = fwd.as_mut() {
            if !f.read(&mut buf, &mut out)? {
                return Ok(());
            }
            let stale = f.partial_at.elapsed() >= PARTIAL_GRACE;
            if (!q.follow || stale) && !f.flush_partial(&mut out)? {
                return Ok(());
            }
        }
        if !out.flush() || !q.follow {
            return Ok(());
        }
        std::thread::sleep(POLL);
        if gone() {
            return Ok(());
        }
        // Rotated (a new file under the name) or truncated in place: the
        // rest of the old file first, then the new one from its start.
        match std::fs::metadata(path) {
            Ok(m) => match fwd.as_mut() {
                Some(f) if m.ino() != f.ino => {
                    if !f.read(&mut buf, &mut out)? || !f.flush_partial(&mut out)? {
                        return Ok(());
                    }
                    fwd = open(path)?.map(|o| Forward::new(o, 0));
                }
                Some(f) if m.len() < f.offset => {
                    f.offset = 0;
                    f.partial.clear();
                    f.dropped = 0;
                }
                Some(_) => {}
                None => fwd = open(path)?.map(|o| Forward::new(o, 0)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "corral-logs-{name}-{}-{}",
                std::process::id(),
                corral_proto::now_ms()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Agent-style line `i` stamped at second `i` of the epoch.
    fn line(i: u64) -> String {
        format!(
            "1970-01-01T{:02}:{:02}:{:02}.000Z  INFO line {i}\n",
            i / 3600,
            i / 60 % 60,
            i % 60
        )
    }

    fn lines(range: std::ops::Range<u64>) -> String {
        range.map(line).collect()
    }

    fn read(path: &Path, q: Query) -> Vec<pb::LogLine> {
        let mut got = Vec::new();
        stream(
            path,
            Family::Agent,
            q,
            &mut |c| {
                got.extend(c.lines);
                true
            },
            &|| false,
        )
        .unwrap();
        got
    }

    fn texts(got: &[pb::LogLine]) -> Vec<String> {
        got.iter().map(|l| l.text.clone()).collect()
    }

    fn q(since_s: i64, tail: u32) -> Query {
        Query {
            since_ms: since_s * 1000,
            tail,
            follow: false,
        }
    }

    #[test]
    fn tail_reads_the_last_lines() {
        let dir = Scratch::new("tail");
        let log = dir.0.join("agent.log");
        // Over several blocks, so the walk crosses block edges.
        std::fs::write(&log, lines(0..5000)).unwrap();
        let got = read(&log, q(0, 3));
        assert_eq!(texts(&got)[0], line(4997).trim_end());
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].at_ms, 4_999_000);
        // Default: 100.
        assert_eq!(read(&log, q(0, 0)).len(), 100);
        // More than there are: all of them.
        assert_eq!(read(&log, q(0, 9999)).len(), 5000);
        // A missing log: nothing, no error.
        assert!(read(&dir.0.join("none.log"), q(0, 5)).is_empty());
        // An empty one too.
        std::fs::write(&log, "").unwrap();
        assert!(read(&log, q(0, 5)).is_empty());
    }

    #[test]
    fn a_last_line_without_newline_counts() {
        let dir = Scratch::new("nonl");
        let log = dir.0.join("agent.log");
        std::fs::write(&log, format!("{}{}", lines(0..3), line(3).trim_end())).unwrap();
        let got = texts(&read(&log, q(0, 2)));
        assert_eq!(got, [line(2).trim_end(), line(3).trim_end()]);
        // A file of one line without newline.
        std::fs::write(&log, "only").unwrap();
        assert_eq!(texts(&read(&log, q(0, 5))), ["only"]);
        // Blank lines are lines.
        std::fs::write(&log, "a\n\n\nb\n").unwrap();
        assert_eq!(texts(&read(&log, q(0, 3))), ["", "", "b"]);
    }

    #[test]
    fn since_starts_at_the_window_and_reaches_into_the_rotated_file() {
        let dir = Scratch::new("since");
        let log = dir.0.join("agent.log");
        std::fs::write(rotated(&log), lines(0..3000)).unwrap();
        std::fs::write(&log, lines(3000..6000)).unwrap();
        // Within the current file.
        let got = read(&log, q(5990, 0));
        assert_eq!(got.len(), 10);
        assert_eq!(got[0].text, line(5990).trim_end());
        // Back into the rotated one: its tail, then the whole current file.
        let got = read(&log, q(2990, 0));
        assert_eq!(got.len(), 3010);
        assert_eq!(got[0].text, line(2990).trim_end());
        assert_eq!(got[10].text, line(3000).trim_end());
        // Older than everything: both files whole.
        assert_eq!(read(&log, q(0, MAX_TAIL)).len(), 6000);
        // (line 0 is stamped at 0 ms, before `since`.)
        assert_eq!(
            read(
                &log,
                Query {
                    since_ms: 1,
                    tail: 0,
                    follow: false
                }
            )
            .len(),
            5999
        );
        // In the future: nothing.
        assert!(read(&log, q(7000, 0)).is_empty());
        // since and tail: the last N of the window.
        assert_eq!(
            texts(&read(&log, q(2990, 2))),
            [line(5998).trim_end(), line(5999).trim_end()]
        );
        // Tail alone across the rotation.
        let got = read(&log, q(0, 3005));
        assert_eq!(got[0].text, line(2995).trim_end());
    }

    #[test]
    fn continuations_take_the_previous_time_and_out_of_order_lines_are_filtered() {
        let dir = Scratch::new("cont");
        let log = dir.0.join("agent.log");
        let text = format!(
            "{}  continuation of 10\n{}  continuation of 20\n{}{}{}",
            line(10),
            line(20),
            line(19), // written late by another process
            line(30),
            "  continuation of 30\n"
        );
        std::fs::write(&log, &text).unwrap();
        let got = read(&log, q(20, 0));
        assert_eq!(
            texts(&got),
            [
                line(20).trim_end(),
                "  continuation of 20",
                line(30).trim_end(),
                "  continuation of 30"
            ]
        );
        assert_eq!(got[1].at_ms, 20_000);
        assert_eq!(got[3].at_ms, 30_000);
        // Tail starting on a continuation: it takes its entry's time.
        let got = read(&log, q(0, 1));
        assert_eq!(got[0].at_ms, 30_000);
        // Lines before any stamp: time unknown (0), and kept by since.
        std::fs::write(&log, format!("banner\n{}", line(40))).unwrap();
        let got = read(&log, q(35, 0));
        assert_eq!(texts(&got), ["banner", line(40).trim_end()]);
        assert_eq!(got[0].at_ms, 0);
    }

    #[test]
    fn long_lines_are_cut_with_a_marker() {
        let dir = Scratch::new("long");
        let log = dir.0.join("agent.log");
        let long = "x".repeat(MAX_LINE + 100_000);
        std::fs::write(&log, format!("{}{long}\n{}", line(1), line(2))).unwrap();
        let got = read(&log, q(0, 10));
        assert_eq!(got.len(), 3);
        assert!(got[1].text.starts_with(&"x".repeat(MAX_LINE)));
        assert!(
            got[1]
                .text
                .ends_with("[… 100000 more bytes of this line left out]"),
            "{}",
            &got[1].text[MAX_LINE..]
        );
        assert_eq!(got[2].text, line(2).trim_end());
    }

    #[test]
    fn chunks_are_capped() {
        let dir = Scratch::new("chunks");
        let log = dir.0.join("agent.log");
        std::fs::write(&log, lines(0..2000)).unwrap();
        let mut sizes = Vec::new();
        stream(
            &log,
            Family::Agent,
            q(0, 2000),
            &mut |c| {
                sizes.push(c.lines.len());
                true
            },
            &|| false,
        )
        .unwrap();
        assert!(sizes.iter().all(|n| *n <= CHUNK_LINES), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 2000);
        // A caller that goes away stops the reading at once.
        let mut calls = 0;
        stream(
            &log,
            Family::Agent,
            q(0, 2000),
            &mut |_| {
                calls += 1;
                false
            },
            &|| false,
        )
        .unwrap();
        assert_eq!(calls, 1);
    }

    #[test]
    fn follow_sees_growth_rotation_and_truncation_and_stops_when_the_caller_goes() {
        let dir = Scratch::new("follow");
        let log = dir.0.join("agent.log");
        std::fs::write(&log, lines(0..5)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let gone = Arc::new(AtomicBool::new(false));
        let reader = {
            let log = log.clone();
            let gone = gone.clone();
            std::thread::spawn(move || {
                let q = Query {
                    since_ms: 0,
                    tail: 2,
                    follow: true,
                };
                stream(
                    &log,
                    Family::Agent,
                    q,
                    &mut |c| c.lines.into_iter().all(|l| tx.send(l.text).is_ok()),
                    &|| gone.load(Ordering::SeqCst),
                )
            })
        };
        let next = || rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(next(), line(3).trim_end());
        assert_eq!(next(), line(4).trim_end());
        // Growth, in two writes of one line.
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"half").unwrap();
        f.write_all(b" and half\n").unwrap();
        assert_eq!(next(), "half and half");
        // Rotation: the last line written to the old file, then a new file.
        f.write_all(b"last of the old\n").unwrap();
        std::fs::rename(&log, rotated(&log)).unwrap();
        std::fs::write(&log, "first of the new\n").unwrap();
        assert_eq!(next(), "last of the old");
        assert_eq!(next(), "first of the new");
        // Truncation in place.
        std::fs::write(&log, "").unwrap();
        std::thread::sleep(POLL * 2);
        std::fs::write(&log, "after truncation\n").unwrap();
        assert_eq!(next(), "after truncation");
        // A line left without its newline arrives after a grace period.
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"no newline yet").unwrap();
        assert_eq!(next(), "no newline yet");
        // The caller goes: the reader ends within a poll or two.
        gone.store(true, Ordering::SeqCst);
        let started = Instant::now();
        reader.join().unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
