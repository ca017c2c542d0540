//! train.json: training arguments plus the DeepSpeed section, resolved for a world size.
//! (Placeholder: filled by the configuration work of issue 2.)
