//! The rendezvous hosted by the node-0 launcher: a tonic gRPC server (`service`) over a
//! plain state machine (`state`). Wire contract: `proto/proto/rendezvous.proto`. Every
//! call must carry the job token (`x-rsdeep-token` metadata, checked by an interceptor)
//! and the job id; Join also checks the rsdeep version. The server listens on the master
//! address only unless told otherwise, optionally over TLS (`rsdeep_proto::tls`,
//! `docs/security.md`; end-to-end test in `tls_tests`).
//! Under `--launcher slurm` with several nodes it also carries node 0's decisions to the
//! other nodes' launchers (`control`: coordinated restarts). Connections that bring no
//! authenticated request in time are closed (`guard`: flood defence).

pub mod control;
pub mod guard;
pub mod service;
pub mod state;
#[cfg(test)]
mod tls_tests;

pub use service::{ServerHandle, start_server, start_server_guarded, start_server_tls};
pub use state::{
    Command, CompleteWorld, ErrorRecord, Member, RendezvousError, RendezvousState, WorldSpec,
};
