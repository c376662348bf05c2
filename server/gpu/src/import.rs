//! Frames from a studio title's Vulkan present layer: its ring of exported images,
//! imported into this device and converted to NV12 like a rendered frame — no copy of the
//! picture through the CPU.
//!
//! The images are created with exactly the parameters the layer used (the capture
//! protocol in `pylon_proto::capture` fixes them: 2-D, optimal tiling, `TRANSFER_SRC |
//! TRANSFER_DST | SAMPLED`, OPAQUE_FD memory) and bound to the imported memory. When the ring's size is
//! the stream's, the NV12 pass samples the imported image directly; otherwise it is
//! scaled into the slot's colour target first (one blit).

use std::os::fd::{IntoRawFd as _, OwnedFd};
use std::time::Duration;

use ash::vk;

use crate::{FrameRenderer, GpuError, color_range, layout_barrier};

/// `TRANSFER_SRC | TRANSFER_DST | SAMPLED`: the usage both sides create ring images with.
const RING_USAGE: vk::ImageUsageFlags = vk::ImageUsageFlags::from_raw(0x1 | 0x2 | 0x4);

/// A ring of images another process exported, as it describes them.
#[derive(Debug, Clone, Copy)]
pub struct ExportedRing<'a> {
    /// Pixels wide.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Blue-green-red-alpha bytes (`B8G8R8A8_UNORM`); otherwise red first (`R8G8B8A8_UNORM`).
    pub bgra: bool,
    /// Memory type index the exporter allocated from.
    pub memory_type: u32,
    /// Each image's allocation size.
    pub sizes: &'a [u64],
    /// The exporter's device UUID.
    pub device_uuid: [u8; 16],
    /// The exporter's driver UUID.
    pub driver_uuid: [u8; 16],
}

/// Why a ring cannot be imported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The exporter is another device or driver (or this device cannot import).
    #[error("{0}")]
    OtherDevice(String),
    /// The description does not fit what this device needs for such an image.
    #[error("the ring's description does not fit this device: {0}")]
    Mismatch(String),
    /// A Vulkan call failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

pub(crate) struct ImportedImage {
    image: vk::Image,
    memory: vk::DeviceMemory,
    view: vk::ImageView,
}

pub(crate) struct ImportedRing {
    width: u32,
    height: u32,
    images: Vec<ImportedImage>,
    /// For same-size rings: one set per (image, slot), the image in and the slot's NV12 out.
    pool: vk::DescriptorPool,
    sets: Vec<Vec<vk::DescriptorSet>>,
}

impl FrameRenderer {
    /// Imports a ring of exported images (one descriptor per image, in order), replacing
    /// any ring imported before. On error nothing is kept and the descriptors are closed.
    pub fn import_ring(&mut self, ring: &ExportedRing<'_>, fds: Vec<OwnedFd>) -> Result<(), ImportError> {
        self.drop_ring()?;
        if !self.info.external_memory_fd {
            return Err(ImportError::OtherDevice(format!("{} cannot import memory from descriptors", self.info.name)));
        }
        if ring.device_uuid != self.info.device_uuid || ring.driver_uuid != self.info.driver_uuid {
            let hex = |u: &[u8; 16]| u.iter().map(|b| format!("{b:02x}")).collect::<String>();
            return Err(ImportError::OtherDevice(format!(
                "the title renders on device {} (driver {}), the node on {} ({}: {})",
                hex(&ring.device_uuid),
                hex(&ring.driver_uuid),
                hex(&self.info.device_uuid),
                hex(&self.info.driver_uuid),
                self.info.name
            )));
        }
        if fds.len() != ring.sizes.len() || fds.is_empty() {
            return Err(ImportError::Mismatch(format!("{} descriptors for {} images", fds.len(), ring.sizes.len())));
        }
        let mut imported = ImportedRing {
            width: ring.width,
            height: ring.height,
            images: Vec::new(),
            pool: vk::DescriptorPool::null(),
            sets: Vec::new(),
        };
        let result = self.import_images(ring, fds, &mut imported);
        match result {
            Ok(()) => {
                self.imported = Some(imported);
                Ok(())
            }
            Err(e) => {
                self.destroy_ring(&imported);
                Err(e)
            }
        }
    }

