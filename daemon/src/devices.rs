//! `tlsaccel devices`: what devices this host can reach — the built-in simulator, and every
//! PCI function bound to vfio-pci, with what an operator checks first when a card does not
//! come up (is it ours, which IOMMU group, can this user open the group, memlock limit).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tlsaccel_driver::abi::ivshmem::{IVSHMEM_DEVICE_ID, IVSHMEM_VENDOR_ID};
use tlsaccel_driver::abi::{PCI_DEVICE_ID, PCI_VENDOR_ID};
use tlsaccel_driver::{Device, DeviceInfo};

/// A PCI function bound to vfio-pci.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioFunction {
    pub address: String,
    pub vendor: u16,
    pub device: u16,
    pub iommu_group: Option<String>,
    /// Whether `/dev/vfio/<group>` can be opened read-write by this user.
    pub group_accessible: bool,
}

impl VfioFunction {
    /// True when the vendor and device ids are tlsaccel's.
    pub fn is_tlsaccel(&self) -> bool {
        self.vendor == PCI_VENDOR_ID && self.device == PCI_DEVICE_ID
    }

    /// True for QEMU's ivshmem device, behind which the simulator can serve.
    pub fn is_ivshmem(&self) -> bool {
        self.vendor == IVSHMEM_VENDOR_ID && self.device == IVSHMEM_DEVICE_ID
    }
}

fn read_hex_id(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Lists the functions bound to vfio-pci under `sysfs` (normally `/sys`), reading group
/// permissions under `dev` (normally `/dev`).
pub fn scan_vfio(sysfs: &Path, dev: &Path) -> Vec<VfioFunction> {
    let driver_dir = sysfs.join("bus/pci/drivers/vfio-pci");
    let Ok(entries) = std::fs::read_dir(&driver_dir) else {
        return Vec::new();
    };
    let mut found: Vec<VfioFunction> = entries
        .flatten()
        .filter_map(|entry| {
            let address = entry.file_name().to_string_lossy().into_owned();
            // PCI addresses look like 0000:03:00.0; the directory also has bind/unbind/...
            if address.len() != 12 || address.as_bytes()[4] != b':' {
                return None;
            }
            let function = sysfs.join("bus/pci/devices").join(&address);
            let iommu_group = std::fs::read_link(function.join("iommu_group"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            let group_accessible = iommu_group.as_ref().is_some_and(|group| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dev.join("vfio").join(group))
                    .is_ok()
            });
            Some(VfioFunction {
                vendor: read_hex_id(&function.join("vendor")).unwrap_or(0),
                device: read_hex_id(&function.join("device")).unwrap_or(0),
                address,
                iommu_group,
                group_accessible,
            })
        })
        .collect();
    found.sort_by(|a, b| a.address.cmp(&b.address));
    found
}

/// The locked-memory limit of this process (DMA mappings count against it), in bytes, or
/// `None` when unlimited.
pub fn memlock_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Memlock).current
}

