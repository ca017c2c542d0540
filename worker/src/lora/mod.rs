//! LoRA adapters in PEFT's format: injection into a `CausalLm`'s decoder layers
//! (`apply_lora`, or `LoraInjector` block by block while the model is built), the
//! adapter tensors under PEFT's key names (`lora_state`), the
//! `adapter_config.json` + `adapter_model.safetensors` pair (`save_adapter`,
//! `load_adapter`) and merging into the base weights (`merge_lora`, `merge_lora_cli`).
//! The math is PEFT's `lora.Linear`: y = base(x) + B(A(dropout(x))) * alpha / r, with A
//! kaiming-uniform(a = sqrt(5)) and B zeros at init, bias "none"; with `use_dora` PEFT's
//! DoRA (a trained magnitude per output row, initialised to the row norms of W, in
//! `model/layers.rs`); `modules_to_save` trains whole modules (e.g. `lm_head`) beside the
//! adapters and saves them in the adapter file under PEFT's keys. Parity with Python
//! `peft` is checked by `worker/tests/lora_parity.rs`; training through the ZeRO engine
//! by `lora_zero.rs`, memory/throughput against full training by `lora_memory.rs`.
//! PEFT's prefix tuning (`prefix.rs`) and AdapterHub's bottleneck adapters
//! (`bottleneck.rs`, saved in that library's format) replace LoRA through the same
//! injector, save and load.
//!
//! Adapters are ordinary `Param`s of their decoder layer (`...q_proj.lora_A.weight`,
//! appended after the base params); `LoraInfo::frozen` names the base for
//! `EngineModel::frozen`: below stage 3 the engine keeps them whole on every rank, under
//! stage 3 it partitions them like the adapters (gather only: no gradient, no optimizer
//! state). Known gap: with activation checkpointing and `lora_dropout > 0` the recomputed
//! forward draws a fresh dropout mask (torch's checkpoint restores the RNG state instead).

mod bottleneck;
mod merge;
mod prefix;

pub use bottleneck::{BOTTLENECK_WEIGHTS, Bottleneck, parse_style as parse_bottleneck_style};
pub use merge::{merge_lora, merge_lora_cli};
pub use prefix::{PROMPT_EMBEDDINGS, PrefixTuning};

use crate::model::{
    Block, BottleneckStyle, BottleneckTensors, CausalLm, DECODER_LINEARS, DecoderLayer,
    LoraTensors, dora_row_norms,
};
use crate::quant::QuantConfig;
use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tch::{Device, Kind, Tensor};

/// File names PEFT writes and reads.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT's saved keys carry before the HF parameter name.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// `target_modules` value selecting every decoder linear layer (not `lm_head`).
pub const ALL_LINEAR: &str = "all-linear";

/// train.json's LoRA settings (`task: "lora"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(alias = "lora_r")]
    pub r: usize,
    #[serde(alias = "lora_alpha")]
    pub alpha: f64,
    #[serde(alias = "lora_dropout", default)]
    pub dropout: f64,
    /// Module names such as `q_proj`, `v_proj` (matched against the last component of
    /// the module path, or the whole `self_attn.q_proj` path), or `["all-linear"]`.
    #[serde(alias = "lora_target_modules")]
    pub target_modules: Vec<String>,
    /// PEFT's rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.
    #[serde(default)]
    pub use_rslora: bool,
    /// PEFT's DoRA: a trained magnitude vector per adapted layer.
    #[serde(default)]
    pub use_dora: bool,
    /// Modules trained whole and saved in the adapter (PEFT's `modules_to_save`: every
    /// module whose path ends with an entry, e.g. `lm_head`, `embed_tokens`, `norm`).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// PEFT's prefix tuning instead of LoRA: the LoRA fields are then unused.
    #[serde(skip)]
    pub prefix_tuning: Option<PrefixTuning>,
    /// AdapterHub's bottleneck adapters instead of LoRA: the LoRA fields are then unused.
    #[serde(skip)]
    pub bottleneck: Option<Bottleneck>,
}

impl LoraConfig {
    /// A config without LoRA settings, for the methods that replace LoRA (prefix tuning,
    /// bottleneck adapters): set the method's field over it.
    pub fn method_only() -> LoraConfig {
        LoraConfig {
            r: 0,
            alpha: 0.0,
            dropout: 0.0,
            target_modules: Vec::new(),
            use_rslora: false,
            use_dora: false,
            modules_to_save: Vec::new(),
            prefix_tuning: None,
            bottleneck: None,
        }
    }

    /// The factor multiplying B A x: alpha / r (alpha / sqrt(r) with rsLoRA).
    pub fn scaling(&self) -> f64 {
        match self.use_rslora {
            true => self.alpha / (self.r as f64).sqrt(),
            false => self.alpha / self.r as f64,
        }
    }

