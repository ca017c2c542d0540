//! LoRA adapters in PEFT's format: injection into a `CausalLm`'s decoder layers
//! (`apply_lora`, or `LoraInjector` block by block while the model is built), the
//! adapter tensors under PEFT's key names (`lora_state`), the
//! `adapter_config.json` + `adapter_model.safetensors` pair (`save_adapter`,
//! `load_adapter`) and merging into the base weights (`merge_lora`, `merge_lora_cli`).
//! The math is PEFT's `lora.Linear`: y = base(x) + B(A(dropout(x))) * alpha / r, with A
//! kaiming-uniform(a = sqrt(5)) and B zeros at init, bias "none". Parity with Python
//! `peft` is checked by `worker/tests/lora_parity.rs`; training through the ZeRO engine
//! by `lora_zero.rs`, memory/throughput against full training by `lora_memory.rs`.
//!
//! Adapters are ordinary `Param`s of their decoder layer (`...q_proj.lora_A.weight`,
//! appended after the base params); `LoraInfo::frozen` names the base for
//! `EngineModel::frozen`: below stage 3 the engine keeps them whole on every rank, under
//! stage 3 it partitions them like the adapters (gather only: no gradient, no optimizer
//! state). Known gap: with activation checkpointing and `lora_dropout > 0` the recomputed
//! forward draws a fresh dropout mask (torch's checkpoint restores the RNG state instead).

mod merge;

pub use merge::{merge_lora, merge_lora_cli};

use crate::model::{Block, CausalLm, DECODER_LINEARS};
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
}

