//! Builds the Verilator model of `fpga/rtl` and the C++ shim around it. Without a
//! `verilator` command the crate still builds, and `RtlDevice::new` reports the model
//! missing (`scripts/test` installs verilator, so CI always has it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(rtl_model)");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let rtl = manifest.join("../rtl");
    let sources = [
        "tlsaccel_top.v",
        "tlsaccel_csr.v",
        "tlsaccel_queue_engine.v",
        "tlsaccel_record_engine.v",
        "tlsaccel_dma_read.v",
        "tlsaccel_dma_write.v",
        "tlsaccel_aes_sbox.v",
        "tlsaccel_aes_keyexp.v",
        "tlsaccel_aes_pipe.v",
    ];
    for file in sources
        .iter()
        .chain(&["tlsaccel_regs.vh", "tlsaccel_sbox.vh"])
    {
        println!("cargo::rerun-if-changed={}", rtl.join(file).display());
    }
    println!("cargo::rerun-if-changed=csrc/shim.cpp");
    println!("cargo::rerun-if-env-changed=PATH");
    let root = match Command::new("verilator")
        .arg("--getenv")
        .arg("VERILATOR_ROOT")
        .output()
    {
        Ok(out) if out.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        _ => {
            println!("cargo::warning=verilator not found: the RTL model is not built");
            return;
        }
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("out dir")).join("verilated");
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new("verilator")
        .args(["--cc", "-O2", "--top-module", "tlsaccel_top", "-Mdir"])
        .arg(&out)
        .arg(format!("-I{}", rtl.display()))
        // A heartbeat tick every 64 cycles, so tests see it move.
        .arg("-GHEARTBEAT_CYCLES=64")
        // The queue engine's test-bench hold (the STALL of `RtlDevice`'s faults), which a
        // synthesized design does not have.
        .arg("-DTLSACCEL_MODEL_FAULTS")
        .args(sources.iter().map(|f| rtl.join(f)))
        .status()
        .expect("verilator runs");
    assert!(status.success(), "verilator failed on fpga/rtl");
    let include = root.join("include");
    let mut generated: Vec<PathBuf> = std::fs::read_dir(&out)
        .expect("verilator output")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    generated.sort();
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .opt_level(2)
        .include(&out)
        .include(&include)
        .include(include.join("vltstd"))
        .files(&generated)
        .file(include.join("verilated.cpp"))
        .file(include.join("verilated_threads.cpp"))
        .file(Path::new("csrc/shim.cpp"))
        .compile("tlsaccel_rtl_model");
    println!("cargo::rustc-link-lib=stdc++");
    println!("cargo::rustc-cfg=rtl_model");
}
