// tlsaccel record engine: the key table and the AES-GCM jobs of docs/device-spec.md —
// KEY_LOAD, KEY_DESTROY, AEAD_SEAL/OPEN (raw, any AAD up to 4096 bytes) and TLS13_SEAL/OPEN
// (§4.2: nonce from the slot's IV and sequence number, the header as AAD, padding and the
// content type) — for AES-128-GCM and AES-256-GCM. ChaCha20-Poly1305 and TLS 1.2 records
// stay with the simulator: a key block asking for them is UNSUPPORTED.
//
// One job at a time, from the queue engine (`cmd_*`), in acceptance order:
//   CHECK    lengths and fields, in the spec's order (§5);
//   PROBE    one-beat reads of the first and last byte of src, dst and aad: a range the
//            host's IOMMU refuses is DMA_FAULT before anything else happens;
//   SLOT     the key table entry: BAD_SLOT, SLOT_EMPTY, SLOT_MISMATCH, SEQUENCE_EXHAUSTED;
//            a record job takes the slot's sequence number and advances it (§4.4);
//   KEYS     round keys, unless the slot's are still expanded from the job before;
//   LOAD     DMA of the AAD (or the TLS 1.3 header) into the input buffer, then the
//            data, which goes on while the next steps run;
//   HJ       H = E(K, 0) and E(K, J0) through the AES pipeline;
//   AAD      GHASH over the AAD words;
//   CIPHER   counter blocks into the AES pipeline at one per clock, each as soon as its
//            input word has arrived; each keystream block meets its word, the result goes
//            to the output buffer and is hashed (one block per clock);
//   TAG      the length block, then the tag: stored (seal) or compared with the record's
//            (open, whose tag is read once the data is in);
//   SCAN     TLS13_OPEN: the content type is the last non-zero byte of the inner text;
//   OUTPUT   DMA of the output buffer to dst, by a sequencer beside the main one: a seal's
//            output follows the cipher word by word (DMA in, cipher and DMA out overlap,
//            one pass over the record); an open's starts after the tag check, so a failed
//            open writes nothing.
//
// Key slots live in on-chip RAM (algorithm, protocol, direction, sequence, key, IV; 422
// bits each). Reset empties every slot at once (valid bits) and then zeroizes the RAM
// slot by slot before the engine takes a job; KEY_DESTROY zeroizes its slot. The expanded
// round keys of the last slot used are kept, and cleared when that slot is loaded or
// destroyed.

