//! Compiles the WGSL shaders in `shaders/` to SPIR-V with naga (pure Rust, no external
//! tool), so no binary shader is ever checked in.

use std::path::PathBuf;

fn main() {
    let shaders = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .join("../../shaders");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in ["scene", "nv12", "nv12_packed", "matmul"] {
        let path = shaders.join(format!("{name}.wgsl"));
        println!("cargo:rerun-if-changed={}", path.display());
        let mut source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        // The NV12 shaders differ only in how they read a pixel; the block conversion is
        // shared, and the colour conversion with the scene's plane shaders.
        let shared: &[&str] = match name {
            "scene" => &["yuv"],
            "nv12" | "nv12_packed" => &["nv12_common", "yuv"],
            _ => &[],
        };
        for part in shared {
            let common = shaders.join(format!("{part}.wgsl"));
            println!("cargo:rerun-if-changed={}", common.display());
            source.push('\n');
            source.push_str(
                &std::fs::read_to_string(&common).unwrap_or_else(|e| panic!("reading {}: {e}", common.display())),
            );
        }
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string_with_path(&source, path.to_string_lossy().as_ref())));
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string_with_path(&source, path.to_string_lossy().as_ref())));
        let options = naga::back::spv::Options {
            lang_version: (1, 0),
            flags: naga::back::spv::WriterFlags::empty(),
            ..Default::default()
        };
        let words = naga::back::spv::write_vec(&module, &info, &options, None)
            .unwrap_or_else(|e| panic!("SPIR-V for {}: {e}", path.display()));
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(out.join(format!("{name}.spv")), bytes).expect("writing SPIR-V");
    }
}
