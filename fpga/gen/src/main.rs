//! `cargo run -p tlsaccel-fpga-gen -- fpga/rtl/tlsaccel_regs.vh` writes the register
//! constants; `-- --sbox fpga/rtl/tlsaccel_sbox.vh` the AES S-box. Without a path, prints.

fn main() -> std::io::Result<()> {
    let mut args = std::env::args_os().skip(1).peekable();
    let text = if args.peek().is_some_and(|a| a == "--sbox") {
        args.next();
        tlsaccel_fpga_gen::sbox_verilog()
    } else {
        tlsaccel_fpga_gen::verilog()
    };
    match args.next() {
        Some(path) => std::fs::write(path, text),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}
