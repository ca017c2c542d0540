//! The data pipeline end to end on small fixtures: group_texts equivalence, the on-disk
//! cache (reuse, keying, one builder with waiting ranks), the Trainer's data order against
//! orders recorded from Hugging Face's Trainer, SFT label
//! masking for the three JSONL shapes, packing boundaries, and file:line errors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rsdeep_worker::data::pretrain::group_texts;
use rsdeep_worker::data::{
    IGNORE_INDEX, OrderConfig, PretrainConfig, PretrainDataset, SftConfig, SftDataset, Strategy,
    TrainOrder, poll_wait, torch_randperm,
};
use rsdeep_worker::tokenizer::{Tokenizer, train_bpe};

const FIXTURE_TEXTS: [&str; 6] = [
    "The launcher starts one worker per device and waits for the rendezvous.",
    "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。",
    "ZeRO stage 3 shards parameters, gradients and optimizer states across ranks.",
    "青山依旧在，几度夕阳红。白发渔樵江渚上，惯看秋月春风。",
    "Short.",
    "A longer document about data pipelines, tokenizers, caches and samplers that resume exactly.",
];

/// A small byte-level BPE trained on the fixture texts (eos = `<|endoftext|>`).
fn small_tokenizer(dir: &Path) -> Tokenizer {
    let corpus = dir.join("tok-corpus.txt");
    std::fs::write(&corpus, FIXTURE_TEXTS.join("\n").repeat(20)).unwrap();
    train_bpe(&[&corpus], 400, dir.join("tok")).unwrap()
}

/// A JSONL fixture of `n` documents of varying length under `field`.
fn write_corpus(path: &Path, n: usize, field: &str) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let text = FIXTURE_TEXTS[i % FIXTURE_TEXTS.len()].repeat(1 + i % 3);
            serde_json::json!({ field: format!("{i}: {text}"), "id": i }).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn config(files: Vec<PathBuf>, cache: &Path, block_size: usize) -> PretrainConfig {
    PretrainConfig {
        files,
        text_field: "text".into(),
        block_size,
        skip_bad_lines: false,
        cache_dir: cache.to_path_buf(),
        group_documents: None,
        shards: 1,
        append_eos: true,
    }
}

fn never_wait() -> rsdeep_worker::Result<()> {
    panic!("the builder must not wait")
}

#[test]
fn blocks_equal_group_texts_of_documents_with_eos() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    write_corpus(&a, 30, "text");
    write_corpus(&b, 7, "text");
    let cfg = config(vec![a.clone(), b.clone()], &dir.path().join("cache"), 16);
    let dataset = PretrainDataset::load_or_build(&cfg, &tokenizer, true, never_wait).unwrap();

    let eos = tokenizer.eos_id().unwrap();
    let mut documents = Vec::new();
    for file in [&a, &b] {
        for line in std::fs::read_to_string(file).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let mut ids = tokenizer
                .encode(v["text"].as_str().unwrap(), false)
                .unwrap();
            ids.push(eos);
            documents.push(ids);
        }
    }
    let expected = group_texts(&documents, 16);
    assert!(expected.len() > 20, "fixture spans many blocks");
    assert_eq!(dataset.len(), expected.len());
    for (i, block) in expected.iter().enumerate() {
        assert_eq!(&dataset.block(i).unwrap(), block, "block {i}");
    }
    assert_eq!(dataset.meta().num_documents, 37);
    assert!(dataset.meta().dropped_tail_tokens < 16);
    assert!(dataset.block(dataset.len()).is_err());
}

