//! Putting a training engine together from the resolved config: the engine's settings from
//! train.json (`engine_config`: `EngineConfig::from_train_config`) and a Qwen2/Llama model,
//! LoRA adapters included, built block by block straight into the engine (`causal_lm`).
//! `zero/` is the engine only; this folder is what connects it to the model, the adapters
//! and the configuration.

pub mod causal_lm;
pub mod engine_config;

pub use causal_lm::{CausalLmEngine, LoraSpec, ModelSource, build_causal_lm_engine};
