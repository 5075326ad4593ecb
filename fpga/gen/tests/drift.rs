//! The committed RTL constants match tlsaccel-abi.

#[test]
fn committed_rtl_constants_match_the_abi() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rtl/tlsaccel_regs.vh");
    let committed = std::fs::read_to_string(&path).expect("fpga/rtl/tlsaccel_regs.vh exists");
    assert!(
        committed == tlsaccel_fpga_gen::verilog(),
        "{} drifted from tlsaccel-abi: run `cargo run -p tlsaccel-fpga-gen -- fpga/rtl/tlsaccel_regs.vh`",
        path.display()
    );
}

#[test]
fn the_constants_carry_the_abi_values() {
    let text = tlsaccel_fpga_gen::verilog();
    assert!(text.contains("localparam [31:0] TLSA_MAGIC = 32'h"));
    assert!(text.contains("localparam [31:0] TLSA_REG_HEARTBEAT = 32'h0000002c;"));
    assert!(text.contains("localparam [31:0] TLSA_QUEUE_REGS_BASE = 32'h00001000;"));
    assert!(text.contains("localparam integer TLSA_DESC_COOKIE = 8;"));
    assert!(text.contains("localparam integer TLSA_CQE_STATUS = 12;"));
    assert!(text.contains("localparam [7:0] TLSA_OP_TLS13_SEAL = 8'h20;"));
}

#[test]
fn committed_sbox_matches_the_generator() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rtl/tlsaccel_sbox.vh");
    let committed = std::fs::read_to_string(&path).expect("fpga/rtl/tlsaccel_sbox.vh exists");
    assert!(
        committed == tlsaccel_fpga_gen::sbox_verilog(),
        "{} drifted: run `cargo run -p tlsaccel-fpga-gen -- --sbox fpga/rtl/tlsaccel_sbox.vh`",
        path.display()
    );
}

#[test]
fn the_sbox_has_the_fips_197_values() {
    // FIPS-197 Figure 7: S(00) = 63, S(01) = 7c, S(53) = ed, S(ff) = 16; and it is a
    // permutation.
    use tlsaccel_fpga_gen::aes_sbox;
    assert_eq!(
        [
            aes_sbox(0x00),
            aes_sbox(0x01),
            aes_sbox(0x53),
            aes_sbox(0xff)
        ],
        [0x63, 0x7c, 0xed, 0x16]
    );
    let mut seen = [false; 256];
    for x in 0..=255u8 {
        seen[usize::from(aes_sbox(x))] = true;
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn the_rtl_does_not_advertise_the_models_fault_window() {
    // The RTL reads 0 at the window's offsets and ignores writes there; its CAPABILITIES
    // must say so, or the conformance suite would try to inject faults into it.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rtl/tlsaccel_csr.v");
    let csr = std::fs::read_to_string(&path).expect("fpga/rtl/tlsaccel_csr.v exists");
    let line = csr
        .lines()
        .find(|l| l.contains("parameter [31:0] CAPABILITIES"))
        .expect("the CSR block has a CAPABILITIES parameter");
    let hex = line
        .split("32'h")
        .nth(1)
        .map(|rest| rest.trim_end_matches([',', ' ', ';']))
        .expect("CAPABILITIES is a 32'h literal");
    let value = u32::from_str_radix(&hex.replace('_', ""), 16).expect("hex digits");
    let capabilities = tlsaccel_abi::Capabilities::from_bits_retain(value);
    assert!(
        !capabilities.contains(tlsaccel_abi::Capabilities::MODEL_FAULTS),
        "the RTL's CAPABILITIES ({value:#x}) sets MODEL_FAULTS"
    );
    assert!(capabilities.contains(tlsaccel_abi::Capabilities::AES_128_GCM));
}