#[test]
fn cache_is_reused_and_keyed_by_content_block_size_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let corpus = dir.path().join("c.jsonl");
    write_corpus(&corpus, 20, "text");
    let cache = dir.path().join("cache");
    let first = PretrainDataset::load_or_build(
        &config(vec![corpus.clone()], &cache, 8),
        &tokenizer,
        true,
        never_wait,
    )
    .unwrap();
    assert!(!first.cache_hit());
    let second = PretrainDataset::load_or_build(
        &config(vec![corpus.clone()], &cache, 8),
        &tokenizer,
        true,
        never_wait,
    )
    .unwrap();
    assert!(second.cache_hit());
    assert_eq!(first.dir(), second.dir());
    assert_eq!(first.block(3).unwrap(), second.block(3).unwrap());

    let other_block = PretrainDataset::load_or_build(
        &config(vec![corpus.clone()], &cache, 12),
        &tokenizer,
        true,
        never_wait,
    )
    .unwrap();
    assert!(!other_block.cache_hit());
    assert_ne!(other_block.dir(), first.dir());

    write_corpus(&corpus, 21, "text");
    let changed = PretrainDataset::load_or_build(
        &config(vec![corpus.clone()], &cache, 8),
        &tokenizer,
        true,
        never_wait,
    )
    .unwrap();
    assert!(!changed.cache_hit(), "a changed file is a new cache entry");
    // Beside each entry stays its builders' `<key>.lock` file (never removed: a waiter may
    // hold it open); temporary folders do not.
    let entries = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(entries, 3, "no temporary directories are left behind");
}

#[test]
fn only_the_builder_builds_while_others_wait() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let corpus = dir.path().join("c.jsonl");
    write_corpus(&corpus, 40, "text");
    let cfg = config(vec![corpus], &dir.path().join("cache"), 8);
    let mut polls = 0;
    let waiter_result = std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            let mut wait = poll_wait(Duration::from_millis(20), Duration::from_secs(60));
            PretrainDataset::load_or_build(&cfg, &tokenizer, false, || {
                polls += 1;
                wait()
            })
        });
        std::thread::sleep(Duration::from_millis(200));
        let built = PretrainDataset::load_or_build(&cfg, &tokenizer, true, never_wait).unwrap();
        (waiter.join().unwrap(), built)
    });
    let (waited, built) = waiter_result;
    let waited = waited.unwrap();
    assert!(polls > 0, "the non-builder polled while the builder worked");
    assert_eq!(waited.dir(), built.dir());
    assert_eq!(waited.len(), built.len());
}

#[test]
fn a_builder_waits_for_another_jobs_builder_of_the_same_entry_and_uses_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let corpus = dir.path().join("c.jsonl");
    write_corpus(&corpus, 40, "text");
    let cache = dir.path().join("cache");
    let cfg = config(vec![corpus], &cache, 8);
    // Learn the entry's key from a first build, then remove the cache.
    let built = PretrainDataset::load_or_build(&cfg, &tokenizer, true, never_wait).unwrap();
    let entry = built.dir().to_path_buf();
    let (blocks, key) = (built.len(), entry.file_name().unwrap().to_owned());
    drop(built);
    std::fs::remove_dir_all(&entry).unwrap();
    // "Another job" holds the entry's lock and finishes the cache while this one waits.
    let lock_path = cache.join(format!("{}.lock", key.to_string_lossy()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    let mut held =
        Some(nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).unwrap());
    let mut waits = 0;
    let dataset = PretrainDataset::load_or_build(&cfg, &tokenizer, true, || {
        waits += 1;
        if waits == 3 {
            // The other job's cache appears, then its lock goes.
            let other = dir.path().join("other-cache");
            let other_cfg = config(cfg.files.clone(), &other, 8);
            let built = PretrainDataset::load_or_build(&other_cfg, &tokenizer, true, never_wait)
                .map_err(|e| rsdeep_worker::Error::Data(e.to_string()))?;
            std::fs::rename(built.dir(), &entry).unwrap();
            held.take();
        }
        std::thread::sleep(Duration::from_millis(10));
        Ok(())
    })
    .unwrap();
    assert!(
        waits >= 3,
        "the builder waited for the lock holder ({waits} waits)"
    );
    assert!(
        dataset.cache_hit(),
        "it used the other job's cache instead of building again"
    );
    assert_eq!(dataset.len(), blocks);
}

#[test]
fn a_waiting_rank_fails_when_the_builder_fails() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": oops}\n").unwrap();
    let cfg = config(vec![bad], &dir.path().join("cache"), 4);
    let built = PretrainDataset::load_or_build(&cfg, &tokenizer, true, never_wait);
    assert!(built.is_err());
    let mut wait = poll_wait(Duration::from_millis(10), Duration::from_secs(5));
    let err = PretrainDataset::load_or_build(&cfg, &tokenizer, false, &mut wait)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("builder rank failed") && err.contains("bad.jsonl:2:"),
        "{err}"
    );
}

