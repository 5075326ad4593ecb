// AES-128/256 key expansion (FIPS-197 §5.2) for the record engine, one round key per
// clock: 10 clocks for AES-128, 13 for AES-256. Blocks are little-endian byte vectors, as
// in tlsaccel_aes_pipe.v.

`default_nettype none


module tlsaccel_aes_keyexp (
    input  wire              clk,
    input  wire              rst,
    input  wire              start,      // one cycle: expand `key`
    input  wire              clear,      // one cycle: zeroize the round keys
    input  wire              aes256,
    input  wire [255:0]      key,        // AES-128 uses bits [127:0]
    output reg               busy,
    output wire [15*128-1:0] round_keys  // round key r at [128r +: 128]
);
    reg [3:0]   index;      // the round key computed this cycle
    reg         wide;
    reg [127:0] older;      // round key index-2 (AES-256)
    reg [127:0] newer;      // round key index-1

    function [7:0] rcon;
        input [3:0] i;
        begin
            case (i)
                4'd1: rcon = 8'h01; 4'd2: rcon = 8'h02; 4'd3: rcon = 8'h04; 4'd4: rcon = 8'h08;
                4'd5: rcon = 8'h10; 4'd6: rcon = 8'h20; 4'd7: rcon = 8'h40; 4'd8: rcon = 8'h80;
                4'd9: rcon = 8'h1b; 4'd10: rcon = 8'h36;
                default: rcon = 8'h00;
            endcase
        end
    endfunction

    // FIPS-197 §5.2, four words at a time. AES-128: every key uses RotWord, SubWord and
    // Rcon on the previous key's last word. AES-256: even keys do the same (Rcon i/2),
    // odd keys use SubWord only; both XOR into the key two back.
    wire [31:0]  last = newer[127:96];
    wire         rotate = !wide || !index[0];
    wire [31:0]  turned = rotate ? {last[7:0], last[31:8]} : last;
    wire [31:0]  subbed;
    genvar b;
    generate
        for (b = 0; b < 4; b = b + 1) begin : sub_word
            tlsaccel_aes_sbox sbox (.in_byte(turned[8*b +: 8]), .out_byte(subbed[8*b +: 8]));
        end
    endgenerate
    wire [7:0]   round_constant = !wide ? rcon(index) : (rotate ? rcon({1'b0, index[3:1]}) : 8'h00);
    wire [31:0]  t = subbed ^ {24'd0, round_constant};
    wire [127:0] base = wide ? older : newer;
    wire [31:0]  w0 = base[31:0] ^ t;
    wire [31:0]  w1 = base[63:32] ^ w0;
    wire [31:0]  w2 = base[95:64] ^ w1;
    wire [31:0]  w3 = base[127:96] ^ w2;
    wire [127:0] next = {w3, w2, w1, w0};

    // Sequencing: which round key is computed, and the two before it.
    always @(posedge clk) begin
        if (rst || clear) begin
            busy <= 1'b0;
            index <= 4'd0;
            wide <= 1'b0;
            older <= 128'd0;
            newer <= 128'd0;
        end else if (start) begin
            busy <= 1'b1;
            wide <= aes256;
            older <= aes256 ? key[127:0] : 128'd0;
            newer <= aes256 ? key[255:128] : key[127:0];
            index <= aes256 ? 4'd2 : 4'd1;
        end else if (busy) begin
            older <= newer;
            newer <= next;
            index <= index + 4'd1;
            if (index == (wide ? 4'd14 : 4'd10)) busy <= 1'b0;
        end
    end

    // Storage: one register per round key, written once per expansion (the key itself
    // for the first one or two), zeroized by `clear` and reset.
    genvar r;
    generate
        for (r = 0; r < 15; r = r + 1) begin : keys
            reg [127:0] round_key;
            always @(posedge clk) begin
                if (rst || clear) round_key <= 128'd0;
                else if (start) round_key <= r == 0 ? key[127:0]
                                           : r == 1 && aes256 ? key[255:128] : 128'd0;
                else if (busy && index == r) round_key <= next;
            end
            assign round_keys[128*r +: 128] = round_key;
        end
    endgenerate
endmodule

`default_nettype wire