    /// The decoder module paths (`self_attn.q_proj`, ...) the config selects, in HF
    /// order. Error when a target matches nothing or the config is unusable.
    pub fn resolved_modules(&self) -> Result<Vec<&'static str>> {
        if self.prefix_tuning.is_some() || self.bottleneck.is_some() {
            return Ok(Vec::new());
        }
        if self.r == 0 || !(0.0..1.0).contains(&self.dropout) || self.target_modules.is_empty() {
            return Err(Error::Config(format!(
                "LoRA needs r > 0, 0 <= dropout < 1 and target modules, got r {} dropout {} \
                 targets {:?}",
                self.r, self.dropout, self.target_modules
            )));
        }
        if self.target_modules.iter().any(|t| t == ALL_LINEAR) {
            return Ok(DECODER_LINEARS.to_vec());
        }
        for target in &self.target_modules {
            if !DECODER_LINEARS.iter().any(|m| module_matches(m, target)) {
                return Err(Error::Config(format!(
                    "LoRA target module {target:?} matches no decoder linear layer (known: \
                     {DECODER_LINEARS:?} or \"{ALL_LINEAR}\")"
                )));
            }
        }
        Ok(DECODER_LINEARS
            .iter()
            .copied()
            .filter(|m| self.target_modules.iter().any(|t| module_matches(m, t)))
            .collect())
    }
}

/// PEFT's rule: the target equals the module path or is a suffix after a dot.
fn module_matches(module: &str, target: &str) -> bool {
    module == target || module.ends_with(&format!(".{target}"))
}

/// The `modules_to_save` entry selecting parameter `name`, if any. PEFT's rule: an entry
/// selects every module whose path ends with it as a plain string (`norm` selects
/// `model.norm` and every `input_layernorm`), with everything inside that module.
fn saved_module_of<'a>(modules_to_save: &'a [String], name: &str) -> Option<&'a str> {
    let mut module = name;
    while let Some((parent, _)) = module.rsplit_once('.') {
        module = parent;
        if let Some(target) = modules_to_save
            .iter()
            .find(|t| module.ends_with(t.as_str()))
        {
            return Some(target);
        }
    }
    None
}

/// What injecting (or loading) adapters did to a model.
#[derive(Clone, Debug)]
pub struct LoraInfo {
    /// Every base parameter name: to go into `EngineModel::frozen`.
    pub frozen: HashSet<String>,
    /// The trained parameters the adapter file holds (HF-style: `...q_proj.lora_A.weight`,
    /// `...q_proj.lora_magnitude_vector`, `modules_to_save` params), in block order.
    pub adapter_names: Vec<String>,
    pub trainable: i64,
    pub total: i64,
    /// PEFT's `print_trainable_parameters` line.
    pub summary: String,
    /// LoRA dropout on (true, training) or off (false, eval/inference) for every layer
    /// of the model, also after its blocks moved into the engine: store false around
    /// evaluation, like PEFT's `model.eval()`.
    pub dropout_switch: Arc<AtomicBool>,
}

impl LoraInfo {
    /// The tensors the adapter file holds, picked out of gathered `(HF name, tensor)`
    /// weights under PEFT's saved keys (`base_model.model.` + name): `lora_state` plus
    /// the `modules_to_save` weights.
    /// Prefix tuning's per-layer prefixes become PEFT's one `prompt_embeddings`;
    /// bottleneck adapters keep their names (AdapterHub's keys).
    pub fn saved_tensors(
        &self,
        named_weights: &[(String, Tensor)],
    ) -> Result<Vec<(String, Tensor)>> {
        let saved: HashSet<&str> = self.adapter_names.iter().map(String::as_str).collect();
        let picked = named_weights
            .iter()
            .filter(|(name, _)| saved.contains(name.as_str()));
        let (prefixes, others): (Vec<_>, Vec<_>) =
            picked.partition(|(name, _)| name.ends_with(".prefix_key_values"));
        let mut tensors: Vec<(String, Tensor)> = others
            .into_iter()
            .map(|(name, t)| match bottleneck::is_bottleneck_name(name) {
                true => (name.clone(), t.shallow_clone()),
                false => (format!("{PEFT_PREFIX}{name}"), t.shallow_clone()),
            })
            .collect();
        if !prefixes.is_empty() {
            let layers: Vec<Tensor> = prefixes.iter().map(|(_, t)| t.shallow_clone()).collect();
            tensors.push((PROMPT_EMBEDDINGS.to_string(), prefix::join_layers(&layers)?));
        }
        Ok(tensors)
    }
}

/// Injects fresh adapters (A kaiming-uniform from `seed`, B zeros) into the target
/// linear layers of every decoder layer and freezes the base (`requires_grad` false).
pub fn apply_lora(model: &mut CausalLm, cfg: &LoraConfig, seed: u64) -> Result<LoraInfo> {
    let mut injector = LoraInjector::new(cfg, seed, model.device(), model.kind())?;
    for block in model.blocks.iter_mut() {
        injector.prepare(block.as_mut())?;
    }
    injector.finish()
}

/// `apply_lora` one block at a time, in model order, so adapters can be attached while
/// the model is being built (before a ZeRO engine partitions each block): the same
/// draws and the same `LoraInfo` as `apply_lora` on the finished model.
pub struct LoraInjector {
    modules: Vec<&'static str>,
    rng: StdRng,
    /// A saved adapter's tensors, used instead of fresh draws and base values.
    saved: SavedAdapter,
    rank: i64,
    scaling: f64,
    dropout: f64,
    use_dora: bool,
    modules_to_save: Vec<String>,
    /// The `modules_to_save` entries some parameter matched so far.
    matched_saves: HashSet<String>,
    /// QLoRA: the base's linear weights stored in 4 bits before adapters attach.
    base_quantization: Option<QuantConfig>,
    /// Prefix tuning: a trained prefix per decoder layer instead of LoRA adapters.
    prefix: Option<PrefixTuning>,
    /// Bottleneck adapters in every decoder layer instead of LoRA adapters.
    bottleneck: Option<Bottleneck>,
    device: Device,
    kind: Kind,
    switch: Arc<AtomicBool>,
    frozen: HashSet<String>,
    adapter_names: Vec<String>,
    trainable: i64,
    total: i64,
    /// The adapter file `saved` came from.
    adapter_file: Option<std::path::PathBuf>,
}

