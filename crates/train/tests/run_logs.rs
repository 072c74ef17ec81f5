//! The run folder's logs: `metrics.jsonl` (keys, resume cut-back, torn lines) and TensorBoard
//! event files (CRC32C, TFRecord framing, Event protobuf), read back by a small reader here.

use flint_train::run::metrics::MetricsWriter;
use flint_train::run::tensorboard::{crc32c, EventWriter};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A fresh, empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("run_logs")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "file does not end with a newline: {text:?}"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The keys of a one-level JSON object line, in file order.
fn keys_in_order(line: &str) -> Vec<String> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
    let mut keys: Vec<(usize, String)> = map
        .keys()
        .map(|k| (line.find(&format!("\"{k}\":")).unwrap(), k.clone()))
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

fn steps(path: &Path) -> Vec<(u64, bool)> {
    lines(path)
        .iter()
        .map(|v| (v["step"].as_u64().unwrap(), v.get("val_loss").is_some()))
        .collect()
}

#[test]
fn metrics_lines_parse_back_with_exact_keys() {
    let dir = scratch("keys");
    let path = dir.join("metrics.jsonl");
    let mut w = MetricsWriter::open(&path, None).unwrap();
    w.write_train(1, 2.5, 1e-3, 1.25, 1000.0, 0.5).unwrap();
    w.write_eval(1, 2.25).unwrap();
    w.write_train(2, f32::NAN, 3e-4, 0.75, 1234.5, 1.0).unwrap();
    drop(w);

    let text = fs::read_to_string(&path).unwrap();
    let raw: Vec<&str> = text.lines().collect();
    assert_eq!(raw.len(), 3);
    assert_eq!(
        raw[0],
        r#"{"step":1,"loss":2.5,"lr":0.001,"grad_norm":1.25,"tokens_per_s":1000.0,"elapsed_s":0.5}"#
    );
    assert_eq!(raw[1], r#"{"step":1,"val_loss":2.25}"#);
    let train_keys = [
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
    ];
    assert_eq!(keys_in_order(raw[0]), train_keys);
    assert_eq!(keys_in_order(raw[1]), ["step", "val_loss"]);
    assert_eq!(keys_in_order(raw[2]), train_keys);

    let v = lines(&path);
    assert_eq!(v[0]["step"], 1);
    assert_eq!(v[0]["loss"].as_f64().unwrap(), 2.5);
    assert_eq!(v[0]["lr"].as_f64().unwrap() as f32, 1e-3);
    assert_eq!(v[0]["grad_norm"].as_f64().unwrap(), 1.25);
    assert_eq!(v[0]["tokens_per_s"].as_f64().unwrap(), 1000.0);
    assert_eq!(v[0]["elapsed_s"].as_f64().unwrap(), 0.5);
    assert_eq!(v[1]["val_loss"].as_f64().unwrap(), 2.25);
    // A diverged loss is a JSON null, the line still whole.
    assert!(v[2]["loss"].is_null());
    assert_eq!(v[2]["lr"].as_f64().unwrap() as f32, 3e-4);

    // A fresh run (None) empties an existing file.
    let mut w = MetricsWriter::open(&path, None).unwrap();
    w.write_train(1, 3.0, 1e-3, 1.0, 10.0, 0.1).unwrap();
    assert_eq!(steps(&path), [(1, false)]);
}

#[test]
fn resume_cuts_back_to_step_and_appends() {
    let dir = scratch("resume");
    let path = dir.join("metrics.jsonl");
    let mut w = MetricsWriter::open(&path, None).unwrap();
    for step in 1..=6u64 {
        w.write_train(step, 3.0 - step as f32 * 0.1, 1e-3, 1.0, 100.0, step as f64)
            .unwrap();
        if step % 2 == 0 {
            w.write_eval(step, 3.0 - step as f32 * 0.1).unwrap();
        }
    }
    drop(w);
    let before = fs::read_to_string(&path).unwrap();

    // Resume from the checkpoint at step 3: train 4..6 and evals 4, 6 go; eval 2 stays.
    let mut w = MetricsWriter::open(&path, Some(3)).unwrap();
    assert_eq!(
        steps(&path),
        [(1, false), (2, false), (2, true), (3, false)]
    );
    // Kept lines are byte-for-byte the old ones.
    let after = fs::read_to_string(&path).unwrap();
    assert!(
        before.starts_with(&after),
        "{after:?} is not a prefix of {before:?}"
    );
    let left: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["metrics.jsonl"], "temp file left behind");

    w.write_train(4, 9.0, 5e-4, 2.0, 50.0, 40.0).unwrap();
    w.write_eval(4, 8.5).unwrap();
    drop(w);
    assert_eq!(
        steps(&path),
        [
            (1, false),
            (2, false),
            (2, true),
            (3, false),
            (4, false),
            (4, true)
        ]
    );
    let v = lines(&path);
    assert_eq!(v[4]["loss"].as_f64().unwrap(), 9.0);
    assert_eq!(v[5]["val_loss"].as_f64().unwrap(), 8.5);

    // Resuming at a step past the end keeps everything; at 0 keeps nothing.
    drop(MetricsWriter::open(&path, Some(100)).unwrap());
    assert_eq!(steps(&path).len(), 6);
    drop(MetricsWriter::open(&path, Some(0)).unwrap());
    assert_eq!(fs::read_to_string(&path).unwrap(), "");

    // Resuming with no file starts one.
    let missing = dir.join("missing.jsonl");
    let mut w = MetricsWriter::open(&missing, Some(7)).unwrap();
    w.write_train(8, 1.0, 1e-3, 1.0, 1.0, 1.0).unwrap();
    assert_eq!(steps(&missing), [(8, false)]);
}

