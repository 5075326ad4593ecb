// One AES S-box (FIPS-197 §5.1.1) as a module of its own, so that synthesis with the
// hierarchy kept maps the table once and the pipeline's 224 and the key expansion's 4
// copies are instances of that one netlist (the function in tlsaccel_sbox.vh, inlined
// into its callers, had yosys optimise every copy on its own).

`default_nettype none

module tlsaccel_aes_sbox (
    input  wire [7:0] in_byte,
    output wire [7:0] out_byte
);
    `include "tlsaccel_sbox.vh"

    assign out_byte = aes_sbox(in_byte);
endmodule

`default_nettype wire