impl LoraInjector {
    /// An injector for adapters in `kind` on `device` (the model's).
    pub fn new(cfg: &LoraConfig, seed: u64, device: Device, kind: Kind) -> Result<Self> {
        Ok(LoraInjector {
            modules: cfg.resolved_modules()?,
            rng: StdRng::seed_from_u64(seed),
            saved: SavedAdapter::default(),
            rank: cfg.r as i64,
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
            use_dora: cfg.use_dora,
            modules_to_save: cfg.modules_to_save.clone(),
            matched_saves: HashSet::new(),
            base_quantization: None,
            prefix: cfg.prefix_tuning.clone(),
            bottleneck: cfg.bottleneck.clone(),
            device,
            kind,
            switch: Arc::new(AtomicBool::new(true)),
            frozen: HashSet::new(),
            adapter_names: Vec::new(),
            trainable: 0,
            total: 0,
            adapter_file: None,
        })
    }

    /// An injector that starts from the PEFT adapter in `dir` (its adapter_config.json
    /// gives rank, alpha, dropout, targets, DoRA and modules_to_save) instead of fresh
    /// adapters: continued training. Every tensor of the file must find its place.
    pub fn from_adapter(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let cfg = read_adapter_config(dir)?;
        let path = dir.join(weights_file(&cfg));
        let tensors = Tensor::read_safetensors(&path)?;
        let mut injector = LoraInjector::new(&cfg, 0, device, kind)?;
        injector.saved = SavedAdapter::sort(tensors, &cfg, &path)?;
        injector.adapter_file = Some(path);
        Ok(injector)
    }

    /// QLoRA: every decoder linear of the base is stored in bitsandbytes' 4-bit format
    /// (`DecoderLayer::quantize_linears`) before its adapter attaches.
    pub fn quantizing_base(mut self, config: Option<QuantConfig>) -> Self {
        self.base_quantization = config;
        self
    }

    /// Injects nothing: only applies saved whole modules, freezes base parameters and
    /// counts (adapters already attached, e.g. loaded), with `switch` as the dropout
    /// switch.
    fn counting(
        cfg: &LoraConfig,
        whole: BTreeMap<String, Tensor>,
        switch: Arc<AtomicBool>,
    ) -> Self {
        LoraInjector {
            modules: Vec::new(),
            rng: StdRng::seed_from_u64(0),
            saved: SavedAdapter {
                whole,
                ..SavedAdapter::default()
            },
            rank: 0,
            scaling: 0.0,
            dropout: 0.0,
            use_dora: false,
            modules_to_save: cfg.modules_to_save.clone(),
            matched_saves: HashSet::new(),
            base_quantization: None,
            prefix: None,
            bottleneck: None,
            device: Device::Cpu,
            kind: Kind::Float,
            switch,
            frozen: HashSet::new(),
            adapter_names: Vec::new(),
            trainable: 0,
            total: 0,
            adapter_file: None,
        }
    }

    /// Attaches adapters when `block` is a decoder layer, then freezes the block's base
    /// parameters (`requires_grad` false, named in `frozen()`) except `modules_to_save`
    /// ones (trained, with the saved adapter's values when there is one).
    pub fn prepare(&mut self, block: &mut dyn Block) -> Result<()> {
        if let (Some(layer), Some(quant)) = (block.as_decoder_layer_mut(), self.base_quantization) {
            layer.quantize_linears(quant)?;
        }
        if let (Some(layer), Some(prefix)) = (block.as_decoder_layer_mut(), &self.prefix) {
            let kv = match &self.saved.prefix {
                Some(saved) => prefix.layer_of(saved, layer.index())?,
                None => prefix.fresh_layer(&mut self.rng)?,
            };
            layer.attach_prefix(adapter_leaf(kv, self.device, self.kind)?)?;
        }
        if let (Some(layer), Some(setup)) = (block.as_decoder_layer_mut(), &self.bottleneck) {
            let source = match self.adapter_file.is_some() {
                true => BottleneckSource::Saved(&mut self.saved.bottleneck),
                false => BottleneckSource::Fresh(&mut self.rng),
            };
            attach_bottleneck(layer, setup, source, self.device, self.kind)?;
        }
        if let Some(layer) = block
            .as_decoder_layer_mut()
            .filter(|_| !self.modules.is_empty())
        {
            layer.use_lora_switch(self.switch.clone());
            for module in self.modules.clone() {
                let adapter = self.adapter_for(layer, module)?;
                layer.attach_lora(module, adapter, self.scaling, self.dropout)?;
            }
        }
        let layer = block.as_decoder_layer();
        for (i, p) in block.params().iter().enumerate() {
            let numel = layer.map_or(p.tensor.numel() as i64, |l| l.logical_numel(i));
            self.total += numel;
            if is_adapter_name(&p.name) {
                self.trainable += numel;
                self.adapter_names.push(p.name.clone());
            } else if let Some(target) = saved_module_of(&self.modules_to_save, &p.name) {
                if self
                    .modules
                    .iter()
                    .any(|m| p.name.contains(&format!(".{m}.")))
                {
                    return Err(Error::Config(format!(
                        "modules_to_save entry {target:?} selects {}, which also carries a \
                         LoRA adapter: save a module that holds no target_modules",
                        p.name
                    )));
                }
                self.matched_saves.insert(target.to_string());
                if let Some(saved) = self.saved.whole.remove(&p.name) {
                    copy_saved_values(&p.tensor, &saved, &p.name)?;
                }
                self.trainable += numel;
                self.adapter_names.push(p.name.clone());
            } else {
                let _ = p.tensor.f_set_requires_grad(false)?;
                self.frozen.insert(p.name.clone());
            }
        }
        Ok(())
    }

