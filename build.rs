//! Compiles `proto/outboxd/v1/*.proto` with a vendored `protoc`, so that a
//! plain `cargo build` works on a machine with no protobuf compiler installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/outboxd/v1/outbox.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut prost_config = prost_build::Config::new();
    prost_config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Payloads and keys are opaque bytes that go to Kafka unchanged.
    prost_config.bytes(["."]);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("outboxd_descriptor.bin"))
        .compile_with_config(prost_config, &protos, &["proto"])?;
    Ok(())
}
