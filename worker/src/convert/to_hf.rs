//! A GGUF model as a Hugging Face folder: `config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`, `generation_config.json` — what
//! transformers' own GGUF loader builds from the same file (checked by
//! `tests/fixtures/gguf/check_convert.py`).
//!
//! Contract:
//! - Architectures: `llama` (LlamaForCausalLM; llama.cpp's Q/K row permutation undone:
//!   within each head of `head_dim` rows, GGUF row 2i + a is HF row a·head_dim/2 + i, Q over
//!   the attention heads, K over the KV heads) and `qwen2` (Qwen2ForCausalLM, q/k/v biases,
//!   not permuted). Others are an error naming the architecture.
//! - Tensor names: `token_embd` → `model.embed_tokens`, `output_norm` → `model.norm`,
//!   `output` → `lm_head` (absent: tied embeddings), `blk.N.{attn_norm, attn_q, attn_k,
//!   attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}` → `model.layers.N.{
//!   input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,
//!   down}_proj}`; shapes are the GGUF dimensions reversed. Weights are dequantized to
//!   f32 (`dequant.rs`) and written as f32 or, with `--dtype bf16`, bf16.
//! - Tokenizer (`tokenizer.ggml.model = gpt2` with GPT-2's split, i.e. a
//!   `tokenizer.ggml.pre` transformers gives no regex of its own, like `smollm`): a
//!   byte-level BPE of the file's tokens
//!   (respelled into the byte alphabet where a token is not already written in it) and
//!   merges; control tokens (type 3) become special added tokens, user-defined ones (4)
//!   plain added tokens; bos/eos/unk/pad and the chat template from the metadata.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value as Json, json};
use tch::{Kind, Tensor};

use super::dequant::{byte_len, dequantize};
use super::gguf::GgufFile;
use crate::error::{Error, Result};
use crate::model::io::save_safetensors_sharded;

/// Largest safetensors shard written (transformers 5's default).
const MAX_SHARD_BYTES: u64 = 50 << 30;
/// `tokenizer.ggml.pre` values for which transformers replaces GPT-2's split with a
/// model-specific regex (its `GGUF_PRE_TOKENIZER_SPLITS`); this build rebuilds GPT-2's.
const CUSTOM_SPLITS: [&str; 23] = [
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
    "tekken",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "qwen35",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "minimax-m2",
];
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// The model families this converter knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    Qwen2,
}

impl Family {
    fn of(file: &GgufFile) -> Result<Self> {
        match file.get_str("general.architecture")? {
            "llama" => Ok(Family::Llama),
            "qwen2" => Ok(Family::Qwen2),
            other => Err(Error::Model(format!(
                "{}: architecture \"{other}\" is not converted by this build (llama and qwen2 are)",
                file.path().display()
            ))),
        }
    }

    fn key(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }
}

/// The attention shape the Q/K permutation and config.json need.
struct Shape {
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
}