impl LoraConfig {
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

/// What injecting (or loading) adapters did to a model.
#[derive(Clone, Debug)]
pub struct LoraInfo {
    /// Every base parameter name: to go into `EngineModel::frozen`.
    pub frozen: HashSet<String>,
    /// The adapter parameter names (HF-style, `...q_proj.lora_A.weight`), in block order.
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
    /// A saved adapter's (A, B) per (layer, module), used instead of fresh draws.
    initial: BTreeMap<(usize, String), (Tensor, Tensor)>,
    rank: i64,
    scaling: f64,
    dropout: f64,
    device: Device,
    kind: Kind,
    switch: Arc<AtomicBool>,
    frozen: HashSet<String>,
    adapter_names: Vec<String>,
    trainable: i64,
    total: i64,
    /// The adapter file `initial` came from.
    adapter_file: Option<std::path::PathBuf>,
}

impl LoraInjector {
    /// An injector for adapters in `kind` on `device` (the model's).
    pub fn new(cfg: &LoraConfig, seed: u64, device: Device, kind: Kind) -> Result<Self> {
        Ok(LoraInjector {
            modules: cfg.resolved_modules()?,
            rng: StdRng::seed_from_u64(seed),
            initial: BTreeMap::new(),
            rank: cfg.r as i64,
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
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
    /// gives rank, alpha, dropout and targets) instead of fresh adapters: continued
    /// training. Every adapter of the file must find its place.
    pub fn from_adapter(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let cfg = read_adapter_config(dir)?;
        let path = dir.join(ADAPTER_WEIGHTS);
        let tensors = Tensor::read_safetensors(&path)?;
        let mut injector = LoraInjector::new(&cfg, 0, device, kind)?;
        injector.initial = pair_adapter_tensors(tensors, &path)?;
        injector.adapter_file = Some(path);
        Ok(injector)
    }

    /// Injects nothing: only freezes base parameters and counts (adapters already
    /// attached, e.g. loaded), with `switch` as the dropout switch.
    fn counting(switch: Arc<AtomicBool>) -> Self {
        LoraInjector {
            modules: Vec::new(),
            rng: StdRng::seed_from_u64(0),
            initial: BTreeMap::new(),
            rank: 0,
            scaling: 0.0,
            dropout: 0.0,
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
    /// parameters (`requires_grad` false, named in `frozen()`).
    pub fn prepare(&mut self, block: &mut dyn Block) -> Result<()> {
        if let Some(layer) = block
            .as_decoder_layer_mut()
            .filter(|_| !self.modules.is_empty())
        {
            layer.use_lora_switch(self.switch.clone());
            for module in &self.modules {
                let (out, inp) = layer.linear_shape(module)?;
                let (a, b) = match self.initial.remove(&(layer.index(), module.to_string())) {
                    Some((a, b)) => check_adapter_shapes(a, b, (out, inp), self.rank)?,
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
                    None => (
                        kaiming_uniform_a_sqrt5(&mut self.rng, self.rank, inp)?, // (r, in)
                        Tensor::f_zeros([out, self.rank], (Kind::Float, self.device))?, // (out, r)
                    ),
                };
                let (a, b) = (
                    adapter_leaf(a, self.device, self.kind)?,
                    adapter_leaf(b, self.device, self.kind)?,
                );
                layer.attach_lora(module, a, b, self.scaling, self.dropout)?;
            }
        }
        for p in block.params() {
            let numel = p.tensor.numel() as i64;
            self.total += numel;
            if is_adapter_name(&p.name) {
                self.trainable += numel;
                self.adapter_names.push(p.name.clone());
            } else {
                let _ = p.tensor.f_set_requires_grad(false)?;
                self.frozen.insert(p.name.clone());
            }
        }
        Ok(())
    }

    /// Base parameter names frozen so far (for `EngineModel::frozen`).
    pub fn frozen(&self) -> &HashSet<String> {
        &self.frozen
    }

    /// What was injected, over every block prepared; an error when a saved adapter held
    /// adapters this model has no place for.
    pub fn finish(self) -> Result<LoraInfo> {
        if let (Some((layer, module)), Some(path)) =
            (self.initial.keys().next(), self.adapter_file.as_ref())
        {
            return Err(Error::Model(format!(
                "{}: adapter for layer {layer} {module} has no place in this model",
                path.display()
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

/// A saved adapter pair checked against the layer: A (r, in), B (out, r).
fn check_adapter_shapes(
    a: Tensor,
    b: Tensor,
    (out, inp): (i64, i64),
    r: i64,
) -> Result<(Tensor, Tensor)> {
    if a.size() != [r, inp] || b.size() != [out, r] {
        return Err(Error::Model(format!(
            "adapter shapes A {:?} and B {:?} do not fit this layer (expected [{r}, {inp}] and [{out}, {r}])",
            a.size(),
            b.size()
        )));
    }
    Ok((a.f_to_kind(Kind::Float)?, b.f_to_kind(Kind::Float)?))
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
    name.contains(".lora_A.") || name.contains(".lora_B.")
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
    write_atomically(&dir.join(ADAPTER_WEIGHTS), |path| {
        Ok(Tensor::write_safetensors(&cpu, path)?)
    })
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
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": cfg.use_rslora,
    }))
}

/// Reads a PEFT `adapter_config.json`, rejecting features rsdeep does not implement
/// (DoRA, bias training, fan_in_fan_out, per-module rank/alpha patterns, modules_to_save).
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let field = |key: &str| value.get(key).cloned().unwrap_or(Value::Null);
    let unsupported = [
        ("peft_type", field("peft_type") != json!("LORA")),
        ("use_dora", field("use_dora") == json!(true)),
        (
            "bias",
            !matches!(field("bias"), Value::Null) && field("bias") != json!("none"),
        ),
        ("fan_in_fan_out", field("fan_in_fan_out") == json!(true)),
        ("rank_pattern", is_non_empty(&field("rank_pattern"))),
        ("alpha_pattern", is_non_empty(&field("alpha_pattern"))),
        ("modules_to_save", is_non_empty(&field("modules_to_save"))),
    ];
    if let Some((key, _)) = unsupported.iter().find(|(_, bad)| *bad) {
        return Err(Error::Config(format!(
            "{}: unsupported {key} = {}",
            path.display(),
            field(key)
        )));
    }
    let targets = match field("target_modules") {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
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
    })
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
/// every `lora_A`/`lora_B` pair found, freezes the base and switches dropout off
/// (inference). Unknown keys are an error.
pub fn load_adapter(model: &mut CausalLm, dir: &Path) -> Result<LoraInfo> {
    let cfg = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let tensors = Tensor::read_safetensors(&path)?;
    let pairs = pair_adapter_tensors(tensors, &path)?;
    let (device, kind) = (model.device(), model.kind());
    let mut remaining = pairs;
    let switch = Arc::new(AtomicBool::new(false));
    for layer in model.decoder_layers_mut() {
        layer.use_lora_switch(switch.clone());
        for module in DECODER_LINEARS {
            let Some((a, b)) = remaining.remove(&(layer.index(), module.to_string())) else {
                continue;
            };
            let (a, b) = (
                adapter_leaf(a, device, kind)?,
                adapter_leaf(b, device, kind)?,
            );
            layer.attach_lora(module, a, b, cfg.scaling(), cfg.dropout)?;
        }
    }
    if let Some((layer, module)) = remaining.keys().next() {
        return Err(Error::Model(format!(
            "{}: adapter for layer {layer} {module} has no place in this model",
            path.display()
        )));
    }
    let mut counter = LoraInjector::counting(switch);
    for block in model.blocks.iter_mut() {
        counter.prepare(block.as_mut())?;
    }
    counter.finish()
}

/// Groups PEFT keys `base_model.model.model.layers.{i}.{module}.lora_{A,B}.weight` into
/// (layer, module) -> (A, B).
fn pair_adapter_tensors(
    tensors: Vec<(String, Tensor)>,
    path: &Path,
) -> Result<BTreeMap<(usize, String), (Tensor, Tensor)>> {
    let mut halves: BTreeMap<(usize, String), [Option<Tensor>; 2]> = BTreeMap::new();
    for (key, tensor) in tensors {
        let parsed = parse_adapter_key(&key).ok_or_else(|| {
            Error::Model(format!("{}: unexpected adapter key {key}", path.display()))
        })?;
        let (layer, module, which) = parsed;
        halves.entry((layer, module)).or_default()[which] = Some(tensor);
    }
    halves
        .into_iter()
        .map(|(slot, [a, b])| match (a, b) {
            (Some(a), Some(b)) => Ok((slot, (a, b))),
            _ => Err(Error::Model(format!(
                "{}: layer {} {} lacks lora_A or lora_B",
                path.display(),
                slot.0,
                slot.1
            ))),
        })
        .collect()
}

/// `base_model.model.model.layers.3.mlp.up_proj.lora_B.weight` -> (3, "mlp.up_proj", 1).
fn parse_adapter_key(key: &str) -> Option<(usize, String, usize)> {
    let rest = key
        .strip_prefix(PEFT_PREFIX)?
        .strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module, which) = match rest.rsplit_once('.')? {
        (module, "lora_A") => (module, 0),
        (module, "lora_B") => (module, 1),
        _ => return None,
    };
    DECODER_LINEARS.contains(&module).then_some(())?;
    Some((index.parse().ok()?, module.to_string(), which))
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
}
