//! Proof of capacity on the GPU: `C = A·B mod 2³²` for a checker's challenge
//! (`pylon_proto::capacity`), through the `matmul` compute shader.
//!
//! [`CapacityEngine`] opens the device the node renders on (chosen the same way, by
//! probing) with one compute pipeline. [`CapacityEngine::multiply`] uploads `A` and `B`
//! through host-visible staging buffers into device-local ones, runs the shader, copies `C`
//! back, and reports the GPU's own time for the multiplication (timestamp queries) beside
//! the wall time of the whole job.

use crate::{
    FrameRenderer, GpuError, Opened, command_pool, compute_layout, compute_pipeline, compute_set_layout, device,
    open_device, spirv,
};
use ash::vk;
use std::time::{Duration, Instant};

/// What one multiplication took and gave.
#[derive(Debug, Clone)]
pub struct CapacityRun {
    /// `C`, row-major.
    pub product: Vec<u32>,
    /// The shader's time on the GPU (timestamps around the dispatch).
    pub gpu_time: Duration,
    /// Upload, multiplication and read-back, as the node's clock saw them.
    pub wall_time: Duration,
}

/// A Vulkan device with the matrix-product pipeline.
pub struct CapacityEngine {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    info: device::DeviceInfo,
    queue: vk::Queue,
    memory: vk::PhysicalDeviceMemoryProperties,
    /// Nanoseconds per timestamp tick.
    timestamp_period: f64,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
    descriptor_pool: vk::DescriptorPool,
    command_pool: vk::CommandPool,
    queries: vk::QueryPool,
}

impl std::fmt::Debug for CapacityEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapacityEngine").field("device", &self.info.name).finish_non_exhaustive()
    }
}

/// A buffer and its memory, freed together.
struct Allocation {
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
}

impl CapacityEngine {
    /// Opens the device `gpu` names (or the best one, as the renderer chooses).
    pub fn new(gpu: Option<&str>) -> Result<Self, GpuError> {
        let Opened { entry, instance, info, family, device, queue, memory, .. } = open_device(gpu, false)?;
        // SAFETY: the handle belongs to `instance`.
        let properties = unsafe { instance.get_physical_device_properties(info.handle) };
        let mut engine = CapacityEngine {
            _entry: entry,
            instance,
            device,
            info,
            queue,
            memory,
            timestamp_period: f64::from(properties.limits.timestamp_period),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipeline: vk::Pipeline::null(),
            descriptor_pool: vk::DescriptorPool::null(),
            command_pool: vk::CommandPool::null(),
            queries: vk::QueryPool::null(),
        };
        // From here on, `Drop` cleans up whatever was created if a step fails.
        engine.build(family)?;
        Ok(engine)
    }

    /// The device in use.
    pub fn device_info(&self) -> &device::DeviceInfo {
        &self.info
    }

    fn build(&mut self, family: u32) -> Result<(), GpuError> {
        let d = &self.device;
        let storage = vk::DescriptorType::STORAGE_BUFFER;
        self.set_layout = compute_set_layout(d, &[storage; 3], "creating the matmul descriptor layout")?;
        self.layout = compute_layout(d, self.set_layout, 4, "creating the matmul layout")?;
        let code = spirv(include_bytes!(concat!(env!("OUT_DIR"), "/matmul.spv")));
        self.pipeline = compute_pipeline(d, &code, self.layout, "creating the matmul pipeline")?;
        let sizes = [vk::DescriptorPoolSize::default().ty(vk::DescriptorType::STORAGE_BUFFER).descriptor_count(3)];
        // SAFETY: `sizes` outlives the call.
        self.descriptor_pool = unsafe {
            d.create_descriptor_pool(
                &vk::DescriptorPoolCreateInfo::default()
                    .flags(vk::DescriptorPoolCreateFlags::FREE_DESCRIPTOR_SET)
                    .max_sets(1)
                    .pool_sizes(&sizes),
                None,
            )
        }
        .map_err(GpuError::vk("creating the matmul descriptor pool"))?;
        self.command_pool = command_pool(d, family, "creating the matmul command pool")?;
        // SAFETY: a plain create info.
        self.queries = unsafe {
            d.create_query_pool(
                &vk::QueryPoolCreateInfo::default().query_type(vk::QueryType::TIMESTAMP).query_count(2),
                None,
            )
        }
        .map_err(GpuError::vk("creating the timestamp queries"))?;
        Ok(())
    }

