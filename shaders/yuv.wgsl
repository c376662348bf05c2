// BT.709 limited-range colour conversion, shared (build.rs appends this file) by the
// scene's plane shaders and the NV12 compute shaders, so every path makes the same bytes.
// Values are in code units (16..235 luma, 16..240 chroma), not yet rounded.

fn luma(c: vec3<f32>) -> f32 {
    return 16.0 + 219.0 * dot(c, vec3<f32>(0.2126, 0.7152, 0.0722));
}

fn chroma(c: vec3<f32>) -> vec2<f32> {
    let y = dot(c, vec3<f32>(0.2126, 0.7152, 0.0722));
    return vec2<f32>(128.0 + 224.0 * (c.b - y) / 1.8556, 128.0 + 224.0 * (c.r - y) / 1.5748);
}
