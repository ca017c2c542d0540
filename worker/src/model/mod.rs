//! Causal language models as the engine sees them: an ordered list of blocks (embedding,
//! decoder layers, final norm + head), each owning named leaf parameters with Hugging Face
//! names. The contract for the engine is `Block`, `Param`, `ForwardCtx` and `CausalLm`
//! below; numerics match transformers 5.x Qwen2 / Llama (SDPA backend) — see
//! `worker/tests/model_parity.rs`.
//!
//! Engine contract:
//! - `CausalLm::blocks` is `[Embedding, DecoderLayer 0..L, Head]`. Each block's `params()`
//!   are leaf tensors (`requires_grad` true) with HF names. Blocks read their weights from
//!   exactly these tensor handles at every forward, so the engine may swap storage in place
//!   (`set_data`, `copy_`) to gather/free parameters (ZeRO-3).
//! - Tied embeddings (`CausalLm::tied_to_embedding()`): the `Head` multiplies by the
//!   embedding's `model.embed_tokens.weight` handle but does NOT list it in its `params()`
//!   (the `Embedding` block owns it, and its gradient accumulates there from both uses).
//!   For the head's forward/backward the engine must have the embedding weight gathered.
//! - RoPE is model state shared by the decoder layers (inverse frequencies cached per
//!   device, cos/sin derived from `ForwardCtx::position_ids`), not parameters.
//! - `ForwardCtx::build` makes positions and the attention mask for a batch (padding,
//!   packed segments); `causal_lm_loss` is HF's loss (shift inside, ignore -100, fp32).
//! - LoRA (`crate::lora`): `DecoderLayer::attach_lora` appends `lora_A`/`lora_B` (and
//!   DoRA's `lora_magnitude_vector`) params after a layer's base params; frozen base
//!   params have `requires_grad` false. Prefix tuning and bottleneck adapters attach the
//!   same way (`attach_prefix`, `attach_bottleneck`).
//! - Profiling: `flops.rs` counts a forward's MACs and FLOPs per Hugging Face module as
//!   DeepSpeed's flops profiler does; while `forward_clock` records, the blocks time
//!   their forward per module.
//! - Decoding: `CausalLm::forward_cached` with a `KvCache` (one `LayerKv` per decoder
//!   layer) runs a prompt chunk or single token, positions continuing the cache.

mod bottleneck;
mod config;
mod ctx;
pub mod flops;
pub mod forward_clock;
mod fused_head;
pub(crate) mod io;
mod layers;
mod manual_layer;
mod rope;

pub use bottleneck::{BottleneckStyle, BottleneckTensors};
pub use config::{ModelConfig, ModelType, RopeScaling, RopeSpec, kind_from_name, kind_name};
pub use ctx::{IGNORE_INDEX, causal_lm_loss, causal_lm_loss_over, count_loss_tokens};
pub use fused_head::FusedHeadOutput;
pub use io::{INDEX_FILE, SINGLE_FILE, SafetensorsFolder, save_safetensors_sharded};
pub use layers::{
    DECODER_LINEARS, DecoderLayer, Embedding, Head, InitKind, LayerKv, LoraTensors, ParamSource,
    dora_row_norms, rms_norm,
};
pub use manual_layer::LayerSaved;
pub use rope::{Rotary, apply_rotary, inverse_frequencies};

use crate::{Error, Result};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A trainable (or frozen) leaf tensor and its Hugging Face name, e.g.
/// `model.layers.0.self_attn.q_proj.weight`.
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
}

/// What every block's forward needs besides its input: positions, masks. Build it with
/// `ForwardCtx::causal` or `ForwardCtx::build`.
pub struct ForwardCtx {
    /// (B, T) int64 position ids.
    pub position_ids: Tensor,
    /// Optional (B, 1, T, T) boolean mask, true = may attend (padding/packing); None =
    /// plain causal attention.
    pub attention_mask: Option<Tensor>,
}