    /// The adapter of `module` in `layer`: the saved one, or fresh draws (A
    /// kaiming-uniform, B zeros, DoRA's magnitude the row norms of W).
    fn adapter_for(&mut self, layer: &DecoderLayer, module: &str) -> Result<LoraTensors> {
        let (out, inp) = layer.linear_shape(module)?;
        let (a, b, magnitude) = match self
            .saved
            .adapters
            .remove(&(layer.index(), module.to_string()))
        {
            Some(parts) => parts.checked((out, inp), self.rank, self.use_dora)?,
            None if self.adapter_file.is_some() => {
                return Err(Error::Model(format!(
                    "{}: no adapter for layer {} {module}",
                    self.adapter_file
                        .as_deref()
                        .unwrap_or(Path::new(""))
                        .display(),
                    layer.index()
                )));
            }
            None => {
                let a = kaiming_uniform_a_sqrt5(&mut self.rng, self.rank, inp)?; // (r, in)
                let b = Tensor::f_zeros([out, self.rank], (Kind::Float, self.device))?; // (out, r)
                let magnitude = match self.use_dora {
                    true => {
                        let weight = layer.linear_weight(module)?;
                        let a = a.f_to_device(self.device)?;
                        Some(dora_row_norms(&weight, &a, &b, self.scaling)?) // (out,)
                    }
                    false => None,
                };
                (a, b, magnitude)
            }
        };
        let leaf = |t: Tensor| adapter_leaf(t, self.device, self.kind);
        Ok(LoraTensors {
            a: leaf(a)?,
            b: leaf(b)?,
            magnitude: magnitude.map(leaf).transpose()?,
        })
    }

    /// Base parameter names frozen so far (for `EngineModel::frozen`).
    pub fn frozen(&self) -> &HashSet<String> {
        &self.frozen
    }

    /// What was injected, over every block prepared; an error when a saved adapter held
    /// tensors this model has no place for, or a `modules_to_save` entry matched nothing.
    pub fn finish(self) -> Result<LoraInfo> {
        let file = || {
            self.adapter_file
                .as_deref()
                .map_or(String::new(), |p| format!("{}: ", p.display()))
        };
        if let Some((layer, module)) = self.saved.adapters.keys().next() {
            return Err(Error::Model(format!(
                "{}adapter for layer {layer} {module} has no place in this model",
                file()
            )));
        }
        if let Some(name) = self.saved.bottleneck.keys().next() {
            return Err(Error::Model(format!(
                "{}bottleneck adapter tensor {name} has no place in this model",
                file()
            )));
        }
        if let Some(name) = self.saved.whole.keys().next() {
            return Err(Error::Model(format!(
                "{}saved module weight {name} has no place in this model",
                file()
            )));
        }
        if let Some(target) = self
            .modules_to_save
            .iter()
            .find(|t| !self.matched_saves.contains(*t))
        {
            return Err(Error::Config(format!(
                "modules_to_save entry {target:?} matches no parameter of this model (e.g. \
                 \"lm_head\", \"embed_tokens\", \"norm\"; a head tied to the embedding \
                 has no lm_head of its own)"
            )));
        }
        Ok(LoraInfo {
            summary: trainable_parameters_line(self.trainable, self.total),
            frozen: self.frozen,
            adapter_names: self.adapter_names,
            trainable: self.trainable,
            total: self.total,
            dropout_switch: self.switch,
        })
    }
}

/// Writes a saved module weight's values into the model's parameter of the same name.
fn copy_saved_values(param: &Tensor, saved: &Tensor, name: &str) -> Result<()> {
    if param.size() != saved.size() {
        return Err(Error::Model(format!(
            "saved module weight {name} is {:?}, the model's is {:?}",
            saved.size(),
            param.size()
        )));
    }
    let values = saved.f_to_device(param.device())?.f_to_kind(param.kind())?;
    let mut target = param.shallow_clone();
    tch::no_grad(|| target.f_copy_(&values))?;
    Ok(())
}

/// One saved adapter's tensors, as read from the file.
#[derive(Default)]
struct AdapterParts {
    a: Option<Tensor>,
    b: Option<Tensor>,
    magnitude: Option<Tensor>,
}

impl AdapterParts {
    /// (A (r, in), B (out, r), magnitude (out,)) in fp32 when they fit an (out, in) layer
    /// at rank `r`, with a magnitude exactly when `dora`.
    fn checked(
        self,
        (out, inp): (i64, i64),
        r: i64,
        dora: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (Some(a), Some(b)) = (self.a, self.b) else {
            return Err(Error::Model("an adapter lacks lora_A or lora_B".into()));
        };
        let magnitude_fits = match (&self.magnitude, dora) {
            (Some(m), true) => m.size() == [out],
            (None, false) => true,
            _ => false,
        };
        if a.size() != [r, inp] || b.size() != [out, r] || !magnitude_fits {
            return Err(Error::Model(format!(
                "adapter shapes A {:?}, B {:?}, magnitude {:?} do not fit this layer (expected \
                 [{r}, {inp}], [{out}, {r}]{})",
                a.size(),
                b.size(),
                self.magnitude.as_ref().map(Tensor::size),
                if dora {
                    format!(", [{out}] (DoRA)")
                } else {
                    String::new()
                }
            )));
        }
        let float = |t: Tensor| t.f_to_kind(Kind::Float);
        Ok((float(a)?, float(b)?, self.magnitude.map(float).transpose()?))
    }
}