    fn allocate(
        &self,
        size: u64,
        usage: vk::BufferUsageFlags,
        flags: vk::MemoryPropertyFlags,
        what: &'static str,
    ) -> Result<Allocation, GpuError> {
        let d = &self.device;
        let info = vk::BufferCreateInfo::default().size(size).usage(usage).sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: `info` is a valid description.
        let buffer = unsafe { d.create_buffer(&info, None) }.map_err(GpuError::vk(what))?;
        let mut out = Allocation { buffer, memory: vk::DeviceMemory::null() };
        // SAFETY: `buffer` was created from this device.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        let result = (|| {
            let index = FrameRenderer::memory_type(&self.memory, req.memory_type_bits, flags, flags, what)?;
            let alloc = vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(index);
            // SAFETY: the memory type index comes from this device's properties.
            out.memory = unsafe { d.allocate_memory(&alloc, None) }.map_err(GpuError::vk(what))?;
            // SAFETY: the memory was allocated for this buffer's requirements and is unbound.
            unsafe { d.bind_buffer_memory(buffer, out.memory, 0) }.map_err(GpuError::vk(what))
        })();
        match result {
            Ok(()) => Ok(out),
            Err(e) => {
                self.free(&out);
                Err(e)
            }
        }
    }

    fn free(&self, a: &Allocation) {
        // SAFETY: callers free only allocations no pending GPU work uses (`multiply`
        // waits for its fence, or never submitted).
        unsafe {
            self.device.destroy_buffer(a.buffer, None);
            if a.memory != vk::DeviceMemory::null() {
                self.device.free_memory(a.memory, None);
            }
        }
    }

    /// Copies `words` into host-visible `a`.
    fn write(&self, a: &Allocation, words: &[u32]) -> Result<(), GpuError> {
        let bytes = std::mem::size_of_val(words);
        // SAFETY: `a` is host-visible, unmapped, at least `bytes` long; the mapping is
        // dropped before anything else touches the memory.
        unsafe {
            let p = self
                .device
                .map_memory(a.memory, 0, bytes as u64, vk::MemoryMapFlags::empty())
                .map_err(GpuError::vk("mapping a matrix"))?;
            std::ptr::copy_nonoverlapping(words.as_ptr().cast::<u8>(), p.cast::<u8>(), bytes);
            self.device.unmap_memory(a.memory);
        }
        Ok(())
    }

    /// `C = A·B mod 2³²` for row-major `n × n` matrices (`n` a multiple of 16).
    pub fn multiply(&self, a: &[u32], b: &[u32], n: u32) -> Result<CapacityRun, GpuError> {
        let len = (n as usize) * (n as usize);
        if n == 0 || !n.is_multiple_of(16) || a.len() != len || b.len() != len {
            return Err(GpuError::BadSize { width: n, height: n });
        }
        let started = Instant::now();
        let size = (len * 4) as u64;
        let host = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let local = vk::MemoryPropertyFlags::DEVICE_LOCAL;
        let storage = vk::BufferUsageFlags::STORAGE_BUFFER;
        let (src, dst) = (vk::BufferUsageFlags::TRANSFER_SRC, vk::BufferUsageFlags::TRANSFER_DST);
        let mut made: Vec<Allocation> = Vec::new();
        let result = (|| {
            for (usage, flags, what) in [
                (src, host, "the staging buffer of A"),
                (src, host, "the staging buffer of B"),
                (dst, host, "the read-back buffer of C"),
                (storage | dst, local, "A on the GPU"),
                (storage | dst, local, "B on the GPU"),
                (storage | src, local, "C on the GPU"),
            ] {
                made.push(self.allocate(size, usage, flags, what)?);
            }
            let [sa, sb, sc, ga, gb, gc] = [0, 1, 2, 3, 4, 5].map(|i| made.get(i).map(|m| m.buffer));
            let (Some(sa), Some(sb), Some(sc), Some(ga), Some(gb), Some(gc)) = (sa, sb, sc, ga, gb, gc) else {
                return Err(GpuError::NoDevice("buffers missing".into()));
            };
            if let (Some(ma), Some(mb)) = (made.first(), made.get(1)) {
                self.write(ma, a)?;
                self.write(mb, b)?;
            }
            self.run(n, size, [sa, sb, sc, ga, gb, gc])?;
            let mut product = vec![0u32; len];
            if let Some(mc) = made.get(2) {
                // SAFETY: the GPU work that wrote `C` has finished (fence waited in `run`); the
                // memory is host-visible and coherent, `size` bytes long, and unmapped again
                // before it is freed.
                unsafe {
                    let p = self
                        .device
                        .map_memory(mc.memory, 0, size, vk::MemoryMapFlags::empty())
                        .map_err(GpuError::vk("mapping the product"))?;
                    std::ptr::copy_nonoverlapping(p.cast::<u8>(), product.as_mut_ptr().cast::<u8>(), size as usize);
                    self.device.unmap_memory(mc.memory);
                }
            }
            Ok(product)
        })();
        for m in &made {
            self.free(m);
        }
        let product = result?;
        let mut ticks = [0u64; 2];
        // SAFETY: both queries were written by the finished submission.
        unsafe {
            self.device
                .get_query_pool_results(self.queries, 0, &mut ticks, vk::QueryResultFlags::TYPE_64)
                .map_err(GpuError::vk("reading the timestamps"))?;
        }
        let [t0, t1] = ticks;
        let gpu_time = Duration::from_nanos((t1.saturating_sub(t0) as f64 * self.timestamp_period) as u64);
        Ok(CapacityRun { product, gpu_time, wall_time: started.elapsed() })
    }

    /// Records and runs: upload, dispatch (between timestamps), read-back; waits for it.
    fn run(&self, n: u32, size: u64, [sa, sb, sc, ga, gb, gc]: [vk::Buffer; 6]) -> Result<(), GpuError> {
        let d = &self.device;
        let layouts = [self.set_layout];
        // SAFETY: the pool has room for one set, freed below.
        let set = unsafe {
            d.allocate_descriptor_sets(
                &vk::DescriptorSetAllocateInfo::default().descriptor_pool(self.descriptor_pool).set_layouts(&layouts),
            )
        }
        .map_err(GpuError::vk("allocating the matmul descriptor set"))?
        .into_iter()
        .next()
        .unwrap_or_default();
        // SAFETY: the command pool belongs to this device.
        let cb = match unsafe {
            d.allocate_command_buffers(
                &vk::CommandBufferAllocateInfo::default()
                    .command_pool(self.command_pool)
                    .level(vk::CommandBufferLevel::PRIMARY)
                    .command_buffer_count(1),
            )
        } {
            Ok(v) => v.into_iter().next().unwrap_or_default(),
            Err(result) => {
                // SAFETY: the set is not in use.
                let _ = unsafe { d.free_descriptor_sets(self.descriptor_pool, &[set]) };
                return Err(GpuError::Vulkan { what: "allocating the matmul command buffer", result });
            }
        };
        // SAFETY: plain create info.
        let fence = unsafe { d.create_fence(&vk::FenceCreateInfo::default(), None) };
        let result = fence.map_err(GpuError::vk("creating the matmul fence")).and_then(|fence| {
            let infos = [ga, gb, gc].map(|buffer| [vk::DescriptorBufferInfo::default().buffer(buffer).range(size)]);
            let writes: Vec<vk::WriteDescriptorSet> = infos
                .iter()
                .zip(0u32..)
                .map(|(info, binding)| {
                    vk::WriteDescriptorSet::default()
                        .dst_set(set)
                        .dst_binding(binding)
                        .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                        .buffer_info(info)
                })
                .collect();
            let region = [vk::BufferCopy::default().size(size)];
            // Makes what one stage wrote visible to the next stage's accesses.
            let barrier = |(src_stage, src): (vk::PipelineStageFlags, vk::AccessFlags),
                           (dst_stage, dst): (vk::PipelineStageFlags, vk::AccessFlags)| {
                let memory = [vk::MemoryBarrier::default().src_access_mask(src).dst_access_mask(dst)];
                // SAFETY: called only while `cb` is recording, below.
                unsafe {
                    d.cmd_pipeline_barrier(cb, src_stage, dst_stage, vk::DependencyFlags::empty(), &memory, &[], &[])
                }
            };
            let stage = vk::PipelineStageFlags::COMPUTE_SHADER;
            let (transfer, host) = (vk::PipelineStageFlags::TRANSFER, vk::PipelineStageFlags::HOST);
            let recorded = (|| {
                // SAFETY: every handle belongs to this device; `cb` is fresh and recorded
                // once; the buffers outlive the submission (the caller frees them after
                // this waits for the fence); `writes` points at `infos`, alive here.
                unsafe {
                    d.update_descriptor_sets(&writes, &[]);
                    d.begin_command_buffer(
                        cb,
                        &vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                    )
                    .map_err(GpuError::vk("recording the matmul"))?;
                    d.cmd_reset_query_pool(cb, self.queries, 0, 2);
                    d.cmd_copy_buffer(cb, sa, ga, &region);
                    d.cmd_copy_buffer(cb, sb, gb, &region);
                    barrier((transfer, vk::AccessFlags::TRANSFER_WRITE), (stage, vk::AccessFlags::SHADER_READ));
                    d.cmd_write_timestamp(cb, vk::PipelineStageFlags::TOP_OF_PIPE, self.queries, 0);
                    d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, self.pipeline);
                    d.cmd_bind_descriptor_sets(cb, vk::PipelineBindPoint::COMPUTE, self.layout, 0, &[set], &[]);
                    d.cmd_push_constants(cb, self.layout, vk::ShaderStageFlags::COMPUTE, 0, &n.to_le_bytes());
                    d.cmd_dispatch(cb, n / 16, n / 16, 1);
                    d.cmd_write_timestamp(cb, vk::PipelineStageFlags::BOTTOM_OF_PIPE, self.queries, 1);
                    barrier((stage, vk::AccessFlags::SHADER_WRITE), (transfer, vk::AccessFlags::TRANSFER_READ));
                    d.cmd_copy_buffer(cb, gc, sc, &region);
                    barrier((transfer, vk::AccessFlags::TRANSFER_WRITE), (host, vk::AccessFlags::HOST_READ));
                    d.end_command_buffer(cb).map_err(GpuError::vk("recording the matmul"))?;
                    let cbs = [cb];
                    d.queue_submit(self.queue, &[vk::SubmitInfo::default().command_buffers(&cbs)], fence)
                        .map_err(GpuError::vk("submitting the matmul"))?;
                    // Minutes at most even for the largest challenge on a CPU device.
                    d.wait_for_fences(&[fence], true, 600_000_000_000).map_err(GpuError::vk("waiting for the matmul"))
                }
            })();
            // SAFETY: the submission finished or never started (a failed wait leaves the
            // device lost, where destroying is still allowed).
            unsafe { d.destroy_fence(fence, None) };
            recorded
        });
        // SAFETY: no pending work uses them (waited above, or never submitted).
        unsafe {
            d.free_command_buffers(self.command_pool, &[cb]);
            let _ = d.free_descriptor_sets(self.descriptor_pool, &[set]);
        }
        result
    }
}

