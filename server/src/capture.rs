//! A studio title's frames from its Vulkan present layer, on the render thread.
//!
//! [`LayerSource`] reads the session's capture socket, imports the layer's ring of
//! exported images into the renderer ([`FrameRenderer::import_ring`]) and hands the render
//! loop the newest presented frame at each tick. Which images the node holds is decided
//! by [`Holding`], a small state machine with no I/O: the newest announced frame
//! (`pending`), the last one converted (kept for refreshes and keyframes while the title
//! shows a still picture) and those in flight; every other image goes back to the layer
//! at once, so it always has one to copy into.
//!
//! When there is no ring (not a Vulkan title, the layer refused, or the link closed), the
//! render loop grabs the X screen with XShm as before.

use pylon_gpu::{ExportedRing, FrameRenderer};
use pylon_proto::capture::{self, NodeMessage, RefuseReason};
use pylon_title::capture::{CaptureEvent, CaptureServer};

use crate::metrics::ServerMetrics;

const RING: usize = capture::MAX_RING as usize;

/// Which ring images the node holds, and which it gives back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holding {
    /// Announced by the layer and not released yet.
    held: [bool; RING],
    /// The newest announced frame, not converted yet.
    pending: Option<u8>,
    /// The last image handed to a conversion.
    last: Option<u8>,
    /// Conversions in flight per image.
    in_use: [u32; RING],
}

impl Holding {
    /// The layer announced a frame in `image`. Returns images to release.
    pub fn announced(&mut self, image: u8) -> Vec<u8> {
        let Some(h) = self.held.get_mut(usize::from(image)) else { return Vec::new() };
        *h = true;
        self.pending = Some(image);
        self.releasable()
    }

    /// The image to convert at this tick: the newest frame, or with `refresh` (a still
    /// picture needs a frame now and then) the last one again. `None`: nothing to show.
    pub fn take(&mut self, refresh: bool) -> Option<u8> {
        let image = self.pending.take().or(if refresh { self.last } else { None })?;
        if let Some(n) = self.in_use.get_mut(usize::from(image)) {
            *n += 1;
        }
        self.last = Some(image);
        Some(image)
    }

    /// A conversion of `image` finished. Returns images to release.
    pub fn converted(&mut self, image: u8) -> Vec<u8> {
        if let Some(n) = self.in_use.get_mut(usize::from(image)) {
            *n = n.saturating_sub(1);
        }
        self.releasable()
    }

    /// Whether a new frame waits.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    fn releasable(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..RING {
            let image = i as u8;
            if self.held[i] && self.in_use[i] == 0 && self.pending != Some(image) && self.last != Some(image) {
                self.held[i] = false;
                out.push(image);
            }
        }
        out
    }
}

/// The title's capture link and the ring imported from it.
#[derive(Debug)]
pub struct LayerSource {
    server: CaptureServer,
    /// The imported ring's generation.
    generation: Option<u32>,
    holding: Holding,
    events: Vec<CaptureEvent>,
}

impl LayerSource {
    /// Serves the session's capture socket.
    pub fn new(server: CaptureServer) -> Self {
        Self { server, generation: None, holding: Holding::default(), events: Vec::new() }
    }

    /// Whether frames come from the layer (a ring is imported).
    pub fn active(&self) -> bool {
        self.generation.is_some()
    }

