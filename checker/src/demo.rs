//! Reading the built-in demo's ship off a decoded picture: where it is and which way it
//! points. The hull is a warm orange nothing else in the scene uses; behind it burns a
//! red engine flame and ahead of its centre sits a light-blue cockpit, so the heading is
//! the direction from the flame's centroid to the cockpit's, about 1.3 ship lengths apart
//! (`server/src/scene.rs` draws them). Only pixels near the hull count, so stars, bullets
//! and the muzzle flash cannot pull either centroid.

use crate::decode::Picture;

/// The ship as seen in one picture: centroid of the hull (pixels) and heading (radians,
/// the scene's convention: `atan2(dy, dx)` in picture coordinates, y down).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    pub x: f32,
    pub y: f32,
    pub heading: f32,
}

/// Fewer hull pixels than this (at the sampling step) is no ship.
const MIN_HULL: u32 = 20;
/// Fewer flame or cockpit pixels than this is no heading.
const MIN_MARK: u32 = 3;
/// How far around a known position to look for the hull, pixels.
const WINDOW: i32 = 120;
/// How far from the hull's centre the flame and cockpit may be, pixels.
const REACH: f32 = 60.0;

/// BT.709 limited range, as the node encodes (`shaders/yuv.wgsl`), to 8-bit RGB.
fn rgb(y: u8, u: u8, v: u8) -> (f32, f32, f32) {
    let (y, u, v) = (1.164 * (f32::from(y) - 16.0), f32::from(u) - 128.0, f32::from(v) - 128.0);
    (y + 1.793 * v, y - 0.213 * u - 0.533 * v, y + 2.112 * u)
}

fn is_hull((r, g, b): (f32, f32, f32)) -> bool {
    r > 190.0 && (125.0..200.0).contains(&g) && b < 90.0
}

fn is_flame((r, g, b): (f32, f32, f32)) -> bool {
    r > 170.0 && g < 125.0 && b < 80.0
}

/// Light blue (0.55, 0.85, 1.0): far bluer than red, which no star is.
fn is_cockpit((r, g, b): (f32, f32, f32)) -> bool {
    b > 190.0 && g > 150.0 && b - r > 60.0
}

/// A running centroid.
#[derive(Default, Clone, Copy)]
struct Centroid(u32, f32, f32);

impl Centroid {
    fn add(&mut self, x: i32, y: i32) {
        *self = Self(self.0 + 1, self.1 + x as f32, self.2 + y as f32);
    }
    fn at(self, min: u32) -> Option<(f32, f32)> {
        (self.0 >= min).then(|| (self.1 / self.0 as f32, self.2 / self.0 as f32))
    }
}

/// Finds the ship, searching around `near` when given (its last position), else the whole
/// picture at every second pixel for the hull first.
pub fn ship_pose(p: &Picture, near: Option<(f32, f32)>) -> Option<Pose> {
    let (w, h) = (p.width as i32, p.height as i32);
    let pixel =
        |x: i32, y: i32| rgb(p.y_at(x as u32, y as u32), p.u_at(x as u32, y as u32), p.v_at(x as u32, y as u32));
    let (hx, hy) = match near {
        Some(at) => at,
        None => {
            let mut hull = Centroid::default();
            for y in (0..h).step_by(2) {
                for x in (0..w).step_by(2) {
                    if is_hull(pixel(x, y)) {
                        hull.add(x, y);
                    }
                }
            }
            hull.at(MIN_HULL / 4)?
        }
    };
    let (cx, cy) = (hx as i32, hy as i32);
    let (mut hull, mut flame, mut cockpit) = (Centroid::default(), Centroid::default(), Centroid::default());
    for y in (cy - WINDOW).max(0)..(cy + WINDOW).min(h) {
        for x in (cx - WINDOW).max(0)..(cx + WINDOW).min(w) {
            let c = pixel(x, y);
            if is_hull(c) {
                hull.add(x, y);
            }
        }
    }
    let (hx, hy) = hull.at(MIN_HULL)?;
    // The flame and cockpit lie within a ship length of the hull's centre.
    let near_hull = |x: i32, y: i32| (x as f32 - hx).hypot(y as f32 - hy) <= REACH;
    let (cx, cy) = (hx as i32, hy as i32);
    let r = REACH as i32;
    for y in (cy - r).max(0)..(cy + r).min(h) {
        for x in (cx - r).max(0)..(cx + r).min(w) {
            if !near_hull(x, y) {
                continue;
            }
            let c = pixel(x, y);
            if is_flame(c) {
                flame.add(x, y);
            } else if is_cockpit(c) {
                cockpit.add(x, y);
            }
        }
    }
    let (fx, fy) = flame.at(MIN_MARK)?;
    let (kx, ky) = cockpit.at(MIN_MARK)?;
    Some(Pose { x: hx, y: hy, heading: (ky - fy).atan2(kx - fx) })
}

/// The smallest angle between two headings, radians (0..=π).
pub fn angle_between(a: f32, b: f32) -> f32 {
    let d = (a - b).rem_euclid(std::f32::consts::TAU);
    d.min(std::f32::consts::TAU - d)
}
