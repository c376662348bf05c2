//! The capture link between a studio title's Vulkan present layer and the render node.
//!
//! The layer (`pylon-vklayer`, loaded into the title) copies each presented swapchain
//! image into a small ring of exportable images and tells the node about them over a
//! per-session Unix `SOCK_SEQPACKET` socket; the node imports the ring's memory and
//! converts each announced frame in its NV12 pass. One message per packet, little-endian:
//!
//! | kind | direction | body |
//! |------|-----------|------|
//! | 1 `Ring` | layer → node | generation u32, width u32, height u32, format i32 (`VkFormat`), images u8, memory type u32, allocation size u64 × images, device UUID \[16\], driver UUID \[16\]; one file descriptor per image rides along (`SCM_RIGHTS`) |
//! | 2 `Frame` | layer → node | generation u32, image u8, sequence u64, present time u64 (ns, `CLOCK_MONOTONIC`) |
//! | 3 `Release` | node → layer | generation u32, image u8 |
//! | 4 `Refuse` | node → layer | generation u32, reason u8 |
//!
//! Every message starts with [`MAGIC`] and [`VERSION`]. The ring's images are 2-D, one
//! mip level, one layer, `VK_IMAGE_TILING_OPTIMAL`, usage [`IMAGE_USAGE`], no flags, with
//! `VK_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD_BIT` memory: both sides create them with
//! exactly these parameters, as Vulkan requires for an import. A new swapchain starts a
//! new generation; frames and releases of an older generation are ignored.
//!
//! The title is not trusted: [`LayerMessage::decode`] checks every field against the
//! limits below, and the node checks the descriptors before importing them.

/// First bytes of every message.
pub const MAGIC: [u8; 4] = *b"PYLC";
/// Protocol version.
pub const VERSION: u8 = 1;
/// Most images in a ring.
pub const MAX_RING: u8 = 4;
/// Largest picture side.
pub const MAX_SIDE: u32 = 8192;
/// Largest allocation of one image (a 8192×8192 RGBA picture with room for padding).
pub const MAX_ALLOCATION: u64 = 8192 * 8192 * 4 * 2;
/// Longest message.
pub const MAX_MESSAGE: usize = 128;
/// `VkFormat` `VK_FORMAT_R8G8B8A8_UNORM`.
pub const FORMAT_RGBA8: i32 = 37;
/// `VkFormat` `VK_FORMAT_B8G8R8A8_UNORM`.
pub const FORMAT_BGRA8: i32 = 44;
/// `VkImageUsageFlags` of the ring's images: `TRANSFER_SRC | TRANSFER_DST | SAMPLED`.
pub const IMAGE_USAGE: u32 = 0x1 | 0x2 | 0x4;

/// Why a capture message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// Shorter than its kind needs.
    #[error("capture message truncated")]
    Truncated,
    /// Longer than its kind allows.
    #[error("capture message has {0} trailing bytes")]
    Trailing(usize),
    /// Not this protocol, or another version.
    #[error("not a capture message of version {VERSION}")]
    BadMagic,
    /// Unknown kind.
    #[error("unknown capture message kind {0}")]
    UnknownKind(u8),
    /// A field is out of range.
    #[error("capture message field {field} out of range: {value}")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// A ring of exported images (one descriptor per image travels with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    /// Starts at 1 and grows with each new swapchain.
    pub generation: u32,
    /// Pixels wide.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// [`FORMAT_BGRA8`] or [`FORMAT_RGBA8`].
    pub format: i32,
    /// The memory type index the images' memory was allocated from.
    pub memory_type: u32,
    /// Each image's allocation size (1 to [`MAX_RING`] images).
    pub sizes: Vec<u64>,
    /// `VkPhysicalDeviceIDProperties::deviceUUID` of the exporting device.
    pub device_uuid: [u8; 16],
    /// `VkPhysicalDeviceIDProperties::driverUUID` of the exporting driver.
    pub driver_uuid: [u8; 16],
}

/// What the layer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerMessage {
    /// A new ring.
    Ring(Ring),
    /// Image `image` of ring `generation` holds presented frame `seq`, complete.
    Frame {
        /// Ring generation.
        generation: u32,
        /// Image index in the ring.
        image: u8,
        /// Present count since the layer loaded.
        seq: u64,
        /// When the title presented it (`CLOCK_MONOTONIC`, ns).
        presented_ns: u64,
    },
}