#[test]
fn torn_last_line_dropped() {
    let dir = scratch("torn");
    let path = dir.join("metrics.jsonl");
    let mut w = MetricsWriter::open(&path, None).unwrap();
    w.write_train(1, 2.0, 1e-3, 1.0, 100.0, 1.0).unwrap();
    w.write_train(2, 1.9, 1e-3, 1.0, 100.0, 2.0).unwrap();
    drop(w);
    // A kill in the middle of step 3's write.
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"step":3,"loss":1.8,"lr":0.00"#).unwrap();
    drop(f);

    let mut w = MetricsWriter::open(&path, Some(3)).unwrap();
    assert_eq!(steps(&path), [(1, false), (2, false)]);
    w.write_train(3, 1.8, 1e-3, 1.0, 100.0, 3.0).unwrap();
    drop(w);
    assert_eq!(steps(&path), [(1, false), (2, false), (3, false)]);

    // Torn inside a line's first bytes, and zero bytes after a crash, go the same way.
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"{\"st\0\0\0")
        .unwrap();
    drop(MetricsWriter::open(&path, Some(3)).unwrap());
    assert_eq!(steps(&path), [(1, false), (2, false), (3, false)]);

    // A whole object that only lost its newline is kept (and gets its newline back).
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(br#"{"step":3,"val_loss":1.5}"#)
        .unwrap();
    drop(MetricsWriter::open(&path, Some(3)).unwrap());
    assert_eq!(
        steps(&path),
        [(1, false), (2, false), (3, false), (3, true)]
    );

    // Garbage in the middle of the file is an error naming the line, not silently dropped.
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, format!("not json\n{text}")).unwrap();
    let err = MetricsWriter::open(&path, Some(3))
        .err()
        .expect("garbage line accepted");
    assert!(format!("{err:#}").contains("line 1"), "{err:#}");
}

#[test]
fn crc32c_known_answers() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    // RFC 3720 (iSCSI) B.4 test vectors.
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    let ascending: Vec<u8> = (0..32).collect();
    assert_eq!(crc32c(&ascending), 0x46DD_794E);
}

/// TFRecord's mask, written out here as the format states it, independently of the library's.
#[allow(clippy::manual_rotate)]
fn mask(crc: u32) -> u32 {
    ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

/// Reads every record of a TFRecord file, checking both masked CRCs.
fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(
            len_crc,
            mask(crc32c(len_bytes)),
            "length CRC of record {}",
            records.len()
        );
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(
            data_crc,
            mask(crc32c(data)),
            "data CRC of record {}",
            records.len()
        );
        records.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(at, bytes.len(), "trailing bytes");
    records
}

fn varint(buf: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// A protobuf message's fields, `(number, value)`, in order.
fn fields(buf: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let key = varint(buf, &mut at);
        let field = match key & 7 {
            0 => Field::Varint(varint(buf, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(buf[at - 8..at].try_into().unwrap())
            }
            2 => {
                let len = varint(buf, &mut at) as usize;
                at += len;
                Field::Bytes(&buf[at - len..at])
            }
            5 => {
                at += 4;
                Field::Fixed32(buf[at - 4..at].try_into().unwrap())
            }
            w => panic!("wire type {w}"),
        };
        out.push((key >> 3, field));
    }
    assert_eq!(at, buf.len());
    out
}

#[derive(Debug, Default, PartialEq)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    /// `SessionLog.status`, if the event is one.
    session_status: Option<u64>,
    /// `(tag, simple_value)` of each summary value.
    values: Vec<(String, f32)>,
}

