//! Builds `shim/pad.c` into `libpylon-pad.so`, the LD_PRELOAD joystick shim the node
//! writes into each session that takes gamepads (see `src/pad.rs`).

fn main() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("shim/pad.c");
    println!("cargo:rerun-if-changed={}", source.display());
    let compiler = cc::Build::new().opt_level(2).get_compiler();
    let status = compiler
        .to_command()
        .args(["-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out.join("libpylon-pad.so"))
        .arg(&source)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler for {}: {e}", source.display()));
    assert!(status.success(), "compiling {} failed", source.display());
}