/// A saved adapter file's tensors sorted by role.
#[derive(Default)]
struct SavedAdapter {
    /// (layer, module) -> its adapter's tensors.
    adapters: BTreeMap<(usize, String), AdapterParts>,
    /// `modules_to_save` weights by HF parameter name (`lm_head.weight`).
    whole: BTreeMap<String, Tensor>,
    /// Prefix tuning's `prompt_embeddings` (N, layers * 2 KV D).
    prefix: Option<Tensor>,
    /// Bottleneck adapter tensors by key (under rsdeep's adapter name).
    bottleneck: BTreeMap<String, Tensor>,
}

impl SavedAdapter {
    /// Sorts PEFT keys: `base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight` and
    /// `...{module}.lora_magnitude_vector` by (layer, module), other
    /// `base_model.model.{name}` keys as `modules_to_save` weights. Any other key is an
    /// error naming the file.
    fn sort(tensors: Vec<(String, Tensor)>, cfg: &LoraConfig, path: &Path) -> Result<Self> {
        let mut sorted = SavedAdapter::default();
        for (key, tensor) in tensors {
            if key == PROMPT_EMBEDDINGS && cfg.prefix_tuning.is_some() {
                sorted.prefix = Some(tensor);
                continue;
            }
            if cfg.bottleneck.is_some() {
                let name = bottleneck::canonical_key(&key).ok_or_else(|| {
                    Error::Model(format!("{}: unexpected adapter key {key}", path.display()))
                })?;
                sorted.bottleneck.insert(name, tensor);
                continue;
            }
            if let Some((layer, module, part)) = parse_adapter_key(&key) {
                let parts = sorted.adapters.entry((layer, module)).or_default();
                *match part {
                    AdapterPart::A => &mut parts.a,
                    AdapterPart::B => &mut parts.b,
                    AdapterPart::Magnitude => &mut parts.magnitude,
                } = Some(tensor);
                continue;
            }
            let name = key
                .strip_prefix(PEFT_PREFIX)
                .map(|n| n.replace(".modules_to_save.default.", "."))
                .filter(|n| saved_module_of(&cfg.modules_to_save, n).is_some())
                .ok_or_else(|| {
                    Error::Model(format!("{}: unexpected adapter key {key}", path.display()))
                })?;
            sorted.whole.insert(name, tensor);
        }
        Ok(sorted)
    }
}

/// torch's `kaiming_uniform_(a=sqrt(5))` on an (rows, fan_in) weight: U(-1/sqrt(fan_in),
/// 1/sqrt(fan_in)), drawn in fp32 on the CPU from `rng`.
fn kaiming_uniform_a_sqrt5(rng: &mut StdRng, rows: i64, fan_in: i64) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let values: Vec<f32> = (0..rows * fan_in)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_slice(&values).f_reshape([rows, fan_in])?)
}

fn adapter_leaf(t: Tensor, device: tch::Device, kind: Kind) -> Result<Tensor> {
    let t = t
        .f_to_device(device)?
        .f_to_kind(kind)?
        .f_contiguous()?
        .f_detach()?;
    Ok(t.f_set_requires_grad(true)?)
}

fn is_adapter_name(name: &str) -> bool {
    bottleneck::is_bottleneck_name(name)
        || name.contains(".lora_A.")
        || name.contains(".lora_B.")
        || name.ends_with(".lora_magnitude_vector")
        || name.ends_with(".prefix_key_values")
}

/// PEFT's `print_trainable_parameters` text:
/// `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7323`.
pub fn trainable_parameters_line(trainable: i64, total: i64) -> String {
    let percent = match total {
        0 => 0.0,
        _ => 100.0 * trainable as f64 / total as f64,
    };
    format!(
        "trainable params: {} || all params: {} || trainable%: {percent:.4}",
        thousands(trainable),
        thousands(total)
    )
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Picks the adapter tensors out of gathered `(HF name, tensor)` weights and renames them
/// to PEFT's saved keys (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
pub fn lora_state(named_weights: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    named_weights
        .iter()
        .filter(|(name, _)| is_adapter_name(name))
        .map(|(name, t)| (format!("{PEFT_PREFIX}{name}"), t.shallow_clone()))
        .collect()
}

/// Writes `dir/adapter_config.json` (PEFT's LoraConfig fields) and
/// `dir/adapter_model.safetensors` (`adapter_tensors` as from `lora_state`), atomically
/// per file.
pub fn save_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    base_model_name_or_path: &str,
    adapter_tensors: &[(String, Tensor)],
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let config = adapter_config_json(cfg, base_model_name_or_path)?;
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Config(format!("serialising adapter config: {e}")))?;
    write_atomically(&dir.join(ADAPTER_CONFIG), |path| {
        std::fs::write(path, text + "\n")
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    })?;
    let cpu: Vec<(String, Tensor)> = adapter_tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                t.f_detach()?
                    .f_to_device(tch::Device::Cpu)?
                    .f_contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    write_atomically(&dir.join(weights_file(cfg)), |path| {
        Ok(Tensor::write_safetensors(&cpu, path)?)
    })
}