fn decode_event(buf: &[u8]) -> Event {
    let mut e = Event::default();
    for (number, field) in fields(buf) {
        match (number, field) {
            (1, Field::Fixed64(b)) => e.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => e.step = v as i64,
            (3, Field::Bytes(b)) => e.file_version = Some(String::from_utf8(b.to_vec()).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (number, value) in fields(summary) {
                    let (1, Field::Bytes(value)) = (number, value) else {
                        panic!("summary field {number}")
                    };
                    let (mut tag, mut simple) = (None, None);
                    for (number, f) in fields(value) {
                        match (number, f) {
                            (1, Field::Bytes(b)) => {
                                tag = Some(String::from_utf8(b.to_vec()).unwrap())
                            }
                            (2, Field::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                            (n, _) => panic!("unexpected Summary.Value field {n}"),
                        }
                    }
                    e.values.push((tag.unwrap(), simple.unwrap()));
                }
            }
            (7, Field::Bytes(session_log)) => {
                for (number, f) in fields(session_log) {
                    match (number, f) {
                        (1, Field::Varint(status)) => e.session_status = Some(status),
                        (n, _) => panic!("unexpected SessionLog field {n}"),
                    }
                }
            }
            (n, _) => panic!("unexpected Event field {n}"),
        }
    }
    e
}

#[test]
fn event_file_parses_back() {
    let dir = scratch("events");
    let mut w = EventWriter::create(&dir).unwrap();
    let path = w.path().to_path_buf();
    // The file_version event is on disk before any scalar.
    let first = read_records(&fs::read(&path).unwrap());
    assert_eq!(first.len(), 1);

    w.add_scalar("loss", 2.5, 1, 1_700_000_000.25).unwrap();
    w.add_scalar("lr", 1e-3, 1, 1_700_000_000.25).unwrap();
    w.add_scalar("loss", 2.25, 2, 1_700_000_001.5).unwrap();
    w.add_scalar("val_loss", 2.0, 300, 1_700_000_002.0).unwrap();
    w.add_scalar("odd", -1.5, -3, 0.0).unwrap();
    w.flush().unwrap();

    let name = path.file_name().unwrap().to_str().unwrap();
    let parts: Vec<&str> = name.split('.').collect();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    assert!(
        name.ends_with(&format!(".{}.flint", std::process::id())),
        "{name}"
    );
    let secs: u64 = parts[3].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(secs <= now && now - secs < 600, "{name}");
    assert_eq!(path.parent().unwrap(), dir);

    let events: Vec<Event> = read_records(&fs::read(&path).unwrap())
        .iter()
        .map(|r| decode_event(r))
        .collect();
    assert_eq!(events.len(), 6);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(events[0].step, 0);
    assert!((events[0].wall_time - now as f64).abs() < 600.0);
    assert!(events[0].values.is_empty());
    let scalars: Vec<(String, f32, i64, f64)> = events[1..]
        .iter()
        .map(|e| {
            assert_eq!(e.file_version, None);
            assert_eq!(e.values.len(), 1);
            (e.values[0].0.clone(), e.values[0].1, e.step, e.wall_time)
        })
        .collect();
    assert_eq!(
        scalars,
        [
            ("loss".to_string(), 2.5, 1, 1_700_000_000.25),
            ("lr".to_string(), 1e-3, 1, 1_700_000_000.25),
            ("loss".to_string(), 2.25, 2, 1_700_000_001.5),
            ("val_loss".to_string(), 2.0, 300, 1_700_000_002.0),
            ("odd".to_string(), -1.5, -3, 0.0),
        ]
    );

    // Dropping flushes what was buffered.
    w.add_scalar("loss", 2.0, 3, 1_700_000_003.0).unwrap();
    drop(w);
    let events = read_records(&fs::read(&path).unwrap());
    assert_eq!(decode_event(&events[6]).values, [("loss".to_string(), 2.0)]);
}

/// The decoded events of every event file in `dir`, file by file in name order.
fn event_files(dir: &Path) -> Vec<(String, Vec<Event>)> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("events.out.tfevents."))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let events = read_records(&fs::read(dir.join(&n)).unwrap())
                .iter()
                .map(|r| decode_event(r))
                .collect();
            (n, events)
        })
        .collect()
}

#[test]
fn resumed_run_gets_a_second_event_file() {
    let dir = scratch("events_resume");
    let mut w = EventWriter::create(&dir).unwrap();
    for step in 1..=5 {
        w.add_scalar(
            "loss",
            10.0 - step as f32,
            step,
            1_700_000_000.0 + step as f64,
        )
        .unwrap();
    }
    drop(w);

    // The resumed run starts from the checkpoint at step 3. Even within the same second from
    // the same process the new file gets its own name, after the old one, never clobbering it.
    let mut w = EventWriter::create(&dir).unwrap();
    w.mark_resume(3, 1_700_000_100.0).unwrap();
    for step in 4..=6 {
        w.add_scalar(
            "loss",
            20.0 - step as f32,
            step,
            1_700_000_100.0 + step as f64,
        )
        .unwrap();
    }
    w.flush().unwrap();

    let files = event_files(&dir);
    assert_eq!(files.len(), 2);
    // Name order is creation order, so TensorBoard reads the resumed file last.
    assert_eq!(files[1].0, w.path().file_name().unwrap().to_str().unwrap());
    let (old, new) = (&files[0].1, &files[1].1);
    assert_eq!(old.len(), 6);
    assert_eq!(old[5].values, [("loss".to_string(), 5.0)]);
    assert_eq!(new.len(), 5);
    assert_eq!(new[0].file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(
        new[1],
        Event {
            wall_time: 1_700_000_100.0,
            step: 4,
            session_status: Some(1),
            ..Default::default()
        }
    );
    assert_eq!(new[2].step, 4);
    assert_eq!(new[2].values, [("loss".to_string(), 16.0)]);
}
