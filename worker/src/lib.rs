//! The rsdeep worker library: one process per device. It joins the rendezvous, builds a
//! communicator, loads tokenizer, data and model, and runs the ZeRO engine.