    /// Reads the layer's messages: imports new rings (or refuses them), notes new frames.
    pub fn poll(&mut self, renderer: &mut FrameRenderer, metrics: &ServerMetrics) {
        self.server.poll(&mut self.events);
        for event in std::mem::take(&mut self.events) {
            match event {
                CaptureEvent::Connected => tracing::debug!("the title's Vulkan present layer connected"),
                CaptureEvent::Ring { ring, fds } => {
                    self.forget(renderer);
                    let exported = ExportedRing {
                        width: ring.width,
                        height: ring.height,
                        bgra: ring.format == capture::FORMAT_BGRA8,
                        memory_type: ring.memory_type,
                        sizes: &ring.sizes,
                        device_uuid: ring.device_uuid,
                        driver_uuid: ring.driver_uuid,
                    };
                    match renderer.import_ring(&exported, fds) {
                        Ok(()) => {
                            self.generation = Some(ring.generation);
                            let (w, h) = (ring.width, ring.height);
                            let direct = renderer.size() == (w, h);
                            tracing::info!(
                                capture_path = "layer",
                                "capture path: Vulkan present layer ({w}x{h} ring of {}, {}); no CPU copy of the picture",
                                ring.sizes.len(),
                                if direct { "converted in place" } else { "scaled to the stream's size" }
                            );
                        }
                        Err(e) => {
                            let reason = match e {
                                pylon_gpu::ImportError::OtherDevice(_) => RefuseReason::OtherDevice,
                                pylon_gpu::ImportError::Mismatch(_) => RefuseReason::BadDescriptor,
                                _ => RefuseReason::ImportFailed,
                            };
                            tracing::warn!(
                                capture_path = "xshm",
                                "capture path stays XShm: the title's frames cannot be imported: {e}"
                            );
                            metrics.capture_refused.inc();
                            self.server.send(NodeMessage::Refuse { generation: ring.generation, reason: reason as u8 });
                        }
                    }
                }
                CaptureEvent::Frame { generation, image, .. } => {
                    if self.generation == Some(generation) {
                        for old in self.holding.announced(image) {
                            self.server.send(NodeMessage::Release { generation, image: old });
                        }
                    }
                }
                CaptureEvent::Malformed(why) => {
                    metrics.capture_refused.inc();
                    tracing::debug!("dropped a message from the title's present layer: {why}");
                }
                CaptureEvent::Closed => {
                    if self.active() {
                        tracing::info!(
                            capture_path = "xshm",
                            "the title closed its present layer's link; capture path: XShm"
                        );
                    }
                    self.forget(renderer);
                }
            }
        }
    }

    /// The ring image to convert now (see [`Holding::take`]).
    pub fn take(&mut self, refresh: bool) -> Option<u8> {
        if self.active() { self.holding.take(refresh) } else { None }
    }

    /// Whether a new frame waits.
    pub fn has_pending(&self) -> bool {
        self.holding.has_pending()
    }

    /// A conversion of `image` finished: the images no longer needed go back.
    pub fn converted(&mut self, image: u8) {
        let Some(generation) = self.generation else { return };
        for old in self.holding.converted(image) {
            self.server.send(NodeMessage::Release { generation, image: old });
        }
    }

    fn forget(&mut self, renderer: &mut FrameRenderer) {
        if self.generation.take().is_some()
            && let Err(e) = renderer.drop_ring()
        {
            tracing::warn!("releasing the title's ring: {e}");
        }
        self.holding = Holding::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_keeps_the_newest_and_the_last_frame_and_gives_back_the_rest() {
        let mut h = Holding::default();
        assert_eq!(h.take(true), None, "nothing announced yet");
        assert!(h.announced(0).is_empty());
        // A newer frame supersedes one not converted yet: the older goes back at once.
        assert_eq!(h.announced(1), vec![0]);
        assert_eq!(h.take(false), Some(1));
        assert_eq!(h.take(false), None, "no new frame");
        assert_eq!(h.announced(2), Vec::<u8>::new());
        // Image 1 is in flight and is the last one: kept until a newer conversion ends.
        assert_eq!(h.take(false), Some(2));
        assert_eq!(h.converted(1), vec![1]);
        assert_eq!(h.converted(2), Vec::<u8>::new(), "the last frame is kept for refreshes");
        // A still picture: the last frame is converted again when a refresh is due.
        assert_eq!(h.take(false), None);
        assert_eq!(h.take(true), Some(2));
        assert_eq!(h.converted(2), Vec::<u8>::new());
        assert_eq!(h.announced(0), Vec::<u8>::new());
        assert_eq!(h.take(true), Some(0));
        assert_eq!(h.converted(0), vec![2]);
        // Never more than two held at once in steady state: the layer always has one free.
        assert!(h.held.iter().filter(|&&x| x).count() <= 2);
        // Out-of-range images are ignored.
        assert!(h.announced(200).is_empty());
        assert!(h.converted(200).is_empty());
    }
}
