//! Compiles `proto/corral.proto` with protox (pure Rust: no protoc binary).
//! Messages also derive `serde::Serialize`, which `corralctl --output json` uses.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["corral.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .message_attribute(".", "#[derive(serde::Serialize)]")
        .field_attribute(
            ".corral.v1.EngineStatus.state",
            "#[serde(serialize_with = \"crate::serialize_engine_state\")]",
        )
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/corral.proto");
    Ok(())
}
