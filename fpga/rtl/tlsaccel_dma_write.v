// Record engine DMA write: copies `len` bytes from the engine buffer (aligned words from
// word `base`) to host memory at any byte address. Bursts go to the next 4 KiB boundary
// at most; each beat joins two buffer words shifted to the address, with byte strobes for
// the partial first and last beats. The buffer read has one cycle of latency and is only
// issued when the W channel can take the beat it feeds, so the stream runs at a beat per
// clock while WREADY holds and stalls cleanly when it does not.
// A write error response sets `fault`.

`default_nettype none

module tlsaccel_dma_write #(
    parameter integer WORD_BITS = 13
) (
    input  wire                 clk,
    input  wire                 rst,
    input  wire                 start,
    input  wire [63:0]          addr,
    input  wire [31:0]          len,     // > 0
    input  wire [WORD_BITS-1:0] base,
    // Words from `base` that are ready: the writer follows the cipher through the buffer.
    input  wire [31:0]          avail,
    output wire                 busy,
    output reg                  fault,

    output wire                 buf_re,
    output wire [WORD_BITS-1:0] buf_raddr,
    input  wire [127:0]         buf_rdata,

    output reg  [63:0]          m_awaddr,
    output reg  [7:0]           m_awlen,
    output wire [2:0]           m_awsize,
    output wire [1:0]           m_awburst,
    output reg                  m_awvalid,
    input  wire                 m_awready,
    output reg  [127:0]         m_wdata,
    output reg  [15:0]          m_wstrb,
    output reg                  m_wlast,
    output reg                  m_wvalid,
    input  wire                 m_wready,
    input  wire [1:0]           m_bresp,
    input  wire                 m_bvalid,
    output reg                  m_bready
);
    assign m_awsize = 3'd4;
    assign m_awburst = 2'b01;

    localparam [1:0] S_IDLE = 2'd0, S_AW = 2'd1, S_W = 2'd2, S_B = 2'd3;

    reg [1:0]   state;
    reg [59:0]  next_beat;
    reg [31:0]  beats_left;     // beats of the range not yet in a burst
    reg [31:0]  burst_beats;    // beats of this burst
    reg [31:0]  issued;         // buffer reads issued for this burst
    reg [31:0]  sent;           // beats sent in this burst
    reg [31:0]  beat;           // beat index within the range of the pending read
    reg [31:0]  pending_beat;
    reg [31:0]  words;
    reg [31:0]  length;
    reg [3:0]   shift;
    reg         pending;        // buf_rdata holds the word for beat `pending_beat`
    reg [127:0] prev;           // the word of the beat before
    reg [WORD_BITS-1:0] base_word;

    assign busy = state != S_IDLE || start;

    wire [63:0] last_byte = addr + {32'd0, len} - 64'd1;
    wire [59:0] beat_span = last_byte[63:4] - addr[63:4] + 60'd1;
    wire [31:0] beats_total = beat_span[31:0];
    wire [8:0]  to_boundary = 9'd256 - {1'b0, next_beat[7:0]};
    wire [31:0] burst = beats_left < {23'd0, to_boundary} ? beats_left : {23'd0, to_boundary};

    // The W register takes a beat this cycle when it is empty or its beat is accepted.
    wire advance = !m_wvalid || m_wready;
    assign buf_re = state == S_W && advance && issued < burst_beats
                 && (beat >= words || beat < avail);
    assign buf_raddr = base_word + beat[WORD_BITS-1:0];

    // Beat j carries stream bytes 16j - shift ... 16j + 15 - shift.
    wire [127:0] word = pending_beat < words ? buf_rdata : 128'd0;
    wire [255:0] joined = {word, prev} >> {5'd16 - {1'b0, shift}, 3'b000};
    reg  [15:0]  strobe;
    reg  [35:0]  lane;
    integer b;
    always @(*) begin
        for (b = 0; b < 16; b = b + 1) begin
            lane = {pending_beat, 4'd0} + {32'd0, b[3:0]};
            strobe[b] = lane >= {32'd0, shift} && lane < {32'd0, shift} + {4'd0, length};
        end
    end

    always @(posedge clk) begin
        if (rst) begin
            state <= S_IDLE;
            fault <= 1'b0;
            m_awvalid <= 1'b0;
            m_awaddr <= 64'd0;
            m_awlen <= 8'd0;
            m_wvalid <= 1'b0;
            m_wlast <= 1'b0;
            m_wdata <= 128'd0;
            m_wstrb <= 16'd0;
            m_bready <= 1'b0;
            next_beat <= 60'd0;
            beats_left <= 32'd0;
            burst_beats <= 32'd0;
            issued <= 32'd0;
            sent <= 32'd0;
            beat <= 32'd0;
            pending_beat <= 32'd0;
            words <= 32'd0;
            length <= 32'd0;
            shift <= 4'd0;
            pending <= 1'b0;
            prev <= 128'd0;
            base_word <= {WORD_BITS{1'b0}};
        end else begin
            case (state)
                S_IDLE: if (start) begin
                    fault <= 1'b0;
                    next_beat <= addr[63:4];
                    beats_left <= beats_total;
                    words <= (len + 32'd15) >> 4;
                    length <= len;
                    shift <= addr[3:0];
                    beat <= 32'd0;
                    prev <= 128'd0;
                    pending <= 1'b0;
                    base_word <= base;
                    state <= S_AW;
                end
                S_AW: begin
                    if (!m_awvalid) begin
                        m_awaddr <= {next_beat, 4'd0};
                        m_awlen <= burst[7:0] - 8'd1;
                        m_awvalid <= 1'b1;
                        burst_beats <= burst;
                        issued <= 32'd0;
                        sent <= 32'd0;
                    end else if (m_awready) begin
                        m_awvalid <= 1'b0;
                        next_beat <= next_beat + {28'd0, burst_beats};
                        beats_left <= beats_left - burst_beats;
                        state <= S_W;
                    end
                end
                S_W: if (advance) begin
                    if (pending) begin
                        m_wvalid <= 1'b1;
                        m_wdata <= joined[127:0];
                        m_wstrb <= strobe;
                        m_wlast <= sent + 32'd1 == burst_beats;
                        prev <= word;
                        sent <= sent + 32'd1;
                    end else begin
                        m_wvalid <= 1'b0;
                        m_wlast <= 1'b0;
                        if (sent == burst_beats && m_wvalid) begin
                            m_bready <= 1'b1;
                            state <= S_B;
                        end
                    end
                    if (buf_re) begin
                        pending <= 1'b1;
                        pending_beat <= beat;
                        beat <= beat + 32'd1;
                        issued <= issued + 32'd1;
                    end else begin
                        pending <= 1'b0;
                    end
                end
                S_B: if (m_bvalid) begin
                    m_bready <= 1'b0;
                    if (m_bresp != 2'b00) fault <= 1'b1;
                    state <= beats_left != 32'd0 ? S_AW : S_IDLE;
                end
                default: state <= S_IDLE;
            endcase
        end
    end

    wire unused_ok = &{1'b0, m_bresp[0], last_byte[3:0], joined[255:128], beat_span[59:32]};
endmodule

`default_nettype wire