/// Converts `file` into the Hugging Face folder `out`, weights stored as `dtype`
/// (f32 or bf16). Returns the number of tensors written.
pub fn convert(file: &GgufFile, out: &Path, dtype: Kind) -> Result<usize> {
    let family = Family::of(file)?;
    check_tokenizer(file)?;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    let shape = attention_shape(file, family)?;
    let mut tensors = Vec::with_capacity(file.tensors.len());
    for info in &file.tensors {
        let Some(name) = hf_name(&info.name) else {
            return Err(Error::Model(format!(
                "{}: tensor {} has no Hugging Face name in this converter",
                file.path().display(),
                info.name
            )));
        };
        let values = dequantize(info, file.tensor_bytes(info, byte_len(info)?)?)?;
        let mut tensor = Tensor::from_slice(&values).f_reshape(info.hf_shape())?;
        if family == Family::Llama {
            tensor = unpermute_rope_rows(tensor, &name, &shape)?;
        }
        tensors.push((name, tensor.f_to_kind(dtype)?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    save_safetensors_sharded(&tensors, out, MAX_SHARD_BYTES)?;
    let tied = file.tensor("output.weight").is_none();
    write_json(
        &out.join("config.json"),
        &config_json(file, family, &shape, tied, dtype)?,
    )?;
    write_tokenizer(file, out)?;
    Ok(tensors.len())
}

fn attention_shape(file: &GgufFile, family: Family) -> Result<Shape> {
    let key = |k: &str| format!("{}.{k}", family.key());
    let heads = file.get_u64(&key("attention.head_count"))?;
    let kv_heads = file
        .get_u64(&key("attention.head_count_kv"))
        .unwrap_or(heads);
    let hidden = file.get_u64(&key("embedding_length"))?;
    let head_dim = file
        .get_u64(&key("attention.key_length"))
        .unwrap_or(hidden / heads.max(1));
    Ok(Shape {
        heads,
        kv_heads,
        head_dim,
    })
}

/// The Hugging Face name of a GGUF tensor.
fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's rope permutation of a Q or K weight (other tensors unchanged).
fn unpermute_rope_rows(tensor: Tensor, name: &str, shape: &Shape) -> Result<Tensor> {
    let heads = if name.ends_with("self_attn.q_proj.weight") {
        shape.heads
    } else if name.ends_with("self_attn.k_proj.weight") {
        shape.kv_heads
    } else {
        return Ok(tensor);
    };
    let (rows, cols) = (tensor.size()[0], tensor.size()[1]);
    let half = shape.head_dim as i64 / 2;
    // (heads·head_dim, in) -> (heads, half, 2, in): GGUF row 2i + a of a head.
    let permuted = tensor.f_reshape([heads as i64, half, 2, cols])?;
    // -> (heads, 2, half, in): HF row a·half + i.
    Ok(permuted
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape([rows, cols])?)
}

fn config_json(
    file: &GgufFile,
    family: Family,
    shape: &Shape,
    tied: bool,
    dtype: Kind,
) -> Result<Json> {
    let key = |k: &str| format!("{}.{k}", family.key());
    let vocab = match file.get_u64(&key("vocab_size")) {
        Ok(size) => size,
        Err(_) => file.get_strings("tokenizer.ggml.tokens")?.len() as u64,
    };
    let token_id = |k: &str| file.get_u64(&format!("tokenizer.ggml.{k}")).ok();
    let architecture = match family {
        Family::Llama => "LlamaForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
    };
    let mut config = json!({
        "architectures": [architecture],
        "model_type": family.key(),
        "hidden_size": file.get_u64(&key("embedding_length"))?,
        "intermediate_size": file.get_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": file.get_u64(&key("block_count"))?,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": file.get_u64(&key("context_length"))?,
        "rms_norm_eps": file.get_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
        "rope_theta": file.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
        "torch_dtype": if dtype == Kind::BFloat16 { "bfloat16" } else { "float32" },
    });
    if family == Family::Llama {
        config["attention_bias"] = false.into();
        config["mlp_bias"] = false.into();
    }
    Ok(config)
}

/// An error unless this build rebuilds the file's tokenizer (checked before anything is
/// written).
fn check_tokenizer(file: &GgufFile) -> Result<()> {
    let kind = file.get_str("tokenizer.ggml.model")?;
    if kind != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "{}: tokenizer \"{kind}\" is not converted by this build (byte-level BPE, \"gpt2\", is)",
            file.path().display()
        )));
    }
    if let Ok(pre) = file.get_str("tokenizer.ggml.pre")
        && CUSTOM_SPLITS.contains(&pre)
    {
        return Err(Error::Tokenizer(format!(
            "{}: tokenizer.ggml.pre = \"{pre}\" splits text with its own regex, which this \
             build does not rebuild (it rebuilds GPT-2's split): use the model's original \
             tokenizer.json",
            file.path().display()
        )));
    }
    Ok(())
}