/// The adapter weights file of `cfg`'s method: PEFT's, or AdapterHub's for bottleneck
/// adapters.
pub fn weights_file(cfg: &LoraConfig) -> &'static str {
    match cfg.bottleneck {
        Some(_) => BOTTLENECK_WEIGHTS,
        None => ADAPTER_WEIGHTS,
    }
}

/// Where a layer's bottleneck adapters come from.
enum BottleneckSource<'a> {
    /// A saved adapter's tensors (each taken out when used).
    Saved(&'a mut BTreeMap<String, Tensor>),
    /// Fresh draws.
    Fresh(&'a mut StdRng),
}

/// Attaches `setup`'s adapters to `layer`, from `source`, in `kind` on `device`.
fn attach_bottleneck(
    layer: &mut DecoderLayer,
    setup: &Bottleneck,
    mut source: BottleneckSource,
    device: Device,
    kind: Kind,
) -> Result<()> {
    let index = layer.index();
    let mut tensors_at = |location: &str| -> Result<BottleneckTensors> {
        let tensors = match &mut source {
            BottleneckSource::Saved(saved) => setup.saved(saved, index, location)?,
            BottleneckSource::Fresh(rng) => setup.fresh(rng)?,
        };
        let leaf = |t: Tensor| adapter_leaf(t, device, kind);
        Ok(BottleneckTensors {
            down_weight: leaf(tensors.down_weight)?,
            down_bias: leaf(tensors.down_bias)?,
            up_weight: leaf(tensors.up_weight)?,
            up_bias: leaf(tensors.up_bias)?,
        })
    };
    let attention = match setup.style {
        BottleneckStyle::DoubleSeq => Some(tensors_at("attention_adapters")?),
        BottleneckStyle::Seq => None,
    };
    let output = tensors_at("output_adapters")?;
    layer.attach_bottleneck(setup.style, bottleneck::BOTTLENECK_NAME, attention, output)?;
    Ok(())
}

fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("adapter");
    let temp = path.with_file_name(format!(".{name}.tmp"));
    write(&temp)?;
    std::fs::rename(&temp, path)
        .map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
}

/// PEFT's `adapter_config.json` object for `cfg` (target modules as the last path
/// component, `all-linear` expanded as PEFT does).
fn adapter_config_json(cfg: &LoraConfig, base_model_name_or_path: &str) -> Result<Value> {
    if let Some(prefix) = &cfg.prefix_tuning {
        return Ok(prefix.config_json(base_model_name_or_path));
    }
    if let Some(setup) = &cfg.bottleneck {
        return Ok(setup.config_json());
    }
    let mut targets: Vec<&str> = cfg
        .resolved_modules()?
        .iter()
        .map(|m| m.rsplit('.').next().unwrap_or(m))
        .collect();
    targets.sort_unstable();
    let alpha = match cfg.alpha.fract() == 0.0 {
        true => json!(cfg.alpha as i64),
        false => json!(cfg.alpha),
    };
    Ok(json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "modules_to_save": match cfg.modules_to_save.is_empty() {
            true => Value::Null,
            false => json!(cfg.modules_to_save),
        },
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora,
    }))
}

/// Reads a PEFT `adapter_config.json`, rejecting features rsdeep does not implement
/// (bias training, fan_in_fan_out, per-module rank/alpha patterns).
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let field = |key: &str| value.get(key).cloned().unwrap_or(Value::Null);
    if bottleneck::is_library_config(&value) {
        let setup = Bottleneck::from_config_json(&value, &path.display().to_string())?;
        return Ok(LoraConfig {
            bottleneck: Some(setup),
            ..LoraConfig::method_only()
        });
    }
    if field("peft_type") == json!("PREFIX_TUNING") {
        let prefix = PrefixTuning::from_config_json(&field, &path.display().to_string())?;
        return Ok(LoraConfig {
            prefix_tuning: Some(prefix),
            ..LoraConfig::method_only()
        });
    }
    let unsupported = [
        ("peft_type", field("peft_type") != json!("LORA")),
        (
            "bias",
            !matches!(field("bias"), Value::Null) && field("bias") != json!("none"),
        ),
        ("fan_in_fan_out", field("fan_in_fan_out") == json!(true)),
        ("rank_pattern", is_non_empty(&field("rank_pattern"))),
        ("alpha_pattern", is_non_empty(&field("alpha_pattern"))),
    ];
    if let Some((key, _)) = unsupported.iter().find(|(_, bad)| *bad) {
        return Err(Error::Config(format!(
            "{}: unsupported {key} = {}",
            path.display(),
            field(key)
        )));
    }
    let targets = match field("target_modules") {
        list @ (Value::String(_) | Value::Array(_)) => string_list(&list),
        other => {
            return Err(Error::Config(format!(
                "{}: target_modules {other}",
                path.display()
            )));
        }
    };
    let number = |key: &str| {
        field(key)
            .as_f64()
            .ok_or_else(|| Error::Config(format!("{}: {key} is not a number", path.display())))
    };
    Ok(LoraConfig {
        r: number("r")? as usize,
        alpha: number("lora_alpha")?,
        dropout: field("lora_dropout").as_f64().unwrap_or(0.0),
        target_modules: targets,
        use_rslora: field("use_rslora") == json!(true),
        use_dora: field("use_dora") == json!(true),
        modules_to_save: string_list(&field("modules_to_save")),
        prefix_tuning: None,
        bottleneck: None,
    })
}

