//! The data layer: tokenizers, the token cache, and the loaders' exact windows.

use std::path::{Path, PathBuf};

use flint_train::data::{
    prepare, train_bpe, DataOrder, Dataset, Loader, LoaderState, Source, Tokenizer, Tokens,
};

/// A fresh folder under the system temp dir, removed on drop.
struct Tmp(tempfile::TempDir);

impl Tmp {
    fn new(name: &str) -> Tmp {
        Tmp(tempfile::Builder::new()
            .prefix(&format!("flint-data-{name}-"))
            .tempdir()
            .unwrap())
    }

    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel)
    }

    /// `data/` read with the byte tokenizer, cached in `cache/`, nothing held out.
    fn prepare_bytes(&self) -> anyhow::Result<Dataset> {
        prepare(
            Source::Path(self.path("data")),
            &Tokenizer::Bytes,
            &self.path("cache"),
            0.0,
        )
    }
}

fn ids(t: &Tokens) -> Vec<u32> {
    (0..t.len()).map(|i| t.get(i)).collect()
}

fn text(t: &Tokens, tok: &Tokenizer) -> String {
    tok.decode(&ids(t)).unwrap()
}

/// The stream 0, 1, ..., n-1 (byte tokens of ASCII text).
fn counting(tmp: &Tmp, n: u8) -> Tokens {
    assert!(n <= 128);
    let s: String = (0..n).map(char::from).collect();
    let d = prepare(
        Source::Embedded {
            name: "counting",
            text: &s,
        },
        &Tokenizer::Bytes,
        &tmp.path("cache"),
        0.0,
    )
    .unwrap();
    assert_eq!(ids(&d.train), (0..n as u32).collect::<Vec<_>>());
    d.train
}

fn batch(l: &mut Loader, t: &Tokens, n: usize) -> (Vec<i32>, Vec<i32>) {
    let (mut x, mut y) = (vec![0; n], vec![0; n]);
    l.next_batch(t, &mut x, &mut y);
    (x, y)
}

fn range(a: i32, b: i32) -> Vec<i32> {
    (a..b).collect()
}

/// Words from a tiny grammar, deterministic, enough repetition for merges.
fn generated_text(words: usize) -> String {
    let vocab = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "away",
        "from", "a", "small", "cat", "while", "birds", "sing", "songs", "in", "green", "trees",
    ];
    let mut s = String::new();
    let mut x: u64 = 12345;
    for i in 0..words {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(vocab[(x >> 33) as usize % vocab.len()]);
        s.push(if i % 12 == 11 { '\n' } else { ' ' });
    }
    s
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

// ---- tokenizers ----

#[test]
fn bytes_tokenizer_round_trips_utf8_including_non_ascii() {
    let tok = Tokenizer::from_arg("bytes").unwrap();
    let s = "héllo, wörld — 日本語 🦀\n";
    let ids = tok.encode(s).unwrap();
    assert_eq!(ids, s.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(tok.decode(&ids).unwrap(), s);
    assert_eq!(tok.vocab_size(), 256);
    assert_eq!(tok.spec(), "bytes");
    assert_eq!(tok.fingerprint(), "bytes");
    assert!(tok.decode(&[256]).is_err());
}

#[test]
fn trained_bpe_has_the_requested_vocab_size_and_round_trips_text() {
    let tmp = Tmp::new("bpe");
    let corpus = tmp.write("corpus/a.txt", generated_text(3000));
    let out = tmp.path("tok/tokenizer.json");
    let warnings = train_bpe(&[corpus], 300, &out).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");

    let tok = Tokenizer::from_arg(out.to_str().unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), 300);
    assert_eq!(tok.eot(), Some(0));
    assert_eq!(
        tok.spec(),
        out.canonicalize().unwrap().display().to_string()
    );
    assert!(tok.fingerprint().starts_with("hf-"));

    // Seen words merge; unseen characters still encode through the byte alphabet.
    let s = "the quick brown fox jumps over the lazy dog\nnaïve 日本 🦀  spaces\ttab";
    let ids = tok.encode(s).unwrap();
    assert!(
        ids.len() < s.len(),
        "{} ids for {} bytes",
        ids.len(),
        s.len()
    );
    assert!(ids.iter().all(|&i| (i as usize) < 300));
    assert_eq!(tok.decode(&ids).unwrap(), s);
}

