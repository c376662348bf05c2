//! Choosing a Vulkan physical device by probing.

use ash::vk;
use std::ffi::CStr;

use crate::GpuError;

/// What kind of device Vulkan reports, in the order Pylon prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceKind {
    /// Anything else.
    Other,
    /// A CPU implementation such as Mesa lavapipe.
    Cpu,
    /// A virtual GPU (for example in a VM).
    Virtual,
    /// A GPU sharing memory with the CPU.
    Integrated,
    /// A GPU with its own memory.
    Discrete,
}

impl DeviceKind {
    fn from_vk(t: vk::PhysicalDeviceType) -> Self {
        match t {
            vk::PhysicalDeviceType::DISCRETE_GPU => Self::Discrete,
            vk::PhysicalDeviceType::INTEGRATED_GPU => Self::Integrated,
            vk::PhysicalDeviceType::VIRTUAL_GPU => Self::Virtual,
            vk::PhysicalDeviceType::CPU => Self::Cpu,
            _ => Self::Other,
        }
    }

    /// A short description for logs.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Discrete => "discrete GPU",
            Self::Integrated => "integrated GPU",
            Self::Virtual => "virtual GPU",
            Self::Cpu => "CPU renderer",
            Self::Other => "other device",
        }
    }
}

/// A device Vulkan offers, as probed.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// The driver's name for the device (`NVIDIA H100 80GB HBM3`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// Its kind.
    pub kind: DeviceKind,
    /// PCI vendor id (0x10de is NVIDIA).
    pub vendor_id: u32,
    /// Vulkan API version the device supports, as `major.minor.patch`.
    pub api_version: String,
    /// Device-local memory, MiB (the sum of the device-local heaps).
    pub memory_mb: u64,
    /// `VkPhysicalDeviceIDProperties::deviceUUID`: memory exported by another process
    /// can be imported only from a device with the same UUID (and driver UUID).
    pub device_uuid: [u8; 16],
    /// `VkPhysicalDeviceIDProperties::driverUUID`.
    pub driver_uuid: [u8; 16],
    /// Whether the device can import memory from file descriptors
    /// (`VK_KHR_external_memory_fd`): needed for frames from a title's present layer.
    pub external_memory_fd: bool,
    /// Index of a queue family that supports graphics and compute, if any.
    pub(crate) queue_family: Option<u32>,
    pub(crate) handle: vk::PhysicalDevice,
}

impl DeviceInfo {
    /// Whether this is NVIDIA hardware.
    pub fn is_nvidia(&self) -> bool {
        self.vendor_id == 0x10de
    }
}

/// Lists every physical device with its properties.
pub(crate) fn probe(instance: &ash::Instance) -> Result<Vec<DeviceInfo>, GpuError> {
    // SAFETY: `instance` is a live instance created by this crate.
    let handles = unsafe { instance.enumerate_physical_devices() }.map_err(GpuError::vk("enumerating devices"))?;
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        // SAFETY: `handle` was just returned by the same live instance.
        let props = unsafe { instance.get_physical_device_properties(handle) };
        // SAFETY: as above.
        let families = unsafe { instance.get_physical_device_queue_family_properties(handle) };
        let wanted = vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE;
        let queue_family =
            families.iter().position(|f| f.queue_flags.contains(wanted)).and_then(|i| u32::try_from(i).ok());
        // SAFETY: as above.
        let memory = unsafe { instance.get_physical_device_memory_properties(handle) };
        let memory_mb = memory
            .memory_heaps_as_slice()
            .iter()
            .filter(|h| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .map(|h| h.size >> 20)
            .sum();
        let name = props
            .device_name_as_c_str()
            .map(CStr::to_string_lossy)
            .map(|s| s.into_owned())
            .unwrap_or_else(|_| "unnamed device".into());
        let mut id = vk::PhysicalDeviceIDProperties::default();
        let mut props2 = vk::PhysicalDeviceProperties2::default().push_next(&mut id);
        // SAFETY: a Vulkan 1.1 instance (see `create_instance`); `props2` chains a valid
        // ID-properties structure.
        unsafe { instance.get_physical_device_properties2(handle, &mut props2) };
        // SAFETY: as above.
        let extensions = unsafe { instance.enumerate_device_extension_properties(handle) }.unwrap_or_default();
        let external_memory_fd = extensions
            .iter()
            .any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == ash::khr::external_memory_fd::NAME));
        out.push(DeviceInfo {
            name,
            device_uuid: id.device_uuid,
            driver_uuid: id.driver_uuid,
            external_memory_fd,
            kind: DeviceKind::from_vk(props.device_type),
            vendor_id: props.vendor_id,
            api_version: format!(
                "{}.{}.{}",
                vk::api_version_major(props.api_version),
                vk::api_version_minor(props.api_version),
                vk::api_version_patch(props.api_version)
            ),
            memory_mb,
            queue_family,
            handle,
        });
    }
    Ok(out)
}

