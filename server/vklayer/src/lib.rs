//! `VK_LAYER_PYLON_capture`: Pylon's Vulkan present layer.
//!
//! The render node starts a studio title with this layer enabled (an explicit layer: the
//! node writes its manifest into the session and sets `VK_LAYER_PATH` and
//! `VK_INSTANCE_LAYERS`) and with `PYLON_CAPTURE_SOCKET` naming the session's capture
//! socket. Without that variable the layer passes every call through untouched.
//!
//! With it, the layer:
//! * enables `VK_KHR_external_memory_fd` on the title's device (when the device has it)
//!   and adds `TRANSFER_SRC` to its swapchain images' usage;
//! * makes, per swapchain, a ring of [`RING`] images with exportable memory (OPAQUE_FD)
//!   and sends the node their descriptors ([`pylon_proto::capture`]);
//! * on each `vkQueuePresentKHR`, copies the presented image into a ring image the node
//!   does not hold — on the title's queue, after the title's rendering and before the
//!   present (it waits on the title's semaphores and the present waits on the layer's) —
//!   and, once the copy's fence signals, tells the node which image holds the frame
//!   (a helper thread waits, so the title's present never blocks on it);
//! * skips the copy (the frame reaches the screen as usual) when the node holds every
//!   ring image, refused the ring, or went away.
//!
//! No pixel goes through the CPU: the node imports the same memory into its NV12 pass.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_void};
use std::os::fd::{AsFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak, mpsc};
use std::time::Duration;

use ash::vk;
use ash::vk::Handle as _;
use pylon_proto::capture::{self, LayerMessage, NodeMessage, Ring};

/// Images in each ring: one the node converts, one waiting for it, one being copied.
pub const RING: usize = 3;
/// The environment variable naming the session's capture socket.
pub const SOCKET_ENV: &str = "PYLON_CAPTURE_SOCKET";

// ---------------------------------------------------------------------------------------
// The loader ↔ layer interface (vk_layer.h). Only the fields the layer reads are declared;
// the structures are only ever reached through the loader's pointers, never copied.

const LAYER_LINK_INFO: i32 = 0;
const LOADER_DATA_CALLBACK: i32 = 1;

#[repr(C)]
struct InstanceLink {
    next: *mut InstanceLink,
    next_get_instance_proc_addr: vk::PFN_vkGetInstanceProcAddr,
    next_get_physical_device_proc_addr: *const c_void,
}

#[repr(C)]
struct InstanceChain {
    s_type: vk::StructureType,
    p_next: *const c_void,
    function: i32,
    layer_info: *mut InstanceLink,
}

#[repr(C)]
struct DeviceLink {
    next: *mut DeviceLink,
    next_get_instance_proc_addr: vk::PFN_vkGetInstanceProcAddr,
    next_get_device_proc_addr: vk::PFN_vkGetDeviceProcAddr,
}

type SetDeviceLoaderData = unsafe extern "system" fn(vk::Device, *mut c_void) -> vk::Result;

#[repr(C)]
struct DeviceChain {
    s_type: vk::StructureType,
    p_next: *const c_void,
    function: i32,
    /// `pLayerInfo` for `LAYER_LINK_INFO`, `pfnSetDeviceLoaderData` for `LOADER_DATA_CALLBACK`.
    data: *mut c_void,
}

/// `VkNegotiateLayerInterface`.
#[repr(C)]
pub struct NegotiateLayerInterface {
    s_type: i32,
    p_next: *mut c_void,
    loader_layer_interface_version: u32,
    get_instance_proc_addr: Option<vk::PFN_vkGetInstanceProcAddr>,
    get_device_proc_addr: Option<vk::PFN_vkGetDeviceProcAddr>,
    get_physical_device_proc_addr: *const c_void,
}

fn say(message: &str) {
    eprintln!("pylon-vklayer: {message}");
}

/// The loader's dispatch key of a dispatchable handle (its first pointer-sized word).
///
/// # Safety
/// `handle` is a live dispatchable Vulkan handle.
unsafe fn key(handle: u64) -> usize {
    // SAFETY: dispatchable handles point to objects whose first word is the loader's
    // dispatch table pointer, as the caller promises a live one.
    unsafe { *(handle as usize as *const usize) }
}

struct Instance {
    fns: ash::Instance,
    next_gipa: vk::PFN_vkGetInstanceProcAddr,
}

struct Device {
    handle: vk::Device,
    fns: ash::Device,
    next_gdpa: vk::PFN_vkGetDeviceProcAddr,
    swapchain: ash::khr::swapchain::DeviceFn,
    /// Present when the layer enabled external memory (capture possible).
    memory_fd: Option<ash::khr::external_memory_fd::DeviceFn>,
    set_loader_data: Option<SetDeviceLoaderData>,
    memory: vk::PhysicalDeviceMemoryProperties,
    device_uuid: [u8; 16],
    driver_uuid: [u8; 16],
    /// Queue → its family.
    queues: Mutex<HashMap<u64, u32>>,
    capture: Mutex<Option<Arc<Capture>>>,
}

fn instances() -> &'static Mutex<HashMap<usize, Arc<Instance>>> {
    static MAP: OnceLock<Mutex<HashMap<usize, Arc<Instance>>>> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

fn devices() -> &'static Mutex<HashMap<usize, Arc<Device>>> {
    static MAP: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// Captures by ring generation, for the node's releases.
fn captures() -> &'static Mutex<HashMap<u32, Weak<Capture>>> {
    static MAP: OnceLock<Mutex<HashMap<u32, Weak<Capture>>>> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// # Safety
/// `handle` is a live instance or physical device.
unsafe fn instance_of(handle: u64) -> Option<Arc<Instance>> {
    // SAFETY: as the caller promises.
    let k = unsafe { key(handle) };
    lock(instances()).get(&k).cloned()
}

