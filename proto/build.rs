fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build hermetic: no system protobuf compiler needed.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, and prost-build reads PROTOC.
    unsafe_env_set(&protoc);
    tonic_prost_build::configure()
        // Weight blobs are shared between many outgoing messages: `Bytes` clones are free.
        .bytes(".")
        .compile_protos(
            &["proto/pollen/fleet.proto", "proto/pollen/device.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_env_set(protoc: &std::path::Path) {
    // set_var is unsafe in edition 2024 because of other threads; a build script has none.
    unsafe { std::env::set_var("PROTOC", protoc) };
}