/// One unit the engine gathers, runs, recomputes and reduces.
pub trait Block: Send {
    /// The parameters this block owns, in a fixed order.
    fn params(&self) -> &[Param];
    /// Embedding: (B, T) int64 ids -> (B, T, H). Decoder: (B, T, H) -> (B, T, H).
    /// Head: (B, T, H) -> (B, T, V) logits.
    fn forward(&self, input: &Tensor, ctx: &ForwardCtx) -> Result<Tensor>;
    /// This block as a decoder layer (LoRA injection, KV-cached decoding); None otherwise.
    fn as_decoder_layer(&self) -> Option<&DecoderLayer> {
        None
    }
    /// Mutable form of `as_decoder_layer`.
    fn as_decoder_layer_mut(&mut self) -> Option<&mut DecoderLayer> {
        None
    }
    /// This block as the head (the fused loss path of `fused_head.rs`); None otherwise.
    fn as_head(&self) -> Option<&Head> {
        None
    }
}

/// Per-layer key/value caches for incremental decoding (`CausalLm::forward_cached`).
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache for `model`.
    pub fn new(model: &CausalLm) -> Self {
        let layers = (0..model.config.num_hidden_layers)
            .map(|_| LayerKv::default())
            .collect();
        KvCache { layers }
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Qwen2 or Llama causal LM as an ordered list of blocks.
pub struct CausalLm {
    pub config: ModelConfig,
    /// `[Embedding, DecoderLayer x num_hidden_layers, Head]`.
    pub blocks: Vec<Box<dyn Block>>,
    device: Device,
    kind: Kind,
}

/// Name suffixes that old checkpoints carry but that are recomputed, not loaded.
const IGNORED_SUFFIXES: &[&str] = &["rotary_emb.inv_freq"];

fn check_kind(kind: Kind) -> Result<()> {
    match kind {
        Kind::Float | Kind::BFloat16 | Kind::Half => Ok(()),
        other => Err(Error::Model(format!(
            "parameters must be float32, bfloat16 or float16, not {other:?}"
        ))),
    }
}

/// Makes `t` a contiguous leaf on `device` in `kind` that requires grad.
fn into_leaf(t: Tensor, device: Device, kind: Kind) -> Result<Tensor> {
    let t = t
        .f_to_device(device)?
        .f_to_kind(kind)?
        .f_contiguous()?
        .f_detach()?;
    Ok(t.f_set_requires_grad(true)?)
}

/// HF `_init_weights`: normal(0, initializer_range) weights, zero biases, unit norms, and
/// a zero `pad_token_id` row in the embedding. Drawn in fp32 on the CPU so a seed gives
/// the same model on every device.
struct InitSource {
    std: f64,
    pad_token_id: Option<i64>,
    device: Device,
    kind: Kind,
}

impl ParamSource for InitSource {
    fn take(&mut self, name: &str, shape: &[i64], init: InitKind) -> Result<Tensor> {
        let options = (Kind::Float, Device::Cpu);
        let tensor = match init {
            InitKind::Normal => {
                let mut t = Tensor::f_empty(shape, options)?;
                let _ = t.f_normal_(0.0, self.std)?;
                t
            }
            InitKind::Zeros => Tensor::f_zeros(shape, options)?,
            InitKind::Ones => Tensor::f_ones(shape, options)?,
        };
        if let (Embedding::WEIGHT, Some(pad)) = (name, self.pad_token_id) {
            let _ = tensor.f_get(pad)?.f_zero_()?;
        }
        into_leaf(tensor, self.device, self.kind)
    }
}

/// Takes tensors from a checkpoint folder, collecting every missing name and shape
/// mismatch so one error can list them all.
struct FolderSource<'a> {
    folder: &'a SafetensorsFolder,
    device: Device,
    kind: Kind,
    used: BTreeSet<String>,
    problems: Vec<String>,
}

impl ParamSource for FolderSource<'_> {
    fn take(&mut self, name: &str, shape: &[i64], _init: InitKind) -> Result<Tensor> {
        self.used.insert(name.to_string());
        if !self.folder.contains(name) {
            self.problems.push(format!("missing {name}"));
            return Ok(Tensor::f_zeros(shape, (self.kind, self.device))?);
        }
        let tensor = self.folder.load(name)?;
        if tensor.size() != shape {
            self.problems.push(format!(
                "{name} has shape {:?}, config wants {shape:?}",
                tensor.size()
            ));
            return Ok(Tensor::f_zeros(shape, (self.kind, self.device))?);
        }
        into_leaf(tensor, self.device, self.kind)
    }
}

impl CausalLm {
    /// Stores every decoder linear in bitsandbytes' 4-bit format (a QLoRA base; see
    /// `DecoderLayer::quantize_linears`).
    pub fn quantize_linears(&mut self, config: crate::quant::QuantConfig) -> Result<()> {
        for layer in self.decoder_layers_mut() {
            layer.quantize_linears(config)?;
        }
        Ok(())
    }