#[test]
fn bpe_training_rejects_a_vocab_below_the_byte_alphabet() {
    let tmp = Tmp::new("bpe-small");
    let corpus = tmp.write("a.txt", "some text");
    let err = train_bpe(&[corpus], 100, &tmp.path("t.json")).unwrap_err();
    assert!(err.to_string().contains("--vocab-size 100"), "{err}");
}

#[test]
fn tokenizer_path_that_does_not_exist_is_an_error_naming_the_flag() {
    let err = Tokenizer::from_arg("/nonexistent/tokenizer.json")
        .err()
        .unwrap();
    assert!(err.to_string().contains("--tokenizer"), "{err}");
}

// ---- sequential loader ----

#[test]
fn sequential_loader_reads_bt_plus_one_tokens_advances_by_bt_and_wraps_to_zero() {
    let tmp = Tmp::new("seq");
    let t = counting(&tmp, 20);
    // B = 2, T = 3: each batch reads 7 tokens; x is the first 6, y the last 6.
    let mut l = Loader::new(t.len(), 2, 3, DataOrder::Sequential, 0).unwrap();
    assert_eq!(batch(&mut l, &t, 6), (range(0, 6), range(1, 7)));
    assert_eq!(l.state().pos, 6);
    assert_eq!(batch(&mut l, &t, 6), (range(6, 12), range(7, 13)));
    // 12 + 7 = 19 <= 20 tokens: still fits.
    assert_eq!(batch(&mut l, &t, 6), (range(12, 18), range(13, 19)));
    // 18 + 7 > 20: back to 0 before reading.
    assert_eq!(batch(&mut l, &t, 6), (range(0, 6), range(1, 7)));
    assert_eq!(
        l.state(),
        LoaderState {
            order: DataOrder::Sequential,
            epoch: 1,
            pos: 6
        }
    );
}

#[test]
fn sequential_loader_uses_the_very_last_token_when_it_fits_exactly() {
    let tmp = Tmp::new("seq-exact");
    let t = counting(&tmp, 13); // 2 batches of B*T = 6 plus 1
    let mut l = Loader::new(t.len(), 1, 6, DataOrder::Sequential, 0).unwrap();
    batch(&mut l, &t, 6);
    assert_eq!(batch(&mut l, &t, 6), (range(6, 12), range(7, 13)));
    assert_eq!(batch(&mut l, &t, 6).0, range(0, 6));
}

#[test]
fn sequential_state_restores_the_exact_stream() {
    let tmp = Tmp::new("seq-restore");
    let t = counting(&tmp, 50);
    let mut a = Loader::new(t.len(), 2, 4, DataOrder::Sequential, 0).unwrap();
    for _ in 0..5 {
        batch(&mut a, &t, 8);
    }
    let saved: LoaderState =
        serde_json::from_str(&serde_json::to_string(&a.state()).unwrap()).unwrap();
    let mut b = Loader::new(t.len(), 2, 4, DataOrder::Sequential, 0).unwrap();
    b.restore(&saved).unwrap();
    for _ in 0..10 {
        assert_eq!(batch(&mut a, &t, 8), batch(&mut b, &t, 8));
    }
}

// ---- shuffle loader ----

