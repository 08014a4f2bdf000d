fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/granary.proto");
    println!("cargo:rerun-if-changed=proto/csi.proto");
    tonic_prost_build::configure()
        .bytes(".granary.v1.BlockData.data")
        .compile_protos(&["proto/granary.proto", "proto/csi.proto"], &["proto"])?;
    Ok(())
}