`default_nettype none

module tlsaccel_record_engine #(
    parameter integer NUM_KEY_SLOTS = 1024,
    parameter integer MAX_DATA = 66048
) (
    input  wire         clk,
    input  wire         rst,

    input  wire         cmd_valid,
    output wire         cmd_ready,
    input  wire [511:0] cmd_desc,        // the 64-byte descriptor, little-endian
    output reg          done,
    output reg  [15:0]  done_status,
    output reg  [31:0]  done_len,
    output reg  [7:0]   done_info,
    output reg          done_sequence_advanced,
    output reg          done_rejected,   // refused at validation

    // AXI4 master, 128-bit data, to host memory
    output wire [63:0]  m_araddr,
    output wire [7:0]   m_arlen,
    output wire [2:0]   m_arsize,
    output wire [1:0]   m_arburst,
    output wire         m_arvalid,
    input  wire         m_arready,
    input  wire [127:0] m_rdata,
    input  wire [1:0]   m_rresp,
    input  wire         m_rlast,
    input  wire         m_rvalid,
    output wire         m_rready,
    output wire [63:0]  m_awaddr,
    output wire [7:0]   m_awlen,
    output wire [2:0]   m_awsize,
    output wire [1:0]   m_awburst,
    output wire         m_awvalid,
    input  wire         m_awready,
    output wire [127:0] m_wdata,
    output wire [15:0]  m_wstrb,
    output wire         m_wlast,
    output wire         m_wvalid,
    input  wire         m_wready,
    input  wire [1:0]   m_bresp,
    input  wire         m_bvalid,
    output wire         m_bready,

    // Counters
    output reg  [63:0]  bytes_in,
    output reg  [63:0]  bytes_out,
    output reg  [63:0]  auth_failures,
    output reg  [63:0]  dma_faults,
    output reg  [63:0]  key_slots_loaded,
    output reg  [63:0]  records_sealed,
    output reg  [63:0]  records_opened,
    output wire         idle
);
    /* verilator lint_off UNUSEDPARAM */
    `include "tlsaccel_regs.vh"
    /* verilator lint_on UNUSEDPARAM */

    localparam integer SB = $clog2(NUM_KEY_SLOTS);
    localparam integer WB = 13;                         // buffer word address bits
    localparam integer DATA_WORDS = (MAX_DATA + 15) / 16;
    localparam [WB-1:0] DATA_W = 13'd256;               // words 0-255: AAD (4096 bytes)
    localparam [WB-1:0] TAG_W = DATA_W + DATA_WORDS[WB-1:0];
    localparam integer BUF_WORDS = 256 + DATA_WORDS + 1;
    localparam [31:0] MAX_AAD = 32'd4096;
    localparam [31:0] MAX_PLAIN = 32'd16384;

    localparam [4:0] S_SWEEP = 5'd0, S_IDLE = 5'd1, S_CHECK = 5'd2, S_PROBE = 5'd3,
                     S_PROBE_WAIT = 5'd4, S_BLOCK = 5'd5, S_BLOCK_WAIT = 5'd6,
                     S_KEY_LOAD = 5'd7, S_SLOT = 5'd8, S_SLOT_WAIT = 5'd9, S_GRANT = 5'd10,
                     S_KEYS = 5'd11, S_LOAD = 5'd12, S_LOAD_WAIT = 5'd13, S_HEADER = 5'd14,
                     S_HJ = 5'd15, S_AAD = 5'd16, S_CIPHER = 5'd17, S_LENGTHS = 5'd18,
                     S_TAG = 5'd19, S_TAG_CHECK = 5'd20, S_SCAN = 5'd21,
                     S_OUT_WAIT = 5'd23, S_DONE = 5'd24, S_SCRUB = 5'd25, S_DATA_DONE = 5'd26;

    // ---------------------------------------------------------------- descriptor fields
    reg [511:0] desc;
    wire [7:0]  opcode  = desc[7:0];
    wire [31:0] slot    = desc[63:32];
    wire [63:0] src     = desc[191:128];
    wire [63:0] dst     = desc[255:192];
    wire [31:0] src_len = desc[287:256];
    wire [31:0] dst_len = desc[319:288];
    wire [63:0] aad     = desc[383:320];
    wire [31:0] aad_len = desc[415:384];
    wire [95:0] param   = desc[511:416];

    wire op_load    = opcode == TLSA_OP_KEY_LOAD;
    wire op_destroy = opcode == TLSA_OP_KEY_DESTROY;
    wire op_aead    = opcode == TLSA_OP_AEAD_SEAL || opcode == TLSA_OP_AEAD_OPEN;
    wire op_seal    = opcode == TLSA_OP_AEAD_SEAL || opcode == TLSA_OP_TLS13_SEAL;
    wire op_tls     = opcode == TLSA_OP_TLS13_SEAL || opcode == TLSA_OP_TLS13_OPEN;
    wire tls_seal   = opcode == TLSA_OP_TLS13_SEAL;
    wire tls_open   = opcode == TLSA_OP_TLS13_OPEN;
    wire [7:0]  content_type = param[7:0];
    wire [31:0] padding      = {16'd0, param[23:8]};

    // Validation before the address checks (§5 order; as the reference model).
    wire [32:0] inner_len = {1'b0, src_len} + 33'd1 + {1'b0, padding};
    wire [32:0] tls13_record = inner_len + 33'd21;
    reg  [15:0] check_status;
    always @(*) begin
        check_status = TLSA_ST_OK;
        if (op_load) begin
            if (src_len != 32'd64) check_status = TLSA_ST_LENGTH_ERROR;
        end else if (op_destroy) begin
            check_status = TLSA_ST_OK;
        end else if (src_len > MAX_DATA || dst_len > MAX_DATA) begin
            check_status = TLSA_ST_LENGTH_ERROR;
        end else if (op_aead) begin
            if (aad_len > MAX_AAD) check_status = TLSA_ST_LENGTH_ERROR;
            else if (op_seal && {1'b0, dst_len} < {1'b0, src_len} + 33'd16)
                check_status = TLSA_ST_LENGTH_ERROR;
            else if (!op_seal && src_len < 32'd16) check_status = TLSA_ST_LENGTH_ERROR;
            else if (!op_seal && dst_len < src_len - 32'd16) check_status = TLSA_ST_LENGTH_ERROR;
        end else if (tls_seal) begin
            if (param[95:24] != 72'd0) check_status = TLSA_ST_BAD_DESCRIPTOR;
            else if (inner_len > {1'b0, MAX_PLAIN} + 33'd1) check_status = TLSA_ST_LENGTH_ERROR;
            else if ({1'b0, dst_len} < tls13_record) check_status = TLSA_ST_LENGTH_ERROR;
            else if (aad_len != 32'd0) check_status = TLSA_ST_BAD_DESCRIPTOR;
        end else begin  // TLS13_OPEN
            if (src_len < 32'd22 || src_len > 32'd5 + MAX_PLAIN + 32'd256)
                check_status = TLSA_ST_LENGTH_ERROR;
            else if (dst_len < ((src_len - 32'd22) < MAX_PLAIN ? src_len - 32'd22 : MAX_PLAIN))
                check_status = TLSA_ST_LENGTH_ERROR;
            else if (aad_len != 32'd0) check_status = TLSA_ST_BAD_DESCRIPTOR;
        end
    end

    // Ranges to probe: 0 src, 1 dst, 2 aad. A range whose end passes 2^64 is a fault.
    reg [1:0]   probe_range;
    reg         probe_last;     // probing the range's last byte (else its first)
    wire [63:0] range_addr = probe_range == 2'd0 ? src : probe_range == 2'd1 ? dst : aad;
    wire [31:0] range_len  = probe_range == 2'd0 ? src_len : probe_range == 2'd1 ? dst_len : aad_len;
    wire [64:0] range_end  = {1'b0, range_addr} + {33'd0, range_len};
    wire        range_wraps = range_end[64];
    wire        range_used = probe_range == 2'd0 || (probe_range == 2'd1 && !op_load)
                          || (probe_range == 2'd2 && op_aead && aad_len != 32'd0);
    wire [63:0] probe_addr = probe_last && range_len != 32'd0
                           ? range_addr + {32'd0, range_len} - 64'd1 : range_addr;

    // ---------------------------------------------------------------- key table
    reg [421:0]            keys [0:NUM_KEY_SLOTS-1];  // {iv, key, sequence, dir, proto, alg}
    reg [NUM_KEY_SLOTS-1:0] loaded;
    reg                    key_we;
    reg [SB-1:0]           key_waddr;
    reg [421:0]            key_wdata;
    reg [421:0]            entry;
    reg [SB-1:0]           sweep;
    wire [SB-1:0]          slot_index = slot[SB-1:0];
    wire                   slot_in_range = slot < NUM_KEY_SLOTS;

    always @(posedge clk) begin
        if (key_we) keys[key_waddr] <= key_wdata;
        if (state == S_SLOT) entry <= keys[slot_index];
    end

    wire [1:0]   entry_alg   = entry[1:0];      // 1 AES-128, 2 AES-256
    wire [1:0]   entry_proto = entry[3:2];
    wire [1:0]   entry_dir   = entry[5:4];
    wire [63:0]  entry_seq   = entry[69:6];
    wire [255:0] entry_key   = entry[325:70];
    wire [95:0]  entry_iv    = entry[421:326];

    // ---------------------------------------------------------------- job buffers
    // Input: written by the DMA reader (and the engine: a TLS 1.3 seal's header, scrubbing),
    // read by the engine. Output: written by the engine, read by the DMA writer or SCAN.
    // Each is a simple dual-port RAM (one write, one registered read per clock).
    reg [127:0]  inbuf  [0:BUF_WORDS-1];
    reg [127:0]  outbuf [0:BUF_WORDS-1];
    reg [127:0]  in_q, out_q;
    wire         in_we, out_re;
    wire [WB-1:0] in_waddr, out_raddr;
    wire [127:0] in_wdata;
    always @(posedge clk) begin
        if (in_we) inbuf[in_waddr] <= in_wdata;
        if (in_re) in_q <= inbuf[in_raddr];
        if (out_we) outbuf[out_waddr] <= out_wdata;
        if (out_re) out_q <= outbuf[out_raddr];
    end

    // ---------------------------------------------------------------- DMA
    reg          rd_start, rd_probe;
    reg [63:0]   rd_addr;
    reg [31:0]   rd_len;
    reg [WB-1:0] rd_base;
    wire         rd_busy, rd_fault, rd_we;
    wire [31:0]  rd_words;
    wire [WB-1:0] rd_waddr;
    wire [127:0] rd_wdata;
    tlsaccel_dma_read #(.WORD_BITS(WB)) reader (
        .clk(clk), .rst(rst), .start(rd_start), .probe(rd_probe), .addr(rd_addr),
        .len(rd_len), .base(rd_base), .busy(rd_busy), .fault(rd_fault), .words_done(rd_words),
        .buf_we(rd_we), .buf_waddr(rd_waddr), .buf_wdata(rd_wdata),
        .m_araddr(m_araddr), .m_arlen(m_arlen), .m_arsize(m_arsize), .m_arburst(m_arburst),
        .m_arvalid(m_arvalid), .m_arready(m_arready), .m_rdata(m_rdata), .m_rresp(m_rresp),
        .m_rlast(m_rlast), .m_rvalid(m_rvalid), .m_rready(m_rready)
    );

    reg          wr_start;
    wire [31:0]  wr_avail;
    reg [63:0]   wr_addr;
    reg [31:0]   wr_len;
    reg [WB-1:0] wr_base;
    wire         wr_busy, wr_fault, wr_re;
    wire [WB-1:0] wr_raddr;
    tlsaccel_dma_write #(.WORD_BITS(WB)) writer (
        .clk(clk), .rst(rst), .start(wr_start), .addr(wr_addr), .len(wr_len),
        .base(wr_base), .avail(wr_avail), .busy(wr_busy), .fault(wr_fault),
        .buf_re(wr_re), .buf_raddr(wr_raddr), .buf_rdata(out_q),
        .m_awaddr(m_awaddr), .m_awlen(m_awlen), .m_awsize(m_awsize), .m_awburst(m_awburst),
        .m_awvalid(m_awvalid), .m_awready(m_awready), .m_wdata(m_wdata), .m_wstrb(m_wstrb),
        .m_wlast(m_wlast), .m_wvalid(m_wvalid), .m_wready(m_wready), .m_bresp(m_bresp),
        .m_bvalid(m_bvalid), .m_bready(m_bready)
    );

    // ---------------------------------------------------------------- AES and GHASH
    reg          kx_start, kx_clear, aes256;
    wire         kx_busy;
    wire [15*128-1:0] round_keys;
    tlsaccel_aes_keyexp expand (
        .clk(clk), .rst(rst), .start(kx_start), .clear(kx_clear), .aes256(aes256),
        .key(entry_key), .busy(kx_busy), .round_keys(round_keys)
    );

    reg          aes_in_valid;
    reg [127:0]  aes_in;
    reg [15:0]   aes_in_tag;
    wire         aes_out_valid;
    wire [127:0] aes_out;
    wire [15:0]  aes_out_tag;
    tlsaccel_aes_pipe #(.TAG_BITS(16)) cipher (
        .clk(clk), .aes256(aes256), .round_keys(round_keys),
        .in_valid(aes_in_valid), .in_block(aes_in), .in_tag(aes_in_tag),
        .out_valid(aes_out_valid), .out_block(aes_out), .out_tag(aes_out_tag)
    );

    // GCM's bit order: byte 0 is the most significant (SP 800-38D §6.3).
    function [127:0] swap;
        input [127:0] x;
        integer i;
        begin
            for (i = 0; i < 16; i = i + 1) swap[8*(15-i) +: 8] = x[8*i +: 8];
        end
    endfunction

    // X·Y in GF(2^128), SP 800-38D Algorithm 1, on big-endian blocks.
    function [127:0] gf_mul;
        input [127:0] x;
        input [127:0] y;
        reg [127:0] z, v;
        integer i;
        begin
            z = 128'd0;
            v = y;
            for (i = 127; i >= 0; i = i - 1) begin
                if (x[i]) z = z ^ v;
                v = v[0] ? (v >> 1) ^ {8'he1, 120'd0} : v >> 1;
            end
            gf_mul = z;
        end
    endfunction

    // Bytes [0, n) of word `index` of a byte stream, the rest zero.
    function [127:0] keep;
        input [127:0] x;
        input [27:0]  index;
        input [31:0]  n;
        integer b;
        begin
            keep = x;
            for (b = 0; b < 16; b = b + 1)
                if ({index, 4'd0} + {28'd0, b[3:0]} >= n) keep[8*b +: 8] = 8'd0;
        end
    endfunction

    // ---------------------------------------------------------------- job state
    reg [4:0]    state;
    reg [2:0]    step;
    reg [15:0]   status;
    reg          rejected;
    reg          advanced;
    reg [31:0]   result_len;
    reg [7:0]    info;
    reg [95:0]   nonce;
    reg [127:0]  hash_key;       // H, big-endian
    reg [127:0]  ej0;            // E(K, J0), little-endian
    reg [127:0]  ghash;          // running GHASH, big-endian
    reg [31:0]   in_bytes;       // cipher input bytes in the buffer
    reg [31:0]   data_bytes;     // bytes through the cipher
    reg [31:0]   aad_bytes;
    reg [31:0]   count;          // words issued in the current phase
    reg [31:0]   finished;       // words finished in the current phase
    reg          cached;         // round keys hold slot `cached_slot`
    reg [SB-1:0] cached_slot;
    reg          words_valid;    // CIPHER: a keystream word meets in_q this cycle
    reg [127:0]  keystream;
    reg [27:0]   word_index;
    reg [31:0]   scan_word;

    assign idle = state == S_IDLE;
    assign cmd_ready = state == S_IDLE;

    wire [31:0] counter    = count + 32'd2;   // GCM's inc32(J0) + i, big-endian in the block
    wire [31:0] aad_words  = (aad_bytes + 32'd15) >> 4;
    wire [31:0] data_words = (data_bytes + 32'd15) >> 4;
    wire [31:0] in_words   = (in_bytes + 32'd15) >> 4;

    // CIPHER: the word that meets its keystream. Input bytes past `in_bytes` are zero,
    // except that a TLS 1.3 seal puts the content type right after the plaintext.
    reg [127:0] plain_in, cipher_out, hashed;
    integer b;
    always @(*) begin
        plain_in = keep(in_q, word_index, in_bytes);
        if (tls_seal)
            for (b = 0; b < 16; b = b + 1)
                if ({word_index, 4'd0} + b == in_bytes) plain_in[8*b +: 8] = content_type;
        cipher_out = keep(plain_in ^ keystream, word_index, data_bytes);
        hashed = op_seal ? cipher_out : keep(in_q, word_index, data_bytes);
    end

    // GHASH: one multiplier, fed by whichever phase runs (AAD words, cipher words, the
    // length block).
    reg         gh_en;
    reg [127:0] gh_in;
    always @(*) begin
        gh_en = 1'b0;
        gh_in = 128'd0;
        case (state)
            S_AAD: begin
                gh_en = finished < count;
                gh_in = swap(keep(in_q, finished[27:0], aad_bytes));
            end
            S_CIPHER: begin
                gh_en = words_valid;
                gh_in = swap(hashed);
            end
            S_LENGTHS: begin
                gh_en = 1'b1;
                gh_in = {29'd0, aad_bytes, 3'd0, 29'd0, data_bytes, 3'd0};
            end
            default: ;
        endcase
    end
    wire [127:0] gh_next = gf_mul(ghash ^ gh_in, hash_key);

    // SCAN: the last non-zero byte of a word of the output buffer, if any.
    reg        scan_found;
    reg [3:0]  scan_at;
    always @(*) begin
        scan_found = 1'b0;
        scan_at = 4'd0;
        for (b = 0; b < 16; b = b + 1)
            if (out_q[8*b +: 8] != 8'd0) begin
                scan_found = 1'b1;
                scan_at = b[3:0];
            end
    end

    // The engine's own buffer accesses (the DMA reader writes the input buffer, the DMA
    // writer reads the output buffer).
    reg          eng_in_we, in_re, out_we, scan_re;
    reg [WB-1:0] eng_in_waddr, in_raddr, out_waddr, scan_raddr;
    reg [127:0]  eng_in_wdata, out_wdata;
    wire [127:0] tag_le = swap(ghash) ^ ej0;
    wire [15:0]  record_len = data_bytes[15:0] + 16'd16;
    wire [127:0] header = {88'd0, record_len[7:0], record_len[15:8], 8'h03, 8'h03, 8'h17};
    always @(*) begin
        eng_in_we = 1'b0;
        eng_in_waddr = {WB{1'b0}};
        eng_in_wdata = 128'd0;
        in_re = 1'b0;
        in_raddr = {WB{1'b0}};
        out_we = 1'b0;
        out_waddr = {WB{1'b0}};
        out_wdata = 128'd0;
        scan_re = 1'b0;
        scan_raddr = {WB{1'b0}};
        case (state)
            S_LOAD: if (tls_seal && step == 3'd0) begin
                // The record header: the AAD (input) and the record's first bytes (output).
                eng_in_we = 1'b1;
                eng_in_wdata = header;
                out_we = 1'b1;
                out_wdata = header;
            end
            S_BLOCK_WAIT: begin
                in_re = step >= 3'd1 && step <= 3'd4;
                in_raddr = {{(WB-3){1'b0}}, step - 3'd1};
            end
            S_SCRUB: begin
                // The key block leaves the input buffer with the job.
                eng_in_we = 1'b1;
                eng_in_waddr = {{(WB-3){1'b0}}, step};
            end
            S_HEADER: in_re = step == 3'd0;
            S_AAD: begin
                in_re = count < aad_words;
                in_raddr = count[WB-1:0];
            end
            S_CIPHER: begin
                in_re = aes_out_valid && !aes_out_tag[15];
                in_raddr = DATA_W + aes_out_tag[WB-1:0];
                out_we = words_valid;
                out_waddr = DATA_W + word_index[WB-1:0];
                out_wdata = op_seal ? cipher_out : keep(plain_in ^ keystream, word_index, data_bytes);
            end
            S_TAG: begin
                out_we = op_seal;
                out_waddr = TAG_W;
                out_wdata = tag_le;
                in_re = !op_seal;
                in_raddr = TAG_W;
            end
            S_SCAN: begin
                scan_re = step == 3'd0;
                scan_raddr = DATA_W + scan_word[WB-1:0];
            end
            default: ;
        endcase
    end
    assign in_we = rd_we | eng_in_we;
    assign in_waddr = rd_we ? rd_waddr : eng_in_waddr;
    assign in_wdata = rd_we ? rd_wdata : eng_in_wdata;
    assign out_re = wr_re | scan_re;
    assign out_raddr = wr_re ? wr_raddr : scan_raddr;
    // The writer may read what the cipher has written: everything, once CIPHER is over.
    assign wr_avail = state == S_CIPHER ? finished : 32'hffff_ffff;

    // Key block fields (words 0-3 of the buffer after S_BLOCK).
    reg [127:0] block0, block1, block2, block3;

    // The segments LOAD reads, by `step`: 0 the AAD or the TLS 1.3 header, 1 the data,
    // 2 an open's tag.
    reg [63:0]   seg_addr;
    reg [31:0]   seg_len;
    reg [WB-1:0] seg_base;
    always @(*) begin
        case (step)
            3'd0: begin
                seg_addr = op_aead ? aad : src;
                seg_len = tls_open ? 32'd5 : op_aead ? aad_len : 32'd0;
                seg_base = {WB{1'b0}};
            end
            3'd1: begin
                seg_addr = tls_open ? src + 64'd5 : src;
                seg_len = in_bytes;
                seg_base = DATA_W;
            end
            default: begin
                seg_addr = src + {32'd0, src_len} - 64'd16;
                seg_len = 32'd16;
                seg_base = TAG_W;
            end
        endcase
    end

    // The segments OUTPUT writes, by `o_step`: a TLS 1.3 seal's header, body and tag; an
    // AEAD seal's ciphertext and tag; an open's plaintext.
    reg [63:0]   out_addr;
    reg [31:0]   out_len;
    reg [WB-1:0] out_base;
    reg          out_last;
    reg [1:0]    o_step;
    always @(*) begin
        case (o_step)
            2'd0: begin
                out_addr = dst;
                out_len = tls_seal ? 32'd5 : op_seal ? src_len : result_len;
                out_base = tls_seal ? {WB{1'b0}} : DATA_W;
                out_last = !op_seal;
            end
            2'd1: begin
                out_addr = tls_seal ? dst + 64'd5 : dst + {32'd0, src_len};
                out_len = tls_seal ? data_bytes : 32'd16;
                out_base = tls_seal ? DATA_W : TAG_W;
                out_last = !tls_seal;
            end
            default: begin
                out_addr = dst + 64'd5 + {32'd0, data_bytes};
                out_len = 32'd16;
                out_base = TAG_W;
                out_last = 1'b1;
            end
        endcase
    end

    // The output sequencer: started by `out_go`, it writes the segments in order, the tag
    // once `tag_ready`; `o_done` until the main sequencer takes the result.
    localparam [1:0] O_IDLE = 2'd0, O_SEG = 2'd1, O_WAIT = 2'd2, O_DONE = 2'd3;
    reg [1:0] o_state;
    reg       out_go, tag_ready, o_fault;
    always @(posedge clk) begin
        wr_start <= 1'b0;
        if (rst) begin
            o_state <= O_IDLE;
            o_step <= 2'd0;
            o_fault <= 1'b0;
        end else begin
            case (o_state)
                O_IDLE: if (out_go) begin
                    o_step <= 2'd0;
                    o_fault <= 1'b0;
                    o_state <= O_SEG;
                end
                O_SEG: begin
                    if (out_base == TAG_W && !tag_ready) begin
                        o_state <= O_SEG;   // the tag is not computed yet
                    end else if (out_len != 32'd0) begin
                        wr_start <= 1'b1;
                        wr_addr <= out_addr;
                        wr_len <= out_len;
                        wr_base <= out_base;
                        o_state <= O_WAIT;
                    end else if (out_last) begin
                        o_state <= O_DONE;
                    end else begin
                        o_step <= o_step + 2'd1;
                    end
                end
                O_WAIT: if (!wr_busy && !wr_start) begin
                    if (wr_fault) begin
                        o_fault <= 1'b1;
                        o_state <= O_DONE;
                    end else if (out_last) begin
                        o_state <= O_DONE;
                    end else begin
                        o_step <= o_step + 2'd1;
                        o_state <= O_SEG;
                    end
                end
                O_DONE: if (state == S_OUT_WAIT) o_state <= O_IDLE;
                default: o_state <= O_IDLE;
            endcase
        end
    end

    task finish;
        input [15:0] why;
        input        refused;
        begin
            status <= why;
            rejected <= refused;
            state <= S_DONE;
        end
    endtask

    always @(posedge clk) begin
        done <= 1'b0;
        rd_start <= 1'b0;
        out_go <= 1'b0;
        kx_start <= 1'b0;
        kx_clear <= 1'b0;
        key_we <= 1'b0;
        aes_in_valid <= 1'b0;
        words_valid <= 1'b0;
        if (rst) begin
            state <= S_SWEEP;
            sweep <= {SB{1'b0}};
            loaded <= {NUM_KEY_SLOTS{1'b0}};
            cached <= 1'b0;
            cached_slot <= {SB{1'b0}};
            kx_clear <= 1'b1;
            tag_ready <= 1'b0;
            desc <= 512'd0;
            step <= 3'd0;
            status <= 16'd0;
            rejected <= 1'b0;
            advanced <= 1'b0;
            result_len <= 32'd0;
            info <= 8'd0;
            nonce <= 96'd0;
            hash_key <= 128'd0;
            ej0 <= 128'd0;
            ghash <= 128'd0;
            aes256 <= 1'b0;
            count <= 32'd0;
            finished <= 32'd0;
            in_bytes <= 32'd0;
            data_bytes <= 32'd0;
            aad_bytes <= 32'd0;
            probe_range <= 2'd0;
            probe_last <= 1'b0;
            done_status <= 16'd0;
            done_len <= 32'd0;
            done_info <= 8'd0;
            done_sequence_advanced <= 1'b0;
            done_rejected <= 1'b0;
            bytes_in <= 64'd0;
            bytes_out <= 64'd0;
            auth_failures <= 64'd0;
            dma_faults <= 64'd0;
            key_slots_loaded <= 64'd0;
            records_sealed <= 64'd0;
            records_opened <= 64'd0;
        end else begin
            case (state)
                // Zeroize the key RAM after reset, a slot per clock.
                S_SWEEP: begin
                    key_we <= 1'b1;
                    key_waddr <= sweep;
                    key_wdata <= 422'd0;
                    sweep <= sweep + 1'b1;
                    if (sweep == NUM_KEY_SLOTS[SB-1:0] - 1'b1) state <= S_IDLE;
                end
                S_IDLE: if (cmd_valid) begin
                    desc <= cmd_desc;
                    advanced <= 1'b0;
                    result_len <= 32'd0;
                    info <= 8'd0;
                    state <= S_CHECK;
                end
                S_CHECK: begin
                    probe_range <= 2'd0;
                    probe_last <= 1'b0;
                    if (check_status != TLSA_ST_OK) finish(check_status, 1'b1);
                    else if (op_destroy) state <= S_SLOT;
                    else state <= S_PROBE;
                end
                S_PROBE: begin
                    if (probe_range == 2'd3) begin
                        state <= op_load ? S_BLOCK : S_SLOT;
                    end else if (!range_used) begin
                        probe_range <= probe_range + 2'd1;
                    end else if (range_wraps) begin
                        finish(TLSA_ST_DMA_FAULT, 1'b1);
                    end else begin
                        rd_start <= 1'b1;
                        rd_probe <= 1'b1;
                        rd_addr <= probe_addr;
                        rd_len <= 32'd1;
                        state <= S_PROBE_WAIT;
                    end
                end
                S_PROBE_WAIT: if (!rd_busy) begin
                    if (rd_fault) begin
                        finish(TLSA_ST_DMA_FAULT, 1'b1);
                    end else begin
                        probe_last <= !probe_last;
                        if (probe_last) probe_range <= probe_range + 2'd1;
                        state <= S_PROBE;
                    end
                end
                // KEY_LOAD: read the key block into words 0-3.
                S_BLOCK: begin
                    rd_start <= 1'b1;
                    rd_probe <= 1'b0;
                    rd_addr <= src;
                    rd_len <= 32'd64;
                    rd_base <= {WB{1'b0}};
                    step <= 3'd0;
                    state <= S_BLOCK_WAIT;
                end
                S_BLOCK_WAIT: begin
                    // Words 0-3 come back through in_q, one per clock.
                    if (!rd_busy && step == 3'd0) begin
                        // A refused load scrubs what it read, too.
                        if (rd_fault || !slot_in_range) begin
                            status <= rd_fault ? TLSA_ST_DMA_FAULT : TLSA_ST_BAD_SLOT;
                            rejected <= 1'b1;
                            state <= S_SCRUB;
                        end else begin
                            step <= 3'd1;
                        end
                    end else if (step != 3'd0) begin
                        step <= step + 3'd1;
                        case (step)
                            3'd2: block0 <= in_q;
                            3'd3: block1 <= in_q;
                            3'd4: block2 <= in_q;
                            3'd5: begin
                                block3 <= in_q;
                                state <= S_KEY_LOAD;
                            end
                            default: ;
                        endcase
                    end
                end
                S_SCRUB: begin
                    step <= step + 3'd1;
                    if (step == 3'd3) state <= S_DONE;
                end
                S_KEY_LOAD: begin
                    // §6 and the reference model's order: reserved bytes, algorithm,
                    // protocol and direction, unused key bytes.
                    if (block0[63:24] != 40'd0 || block3[127:96] != 32'd0)
                        finish(TLSA_ST_BAD_DESCRIPTOR, 1'b1);
                    else if (block0[7:0] != 8'd1 && block0[7:0] != 8'd2)
                        finish(TLSA_ST_UNSUPPORTED, 1'b1);
                    else if (block0[15:8] == 8'd0 ? block0[23:16] != 8'd0
                             : block0[15:8] <= 8'd2 ? block0[23:16] != 8'd1 && block0[23:16] != 8'd2
                             : 1'b0)
                        finish(TLSA_ST_BAD_DESCRIPTOR, 1'b1);
                    else if (block0[15:8] != 8'd0 && block0[15:8] != 8'd2)
                        finish(TLSA_ST_UNSUPPORTED, 1'b1);
                    else if (block0[7:0] == 8'd1 && block2 != 128'd0)
                        finish(TLSA_ST_BAD_DESCRIPTOR, 1'b1);
                    else begin
                        key_we <= 1'b1;
                        key_waddr <= slot_index;
                        key_wdata <= {block3[95:0], block2, block1, block0[127:64],
                                      block0[17:16], block0[9:8], block0[1:0]};
                        if (!loaded[slot_index]) key_slots_loaded <= key_slots_loaded + 64'd1;
                        loaded[slot_index] <= 1'b1;
                        if (cached && cached_slot == slot_index) begin
                            cached <= 1'b0;
                            kx_clear <= 1'b1;
                        end
                        status <= TLSA_ST_OK;
                        rejected <= 1'b0;
                    end
                    step <= 3'd0;
                    state <= S_SCRUB;
                    // The key block leaves the engine's registers and buffer with the job.
                    block0 <= 128'd0;
                    block1 <= 128'd0;
                    block2 <= 128'd0;
                    block3 <= 128'd0;
                end
                S_SLOT: begin
                    if (!slot_in_range) finish(TLSA_ST_BAD_SLOT, 1'b1);
                    else if (!loaded[slot_index]) finish(TLSA_ST_SLOT_EMPTY, 1'b1);
                    else if (op_destroy) begin
                        key_we <= 1'b1;
                        key_waddr <= slot_index;
                        key_wdata <= 422'd0;
                        loaded[slot_index] <= 1'b0;
                        key_slots_loaded <= key_slots_loaded - 64'd1;
                        if (cached && cached_slot == slot_index) begin
                            cached <= 1'b0;
                            kx_clear <= 1'b1;
                        end
                        finish(TLSA_ST_OK, 1'b0);
                    end else begin
                        state <= S_SLOT_WAIT;   // `entry` is read this clock
                    end
                end
                S_SLOT_WAIT: state <= S_GRANT;
                S_GRANT: begin
                    if (entry_proto != (op_tls ? 2'd2 : 2'd0)
                        || entry_dir != (!op_tls ? 2'd0 : op_seal ? 2'd1 : 2'd2))
                        finish(TLSA_ST_SLOT_MISMATCH, 1'b1);
                    else if (op_tls && entry_seq == 64'hffff_ffff_ffff_ffff)
                        finish(TLSA_ST_SEQUENCE_EXHAUSTED, 1'b1);
                    else begin
                        // Accepted: a record job takes the sequence number.
                        if (op_tls) begin
                            key_we <= 1'b1;
                            key_waddr <= slot_index;
                            key_wdata <= {entry[421:70], entry_seq + 64'd1, entry[5:0]};
                            advanced <= 1'b1;
                            nonce <= entry_iv ^ {entry_seq[7:0], entry_seq[15:8],
                                                 entry_seq[23:16], entry_seq[31:24],
                                                 entry_seq[39:32], entry_seq[47:40],
                                                 entry_seq[55:48], entry_seq[63:56], 32'd0};
                        end else begin
                            nonce <= param;
                        end
                        aes256 <= entry_alg == 2'd2;
                        in_bytes <= tls_open ? src_len - 32'd21
                                  : op_seal ? src_len : src_len - 32'd16;
                        data_bytes <= tls_open ? src_len - 32'd21
                                    : tls_seal ? inner_len[31:0]
                                    : op_seal ? src_len : src_len - 32'd16;
                        aad_bytes <= op_tls ? 32'd5 : aad_len;
                        if (!(cached && cached_slot == slot_index)) begin
                            kx_start <= 1'b1;
                            cached <= 1'b1;
                            cached_slot <= slot_index;
                        end
                        step <= 3'd0;
                        state <= S_KEYS;
                    end
                end
                S_KEYS: if (!kx_busy && !kx_start) begin
                    step <= 3'd0;
                    state <= S_LOAD;
                end
                // Step 0 (AAD or header) is waited for; step 1 (the data) runs on beside the
                // cipher; step 2 (an open's tag) comes after it.
                S_LOAD: begin
                    if (seg_len != 32'd0) begin
                        rd_start <= 1'b1;
                        rd_probe <= 1'b0;
                        rd_addr <= seg_addr;
                        rd_len <= seg_len;
                        rd_base <= seg_base;
                    end
                    if (step == 3'd1) begin
                        step <= 3'd0;
                        state <= S_HJ;
                    end else if (seg_len != 32'd0) begin
                        state <= S_LOAD_WAIT;
                    end else begin
                        step <= step + 3'd1;
                    end
                end
                S_LOAD_WAIT: if (!rd_busy && !rd_start) begin
                    if (rd_fault) begin
                        finish(TLSA_ST_DMA_FAULT, 1'b0);
                    end else if (step == 3'd2) begin
                        state <= S_TAG;
                    end else if (tls_open) begin
                        step <= 3'd0;
                        state <= S_HEADER;
                    end else begin
                        step <= 3'd1;
                        state <= S_LOAD;
                    end
                end
                // TLS13_OPEN: type 23, version 0x0303, length = src_len - 5.
                S_HEADER: begin
                    step <= step + 3'd1;
                    if (step == 3'd1) begin
                        if (in_q[23:0] != 24'h030317
                            || {in_q[31:24], in_q[39:32]} != src_len[15:0] - 16'd5) begin
                            finish(TLSA_ST_RECORD_MALFORMED, 1'b0);
                        end else begin
                            step <= 3'd1;
                            state <= S_LOAD;
                        end
                    end
                end
                S_HJ: begin
                    step <= step + 3'd1;
                    if (step == 3'd0) begin
                        aes_in_valid <= 1'b1;
                        aes_in <= 128'd0;
                        aes_in_tag <= 16'h8000;
                    end else if (step == 3'd1) begin
                        aes_in_valid <= 1'b1;
                        aes_in <= {8'h01, 24'd0, nonce};
                        aes_in_tag <= 16'h8001;
                    end else begin
                        step <= step;
                    end
                    if (aes_out_valid && aes_out_tag == 16'h8000) hash_key <= swap(aes_out);
                    if (aes_out_valid && aes_out_tag == 16'h8001) begin
                        ej0 <= aes_out;
                        ghash <= 128'd0;
                        count <= 32'd0;
                        finished <= 32'd0;
                        state <= S_AAD;
                    end
                end
                S_AAD: begin
                    if (count < aad_words) count <= count + 32'd1;
                    if (gh_en) begin
                        ghash <= gh_next;
                        finished <= finished + 32'd1;
                    end
                    if (finished == aad_words) begin
                        count <= 32'd0;
                        finished <= 32'd0;
                        tag_ready <= 1'b0;
                        // A seal's output follows the cipher from here.
                        if (op_seal) begin
                            out_go <= 1'b1;
                            result_len <= tls_seal ? data_bytes + 32'd21 : src_len + 32'd16;
                            info <= tls_seal ? 8'h17 : 8'h00;
                        end
                        state <= S_CIPHER;
                    end
                end
                S_CIPHER: begin
                    // Counter blocks 2, 3, ... (J0 + 1 + i), one per clock, each once its
                    // input word is in (words past the input are padding: no wait).
                    if (count < data_words
                        && (count < rd_words || count >= in_words || !rd_busy)) begin
                        aes_in_valid <= 1'b1;
                        aes_in <= {counter[7:0], counter[15:8], counter[23:16], counter[31:24],
                                   nonce};
                        aes_in_tag <= {3'd0, count[12:0]};
                        count <= count + 32'd1;
                    end
                    if (aes_out_valid && !aes_out_tag[15]) begin
                        words_valid <= 1'b1;
                        keystream <= aes_out;
                        word_index <= {15'd0, aes_out_tag[12:0]};
                    end
                    if (gh_en) begin
                        ghash <= gh_next;
                        finished <= finished + 32'd1;
                    end
                    if (finished == data_words && !words_valid) state <= S_LENGTHS;
                end
                S_LENGTHS: begin
                    ghash <= gh_next;
                    state <= S_DATA_DONE;
                end
                // The data read has ended (it has: the cipher took every word of it).
                S_DATA_DONE: if (!rd_busy) begin
                    if (rd_fault) begin
                        // A seal's output is under way: let it end, then report the fault.
                        status <= TLSA_ST_DMA_FAULT;
                        tag_ready <= 1'b1;
                        if (op_seal) state <= S_OUT_WAIT;
                        else finish(TLSA_ST_DMA_FAULT, 1'b0);
                    end else if (op_seal) begin
                        state <= S_TAG;
                    end else begin
                        step <= 3'd2;
                        state <= S_LOAD;
                    end
                end
                S_TAG: begin
                    step <= 3'd0;
                    if (op_seal) begin
                        tag_ready <= 1'b1;
                        status <= TLSA_ST_OK;
                        state <= S_OUT_WAIT;
                    end else begin
                        state <= S_TAG_CHECK;
                    end
                end
                S_TAG_CHECK: begin
                    if (in_q != tag_le) begin
                        auth_failures <= auth_failures + 64'd1;
                        finish(TLSA_ST_AUTH_FAILED, 1'b0);
                    end else if (tls_open) begin
                        scan_word <= data_words - 32'd1;
                        step <= 3'd0;
                        state <= S_SCAN;
                    end else begin
                        result_len <= src_len - 32'd16;
                        status <= TLSA_ST_OK;
                        out_go <= 1'b1;
                        state <= S_OUT_WAIT;
                    end
                end
                S_SCAN: begin
                    step <= step + 3'd1;
                    if (step == 3'd1) begin
                        if (scan_found) begin
                            if ({scan_word[27:0], scan_at} > MAX_PLAIN) begin
                                finish(TLSA_ST_RECORD_OVERFLOW, 1'b0);
                            end else begin
                                result_len <= {scan_word[27:0], scan_at};
                                info <= out_q[8*scan_at +: 8];
                                status <= TLSA_ST_OK;
                                out_go <= 1'b1;
                                state <= S_OUT_WAIT;
                            end
                        end else if (scan_word == 32'd0) begin
                            finish(TLSA_ST_RECORD_MALFORMED, 1'b0);
                        end else begin
                            scan_word <= scan_word - 32'd1;
                            step <= 3'd0;
                        end
                    end
                end
                S_OUT_WAIT: if (o_state == O_DONE) begin
                    tag_ready <= 1'b0;
                    if (status != TLSA_ST_OK) finish(status, 1'b0);
                    else finish(o_fault ? TLSA_ST_DMA_FAULT : TLSA_ST_OK, 1'b0);
                end
                S_DONE: begin
                    done <= 1'b1;
                    done_status <= status;
                    done_rejected <= rejected;
                    done_sequence_advanced <= advanced;
                    done_info <= status == TLSA_ST_OK ? info : 8'd0;
                    done_len <= status == TLSA_ST_OK ? result_len : 32'd0;
                    if (status == TLSA_ST_DMA_FAULT) dma_faults <= dma_faults + 64'd1;
                    if (status == TLSA_ST_OK && !op_load && !op_destroy) begin
                        bytes_in <= bytes_in + {32'd0, src_len};
                        bytes_out <= bytes_out + {32'd0, result_len};
                        if (tls_seal) records_sealed <= records_sealed + 64'd1;
                        if (tls_open) records_opened <= records_opened + 64'd1;
                    end
                    // Nothing of the job stays behind: nonce, hash key and tag state.
                    nonce <= 96'd0;
                    hash_key <= 128'd0;
                    ej0 <= 128'd0;
                    ghash <= 128'd0;
                    keystream <= 128'd0;
                    state <= S_IDLE;
                end
                default: state <= S_IDLE;
            endcase
        end
    end

    wire unused_ok = &{1'b0, desc[127:64], desc[31:8], range_end[63:0], tls13_record[32], inner_len[32]};
endmodule

`default_nettype wire
