// Packed 32-bit pixels -> NV12 (BT.709, limited range), for pictures uploaded at the
// stream's size (a captured title's screen): read straight from the upload buffer, with
// no copy into an image first. The conversion itself is nv12_common.wgsl, which build.rs
// appends.

struct Params {
    width: u32,
    height: u32,
    // Offset of the interleaved UV plane, in 32-bit words.
    uv_offset_words: u32,
    // 1 when the bytes are B, G, R, X (X11 ZPixmap); 0 for R, G, B, X.
    swap_rb: u32,
    // Source row length in 32-bit words.
    stride_words: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<storage, read> source: array<u32>;
@group(0) @binding(1) var<storage, read_write> nv12: array<u32>;
var<push_constant> params: Params;

fn px(x: u32, y: u32) -> vec3<f32> {
    let w = source[y * params.stride_words + x];
    let c = vec3<f32>(f32(w & 0xffu), f32((w >> 8u) & 0xffu), f32((w >> 16u) & 0xffu)) / 255.0;
    return select(c, c.zyx, params.swap_rb != 0u);
}