#[test]
fn malformed_lines_fail_with_file_line_or_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let bad = dir.path().join("bad.jsonl");
    let mut lines: Vec<String> = (0..10)
        .map(|i| format!("{{\"text\": \"document number {i} with words\"}}"))
        .collect();
    lines[2] = "{\"text\": \"unterminated".into();
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let cache = dir.path().join("cache");
    let err = PretrainDataset::load_or_build(
        &config(vec![bad.clone()], &cache, 4),
        &tokenizer,
        true,
        never_wait,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("{}:3: EOF while parsing a string", bad.display())),
        "{err}"
    );

    let mut skipping = config(vec![bad], &cache, 4);
    skipping.skip_bad_lines = true;
    let dataset = PretrainDataset::load_or_build(&skipping, &tokenizer, true, never_wait).unwrap();
    assert_eq!(dataset.meta().skipped_lines, 1);
    assert_eq!(dataset.meta().num_documents, 9);
}

#[test]
fn missing_field_and_empty_input_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let corpus = dir.path().join("c.jsonl");
    write_corpus(&corpus, 5, "content");
    let cache = dir.path().join("cache");
    let err = PretrainDataset::load_or_build(
        &config(vec![corpus.clone()], &cache, 4),
        &tokenizer,
        true,
        never_wait,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!(
            "{}:1: missing text field \"text\"",
            corpus.display()
        )),
        "{err}"
    );

    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let err = PretrainDataset::load_or_build(
        &config(vec![empty], &cache, 4),
        &tokenizer,
        true,
        never_wait,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("empty input"), "{err}");

    write_corpus(&corpus, 5, "text");
    let err = PretrainDataset::load_or_build(
        &config(vec![corpus], &cache, 1 << 20),
        &tokenizer,
        true,
        never_wait,
    );
    assert!(
        err.unwrap_err()
            .to_string()
            .contains("fewer than one block")
    );
    assert!(rsdeep_worker::data::check_block_size(4096, 2048).is_err());
}

/// Orders recorded from the real Hugging Face Trainer (`tests/fixtures/hf_order/`).
fn recorded_orders() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_order/orders.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn torch_randperm_equals_torch() {
    let recorded = recorded_orders();
    let draws = recorded["randperm"].as_array().unwrap();
    assert!(draws.len() >= 20);
    for draw in draws {
        let (seed, n) = (draw["seed"].as_u64().unwrap(), draw["n"].as_u64().unwrap());
        let perm: Vec<usize> = serde_json::from_value(draw["perm"].clone()).unwrap();
        assert_eq!(torch_randperm(n as usize, seed), perm, "seed {seed}, n {n}");
    }
}

#[test]
fn the_order_equals_what_hf_trainer_feeds_every_rank() {
    let recorded = recorded_orders();
    let cases = recorded["cases"].as_array().unwrap();
    assert!(cases.len() >= 36);
    for case in cases {
        let number = |key: &str| case[key].as_u64().unwrap() as usize;
        let strategy = match case["strategy"].as_str().unwrap() {
            "random" => Strategy::Random,
            "sequential" => Strategy::Sequential,
            other => panic!("strategy {other}"),
        };
        let seed = case["data_seed"]
            .as_u64()
            .unwrap_or(case["seed"].as_u64().unwrap());
        let mut order = TrainOrder::new(
            OrderConfig {
                len: number("n"),
                world_size: number("world"),
                batch: number("batch"),
                grad_accum: number("grad_accum"),
                strategy,
                seed,
                drop_last: case["drop_last"].as_bool().unwrap(),
            },
            Vec::new(),
        )
        .unwrap();
        let expected: Vec<Vec<Vec<Vec<usize>>>> =
            serde_json::from_value(case["ranks"].clone()).unwrap(); // [rank][step][micro][i]
        assert_eq!(
            order.updates_per_epoch() as usize,
            number("updates_per_epoch"),
            "{case}"
        );
        let steps = expected[0].len() as u64;
        for step in 0..steps {
            let window = order.window(step);
            for (rank, windows) in expected.iter().enumerate() {
                assert_eq!(
                    window.ranks[rank],
                    windows[step as usize],
                    "rank {rank} step {step} of {}",
                    serde_json::json!({"n": case["n"], "world": case["world"], "batch": case["batch"],
                        "grad_accum": case["grad_accum"], "strategy": case["strategy"],
                        "drop_last": case["drop_last"], "data_seed": case["data_seed"], "seed": case["seed"]})
                );
            }
        }
    }
}

