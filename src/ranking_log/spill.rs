//! The ranking log's files on disk, all in `[ranking_log] spill_dir`, one JSON row per line:
//!
//! - `ranking-log-spill.jsonl`: rows that did not fit in the channel, or that were still in hand
//!   when the shutdown deadline passed. Appended to by producers.
//! - `ranking-log-replay-<id>.jsonl`: a spill file the writer has taken for replay (renamed, so
//!   producers start a fresh spill file meanwhile). Deleted once every chunk is in MySQL.
//! - `ranking-log-rejected.jsonl`: rows MySQL kept rejecting (given up). Kept for an operator;
//!   the worker never reads it back.
//!
//! File I/O here is synchronous: appends of a few kilobytes to the page cache, which cost less
//! than handing them to a blocking thread. The files survive a crash of the process (not of the
//! machine: they are not fsynced).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

use super::LogRow;

const SPILL_FILE: &str = "ranking-log-spill.jsonl";
const REJECTED_FILE: &str = "ranking-log-rejected.jsonl";
const REPLAY_PREFIX: &str = "ranking-log-replay-";
/// Rows per replayed batch. Fixed (not `batch_size`) so a replay resumed after a crash cuts the
/// file into the same chunks and their ids match.
const REPLAY_CHUNK_ROWS: usize = 1000;

pub struct SpillFiles {
    dir: PathBuf,
    /// The open spill file, if any. A std mutex: held only for a write, never across an await.
    append: Mutex<Option<File>>,
    replay: Mutex<Option<ReplayState>>,
}

struct ReplayState {
    path: PathBuf,
    name: String,
    offset: u64,
    chunk_index: u64,
}

/// A chunk of a replay file ready to be written.
pub struct ReplayChunk {
    pub batch_id: String,
    pub rows: Vec<LogRow>,
    /// Where the next chunk starts.
    pub end_offset: u64,
}

impl SpillFiles {
    /// Creates `dir` if needed and checks that a spill file can be written there.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create spill directory {}", dir.display()))?;
        let probe = dir.join(SPILL_FILE);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&probe)
            .with_context(|| format!("cannot write to {}", probe.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            append: Mutex::new(None),
            replay: Mutex::new(None),
        })
    }

    pub fn rejected_path(&self) -> PathBuf {
        self.dir.join(REJECTED_FILE)
    }

    fn lines_of(rows: &[LogRow]) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(rows.len() * 128);
        for row in rows {
            serde_json::to_writer(&mut out, row)?;
            out.push(b'\n');
        }
        Ok(out)
    }

    /// Appends rows to the spill file.
    pub fn append_spill(&self, rows: &[LogRow]) -> anyhow::Result<()> {
        let bytes = Self::lines_of(rows)?;
        let mut guard = self
            .append
            .lock()
            .map_err(|_| anyhow::anyhow!("spill file lock poisoned"))?;
        if guard.is_none() {
            let path = self.dir.join(SPILL_FILE);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            *guard = Some(file);
        }
        if let Some(file) = guard.as_mut() {
            // One write per call: a crash tears at most the last line, which replay reports.
            file.write_all(&bytes)
                .context("cannot append to the spill file")?;
        }
        Ok(())
    }

    /// Appends given-up rows to the rejected file.
    pub fn append_rejected(&self, rows: &[LogRow]) -> anyhow::Result<()> {
        let path = self.rejected_path();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.write_all(&Self::lines_of(rows)?)?;
        Ok(())
    }

    /// The next chunk to replay, taking a new replay file when the current one is done.
    pub fn next_replay_chunk(&self) -> anyhow::Result<Option<ReplayChunk>> {
        let mut replay = self
            .replay
            .lock()
            .map_err(|_| anyhow::anyhow!("replay state lock poisoned"))?;
        loop {
            if replay.is_none() {
                *replay = self.take_replay_file()?;
            }
            let Some(state) = replay.as_mut() else {
                return Ok(None);
            };
            let mut file = File::open(&state.path)
                .with_context(|| format!("cannot open {}", state.path.display()))?;
            file.seek(SeekFrom::Start(state.offset))?;
            let mut reader = BufReader::new(file);
            let mut rows = Vec::new();
            let mut offset = state.offset;
            let mut line = String::new();
            let mut lines = 0;
            while lines < REPLAY_CHUNK_ROWS {
                line.clear();
                let read = reader.read_line(&mut line)?;
                if read == 0 {
                    break;
                }
                offset += read as u64;
                lines += 1;
                match serde_json::from_str::<LogRow>(line.trim_end()) {
                    Ok(row) => rows.push(row),
                    Err(e) => tracing::error!(file = %state.path.display(), error = %e,
                        "unreadable line in ranking-log spill file (torn by a crash?); skipped"),
                }
            }
            if lines == 0 {
                fs::remove_file(&state.path)
                    .with_context(|| format!("cannot remove {}", state.path.display()))?;
                *replay = None;
                continue;
            }
            return Ok(Some(ReplayChunk {
                batch_id: format!("replay:{}:{}", state.name, state.chunk_index),
                rows,
                end_offset: offset,
            }));
        }
    }

    /// Records that the chunk ending at `end_offset` is in MySQL.
    pub fn finish_replay_chunk(&self, end_offset: u64) -> anyhow::Result<()> {
        let mut replay = self
            .replay
            .lock()
            .map_err(|_| anyhow::anyhow!("replay state lock poisoned"))?;
        if let Some(state) = replay.as_mut() {
            state.offset = end_offset;
            state.chunk_index += 1;
        }
        Ok(())
    }

    /// An earlier replay file left by a crash, else the spill file renamed for replay.
    fn take_replay_file(&self) -> anyhow::Result<Option<ReplayState>> {
        let state = |path: PathBuf| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            ReplayState {
                path,
                name,
                offset: 0,
                chunk_index: 0,
            }
        };
        if let Some(path) = self.replay_files()?.into_iter().next() {
            return Ok(Some(state(path)));
        }
        let spill = self.dir.join(SPILL_FILE);
        let mut append = self
            .append
            .lock()
            .map_err(|_| anyhow::anyhow!("spill file lock poisoned"))?;
        match fs::metadata(&spill) {
            Ok(meta) if meta.len() > 0 => {}
            _ => return Ok(None),
        }
        // Close our handle so the next append starts a fresh spill file.
        *append = None;
        let name = format!(
            "{REPLAY_PREFIX}{}-{}.jsonl",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            uuid::Uuid::new_v4().simple()
        );
        let path = self.dir.join(name);
        fs::rename(&spill, &path).with_context(|| format!("cannot rename {}", spill.display()))?;
        Ok(Some(state(path)))
    }

    fn replay_files(&self) -> anyhow::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(REPLAY_PREFIX))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Rows waiting on disk (spill and replay files), for the shutdown report.
    pub fn pending_rows(&self) -> u64 {
        let offset = self
            .replay
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|s| (s.path.clone(), s.offset)));
        let mut files = self.replay_files().unwrap_or_default();
        files.push(self.dir.join(SPILL_FILE));
        files
            .iter()
            .map(|path| {
                let skip = match &offset {
                    Some((p, o)) if p == path => *o as usize,
                    _ => 0,
                };
                fs::read(path)
                    .map(|bytes| {
                        bytes
                            .get(skip..)
                            .unwrap_or_default()
                            .iter()
                            .filter(|b| **b == b'\n')
                            .count() as u64
                    })
                    .unwrap_or(0)
            })
            .sum()
    }
}