    fn import_images(
        &self,
        ring: &ExportedRing<'_>,
        fds: Vec<OwnedFd>,
        out: &mut ImportedRing,
    ) -> Result<(), ImportError> {
        let d = &self.device;
        let format = if ring.bgra { vk::Format::B8G8R8A8_UNORM } else { vk::Format::R8G8B8A8_UNORM };
        for (fd, &size) in fds.into_iter().zip(ring.sizes) {
            let mut external =
                vk::ExternalMemoryImageCreateInfo::default().handle_types(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD);
            let info = vk::ImageCreateInfo::default()
                .push_next(&mut external)
                .image_type(vk::ImageType::TYPE_2D)
                .format(format)
                .extent(vk::Extent3D { width: ring.width, height: ring.height, depth: 1 })
                .mip_levels(1)
                .array_layers(1)
                .samples(vk::SampleCountFlags::TYPE_1)
                .tiling(vk::ImageTiling::OPTIMAL)
                .usage(RING_USAGE)
                .sharing_mode(vk::SharingMode::EXCLUSIVE)
                .initial_layout(vk::ImageLayout::UNDEFINED);
            // SAFETY: a valid description on this device.
            let image = unsafe { d.create_image(&info, None) }.map_err(GpuError::vk("creating an imported image"))?;
            out.images.push(ImportedImage { image, memory: vk::DeviceMemory::null(), view: vk::ImageView::null() });
            // SAFETY: the image was just created on this device.
            let needs = unsafe { d.get_image_memory_requirements(image) };
            if size < needs.size || needs.memory_type_bits & (1u32 << ring.memory_type.min(31)) == 0 {
                return Err(ImportError::Mismatch(format!(
                    "image needs {} bytes of memory types {:#x}; the title gave {size} bytes of type {}",
                    needs.size, needs.memory_type_bits, ring.memory_type
                )));
            }
            let raw = fd.into_raw_fd();
            let mut import =
                vk::ImportMemoryFdInfoKHR::default().handle_type(vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD).fd(raw);
            let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().image(image);
            let alloc = vk::MemoryAllocateInfo::default()
                .push_next(&mut import)
                .push_next(&mut dedicated)
                .allocation_size(size)
                .memory_type_index(ring.memory_type);
            // SAFETY: the descriptor is ours to give; on success Vulkan owns it.
            let memory = match unsafe { d.allocate_memory(&alloc, None) } {
                Ok(m) => m,
                Err(result) => {
                    // SAFETY: the import failed, so the descriptor is still ours: close it.
                    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
                    return Err(GpuError::Vulkan { what: "importing a title's frame memory", result }.into());
                }
            };
            if let Some(last) = out.images.last_mut() {
                last.memory = memory;
            }
            // SAFETY: memory of at least the image's size, of a type it accepts.
            unsafe { d.bind_image_memory(image, memory, 0) }.map_err(GpuError::vk("binding an imported image"))?;
            let view_info = vk::ImageViewCreateInfo::default()
                .image(image)
                .view_type(vk::ImageViewType::TYPE_2D)
                .format(format)
                .subresource_range(color_range());
            // SAFETY: the view describes the image just bound.
            let view = unsafe { d.create_image_view(&view_info, None) }
                .map_err(GpuError::vk("creating an imported image's view"))?;
            if let Some(last) = out.images.last_mut() {
                last.view = view;
            }
        }
        if (ring.width, ring.height) == (self.width, self.height) {
            self.ring_descriptors(out)?;
        }
        Ok(())
    }

    /// One descriptor set per (image, slot) for the direct conversion.
    fn ring_descriptors(&self, ring: &mut ImportedRing) -> Result<(), GpuError> {
        let d = &self.device;
        let sets = (ring.images.len() * self.slots.len()) as u32;
        let sizes = [
            vk::DescriptorPoolSize { ty: vk::DescriptorType::SAMPLED_IMAGE, descriptor_count: sets },
            vk::DescriptorPoolSize { ty: vk::DescriptorType::STORAGE_BUFFER, descriptor_count: sets },
        ];
        // SAFETY: `sizes` outlives the call.
        ring.pool = unsafe {
            d.create_descriptor_pool(&vk::DescriptorPoolCreateInfo::default().max_sets(sets).pool_sizes(&sizes), None)
        }
        .map_err(GpuError::vk("creating the imported ring's descriptor pool"))?;
        for image in &ring.images {
            let layouts = vec![self.set_layout; self.slots.len()];
            // SAFETY: the pool was sized for every set.
            let per_slot = unsafe {
                d.allocate_descriptor_sets(
                    &vk::DescriptorSetAllocateInfo::default().descriptor_pool(ring.pool).set_layouts(&layouts),
                )
            }
            .map_err(GpuError::vk("allocating the imported ring's descriptor sets"))?;
            for (set, slot) in per_slot.iter().zip(&self.slots) {
                let image_desc = [vk::DescriptorImageInfo::default()
                    .image_view(image.view)
                    .image_layout(vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL)];
                let buffer_desc =
                    [vk::DescriptorBufferInfo::default().buffer(slot.nv12.buffer).offset(0).range(vk::WHOLE_SIZE)];
                let writes = [
                    vk::WriteDescriptorSet::default()
                        .dst_set(*set)
                        .dst_binding(0)
                        .descriptor_type(vk::DescriptorType::SAMPLED_IMAGE)
                        .image_info(&image_desc),
                    vk::WriteDescriptorSet::default()
                        .dst_set(*set)
                        .dst_binding(1)
                        .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                        .buffer_info(&buffer_desc),
                ];
                // SAFETY: the set, view and buffer are alive and not in use.
                unsafe { d.update_descriptor_sets(&writes, &[]) };
            }
            ring.sets.push(per_slot);
        }
        Ok(())
    }

    /// Whether a ring is imported, and its size.
    pub fn ring_size(&self) -> Option<(u32, u32)> {
        self.imported.as_ref().map(|r| (r.width, r.height))
    }

