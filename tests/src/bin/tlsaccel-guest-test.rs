//! The device conformance suite inside the QEMU guest, through kernel VFIO (see
//! `tests/qemu/run`). Binds the ivshmem function to vfio-pci, runs every case with a freshly
//! opened device, and prints one line per case and a summary the host script reads.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tlsaccel_driver::abi::ivshmem::{IVSHMEM_DEVICE_ID, IVSHMEM_VENDOR_ID};
use tlsaccel_driver::Device;
use tlsaccel_tests::conformance::{Outcome, CASES};

fn read_id(path: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The first ivshmem function on the PCI bus.
fn find_ivshmem() -> Option<String> {
    let mut found: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .flatten()
        .filter(|entry| {
            read_id(&entry.path().join("vendor")) == Some(IVSHMEM_VENDOR_ID)
                && read_id(&entry.path().join("device")) == Some(IVSHMEM_DEVICE_ID)
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Binds `address` to vfio-pci the way an operator would: driver_override, then probe.
fn bind_to_vfio(address: &str) -> Result<(), String> {
    let dev = Path::new("/sys/bus/pci/devices").join(address);
    let driver = |dev: &Path| {
        std::fs::read_link(dev.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    if let Some(current) = driver(&dev) {
        if current == "vfio-pci" {
            return Ok(());
        }
        std::fs::write(dev.join("driver/unbind"), address)
            .map_err(|e| format!("unbind from {current}: {e}"))?;
    }
    std::fs::write(dev.join("driver_override"), "vfio-pci")
        .map_err(|e| format!("driver_override: {e}"))?;
    std::fs::write("/sys/bus/pci/drivers_probe", address)
        .map_err(|e| format!("drivers_probe: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while driver(&dev).as_deref() != Some("vfio-pci") {
        if Instant::now() > deadline {
            return Err("vfio-pci did not bind".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn check_dma_mapping(address: &str) -> Result<String, String> {
    use std::sync::Arc;
    use tlsaccel_driver::dma::{DmaRegion, POOL_IOVA_BASE};
    use tlsaccel_driver::vfio::{VfioError, VfioPci};
    use tlsaccel_driver::Iova;
    let pci = VfioPci::open(address).map_err(|e| format!("open: {e}"))?;
    let region = Arc::new(DmaRegion::new(2 << 20).map_err(|e| format!("memory: {e}"))?);
    pci.dma_map(&region, Iova(POOL_IOVA_BASE)).map_err(|e| {
        format!(
            "map at {POOL_IOVA_BASE:#x}: {e} ({:?})",
            std::error::Error::source(&e)
        )
    })?;
    pci.dma_unmap(Iova(POOL_IOVA_BASE), region.len())
        .map_err(|e| format!("unmap: {e}"))?;
    match pci.dma_map(&region, Iova(0xfee0_0000)) {
        Err(VfioError::ReservedIova { kind, .. }) => Ok(format!(
            "2 MiB mapped and unmapped at {POOL_IOVA_BASE:#x}; the {kind} window was refused"
        )),
        Err(other) => Err(format!(
            "mapping over the MSI window failed the wrong way: {other}"
        )),
        Ok(()) => Err("a mapping over the MSI window was accepted".into()),
    }
}

fn main() -> ExitCode {
    let Some(address) = std::env::args().nth(1).or_else(find_ivshmem) else {
        println!("GUEST FAIL setup: no ivshmem function on the PCI bus");
        return ExitCode::FAILURE;
    };
    if let Err(error) = bind_to_vfio(&address) {
        println!("GUEST FAIL setup: binding {address} to vfio-pci: {error}");
        return ExitCode::FAILURE;
    }
    let device_address = format!("vfio:{address}");
    println!("GUEST device {device_address}");
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, case) in CASES {
        let start = Instant::now();
        let result = std::panic::catch_unwind(|| {
            let device =
                Device::open(&device_address).map_err(|e| anyhow::anyhow!(e).context("open"))?;
            case(&device)
        });
        let took = start.elapsed().as_secs_f64();
        match result {
            Ok(Ok(Outcome::Passed(detail))) => {
                passed += 1;
                println!("GUEST PASS {name} ({took:.1}s): {detail}");
            }
            Ok(Ok(Outcome::Skipped(why))) => {
                skipped += 1;
                println!("GUEST SKIP {name}: {why}");
            }
            Ok(Err(error)) => {
                failed += 1;
                println!("GUEST FAIL {name} ({took:.1}s): {error:#}");
            }
            Err(_) => {
                failed += 1;
                println!("GUEST FAIL {name}: panicked");
            }
        }
    }
    // The IOMMU path a card's DMA takes (shared-memory mode never needs it): map host memory
    // through the type1 container, unmap it, and see the MSI window refused.
    match check_dma_mapping(&address) {
        Ok(detail) => {
            passed += 1;
            println!("GUEST PASS vfio_dma_map: {detail}");
        }
        Err(error) => {
            failed += 1;
            println!("GUEST FAIL vfio_dma_map: {error}");
        }
    }
    println!("guest: {passed} passed, {failed} failed, {skipped} skipped");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
