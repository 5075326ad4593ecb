//! The RTL's constants — BAR0 register map, descriptor, completion and key-block layouts,
//! opcodes, status codes, capability and control bits — written as Verilog `localparam`s
//! from `tlsaccel-abi`, so the hardware and the driver cannot disagree. The generated file
//! (`fpga/rtl/tlsaccel_regs.vh`) is committed; a test fails when it drifts from the crate.
//!
//! The file is included inside a module body (`` `include "tlsaccel_regs.vh" ``): plain
//! `localparam`s, no include guard, Verilog-2001.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::mem::offset_of;

use tlsaccel_abi::regs::{self, queue};
use tlsaccel_abi::{
    Capabilities, Completion, CompletionFlags, Descriptor, DeviceControl, DeviceStatus, KeyBlock,
    Opcode, QueueControl, QueueErrorCode, QueueStatus, Status,
};

struct Out(String);

impl Out {
    fn comment(&mut self, text: &str) {
        let _ = writeln!(self.0, "\n// {text}");
    }

    fn param(&mut self, name: &str, bits: u32, value: u64) {
        let digits = bits.div_ceil(4) as usize;
        let _ = writeln!(
            self.0,
            "localparam [{}:0] {name} = {bits}'h{value:0digits$x};",
            bits - 1
        );
    }

    fn int(&mut self, name: &str, value: u64) {
        let _ = writeln!(self.0, "localparam integer {name} = {value};");
    }
}

fn upper(name: &str) -> String {
    name.to_ascii_uppercase()
}