/// `"a"` or `["a", "b"]` as a list (null: empty).
fn string_list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

fn is_non_empty(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    }
}

/// Loads a PEFT adapter directory (rsdeep's or Python peft's) onto `model`: attaches
/// every adapter found (DoRA magnitudes included), writes saved `modules_to_save`
/// weights over the base's, freezes the base and switches dropout off (inference).
/// Unknown keys are an error.
pub fn load_adapter(model: &mut CausalLm, dir: &Path) -> Result<LoraInfo> {
    let cfg = read_adapter_config(dir)?;
    let path = dir.join(weights_file(&cfg));
    let tensors = Tensor::read_safetensors(&path)?;
    let SavedAdapter {
        mut adapters,
        whole,
        prefix,
        mut bottleneck,
    } = SavedAdapter::sort(tensors, &cfg, &path)?;
    let (device, kind) = (model.device(), model.kind());
    let switch = Arc::new(AtomicBool::new(false));
    for layer in model.decoder_layers_mut() {
        layer.use_lora_switch(switch.clone());
        if let (Some(config), Some(saved)) = (&cfg.prefix_tuning, &prefix) {
            let kv = config
                .layer_of(saved, layer.index())
                .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
            layer.attach_prefix(adapter_leaf(kv, device, kind)?)?;
        }
        if let Some(setup) = &cfg.bottleneck {
            let source = BottleneckSource::Saved(&mut bottleneck);
            attach_bottleneck(layer, setup, source, device, kind)
                .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        }
        for module in DECODER_LINEARS {
            let Some(parts) = adapters.remove(&(layer.index(), module.to_string())) else {
                continue;
            };
            let (out, inp) = layer.linear_shape(module)?;
            let (a, b, magnitude) = parts
                .checked((out, inp), cfg.r as i64, cfg.use_dora)
                .map_err(|e| {
                    Error::Model(format!(
                        "{}: layer {} {module}: {e}",
                        path.display(),
                        layer.index()
                    ))
                })?;
            let leaf = |t: Tensor| adapter_leaf(t, device, kind);
            let adapter = LoraTensors {
                a: leaf(a)?,
                b: leaf(b)?,
                magnitude: magnitude.map(leaf).transpose()?,
            };
            layer.attach_lora(module, adapter, cfg.scaling(), cfg.dropout)?;
        }
    }
    let mut counter = LoraInjector::counting(&cfg, whole, switch);
    counter.saved.adapters = adapters;
    counter.saved.bottleneck = bottleneck;
    counter.adapter_file = Some(path);
    for block in model.blocks.iter_mut() {
        counter.prepare(block.as_mut())?;
    }
    counter.finish()
}

/// Which tensor of an adapter a PEFT key names.
enum AdapterPart {
    A,
    B,
    Magnitude,
}

