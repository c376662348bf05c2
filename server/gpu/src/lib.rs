//! The Vulkan side of the Pylon render node.
//!
//! [`FrameRenderer`] owns a Vulkan device chosen by probing ([`device::choose`]) and a
//! small ring of *slots*. Each slot has its own colour target, vertex buffer, host-visible
//! NV12 buffer, command buffer and fence, so the GPU can work on one frame while the CPU
//! reads back another: the queue never waits on the CPU.
//!
//! One submission per frame renders the scene into the slot's RGBA image and runs the
//! RGBA→NV12 compute shader, which writes straight into the slot's host-visible buffer.
//!
//! This crate is one of the two places in Pylon allowed to use `unsafe` (it wraps Vulkan
//! FFI through `ash`); every block says which invariant makes it sound.

mod capacity;
pub mod device;
mod import;

use ash::vk;
use std::time::Duration;
use thiserror::Error;

pub use capacity::{CapacityEngine, CapacityRun};
pub use device::{DeviceInfo, DeviceKind};
pub use import::{ExportedRing, ImportError};

/// Errors from the GPU layer.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GpuError {
    /// The Vulkan loader (`libvulkan.so.1`) could not be loaded.
    #[error(
        "cannot load the Vulkan loader ({0}); install libvulkan1 and a driver (mesa-vulkan-drivers for CPU rendering)"
    )]
    Loader(String),
    /// No usable device.
    #[error("{0}")]
    NoDevice(String),
    /// A Vulkan call failed.
    #[error("Vulkan error while {what}: {result}")]
    Vulkan {
        /// What was being done.
        what: &'static str,
        /// The result code.
        result: vk::Result,
    },
    /// No memory type fits a resource.
    #[error("no suitable Vulkan memory type for {0}")]
    NoMemoryType(&'static str),
    /// A size that the converter cannot handle.
    #[error("unsupported size {width}x{height}: width must be a multiple of 4 and height a multiple of 2")]
    BadSize {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
    /// More vertices than a slot's vertex buffer holds.
    #[error("scene has {0} vertices, more than the {MAX_VERTICES} a frame may draw")]
    TooManyVertices(usize),
    /// The GPU did not finish a frame in time.
    #[error("GPU did not finish the frame within {0:?}")]
    Timeout(Duration),
}

impl GpuError {
    fn vk(what: &'static str) -> impl Fn(vk::Result) -> GpuError {
        move |result| GpuError::Vulkan { what, result }
    }
}

/// A vertex of the scene: clip-space position and RGBA colour.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct Vertex {
    /// Position in clip space (-1..1, y down).
    pub pos: [f32; 2],
    /// Linear RGBA colour, alpha-blended over what is below.
    pub color: [f32; 4],
}

/// Most vertices one frame may draw.
pub const MAX_VERTICES: usize = 1 << 16;

/// How to set up the renderer.
#[derive(Debug, Clone)]
pub struct RendererConfig {
    /// Picture width (multiple of 4).
    pub width: u32,
    /// Picture height (multiple of 2).
    pub height: u32,
    /// Substring of the device name to use instead of the probed best (`--gpu`).
    pub gpu: Option<String>,
    /// Number of ring slots (frames that can be in flight at once), at least 1.
    pub slots: usize,
    /// Colour the target is cleared to before drawing.
    pub clear_color: [f32; 4],
}

/// Lists Vulkan devices without opening one (for `--list-gpus` and diagnostics).
pub fn list_devices() -> Result<Vec<DeviceInfo>, GpuError> {
    let (_entry, instance) = create_instance()?;
    let devices = device::probe(&instance);
    // SAFETY: nothing created from `instance` outlives this call.
    unsafe { instance.destroy_instance(None) };
    devices
}

fn create_instance() -> Result<(ash::Entry, ash::Instance), GpuError> {
    // SAFETY: loading the system Vulkan loader runs its initialisers; that is the
    // documented way to start Vulkan and nothing else in the process depends on it yet.
    let entry = unsafe { ash::Entry::load() }.map_err(|e| GpuError::Loader(e.to_string()))?;
    let app = vk::ApplicationInfo::default()
        .application_name(c"pylon-server")
        .engine_name(c"pylon")
        .api_version(vk::API_VERSION_1_1);
    let info = vk::InstanceCreateInfo::default().application_info(&app);
    // SAFETY: `info` and what it points to live for the duration of the call.
    let instance = unsafe { entry.create_instance(&info, None) }.map_err(GpuError::vk("creating the instance"))?;
    Ok((entry, instance))
}

/// A device opened for the node's GPU work: chosen by probing (or `gpu` by name), with one
/// queue of its usable family.
struct Opened {
    entry: ash::Entry,
    instance: ash::Instance,
    info: DeviceInfo,
    /// Why this device was chosen.
    reason: String,
    family: u32,
    device: ash::Device,
    queue: vk::Queue,
    memory: vk::PhysicalDeviceMemoryProperties,
}

/// Opens the device `gpu` names, or the one [`device::choose`] prefers. With
/// `external_memory`, enables `VK_KHR_external_memory_fd` where the device has it (importing
/// frames from a title's present layer needs fd-backed memory). The instance is destroyed
/// again on any failure.
fn open_device(gpu: Option<&str>, external_memory: bool) -> Result<Opened, GpuError> {
    let (entry, instance) = create_instance()?;
    let chosen = device::probe(&instance).and_then(|devices| {
        let (index, reason) = device::choose(&devices, gpu)?;
        let info = devices.get(index).cloned().ok_or_else(|| GpuError::NoDevice("device vanished".into()))?;
        let family = info.queue_family.ok_or_else(|| GpuError::NoDevice("device has no usable queue".into()))?;
        Ok((info, reason, family))
    });
    let (info, reason, family) = match chosen {
        Ok(c) => c,
        Err(e) => {
            // SAFETY: no object was created from the instance.
            unsafe { instance.destroy_instance(None) };
            return Err(e);
        }
    };
    let priorities = [1.0f32];
    let queue_info = [vk::DeviceQueueCreateInfo::default().queue_family_index(family).queue_priorities(&priorities)];
    let extensions: Vec<*const std::ffi::c_char> = if external_memory && info.external_memory_fd {
        vec![ash::khr::external_memory_fd::NAME.as_ptr()]
    } else {
        Vec::new()
    };
    let device_info =
        vk::DeviceCreateInfo::default().queue_create_infos(&queue_info).enabled_extension_names(&extensions);
    // SAFETY: the physical device belongs to `instance`; `device_info` outlives the call.
    let device = match unsafe { instance.create_device(info.handle, &device_info, None) } {
        Ok(d) => d,
        Err(result) => {
            // SAFETY: no object was created from the instance.
            unsafe { instance.destroy_instance(None) };
            return Err(GpuError::Vulkan { what: "creating the device", result });
        }
    };
    // SAFETY: queue 0 of `family` was requested above; the handle belongs to `instance`.
    let (queue, memory) =
        unsafe { (device.get_device_queue(family, 0), instance.get_physical_device_memory_properties(info.handle)) };
    Ok(Opened { entry, instance, info, reason, family, device, queue, memory })
}

/// A descriptor-set layout whose bindings, numbered from 0, have `types`, one descriptor
/// each, for the compute stage.
fn compute_set_layout(
    d: &ash::Device,
    types: &[vk::DescriptorType],
    what: &'static str,
) -> Result<vk::DescriptorSetLayout, GpuError> {
    let bindings: Vec<vk::DescriptorSetLayoutBinding> = types
        .iter()
        .zip(0u32..)
        .map(|(&ty, binding)| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(binding)
                .descriptor_type(ty)
                .descriptor_count(1)
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
        })
        .collect();
    // SAFETY: `bindings` outlives the call.
    unsafe { d.create_descriptor_set_layout(&vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings), None) }
        .map_err(GpuError::vk(what))
}