/// Picks the device to render on and says why.
///
/// With `wanted` (the `--gpu` flag) the first device whose name contains it, ignoring
/// case, is taken. Otherwise the most capable kind wins (discrete, integrated, virtual,
/// then a CPU renderer such as lavapipe); devices without a graphics+compute queue are
/// never chosen.
pub fn choose(devices: &[DeviceInfo], wanted: Option<&str>) -> Result<(usize, String), GpuError> {
    let usable: Vec<(usize, &DeviceInfo)> =
        devices.iter().enumerate().filter(|(_, d)| d.queue_family.is_some()).collect();
    let names =
        || devices.iter().map(|d| format!("'{}' ({})", d.name, d.kind.describe())).collect::<Vec<_>>().join(", ");
    if let Some(wanted) = wanted {
        let needle = wanted.to_lowercase();
        return usable
            .iter()
            .find(|(_, d)| d.name.to_lowercase().contains(&needle))
            .map(|(i, d)| (*i, format!("'{}' matches --gpu {wanted:?}", d.name)))
            .ok_or_else(|| {
                GpuError::NoDevice(format!("no Vulkan device matches --gpu {wanted:?}; available: {}", names()))
            });
    }
    let (index, best) = usable.iter().max_by_key(|(i, d)| (d.kind, std::cmp::Reverse(*i))).ok_or_else(|| {
        GpuError::NoDevice(if devices.is_empty() {
            "Vulkan reports no device: install an NVIDIA/AMD/Intel driver, or mesa-vulkan-drivers for the \
                 CPU renderer (lavapipe)"
                .into()
        } else {
            format!("no Vulkan device has a graphics+compute queue; available: {}", names())
        })
    })?;
    let reason = if best.kind == DeviceKind::Cpu {
        format!("only a CPU renderer is available ({}): rendering in software", names())
    } else if usable.len() > 1 {
        format!("{} preferred over the others ({})", best.kind.describe(), names())
    } else {
        format!("the only {} present", best.kind.describe())
    };
    Ok((*index, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str, kind: DeviceKind, queue: bool) -> DeviceInfo {
        DeviceInfo {
            name: name.into(),
            kind,
            vendor_id: 0,
            api_version: "1.3.0".into(),
            memory_mb: 0,
            device_uuid: [0; 16],
            driver_uuid: [0; 16],
            external_memory_fd: false,
            queue_family: queue.then_some(0),
            handle: vk::PhysicalDevice::null(),
        }
    }

    #[test]
    fn discrete_beats_integrated_beats_cpu() {
        let devs = [
            dev("llvmpipe", DeviceKind::Cpu, true),
            dev("Intel UHD", DeviceKind::Integrated, true),
            dev("NVIDIA H100", DeviceKind::Discrete, true),
        ];
        assert_eq!(choose(&devs, None).unwrap().0, 2);
        assert_eq!(choose(&devs[..2], None).unwrap().0, 1);
        let (i, why) = choose(&devs[..1], None).unwrap();
        assert_eq!(i, 0);
        assert!(why.contains("CPU renderer"), "{why}");
    }

    #[test]
    fn gpu_flag_overrides_and_devices_without_queues_are_skipped() {
        let devs = [dev("NVIDIA H100", DeviceKind::Discrete, false), dev("llvmpipe", DeviceKind::Cpu, true)];
        assert_eq!(choose(&devs, None).unwrap().0, 1);
        assert_eq!(choose(&devs, Some("LLVM")).unwrap().0, 1);
        let err = choose(&devs, Some("radeon")).unwrap_err().to_string();
        assert!(err.contains("radeon") && err.contains("llvmpipe"), "{err}");
        assert!(choose(&[], None).unwrap_err().to_string().contains("mesa-vulkan-drivers"));
    }
}