/// The same two-turn conversation in the three shapes.
fn write_sft_shapes(dir: &Path) -> [PathBuf; 3] {
    let messages = r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"你好"},{"role":"assistant","content":"Hello 你好"},{"role":"user","content":"Bye"},{"role":"assistant","content":"Goodbye."}]}"#;
    let sharegpt = r#"{"conversations":[{"from":"system","value":"Be brief."},{"from":"human","value":"你好"},{"from":"gpt","value":"Hello 你好"},{"from":"human","value":"Bye"},{"from":"gpt","value":"Goodbye."}]}"#;
    let alpaca = r#"{"system":"Be brief.","instruction":"你好","input":"","output":"Hello 你好"}"#;
    let paths = [
        dir.join("messages.jsonl"),
        dir.join("sharegpt.jsonl"),
        dir.join("alpaca.jsonl"),
    ];
    for (path, line) in paths.iter().zip([messages, sharegpt, alpaca]) {
        std::fs::write(path, format!("{line}\n{line}\n")).unwrap();
    }
    paths
}

/// The text of the labelled tokens, one string per contiguous labelled run.
fn labelled_runs(tokenizer: &Tokenizer, ids: &[u32], labels: &[i64]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (&id, &label) in ids.iter().zip(labels) {
        if label == IGNORE_INDEX {
            if !current.is_empty() {
                runs.push(tokenizer.decode(&current).unwrap());
                current.clear();
            }
        } else {
            assert_eq!(
                label,
                i64::from(id),
                "labels are the ids (the model shifts)"
            );
            current.push(id);
        }
    }
    if !current.is_empty() {
        runs.push(tokenizer.decode(&current).unwrap());
    }
    runs
}

#[test]
fn prompt_completion_rows_train_the_completion_and_the_switches_unmask() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let file = dir.path().join("pc.jsonl");
    let rows = [
        r#"{"prompt": "The launcher starts", "completion": " one worker per device."}"#,
        r#"{"prompt": [{"role": "user", "content": "你好"}], "completion": [{"role": "assistant", "content": "Hello 你好"}]}"#,
    ];
    std::fs::write(&file, rows.join("\n")).unwrap();
    let config = |only: bool| SftConfig {
        max_seq_length: 512,
        packing: false,
        skip_bad_lines: false,
        assistant_only_loss: only,
        completion_only_loss: only,
    };
    let masked = SftDataset::load(&[&file], &tokenizer, &config(true)).unwrap();
    let eos = tokenizer.special_tokens().eos_token.clone().unwrap();
    let text = &masked.examples[0];
    assert_eq!(
        labelled_runs(&tokenizer, &text.input_ids, &text.labels),
        vec![format!(" one worker per device.{eos}")]
    );
    let chat = &masked.examples[1];
    assert_eq!(
        labelled_runs(&tokenizer, &chat.input_ids, &chat.labels),
        vec!["Hello 你好<|im_end|>\n"]
    );
    let everything = SftDataset::load(&[&file], &tokenizer, &config(false)).unwrap();
    for example in &everything.examples {
        let ids: Vec<i64> = example.input_ids.iter().map(|&i| i64::from(i)).collect();
        assert_eq!(example.labels, ids);
    }
}