    /// A freshly initialised model (HF-style init, seeded with `seed` through
    /// `tch::manual_seed`). The same seed gives the same weights as long as nothing else
    /// in the process draws from libtorch's global generator meanwhile (concurrent
    /// `from_config` calls are serialised).
    pub fn from_config(config: ModelConfig, device: Device, kind: Kind, seed: u64) -> Result<Self> {
        Self::from_config_streaming(config, device, kind, seed, &mut |_| Ok(()))
    }

    /// `from_config` handing each block to `on_block` as soon as it is made, before the
    /// next one is drawn (the same weights as `from_config`). `on_block` may re-point or
    /// empty the block's parameter storage (a ZeRO engine partitioning it), so the whole
    /// model never exists at once. It runs under the process-wide init lock: it must not
    /// wait for another thread that builds a model (no collectives with in-process ranks).
    pub fn from_config_streaming(
        config: ModelConfig,
        device: Device,
        kind: Kind,
        seed: u64,
        on_block: &mut dyn FnMut(&mut dyn Block) -> Result<()>,
    ) -> Result<Self> {
        config.validate()?;
        check_kind(kind)?;
        static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _serialised = INIT_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tch::manual_seed(seed as i64);
        let mut source = InitSource {
            std: config.initializer_range,
            pad_token_id: config.pad_token_id,
            device,
            kind,
        };
        Self::assemble(config, device, kind, &mut source, on_block)
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (or the sharded index) onto
    /// `device` as `kind`. Missing, mis-shaped and unexpected tensors are an error that
    /// lists them; a tied model may lack `lm_head.weight` (a present one is ignored).
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::from_pretrained_streaming(dir, device, kind, &mut |_| Ok(()))
    }

    /// `from_pretrained` handing each block to `on_block` as soon as it is loaded (see
    /// `from_config_streaming`). Tensors are copied out of the memory-mapped files one at
    /// a time, so with a partitioning `on_block` at most one block is held in full.
    pub fn from_pretrained_streaming(
        dir: &Path,
        device: Device,
        kind: Kind,
        on_block: &mut dyn FnMut(&mut dyn Block) -> Result<()>,
    ) -> Result<Self> {
        check_kind(kind)?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let folder = SafetensorsFolder::open(dir)?;
        let mut source = FolderSource {
            folder: &folder,
            device,
            kind,
            used: BTreeSet::new(),
            problems: Vec::new(),
        };
        let model = Self::assemble(config, device, kind, &mut source, on_block)?;
        let tied = model.tied_to_embedding();
        let unexpected = folder.names().filter(|name| {
            let expected = source.used.contains(*name)
                || (tied && *name == Head::LM_HEAD)
                || IGNORED_SUFFIXES.iter().any(|s| name.ends_with(s));
            !expected
        });
        let mut problems = source.problems;
        problems.extend(unexpected.map(|name| format!("unexpected {name}")));
        if !problems.is_empty() {
            return Err(Error::Model(format!(
                "checkpoint {} does not match its config: {}",
                dir.display(),
                problems.join(", ")
            )));
        }
        Ok(model)
    }

    /// Builds the blocks in order, calling `on_block` on each before the next is made.
    fn assemble(
        config: ModelConfig,
        device: Device,
        kind: Kind,
        source: &mut dyn ParamSource,
        on_block: &mut dyn FnMut(&mut dyn Block) -> Result<()>,
    ) -> Result<Self> {
        let rotary = Arc::new(Rotary::new(&config.rope_spec()?, config.head_dim())?);
        let mut embedding = Embedding::new(&config, source)?;
        on_block(&mut embedding)?;
        // A handle on the embedding's tensor: it follows whatever storage `on_block` set.
        let tied_weight = config
            .tie_word_embeddings
            .then(|| embedding.weight_handle());
        let mut blocks: Vec<Box<dyn Block>> = vec![Box::new(embedding)];
        for index in 0..config.num_hidden_layers {
            let mut layer = DecoderLayer::new(&config, index, rotary.clone(), source)?;
            on_block(&mut layer)?;
            blocks.push(Box::new(layer));
        }
        let mut head = Head::new(&config, tied_weight, source)?;
        on_block(&mut head)?;
        blocks.push(Box::new(head));
        Ok(CausalLm {
            config,
            blocks,
            device,
            kind,
        })
    }

