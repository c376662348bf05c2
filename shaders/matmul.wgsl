// Proof of capacity: C = A·B mod 2^32 for n×n matrices of u32 (row-major), n a multiple
// of 16. One invocation per element of C; each 16×16 workgroup walks the shared dimension
// a 16×16 tile of A and of B at a time through workgroup memory. u32 arithmetic wraps, which
// is the product the checker verifies (proto::capacity).

struct Params {
    n: u32,
}

var<push_constant> params: Params;

@group(0) @binding(0) var<storage, read> a: array<u32>;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> c: array<u32>;

var<workgroup> tile_a: array<array<u32, 16>, 16>;
var<workgroup> tile_b: array<array<u32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let n = params.n;
    let row = gid.y;
    let col = gid.x;
    var acc = 0u;
    for (var t = 0u; t < n; t += 16u) {
        tile_a[lid.y][lid.x] = a[row * n + t + lid.x];
        tile_b[lid.y][lid.x] = b[(t + lid.y) * n + col];
        workgroupBarrier();
        for (var k = 0u; k < 16u; k++) {
            acc += tile_a[lid.y][k] * tile_b[k][lid.x];
        }
        workgroupBarrier();
    }
    c[row * n + col] = acc;
}
