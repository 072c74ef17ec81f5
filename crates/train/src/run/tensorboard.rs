//! TensorBoard event files, so `tensorboard --logdir RUN` shows the run's curves.
//!
//! A file is a sequence of TFRecords, each
//!
//! ```text
//! u64 length (little-endian) | u32 masked CRC32C of the 8 length bytes | data | u32 masked CRC32C of data
//! ```
//!
//! whose data is an `Event` protobuf, hand-encoded here: field 1 `wall_time` (double), field 2
//! `step` (int64), field 3 `file_version` (string, the first event: `"brain.Event:2"`), field 5
//! `summary` (message: repeated field 1 `Value { 1: tag (string), 2: simple_value (float) }`),
//! field 7 `session_log` (message: field 1 `status`, 1 = START; written when a run starts or resumes).

use crate::files::cannot_write;
use anyhow::{Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes one TensorBoard event file.
///
/// On resume, the caller just creates a new `EventWriter` in the same folder: TensorBoard reads
/// every event file of a folder in name order (the name starts with the creation time) as one
/// run. Points the killed run logged past its checkpoint would overlap the resumed curve;
/// `tensorboard`'s data server drops them by itself when a tag's step goes back, and
/// [`mark_resume`](Self::mark_resume) (a `SessionLog START` event) makes the Python
/// `EventAccumulator` (`--load_fast=false`) drop them too.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and, in it, `events.out.tfevents.<unix_secs>.<hostname>.<pid>.flint`
    /// (hostname from `/etc/hostname`, else `localhost`; `.flint.N` when a writer of the same
    /// second and process exists), beginning with the `file_version` event (flushed at once).
    /// An existing file is never overwritten.
    pub fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let base = format!(
            "events.out.tfevents.{}.{}.{}.flint",
            now.as_secs(),
            hostname(),
            std::process::id()
        );
        let mut attempt = 0;
        let (file, path) = loop {
            let name = if attempt == 0 {
                base.clone()
            } else {
                format!("{base}.{attempt}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => attempt += 1,
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: cannot create", path.display()))
                }
            }
        };
        let mut w = Self {
            file: BufWriter::new(file),
            path,
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, now.as_secs_f64());
        put_varint_field(&mut event, 2, 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        w.flush()?;
        Ok(w)
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds one point `(step, value)` to the curve `tag` (e.g. `"loss"`), `wall_time` in seconds
    /// since the Unix epoch (see [`wall_time_now`]). Buffered: call [`flush`](Self::flush) after
    /// each logging step so a live TensorBoard sees it.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64, wall_time: f64) -> Result<()> {
        let mut summary_value = Vec::with_capacity(tag.len() + 8);
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_float(&mut summary_value, 2, value);
        let mut summary = Vec::with_capacity(summary_value.len() + 4);
        put_bytes(&mut summary, 1, &summary_value);
        let mut event = Vec::with_capacity(summary.len() + 24);
        put_double(&mut event, 1, wall_time);
        // int64 is a varint of the two's-complement bits (10 bytes when negative).
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Marks the file as the continuation of a run resumed from its checkpoint at
    /// `checkpoint_step` (0 for a new run): a `SessionLog { status: START }` event at
    /// `checkpoint_step + 1`, on which TensorBoard's Python reader drops every point of step >
    /// `checkpoint_step` read so far (from the killed run's files). Call it right after
    /// [`create`](Self::create); flushed.
    pub fn mark_resume(&mut self, checkpoint_step: i64, wall_time: f64) -> Result<()> {
        let mut session_log = Vec::new();
        put_varint_field(&mut session_log, 1, 1); // status = START
        let mut event = Vec::with_capacity(session_log.len() + 24);
        put_double(&mut event, 1, wall_time);
        put_varint_field(&mut event, 2, checkpoint_step.saturating_add(1) as u64);
        put_bytes(&mut event, 7, &session_log);
        self.write_record(&event)?;
        self.flush()
    }

    /// Hands the buffered records to the OS (no fsync).
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| cannot_write(&self.path, e))
    }

    /// Flushes and makes the records durable (before a checkpoint is committed).
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.file
            .get_ref()
            .sync_data()
            .map_err(|e| cannot_write(&self.path, e))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .map_err(|e| cannot_write(&self.path, e))
    }
}

/// Seconds since the Unix epoch, for [`EventWriter::add_scalar`]'s `wall_time`.
pub fn wall_time_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// `/etc/hostname`'s first line, else `localhost`; anything but `[A-Za-z0-9._-]` becomes `_`
/// so the name stays one file name.
fn hostname() -> String {
    let host = fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.lines().next().unwrap_or("").trim();
    if host.is_empty() {
        return "localhost".to_string();
    }
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table, built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC32C of `data` (`crc32c(b"123456789") == 0xE306_9283`).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked CRC32C: `((crc >> 15) | (crc << 17)) + 0xa282ead8`, wrapping.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A field key: `(field << 3) | wire_type`.
fn put_key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_key(buf, field, 0);
    put_varint(buf, v);
}

fn put_double(buf: &mut Vec<u8>, field: u32, v: f64) {
    put_key(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_float(buf: &mut Vec<u8>, field: u32, v: f32) {
    put_key(buf, field, 5);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// A length-delimited field (string, bytes, embedded message).
fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}
