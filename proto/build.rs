//! Generates the tonic/prost code for `proto/rendezvous.proto` with a vendored protoc,
//! so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/rendezvous.proto");
    let mut cfg = tonic_prost_build::Config::new();
    cfg.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // The encoded peer table is shared by every Join answer as a refcounted `Bytes`.
    cfg.bytes([".rendezvous.v1.JoinResponse.peer_table"]);
    tonic_prost_build::configure().compile_with_config(
        cfg,
        &["proto/rendezvous.proto"],
        &["proto"],
    )?;
    Ok(())
}