/// The whole generated file.
pub fn verilog() -> String {
    let mut o = Out(String::from(
        "// tlsaccel RTL constants. GENERATED from tlsaccel-abi by\n\
         //   cargo run -p tlsaccel-fpga-gen -- fpga/rtl/tlsaccel_regs.vh\n\
         // Do not edit: change abi/ and regenerate (a test fails when this file drifts).\n\
         // Include inside a module body.\n",
    ));
    o.comment("Identity");
    o.param("TLSA_MAGIC", 32, u64::from(tlsaccel_abi::DEVICE_MAGIC));
    o.param("TLSA_VERSION", 32, u64::from(tlsaccel_abi::DEVICE_VERSION));
    o.param(
        "TLSA_PCI_VENDOR_ID",
        16,
        u64::from(tlsaccel_abi::PCI_VENDOR_ID),
    );
    o.param(
        "TLSA_PCI_DEVICE_ID",
        16,
        u64::from(tlsaccel_abi::PCI_DEVICE_ID),
    );

    o.comment("BAR0 global page (byte offsets)");
    for (name, offset) in [
        ("MAGIC", regs::MAGIC),
        ("VERSION", regs::VERSION),
        ("CAPABILITIES", regs::CAPABILITIES),
        ("NUM_QUEUES", regs::NUM_QUEUES),
        ("MAX_QUEUE_ENTRIES", regs::MAX_QUEUE_ENTRIES),
        ("NUM_KEY_SLOTS", regs::NUM_KEY_SLOTS),
        ("MAX_DATA_LEN", regs::MAX_DATA_LEN),
        ("DOORBELL_STRIDE", regs::DOORBELL_STRIDE_REG),
        ("DEVICE_CONTROL", regs::DEVICE_CONTROL),
        ("DEVICE_STATUS", regs::DEVICE_STATUS),
        ("FATAL_CODE", regs::FATAL_CODE),
        ("HEARTBEAT", regs::HEARTBEAT),
        ("COUNTERS_BASE", regs::COUNTERS_BASE),
    ] {
        o.param(&format!("TLSA_REG_{name}"), 32, offset);
    }
    o.comment("Counters: TLSA_REG_COUNTERS_BASE + 8 * index");
    for counter in regs::Counter::ALL {
        o.int(
            &format!("TLSA_COUNTER_{}", upper(counter.name())),
            counter as u64,
        );
    }
    o.int("TLSA_NUM_COUNTERS", regs::Counter::ALL.len() as u64);

    o.comment("Queue configuration blocks and doorbell pages");
    o.param("TLSA_QUEUE_REGS_BASE", 32, regs::QUEUE_REGS_BASE);
    o.param("TLSA_QUEUE_REGS_STRIDE", 32, regs::QUEUE_REGS_STRIDE);
    o.int("TLSA_MAX_QUEUES", u64::from(regs::MAX_QUEUES));
    for (name, offset) in [
        ("SQ_BASE", queue::SQ_BASE),
        ("CQ_BASE", queue::CQ_BASE),
        ("SIZE", queue::SIZE),
        ("CONTROL", queue::CONTROL),
        ("STATUS", queue::STATUS),
        ("ERROR", queue::ERROR),
        ("IRQ_COALESCE_COUNT", queue::IRQ_COALESCE_COUNT),
        ("IRQ_COALESCE_USECS", queue::IRQ_COALESCE_USECS),
        ("SQ_HEAD", queue::SQ_HEAD),
        ("CQ_TAIL", queue::CQ_TAIL),
    ] {
        o.param(&format!("TLSA_Q_{name}"), 32, offset);
    }
    o.param("TLSA_DOORBELL_BASE", 32, regs::DOORBELL_BASE);
    o.param("TLSA_DOORBELL_STRIDE", 32, regs::DOORBELL_STRIDE);
    o.param("TLSA_DB_SQ_TAIL", 32, regs::DB_SQ_TAIL);
    o.param("TLSA_DB_CQ_HEAD", 32, regs::DB_CQ_HEAD);
    o.int(
        "TLSA_MIN_QUEUE_ENTRIES",
        u64::from(tlsaccel_abi::MIN_QUEUE_ENTRIES),
    );
    o.int(
        "TLSA_MAX_QUEUE_ENTRIES",
        u64::from(tlsaccel_abi::MAX_QUEUE_ENTRIES),
    );
    o.int("TLSA_RING_ALIGN", tlsaccel_abi::RING_ALIGN);

    o.comment("Control and status bits");
    for (name, bits) in DeviceControl::all().iter_names() {
        o.param(
            &format!("TLSA_DEVICE_CONTROL_{name}"),
            32,
            u64::from(bits.bits()),
        );
    }
    for (name, bits) in DeviceStatus::all().iter_names() {
        o.param(
            &format!("TLSA_DEVICE_STATUS_{name}"),
            32,
            u64::from(bits.bits()),
        );
    }
    for (name, bits) in QueueControl::all().iter_names() {
        o.param(
            &format!("TLSA_Q_CONTROL_{name}"),
            32,
            u64::from(bits.bits()),
        );
    }
    for (name, bits) in QueueStatus::all().iter_names() {
        o.param(&format!("TLSA_Q_STATUS_{name}"), 32, u64::from(bits.bits()));
    }
    for (name, bits) in Capabilities::all().iter_names() {
        o.param(&format!("TLSA_CAP_{name}"), 32, u64::from(bits.bits()));
    }
    for (name, bits) in CompletionFlags::all().iter_names() {
        o.param(&format!("TLSA_CQE_FLAG_{name}"), 8, u64::from(bits.bits()));
    }

    o.comment("Descriptor (64 bytes): byte offsets of its fields");
    o.int("TLSA_DESCRIPTOR_SIZE", tlsaccel_abi::DESCRIPTOR_SIZE as u64);
    for (name, offset) in [
        ("OPCODE", offset_of!(Descriptor, opcode)),
        ("FLAGS", offset_of!(Descriptor, flags)),
        ("RESERVED", offset_of!(Descriptor, reserved)),
        ("KEY_SLOT", offset_of!(Descriptor, key_slot)),
        ("COOKIE", offset_of!(Descriptor, cookie)),
        ("SRC_IOVA", offset_of!(Descriptor, src_iova)),
        ("DST_IOVA", offset_of!(Descriptor, dst_iova)),
        ("SRC_LEN", offset_of!(Descriptor, src_len)),
        ("DST_LEN", offset_of!(Descriptor, dst_len)),
        ("AAD_IOVA", offset_of!(Descriptor, aad_iova)),
        ("AAD_LEN", offset_of!(Descriptor, aad_len)),
        ("PARAM", offset_of!(Descriptor, param)),
    ] {
        o.int(&format!("TLSA_DESC_{name}"), offset as u64);
    }
    o.comment("Completion (16 bytes): byte offsets of its fields");
    o.int("TLSA_COMPLETION_SIZE", tlsaccel_abi::COMPLETION_SIZE as u64);
    for (name, offset) in [
        ("COOKIE", offset_of!(Completion, cookie)),
        ("RESULT_LEN", offset_of!(Completion, result_len)),
        ("STATUS", offset_of!(Completion, status)),
        ("INFO", offset_of!(Completion, info)),
        ("FLAGS", offset_of!(Completion, flags)),
    ] {
        o.int(&format!("TLSA_CQE_{name}"), offset as u64);
    }
    o.comment("Key block (64 bytes): byte offsets of its fields");
    o.int("TLSA_KEY_BLOCK_SIZE", tlsaccel_abi::KEY_BLOCK_SIZE as u64);
    for (name, offset) in [
        ("ALGORITHM", offset_of!(KeyBlock, algorithm)),
        ("PROTOCOL", offset_of!(KeyBlock, protocol)),
        ("DIRECTION", offset_of!(KeyBlock, direction)),
        ("SEQUENCE", offset_of!(KeyBlock, sequence)),
        ("KEY", offset_of!(KeyBlock, key)),
        ("IV", offset_of!(KeyBlock, iv)),
    ] {
        o.int(&format!("TLSA_KEYBLOCK_{name}"), offset as u64);
    }

    o.comment("Opcodes");
    for op in Opcode::KNOWN {
        o.param(
            &format!("TLSA_OP_{}", upper(op.name().unwrap_or("UNNAMED"))),
            8,
            u64::from(op.0),
        );
    }
    o.comment("Completion status codes");
    for status in Status::KNOWN {
        o.param(
            &format!("TLSA_ST_{}", upper(status.name().unwrap_or("UNNAMED"))),
            16,
            u64::from(status.0),
        );
    }
    o.comment("Queue error codes (Q_ERROR)");
    for code in QueueErrorCode::KNOWN {
        o.param(
            &format!("TLSA_QERR_{}", upper(code.name().unwrap_or("UNNAMED"))),
            32,
            u64::from(code.0),
        );
    }
    o.0
}