#[test]
fn sft_labels_cover_only_assistant_turns_in_all_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let [messages, sharegpt, alpaca] = write_sft_shapes(dir.path());
    let cfg = SftConfig {
        max_seq_length: 512,
        packing: false,
        skip_bad_lines: false,
        assistant_only_loss: true,
        completion_only_loss: true,
    };
    let from_messages = SftDataset::load(&[&messages], &tokenizer, &cfg).unwrap();
    let from_sharegpt = SftDataset::load(&[&sharegpt], &tokenizer, &cfg).unwrap();
    assert_eq!(from_messages.examples, from_sharegpt.examples);
    let example = &from_messages.examples[0];
    assert_eq!(
        labelled_runs(&tokenizer, &example.input_ids, &example.labels),
        vec!["Hello 你好<|im_end|>", "Goodbye.<|im_end|>"]
    );
    let rendered = tokenizer.decode(&example.input_ids).unwrap();
    assert!(
        rendered.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好")
    );

    let from_alpaca = SftDataset::load(&[&alpaca], &tokenizer, &cfg).unwrap();
    let example = &from_alpaca.examples[0];
    assert_eq!(
        labelled_runs(&tokenizer, &example.input_ids, &example.labels),
        vec!["Hello 你好<|im_end|>"]
    );

    let short = SftConfig {
        max_seq_length: 10,
        packing: false,
        skip_bad_lines: false,
        assistant_only_loss: true,
        completion_only_loss: true,
    };
    let truncated = SftDataset::load(&[&messages], &tokenizer, &short).unwrap();
    assert!(truncated.examples.iter().all(|e| e.len() == 10));
    assert_eq!(truncated.truncated, 2);
}

#[test]
fn packing_keeps_examples_whole_and_marks_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let [messages, sharegpt, alpaca] = write_sft_shapes(dir.path());
    let files = [&messages, &sharegpt, &alpaca];
    let plain = SftDataset::load(
        &files,
        &tokenizer,
        &SftConfig {
            max_seq_length: 256,
            packing: false,
            skip_bad_lines: false,
            assistant_only_loss: true,
            completion_only_loss: true,
        },
    )
    .unwrap();
    let packed = SftDataset::load(
        &files,
        &tokenizer,
        &SftConfig {
            max_seq_length: 256,
            packing: true,
            skip_bad_lines: false,
            assistant_only_loss: true,
            completion_only_loss: true,
        },
    )
    .unwrap();
    assert!(packed.examples.len() < plain.examples.len());
    let mut unpacked = Vec::new();
    for block in &packed.examples {
        assert!(block.len() <= 256);
        let segments = *block.segment_ids.last().unwrap() as usize;
        for segment in 1..=segments {
            let ids: Vec<u32> = block
                .input_ids
                .iter()
                .zip(&block.segment_ids)
                .filter(|(_, s)| **s as usize == segment)
                .map(|(i, _)| *i)
                .collect();
            let labels: Vec<i64> = block
                .labels
                .iter()
                .zip(&block.segment_ids)
                .filter(|(_, s)| **s as usize == segment)
                .map(|(l, _)| *l)
                .collect();
            unpacked.push((ids, labels));
        }
        let boundaries = block
            .segment_ids
            .windows(2)
            .filter(|w| w[0] != w[1])
            .count();
        assert_eq!(
            boundaries + 1,
            segments,
            "segments are contiguous and numbered in order"
        );
    }
    let expected: Vec<(Vec<u32>, Vec<i64>)> = plain
        .examples
        .iter()
        .map(|e| (e.input_ids.clone(), e.labels.clone()))
        .collect();
    assert_eq!(
        unpacked, expected,
        "packing only concatenates whole examples in order"
    );
}

#[test]
fn sft_bad_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = small_tokenizer(dir.path());
    let path = dir.path().join("chat.jsonl");
    let good = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#;
    std::fs::write(&path, format!("{good}\n{{\"messages\": [\n{good}\n")).unwrap();
    let strict = SftConfig {
        max_seq_length: 64,
        packing: false,
        skip_bad_lines: false,
        assistant_only_loss: true,
        completion_only_loss: true,
    };
    let err = SftDataset::load(&[&path], &tokenizer, &strict)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{}:2: EOF while parsing", path.display())),
        "{err}"
    );
    let lenient = SftConfig {
        skip_bad_lines: true,
        assistant_only_loss: true,
        completion_only_loss: true,
        ..strict
    };
    let dataset = SftDataset::load(&[&path], &tokenizer, &lenient).unwrap();
    assert_eq!((dataset.examples.len(), dataset.skipped_lines), (2, 1));
}