/// A pipeline layout of one descriptor set and `push_bytes` of compute push constants.
fn compute_layout(
    d: &ash::Device,
    set_layout: vk::DescriptorSetLayout,
    push_bytes: u32,
    what: &'static str,
) -> Result<vk::PipelineLayout, GpuError> {
    let push = [vk::PushConstantRange::default().stage_flags(vk::ShaderStageFlags::COMPUTE).offset(0).size(push_bytes)];
    let set_layouts = [set_layout];
    // SAFETY: the arrays outlive the call; `set_layout` belongs to `d`.
    unsafe {
        d.create_pipeline_layout(
            &vk::PipelineLayoutCreateInfo::default().set_layouts(&set_layouts).push_constant_ranges(&push),
            None,
        )
    }
    .map_err(GpuError::vk(what))
}

/// A command pool on `family` whose command buffers can be reset one by one.
fn command_pool(d: &ash::Device, family: u32, what: &'static str) -> Result<vk::CommandPool, GpuError> {
    // SAFETY: `family` is a queue family the device was created with.
    unsafe {
        d.create_command_pool(
            &vk::CommandPoolCreateInfo::default()
                .queue_family_index(family)
                .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
            None,
        )
    }
    .map_err(GpuError::vk(what))
}

struct Buffer {
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    mapped: *mut u8,
    size: usize,
}

/// A slot's staging area for uploaded pictures: a host-visible buffer and, when the
/// picture's size differs from the stream's, an image it is copied into and scaled from.
struct Upload {
    buffer: Buffer,
    /// For the packed conversion (same-size pictures): the buffer in, the slot's NV12 out.
    descriptor: vk::DescriptorSet,
    image: vk::Image,
    memory: vk::DeviceMemory,
    width: u32,
    height: u32,
}

/// A colour target a render pass draws into: the slot's RGBA image, or one NV12 plane the
/// demo's scene is drawn straight into (luma R8 at the stream's size, interleaved chroma
/// R8G8 at half the size each way).
#[derive(Default)]
struct Target {
    image: vk::Image,
    memory: vk::DeviceMemory,
    view: vk::ImageView,
    framebuffer: vk::Framebuffer,
}

/// Formats of the luma and chroma planes.
const PLANE_FORMATS: [vk::Format; 2] = [vk::Format::R8_UNORM, vk::Format::R8G8_UNORM];

struct Slot {
    upload: Option<Upload>,
    /// Luma and chroma targets of the demo's scene.
    planes: [Target; 2],
    /// The RGBA target (drawing alone, and scaled uploads converted by the compute pass).
    color: Target,
    vertices: Buffer,
    nv12: Buffer,
    descriptor: vk::DescriptorSet,
    commands: vk::CommandBuffer,
    fence: vk::Fence,
    in_flight: bool,
}

/// What one submission should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Draw the scene in RGBA only (used to time drawing alone).
    RenderOnly,
    /// Draw the scene straight into NV12's luma and chroma planes and copy them into the
    /// slot's readback buffer (what the node streams).
    RenderAndConvert,
    /// Draw in RGBA, then convert to NV12 with the compute pass (the path before the
    /// planes; benchmarks compare against it).
    RenderThenConvert,
}

/// How an uploaded picture's bytes are ordered (4 bytes a pixel; the 4th is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelOrder {
    /// Blue, green, red, padding: X11 ZPixmap on little-endian, Vulkan B8G8R8A8.
    Bgrx,
    /// Red, green, blue, padding.
    Rgbx,
}

/// A picture to upload: `height` rows of `stride` bytes, `width` pixels each.
#[derive(Debug, Clone, Copy)]
pub struct Picture<'a> {
    /// Pixels wide.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Bytes from one row to the next (at least `width * 4`).
    pub stride: usize,
    /// The bytes.
    pub pixels: &'a [u8],
    /// Their order.
    pub order: PixelOrder,
}

/// Renders frames offscreen and converts them to NV12 in a ring of slots.
pub struct FrameRenderer {
    memory: vk::PhysicalDeviceMemoryProperties,
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    info: DeviceInfo,
    reason: String,
    queue: vk::Queue,
    width: u32,
    height: u32,
    clear_color: [f32; 4],
    render_pass: vk::RenderPass,
    graphics_layout: vk::PipelineLayout,
    graphics: vk::Pipeline,
    /// Render passes and pipelines drawing the scene into the luma and chroma planes.
    plane_passes: [vk::RenderPass; 2],
    plane_pipelines: [vk::Pipeline; 2],
    set_layout: vk::DescriptorSetLayout,
    compute_layout: vk::PipelineLayout,
    compute: vk::Pipeline,
    packed_set_layout: vk::DescriptorSetLayout,
    packed_layout: vk::PipelineLayout,
    packed: vk::Pipeline,
    descriptor_pool: vk::DescriptorPool,
    command_pool: vk::CommandPool,
    slots: Vec<Slot>,
    /// A title's ring of exported frames, imported (see [`Self::import_ring`]).
    imported: Option<import::ImportedRing>,
}

impl std::fmt::Debug for FrameRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameRenderer")
            .field("device", &self.info.name)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// A compute pipeline running `main` of the SPIR-V `code` (produced and validated by naga at
/// build time) with `layout`.
fn compute_pipeline(
    d: &ash::Device,
    code: &[u32],
    layout: vk::PipelineLayout,
    what: &'static str,
) -> Result<vk::Pipeline, GpuError> {
    // SAFETY: the code is valid SPIR-V produced and validated by naga at build time.
    let module = unsafe { d.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(code), None) }
        .map_err(GpuError::vk(what))?;
    let info = [vk::ComputePipelineCreateInfo::default()
        .stage(
            vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(c"main"),
        )
        .layout(layout)];
    // SAFETY: `info` outlives the call; `layout` and `module` belong to `d`.
    let pipeline = unsafe { d.create_compute_pipelines(vk::PipelineCache::null(), &info, None) };
    // SAFETY: the pipeline keeps its own copy of the code.
    unsafe { d.destroy_shader_module(module, None) };
    Ok(pipeline.map_err(|(_, result)| GpuError::Vulkan { what, result })?.into_iter().next().unwrap_or_default())
}

