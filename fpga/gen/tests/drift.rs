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
