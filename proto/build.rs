//! Generates the Rust types of proto/*.proto with protox (pure Rust; no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["session.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_fds(fds)?;
    // relay.proto uses session.proto's messages as they are generated above (crate::session),
    // and its services get both a tonic server and a client.
    let fds = protox::compile(["relay.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::LeanCodec")
        .extern_path(".remote.session.v1", "crate::session")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