fn spirv(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl FrameRenderer {
    /// Opens the chosen device and builds pipelines and the slot ring.
    pub fn new(config: &RendererConfig) -> Result<Self, GpuError> {
        if config.width == 0
            || config.height == 0
            || !config.width.is_multiple_of(4)
            || !config.height.is_multiple_of(2)
        {
            return Err(GpuError::BadSize { width: config.width, height: config.height });
        }
        let Opened { entry, instance, info, reason, family, device, queue, memory } =
            open_device(config.gpu.as_deref(), true)?;

        let mut renderer = FrameRenderer {
            memory,
            _entry: entry,
            instance,
            device,
            info,
            reason,
            queue,
            width: config.width,
            height: config.height,
            clear_color: config.clear_color,
            render_pass: vk::RenderPass::null(),
            graphics_layout: vk::PipelineLayout::null(),
            graphics: vk::Pipeline::null(),
            plane_passes: [vk::RenderPass::null(); 2],
            plane_pipelines: [vk::Pipeline::null(); 2],
            set_layout: vk::DescriptorSetLayout::null(),
            compute_layout: vk::PipelineLayout::null(),
            compute: vk::Pipeline::null(),
            packed_set_layout: vk::DescriptorSetLayout::null(),
            packed_layout: vk::PipelineLayout::null(),
            packed: vk::Pipeline::null(),
            descriptor_pool: vk::DescriptorPool::null(),
            command_pool: vk::CommandPool::null(),
            slots: Vec::new(),
            imported: None,
        };
        // From here on, `Drop` cleans up whatever was created if a step fails.
        renderer.build(family, &memory, config.slots.max(1))?;
        Ok(renderer)
    }

    /// The device in use.
    pub fn device_info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Why that device was chosen.
    pub fn choice_reason(&self) -> &str {
        &self.reason
    }

    /// Number of ring slots.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Picture size.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Bytes of one NV12 picture: a full-size luma plane then a half-height UV plane.
    pub fn nv12_len(&self) -> usize {
        self.width as usize * self.height as usize * 3 / 2
    }

    /// Whether a slot has work submitted that has not been waited for.
    pub fn in_flight(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|s| s.in_flight)
    }

    fn build(
        &mut self,
        family: u32,
        memory: &vk::PhysicalDeviceMemoryProperties,
        slots: usize,
    ) -> Result<(), GpuError> {
        let d = &self.device;
        let color_format = vk::Format::R8G8B8A8_UNORM;

        // Render pass: clear, draw, then leave the image ready for the compute shader.
        self.render_pass = color_pass(
            d,
            color_format,
            vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL,
            (vk::PipelineStageFlags::COMPUTE_SHADER, vk::AccessFlags::SHADER_READ),
        )?;

        // Shaders, compiled from shaders/*.wgsl by build.rs.
        let scene_code = spirv(include_bytes!(concat!(env!("OUT_DIR"), "/scene.spv")));
        // SAFETY: the code is valid SPIR-V produced and validated by naga at build time.
        let scene_module =
            unsafe { d.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&scene_code), None) }
                .map_err(GpuError::vk("loading the scene shader"))?;
        let pipelines = self.build_pipelines(scene_module, family);
        // SAFETY: the pipeline keeps its own copy of the code; the module is no longer needed.
        unsafe { self.device.destroy_shader_module(scene_module, None) };
        pipelines?;
        self.build_packed()?;

        for _ in 0..slots {
            let slot = self.create_slot(memory, color_format)?;
            self.slots.push(slot);
        }
        Ok(())
    }

    /// The compute pipeline converting packed pixels from a storage buffer (uploads at the
    /// stream's size) to NV12.
    fn build_packed(&mut self) -> Result<(), GpuError> {
        let d = &self.device;
        let code = spirv(include_bytes!(concat!(env!("OUT_DIR"), "/nv12_packed.spv")));
        let storage = vk::DescriptorType::STORAGE_BUFFER;
        self.packed_set_layout = compute_set_layout(d, &[storage, storage], "creating the packed descriptor layout")?;
        self.packed_layout = compute_layout(d, self.packed_set_layout, 32, "creating the packed compute layout")?;
        self.packed = compute_pipeline(d, &code, self.packed_layout, "creating the packed compute pipeline")?;
        Ok(())
    }

    fn build_pipelines(&mut self, scene: vk::ShaderModule, family: u32) -> Result<(), GpuError> {
        let d = &self.device;
        // SAFETY: an empty layout description is always valid.
        self.graphics_layout = unsafe { d.create_pipeline_layout(&vk::PipelineLayoutCreateInfo::default(), None) }
            .map_err(GpuError::vk("creating the graphics layout"))?;
        self.graphics = self.graphics_pipeline(scene, c"fs_main", self.render_pass, self.extent())?;
        for (i, format) in PLANE_FORMATS.iter().enumerate() {
            // Clear, draw, then leave the plane ready to be copied into the NV12 buffer.
            self.plane_passes[i] = color_pass(
                &self.device,
                *format,
                vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                (vk::PipelineStageFlags::TRANSFER, vk::AccessFlags::TRANSFER_READ),
            )?;
            let fragment = if i == 0 { c"fs_luma" } else { c"fs_chroma" };
            self.plane_pipelines[i] =
                self.graphics_pipeline(scene, fragment, self.plane_passes[i], self.plane_extent(i))?;
        }
        let d = &self.device;

        // Compute pipeline: sampled RGBA image in, NV12 storage buffer out.
        self.set_layout = compute_set_layout(
            d,
            &[vk::DescriptorType::SAMPLED_IMAGE, vk::DescriptorType::STORAGE_BUFFER],
            "creating the descriptor layout",
        )?;
        self.compute_layout = compute_layout(d, self.set_layout, 16, "creating the compute layout")?;
        let nv12 = spirv(include_bytes!(concat!(env!("OUT_DIR"), "/nv12.spv")));
        self.compute = compute_pipeline(d, &nv12, self.compute_layout, "creating the compute pipeline")?;

        let pool_sizes = [
            vk::DescriptorPoolSize { ty: vk::DescriptorType::SAMPLED_IMAGE, descriptor_count: 16 },
            vk::DescriptorPoolSize { ty: vk::DescriptorType::STORAGE_BUFFER, descriptor_count: 64 },
        ];
        // SAFETY: `pool_sizes` outlives the call.
        self.descriptor_pool = unsafe {
            d.create_descriptor_pool(
                &vk::DescriptorPoolCreateInfo::default()
                    .flags(vk::DescriptorPoolCreateFlags::FREE_DESCRIPTOR_SET)
                    .max_sets(32)
                    .pool_sizes(&pool_sizes),
                None,
            )
        }
        .map_err(GpuError::vk("creating the descriptor pool"))?;
        self.command_pool = command_pool(d, family, "creating the command pool")?;
        Ok(())
    }

    /// The scene's graphics pipeline with fragment entry point `fragment`, drawing into
    /// `pass` (one colour attachment of `extent`), blending by the vertex colour's alpha.
    fn graphics_pipeline(
        &self,
        scene: vk::ShaderModule,
        fragment: &std::ffi::CStr,
        pass: vk::RenderPass,
        extent: vk::Extent2D,
    ) -> Result<vk::Pipeline, GpuError> {
        let stages = [
            vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::VERTEX)
                .module(scene)
                .name(c"vs_main"),
            vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::FRAGMENT)
                .module(scene)
                .name(fragment),
        ];
        let bindings = [vk::VertexInputBindingDescription::default()
            .binding(0)
            .stride(std::mem::size_of::<Vertex>() as u32)
            .input_rate(vk::VertexInputRate::VERTEX)];
        let attributes = [
            vk::VertexInputAttributeDescription::default()
                .location(0)
                .binding(0)
                .format(vk::Format::R32G32_SFLOAT)
                .offset(0),
            vk::VertexInputAttributeDescription::default()
                .location(1)
                .binding(0)
                .format(vk::Format::R32G32B32A32_SFLOAT)
                .offset(8),
        ];
        let vertex_input = vk::PipelineVertexInputStateCreateInfo::default()
            .vertex_binding_descriptions(&bindings)
            .vertex_attribute_descriptions(&attributes);
        let assembly =
            vk::PipelineInputAssemblyStateCreateInfo::default().topology(vk::PrimitiveTopology::TRIANGLE_LIST);
        let viewports = [vk::Viewport {
            x: 0.0,
            y: 0.0,
            width: extent.width as f32,
            height: extent.height as f32,
            min_depth: 0.0,
            max_depth: 1.0,
        }];
        let scissors = [vk::Rect2D { offset: vk::Offset2D { x: 0, y: 0 }, extent }];
        let viewport = vk::PipelineViewportStateCreateInfo::default().viewports(&viewports).scissors(&scissors);
        let raster = vk::PipelineRasterizationStateCreateInfo::default()
            .polygon_mode(vk::PolygonMode::FILL)
            .cull_mode(vk::CullModeFlags::NONE)
            .front_face(vk::FrontFace::COUNTER_CLOCKWISE)
            .line_width(1.0);
        let multisample =
            vk::PipelineMultisampleStateCreateInfo::default().rasterization_samples(vk::SampleCountFlags::TYPE_1);
        // Blending is affine, like the colour conversion, so blending converted colours
        // gives the conversion of the blended colour: the planes match the RGBA path.
        let blend_attachment = [vk::PipelineColorBlendAttachmentState::default()
            .blend_enable(true)
            .src_color_blend_factor(vk::BlendFactor::SRC_ALPHA)
            .dst_color_blend_factor(vk::BlendFactor::ONE_MINUS_SRC_ALPHA)
            .color_blend_op(vk::BlendOp::ADD)
            .src_alpha_blend_factor(vk::BlendFactor::ONE)
            .dst_alpha_blend_factor(vk::BlendFactor::ONE_MINUS_SRC_ALPHA)
            .alpha_blend_op(vk::BlendOp::ADD)
            .color_write_mask(vk::ColorComponentFlags::RGBA)];
        let blend = vk::PipelineColorBlendStateCreateInfo::default().attachments(&blend_attachment);
        let info = [vk::GraphicsPipelineCreateInfo::default()
            .stages(&stages)
            .vertex_input_state(&vertex_input)
            .input_assembly_state(&assembly)
            .viewport_state(&viewport)
            .rasterization_state(&raster)
            .multisample_state(&multisample)
            .color_blend_state(&blend)
            .layout(self.graphics_layout)
            .render_pass(pass)
            .subpass(0)];
        // SAFETY: every structure referenced by `info` lives until the call returns.
        unsafe { self.device.create_graphics_pipelines(vk::PipelineCache::null(), &info, None) }
            .map_err(|(_, result)| GpuError::Vulkan { what: "creating a graphics pipeline", result })?
            .into_iter()
            .next()
            .ok_or(GpuError::Vulkan { what: "creating a graphics pipeline", result: vk::Result::ERROR_UNKNOWN })
    }

    fn extent(&self) -> vk::Extent2D {
        vk::Extent2D { width: self.width, height: self.height }
    }

    fn memory_type(
        memory: &vk::PhysicalDeviceMemoryProperties,
        bits: u32,
        required: vk::MemoryPropertyFlags,
        preferred: vk::MemoryPropertyFlags,
        what: &'static str,
    ) -> Result<u32, GpuError> {
        let types = memory.memory_types.get(..memory.memory_type_count as usize).unwrap_or_default();
        let fits = |i: usize, flags: vk::MemoryPropertyFlags| {
            bits & (1 << i) != 0 && types.get(i).is_some_and(|t| t.property_flags.contains(flags))
        };
        (0..types.len())
            .find(|&i| fits(i, required | preferred))
            .or_else(|| (0..types.len()).find(|&i| fits(i, required)))
            .and_then(|i| u32::try_from(i).ok())
            .ok_or(GpuError::NoMemoryType(what))
    }

    /// Allocates device-local memory for `image` (created from this device, unbound) and
    /// binds it; the memory is freed again if binding fails.
    fn image_memory(
        &self,
        memory: &vk::PhysicalDeviceMemoryProperties,
        image: vk::Image,
        what: &'static str,
    ) -> Result<vk::DeviceMemory, GpuError> {
        let d = &self.device;
        // SAFETY: the image belongs to this device.
        let req = unsafe { d.get_image_memory_requirements(image) };
        let index = Self::memory_type(
            memory,
            req.memory_type_bits,
            vk::MemoryPropertyFlags::empty(),
            vk::MemoryPropertyFlags::DEVICE_LOCAL,
            what,
        )?;
        // SAFETY: the index comes from this device's memory properties.
        let mem = unsafe {
            d.allocate_memory(
                &vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(index),
                None,
            )
        }
        .map_err(GpuError::vk(what))?;
        // SAFETY: fresh, unbound image and memory sized by its requirements.
        if let Err(result) = unsafe { d.bind_image_memory(image, mem, 0) } {
            // SAFETY: the memory was never bound or used.
            unsafe { d.free_memory(mem, None) };
            return Err(GpuError::Vulkan { what, result });
        }
        Ok(mem)
    }

    fn create_buffer(
        &self,
        memory: &vk::PhysicalDeviceMemoryProperties,
        size: usize,
        usage: vk::BufferUsageFlags,
        what: &'static str,
    ) -> Result<Buffer, GpuError> {
        let d = &self.device;
        let info =
            vk::BufferCreateInfo::default().size(size as u64).usage(usage).sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: `info` is a valid description.
        let buffer = unsafe { d.create_buffer(&info, None) }.map_err(GpuError::vk(what))?;
        let mut out = Buffer { buffer, memory: vk::DeviceMemory::null(), mapped: std::ptr::null_mut(), size };
        // SAFETY: `buffer` was created from this device.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        let result = (|| {
            let index = Self::memory_type(
                memory,
                req.memory_type_bits,
                vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT,
                vk::MemoryPropertyFlags::HOST_CACHED,
                what,
            )?;
            let alloc = vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(index);
            // SAFETY: the memory type index comes from this device's properties.
            out.memory = unsafe { d.allocate_memory(&alloc, None) }.map_err(GpuError::vk(what))?;
            // SAFETY: the memory was allocated for this buffer's requirements and is unbound.
            unsafe { d.bind_buffer_memory(buffer, out.memory, 0) }.map_err(GpuError::vk(what))?;
            // SAFETY: the memory is host-visible and not mapped yet; the mapping lives
            // until the memory is freed in `destroy_buffer`.
            out.mapped = unsafe { d.map_memory(out.memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) }
                .map_err(GpuError::vk(what))?
                .cast();
            Ok(())
        })();
        match result {
            Ok(()) => Ok(out),
            Err(e) => {
                self.destroy_buffer(&out);
                Err(e)
            }
        }
    }

    fn destroy_buffer(&self, b: &Buffer) {
        // SAFETY: callers only destroy buffers that no pending GPU work uses (all fences
        // are waited for in `Drop`); freeing memory also unmaps it.
        unsafe {
            self.device.destroy_buffer(b.buffer, None);
            if b.memory != vk::DeviceMemory::null() {
                self.device.free_memory(b.memory, None);
            }
        }
    }

    fn create_slot(&self, memory: &vk::PhysicalDeviceMemoryProperties, format: vk::Format) -> Result<Slot, GpuError> {
        let d = &self.device;
        let color_usage =
            vk::ImageUsageFlags::COLOR_ATTACHMENT | vk::ImageUsageFlags::SAMPLED | vk::ImageUsageFlags::TRANSFER_DST;
        // Each object is pushed into `slot` as soon as it exists, so that a failure
        // part-way leaves nothing behind (see `destroy_slot`).
        let mut slot = Slot {
            upload: None,
            planes: Default::default(),
            color: Target::default(),
            vertices: Buffer {
                buffer: vk::Buffer::null(),
                memory: vk::DeviceMemory::null(),
                mapped: std::ptr::null_mut(),
                size: 0,
            },
            nv12: Buffer {
                buffer: vk::Buffer::null(),
                memory: vk::DeviceMemory::null(),
                mapped: std::ptr::null_mut(),
                size: 0,
            },
            descriptor: vk::DescriptorSet::null(),
            commands: vk::CommandBuffer::null(),
            fence: vk::Fence::null(),
            in_flight: false,
        };
        let result = (|| {
            self.create_target(memory, (format, self.extent(), color_usage), self.render_pass, &mut slot.color)?;
            slot.vertices = self.create_buffer(
                memory,
                MAX_VERTICES * std::mem::size_of::<Vertex>(),
                vk::BufferUsageFlags::VERTEX_BUFFER,
                "the vertex buffer",
            )?;
            slot.nv12 = self.create_buffer(
                memory,
                self.nv12_len(),
                vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::TRANSFER_DST,
                "the NV12 buffer",
            )?;
            for (i, plane) in slot.planes.iter_mut().enumerate() {
                let usage = vk::ImageUsageFlags::COLOR_ATTACHMENT | vk::ImageUsageFlags::TRANSFER_SRC;
                self.create_target(
                    memory,
                    (PLANE_FORMATS[i], self.plane_extent(i), usage),
                    self.plane_passes[i],
                    plane,
                )?;
            }
            let layouts = [self.set_layout];
            // SAFETY: the pool was sized for 16 sets; slots are far fewer.
            slot.descriptor = unsafe {
                d.allocate_descriptor_sets(
                    &vk::DescriptorSetAllocateInfo::default()
                        .descriptor_pool(self.descriptor_pool)
                        .set_layouts(&layouts),
                )
            }
            .map_err(GpuError::vk("allocating a descriptor set"))?
            .into_iter()
            .next()
            .unwrap_or_default();
            let image_desc = [vk::DescriptorImageInfo::default()
                .image_view(slot.color.view)
                .image_layout(vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL)];
            let buffer_desc =
                [vk::DescriptorBufferInfo::default().buffer(slot.nv12.buffer).offset(0).range(vk::WHOLE_SIZE)];
            let writes = [
                vk::WriteDescriptorSet::default()
                    .dst_set(slot.descriptor)
                    .dst_binding(0)
                    .descriptor_type(vk::DescriptorType::SAMPLED_IMAGE)
                    .image_info(&image_desc),
                vk::WriteDescriptorSet::default()
                    .dst_set(slot.descriptor)
                    .dst_binding(1)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(&buffer_desc),
            ];
            // SAFETY: the set, view and buffer are alive and not in use by the GPU.
            unsafe { d.update_descriptor_sets(&writes, &[]) };
            // SAFETY: the pool belongs to this device.
            slot.commands = unsafe {
                d.allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(self.command_pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
            }
            .map_err(GpuError::vk("allocating a command buffer"))?
            .into_iter()
            .next()
            .unwrap_or_default();
            // SAFETY: a default fence description is valid.
            slot.fence = unsafe { d.create_fence(&vk::FenceCreateInfo::default(), None) }
                .map_err(GpuError::vk("creating a fence"))?;
            Ok(())
        })();
        match result {
            Ok(()) => Ok(slot),
            Err(e) => {
                self.destroy_slot(&slot);
                Err(e)
            }
        }
    }

    /// The size of plane `i` (0 luma, 1 chroma).
    fn plane_extent(&self, i: usize) -> vk::Extent2D {
        let shift = u32::from(i > 0);
        vk::Extent2D { width: self.width >> shift, height: self.height >> shift }
    }

    /// Creates a target's image (`format`, `extent`, `usage`), memory, view and a
    /// framebuffer for `pass` into `target`, each as soon as it exists, so that
    /// `destroy_slot` cleans up after a failure part-way.
    fn create_target(
        &self,
        memory: &vk::PhysicalDeviceMemoryProperties,
        (format, extent, usage): (vk::Format, vk::Extent2D, vk::ImageUsageFlags),
        pass: vk::RenderPass,
        target: &mut Target,
    ) -> Result<(), GpuError> {
        let d = &self.device;
        let image_info = vk::ImageCreateInfo::default()
            .image_type(vk::ImageType::TYPE_2D)
            .format(format)
            .extent(vk::Extent3D { width: extent.width, height: extent.height, depth: 1 })
            .mip_levels(1)
            .array_layers(1)
            .samples(vk::SampleCountFlags::TYPE_1)
            .tiling(vk::ImageTiling::OPTIMAL)
            .usage(usage)
            .initial_layout(vk::ImageLayout::UNDEFINED);
        // SAFETY: `image_info` is a valid description.
        target.image =
            unsafe { d.create_image(&image_info, None) }.map_err(GpuError::vk("creating a colour target"))?;
        target.memory = self.image_memory(memory, target.image, "a colour target")?;
        let view_info = vk::ImageViewCreateInfo::default()
            .image(target.image)
            .view_type(vk::ImageViewType::TYPE_2D)
            .format(format)
            .subresource_range(color_range());
        // SAFETY: the view describes the image created above.
        target.view =
            unsafe { d.create_image_view(&view_info, None) }.map_err(GpuError::vk("creating a target's view"))?;
        let views = [target.view];
        let fb_info = vk::FramebufferCreateInfo::default()
            .render_pass(pass)
            .attachments(&views)
            .width(extent.width)
            .height(extent.height)
            .layers(1);
        // SAFETY: the view matches the pass's single attachment, of the same format.
        target.framebuffer =
            unsafe { d.create_framebuffer(&fb_info, None) }.map_err(GpuError::vk("creating a framebuffer"))?;
        Ok(())
    }

    fn destroy_upload(&self, u: &Upload) {
        if u.descriptor != vk::DescriptorSet::null() {
            // SAFETY: the pool allows freeing; no pending work uses the set.
            let _ = unsafe { self.device.free_descriptor_sets(self.descriptor_pool, &[u.descriptor]) };
        }
        self.destroy_buffer(&u.buffer);
        // SAFETY: only called when no pending work uses the upload (the slot's fence was
        // waited for, or the device is idle); null handles are ignored.
        unsafe {
            self.device.destroy_image(u.image, None);
            if u.memory != vk::DeviceMemory::null() {
                self.device.free_memory(u.memory, None);
            }
        }
    }

    /// Makes `slot`'s upload area fit a `width` x `height` picture.
    fn ensure_upload(&mut self, slot: usize, width: u32, height: u32) -> Result<(), GpuError> {
        let fits = self
            .slots
            .get(slot)
            .and_then(|s| s.upload.as_ref())
            .is_some_and(|u| u.width == width && u.height == height);
        if fits {
            return Ok(());
        }
        if let Some(old) = self.slots.get_mut(slot).and_then(|s| s.upload.take()) {
            self.destroy_upload(&old);
        }
        let memory = self.memory;
        let buffer = self.create_buffer(
            &memory,
            width as usize * height as usize * 4,
            vk::BufferUsageFlags::TRANSFER_SRC | vk::BufferUsageFlags::STORAGE_BUFFER,
            "the upload buffer",
        )?;
        let mut upload = Upload {
            buffer,
            descriptor: vk::DescriptorSet::null(),
            image: vk::Image::null(),
            memory: vk::DeviceMemory::null(),
            width,
            height,
        };
        if (width, height) == (self.width, self.height) {
            let layouts = [self.packed_set_layout];
            // SAFETY: the pool and layout belong to this device.
            let sets = unsafe {
                self.device.allocate_descriptor_sets(
                    &vk::DescriptorSetAllocateInfo::default()
                        .descriptor_pool(self.descriptor_pool)
                        .set_layouts(&layouts),
                )
            };
            match sets {
                Ok(sets) => upload.descriptor = sets.into_iter().next().unwrap_or_default(),
                Err(result) => {
                    self.destroy_upload(&upload);
                    return Err(GpuError::Vulkan { what: "allocating the upload's descriptor set", result });
                }
            }
            let nv12 = self.slots.get(slot).map(|s| s.nv12.buffer).unwrap_or_default();
            let source =
                [vk::DescriptorBufferInfo::default().buffer(upload.buffer.buffer).offset(0).range(vk::WHOLE_SIZE)];
            let target = [vk::DescriptorBufferInfo::default().buffer(nv12).offset(0).range(vk::WHOLE_SIZE)];
            let writes = [
                vk::WriteDescriptorSet::default()
                    .dst_set(upload.descriptor)
                    .dst_binding(0)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(&source),
                vk::WriteDescriptorSet::default()
                    .dst_set(upload.descriptor)
                    .dst_binding(1)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(&target),
            ];
            // SAFETY: the set and buffers are alive and not in use by the GPU.
            unsafe { self.device.update_descriptor_sets(&writes, &[]) };
        } else {
            let d = &self.device;
            let info = vk::ImageCreateInfo::default()
                .image_type(vk::ImageType::TYPE_2D)
                .format(vk::Format::R8G8B8A8_UNORM)
                .extent(vk::Extent3D { width, height, depth: 1 })
                .mip_levels(1)
                .array_layers(1)
                .samples(vk::SampleCountFlags::TYPE_1)
                .tiling(vk::ImageTiling::OPTIMAL)
                .usage(vk::ImageUsageFlags::TRANSFER_DST | vk::ImageUsageFlags::TRANSFER_SRC)
                .initial_layout(vk::ImageLayout::UNDEFINED);
            let result = (|| {
                // SAFETY: `info` is a valid description.
                upload.image =
                    unsafe { d.create_image(&info, None) }.map_err(GpuError::vk("creating the upload image"))?;
                upload.memory = self.image_memory(&memory, upload.image, "the upload image")?;
                Ok(())
            })();
            if let Err(e) = result {
                self.destroy_upload(&upload);
                return Err(e);
            }
        }
        if let Some(s) = self.slots.get_mut(slot) {
            s.upload = Some(upload);
        }
        Ok(())
    }

    fn destroy_slot(&self, s: &Slot) {
        if let Some(u) = &s.upload {
            self.destroy_upload(u);
        }
        let d = &self.device;
        // SAFETY: `Drop` waits for the device to go idle first, so nothing here is in use;
        // null handles are ignored by Vulkan's destroy functions.
        unsafe {
            d.destroy_fence(s.fence, None);
            for t in s.planes.iter().chain([&s.color]) {
                d.destroy_framebuffer(t.framebuffer, None);
                d.destroy_image_view(t.view, None);
                d.destroy_image(t.image, None);
                if t.memory != vk::DeviceMemory::null() {
                    d.free_memory(t.memory, None);
                }
            }
        }
        if s.vertices.buffer != vk::Buffer::null() {
            self.destroy_buffer(&s.vertices);
        }
        if s.nv12.buffer != vk::Buffer::null() {
            self.destroy_buffer(&s.nv12);
        }
    }

    /// Records and submits one frame into `slot`. The slot must not be in flight.
    pub fn submit(&mut self, slot: usize, vertices: &[Vertex], work: Work) -> Result<(), GpuError> {
        if vertices.len() > MAX_VERTICES {
            return Err(GpuError::TooManyVertices(vertices.len()));
        }
        let Some(s) = self.slots.get(slot) else {
            return Err(GpuError::NoDevice(format!("no ring slot {slot}")));
        };
        if s.in_flight {
            // Waiting here keeps the slot's buffers safe to overwrite.
            self.wait(slot, Duration::from_secs(5))?;
        }
        let Some(s) = self.slots.get(slot) else {
            return Err(GpuError::NoDevice(format!("no ring slot {slot}")));
        };
        let d = &self.device;
        // SAFETY: the slot is not in flight, so the GPU does not read its vertex buffer;
        // the mapping is MAX_VERTICES vertices long and `vertices` is no longer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                vertices.as_ptr().cast::<u8>(),
                s.vertices.mapped,
                std::mem::size_of_val(vertices),
            );
        }
        let cb = s.commands;
        // SAFETY: the command buffer is not pending (its fence was waited for), it comes
        // from a pool with RESET_COMMAND_BUFFER, and every handle recorded belongs to this
        // device and lives as long as the renderer.
        unsafe {
            d.reset_command_buffer(cb, vk::CommandBufferResetFlags::empty())
                .map_err(GpuError::vk("resetting commands"))?;
            d.begin_command_buffer(
                cb,
                &vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(GpuError::vk("recording commands"))?;
            match work {
                Work::RenderOnly | Work::RenderThenConvert => {
                    let clear = [vk::ClearValue { color: vk::ClearColorValue { float32: self.clear_color } }];
                    let begin = vk::RenderPassBeginInfo::default()
                        .render_pass(self.render_pass)
                        .framebuffer(s.color.framebuffer)
                        .render_area(vk::Rect2D { offset: vk::Offset2D { x: 0, y: 0 }, extent: self.extent() })
                        .clear_values(&clear);
                    d.cmd_begin_render_pass(cb, &begin, vk::SubpassContents::INLINE);
                    if !vertices.is_empty() {
                        d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::GRAPHICS, self.graphics);
                        d.cmd_bind_vertex_buffers(cb, 0, &[s.vertices.buffer], &[0]);
                        d.cmd_draw(cb, vertices.len() as u32, 1, 0, 0);
                    }
                    d.cmd_end_render_pass(cb);
                    if work == Work::RenderThenConvert {
                        self.record_convert(cb, s, false);
                    }
                }
                Work::RenderAndConvert => self.record_planes(cb, s, vertices.len() as u32),
            }
            d.end_command_buffer(cb).map_err(GpuError::vk("recording commands"))?;
            d.reset_fences(&[s.fence]).map_err(GpuError::vk("resetting a fence"))?;
            let cbs = [cb];
            let submit = [vk::SubmitInfo::default().command_buffers(&cbs)];
            d.queue_submit(self.queue, &submit, s.fence).map_err(GpuError::vk("submitting a frame"))?;
        }
        if let Some(s) = self.slots.get_mut(slot) {
            s.in_flight = true;
        }
        Ok(())
    }

    /// Records the scene drawn straight into the slot's luma and chroma planes, both copied
    /// into its NV12 buffer (luma rows, then interleaved chroma rows) and made visible to
    /// the host once the fence signals. No RGBA image, no conversion pass.
    ///
    /// # Safety
    /// `cb` is `s`'s command buffer, in the recording state, and `s`'s vertex buffer holds
    /// `vertex_count` vertices.
    unsafe fn record_planes(&self, cb: vk::CommandBuffer, s: &Slot, vertex_count: u32) {
        let d = &self.device;
        let clears = plane_clear(self.clear_color);
        let luma_len = u64::from(self.width) * u64::from(self.height);
        for (i, plane) in s.planes.iter().enumerate() {
            let extent = self.plane_extent(i);
            let clear = [vk::ClearValue { color: vk::ClearColorValue { float32: clears[i.min(1)] } }];
            let begin = vk::RenderPassBeginInfo::default()
                .render_pass(self.plane_passes[i.min(1)])
                .framebuffer(plane.framebuffer)
                .render_area(vk::Rect2D { offset: vk::Offset2D { x: 0, y: 0 }, extent })
                .clear_values(&clear);
            let region = [vk::BufferImageCopy::default()
                .buffer_offset(if i == 0 { 0 } else { luma_len })
                .image_subresource(vk::ImageSubresourceLayers {
                    aspect_mask: vk::ImageAspectFlags::COLOR,
                    mip_level: 0,
                    base_array_layer: 0,
                    layer_count: 1,
                })
                .image_extent(vk::Extent3D { width: extent.width, height: extent.height, depth: 1 })];
            // SAFETY: the caller records into `s`'s command buffer; the plane's pass leaves
            // its image in TRANSFER_SRC_OPTIMAL, and the copy fits the NV12 buffer (luma
            // width x height bytes, chroma width/2 x height/2 two-byte texels after it).
            unsafe {
                d.cmd_begin_render_pass(cb, &begin, vk::SubpassContents::INLINE);
                if vertex_count > 0 {
                    d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::GRAPHICS, self.plane_pipelines[i.min(1)]);
                    d.cmd_bind_vertex_buffers(cb, 0, &[s.vertices.buffer], &[0]);
                    d.cmd_draw(cb, vertex_count, 1, 0, 0);
                }
                d.cmd_end_render_pass(cb);
                d.cmd_copy_image_to_buffer(
                    cb,
                    plane.image,
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    s.nv12.buffer,
                    &region,
                );
            }
        }
        // SAFETY: the caller records into `s`'s command buffer.
        unsafe {
            self.record_readback_to_host(cb, s, vk::PipelineStageFlags::TRANSFER, vk::AccessFlags::TRANSFER_WRITE)
        }
    }

    /// Records the barrier that makes `s`'s NV12 readback buffer, written by `stage` with
    /// `access`, visible to the host once the fence signals.
    ///
    /// # Safety
    /// `cb` is `s`'s command buffer, in the recording state.
    unsafe fn record_readback_to_host(
        &self,
        cb: vk::CommandBuffer,
        s: &Slot,
        stage: vk::PipelineStageFlags,
        access: vk::AccessFlags,
    ) {
        let barrier = [vk::BufferMemoryBarrier::default()
            .src_access_mask(access)
            .dst_access_mask(vk::AccessFlags::HOST_READ)
            .src_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
            .dst_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
            .buffer(s.nv12.buffer)
            .offset(0)
            .size(vk::WHOLE_SIZE)];
        // SAFETY: the caller records into `s`'s command buffer; the buffer belongs to this
        // device.
        unsafe {
            self.device.cmd_pipeline_barrier(
                cb,
                stage,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &[],
                &barrier,
                &[],
            );
        }
    }

    /// Records the NV12 conversion of the slot's colour target (in
    /// `SHADER_READ_ONLY_OPTIMAL`) into its readback buffer.
    ///
    /// # Safety
    /// `cb` is `s`'s command buffer, in the recording state.
    unsafe fn record_convert(&self, cb: vk::CommandBuffer, s: &Slot, swap_rb: bool) {
        let params = [self.width, self.height, self.width * self.height / 4, u32::from(swap_rb)];
        // SAFETY: as the caller promises; the set and layout are this renderer's.
        unsafe { self.record_nv12(cb, s, (self.compute, self.compute_layout, s.descriptor), &params) }
    }

    /// Records the NV12 conversion of `u`'s packed pixels (the stream's size, tightly
    /// packed rows) into `s`'s readback buffer.
    ///
    /// # Safety
    /// `cb` is `s`'s command buffer, in the recording state; `u` is `s`'s upload area.
    unsafe fn record_packed(&self, cb: vk::CommandBuffer, s: &Slot, u: &Upload, swap_rb: bool) {
        let params = [self.width, self.height, self.width * self.height / 4, u32::from(swap_rb), self.width, 0, 0, 0];
        // SAFETY: as the caller promises; host writes to the upload buffer are visible to
        // the queue at submit.
        unsafe { self.record_nv12(cb, s, (self.packed, self.packed_layout, u.descriptor), &params) }
    }

    /// Records one NV12 compute pass with `pipeline` (pipeline, layout, descriptor set)
    /// and push constants `params`, then makes its writes to `s`'s readback buffer
    /// visible to the host once the fence signals.
    ///
    /// # Safety
    /// `cb` is `s`'s command buffer, in the recording state; the set's buffers are alive.
    unsafe fn record_nv12(
        &self,
        cb: vk::CommandBuffer,
        s: &Slot,
        (pipeline, layout, set): (vk::Pipeline, vk::PipelineLayout, vk::DescriptorSet),
        params: &[u32],
    ) {
        let d = &self.device;
        // SAFETY: the caller records into `s`'s command buffer; every handle belongs to
        // this device.
        unsafe {
            d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, pipeline);
            d.cmd_bind_descriptor_sets(cb, vk::PipelineBindPoint::COMPUTE, layout, 0, &[set], &[]);
            let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_ne_bytes()).collect();
            d.cmd_push_constants(cb, layout, vk::ShaderStageFlags::COMPUTE, 0, &bytes);
            // One invocation per 4x2 block, 64 invocations a workgroup along a row (fastest on lavapipe).
            d.cmd_dispatch(cb, (self.width / 4).div_ceil(64), self.height / 2, 1);
            self.record_readback_to_host(cb, s, vk::PipelineStageFlags::COMPUTE_SHADER, vk::AccessFlags::SHADER_WRITE);
        }
    }

    /// Uploads `picture` into `slot` (scaled to the stream's size when it differs) and
    /// converts it to NV12 there, like [`Self::submit`] with `RenderAndConvert` does for a
    /// rendered scene. The slot must not be in flight.
    pub fn submit_upload(&mut self, slot: usize, picture: Picture<'_>) -> Result<(), GpuError> {
        let Picture { width, height, stride, pixels, order } = picture;
        let row = width as usize * 4;
        if width == 0 || height == 0 || stride < row || pixels.len() < stride * (height as usize - 1) + row {
            return Err(GpuError::BadSize { width, height });
        }
        if self.slots.get(slot).is_some_and(|s| s.in_flight) {
            self.wait(slot, Duration::from_secs(5))?;
        }
        self.ensure_upload(slot, width, height)?;
        let Some(s) = self.slots.get(slot) else {
            return Err(GpuError::NoDevice(format!("no ring slot {slot}")));
        };
        let Some(u) = s.upload.as_ref() else {
            return Err(GpuError::NoDevice("no upload area".into()));
        };
        for y in 0..height as usize {
            let src = pixels.get(y * stride..y * stride + row).unwrap_or_default();
            // SAFETY: the slot is not in flight, so the GPU does not read the upload
            // buffer; it is `width * height * 4` bytes and row `y` ends within it.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), u.buffer.mapped.add(y * row), src.len()) };
        }
        let d = &self.device;
        let cb = s.commands;
        let layers = vk::ImageSubresourceLayers {
            aspect_mask: vk::ImageAspectFlags::COLOR,
            mip_level: 0,
            base_array_layer: 0,
            layer_count: 1,
        };
        let barrier = layout_barrier;
        let copy = [vk::BufferImageCopy::default()
            .buffer_offset(0)
            .buffer_row_length(0)
            .buffer_image_height(0)
            .image_subresource(layers)
            .image_extent(vk::Extent3D { width, height, depth: 1 })];
        let scaled = u.image != vk::Image::null();
        // SAFETY: the command buffer is not pending (the slot is not in flight), it comes
        // from a pool with RESET_COMMAND_BUFFER, and every handle recorded belongs to this
        // device and lives as long as the renderer (or the upload area, which is only
        // replaced while the slot is idle).
        unsafe {
            d.reset_command_buffer(cb, vk::CommandBufferResetFlags::empty())
                .map_err(GpuError::vk("resetting commands"))?;
            d.begin_command_buffer(
                cb,
                &vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(GpuError::vk("recording commands"))?;
            // The colour target's previous contents (read by the last conversion) are discarded.
            let to_dst = [barrier(
                s.color.image,
                vk::ImageLayout::UNDEFINED,
                vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                vk::AccessFlags::SHADER_READ,
                vk::AccessFlags::TRANSFER_WRITE,
            )];
            if scaled {
                let upload_dst = [barrier(
                    u.image,
                    vk::ImageLayout::UNDEFINED,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::AccessFlags::TRANSFER_READ,
                    vk::AccessFlags::TRANSFER_WRITE,
                )];
                d.cmd_pipeline_barrier(
                    cb,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &upload_dst,
                );
                d.cmd_copy_buffer_to_image(cb, u.buffer.buffer, u.image, vk::ImageLayout::TRANSFER_DST_OPTIMAL, &copy);
                let upload_src = [barrier(
                    u.image,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    vk::AccessFlags::TRANSFER_WRITE,
                    vk::AccessFlags::TRANSFER_READ,
                )];
                d.cmd_pipeline_barrier(
                    cb,
                    vk::PipelineStageFlags::TRANSFER | vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &[upload_src[0], to_dst[0]],
                );
                let corner = |w: u32, h: u32| {
                    [vk::Offset3D { x: 0, y: 0, z: 0 }, vk::Offset3D { x: w as i32, y: h as i32, z: 1 }]
                };
                let blit = [vk::ImageBlit::default()
                    .src_subresource(layers)
                    .src_offsets(corner(width, height))
                    .dst_subresource(layers)
                    .dst_offsets(corner(self.width, self.height))];
                d.cmd_blit_image(
                    cb,
                    u.image,
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    s.color.image,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    &blit,
                    vk::Filter::LINEAR,
                );
                // The scaled picture is in the colour target: convert it as a rendered frame.
                let to_read = [barrier(
                    s.color.image,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL,
                    vk::AccessFlags::TRANSFER_WRITE,
                    vk::AccessFlags::SHADER_READ,
                )];
                d.cmd_pipeline_barrier(
                    cb,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &to_read,
                );
                self.record_convert(cb, s, order == PixelOrder::Bgrx);
            } else {
                // Same size: the conversion reads the upload buffer itself, no image copy.
                self.record_packed(cb, s, u, order == PixelOrder::Bgrx);
            }
            d.end_command_buffer(cb).map_err(GpuError::vk("recording commands"))?;
            d.reset_fences(&[s.fence]).map_err(GpuError::vk("resetting a fence"))?;
            let cbs = [cb];
            let submit = [vk::SubmitInfo::default().command_buffers(&cbs)];
            d.queue_submit(self.queue, &submit, s.fence).map_err(GpuError::vk("submitting a frame"))?;
        }
        if let Some(s) = self.slots.get_mut(slot) {
            s.in_flight = true;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the slot's frame to finish. Returns `Ok(false)` on timeout
    /// (the slot stays in flight) and `Ok(true)` once it is done or was not in flight.
    pub fn poll(&mut self, slot: usize, timeout: Duration) -> Result<bool, GpuError> {
        let Some(s) = self.slots.get_mut(slot) else {
            return Ok(true);
        };
        if !s.in_flight {
            return Ok(true);
        }
        let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: the fence belongs to this device and was submitted with the slot's work.
        match unsafe { self.device.wait_for_fences(&[s.fence], true, nanos) } {
            Ok(()) => {
                s.in_flight = false;
                Ok(true)
            }
            Err(vk::Result::TIMEOUT) => Ok(false),
            Err(result) => Err(GpuError::Vulkan { what: "waiting for a frame", result }),
        }
    }

    /// Waits for the slot's frame to finish, failing after `timeout`.
    pub fn wait(&mut self, slot: usize, timeout: Duration) -> Result<(), GpuError> {
        if self.poll(slot, timeout)? { Ok(()) } else { Err(GpuError::Timeout(timeout)) }
    }

    /// The slot's NV12 picture (luma plane, `width` bytes a row, then interleaved UV,
    /// `width` bytes a row, half as many rows). Only meaningful once the slot's
    /// `RenderAndConvert` work has been waited for; `None` while it is in flight.
    pub fn nv12(&self, slot: usize) -> Option<&[u8]> {
        let s = self.slots.get(slot)?;
        if s.in_flight {
            return None;
        }
        // SAFETY: the mapping is `size` bytes long and lives as long as `self`; the GPU
        // is not writing to it since the slot is not in flight, and `submit` (the only
        // writer) takes `&mut self`, so it cannot run while this borrow exists.
        Some(unsafe { std::slice::from_raw_parts(s.nv12.mapped, s.nv12.size) })
    }
}

/// A render pass that clears one colour attachment of `format`, draws, and leaves it in
/// `final_layout` for what reads it next, at `reader` (stage, access): the synchronisation
/// with that reader both ways (the previous frame's read before this draw, this draw
/// before the read).
fn color_pass(
    d: &ash::Device,
    format: vk::Format,
    final_layout: vk::ImageLayout,
    (reader_stage, reader_access): (vk::PipelineStageFlags, vk::AccessFlags),
) -> Result<vk::RenderPass, GpuError> {
    let attachment = [vk::AttachmentDescription::default()
        .format(format)
        .samples(vk::SampleCountFlags::TYPE_1)
        .load_op(vk::AttachmentLoadOp::CLEAR)
        .store_op(vk::AttachmentStoreOp::STORE)
        .stencil_load_op(vk::AttachmentLoadOp::DONT_CARE)
        .stencil_store_op(vk::AttachmentStoreOp::DONT_CARE)
        .initial_layout(vk::ImageLayout::UNDEFINED)
        .final_layout(final_layout)];
    let color_ref =
        [vk::AttachmentReference::default().attachment(0).layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)];
    let subpass = [vk::SubpassDescription::default()
        .pipeline_bind_point(vk::PipelineBindPoint::GRAPHICS)
        .color_attachments(&color_ref)];
    let dependencies = [
        vk::SubpassDependency::default()
            .src_subpass(vk::SUBPASS_EXTERNAL)
            .dst_subpass(0)
            .src_stage_mask(reader_stage)
            .dst_stage_mask(vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT)
            .src_access_mask(reader_access)
            .dst_access_mask(vk::AccessFlags::COLOR_ATTACHMENT_WRITE),
        vk::SubpassDependency::default()
            .src_subpass(0)
            .dst_subpass(vk::SUBPASS_EXTERNAL)
            .src_stage_mask(vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT)
            .dst_stage_mask(reader_stage)
            .src_access_mask(vk::AccessFlags::COLOR_ATTACHMENT_WRITE)
            .dst_access_mask(reader_access),
    ];
    let info =
        vk::RenderPassCreateInfo::default().attachments(&attachment).subpasses(&subpass).dependencies(&dependencies);
    // SAFETY: `info` and the arrays it points to outlive the call.
    unsafe { d.create_render_pass(&info, None) }.map_err(GpuError::vk("creating a render pass"))
}

/// `rgb` (0..1) as the luma and chroma planes' clear values (BT.709 limited range, the
/// conversion of `shaders/yuv.wgsl`).
fn plane_clear(rgb: [f32; 4]) -> [[f32; 4]; 2] {
    let [r, g, b, _] = rgb;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let u = 128.0 + 224.0 * (b - y) / 1.8556;
    let v = 128.0 + 224.0 * (r - y) / 1.5748;
    [[(16.0 + 219.0 * y) / 255.0, 0.0, 0.0, 1.0], [u / 255.0, v / 255.0, 0.0, 1.0]]
}

/// The whole colour image (one mip level, one layer).
fn color_range() -> vk::ImageSubresourceRange {
    vk::ImageSubresourceRange {
        aspect_mask: vk::ImageAspectFlags::COLOR,
        base_mip_level: 0,
        level_count: 1,
        base_array_layer: 0,
        layer_count: 1,
    }
}

/// A layout transition of a whole colour image within one queue family.
fn layout_barrier(
    image: vk::Image,
    from: vk::ImageLayout,
    to: vk::ImageLayout,
    src: vk::AccessFlags,
    dst: vk::AccessFlags,
) -> vk::ImageMemoryBarrier<'static> {
    vk::ImageMemoryBarrier::default()
        .image(image)
        .old_layout(from)
        .new_layout(to)
        .src_access_mask(src)
        .dst_access_mask(dst)
        .src_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
        .dst_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
        .subresource_range(color_range())
}