/// Opens a VFIO function and reads its identity without resetting it.
fn probe(address: &str) -> String {
    match tlsaccel_driver::vfio::open(address) {
        Ok(transport) => match DeviceInfo::probe(transport.as_ref()) {
            Ok(info) => describe(&info),
            Err(error) => format!("not usable: {error}"),
        },
        Err(error) => format!("cannot open: {error} ({})", source_chain(&error)),
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut next = error.source();
    while let Some(cause) = next {
        parts.push(cause.to_string());
        next = cause.source();
    }
    parts.join(": ")
}

fn describe(info: &DeviceInfo) -> String {
    format!(
        "version {}.{}, {} queues (rings up to {} entries), {} key slots, jobs up to {} bytes\n    capabilities: {:?}",
        info.version.0,
        info.version.1,
        info.queues,
        info.max_queue_entries,
        info.key_slots,
        info.max_data_len,
        info.capabilities
    )
}

/// The report `tlsaccel devices` prints.
pub fn report(sysfs: &Path, dev: &Path) -> String {
    let mut out = String::new();
    match Device::open("sim") {
        Ok(device) => {
            let _ = writeln!(
                out,
                "sim  (in-process simulator, always available)\n    {}",
                describe(device.info())
            );
        }
        Err(error) => {
            let _ = writeln!(out, "sim  unavailable: {error}");
        }
    }
    let functions = scan_vfio(sysfs, dev);
    if functions.is_empty() {
        let _ = writeln!(
            out,
            "no PCI function is bound to vfio-pci (looked in {})",
            sysfs.join("bus/pci/drivers/vfio-pci").display()
        );
    }
    for f in &functions {
        let kind = if f.is_tlsaccel() {
            "tlsaccel device"
        } else if f.is_ivshmem() {
            "ivshmem device (the simulator in shared-memory mode, if one serves it)"
        } else {
            "not a tlsaccel device"
        };
        let group = f
            .iommu_group
            .as_deref()
            .unwrap_or("none (no IOMMU: cannot be used)");
        let access = if f.group_accessible {
            "this user can open it"
        } else {
            "this user cannot open it (check /dev/vfio permissions)"
        };
        let _ = writeln!(
            out,
            "vfio:{}  {:04x}:{:04x} {}\n    IOMMU group {}, {}",
            f.address, f.vendor, f.device, kind, group, access
        );
        if f.group_accessible && (f.is_tlsaccel() || f.is_ivshmem()) {
            let _ = writeln!(out, "    {}", probe(&f.address));
        }
    }
    let memlock = match memlock_limit() {
        None => "unlimited".to_string(),
        Some(bytes) => format!("{} KiB", bytes / 1024),
    };
    let _ = writeln!(
        out,
        "locked-memory limit (DMA mappings count against it): {memlock}"
    );
    out
}

/// Default places to look.
pub fn default_roots() -> (PathBuf, PathBuf) {
    (PathBuf::from("/sys"), PathBuf::from("/dev"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs() -> PathBuf {
        let root = std::env::temp_dir().join(format!("tlsaccel-sysfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let driver = root.join("sys/bus/pci/drivers/vfio-pci");
        std::fs::create_dir_all(&driver).unwrap();
        std::fs::write(driver.join("bind"), "").unwrap();
        for (address, vendor, device, group) in [
            ("0000:03:00.0", "0x1de5", "0x7a51", "7"),
            ("0000:04:00.0", "0x8086", "0x1572", "8"),
        ] {
            let function = root.join("sys/bus/pci/devices").join(address);
            std::fs::create_dir_all(&function).unwrap();
            std::fs::write(function.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(function.join("device"), format!("{device}\n")).unwrap();
            std::os::unix::fs::symlink(
                format!("../../../kernel/iommu_groups/{group}"),
                function.join("iommu_group"),
            )
            .unwrap();
            std::fs::create_dir_all(driver.join(address)).unwrap();
        }
        std::fs::create_dir_all(root.join("dev/vfio")).unwrap();
        std::fs::write(root.join("dev/vfio/7"), "").unwrap();
        root
    }

    #[test]
    fn vfio_functions_are_found_and_identified() {
        let root = fake_sysfs();
        let found = scan_vfio(&root.join("sys"), &root.join("dev"));
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].address, "0000:03:00.0");
        assert!(found[0].is_tlsaccel());
        assert_eq!(found[0].iommu_group.as_deref(), Some("7"));
        assert!(found[0].group_accessible);
        assert!(!found[1].is_tlsaccel());
        assert!(!found[1].group_accessible, "group 8 has no device node");
        let text = report(&root.join("sys"), &root.join("dev"));
        assert!(text.contains("sim  (in-process simulator"));
        assert!(text.contains("vfio:0000:03:00.0  1de5:7a51 tlsaccel device"));
        assert!(text.contains("vfio:0000:04:00.0  8086:1572 not a tlsaccel device"));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_host_without_vfio_says_so() {
        let text = report(
            Path::new("/nonexistent-sysfs"),
            Path::new("/nonexistent-dev"),
        );
        assert!(text.contains("no PCI function is bound to vfio-pci"));
    }
}
