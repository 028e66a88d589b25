//! Compiles `flywheel/v1/*.proto` with `protox` (pure Rust), so building needs
//! no system `protoc`. The file descriptor set is also written out for gRPC
//! server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["flywheel/v1/flywheel.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("flywheel_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
