// The NV12 block conversion shared by nv12.wgsl and nv12_packed.wgsl (build.rs appends
// this file and yuv.wgsl to each): BT.709, limited range. One invocation converts a block of 4x2
// pixels read with the including shader's `px`: two 32-bit words of luma (4 bytes on each
// of the two rows) and one word of interleaved chroma (U0 V0 U1 V1), each chroma sample
// the average of a 2x2 pixel square. Width a multiple of 4, height of 2; luma pitch = width.

fn pack4(a: f32, b: f32, c: f32, d: f32) -> u32 {
    let v = clamp(round(vec4<f32>(a, b, c, d)), vec4<f32>(0.0), vec4<f32>(255.0));
    let u = vec4<u32>(v);
    return u.x | (u.y << 8u) | (u.z << 16u) | (u.w << 24u);
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let x = id.x * 4u;
    let y = id.y * 2u;
    if (x >= params.width || y >= params.height) {
        return;
    }
    // Unrolled on purpose: CPU implementations (lavapipe) keep these in registers.
    let t0 = px(x, y);
    let t1 = px(x + 1u, y);
    let t2 = px(x + 2u, y);
    let t3 = px(x + 3u, y);
    let b0 = px(x, y + 1u);
    let b1 = px(x + 1u, y + 1u);
    let b2 = px(x + 2u, y + 1u);
    let b3 = px(x + 3u, y + 1u);
    let words_per_row = params.width / 4u;
    let row0 = y * words_per_row + id.x;
    nv12[row0] = pack4(luma(t0), luma(t1), luma(t2), luma(t3));
    nv12[row0 + words_per_row] = pack4(luma(b0), luma(b1), luma(b2), luma(b3));
    let left = chroma((t0 + t1 + b0 + b1) * 0.25);
    let right = chroma((t2 + t3 + b2 + b3) * 0.25);
    nv12[params.uv_offset_words + id.y * words_per_row + id.x] = pack4(left.x, left.y, right.x, right.y);
}
