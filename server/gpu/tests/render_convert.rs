//! Renders on whatever Vulkan device the machine has (lavapipe on CI) and checks the
//! NV12 output of the compute conversion against the BT.709 limited-range formulas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pylon_gpu::{FrameRenderer, Picture, PixelOrder, RendererConfig, Vertex, Work};
use std::time::Duration;

fn quad(x0: f32, y0: f32, x1: f32, y1: f32, color: [f32; 4]) -> [Vertex; 6] {
    let v = |x, y| Vertex { pos: [x, y], color };
    [v(x0, y0), v(x1, y0), v(x1, y1), v(x0, y0), v(x1, y1), v(x0, y1)]
}

#[test]
fn renders_and_converts_to_nv12() {
    let mut r = FrameRenderer::new(&RendererConfig {
        width: 64,
        height: 32,
        gpu: None,
        slots: 2,
        clear_color: [0.0, 0.0, 0.0, 1.0],
    })
    .expect("a Vulkan device (install mesa-vulkan-drivers)");
    // Left half white, right half pure red.
    let mut verts = Vec::new();
    verts.extend(quad(-1.0, -1.0, 0.0, 1.0, [1.0, 1.0, 1.0, 1.0]));
    verts.extend(quad(0.0, -1.0, 1.0, 1.0, [1.0, 0.0, 0.0, 1.0]));
    for slot in 0..2 {
        r.submit(slot, &verts, Work::RenderAndConvert).unwrap();
    }
    assert!(r.nv12(1).is_none(), "in-flight slots are not readable");
    for slot in 0..2 {
        r.wait(slot, Duration::from_secs(10)).unwrap();
        let nv12 = r.nv12(slot).unwrap();
        assert_eq!(nv12.len(), 64 * 32 * 3 / 2);
        let y = |x: usize, row: usize| nv12[row * 64 + x];
        let uv = |x: usize, row: usize| (nv12[64 * 32 + row * 64 + 2 * x], nv12[64 * 32 + row * 64 + 2 * x + 1]);
        // White: Y=235, U=V=128. Red (BT.709): Y=63, U=102, V=240.
        assert_eq!(y(5, 7), 235);
        assert_eq!(uv(2, 3), (128, 128));
        let red_y = y(50, 20);
        assert!((62..=64).contains(&red_y), "red luma {red_y}");
        let (u, v) = uv(25, 10);
        assert!((101..=103).contains(&u) && (239..=241).contains(&v), "red chroma {u},{v}");
    }
    // Render-only work leaves the previous NV12 contents alone and still completes.
    r.submit(0, &verts, Work::RenderOnly).unwrap();
    r.wait(0, Duration::from_secs(10)).unwrap();
}

#[test]
fn odd_sizes_are_refused_with_a_clear_error() {
    let err =
        FrameRenderer::new(&RendererConfig { width: 1279, height: 720, gpu: None, slots: 1, clear_color: [0.0; 4] })
            .unwrap_err();
    assert!(err.to_string().contains("multiple of 4"), "{err}");
}

/// A picture `w` x `h`, BGRX with a row padding of 8 bytes: left half white, right half red.
fn captured(w: u32, h: u32) -> (Vec<u8>, usize) {
    let stride = w as usize * 4 + 8;
    let mut px = vec![0u8; stride * h as usize];
    for y in 0..h as usize {
        for x in 0..w as usize {
            let p = &mut px[y * stride + x * 4..y * stride + x * 4 + 4];
            p.copy_from_slice(if x < w as usize / 2 { &[255, 255, 255, 0] } else { &[0, 0, 255, 0] });
        }
    }
    (px, stride)
}

#[test]
fn uploaded_captures_convert_like_rendered_frames_at_their_size_or_scaled() {
    let mut r = FrameRenderer::new(&RendererConfig {
        width: 64,
        height: 32,
        gpu: None,
        slots: 2,
        clear_color: [0.0, 0.0, 0.0, 1.0],
    })
    .expect("a Vulkan device (install mesa-vulkan-drivers)");
    // Same size as the stream, then a larger picture scaled down, then a render again:
    // the slot moves between the paths.
    for (slot, (w, h)) in [(0, (64, 32)), (1, (128, 48)), (0, (128, 48)), (1, (64, 32))] {
        let (px, stride) = captured(w, h);
        r.submit_upload(slot, Picture { width: w, height: h, stride, pixels: &px, order: PixelOrder::Bgrx }).unwrap();
        r.wait(slot, Duration::from_secs(10)).unwrap();
        let nv12 = r.nv12(slot).unwrap();
        let y = |x: usize, row: usize| nv12[row * 64 + x];
        let uv = |x: usize, row: usize| (nv12[64 * 32 + row * 64 + 2 * x], nv12[64 * 32 + row * 64 + 2 * x + 1]);
        assert_eq!(y(5, 7), 235, "{w}x{h}: white luma");
        assert_eq!(uv(2, 3), (128, 128), "{w}x{h}: white chroma");
        let red_y = y(50, 20);
        assert!((62..=64).contains(&red_y), "{w}x{h}: red luma {red_y} (blue and red swapped?)");
        let (u, v) = uv(25, 10);
        assert!((101..=103).contains(&u) && (239..=241).contains(&v), "{w}x{h}: red chroma {u},{v}");
    }
    let verts = quad(-1.0, -1.0, 1.0, 1.0, [1.0, 1.0, 1.0, 1.0]);
    r.submit(0, &verts, Work::RenderAndConvert).unwrap();
    r.wait(0, Duration::from_secs(10)).unwrap();
    assert_eq!(r.nv12(0).unwrap()[64 + 20], 235, "rendering still works after uploads");
    // A picture shorter than it claims is refused, not read past its end.
    let err = r
        .submit_upload(0, Picture { width: 64, height: 32, stride: 256, pixels: &[0; 100], order: PixelOrder::Rgbx })
        .unwrap_err();
    assert!(err.to_string().contains("64"), "{err}");
}
