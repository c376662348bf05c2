// The demo title's scene: every object is a list of coloured triangles built on the CPU
// each frame (positions already in clip space), so the shaders stay trivial and the
// same on every GPU, lavapipe included.
//
// `fs_main` draws RGBA. `fs_luma` and `fs_chroma` draw the same triangles straight into
// the two planes of NV12 (luma at full size, interleaved chroma at half size in each
// direction), so the demo's frames need no conversion pass: the colour is converted per
// fragment (yuv.wgsl, appended by build.rs), and blending stays exact because the
// conversion is affine.

struct VertexOut {
    @builtin(position) position: vec4<f32>,
    @location(0) color: vec4<f32>,
};

@vertex
fn vs_main(@location(0) position: vec2<f32>, @location(1) color: vec4<f32>) -> VertexOut {
    var out: VertexOut;
    out.position = vec4<f32>(position, 0.0, 1.0);
    out.color = color;
    return out;
}

@fragment
fn fs_main(in: VertexOut) -> @location(0) vec4<f32> {
    return in.color;
}

@fragment
fn fs_luma(in: VertexOut) -> @location(0) vec4<f32> {
    return vec4<f32>(luma(in.color.rgb) / 255.0, 0.0, 0.0, in.color.a);
}

@fragment
fn fs_chroma(in: VertexOut) -> @location(0) vec4<f32> {
    return vec4<f32>(chroma(in.color.rgb) / 255.0, 0.0, in.color.a);
}