/// GF(2^8) product modulo the AES polynomial x^8 + x^4 + x^3 + x + 1.
fn gf256_mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0;
    while b != 0 {
        if b & 1 != 0 {
            product ^= a;
        }
        a = (a << 1) ^ if a & 0x80 != 0 { 0x1b } else { 0 };
        b >>= 1;
    }
    product
}

/// The AES S-box entry for `x` (FIPS-197 §5.1.1): the field inverse (0 for 0), then the
/// affine map.
pub fn aes_sbox(x: u8) -> u8 {
    let inverse = (1..=255u8).find(|&y| gf256_mul(x, y) == 1).unwrap_or(0);
    inverse
        ^ inverse.rotate_left(1)
        ^ inverse.rotate_left(2)
        ^ inverse.rotate_left(3)
        ^ inverse.rotate_left(4)
        ^ 0x63
}

/// `fpga/rtl/tlsaccel_sbox.vh`: the S-box as a Verilog function (a case table, which yosys
/// maps to LUTs and Verilator to a lookup), included by the AES modules.
pub fn sbox_verilog() -> String {
    let mut o = String::from(
        "// The AES S-box (FIPS-197 5.1.1). GENERATED by\n\
         //   cargo run -p tlsaccel-fpga-gen -- --sbox fpga/rtl/tlsaccel_sbox.vh\n\
         // from the GF(2^8) inverse and the affine map (fpga/gen/src/lib.rs).\n\
         // Include inside a module body.\n\
         function [7:0] aes_sbox;\n    input [7:0] x;\n    begin\n        case (x)\n",
    );
    for row in 0..64u16 {
        o.push_str("           ");
        for x in row * 4..row * 4 + 4 {
            let _ = write!(o, " 8'h{x:02x}: aes_sbox = 8'h{:02x};", aes_sbox(x as u8));
        }
        o.push('\n');
    }
    o.push_str("            default: aes_sbox = 8'h00;\n        endcase\n    end\nendfunction\n");
    o
}
