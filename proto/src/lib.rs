//! The rendezvous wire contract between the `rsdeep` launcher (server, hosted by node 0)
//! and every `rsdeep-worker` (client). The schema lives in `proto/rendezvous.proto`; this
//! crate re-exports the generated code, the peer table codec and the TLS helpers (`tls`), so
//! that neither side depends on libtorch or on the other.

pub mod v1 {
    tonic::include_proto!("rendezvous.v1");
}

/// The rsdeep version every participant sends on Join; a mismatch is refused.
pub const RSDEEP_VERSION: &str = env!("CARGO_PKG_VERSION");

/// gRPC metadata key that carries the per-job token on every call.
pub const TOKEN_METADATA_KEY: &str = "x-rsdeep-token";

mod peer_table;
pub mod tls;

pub use peer_table::{
    PeerRef, PeerTableError, PeerTableReader, decode_peer_table, encode_peer_table,
};
pub use prost::bytes::Bytes;