/// tokenizer.json, tokenizer_config.json and generation_config.json.
fn write_tokenizer(file: &GgufFile, out: &Path) -> Result<()> {
    let tokens = file.get_strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = match file.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .unwrap_or(&[])
            .iter()
            .filter_map(|t| t.as_u64())
            .collect(),
        None => Vec::new(),
    };
    let merges = file.get_strings("tokenizer.ggml.merges")?;
    let tokenizer = byte_level_bpe(&tokens, &types, &merges)?;
    write_json(&out.join("tokenizer.json"), &tokenizer)?;
    let id = |k: &str| file.get_u64(&format!("tokenizer.ggml.{k}")).ok();
    let token = |k: &str| id(k).and_then(|i| tokens.get(i as usize).map(|t| t.to_string()));
    let flag = |k: &str| {
        file.metadata
            .get(&format!("tokenizer.ggml.{k}"))
            .and_then(|v| v.as_bool())
    };
    let mut config = json!({
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": flag("add_bos_token").unwrap_or(false),
        "add_eos_token": flag("add_eos_token").unwrap_or(false),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": false,
    });
    if let Ok(template) = file.get_str("tokenizer.chat_template") {
        config["chat_template"] = template.into();
    }
    write_json(&out.join("tokenizer_config.json"), &config)?;
    let generation = json!({
        "bos_token_id": id("bos_token_id"),
        "eos_token_id": id("eos_token_id"),
        "pad_token_id": id("padding_token_id"),
    });
    write_json(&out.join("generation_config.json"), &generation)
}

/// The tokenizer.json of a byte-level BPE over `tokens` and `merges`.
fn byte_level_bpe(tokens: &[&str], types: &[u64], merges: &[&str]) -> Result<Json> {
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let respell = |t: &str| -> String {
        if in_alphabet(t) {
            t.to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        }
    };
    let mut vocab = serde_json::Map::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(respell(token), id.into());
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            json!([a, b])
        })
        .collect();
    let mut added: BTreeMap<usize, Json> = BTreeMap::new();
    for (id, (token, &kind)) in tokens.iter().zip(types).enumerate() {
        let special = match kind {
            TOKEN_TYPE_CONTROL if in_alphabet(token) => true,
            TOKEN_TYPE_USER_DEFINED => false,
            _ => continue,
        };
        added.insert(
            id,
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": !special, "special": special}),
        );
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.into_values().collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    }))
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others
/// for the characters from U+0100 on, in byte order.
fn byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Model(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(
            hf_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight").as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn rope_rows_are_put_back_per_head() {
        // One head of 4 rows (half = 2): GGUF rows [r0, r2, r1, r3] in HF terms.
        let shape = Shape {
            heads: 1,
            kv_heads: 1,
            head_dim: 4,
        };
        let gguf = Tensor::from_slice(&[0f32, 2., 1., 3.]).reshape([4, 1]);
        let hf =
            unpermute_rope_rows(gguf, "model.layers.0.self_attn.q_proj.weight", &shape).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(hf.reshape([-1])).unwrap(),
            vec![0., 1., 2., 3.]
        );
    }

    /// A GGUF v3 file holding only string metadata and no tensors.
    fn strings_only_gguf(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((entries.len() as u64).to_le_bytes());
        for (key, value) in entries {
            string(&mut b, key);
            b.extend(8u32.to_le_bytes());
            string(&mut b, value);
        }
        b
    }

    #[test]
    fn an_unbuilt_tokenizer_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        for (pre, kind, expected) in [
            ("qwen2", "gpt2", "tokenizer.ggml.pre = \"qwen2\""),
            ("default", "llama", "tokenizer \"llama\" is not converted"),
        ] {
            let path = dir.path().join(format!("{pre}-{kind}.gguf"));
            let entries = [
                ("general.architecture", "llama"),
                ("tokenizer.ggml.model", kind),
                ("tokenizer.ggml.pre", pre),
            ];
            std::fs::write(&path, strings_only_gguf(&entries)).unwrap();
            let file = GgufFile::open(&path).unwrap();
            let out = dir.path().join(format!("out-{pre}"));
            let err = convert(&file, &out, Kind::Float).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(
                !out.exists(),
                "a refused conversion created {}",
                out.display()
            );
        }
    }

    #[test]
    fn the_byte_alphabet_is_gpt2_s() {
        let alphabet = byte_alphabet();
        assert_eq!(alphabet[b'a' as usize], 'a');
        assert_eq!(alphabet[b' ' as usize], 'Ġ');
        assert_eq!(alphabet[b'\n' as usize], 'Ċ');
        assert_eq!(alphabet.len(), 256);
    }
}
