//! Compiles the `.proto` files with protox (pure Rust), so a fresh machine needs no `protoc`.
//! `castore.proto` gives plain messages; `granary/v1/granary.proto` adds the daemon's gRPC
//! service (tonic), reusing the castore messages from `crate::model::castore::proto`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/castore.proto", "proto/granary/v1/granary.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let castore = protox::compile(["proto/castore.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(castore)?;

    // prost needs the castore descriptors to analyse the messages; the extern path makes the
    // generated service use the types generated above instead of a second copy.
    let rpc = protox::compile(["proto/granary/v1/granary.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    tonic_prost_build::configure()
        .extern_path(".granary.castore.v1", "crate::model::castore::proto")
        .compile_fds_with_config(rpc, config)?;
    Ok(())
}
