//! Tokenizer parity with the Python reference: the real Qwen2-family tokenizer.json gives
//! exactly Python `tokenizers`' ids; chat templates render byte-identically to
//! transformers' `apply_chat_template`; a trained BPE loads in `AutoTokenizer` and encodes
//! identically. Needs the demo data (fetched when missing) and `$RSDEEP_PYTHON`; fails,
//! never skips, without them.

use crate::support;

use rsdeep_worker::tokenizer::{ChatMessage, Tokenizer, train_bpe};
use serde_json::json;

const QWEN25_TEMPLATE: &str = include_str!("qwen25_chat_template.jinja");

fn ids_from_json(value: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(value.clone()).expect("ids are lists of integers")
}

/// The first documents of the demo corpus, cut to a few hundred characters each.
fn corpus_texts(limit: usize) -> Vec<String> {
    let path = support::data_dir().join("pretrain.jsonl");
    let text = std::fs::read_to_string(&path).expect("pretrain.jsonl of the demo data");
    let lines: Vec<&str> = text.lines().collect();
    let step = (lines.len() / limit).max(1);
    lines
        .iter()
        .step_by(step)
        .take(limit)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("demo corpus is JSONL");
            v["text"]
                .as_str()
                .expect("text field")
                .chars()
                .take(400)
                .collect()
        })
        .collect()
}

#[test]
fn qwen_tokenizer_ids_match_python_tokenizers() {
    let dir = support::qwen_tokenizer_dir();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let mut texts = support::mixed_texts();
    texts.extend(corpus_texts(40));
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ours = tokenizer.encode_batch(&refs, false).unwrap();
    let answer = support::python_reference(&json!({
        "op": "encode",
        "tokenizer_json": dir.join("tokenizer.json"),
        "texts": texts,
    }));
    let theirs = ids_from_json(&answer["ids"]);
    assert_eq!(ours.len(), theirs.len());
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "text {i} {:?} encodes differently", texts[i]);
    }
    let total: usize = ours.iter().map(Vec::len).sum();
    assert!(
        total > 3000,
        "the corpus sample is substantial ({total} ids)"
    );
    assert_eq!(tokenizer.encode(&texts[0], false).unwrap(), theirs[0]);
    assert_eq!(tokenizer.decode(&ours[1]).unwrap(), texts[1]);
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(tokenizer.eos_id(), Some(151645));
    assert_eq!(tokenizer.pad_id(), Some(151643));
}

fn conversations() -> Vec<Vec<ChatMessage>> {
    vec![
        vec![ChatMessage::new("user", "你好，介绍一下三国演义。")],
        vec![
            ChatMessage::new("system", "You are a terse assistant."),
            ChatMessage::new("user", "What is ZeRO-3?"),
            ChatMessage::new(
                "assistant",
                "Sharding of parameters, gradients and optimizer state.",
            ),
            ChatMessage::new("user", "和 ZeRO-2 有什么区别？"),
        ],
        vec![
            ChatMessage::new("user", "Say hi"),
            ChatMessage::new(
                "assistant",
                "hi <b>&</b> 'quoted' \"double\"\n\nnew paragraph",
            ),
        ],
    ]
}

/// Requests for transformers' rendering of every conversation, with and without the
/// generation prompt (answered in that order).
fn chat_requests(dir: &std::path::Path) -> Vec<serde_json::Value> {
    [false, true]
        .iter()
        .map(|add_generation_prompt| {
            json!({
                "op": "chat",
                "dir": dir,
                "conversations": conversations(),
                "add_generation_prompt": add_generation_prompt,
            })
        })
        .collect()
}

/// Requires byte equality between our rendering and the answers to `chat_requests`.
fn assert_chat_parity(dir: &std::path::Path, answers: &[serde_json::Value]) {
    let tokenizer = Tokenizer::from_dir(dir).unwrap();
    assert_eq!(answers.len(), 2);
    for (answer, add_generation_prompt) in answers.iter().zip([false, true]) {
        let theirs: Vec<String> = serde_json::from_value(answer["texts"].clone()).unwrap();
        assert_eq!(theirs.len(), conversations().len());
        for (conversation, expected) in conversations().iter().zip(&theirs) {
            let ours = tokenizer
                .apply_chat_template(conversation, add_generation_prompt)
                .unwrap();
            assert_eq!(
                &ours, expected,
                "add_generation_prompt={add_generation_prompt}"
            );
        }
    }
}

/// Asks the Python reference for `requests` in one interpreter start.
fn python_answers(requests: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let answer = support::python_reference(&serde_json::Value::Array(requests));
    serde_json::from_value(answer).expect("a list of answers")
}

#[test]
fn qwen25_chat_template_is_byte_identical_to_transformers() {
    let qwen = support::qwen_tokenizer_dir();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        qwen.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let config_text = std::fs::read_to_string(qwen.join("tokenizer_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config_text).unwrap();
    config["chat_template"] = json!(QWEN25_TEMPLATE);
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();

    // The same template as transformers 5 saves it: a chat_template.jinja file.
    let jinja_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        qwen.join("tokenizer.json"),
        jinja_dir.path().join("tokenizer.json"),
    )
    .unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(
        jinja_dir.path().join("tokenizer_config.json"),
        config.to_string(),
    )
    .unwrap();
    std::fs::write(
        jinja_dir.path().join("chat_template.jinja"),
        QWEN25_TEMPLATE,
    )
    .unwrap();

    let mut requests = chat_requests(dir.path());
    requests.extend(chat_requests(jinja_dir.path()));
    let answers = python_answers(requests);
    assert_chat_parity(dir.path(), &answers[..2]);
    assert_chat_parity(jinja_dir.path(), &answers[2..]);
    assert_eq!(
        answers[..2],
        answers[2..],
        "both spellings give transformers the same template"
    );
    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let text = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn shipped_qwen3_chat_template_is_byte_identical_to_transformers() {
    let dir = support::qwen_tokenizer_dir();
    assert_chat_parity(&dir, &python_answers(chat_requests(&dir)));
}

#[test]
fn trained_bpe_loads_in_auto_tokenizer_and_encodes_identically() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let mut text = support::mixed_texts().join("\n");
    text.push('\n');
    text.push_str(&corpus_texts(60).join("\n"));
    std::fs::write(&corpus, text).unwrap();
    let out = dir.path().join("tok");
    let tokenizer = train_bpe(&[&corpus], 1000, &out).unwrap();
    assert_eq!(tokenizer.vocab_size(), 1000);
    let texts = support::mixed_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ours = tokenizer.encode_batch(&refs, true).unwrap();
    let mut requests = vec![json!({"op": "auto_encode", "dir": out, "texts": texts})];
    requests.extend(chat_requests(&out));
    let answers = python_answers(requests);
    assert_eq!(ours, ids_from_json(&answers[0]["ids"]));
    assert_eq!(answers[0]["eos"], json!(tokenizer.eos_id()));
    assert_eq!(answers[0]["pad"], json!(tokenizer.pad_id()));
    assert_chat_parity(&out, &answers[1..]);
}
