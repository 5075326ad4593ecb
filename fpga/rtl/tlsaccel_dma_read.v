// Record engine DMA read: copies `len` bytes of host memory from any byte address into the
// engine buffer as aligned 16-byte words from word `base`, zero-filling past the end of the
// last word. Bursts go to the next 4 KiB boundary at most (AXI4 INCR, 16-byte beats); the
// realigner joins each beat with the one before it, so the stream runs at a word per beat.
//
// With `probe`, it reads the one beat holding `addr` and writes nothing: the engine probes
// the first and last byte of each range before it accepts a job, so a range outside the
// host's mappings is refused before anything is read or written (device-spec §4).
// A read error response (SLVERR/DECERR: the IOMMU refused) sets `fault`; the rest of the
// burst is still taken, so the bus is left clean.

`default_nettype none

module tlsaccel_dma_read #(
    parameter integer WORD_BITS = 13
) (
    input  wire                 clk,
    input  wire                 rst,
    input  wire                 start,
    input  wire                 probe,
    input  wire [63:0]          addr,
    input  wire [31:0]          len,     // > 0
    input  wire [WORD_BITS-1:0] base,
    output wire                 busy,
    output reg                  fault,
    output wire [31:0]          words_done,  // words written so far (the cipher follows)

    output reg                  buf_we,
    output reg  [WORD_BITS-1:0] buf_waddr,
    output reg  [127:0]         buf_wdata,

    output reg  [63:0]          m_araddr,
    output reg  [7:0]           m_arlen,
    output wire [2:0]           m_arsize,
    output wire [1:0]           m_arburst,
    output reg                  m_arvalid,
    input  wire                 m_arready,
    input  wire [127:0]         m_rdata,
    input  wire [1:0]           m_rresp,
    input  wire                 m_rlast,
    input  wire                 m_rvalid,
    output reg                  m_rready
);
    assign m_arsize = 3'd4;     // 16-byte beats
    assign m_arburst = 2'b01;   // INCR

    localparam [1:0] S_IDLE = 2'd0, S_AR = 2'd1, S_R = 2'd2, S_FLUSH = 2'd3;

    reg [1:0]   state;
    reg [59:0]  next_beat;      // beat address of the next burst
    reg [31:0]  beats_left;     // beats not yet requested
    reg [31:0]  words;          // words to write
    reg [31:0]  emitted;        // words written so far
    reg [31:0]  length;
    reg [3:0]   shift;
    reg         first;          // the next beat is the job's first
    reg         probing;
    reg [127:0] prev;

    assign busy = state != S_IDLE || start;
    assign words_done = emitted;

    wire [63:0]  last_byte = addr + {32'd0, len} - 64'd1;
    wire [59:0]  beat_span = last_byte[63:4] - addr[63:4] + 60'd1;
    wire [31:0]  beats_total = beat_span[31:0];
    // The burst: up to the 4 KiB boundary (256 beats), and no further than the range.
    wire [8:0]   to_boundary = 9'd256 - {1'b0, next_beat[7:0]};
    wire [31:0]  burst = beats_left < {23'd0, to_boundary} ? beats_left : {23'd0, to_boundary};

    /* verilator lint_off UNUSEDSIGNAL */
    // Word `emitted` from the beat before and this one; bytes past the range are zero.
    function [127:0] realign;
        input [127:0] lower;
        input [127:0] upper;
        input [3:0]   by;
        input [31:0]  remaining;  // bytes of the range from this word on
        reg [255:0] joined;
        integer b;
        begin
            joined = {upper, lower} >> {by, 3'b000};
            realign = joined[127:0];
            for (b = 0; b < 16; b = b + 1)
                if (remaining <= b) realign[8*b +: 8] = 8'd0;
        end
    endfunction
    /* verilator lint_on UNUSEDSIGNAL */

    wire [31:0] remaining = length - {emitted[27:0], 4'b0000};

    always @(posedge clk) begin
        buf_we <= 1'b0;
        if (rst) begin
            state <= S_IDLE;
            fault <= 1'b0;
            m_arvalid <= 1'b0;
            m_rready <= 1'b0;
            m_araddr <= 64'd0;
            m_arlen <= 8'd0;
            buf_waddr <= {WORD_BITS{1'b0}};
            buf_wdata <= 128'd0;
            next_beat <= 60'd0;
            beats_left <= 32'd0;
            words <= 32'd0;
            emitted <= 32'd0;
            length <= 32'd0;
            shift <= 4'd0;
            first <= 1'b0;
            probing <= 1'b0;
            prev <= 128'd0;
        end else begin
            case (state)
                S_IDLE: if (start) begin
                    fault <= 1'b0;
                    probing <= probe;
                    next_beat <= addr[63:4];
                    beats_left <= probe ? 32'd1 : beats_total;
                    words <= (len + 32'd15) >> 4;
                    emitted <= 32'd0;
                    length <= len;
                    shift <= addr[3:0];
                    first <= 1'b1;
                    buf_waddr <= base - 1'b1;
                    state <= S_AR;
                end
                S_AR: begin
                    if (!m_arvalid) begin
                        m_araddr <= {next_beat, 4'd0};
                        m_arlen <= burst[7:0] - 8'd1;
                        m_arvalid <= 1'b1;
                    end else if (m_arready) begin
                        m_arvalid <= 1'b0;
                        m_rready <= 1'b1;
                        next_beat <= next_beat + {28'd0, burst};
                        beats_left <= beats_left - burst;
                        state <= S_R;
                    end
                end
                S_R: if (m_rvalid) begin
                    if (m_rresp != 2'b00) fault <= 1'b1;
                    prev <= m_rdata;
                    first <= 1'b0;
                    if (!first && !probing) begin
                        buf_we <= 1'b1;
                        buf_waddr <= buf_waddr + 1'b1;
                        buf_wdata <= realign(prev, m_rdata, shift, remaining);
                        emitted <= emitted + 32'd1;
                    end
                    if (m_rlast) begin
                        m_rready <= 1'b0;
                        if (beats_left != 32'd0) state <= S_AR;
                        else if (probing) state <= S_IDLE;
                        // The range's last word still sits in `prev` when it ends in the
                        // last beat's bytes (no beat after it to join).
                        else state <= S_FLUSH;
                    end
                end
                S_FLUSH: begin
                    if (emitted < words) begin
                        buf_we <= 1'b1;
                        buf_waddr <= buf_waddr + 1'b1;
                        buf_wdata <= realign(prev, 128'd0, shift, remaining);
                        emitted <= emitted + 32'd1;
                    end
                    state <= S_IDLE;
                end
                default: state <= S_IDLE;
            endcase
        end
    end

    wire unused_ok = &{1'b0, m_rresp[0], last_byte[3:0], beat_span[59:32]};
endmodule

`default_nettype wire