/// Why the node will not take a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefuseReason {
    /// The title renders on another device or driver than the node's.
    OtherDevice = 1,
    /// Importing the memory failed.
    ImportFailed = 2,
    /// The descriptors failed the node's checks.
    BadDescriptor = 3,
}

/// What the node says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMessage {
    /// The node is done reading image `image` of ring `generation`.
    Release {
        /// Ring generation.
        generation: u32,
        /// Image index.
        image: u8,
    },
    /// The node will not use ring `generation`: stop copying into it.
    Refuse {
        /// Ring generation.
        generation: u32,
        /// Why (a [`RefuseReason`] value; unknown values are kept as they are).
        reason: u8,
    },
}

const KIND_RING: u8 = 1;
const KIND_FRAME: u8 = 2;
const KIND_RELEASE: u8 = 3;
const KIND_REFUSE: u8 = 4;

fn header(kind: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_MESSAGE);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out
}

/// A little-endian reader that fails with [`CaptureError::Truncated`].
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], CaptureError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(CaptureError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, CaptureError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, CaptureError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn i32(&mut self) -> Result<i32, CaptureError> {
        Ok(i32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, CaptureError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn end(&self) -> Result<(), CaptureError> {
        if self.0.is_empty() { Ok(()) } else { Err(CaptureError::Trailing(self.0.len())) }
    }
}

/// Reads the header, returning the kind and the body.
fn open(bytes: &[u8]) -> Result<(u8, Reader<'_>), CaptureError> {
    let mut r = Reader(bytes);
    if r.take::<4>()? != MAGIC || r.u8()? != VERSION {
        return Err(CaptureError::BadMagic);
    }
    let kind = r.u8()?;
    Ok((kind, r))
}

fn range(field: &'static str, value: u64, ok: bool) -> Result<(), CaptureError> {
    if ok { Ok(()) } else { Err(CaptureError::OutOfRange { field, value }) }
}

impl LayerMessage {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Ring(r) => {
                let mut out = header(KIND_RING);
                out.extend_from_slice(&r.generation.to_le_bytes());
                out.extend_from_slice(&r.width.to_le_bytes());
                out.extend_from_slice(&r.height.to_le_bytes());
                out.extend_from_slice(&r.format.to_le_bytes());
                out.push(u8::try_from(r.sizes.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(&r.memory_type.to_le_bytes());
                for s in &r.sizes {
                    out.extend_from_slice(&s.to_le_bytes());
                }
                out.extend_from_slice(&r.device_uuid);
                out.extend_from_slice(&r.driver_uuid);
                out
            }
            Self::Frame { generation, image, seq, presented_ns } => {
                let mut out = header(KIND_FRAME);
                out.extend_from_slice(&generation.to_le_bytes());
                out.push(*image);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&presented_ns.to_le_bytes());
                out
            }
        }
    }

    /// Parses and checks one message from the layer.
    pub fn decode(bytes: &[u8]) -> Result<Self, CaptureError> {
        let (kind, mut r) = open(bytes)?;
        let message = match kind {
            KIND_RING => {
                let generation = r.u32()?;
                let width = r.u32()?;
                let height = r.u32()?;
                let format = r.i32()?;
                let images = r.u8()?;
                let memory_type = r.u32()?;
                range("width", width.into(), (1..=MAX_SIDE).contains(&width))?;
                range("height", height.into(), (1..=MAX_SIDE).contains(&height))?;
                range("format", format as u64, format == FORMAT_BGRA8 || format == FORMAT_RGBA8)?;
                range("images", images.into(), (1..=MAX_RING).contains(&images))?;
                range("memory type", memory_type.into(), memory_type < 32)?;
                let mut sizes = Vec::with_capacity(images.into());
                for _ in 0..images {
                    let size = r.u64()?;
                    let least = u64::from(width) * u64::from(height) * 4;
                    range("allocation size", size, (least..=MAX_ALLOCATION).contains(&size))?;
                    sizes.push(size);
                }
                let device_uuid = r.take()?;
                let driver_uuid = r.take()?;
                Self::Ring(Ring { generation, width, height, format, memory_type, sizes, device_uuid, driver_uuid })
            }
            KIND_FRAME => {
                let generation = r.u32()?;
                let image = r.u8()?;
                range("image", image.into(), image < MAX_RING)?;
                Self::Frame { generation, image, seq: r.u64()?, presented_ns: r.u64()? }
            }
            other => return Err(CaptureError::UnknownKind(other)),
        };
        r.end()?;
        Ok(message)
    }

    /// How many file descriptors travel with the message.
    pub fn descriptors(&self) -> usize {
        match self {
            Self::Ring(r) => r.sizes.len(),
            Self::Frame { .. } => 0,
        }
    }
}

impl NodeMessage {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Release { generation, image } => {
                let mut out = header(KIND_RELEASE);
                out.extend_from_slice(&generation.to_le_bytes());
                out.push(*image);
                out
            }
            Self::Refuse { generation, reason } => {
                let mut out = header(KIND_REFUSE);
                out.extend_from_slice(&generation.to_le_bytes());
                out.push(*reason);
                out
            }
        }
    }

    /// Parses one message from the node.
    pub fn decode(bytes: &[u8]) -> Result<Self, CaptureError> {
        let (kind, mut r) = open(bytes)?;
        let message = match kind {
            KIND_RELEASE => {
                let generation = r.u32()?;
                let image = r.u8()?;
                range("image", image.into(), image < MAX_RING)?;
                Self::Release { generation, image }
            }
            KIND_REFUSE => Self::Refuse { generation: r.u32()?, reason: r.u8()? },
            other => return Err(CaptureError::UnknownKind(other)),
        };
        r.end()?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> LayerMessage {
        LayerMessage::Ring(Ring {
            generation: 3,
            width: 1280,
            height: 720,
            format: FORMAT_BGRA8,
            memory_type: 2,
            sizes: vec![1280 * 720 * 4; 3],
            device_uuid: [7; 16],
            driver_uuid: [9; 16],
        })
    }

    #[test]
    fn messages_round_trip() {
        let frame = LayerMessage::Frame { generation: 3, image: 2, seq: 99, presented_ns: 123_456_789 };
        for m in [ring(), frame] {
            let bytes = m.encode();
            assert!(bytes.len() <= MAX_MESSAGE);
            assert_eq!(LayerMessage::decode(&bytes).unwrap(), m);
        }
        assert_eq!(ring().descriptors(), 3);
        for m in [NodeMessage::Release { generation: 1, image: 3 }, NodeMessage::Refuse { generation: 2, reason: 1 }] {
            assert_eq!(NodeMessage::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        for m in [ring(), LayerMessage::Frame { generation: 1, image: 0, seq: 1, presented_ns: 1 }] {
            let bytes = m.encode();
            for n in 0..bytes.len() {
                assert!(LayerMessage::decode(&bytes[..n]).is_err(), "{n} bytes");
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(LayerMessage::decode(&long), Err(CaptureError::Trailing(1)));
        }
        let bytes = NodeMessage::Release { generation: 1, image: 0 }.encode();
        for n in 0..bytes.len() {
            assert!(NodeMessage::decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        let LayerMessage::Ring(good) = ring() else { unreachable!() };
        let cases: Vec<(&str, Ring)> = vec![
            ("width", Ring { width: 0, ..good.clone() }),
            ("height", Ring { height: MAX_SIDE + 1, ..good.clone() }),
            ("format", Ring { format: 50, ..good.clone() }),
            ("images", Ring { sizes: vec![], ..good.clone() }),
            ("images", Ring { sizes: vec![1280 * 720 * 4; 5], ..good.clone() }),
            ("memory type", Ring { memory_type: 32, ..good.clone() }),
            ("allocation size", Ring { sizes: vec![16], ..good.clone() }),
            ("allocation size", Ring { sizes: vec![MAX_ALLOCATION + 1], ..good.clone() }),
        ];
        for (field, ring) in cases {
            match LayerMessage::decode(&LayerMessage::Ring(ring).encode()) {
                Err(CaptureError::OutOfRange { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let frame = LayerMessage::Frame { generation: 1, image: MAX_RING, seq: 0, presented_ns: 0 };
        assert!(matches!(LayerMessage::decode(&frame.encode()), Err(CaptureError::OutOfRange { field: "image", .. })));
        let mut other = frame.encode();
        other[4] = VERSION + 1;
        assert_eq!(LayerMessage::decode(&other), Err(CaptureError::BadMagic));
        other[4] = VERSION;
        other[5] = 9;
        assert_eq!(LayerMessage::decode(&other), Err(CaptureError::UnknownKind(9)));
    }
}
