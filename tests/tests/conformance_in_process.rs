//! The device conformance suite against the in-process simulator.

use std::sync::Arc;

use tlsaccel_driver::Device;

fn open() -> anyhow::Result<Arc<Device>> {
    Ok(Device::open("sim:queues=8,engines=2,key-slots=4096")?)
}

tlsaccel_tests::conformance_suite!(open());