impl Drop for FrameRenderer {
    fn drop(&mut self) {
        // SAFETY: waiting for idle guarantees no object below is still in use.
        unsafe {
            let _ = self.device.device_wait_idle();
        }
        if let Some(ring) = self.imported.take() {
            self.destroy_ring(&ring);
        }
        for s in &self.slots {
            self.destroy_slot(s);
        }
        // SAFETY: the device is idle; every handle was created from it (or is null,
        // which Vulkan ignores), and the instance outlives the device until the end.
        unsafe {
            let d = &self.device;
            d.destroy_command_pool(self.command_pool, None);
            d.destroy_descriptor_pool(self.descriptor_pool, None);
            d.destroy_pipeline(self.compute, None);
            d.destroy_pipeline(self.packed, None);
            d.destroy_pipeline_layout(self.packed_layout, None);
            d.destroy_descriptor_set_layout(self.packed_set_layout, None);
            d.destroy_pipeline_layout(self.compute_layout, None);
            d.destroy_descriptor_set_layout(self.set_layout, None);
            d.destroy_pipeline(self.graphics, None);
            for (pipeline, pass) in self.plane_pipelines.iter().zip(&self.plane_passes) {
                d.destroy_pipeline(*pipeline, None);
                d.destroy_render_pass(*pass, None);
            }
            d.destroy_pipeline_layout(self.graphics_layout, None);
            d.destroy_render_pass(self.render_pass, None);
            d.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}