#[test]
fn shuffle_uses_every_window_start_once_per_epoch_and_reshuffles_the_next() {
    let tmp = Tmp::new("shuffle-epoch");
    let t = counting(&tmp, 41);
    // T = 4: window starts 0, 4, ..., 36 (36 + 5 <= 41): 10 windows; B = 2: 5 batches an epoch.
    let mut l = Loader::new(t.len(), 2, 4, DataOrder::Shuffle, 7).unwrap();
    let mut epochs = Vec::new();
    for _ in 0..2 {
        let mut starts = Vec::new();
        for _ in 0..5 {
            let (x, y) = batch(&mut l, &t, 8);
            for r in 0..2 {
                let row = &x[4 * r..4 * r + 4];
                assert_eq!(row, range(row[0], row[0] + 4), "a window is contiguous");
                assert_eq!(&y[4 * r..4 * r + 4], range(row[0] + 1, row[0] + 5));
                starts.push(row[0]);
            }
        }
        let mut sorted = starts.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).map(|k| 4 * k).collect::<Vec<_>>());
        epochs.push(starts);
    }
    assert_ne!(epochs[0], epochs[1], "each epoch has its own order");
    assert_ne!(epochs[0], (0..10).map(|k| 4 * k).collect::<Vec<_>>());
    assert_eq!(l.state().epoch, 1);
}

