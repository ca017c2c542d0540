//! The generation front end on a real (tiny, trained here) byte-level BPE tokenizer:
//! `TextStreamer` writes exactly the decoded text, never a partial UTF-8 sequence, and
//! `generate_cli` runs plain and chat prompts (with and without a PEFT adapter) on a
//! saved model folder. Contract: `generate/mod.rs`.

use rsdeep_worker::generate::{TextStreamer, generate_cli};
use rsdeep_worker::lora::{LoraConfig, apply_lora, lora_state, save_adapter};
use rsdeep_worker::model::{CausalLm, ModelConfig, ModelType};
use rsdeep_worker::tokenizer::{Tokenizer, train_bpe};
use tch::{Device, Kind, Tensor};

const TEXT: &str = "héllo wörld, 世界 and 😀 again: hello world.\n";

fn trained_tokenizer(dir: &std::path::Path) -> Tokenizer {
    let corpus = dir.join("corpus.txt");
    std::fs::write(
        &corpus,
        TEXT.repeat(20) + "plain ascii text for the merges\n",
    )
    .unwrap();
    train_bpe(&[&corpus], 300, dir).unwrap()
}

#[test]
fn streamer_prints_whole_characters_only() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = trained_tokenizer(dir.path());
    let ids = tokenizer.encode("é 世界 😀 ok", false).unwrap();
    let mut streamer = TextStreamer::new(&tokenizer, Vec::<u8>::new());
    for &id in &ids {
        streamer.push(id).unwrap();
    }
    streamer.finish().unwrap();
    let written = String::from_utf8(streamer.into_inner()).expect("only complete UTF-8");
    assert_eq!(written, tokenizer.decode(&ids).unwrap());
    assert!(!written.contains('\u{FFFD}'), "{written:?}");
    assert!(
        ids.len() > written.chars().count() / 2,
        "multi-byte chars span several ids"
    );
}

#[test]
fn generate_cli_runs_plain_chat_and_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = trained_tokenizer(dir.path());
    let vocab = tokenizer.vocab_size();
    let config = ModelConfig::new(ModelType::Qwen2, vocab, 32, 64, 2, 4, 2);
    let mut model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 5).unwrap();
    model
        .save_pretrained(dir.path(), 1 << 30, Kind::Float)
        .unwrap();
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into()],
        use_rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        prefix_tuning: None,
        bottleneck: None,
    };
    apply_lora(&mut model, &cfg, 1).unwrap();
    let named: Vec<(String, Tensor)> = model
        .params()
        .map(|p| (p.name.clone(), p.tensor.detach()))
        .collect();
    let adapter = dir.path().join("adapter");
    save_adapter(&adapter, &cfg, "tiny", &lora_state(&named)).unwrap();
    let model_dir = dir.path().display().to_string();
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "--model",
            &model_dir,
            "--prompt",
            "hello",
            "--max_new_tokens",
            "6",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        generate_cli(&args)
    };
    run(&[]).unwrap();
    run(&[
        "--chat",
        "--system",
        "be brief",
        "--temperature",
        "0.8",
        "--top_p",
        "0.9",
        "--top_k",
        "20",
    ])
    .unwrap();
    run(&["--adapter", &adapter.display().to_string()]).unwrap();
    assert!(run(&["--top_p", "0"]).is_err(), "invalid top_p is refused");
    assert!(
        run(&["--device", "tpu"]).is_err(),
        "unknown device is refused"
    );
}