/// # Safety
/// `handle` is a live device, queue or command buffer.
unsafe fn device_of(handle: u64) -> Option<Arc<Device>> {
    // SAFETY: as the caller promises.
    let k = unsafe { key(handle) };
    lock(devices()).get(&k).cloned()
}

// ---------------------------------------------------------------------------------------
// The link to the node.

enum Job {
    Frame { capture: Arc<Capture>, slot: usize, seq: u64, presented_ns: u64 },
    Flush(mpsc::Sender<()>),
}

struct Link {
    socket: OwnedFd,
    alive: AtomicBool,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Link {
    fn send(&self, message: &LayerMessage, fds: &[BorrowedFd<'_>]) -> bool {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let bytes = message.encode();
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(capture::MAX_RING as usize))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return false;
        }
        let sent =
            rustix::net::sendmsg(&self.socket, &[std::io::IoSlice::new(&bytes)], &mut control, SendFlags::NOSIGNAL);
        if sent.is_err() {
            self.alive.store(false, Ordering::Relaxed);
        }
        sent.is_ok()
    }

    fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if lock(&self.jobs).send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(3));
        }
    }
}

/// The session's link, connected on first use; `None` when capture is off.
fn link() -> Option<Arc<Link>> {
    static LINK: OnceLock<Option<Arc<Link>>> = OnceLock::new();
    LINK.get_or_init(|| {
        let path = std::env::var_os(SOCKET_ENV)?;
        let connect = || -> rustix::io::Result<OwnedFd> {
            use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
            let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
            // A path longer than a socket address holds is reached through its directory.
            let path = std::path::Path::new(&path);
            let mut dir = None;
            let mut target = path.to_path_buf();
            if path.as_os_str().len() >= 100
                && let (Some(parent), Some(name)) = (path.parent(), path.file_name())
            {
                use rustix::fs::{Mode, OFlags};
                let d = rustix::fs::open(parent, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
                target = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&d)))
                    .join(name);
                dir = Some(d);
            }
            rustix::net::connect(&fd, &SocketAddrUnix::new(target.as_os_str())?)?;
            drop(dir);
            Ok(fd)
        };
        let socket = match connect() {
            Ok(fd) => fd,
            Err(e) => {
                say(&format!("cannot reach the node at {}: {e}; frames are not captured", path.to_string_lossy()));
                return None;
            }
        };
        let reader = socket.try_clone().ok()?;
        let (tx, rx) = mpsc::channel();
        let link = Arc::new(Link { socket, alive: AtomicBool::new(true), jobs: Mutex::new(tx) });
        let weak = Arc::downgrade(&link);
        std::thread::Builder::new().name("pylon-capture-in".into()).spawn(move || read_node(reader, weak)).ok()?;
        let weak = Arc::downgrade(&link);
        std::thread::Builder::new().name("pylon-capture-out".into()).spawn(move || notify(rx, weak)).ok()?;
        Some(link)
    })
    .clone()
}

/// Applies the node's releases and refusals until the socket closes.
fn read_node(socket: OwnedFd, link: Weak<Link>) {
    let mut buf = [0u8; capture::MAX_MESSAGE];
    loop {
        let n = match rustix::io::read(&socket, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(bytes) = buf.get(..n) else { break };
        let message = match NodeMessage::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                say(&format!("ignoring a message from the node: {e}"));
                continue;
            }
        };
        let (generation, image, refused) = match message {
            NodeMessage::Release { generation, image } => (generation, usize::from(image), false),
            NodeMessage::Refuse { generation, reason } => {
                say(&format!("the node refused ring {generation} (reason {reason}); frames are not captured"));
                (generation, usize::MAX, true)
            }
        };
        let capture = lock(captures()).get(&generation).and_then(Weak::upgrade);
        if let Some(c) = capture {
            if refused {
                c.refused.store(true, Ordering::Relaxed);
            } else if let Some(held) = lock(&c.state).held.get_mut(image) {
                *held = false;
            }
        }
    }
    if let Some(l) = link.upgrade() {
        l.alive.store(false, Ordering::Relaxed);
    }
    say("the node closed the capture link; frames are no longer captured");
}

