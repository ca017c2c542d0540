//! The training loop for pretrain and SFT: builds communicator, tokenizer, data, model
//! and ZeRO engine from the resolved `TrainConfig`, runs epochs/max_steps with gradient
//! accumulation, evaluates, logs (progress bar, metrics.jsonl, TensorBoard, loss.png)
//! and saves an HF-loadable model at the end.

pub mod plot;
pub mod progress;
pub mod tensorboard;