/// `base_model.model.model.layers.3.mlp.up_proj.lora_B.weight` -> (3, "mlp.up_proj", B);
/// `...up_proj.lora_magnitude_vector` -> Magnitude (".default" adapter names accepted).
fn parse_adapter_key(key: &str) -> Option<(usize, String, AdapterPart)> {
    let rest = key
        .strip_prefix(PEFT_PREFIX)?
        .strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module, part) = match rest.rsplit_once('.')? {
        (module, "lora_A") => (module, AdapterPart::A),
        (module, "lora_B") => (module, AdapterPart::B),
        (module, "lora_magnitude_vector") => (module, AdapterPart::Magnitude),
        _ => return None,
    };
    DECODER_LINEARS.contains(&module).then_some(())?;
    Some((index.parse().ok()?, module.to_string(), part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ForwardCtx, ModelConfig, ModelType, causal_lm_loss};
    use tch::Device;

    fn tiny_model() -> CausalLm {
        let mut config = ModelConfig::new(ModelType::Qwen2, 64, 32, 48, 2, 4, 2);
        config.initializer_range = 0.05;
        CausalLm::from_config(config, Device::Cpu, Kind::Float, 3).unwrap()
    }

    fn cfg(targets: &[&str]) -> LoraConfig {
        LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            use_dora: false,
            modules_to_save: Vec::new(),
            prefix_tuning: None,
            bottleneck: None,
        }
    }

    #[test]
    fn summary_line_follows_peft() {
        assert_eq!(
            trainable_parameters_line(1234, 5678),
            "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330"
        );
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(999), "999");
    }

    #[test]
    fn targets_resolve_like_peft() {
        assert_eq!(
            cfg(&["q_proj", "v_proj"]).resolved_modules().unwrap(),
            vec!["self_attn.q_proj", "self_attn.v_proj"]
        );
        assert_eq!(cfg(&["all-linear"]).resolved_modules().unwrap().len(), 7);
        assert!(cfg(&["lm_head"]).resolved_modules().is_err());
        assert!(
            cfg(&["proj"]).resolved_modules().is_err(),
            "suffix must follow a dot"
        );
    }

    #[test]
    fn fresh_adapter_is_identity_and_only_adapters_get_gradients() {
        let ids = Tensor::from_slice(&[1i64, 5, 9, 2, 7]).reshape([1, 5]);
        let ctx = ForwardCtx::causal(&ids).unwrap();
        let mut model = tiny_model();
        let before = model.forward(&ids, &ctx).unwrap().detach();
        let info = apply_lora(&mut model, &cfg(&["q_proj", "v_proj"]), 11).unwrap();
        // 2 layers x (q: A 4x32 + B 32x4, v: A 4x32 + B 16x4)
        assert_eq!(info.trainable, 2 * (128 + 128 + 128 + 64));
        assert_eq!(info.adapter_names.len(), 8);
        assert_eq!(info.total, model.num_parameters());
        let after = model.forward(&ids, &ctx).unwrap();
        assert!(after.allclose(&before, 1e-6, 1e-6, false), "B = 0 at init");
        causal_lm_loss(&after, &ids).unwrap().backward();
        for p in model.params() {
            let adapter = info.adapter_names.contains(&p.name);
            assert_eq!(p.tensor.requires_grad(), adapter, "{}", p.name);
            assert_eq!(p.tensor.grad().defined(), adapter, "{}", p.name);
        }
        let a = model
            .params()
            .find(|p| p.name.ends_with("q_proj.lora_A.weight"))
            .unwrap();
        let bound = 1.0 / 32f64.sqrt();
        assert!(a.tensor.abs().max().double_value(&[]) <= bound);
        assert!(a.tensor.std(true).double_value(&[]) > bound / 3.0);
    }

    #[test]
    fn dropout_switch_turns_dropout_off_for_the_whole_model() {
        let ids = Tensor::from_slice(&[1i64, 5, 9, 2, 7]).reshape([1, 5]);
        let ctx = ForwardCtx::causal(&ids).unwrap();
        let mut model = tiny_model();
        let mut lora = cfg(&["all-linear"]);
        lora.dropout = 0.5;
        let info = apply_lora(&mut model, &lora, 2).unwrap();
        for p in model.params().filter(|p| p.name.contains("lora_B")) {
            let mut t = p.tensor.shallow_clone();
            tch::no_grad(|| t.copy_(&(Tensor::ones(t.size(), (Kind::Float, Device::Cpu)) * 0.1)));
        }
        let run = |m: &CausalLm| tch::no_grad(|| m.forward(&ids, &ctx).unwrap());
        assert!(
            !run(&model).equal(&run(&model)),
            "dropout active while training"
        );
        info.dropout_switch
            .store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(run(&model).equal(&run(&model)), "no dropout in eval");
    }

    #[test]
    fn save_load_merge_round_trip() {
        let ids = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9]).reshape([2, 3]);
        let ctx = ForwardCtx::causal(&ids).unwrap();
        let mut model = tiny_model();
        let lora = cfg(&["all-linear"]);
        apply_lora(&mut model, &lora, 5).unwrap();
        for p in model.params().filter(|p| p.name.contains("lora_B")) {
            let mut t = p.tensor.shallow_clone();
            tch::no_grad(|| t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1)));
        }
        let expected = model.forward(&ids, &ctx).unwrap().detach();
        let named: Vec<(String, Tensor)> = model
            .params()
            .map(|p| (p.name.clone(), p.tensor.detach()))
            .collect();
        let state = lora_state(&named);
        assert_eq!(state.len(), 28);
        assert!(state[0].0.starts_with("base_model.model.model.layers.0."));
        let dir = tempfile::tempdir().unwrap();
        save_adapter(dir.path(), &lora, "base", &state).unwrap();
        let mut reloaded = tiny_model();
        load_adapter(&mut reloaded, dir.path()).unwrap();
        let got = reloaded.forward(&ids, &ctx).unwrap();
        assert!(got.allclose(&expected, 1e-5, 1e-6, false));
        merge_lora(&mut reloaded).unwrap();
        assert!(reloaded.params().all(|p| !is_adapter_name(&p.name)));
        let merged = reloaded.forward(&ids, &ctx).unwrap();
        let err = (merged - &expected).abs().max().double_value(&[]);
        assert!(err < 1e-4, "merged differs by {err}");
        let read = read_adapter_config(dir.path()).unwrap();
        assert_eq!(read.target_modules.len(), 7);
        assert_eq!(read.scaling(), 2.0);
    }

    #[test]
    fn modules_to_save_select_like_peft_by_plain_suffix_of_any_enclosing_module() {
        let saves = [
            "norm".to_string(),
            "lm_head".to_string(),
            "layers.1.mlp".to_string(),
        ];
        let selected = |name: &str| saved_module_of(&saves, name);
        assert_eq!(selected("model.norm.weight"), Some("norm"));
        assert_eq!(
            selected("model.layers.0.input_layernorm.weight"),
            Some("norm")
        );
        assert_eq!(selected("lm_head.weight"), Some("lm_head"));
        assert_eq!(
            selected("model.layers.1.mlp.up_proj.weight"),
            Some("layers.1.mlp")
        );
        assert_eq!(selected("model.layers.0.mlp.up_proj.weight"), None);
        assert_eq!(selected("model.embed_tokens.weight"), None);
    }

    #[test]
    fn a_saved_module_holding_an_adapter_target_is_refused() {
        let mut model = tiny_model();
        let mut lora = cfg(&["q_proj"]);
        lora.modules_to_save = vec!["self_attn".into()];
        let err = apply_lora(&mut model, &lora, 1).unwrap_err().to_string();
        assert!(
            err.contains("\"self_attn\"") && err.contains("q_proj"),
            "{err}"
        );
    }
}
