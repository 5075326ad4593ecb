// AES (FIPS-197) for the record engine: an iterative key expansion (one round key per
// clock) and a fully unrolled encryption pipeline that takes one 128-bit block per clock.
//
// Blocks are little-endian byte vectors, as they come off the 128-bit AXI bus: byte i of
// the block (FIPS-197 `in[i]`) is bits [8i+7:8i]. The state is column-major, so state
// row r of column c is byte 4c + r.
//
// The pipeline has 15 registered stages (the first AddRoundKey, then 14 rounds), for
// AES-128 and AES-256 alike: with AES-128 the last round is stage 10 and stages 11-14
// pass the block through, so the latency is the same for both and the engine needs no
// per-key timing.

`default_nettype none

module tlsaccel_aes_pipe #(
    parameter integer TAG_BITS = 16
) (
    input  wire                clk,
    input  wire                aes256,
    input  wire [15*128-1:0]   round_keys,
    input  wire                in_valid,
    input  wire [127:0]        in_block,
    input  wire [TAG_BITS-1:0] in_tag,
    output wire                out_valid,
    output wire [127:0]        out_block,
    output wire [TAG_BITS-1:0] out_tag
);
    function [7:0] xtime;
        input [7:0] b;
        xtime = {b[6:0], 1'b0} ^ (b[7] ? 8'h1b : 8'h00);
    endfunction

    // ShiftRows on the S-boxes' outputs: output row r of column c is row r of column c + r.
    function [127:0] shift_rows;
        input [127:0] s;
        integer c, r;
        begin
            shift_rows = 128'd0;
            for (c = 0; c < 4; c = c + 1)
                for (r = 0; r < 4; r = r + 1)
                    shift_rows[8*(4*c+r) +: 8] = s[8*(4*((c+r)%4)+r) +: 8];
        end
    endfunction

    function [127:0] mix_columns;
        input [127:0] s;
        integer c;
        reg [7:0] a0, a1, a2, a3;
        begin
            mix_columns = 128'd0;
            for (c = 0; c < 4; c = c + 1) begin
                a0 = s[32*c +: 8];
                a1 = s[32*c+8 +: 8];
                a2 = s[32*c+16 +: 8];
                a3 = s[32*c+24 +: 8];
                mix_columns[32*c +: 8]    = xtime(a0) ^ xtime(a1) ^ a1 ^ a2 ^ a3;
                mix_columns[32*c+8 +: 8]  = a0 ^ xtime(a1) ^ xtime(a2) ^ a2 ^ a3;
                mix_columns[32*c+16 +: 8] = a0 ^ a1 ^ xtime(a2) ^ xtime(a3) ^ a3;
                mix_columns[32*c+24 +: 8] = xtime(a0) ^ a0 ^ a1 ^ a2 ^ xtime(a3);
            end
        end
    endfunction

    reg [127:0]        state [0:14];
    reg [14:0]         valid;
    reg [TAG_BITS-1:0] tag   [0:14];

    always @(posedge clk) begin
        state[0] <= in_block ^ round_keys[127:0];
        valid[0] <= in_valid;
        tag[0] <= in_tag;
    end

    genvar g, b;
    generate
        for (g = 1; g <= 14; g = g + 1) begin : rounds
            // SubBytes: sixteen S-box instances (tlsaccel_aes_sbox.v).
            wire [127:0] subbed;
            for (b = 0; b < 16; b = b + 1) begin : bytes
                tlsaccel_aes_sbox sbox (.in_byte(state[g-1][8*b +: 8]), .out_byte(subbed[8*b +: 8]));
            end
            wire [127:0] shifted = shift_rows(subbed);
            wire [127:0] key = round_keys[128*g +: 128];
            wire         final_round = g == (aes256 ? 14 : 10);
            wire         past_end = !aes256 && g > 10;
            always @(posedge clk) begin
                state[g] <= past_end ? state[g-1]
                          : final_round ? shifted ^ key
                          : mix_columns(shifted) ^ key;
                valid[g] <= valid[g-1];
                tag[g] <= tag[g-1];
            end
        end
    endgenerate

    assign out_valid = valid[14];
    assign out_block = state[14];
    assign out_tag = tag[14];
endmodule

`default_nettype wire