#[test]
fn shuffle_is_reproducible_from_the_seed() {
    let tmp = Tmp::new("shuffle-seed");
    let t = counting(&tmp, 100);
    let run = |seed| {
        let mut l = Loader::new(t.len(), 3, 5, DataOrder::Shuffle, seed).unwrap();
        (0..20).map(|_| batch(&mut l, &t, 15).0).collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn shuffle_state_restores_the_exact_stream_across_epochs() {
    let tmp = Tmp::new("shuffle-restore");
    let t = counting(&tmp, 64);
    // 12 windows of T = 5, B = 5: batches straddle epoch boundaries.
    let mut a = Loader::new(t.len(), 5, 5, DataOrder::Shuffle, 42).unwrap();
    for _ in 0..3 {
        batch(&mut a, &t, 25);
    }
    let saved: LoaderState =
        serde_json::from_str(&serde_json::to_string(&a.state()).unwrap()).unwrap();
    assert_eq!(saved.epoch, 1);
    let mut b = Loader::new(t.len(), 5, 5, DataOrder::Shuffle, 42).unwrap();
    b.restore(&saved).unwrap();
    for _ in 0..10 {
        assert_eq!(batch(&mut a, &t, 25), batch(&mut b, &t, 25));
    }
    assert_eq!(a.state(), b.state());
}

// ---- loader errors ----

#[test]
fn seq_len_beyond_the_data_is_an_error_naming_the_flag_and_the_numbers() {
    let err = Loader::new(100, 4, 32, DataOrder::Sequential, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--seq-len 32"), "{err}");
    assert!(err.contains("129") && err.contains("100"), "{err}");
    // B*T+1 tokens exactly is enough.
    assert!(Loader::new(129, 4, 32, DataOrder::Shuffle, 0).is_ok());
}

#[test]
fn batch_size_zero_is_an_error() {
    let err = Loader::new(100, 0, 8, DataOrder::Sequential, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--batch-size"), "{err}");
}

#[test]
fn restoring_a_state_of_the_other_order_is_an_error() {
    let mut l = Loader::new(100, 2, 8, DataOrder::Shuffle, 0).unwrap();
    let s = LoaderState {
        order: DataOrder::Sequential,
        epoch: 0,
        pos: 16,
    };
    assert!(l.restore(&s).is_err());
}

// ---- prepare: sources, cache, warnings ----

#[test]
fn folder_files_are_read_recursively_in_path_order_and_joined_by_blank_lines() {
    let tmp = Tmp::new("folder");
    tmp.write("data/b/2.txt", "two");
    tmp.write("data/a.txt", "one");
    tmp.write("data/c.jsonl", "{\"text\": \"three\"}\n");
    tmp.write("data/notes.md", "ignored");
    tmp.write("data/.hidden.txt", "ignored");
    let d = tmp.prepare_bytes().unwrap();
    assert_eq!(text(&d.train, &Tokenizer::Bytes), "one\n\ntwo\n\nthree");
    assert!(d.val.is_none());
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
}

#[test]
fn jsonl_documents_are_the_text_field_of_each_line() {
    let tmp = Tmp::new("jsonl");
    let f = tmp.write(
        "d.jsonl",
        "{\"text\": \"hello\", \"id\": 1}\n\n{\"id\": 2, \"text\": \"wörld\\n!\"}\n{\"title\": \"no text\"}\n",
    );
    let d = prepare(Source::Path(f), &Tokenizer::Bytes, &tmp.path("cache"), 0.0).unwrap();
    assert_eq!(text(&d.train, &Tokenizer::Bytes), "hello\n\nwörld\n!");
    assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
    assert!(d.warnings[0].contains("line 4"), "{:?}", d.warnings);
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_text() {
    let tmp = Tmp::new("bom");
    let f = tmp.write("data/d.jsonl", "\u{feff}{\"text\": \"first\"}\n");
    tmp.write("data/e.txt", "\u{feff}second");
    let d = prepare(
        Source::Path(f.parent().unwrap().to_path_buf()),
        &Tokenizer::Bytes,
        &tmp.path("cache"),
        0.0,
    )
    .unwrap();
    assert_eq!(text(&d.train, &Tokenizer::Bytes), "first\n\nsecond");
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
}

#[test]
fn embedded_text_is_a_source_like_a_file() {
    let tmp = Tmp::new("embedded");
    let d = prepare(
        Source::Embedded {
            name: "tiny",
            text: "to be or not to be",
        },
        &Tokenizer::Bytes,
        &tmp.path("cache"),
        0.0,
    )
    .unwrap();
    assert_eq!(text(&d.train, &Tokenizer::Bytes), "to be or not to be");
    assert_eq!(
        d.train.bytes_per_token(),
        2,
        "vocab <= 65536 is stored as u16"
    );
}

#[test]
fn val_fraction_holds_out_the_tail_of_the_stream() {
    let tmp = Tmp::new("val");
    let src = || Source::Embedded {
        name: "abc",
        text: "abcdefghij",
    };
    let d = prepare(src(), &Tokenizer::Bytes, &tmp.path("cache"), 0.2).unwrap();
    assert_eq!(text(&d.train, &Tokenizer::Bytes), "abcdefgh");
    assert_eq!(text(d.val.as_ref().unwrap(), &Tokenizer::Bytes), "ij");
    let err = prepare(src(), &Tokenizer::Bytes, &tmp.path("cache"), 1.0).unwrap_err();
    assert!(err.to_string().contains("--val-fraction"), "{err}");
}

#[test]
fn the_cache_is_reused_while_the_inputs_are_unchanged_and_rebuilt_when_one_changes() {
    let tmp = Tmp::new("cache");
    tmp.write("data/a.txt", "first file");
    tmp.write("data/b.txt", "second file");
    let cache = tmp.path("cache");
    let src = || Source::Path(tmp.path("data"));

    let first = prepare(src(), &Tokenizer::Bytes, &cache, 0.0).unwrap();
    assert!(!first.reused);
    assert!(first.manifest.starts_with(&cache));
    let written = mtime(&first.manifest);

    let second = prepare(src(), &Tokenizer::Bytes, &cache, 0.0).unwrap();
    assert!(second.reused, "the same inputs must not be tokenized again");
    assert_eq!(second.manifest, first.manifest);
    assert_eq!(
        mtime(&second.manifest),
        written,
        "the manifest was not rewritten"
    );
    assert_eq!(ids(&second.train), ids(&first.train));

    tmp.write("data/b.txt", "second file, edited");
    let third = prepare(src(), &Tokenizer::Bytes, &cache, 0.0).unwrap();
    assert!(!third.reused, "a changed file invalidates the cache");
    assert_ne!(third.manifest, first.manifest);
    assert_eq!(
        text(&third.train, &Tokenizer::Bytes),
        "first file\n\nsecond file, edited"
    );
}

#[test]
fn a_different_tokenizer_gets_its_own_cache() {
    let tmp = Tmp::new("cache-tok");
    tmp.write("corpus.txt", generated_text(2000));
    let tj = tmp.path("tokenizer.json");
    train_bpe(&[tmp.path("corpus.txt")], 300, &tj).unwrap();
    let hf = Tokenizer::from_arg(tj.to_str().unwrap()).unwrap();
    let src = || Source::Path(tmp.path("corpus.txt"));
    let a = prepare(src(), &Tokenizer::Bytes, &tmp.path("cache"), 0.0).unwrap();
    let b = prepare(src(), &hf, &tmp.path("cache"), 0.0).unwrap();
    assert!(!b.reused);
    assert_ne!(a.manifest, b.manifest);
    assert!(b.train.len() < a.train.len());
}

#[test]
fn hf_documents_end_with_the_endoftext_token() {
    let tmp = Tmp::new("eot");
    tmp.write("corpus.txt", generated_text(2000));
    let tj = tmp.path("tokenizer.json");
    train_bpe(&[tmp.path("corpus.txt")], 300, &tj).unwrap();
    let tok = Tokenizer::from_arg(tj.to_str().unwrap()).unwrap();
    tmp.write("data/1.txt", "the quick fox");
    tmp.write("data/2.txt", "a lazy dog");
    let d = prepare(
        Source::Path(tmp.path("data")),
        &tok,
        &tmp.path("cache"),
        0.0,
    )
    .unwrap();
    let got = ids(&d.train);
    let eot = tok.eot().unwrap();
    assert_eq!(got.iter().filter(|&&i| i == eot).count(), 2);
    assert_eq!(got.last(), Some(&eot));
    assert_eq!(
        text(&d.train, &tok),
        "the quick fox<|endoftext|>a lazy dog<|endoftext|>"
    );
}

#[test]
fn a_non_utf8_file_is_skipped_with_a_warning() {
    let tmp = Tmp::new("non-utf8");
    tmp.write("data/good.txt", "good text");
    tmp.write("data/latin1.txt", b"caf\xe9 cr\xe8me");
    tmp.write("data/image.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR");
    let d = tmp.prepare_bytes().unwrap();
    assert_eq!(text(&d.train, &Tokenizer::Bytes), "good text");
    assert_eq!(d.warnings.len(), 2, "{:?}", d.warnings);
    assert!(d
        .warnings
        .iter()
        .any(|w| w.contains("latin1.txt") && w.contains("UTF-8")));
    assert!(d.warnings.iter().any(|w| w.contains("image.txt")));
}

#[test]
fn a_folder_of_only_binary_files_is_an_error() {
    let tmp = Tmp::new("binary");
    tmp.write("data/a.txt", b"\0\x01\x02");
    tmp.write("data/b.jsonl", b"\xff\xfe");
    let err = tmp.prepare_bytes().unwrap_err().to_string();
    assert!(err.contains("skipped") && err.contains("a.txt"), "{err}");
}

#[test]
fn an_empty_folder_is_an_error_naming_the_folder() {
    let tmp = Tmp::new("empty");
    std::fs::create_dir_all(tmp.path("data/sub")).unwrap();
    tmp.write("data/readme.md", "not an input");
    let err = tmp.prepare_bytes().unwrap_err().to_string();
    assert!(
        err.contains(&tmp.path("data").display().to_string()),
        "{err}"
    );
}

#[test]
fn a_missing_data_path_is_an_error_naming_it() {
    let tmp = Tmp::new("missing");
    let err = prepare(
        Source::Path(tmp.path("nope")),
        &Tokenizer::Bytes,
        &tmp.path("cache"),
        0.0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--data") && err.contains("nope"), "{err}");
}

#[test]
fn a_long_document_encodes_in_pieces_to_exactly_the_ids_of_the_whole() {
    let tmp = Tmp::new("pieces");
    tmp.write("corpus.txt", generated_text(2000));
    let tj = tmp.path("tokenizer.json");
    train_bpe(&[tmp.path("corpus.txt")], 300, &tj).unwrap();
    let tok = Tokenizer::from_arg(tj.to_str().unwrap()).unwrap();
    // ~300 KB with single and double newlines, runs of spaces and a tab: cut into pieces.
    let long = generated_text(60000)
        .replace("fox\n", "fox \n")
        .replace("dog\n", "dog\n\n")
        .replace("cat ", "cat  \t");
    assert!(long.len() > 256 << 10);
    tmp.write("long/doc.txt", &long);
    let d = prepare(
        Source::Path(tmp.path("long")),
        &tok,
        &tmp.path("cache"),
        0.0,
    )
    .unwrap();
    let mut want = tok.encode(&long).unwrap();
    want.push(tok.eot().unwrap());
    assert_eq!(ids(&d.train), want);
}

#[test]
fn a_vocab_above_65536_is_stored_as_u32() {
    let tmp = Tmp::new("wide");
    let vocab: serde_json::Map<String, serde_json::Value> = (0..70_000u32)
        .map(|i| (format!("w{i}"), i.into()))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
    });
    let tj = tmp.write("tokenizer.json", json.to_string());
    let tok = Tokenizer::from_arg(tj.to_str().unwrap()).unwrap();
    assert_eq!(tok.vocab_size(), 70_000);
    let d = prepare(
        Source::Embedded {
            name: "wide",
            text: "w69999 w1 w65536",
        },
        &tok,
        &tmp.path("cache"),
        0.0,
    )
    .unwrap();
    assert_eq!(d.train.bytes_per_token(), 4);
    assert_eq!(ids(&d.train), [69_999, 1, 65_536]);
}

#[test]
fn links_in_a_data_folder_are_followed_once() {
    let tmp = Tmp::new("links");
    tmp.write("data/x/a.txt", b"abc");
    // A link back up the tree (a loop), and a second name for the same file.
    std::os::unix::fs::symlink("..", tmp.path("data/x/back")).unwrap();
    std::os::unix::fs::symlink("x/a.txt", tmp.path("data/alias.txt")).unwrap();
    let d = tmp.prepare_bytes().unwrap();
    assert_eq!(text(&d.train, &Tokenizer::Bytes), "abc");
}

#[test]
fn a_file_name_that_is_not_utf8_is_an_error_naming_it() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = Tmp::new("utf8-name");
    tmp.write("data/ok.txt", b"abc");
    let name = std::ffi::OsStr::from_bytes(b"bad\xff.txt");
    std::fs::write(tmp.path("data").join(name), b"def").unwrap();
    let err = tmp.prepare_bytes().unwrap_err().to_string();
    assert!(err.contains("not UTF-8") && err.contains("bad"), "{err}");
}

/// A tokenization killed mid-write leaves its temporary shard (possibly hundreds of MB); the
/// next prepare removes it once untouched for a while, but not one a live process is writing.
#[test]
fn a_killed_writers_temporary_files_are_removed_from_the_cache() {
    let tmp = Tmp::new("dead-temporaries");
    tmp.write("data/a.txt", "some text");
    let dead = tmp.write("cache/.tokens-x-0000.bin.tmp4294967295.0", "x");
    let live = tmp.write(
        &format!("cache/.tokens-x-0000.bin.tmp{}.7", std::process::id()),
        "x",
    );
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for f in [&dead, &live] {
        let file = std::fs::File::options().write(true).open(f).unwrap();
        file.set_modified(hour_ago).unwrap();
    }
    tmp.prepare_bytes().unwrap();
    assert!(!dead.exists());
    assert!(live.exists());
}