    /// True when the head multiplies by the embedding's weight (which only the embedding
    /// block lists): the engine must have it gathered for the head's forward/backward.
    pub fn tied_to_embedding(&self) -> bool {
        self.config.tie_word_embeddings
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The parameters' dtype at construction.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Every parameter once, in block order (HF `named_parameters` order).
    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.blocks.iter().flat_map(|b| b.params().iter())
    }

    /// Total number of parameter elements (tied weights counted once).
    pub fn num_parameters(&self) -> i64 {
        self.params().map(|p| p.tensor.numel() as i64).sum()
    }

    /// Runs every block: ids (B, T) -> logits (B, T, V).
    pub fn forward(&self, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut hidden = ids.shallow_clone();
        for block in &self.blocks {
            hidden = block.forward(&hidden, ctx)?;
        }
        Ok(hidden)
    }

    /// Runs the model on `ids` (B, T) continuing `cache` (positions start at its length;
    /// no padding): logits (B, T, V). The new keys/values are appended to `cache`.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let size = ids.size();
        if size.len() != 2 || cache.layers.len() != self.config.num_hidden_layers {
            return Err(Error::Model(format!(
                "forward_cached wants ids (B, T) and a cache built for this model, got {size:?}"
            )));
        }
        if cache.is_empty() {
            // Prefix tuning: the prefix is the cache's first N positions.
            let layers = self.blocks.iter().filter_map(|b| b.as_decoder_layer());
            for (layer, layer_cache) in layers.zip(cache.layers.iter_mut()) {
                if let Some((keys, values)) = layer.prefix_keys_values(size[0])? {
                    layer_cache.seed(keys, values)?;
                }
            }
        }
        let past = cache.len();
        let positions = Tensor::f_arange_start(past, past + size[1], (Kind::Int64, ids.device()))?
            .f_unsqueeze(0)?
            .f_expand([size[0], size[1]], false)?
            .f_contiguous()?; // (B, T)
        let ctx = ForwardCtx {
            position_ids: positions,
            attention_mask: None,
        };
        let mut hidden = ids.shallow_clone();
        let mut layer_caches = cache.layers.iter_mut();
        for block in &self.blocks {
            hidden = match block.as_decoder_layer() {
                Some(layer) => {
                    let layer_cache = layer_caches
                        .next()
                        .ok_or_else(|| Error::Model("KV cache has too few layers".into()))?;
                    layer.forward_cached(&hidden, &ctx, layer_cache)?
                }
                None => block.forward(&hidden, &ctx)?,
            };
        }
        Ok(hidden)
    }

    /// The decoder layers, mutably (LoRA injection and merging).
    pub fn decoder_layers_mut(&mut self) -> impl Iterator<Item = &mut DecoderLayer> {
        self.blocks
            .iter_mut()
            .filter_map(|b| b.as_decoder_layer_mut())
    }

    /// The decoder layers.
    pub fn decoder_layers(&self) -> impl Iterator<Item = &DecoderLayer> {
        self.blocks.iter().filter_map(|b| b.as_decoder_layer())
    }

    /// Writes `config.json` and the weights (as `dtype`) in HF layout; shards above
    /// `max_shard_bytes`. A tied model saves no `lm_head.weight`, like transformers.
    pub fn save_pretrained(&self, dir: &Path, max_shard_bytes: u64, dtype: Kind) -> Result<()> {
        check_kind(dtype)?;
        let named: Vec<(String, Tensor)> = self
            .params()
            .map(|p| Ok((p.name.clone(), p.tensor.f_detach()?.f_to_kind(dtype)?)))
            .collect::<Result<_>>()?;
        save_safetensors_sharded(&named, dir, max_shard_bytes)?;
        self.save_config(dir, dtype)
    }

    /// Writes `dir/config.json` declaring `dtype`, atomically.
    pub fn save_config(&self, dir: &Path, dtype: Kind) -> Result<()> {
        let mut config = self.config.clone();
        config.set_declared_kind(dtype)?;
        if config.architectures.is_none() {
            config.architectures = Some(vec![config.model_type.causal_lm_architecture().into()]);
        }
        let path = dir.join("config.json");
        let temp = dir.join(".config.json.tmp");
        std::fs::write(&temp, config.to_json_string()? + "\n")
            .map_err(|e| Error::io(format!("writing {}", temp.display()), e))?;
        std::fs::rename(&temp, &path)
            .map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(model_type: ModelType, kv_heads: usize, tied: bool) -> ModelConfig {
        let mut config = ModelConfig::new(model_type, 96, 32, 48, 2, 4, kv_heads);
        config.tie_word_embeddings = tied;
        config.initializer_range = 0.05;
        config
    }

    #[test]
    fn blocks_and_names_follow_hf_layout() {
        let model = CausalLm::from_config(
            tiny(ModelType::Qwen2, 2, false),
            Device::Cpu,
            Kind::Float,
            1,
        )
        .unwrap();
        assert_eq!(model.blocks.len(), 4);
        let names: Vec<&str> = model.blocks[1]
            .params()
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names[0], "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(names[1], "model.layers.0.self_attn.q_proj.bias");
        assert!(names.contains(&"model.layers.0.mlp.down_proj.weight"));
        assert!(names.contains(&"model.layers.0.post_attention_layernorm.weight"));
        assert!(!names.contains(&"model.layers.0.self_attn.o_proj.bias"));
        let head: Vec<&str> = model.blocks[3]
            .params()
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(head, vec!["model.norm.weight", "lm_head.weight"]);
        let k = &model.blocks[1].params()[2].tensor;
        assert_eq!(k.size(), vec![16, 32], "GQA: 2 kv heads x head_dim 8");
        assert!(
            model
                .params()
                .all(|p| p.tensor.requires_grad() && p.tensor.is_leaf())
        );
    }

    #[test]
    fn init_is_seeded_and_hf_shaped() {
        let config = tiny(ModelType::Llama, 4, true);
        let a = CausalLm::from_config(config.clone(), Device::Cpu, Kind::Float, 7).unwrap();
        let b = CausalLm::from_config(config.clone(), Device::Cpu, Kind::Float, 7).unwrap();
        let c = CausalLm::from_config(config, Device::Cpu, Kind::Float, 8).unwrap();
        let first = |m: &CausalLm| m.params().next().unwrap().tensor.shallow_clone();
        assert!(first(&a).equal(&first(&b)));
        assert!(!first(&a).equal(&first(&c)));
        let std = first(&a).std(true).double_value(&[]);
        assert!((std - 0.05).abs() < 0.005, "std {std}");
        let norm = a.params().find(|p| p.name == "model.norm.weight").unwrap();
        assert_eq!(norm.tensor.sum(Kind::Float).double_value(&[]), 32.0);
        assert!(a.tied_to_embedding());
        assert_eq!(
            a.blocks[3].params().len(),
            1,
            "tied head lists only its norm"
        );
    }

    #[test]
    fn tied_head_follows_embedding_storage_swaps() {
        let model =
            CausalLm::from_config(tiny(ModelType::Qwen2, 4, true), Device::Cpu, Kind::Float, 3)
                .unwrap();
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]);
        let ctx = ForwardCtx::causal(&ids).unwrap();
        let before = model.forward(&ids, &ctx).unwrap();
        let mut embed = model.blocks[0].params()[0].tensor.shallow_clone();
        tch::no_grad(|| embed.set_data(&(embed.detach() * 2.0)));
        let after = model.forward(&ids, &ctx).unwrap();
        assert!(!before.allclose(&after, 1e-5, 1e-6, false));
        let loss = causal_lm_loss(&after, &ids).unwrap();
        loss.backward();
        assert!(model.params().all(|p| p.tensor.grad().defined()));
    }

    /// The engine's way: each block run on a detached input, then backpropagated alone
    /// in reverse with its output gradient; the gradients must equal one full backward
    /// (including the tied head's contribution landing on the embedding weight).
    #[test]
    fn blockwise_backward_matches_full_backward() {
        let model =
            CausalLm::from_config(tiny(ModelType::Llama, 2, true), Device::Cpu, Kind::Float, 9)
                .unwrap();
        let ids = Tensor::from_slice(&[5i64, 17, 3, 88, 41, 2, 9, 60]).reshape([2, 4]);
        let pad = Tensor::from_slice(&[1i64, 1, 1, 1, 0, 1, 1, 1]).reshape([2, 4]);
        let ctx = ForwardCtx::build(&ids, Some(&pad), None).unwrap();
        causal_lm_loss(&model.forward(&ids, &ctx).unwrap(), &ids)
            .unwrap()
            .backward();
        let full: Vec<Tensor> = model.params().map(|p| p.tensor.grad().copy()).collect();
        for p in model.params() {
            let _ = p.tensor.grad().zero_();
        }

        let mut inputs = vec![ids.shallow_clone()];
        for block in &model.blocks[..model.blocks.len() - 1] {
            let out = tch::no_grad(|| block.forward(inputs.last().unwrap(), &ctx)).unwrap();
            inputs.push(out);
        }
        let mut grad_out: Option<Tensor> = None;
        for (i, block) in model.blocks.iter().enumerate().rev() {
            let input = match i {
                0 => inputs[0].shallow_clone(),
                _ => inputs[i].detach().set_requires_grad(true),
            };
            let out = block.forward(&input, &ctx).unwrap();
            match &grad_out {
                None => causal_lm_loss(&out, &ids).unwrap().backward(),
                Some(g) => (out * g).sum(Kind::Float).backward(),
            }
            grad_out = (i > 0).then(|| input.grad());
        }
        for (p, expected) in model.params().zip(&full) {
            let err = (p.tensor.grad() - expected).abs().max().double_value(&[]);
            assert!(err < 1e-6, "{}: {err}", p.name);
        }
    }

    #[test]
    fn padding_row_is_zero_and_gets_no_gradient() {
        let mut config = tiny(ModelType::Llama, 2, false);
        config.pad_token_id = Some(0);
        let model = CausalLm::from_config(config, Device::Cpu, Kind::Float, 4).unwrap();
        let embed = &model.blocks[0].params()[0].tensor;
        assert_eq!(embed.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let ids = Tensor::from_slice(&[0i64, 5, 0, 6]).reshape([1, 4]);
        let logits = model
            .forward(&ids, &ForwardCtx::causal(&ids).unwrap())
            .unwrap();
        causal_lm_loss(
            &logits,
            &Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]),
        )
        .unwrap()
        .backward();
        let grad = embed.grad();
        assert_eq!(grad.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(grad.get(5).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn half_precision_forward_tracks_fp32() {
        let config = tiny(ModelType::Qwen2, 2, false);
        let ids = Tensor::from_slice(&[3i64, 9, 27, 81, 50, 7]).reshape([2, 3]);
        let ctx = ForwardCtx::causal(&ids).unwrap();
        let full = CausalLm::from_config(config.clone(), Device::Cpu, Kind::Float, 5).unwrap();
        let reference = full.forward(&ids, &ctx).unwrap();
        for kind in [Kind::BFloat16, Kind::Half] {
            let model = CausalLm::from_config(config.clone(), Device::Cpu, kind, 5).unwrap();
            for (ours, source) in model.params().zip(full.params()) {
                let mut target = ours.tensor.shallow_clone();
                tch::no_grad(|| target.copy_(&source.tensor));
            }
            let logits = model.forward(&ids, &ctx).unwrap();
            assert_eq!(logits.kind(), kind);
            let err = (logits.to_kind(Kind::Float) - &reference)
                .abs()
                .max()
                .double_value(&[]);
            let scale = reference.abs().max().double_value(&[]);
            assert!(
                err < 0.05 * scale + 1e-3,
                "{kind:?}: err {err} scale {scale}"
            );
        }
    }

    #[test]
    fn save_and_reload_round_trips_and_reports_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        let model =
            CausalLm::from_config(tiny(ModelType::Llama, 2, true), Device::Cpu, Kind::Float, 6)
                .unwrap();
        model
            .save_pretrained(dir.path(), 4096, Kind::Float)
            .unwrap();
        assert!(dir.path().join(INDEX_FILE).is_file());
        let loaded = CausalLm::from_pretrained(dir.path(), Device::Cpu, Kind::Float).unwrap();
        for (a, b) in model.params().zip(loaded.params()) {
            assert_eq!(a.name, b.name);
            assert!(a.tensor.equal(&b.tensor), "{}", a.name);
        }
        let mut config = loaded.config.clone();
        config.tie_word_embeddings = false;
        config.num_hidden_layers = 1;
        std::fs::write(
            dir.path().join("config.json"),
            config.to_json_string().unwrap(),
        )
        .unwrap();
        let err = CausalLm::from_pretrained(dir.path(), Device::Cpu, Kind::Float)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing lm_head.weight"), "{err}");
        assert!(
            err.contains("unexpected model.layers.1.mlp.up_proj.weight"),
            "{err}"
        );
    }
}
