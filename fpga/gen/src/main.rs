//! `cargo run -p tlsaccel-fpga-gen -- fpga/rtl/tlsaccel_regs.vh`: writes the file (or prints
//! it without an argument).

fn main() -> std::io::Result<()> {
    let text = tlsaccel_fpga_gen::verilog();
    match std::env::args_os().nth(1) {
        Some(path) => std::fs::write(path, text),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}
