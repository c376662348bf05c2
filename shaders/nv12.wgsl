// RGBA image -> NV12 colour conversion, written straight into a host-visible buffer that
// the CPU reads back. The conversion itself is nv12_common.wgsl, which build.rs appends.

struct Params {
    width: u32,
    height: u32,
    // Offset of the interleaved UV plane, in 32-bit words.
    uv_offset_words: u32,
    // 1 when the source holds B, G, R in its R, G, B channels (an uploaded BGRX capture).
    swap_rb: u32,
};

@group(0) @binding(0) var source: texture_2d<f32>;
@group(0) @binding(1) var<storage, read_write> nv12: array<u32>;
var<push_constant> params: Params;

fn px(x: u32, y: u32) -> vec3<f32> {
    let t = textureLoad(source, vec2<u32>(x, y), 0);
    return select(t.rgb, t.bgr, params.swap_rb != 0u);
}
