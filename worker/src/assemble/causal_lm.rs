//! A Qwen2 / Llama `CausalLm` (optionally with LoRA adapters) built straight into a
//! `ZeroEngine`, one block at a time: each block is drawn (or read from the safetensors
//! files), gets its adapters, and is partitioned by `EngineBuilder::add_block` before the
//! next block exists. Under ZeRO-3 a rank therefore never holds more than one block of
//! full parameters plus its own slices (the peak the training loop used to reach by
//! building the whole model first). The weights equal `CausalLm::from_config` /
//! `from_pretrained` + `apply_lora` + `ZeroEngine::new` bit for bit
//! (`worker/tests/zero_streamed_build.rs`). Used by `train/run.rs`.

use crate::Result;
use crate::comm::Communicator;
use crate::lora::{LoraConfig, LoraInfo, LoraInjector};
use crate::model::{Block, CausalLm, ModelConfig};
use crate::quant::QuantConfig;
use crate::zero::{EngineBuilder, EngineConfig, EngineModel, ZeroEngine};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind};

/// Where the model's weights come from (made once per run, so its size does not matter).
#[allow(clippy::large_enum_variant)]
pub enum ModelSource<'a> {
    /// transformers' random init of `config`, seeded with `seed`.
    Init { config: ModelConfig, seed: u64 },
    /// A pretrained folder: `config.json` + `model.safetensors` (or shards + index).
    Pretrained(&'a Path),
}

/// LoRA adapters to inject while building: fresh ones (`apply_lora`'s arguments), or a
/// saved PEFT adapter to continue training; with `base_4bit`, on a base whose linears
/// are stored in 4 bits (QLoRA).
pub enum LoraSpec<'a> {
    Fresh {
        config: &'a LoraConfig,
        seed: u64,
        base_4bit: Option<QuantConfig>,
    },
    Saved {
        dir: &'a Path,
        base_4bit: Option<QuantConfig>,
    },
}

/// The engine and what the training loop needs to know about the model it holds.
pub struct CausalLmEngine {
    pub engine: ZeroEngine,
    pub config: ModelConfig,
    /// Parameter elements (adapters included, a tied head counted once).
    pub num_parameters: i64,
    /// What the LoRA injection did, when asked for.
    pub lora: Option<LoraInfo>,
    /// The most parameter elements of one block (the most held in full while building).
    pub largest_block_numel: i64,
}

/// Builds the model block by block into a `ZeroEngine` for this rank (`comm`). Every
/// rank must call it with the same arguments (the engine checks that all built the
/// same weights).
pub fn build_causal_lm_engine(
    source: ModelSource<'_>,
    device: Device,
    kind: Kind,
    lora: Option<LoraSpec<'_>>,
    comm: Arc<dyn Communicator>,
    engine_config: EngineConfig,
) -> Result<CausalLmEngine> {
    let rank = comm.rank();
    let _span = tracing::info_span!("build_causal_lm_engine", rank).entered();
    let mut builder = EngineBuilder::new(comm, engine_config)?;
    let mut injector = match lora {
        Some(LoraSpec::Fresh {
            config,
            seed,
            base_4bit,
        }) => Some(LoraInjector::new(config, seed, device, kind)?.quantizing_base(base_4bit)),
        Some(LoraSpec::Saved { dir, base_4bit }) => {
            Some(LoraInjector::from_adapter(dir, device, kind)?.quantizing_base(base_4bit))
        }
        None => None,
    };
    let no_frozen = HashSet::new();
    let (mut num_parameters, mut largest_block_numel) = (0i64, 0i64);
    let mut on_block = |block: &mut dyn Block| -> Result<()> {
        if let Some(injector) = injector.as_mut() {
            injector.prepare(block)?;
        }
        let numel: i64 = block.params().iter().map(|p| p.tensor.numel() as i64).sum();
        num_parameters += numel;
        largest_block_numel = largest_block_numel.max(numel);
        let frozen = injector.as_ref().map_or(&no_frozen, |i| i.frozen());
        builder.add_block(block, frozen)
    };
    let model = match source {
        ModelSource::Init { config, seed } => {
            CausalLm::from_config_streaming(config, device, kind, seed, &mut on_block)?
        }
        ModelSource::Pretrained(dir) => {
            CausalLm::from_pretrained_streaming(dir, device, kind, &mut on_block)?
        }
    };
    let lora = injector.map(LoraInjector::finish).transpose()?;
    let engine_model = EngineModel {
        head_tied_to_embedding: model.tied_to_embedding(),
        frozen: lora.as_ref().map(|l| l.frozen.clone()).unwrap_or_default(),
        blocks: model.blocks,
    };
    let engine = builder.finish(engine_model)?;
    Ok(CausalLmEngine {
        engine,
        config: model.config,
        num_parameters,
        lora,
        largest_block_numel,
    })
}