    /// Forgets the imported ring (after the frames using it finish).
    pub fn drop_ring(&mut self) -> Result<(), GpuError> {
        let Some(ring) = self.imported.take() else { return Ok(()) };
        for slot in 0..self.slots.len() {
            if self.in_flight(slot) {
                self.wait(slot, Duration::from_secs(5))?;
            }
        }
        self.destroy_ring(&ring);
        Ok(())
    }

    pub(crate) fn destroy_ring(&self, ring: &ImportedRing) {
        let d = &self.device;
        // SAFETY: no pending work uses the ring (its slots were waited for, or the device
        // is idle); every handle was created on this device; null handles are ignored.
        unsafe {
            d.destroy_descriptor_pool(ring.pool, None);
            for i in &ring.images {
                d.destroy_image_view(i.view, None);
                d.destroy_image(i.image, None);
                if i.memory != vk::DeviceMemory::null() {
                    d.free_memory(i.memory, None);
                }
            }
        }
    }

    /// Converts image `image` of the imported ring to NV12 in `slot`, like
    /// [`Self::submit_upload`] for a grabbed picture. The slot must not be in flight, and
    /// the exporter must have finished writing the image (the layer announces a frame only
    /// once its copy's fence signalled).
    pub fn submit_imported(&mut self, slot: usize, image: usize) -> Result<(), GpuError> {
        if self.slots.get(slot).is_some_and(|s| s.in_flight) {
            self.wait(slot, Duration::from_secs(5))?;
        }
        let (Some(ring), Some(s)) = (self.imported.as_ref(), self.slots.get(slot)) else {
            return Err(GpuError::NoDevice(format!("no imported ring, or no slot {slot}")));
        };
        let Some(src) = ring.images.get(image) else {
            return Err(GpuError::NoDevice(format!("the imported ring has no image {image}")));
        };
        let direct = ring.sets.get(image).and_then(|sets| sets.get(slot)).copied();
        let d = &self.device;
        let cb = s.commands;
        let barrier = layout_barrier;
        let family = self.info.queue_family.unwrap_or(0);
        // SAFETY: the command buffer is not pending (the slot is not in flight); every
        // handle recorded belongs to this device and lives until the ring is dropped, which
        // waits for the slots first.
        unsafe {
            d.reset_command_buffer(cb, vk::CommandBufferResetFlags::empty())
                .map_err(GpuError::vk("resetting commands"))?;
            d.begin_command_buffer(
                cb,
                &vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(GpuError::vk("recording commands"))?;
            // Take the image over from the exporting process (its release barrier put it
            // in GENERAL for the external queue family).
            let target = if direct.is_some() {
                vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL
            } else {
                vk::ImageLayout::TRANSFER_SRC_OPTIMAL
            };
            let mut acquire = barrier(
                src.image,
                vk::ImageLayout::GENERAL,
                target,
                vk::AccessFlags::empty(),
                vk::AccessFlags::SHADER_READ | vk::AccessFlags::TRANSFER_READ,
            );
            acquire.src_queue_family_index = vk::QUEUE_FAMILY_EXTERNAL;
            acquire.dst_queue_family_index = family;
            if let Some(set) = direct {
                d.cmd_pipeline_barrier(
                    cb,
                    vk::PipelineStageFlags::TOP_OF_PIPE,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &[acquire],
                );
                let params = [self.width, self.height, self.width * self.height / 4, 0];
                self.record_nv12(cb, s, (self.compute, self.compute_layout, set), &params);
            } else {
                let to_dst = barrier(
                    s.color.image,
                    vk::ImageLayout::UNDEFINED,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::AccessFlags::SHADER_READ,
                    vk::AccessFlags::TRANSFER_WRITE,
                );
                d.cmd_pipeline_barrier(
                    cb,
                    vk::PipelineStageFlags::TOP_OF_PIPE | vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &[acquire, to_dst],
                );
                let layers = vk::ImageSubresourceLayers {
                    aspect_mask: vk::ImageAspectFlags::COLOR,
                    mip_level: 0,
                    base_array_layer: 0,
                    layer_count: 1,
                };
                let corner = |w: u32, h: u32| {
                    [vk::Offset3D { x: 0, y: 0, z: 0 }, vk::Offset3D { x: w as i32, y: h as i32, z: 1 }]
                };
                let blit = [vk::ImageBlit::default()
                    .src_subresource(layers)
                    .src_offsets(corner(ring.width, ring.height))
                    .dst_subresource(layers)
                    .dst_offsets(corner(self.width, self.height))];
                d.cmd_blit_image(
                    cb,
                    src.image,
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    s.color.image,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    &blit,
                    vk::Filter::LINEAR,
                );
                let to_read = barrier(
                    s.color.image,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL,
                    vk::AccessFlags::TRANSFER_WRITE,
                    vk::AccessFlags::SHADER_READ,
                );
                d.cmd_pipeline_barrier(
                    cb,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &[to_read],
                );
                self.record_convert(cb, s, false);
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
}