/// Waits for each copy and tells the node its frame is ready.
fn notify(jobs: mpsc::Receiver<Job>, link: Weak<Link>) {
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Flush(done) => {
                let _ = done.send(());
            }
            Job::Frame { capture, slot, seq, presented_ns } => {
                let Some(fence) = capture.fences.get(slot).copied() else { continue };
                // SAFETY: the fence belongs to the capture's device, which lives until the
                // capture is dropped (`vkDestroyDevice` flushes this queue first).
                let done = unsafe { capture.fns.wait_for_fences(&[fence], true, 2_000_000_000) }.is_ok();
                let link = link.upgrade();
                let live = link.as_ref().is_some_and(|l| l.alive.load(Ordering::Relaxed));
                let announce = done && live && !capture.refused.load(Ordering::Relaxed);
                {
                    // Held from before the announcement: the node's release may come back
                    // before `send` returns.
                    let mut st = lock(&capture.state);
                    if let Some(c) = st.copying.get_mut(slot) {
                        *c = !done;
                    }
                    if let Some(h) = st.held.get_mut(slot) {
                        *h = announce;
                    }
                }
                let frame =
                    LayerMessage::Frame { generation: capture.generation, image: slot as u8, seq, presented_ns };
                if announce
                    && !link.as_ref().is_some_and(|l| l.send(&frame, &[]))
                    && let Some(h) = lock(&capture.state).held.get_mut(slot)
                {
                    *h = false;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Capture of one swapchain.

struct Slots {
    family: Option<u32>,
    pool: vk::CommandPool,
    commands: Vec<vk::CommandBuffer>,
    /// The node holds the image (announced, not released).
    held: [bool; RING],
    /// A copy into the image is in flight.
    copying: [bool; RING],
    skipped: u64,
}

struct Capture {
    fns: ash::Device,
    swapchain: vk::SwapchainKHR,
    images: Vec<vk::Image>,
    extent: vk::Extent2D,
    generation: u32,
    ring: Vec<(vk::Image, vk::DeviceMemory)>,
    fences: Vec<vk::Fence>,
    semaphores: Vec<vk::Semaphore>,
    state: Mutex<Slots>,
    refused: AtomicBool,
    link: Arc<Link>,
}

/// The ring's format for a swapchain format: same bytes, UNORM (the copy keeps them as
/// they are).
fn ring_format(format: vk::Format) -> Option<vk::Format> {
    match format {
        vk::Format::B8G8R8A8_UNORM | vk::Format::B8G8R8A8_SRGB => Some(vk::Format::B8G8R8A8_UNORM),
        vk::Format::R8G8B8A8_UNORM | vk::Format::R8G8B8A8_SRGB => Some(vk::Format::R8G8B8A8_UNORM),
        _ => None,
    }
}

#[derive(Debug)]
struct Failed(&'static str, vk::Result);

impl Capture {
    /// Makes the ring for `swapchain` and sends it to the node.
    fn new(
        dev: &Device,
        link: Arc<Link>,
        swapchain: vk::SwapchainKHR,
        info: &vk::SwapchainCreateInfoKHR<'_>,
    ) -> Result<Arc<Self>, Failed> {
        static GENERATION: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let format = ring_format(info.image_format)
            .ok_or(Failed("an uncapturable swapchain format", vk::Result::ERROR_FORMAT_NOT_SUPPORTED))?;
        let memory_fd =
            dev.memory_fd.as_ref().ok_or(Failed("no external memory", vk::Result::ERROR_EXTENSION_NOT_PRESENT))?;
        let images = {
            let mut count = 0u32;
            // SAFETY: the swapchain was just created on this device; a null array asks for the count.
            let r = unsafe {
                (dev.swapchain.get_swapchain_images_khr)(dev.handle, swapchain, &mut count, std::ptr::null_mut())
            };
            if r != vk::Result::SUCCESS {
                return Err(Failed("listing the swapchain's images", r));
            }
            let mut images = vec![vk::Image::null(); count as usize];
            // SAFETY: `images` has room for `count` handles.
            let r = unsafe {
                (dev.swapchain.get_swapchain_images_khr)(dev.handle, swapchain, &mut count, images.as_mut_ptr())
            };
            if r != vk::Result::SUCCESS && r != vk::Result::INCOMPLETE {
                return Err(Failed("listing the swapchain's images", r));
            }
            images.truncate(count as usize);
            images
        };
        let mut capture = Capture {
            fns: dev.fns.clone(),
            swapchain,
            images,
            extent: info.image_extent,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed) + 1,
            ring: Vec::new(),
            fences: Vec::new(),
            semaphores: Vec::new(),
            state: Mutex::new(Slots {
                family: None,
                pool: vk::CommandPool::null(),
                commands: Vec::new(),
                held: [false; RING],
                copying: [false; RING],
                skipped: 0,
            }),
            refused: AtomicBool::new(false),
            link,
        };
        let d = &dev.fns;
        let mut fds = Vec::new();
        let mut sizes = Vec::new();
        let mut memory_type = 0;
        for _ in 0..RING {
            let mut external =
                vk::ExternalMemoryImageCreateInfo::default().handle_types(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
            let image_info = vk::ImageCreateInfo::default()
                .push_next(&mut external)
                .image_type(vk::ImageType::TYPE_2D)
                .format(format)
                .extent(vk::Extent3D { width: info.image_extent.width, height: info.image_extent.height, depth: 1 })
                .mip_levels(1)
                .array_layers(1)
                .samples(vk::SampleCountFlags::TYPE_1)
                .tiling(vk::ImageTiling::OPTIMAL)
                .usage(vk::ImageUsageFlags::from_raw(capture::IMAGE_USAGE))
                .sharing_mode(vk::SharingMode::EXCLUSIVE)
                .initial_layout(vk::ImageLayout::UNDEFINED);
            // SAFETY: a valid description on this device.
            let image = unsafe { d.create_image(&image_info, None) }.map_err(|r| Failed("creating a ring image", r))?;
            capture.ring.push((image, vk::DeviceMemory::null()));
            // SAFETY: the image was just created on this device.
            let needs = unsafe { d.get_image_memory_requirements(image) };
            let types = &dev.memory.memory_types[..dev.memory.memory_type_count.min(32) as usize];
            let pick = |flags: vk::MemoryPropertyFlags| {
                types
                    .iter()
                    .enumerate()
                    .position(|(i, t)| needs.memory_type_bits & (1 << i) != 0 && t.property_flags.contains(flags))
            };
            let index = pick(vk::MemoryPropertyFlags::DEVICE_LOCAL)
                .or_else(|| pick(vk::MemoryPropertyFlags::empty()))
                .ok_or(Failed("no memory type for a ring image", vk::Result::ERROR_OUT_OF_DEVICE_MEMORY))?;
            memory_type = index as u32;
            let mut export =
                vk::ExportMemoryAllocateInfo::default().handle_types(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
            let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().image(image);
            let alloc = vk::MemoryAllocateInfo::default()
                .push_next(&mut export)
                .push_next(&mut dedicated)
                .allocation_size(needs.size)
                .memory_type_index(memory_type);
            // SAFETY: a valid allocation on this device.
            let memory =
                unsafe { d.allocate_memory(&alloc, None) }.map_err(|r| Failed("allocating a ring image", r))?;
            if let Some(last) = capture.ring.last_mut() {
                last.1 = memory;
            }
            // SAFETY: image and memory belong to this device; the memory was sized for the image.
            unsafe { d.bind_image_memory(image, memory, 0) }.map_err(|r| Failed("binding a ring image", r))?;
            let get = vk::MemoryGetFdInfoKHR::default()
                .memory(memory)
                .handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
            let mut fd = -1;
            // SAFETY: the memory was allocated exportable as OPAQUE_FD.
            let r = unsafe { (memory_fd.get_memory_fd_khr)(dev.handle, &get, &mut fd) };
            if r != vk::Result::SUCCESS || fd < 0 {
                return Err(Failed("exporting a ring image", r));
            }
            // SAFETY: vkGetMemoryFdKHR returned a new descriptor that this layer now owns.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            sizes.push(needs.size);
            // SAFETY: default descriptions are valid; the fence starts signalled so that a
            // wait on a never-used slot returns at once.
            let fence =
                unsafe { d.create_fence(&vk::FenceCreateInfo::default().flags(vk::FenceCreateFlags::SIGNALED), None) }
                    .map_err(|r| Failed("creating a fence", r))?;
            capture.fences.push(fence);
            // SAFETY: as above.
            let semaphore = unsafe { d.create_semaphore(&vk::SemaphoreCreateInfo::default(), None) }
                .map_err(|r| Failed("creating a semaphore", r))?;
            capture.semaphores.push(semaphore);
        }
        let ring = Ring {
            generation: capture.generation,
            width: info.image_extent.width,
            height: info.image_extent.height,
            format: format.as_raw(),
            memory_type,
            sizes,
            device_uuid: dev.device_uuid,
            driver_uuid: dev.driver_uuid,
        };
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        if !capture.link.send(&LayerMessage::Ring(ring), &borrowed) {
            return Err(Failed("sending the ring to the node", vk::Result::ERROR_UNKNOWN));
        }
        let capture = Arc::new(capture);
        let mut map = lock(captures());
        map.retain(|_, c| c.strong_count() > 0);
        map.insert(capture.generation, Arc::downgrade(&capture));
        say(&format!(
            "capturing a {}x{} swapchain ({:?}) into ring {} for the node",
            info.image_extent.width, info.image_extent.height, info.image_format, capture.generation
        ));
        Ok(capture)
    }

    /// Copies the presented image into a free ring image; returns the semaphore the
    /// present must wait on instead of the title's, or `None` when nothing was copied.
    fn copy(&self, dev: &Device, queue: vk::Queue, info: &vk::PresentInfoKHR<'_>) -> Option<vk::Semaphore> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        if self.refused.load(Ordering::Relaxed) || !self.link.alive.load(Ordering::Relaxed) {
            return None;
        }
        let count = info.swapchain_count as usize;
        // SAFETY: the present's arrays hold `swapchain_count` entries (Vulkan valid usage).
        let (swapchains, indices) = unsafe {
            (
                std::slice::from_raw_parts(info.p_swapchains, count),
                std::slice::from_raw_parts(info.p_image_indices, count),
            )
        };
        let at = swapchains.iter().position(|s| *s == self.swapchain)?;
        let source = *self.images.get(*indices.get(at)? as usize)?;
        let family = *lock(&dev.queues).get(&queue.as_raw())?;
        let d = &self.fns;
        let mut st = lock(&self.state);
        let Some(slot) = (0..RING).find(|&i| !st.held[i] && !st.copying[i]) else {
            st.skipped += 1;
            return None;
        };
        if st.family != Some(family) {
            // SAFETY: no copy is in flight on the old pool's buffers when none is copying;
            // otherwise wait for them first.
            unsafe {
                let _ = d.wait_for_fences(&self.fences, true, 1_000_000_000);
                d.destroy_command_pool(st.pool, None);
            }
            st.pool = vk::CommandPool::null();
            st.commands.clear();
            st.family = None;
            let pool_info = vk::CommandPoolCreateInfo::default()
                .queue_family_index(family)
                .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
            // SAFETY: a valid description for a family of this device.
            st.pool = unsafe { d.create_command_pool(&pool_info, None) }.ok()?;
            let alloc = vk::CommandBufferAllocateInfo::default()
                .command_pool(st.pool)
                .level(vk::CommandBufferLevel::PRIMARY)
                .command_buffer_count(RING as u32);
            // SAFETY: the pool was just created on this device.
            let commands = unsafe { d.allocate_command_buffers(&alloc) }.ok()?;
            for cb in &commands {
                // Command buffers the layer makes need the loader's dispatch pointer too.
                match dev.set_loader_data {
                    // SAFETY: the callback came with this device's creation.
                    Some(set) => unsafe {
                        let _ = set(dev.handle, cb.as_raw() as usize as *mut c_void);
                    },
                    // SAFETY: both are live dispatchable handles of this device.
                    None => unsafe {
                        *(cb.as_raw() as usize as *mut usize) = key(dev.handle.as_raw());
                    },
                }
            }
            st.commands = commands;
            st.family = Some(family);
        }
        let cb = *st.commands.get(slot)?;
        let fence = *self.fences.get(slot)?;
        let semaphore = *self.semaphores.get(slot)?;
        let target = self.ring.get(slot)?.0;
        let color = vk::ImageSubresourceRange {
            aspect_mask: vk::ImageAspectFlags::COLOR,
            base_mip_level: 0,
            level_count: 1,
            base_array_layer: 0,
            layer_count: 1,
        };
        let layers = vk::ImageSubresourceLayers {
            aspect_mask: vk::ImageAspectFlags::COLOR,
            mip_level: 0,
            base_array_layer: 0,
            layer_count: 1,
        };
        let barrier = |image, from, to, src, dst| {
            vk::ImageMemoryBarrier::default()
                .image(image)
                .old_layout(from)
                .new_layout(to)
                .src_access_mask(src)
                .dst_access_mask(dst)
                .src_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
                .dst_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
                .subresource_range(color)
        };
        let waits: &[vk::Semaphore] = if info.wait_semaphore_count == 0 {
            &[]
        } else {
            // SAFETY: the present's array holds `wait_semaphore_count` semaphores.
            unsafe { std::slice::from_raw_parts(info.p_wait_semaphores, info.wait_semaphore_count as usize) }
        };
        let stages = vec![vk::PipelineStageFlags::TRANSFER; waits.len()];
        // SAFETY: the slot's fence is signalled (no copy is in flight in it), so its
        // command buffer is not pending; the swapchain image is in PRESENT_SRC_KHR, as a
        // present requires, and goes back to it; every handle belongs to this device and
        // the queue is externally synchronised by the title's present call.
        let submitted = unsafe {
            (|| -> Result<(), vk::Result> {
                d.wait_for_fences(&[fence], true, 1_000_000_000)?;
                d.reset_fences(&[fence])?;
                d.reset_command_buffer(cb, vk::CommandBufferResetFlags::empty())?;
                d.begin_command_buffer(
                    cb,
                    &vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                )?;
                let before = [
                    barrier(
                        source,
                        vk::ImageLayout::PRESENT_SRC_KHR,
                        vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                        vk::AccessFlags::MEMORY_READ,
                        vk::AccessFlags::TRANSFER_READ,
                    ),
                    barrier(
                        target,
                        vk::ImageLayout::UNDEFINED,
                        vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                        vk::AccessFlags::empty(),
                        vk::AccessFlags::TRANSFER_WRITE,
                    ),
                ];
                d.cmd_pipeline_barrier(
                    cb,
                    vk::PipelineStageFlags::ALL_COMMANDS,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &before,
                );
                let region = [vk::ImageCopy::default()
                    .src_subresource(layers)
                    .dst_subresource(layers)
                    .extent(vk::Extent3D { width: self.extent.width, height: self.extent.height, depth: 1 })];
                d.cmd_copy_image(
                    cb,
                    source,
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    target,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    &region,
                );
                let mut release = barrier(
                    target,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::ImageLayout::GENERAL,
                    vk::AccessFlags::TRANSFER_WRITE,
                    vk::AccessFlags::empty(),
                );
                // Hand the image to the node's device (another process).
                release.src_queue_family_index = family;
                release.dst_queue_family_index = vk::QUEUE_FAMILY_EXTERNAL;
                let after = [
                    barrier(
                        source,
                        vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                        vk::ImageLayout::PRESENT_SRC_KHR,
                        vk::AccessFlags::TRANSFER_READ,
                        vk::AccessFlags::MEMORY_READ,
                    ),
                    release,
                ];
                d.cmd_pipeline_barrier(
                    cb,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::PipelineStageFlags::BOTTOM_OF_PIPE,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &after,
                );
                d.end_command_buffer(cb)?;
                let cbs = [cb];
                let signals = [semaphore];
                let submit = [vk::SubmitInfo::default()
                    .wait_semaphores(waits)
                    .wait_dst_stage_mask(&stages)
                    .command_buffers(&cbs)
                    .signal_semaphores(&signals)];
                d.queue_submit(queue, &submit, fence)
            })()
        };
        if let Err(r) = submitted {
            say(&format!("copying a frame failed ({r}); frames are no longer captured"));
            self.refused.store(true, Ordering::Relaxed);
            return None;
        }
        st.copying[slot] = true;
        drop(st);
        let presented_ns = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let presented_ns = u64::try_from(presented_ns.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(presented_ns.tv_nsec).unwrap_or(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Job::Frame { capture: self.me()?, slot, seq, presented_ns };
        if lock(&self.link.jobs).send(job).is_err() {
            self.link.alive.store(false, Ordering::Relaxed);
        }
        Some(semaphore)
    }

    fn me(&self) -> Option<Arc<Capture>> {
        lock(captures()).get(&self.generation).and_then(Weak::upgrade)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let d = &self.fns;
        let st = lock(&self.state);
        // SAFETY: waiting for every copy (fences start signalled) means none of these
        // objects is in use; all were created on this device; null handles are ignored.
        unsafe {
            let _ = d.wait_for_fences(&self.fences, true, 2_000_000_000);
            d.destroy_command_pool(st.pool, None);
            for f in &self.fences {
                d.destroy_fence(*f, None);
            }
            for s in &self.semaphores {
                d.destroy_semaphore(*s, None);
            }
            for (image, memory) in &self.ring {
                d.destroy_image(*image, None);
                d.free_memory(*memory, None);
            }
        }
        if st.skipped > 0 {
            say(&format!("ring {}: {} presents not captured (the node held every image)", self.generation, st.skipped));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Intercepted entry points.

unsafe extern "system" fn create_instance(
    info: *const vk::InstanceCreateInfo<'_>,
    allocator: *const vk::AllocationCallbacks<'_>,
    out: *mut vk::Instance,
) -> vk::Result {
    // SAFETY: the loader passes a valid create info whose chain holds this layer's link.
    unsafe {
        let mut chain = (*info).p_next as *mut InstanceChain;
        let is_link = |c: *mut InstanceChain| {
            (*c).s_type == vk::StructureType::LOADER_INSTANCE_CREATE_INFO && (*c).function == LAYER_LINK_INFO
        };
        while !chain.is_null() && !is_link(chain) {
            chain = (*chain).p_next as *mut InstanceChain;
        }
        if chain.is_null() || (*chain).layer_info.is_null() {
            return vk::Result::ERROR_INITIALIZATION_FAILED;
        }
        let link = (*chain).layer_info;
        let next_gipa = (*link).next_get_instance_proc_addr;
        // The next layer finds its own link.
        (*chain).layer_info = (*link).next;
        let Some(create) = next_gipa(vk::Instance::null(), c"vkCreateInstance".as_ptr()) else {
            return vk::Result::ERROR_INITIALIZATION_FAILED;
        };
        let create: vk::PFN_vkCreateInstance = std::mem::transmute(create);
        // The node checks that the title renders on its own device by UUID, which a
        // Vulkan 1.0 instance reads through VK_KHR_get_physical_device_properties2.
        let app = (*info).p_application_info;
        let version = if app.is_null() { vk::API_VERSION_1_0 } else { (*app).api_version };
        let mut names: Vec<*const c_char> = if (*info).enabled_extension_count == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts((*info).pp_enabled_extension_names, (*info).enabled_extension_count as usize)
                .to_vec()
        };
        let props2 = ash::khr::get_physical_device_properties2::NAME;
        let mut result = vk::Result::ERROR_EXTENSION_NOT_PRESENT;
        if std::env::var_os(SOCKET_ENV).is_some()
            && vk::api_version_minor(version) == 0
            && vk::api_version_major(version) <= 1
            && !names.iter().any(|n| CStr::from_ptr(*n) == props2)
        {
            names.push(props2.as_ptr());
            let mut modified = *info;
            modified.enabled_extension_count = names.len() as u32;
            modified.pp_enabled_extension_names = names.as_ptr();
            result = create(&modified, allocator, out);
        }
        if result == vk::Result::ERROR_EXTENSION_NOT_PRESENT {
            result = create(info, allocator, out);
        }
        if result != vk::Result::SUCCESS {
            return result;
        }
        let instance = *out;
        let fns = ash::Instance::load_with(|name| std::mem::transmute(next_gipa(instance, name.as_ptr())), instance);
        lock(instances()).insert(key(instance.as_raw()), Arc::new(Instance { fns, next_gipa }));
        result
    }
}

unsafe extern "system" fn destroy_instance(instance: vk::Instance, allocator: *const vk::AllocationCallbacks<'_>) {
    // SAFETY: the title passes a live instance (or null, which has no entry).
    let Some(k) = (!instance.is_null()).then(|| unsafe { key(instance.as_raw()) }) else { return };
    let Some(inst) = lock(instances()).remove(&k) else { return };
    // SAFETY: forwarding the title's own call.
    unsafe { (inst.fns.fp_v1_0().destroy_instance)(instance, allocator) };
}

unsafe extern "system" fn create_device(
    physical: vk::PhysicalDevice,
    info: *const vk::DeviceCreateInfo<'_>,
    allocator: *const vk::AllocationCallbacks<'_>,
    out: *mut vk::Device,
) -> vk::Result {
    // SAFETY: the loader passes a live physical device and a valid create info whose chain
    // holds this layer's link.
    unsafe {
        let Some(inst) = instance_of(physical.as_raw()) else {
            return vk::Result::ERROR_INITIALIZATION_FAILED;
        };
        let mut link_chain: *mut DeviceChain = std::ptr::null_mut();
        let mut set_loader_data: Option<SetDeviceLoaderData> = None;
        let mut chain = (*info).p_next as *mut DeviceChain;
        while !chain.is_null() {
            if (*chain).s_type == vk::StructureType::LOADER_DEVICE_CREATE_INFO {
                if (*chain).function == LAYER_LINK_INFO && link_chain.is_null() {
                    link_chain = chain;
                } else if (*chain).function == LOADER_DATA_CALLBACK && !(*chain).data.is_null() {
                    set_loader_data = Some(std::mem::transmute::<*mut c_void, SetDeviceLoaderData>((*chain).data));
                }
            }
            chain = (*chain).p_next as *mut DeviceChain;
        }
        if link_chain.is_null() || (*link_chain).data.is_null() {
            return vk::Result::ERROR_INITIALIZATION_FAILED;
        }
        let link = (*link_chain).data as *mut DeviceLink;
        let (next_gipa, next_gdpa) = ((*link).next_get_instance_proc_addr, (*link).next_get_device_proc_addr);
        (*link_chain).data = (*link).next as *mut c_void;
        let Some(create) = next_gipa(inst.fns.handle(), c"vkCreateDevice".as_ptr()) else {
            return vk::Result::ERROR_INITIALIZATION_FAILED;
        };
        let create: vk::PFN_vkCreateDevice = std::mem::transmute(create);

        // Capture needs exportable memory: enable it when the node asked for capture.
        let mut names: Vec<*const c_char> = if (*info).enabled_extension_count == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts((*info).pp_enabled_extension_names, (*info).enabled_extension_count as usize)
                .to_vec()
        };
        let mut external = false;
        if std::env::var_os(SOCKET_ENV).is_some() {
            let available = inst.fns.enumerate_device_extension_properties(physical).unwrap_or_default();
            let has = |n: &CStr| available.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
            let wanted = [ash::khr::external_memory::NAME, ash::khr::external_memory_fd::NAME];
            if wanted.iter().all(|n| has(n)) {
                for n in wanted {
                    if !names.iter().any(|p| CStr::from_ptr(*p) == n) {
                        names.push(n.as_ptr());
                    }
                }
                external = true;
            } else {
                say("the device cannot export memory; frames are not captured (the node grabs the screen)");
            }
        }
        let mut modified = *info;
        modified.enabled_extension_count = names.len() as u32;
        modified.pp_enabled_extension_names = names.as_ptr();
        let result = create(physical, &modified, allocator, out);
        if result != vk::Result::SUCCESS {
            return result;
        }
        let device = *out;
        let load = |name: &CStr| {
            std::mem::transmute::<vk::PFN_vkVoidFunction, *const c_void>(next_gdpa(device, name.as_ptr()))
        };
        let fns = ash::Device::load_with(load, device);
        let swapchain = ash::khr::swapchain::DeviceFn::load(load);
        let memory_fd = external.then(|| ash::khr::external_memory_fd::DeviceFn::load(load));
        let memory = inst.fns.get_physical_device_memory_properties(physical);
        let (mut device_uuid, mut driver_uuid) = ([0u8; 16], [0u8; 16]);
        let props2 = next_gipa(inst.fns.handle(), c"vkGetPhysicalDeviceProperties2".as_ptr())
            .or_else(|| next_gipa(inst.fns.handle(), c"vkGetPhysicalDeviceProperties2KHR".as_ptr()));
        if let Some(f) = props2 {
            let f: vk::PFN_vkGetPhysicalDeviceProperties2 = std::mem::transmute(f);
            let mut id = vk::PhysicalDeviceIDProperties::default();
            let mut props = vk::PhysicalDeviceProperties2::default().push_next(&mut id);
            f(physical, &mut props);
            device_uuid = id.device_uuid;
            driver_uuid = id.driver_uuid;
        }
        let dev = Device {
            handle: device,
            fns,
            next_gdpa,
            swapchain,
            memory_fd,
            set_loader_data,
            memory,
            device_uuid,
            driver_uuid,
            queues: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
        };
        lock(devices()).insert(key(device.as_raw()), Arc::new(dev));
        result
    }
}

unsafe extern "system" fn destroy_device(device: vk::Device, allocator: *const vk::AllocationCallbacks<'_>) {
    // SAFETY: the title passes a live device (or null, which has no entry).
    let Some(k) = (!device.is_null()).then(|| unsafe { key(device.as_raw()) }) else { return };
    let Some(dev) = lock(devices()).remove(&k) else { return };
    let capture = lock(&dev.capture).take();
    if let Some(c) = capture {
        let link = c.link.clone();
        drop(c);
        // Frames still queued hold the capture: let the helper finish with them.
        link.flush();
    }
    // SAFETY: forwarding the title's own call; the layer's objects on it are destroyed.
    unsafe { (dev.fns.fp_v1_0().destroy_device)(device, allocator) };
}

unsafe extern "system" fn get_device_queue(device: vk::Device, family: u32, index: u32, out: *mut vk::Queue) {
    // SAFETY: the title passes a live device and a valid output pointer.
    unsafe {
        let Some(dev) = device_of(device.as_raw()) else { return };
        (dev.fns.fp_v1_0().get_device_queue)(device, family, index, out);
        if !(*out).is_null() {
            lock(&dev.queues).insert((*out).as_raw(), family);
        }
    }
}

unsafe extern "system" fn get_device_queue2(
    device: vk::Device,
    info: *const vk::DeviceQueueInfo2<'_>,
    out: *mut vk::Queue,
) {
    // SAFETY: the title passes a live device, a valid info and output pointer.
    unsafe {
        let Some(dev) = device_of(device.as_raw()) else { return };
        (dev.fns.fp_v1_1().get_device_queue2)(device, info, out);
        if !(*out).is_null() {
            lock(&dev.queues).insert((*out).as_raw(), (*info).queue_family_index);
        }
    }
}

unsafe extern "system" fn create_swapchain(
    device: vk::Device,
    info: *const vk::SwapchainCreateInfoKHR<'_>,
    allocator: *const vk::AllocationCallbacks<'_>,
    out: *mut vk::SwapchainKHR,
) -> vk::Result {
    // SAFETY: the title passes a live device and valid pointers.
    unsafe {
        let Some(dev) = device_of(device.as_raw()) else {
            return vk::Result::ERROR_INITIALIZATION_FAILED;
        };
        let next = dev.swapchain.create_swapchain_khr;
        let link = if dev.memory_fd.is_some() && ring_format((*info).image_format).is_some() { link() } else { None };
        let Some(link) = link else {
            if dev.memory_fd.is_some() {
                say(&format!("not capturing a {:?} swapchain; the node grabs the screen", (*info).image_format));
            }
            return next(device, info, allocator, out);
        };
        let mut modified = *info;
        modified.image_usage |= vk::ImageUsageFlags::TRANSFER_SRC;
        let result = next(device, &modified, allocator, out);
        if result != vk::Result::SUCCESS {
            say("the swapchain cannot be a copy source; frames are not captured");
            return next(device, info, allocator, out);
        }
        match Capture::new(&dev, link, *out, &modified) {
            Ok(c) => {
                let old = lock(&dev.capture).replace(c);
                drop(old);
            }
            Err(Failed(what, r)) => say(&format!("not capturing: {what} failed ({r}); the node grabs the screen")),
        }
        result
    }
}

unsafe extern "system" fn destroy_swapchain(
    device: vk::Device,
    swapchain: vk::SwapchainKHR,
    allocator: *const vk::AllocationCallbacks<'_>,
) {
    // SAFETY: the title passes a live device.
    let Some(dev) = (unsafe { device_of(device.as_raw()) }) else { return };
    let old = {
        let mut c = lock(&dev.capture);
        if c.as_ref().is_some_and(|c| c.swapchain == swapchain) { c.take() } else { None }
    };
    drop(old);
    // SAFETY: forwarding the title's own call.
    unsafe { (dev.swapchain.destroy_swapchain_khr)(device, swapchain, allocator) };
}

unsafe extern "system" fn queue_present(queue: vk::Queue, info: *const vk::PresentInfoKHR<'_>) -> vk::Result {
    // SAFETY: the title passes a live queue and a valid present info.
    unsafe {
        let Some(dev) = device_of(queue.as_raw()) else {
            return vk::Result::ERROR_DEVICE_LOST;
        };
        let capture = lock(&dev.capture).clone();
        let semaphore = capture.and_then(|c| c.copy(&dev, queue, &*info));
        match semaphore {
            Some(s) => {
                let waits = [s];
                let mut modified = *info;
                modified.wait_semaphore_count = 1;
                modified.p_wait_semaphores = waits.as_ptr();
                (dev.swapchain.queue_present_khr)(queue, &modified)
            }
            None => (dev.swapchain.queue_present_khr)(queue, info),
        }
    }
}

/// An entry point as the loader's untyped function pointer.
macro_rules! entry {
    ($f:expr, $t:ty) => {
        std::mem::transmute::<$t, unsafe extern "system" fn()>($f as $t)
    };
}

/// The layer's own version of `name`, if it intercepts it.
fn intercept(name: &CStr, device_level_only: bool) -> vk::PFN_vkVoidFunction {
    // SAFETY: each entry point has the signature Vulkan defines for its name; the loader
    // casts the pointer back to that signature.
    unsafe {
        let f: unsafe extern "system" fn() = match name.to_bytes() {
            b"vkGetDeviceProcAddr" => entry!(vkGetDeviceProcAddr, vk::PFN_vkGetDeviceProcAddr),
            b"vkDestroyDevice" => entry!(destroy_device, vk::PFN_vkDestroyDevice),
            b"vkGetDeviceQueue" => entry!(get_device_queue, vk::PFN_vkGetDeviceQueue),
            b"vkGetDeviceQueue2" => entry!(get_device_queue2, vk::PFN_vkGetDeviceQueue2),
            b"vkCreateSwapchainKHR" => entry!(create_swapchain, vk::PFN_vkCreateSwapchainKHR),
            b"vkDestroySwapchainKHR" => entry!(destroy_swapchain, vk::PFN_vkDestroySwapchainKHR),
            b"vkQueuePresentKHR" => entry!(queue_present, vk::PFN_vkQueuePresentKHR),
            _ if device_level_only => return None,
            b"vkGetInstanceProcAddr" => entry!(vkGetInstanceProcAddr, vk::PFN_vkGetInstanceProcAddr),
            b"vkCreateInstance" => entry!(create_instance, vk::PFN_vkCreateInstance),
            b"vkDestroyInstance" => entry!(destroy_instance, vk::PFN_vkDestroyInstance),
            b"vkCreateDevice" => entry!(create_device, vk::PFN_vkCreateDevice),
            _ => return None,
        };
        Some(f)
    }
}

/// The layer's `vkGetInstanceProcAddr`.
///
/// # Safety
/// Called by the Vulkan loader with a valid name and a live instance (or null).
#[unsafe(no_mangle)]
pub unsafe extern "system" fn vkGetInstanceProcAddr(
    instance: vk::Instance,
    name: *const c_char,
) -> vk::PFN_vkVoidFunction {
    if name.is_null() {
        return None;
    }
    // SAFETY: the loader passes a NUL-terminated name.
    let name_c = unsafe { CStr::from_ptr(name) };
    if let Some(f) = intercept(name_c, false) {
        return Some(f);
    }
    if instance.is_null() {
        return None;
    }
    // SAFETY: a live instance, forwarded to the next layer.
    unsafe { instance_of(instance.as_raw()).and_then(|i| (i.next_gipa)(instance, name)) }
}

/// The layer's `vkGetDeviceProcAddr`.
///
/// # Safety
/// Called by the Vulkan loader with a valid name and a live device.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn vkGetDeviceProcAddr(device: vk::Device, name: *const c_char) -> vk::PFN_vkVoidFunction {
    if name.is_null() || device.is_null() {
        return None;
    }
    // SAFETY: the loader passes a NUL-terminated name.
    let name_c = unsafe { CStr::from_ptr(name) };
    if let Some(f) = intercept(name_c, true) {
        return Some(f);
    }
    // SAFETY: a live device, forwarded to the next layer.
    unsafe { device_of(device.as_raw()).and_then(|d| (d.next_gdpa)(device, name)) }
}

/// The loader–layer interface negotiation (version 2).
///
/// # Safety
/// Called by the Vulkan loader with a valid structure.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn vkNegotiateLoaderLayerInterfaceVersion(
    version: *mut NegotiateLayerInterface,
) -> vk::Result {
    if version.is_null() {
        return vk::Result::ERROR_INITIALIZATION_FAILED;
    }
    // SAFETY: the loader passes a valid, writable structure.
    unsafe {
        if (*version).loader_layer_interface_version < 2 {
            return vk::Result::ERROR_INITIALIZATION_FAILED;
        }
        (*version).loader_layer_interface_version = 2;
        (*version).get_instance_proc_addr = Some(vkGetInstanceProcAddr);
        (*version).get_device_proc_addr = Some(vkGetDeviceProcAddr);
        (*version).get_physical_device_proc_addr = std::ptr::null();
    }
    vk::Result::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_formats_keep_the_bytes() {
        assert_eq!(ring_format(vk::Format::B8G8R8A8_SRGB), Some(vk::Format::B8G8R8A8_UNORM));
        assert_eq!(ring_format(vk::Format::R8G8B8A8_UNORM), Some(vk::Format::R8G8B8A8_UNORM));
        assert_eq!(ring_format(vk::Format::A2B10G10R10_UNORM_PACK32), None);
        assert_eq!(vk::Format::B8G8R8A8_UNORM.as_raw(), capture::FORMAT_BGRA8);
        assert_eq!(vk::Format::R8G8B8A8_UNORM.as_raw(), capture::FORMAT_RGBA8);
        let usage =
            vk::ImageUsageFlags::TRANSFER_SRC | vk::ImageUsageFlags::TRANSFER_DST | vk::ImageUsageFlags::SAMPLED;
        assert_eq!(usage.as_raw(), capture::IMAGE_USAGE);
    }

    #[test]
    fn the_layer_answers_for_what_it_intercepts_and_nothing_else() {
        for name in [c"vkQueuePresentKHR", c"vkCreateSwapchainKHR", c"vkDestroyDevice", c"vkGetDeviceProcAddr"] {
            assert!(intercept(name, true).is_some(), "{name:?}");
        }
        assert!(intercept(c"vkCreateInstance", true).is_none());
        assert!(intercept(c"vkCreateInstance", false).is_some());
        assert!(intercept(c"vkCmdDraw", false).is_none());
        let mut negotiate = NegotiateLayerInterface {
            s_type: 1,
            p_next: std::ptr::null_mut(),
            loader_layer_interface_version: 5,
            get_instance_proc_addr: None,
            get_device_proc_addr: None,
            get_physical_device_proc_addr: std::ptr::null(),
        };
        // SAFETY: a valid structure.
        assert_eq!(unsafe { vkNegotiateLoaderLayerInterfaceVersion(&mut negotiate) }, vk::Result::SUCCESS);
        assert_eq!(negotiate.loader_layer_interface_version, 2);
        assert!(negotiate.get_instance_proc_addr.is_some());
    }
}