impl Drop for CapacityEngine {
    fn drop(&mut self) {
        // SAFETY: `multiply` waits for its work, so nothing is pending; each handle is
        // destroyed once, null ones are ignored by Vulkan; the device goes before the instance.
        unsafe {
            let d = &self.device;
            d.destroy_query_pool(self.queries, None);
            d.destroy_command_pool(self.command_pool, None);
            d.destroy_descriptor_pool(self.descriptor_pool, None);
            d.destroy_pipeline(self.pipeline, None);
            d.destroy_pipeline_layout(self.layout, None);
            d.destroy_descriptor_set_layout(self.set_layout, None);
            d.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_product_is_the_exact_product_mod_2_32() {
        let engine = match CapacityEngine::new(None) {
            Ok(e) => e,
            Err(GpuError::Loader(e)) => panic!("no Vulkan loader ({e}); install libvulkan1 and mesa-vulkan-drivers"),
            Err(e) => panic!("no Vulkan device: {e}"),
        };
        let n = 48usize;
        // Words that overflow: the product must wrap, not saturate.
        let a: Vec<u32> = (0..n * n).map(|i| (i as u32).wrapping_mul(2_654_435_761)).collect();
        let b: Vec<u32> = (0..n * n).map(|i| (i as u32 ^ 0xdead_beef).wrapping_mul(40_503)).collect();
        let run = engine.multiply(&a, &b, n as u32).unwrap();
        let mut want = vec![0u32; n * n];
        for i in 0..n {
            for j in 0..n {
                want[i * n + j] = (0..n).fold(0u32, |acc, k| acc.wrapping_add(a[i * n + k].wrapping_mul(b[k * n + j])));
            }
        }
        assert_eq!(run.product, want);
        assert!(run.wall_time >= run.gpu_time);
        assert!(matches!(engine.multiply(&a, &b, 40), Err(GpuError::BadSize { .. })));
    }
}
