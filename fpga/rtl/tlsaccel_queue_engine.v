// tlsaccel queue engine: takes descriptors from the submission rings of enabled queues,
// round-robin, validates them and writes their completions with the phase tag
// (docs/device-spec.md §3, §4, §5), through an AXI4 master standing for the PCIe DMA.
//
// NOP completes here. Key-table, AEAD and TLS 1.3 record jobs go to the record engine
// (tlsaccel_record_engine.v), one at a time, and their completion carries its status,
// result length, content type and SEQUENCE_ADVANCED flag; every other known opcode (TLS 1.2
// records, the public-key engines) completes UNSUPPORTED. Interrupts (§7): a queue with IRQ_ENABLE raises its vector
// (a one-cycle `irq` pulse, for the shell's MSI-X) once IRQ_COALESCE_COUNT completions are
// pending (0 and 1: every one), or IRQ_COALESCE_USECS after the first pending one
// (0: at once; the timers count ticks of one shared microsecond prescaler, so a completion
// waits at most that long); one vector per cycle, the lowest first.
//
// Per job: one 8-beat read burst (the 64-byte descriptor), one 2-beat write burst (the
// 16-byte completion: cookie, then result length, status, info and flags — the status word
// in the last beat). A read error on the ring stops the queue with RING_NOT_MAPPED; a tail
// doorbell outside the ring stops it with BAD_DOORBELL. A queue disabled mid-job loses the
// job, as the spec allows.
//
// Built with TLSACCEL_MODEL_FAULTS defined (the Verilator test bench, fpga/model, and the
// formal check; never a synthesized design), the engine has a test-bench hold: while
// `model_hold` is set, a fetched descriptor waits in S_EXEC, before it completes or goes to
// the record engine (no DMA to its buffers, no completion), and `model_held` says one does.
// That is the reference model's STALL (docs/device-spec.md §9): the engine stays inside the
// queue (q_busy), and a job whose queue was disabled meanwhile is dropped when the hold
// lifts. Without the define the hold is a constant 0 and costs nothing.

`default_nettype none

module tlsaccel_queue_engine #(
    parameter integer NUM_QUEUES = 8,
    // Clock cycles per microsecond, for the coalescing timer.
    parameter integer CYCLES_PER_US = 250
) (
    input  wire                      clk,
    input  wire                      rst,

    input  wire [NUM_QUEUES-1:0]     q_enabled,
    input  wire [64*NUM_QUEUES-1:0]  q_sq_base,
    input  wire [64*NUM_QUEUES-1:0]  q_cq_base,
    input  wire [32*NUM_QUEUES-1:0]  q_size,
    input  wire [32*NUM_QUEUES-1:0]  q_sq_tail,
    input  wire [32*NUM_QUEUES-1:0]  q_cq_head,
    input  wire [NUM_QUEUES-1:0]     q_irq_enable,
    input  wire [32*NUM_QUEUES-1:0]  q_coalesce_count,
    input  wire [32*NUM_QUEUES-1:0]  q_coalesce_usecs,
    output reg  [NUM_QUEUES-1:0]     irq,
    output wire [32*NUM_QUEUES-1:0]  q_sq_head,
    output wire [32*NUM_QUEUES-1:0]  q_cq_tail,
    output reg  [NUM_QUEUES-1:0]     q_fail,
    // The queue whose job is in progress: it still reads or writes that queue's rings.
    output wire [NUM_QUEUES-1:0]     q_busy,
    output reg  [32*NUM_QUEUES-1:0]  q_fail_code,

    // AXI4 master, 64-bit data, to host memory
    output reg  [63:0]               m_araddr,
    output wire [7:0]                m_arlen,
    output wire [2:0]                m_arsize,
    output wire [1:0]                m_arburst,
    output reg                       m_arvalid,
    input  wire                      m_arready,
    input  wire [63:0]               m_rdata,
    input  wire [1:0]                m_rresp,
    input  wire                      m_rlast,
    input  wire                      m_rvalid,
    output reg                       m_rready,
    output reg  [63:0]               m_awaddr,
    output wire [7:0]                m_awlen,
    output wire [2:0]                m_awsize,
    output wire [1:0]                m_awburst,
    output reg                       m_awvalid,
    input  wire                      m_awready,
    output reg  [63:0]               m_wdata,
    output wire [7:0]                m_wstrb,
    output reg                       m_wlast,
    output reg                       m_wvalid,
    input  wire                      m_wready,
    input  wire [1:0]                m_bresp,
    input  wire                      m_bvalid,
    output reg                       m_bready,

    // Record engine
    output reg                       e_cmd_valid,
    input  wire                      e_cmd_ready,
    output wire [511:0]              e_cmd_desc,
    input  wire                      e_done,
    input  wire [15:0]               e_status,
    input  wire [31:0]               e_len,
    input  wire [7:0]                e_info,
    input  wire                      e_sequence_advanced,
    input  wire                      e_rejected,

`ifdef TLSACCEL_MODEL_FAULTS
    // Test bench only (see the top of the file).
    input  wire                      model_hold,
    output wire                      model_held,
`endif

    // Counters
    output reg  [63:0]               jobs_ok,
    output reg  [63:0]               jobs_failed,
    output reg  [63:0]               rejected,
    output reg  [63:0]               descriptors_fetched,
    output reg  [63:0]               interrupts,
    output wire                      idle
);
    /* verilator lint_off UNUSEDPARAM */
    `include "tlsaccel_regs.vh"
    /* verilator lint_on UNUSEDPARAM */

    localparam integer QB = $clog2(NUM_QUEUES);

    localparam [3:0] S_IDLE = 4'd0, S_AR = 4'd1, S_R = 4'd2, S_EXEC = 4'd3, S_AW = 4'd4,
                     S_W0 = 4'd5, S_W1 = 4'd6, S_B = 4'd7, S_ENGINE = 4'd8;

    assign m_arlen = 8'd7;          // 8 beats of 8 bytes: one descriptor
    assign m_arsize = 3'd3;
    assign m_arburst = 2'b01;       // INCR
    assign m_awlen = 8'd1;          // 2 beats: one completion
    assign m_awsize = 3'd3;
    assign m_awburst = 2'b01;
    assign m_wstrb = 8'hff;

    reg [3:0]    state;
    reg [QB-1:0] cur;
    reg [31:0]   sq_head [0:NUM_QUEUES-1];
    reg [31:0]   cq_tail [0:NUM_QUEUES-1];
    reg          phase   [0:NUM_QUEUES-1];
    reg [63:0]   desc    [0:7];
    reg [2:0]    beat;
    reg          fault;
    reg [63:0]   completion_hi;
    reg          refused;        // the job was refused at validation (counted as rejected)
    reg [15:0]   pending [0:NUM_QUEUES-1];   // completions posted since the last interrupt
    reg [31:0]   waited  [0:NUM_QUEUES-1];   // microseconds since the first of them
    // A microsecond tick shared by the coalescing timers (no multiplier per queue).
    reg [$clog2(CYCLES_PER_US)-1:0] prescale;
    wire         us_tick = prescale == CYCLES_PER_US[$clog2(CYCLES_PER_US)-1:0] - 1'b1;

    assign idle = state == S_IDLE;

    // The test-bench hold of a fetched descriptor (a ring read error is not a job: the queue
    // stops at once).
`ifdef TLSACCEL_MODEL_FAULTS
    wire hold = model_hold && !fault;
    assign model_held = state == S_EXEC && hold;
`else
    wire hold = 1'b0;
`endif
    assign q_busy = idle ? {NUM_QUEUES{1'b0}} : {{(NUM_QUEUES-1){1'b0}}, 1'b1} << cur;

    genvar g;
    generate
        for (g = 0; g < NUM_QUEUES; g = g + 1) begin : positions
            assign q_sq_head[32*g +: 32] = sq_head[g];
            assign q_cq_tail[32*g +: 32] = cq_tail[g];
        end
    endgenerate

    // The current queue's configuration.
    wire [63:0] sq_base = q_sq_base[64*cur +: 64];
    wire [63:0] cq_base = q_cq_base[64*cur +: 64];
    wire [31:0] size    = q_size[32*cur +: 32];
    wire [31:0] mask    = size - 32'd1;
    wire [31:0] tail    = q_sq_tail[32*cur +: 32];
    wire [31:0] head    = q_cq_head[32*cur +: 32];
    wire        work    = q_enabled[cur] && tail != sq_head[cur];
    wire        cq_full = ((cq_tail[cur] + 32'd1) & mask) == head;
    wire        bad_doorbell = tail >= size;

    // Descriptor fields (little-endian words of the 64 bytes).
    wire [7:0]  opcode   = desc[0][7:0];
    wire [7:0]  flags    = desc[0][15:8];
    wire [15:0] reserved = desc[0][31:16];
    wire        known    = opcode == TLSA_OP_KEY_LOAD || opcode == TLSA_OP_KEY_DESTROY
                        || opcode == TLSA_OP_AEAD_SEAL || opcode == TLSA_OP_AEAD_OPEN
                        || opcode == TLSA_OP_TLS13_SEAL || opcode == TLSA_OP_TLS13_OPEN
                        || opcode == TLSA_OP_TLS12_SEAL || opcode == TLSA_OP_TLS12_OPEN
                        || opcode == TLSA_OP_PKE_KEY_LOAD || opcode == TLSA_OP_ECDSA_SIGN
                        || opcode == TLSA_OP_RSA_SIGN || opcode == TLSA_OP_KX_GENERATE
                        || opcode == TLSA_OP_KX_DERIVE;
    wire        for_engine = opcode == TLSA_OP_KEY_LOAD || opcode == TLSA_OP_KEY_DESTROY
                          || opcode == TLSA_OP_AEAD_SEAL || opcode == TLSA_OP_AEAD_OPEN
                          || opcode == TLSA_OP_TLS13_SEAL || opcode == TLSA_OP_TLS13_OPEN;
    // Validation in the spec's order (§5): flags and reserved fields, then the opcode; the
    // record engine checks the rest of its jobs.
    wire        malformed = flags != 8'd0 || reserved != 16'd0;
    wire [15:0] status = malformed ? TLSA_ST_BAD_DESCRIPTOR
                       : opcode == TLSA_OP_NOP ? TLSA_ST_OK
                       : known ? TLSA_ST_UNSUPPORTED
                       : TLSA_ST_BAD_OPCODE;
    assign e_cmd_desc = {desc[7], desc[6], desc[5], desc[4], desc[3], desc[2], desc[1], desc[0]};

    // A completion lands this cycle (for queue `cur`).
    wire posted = state == S_B && m_bvalid && m_bresp == 2'b00;

    // Which queues are due an interrupt, and the one raised this cycle (the lowest).
    reg [NUM_QUEUES-1:0] due;
    reg [NUM_QUEUES-1:0] raise;
    integer d;
    always @(*) begin
        for (d = 0; d < NUM_QUEUES; d = d + 1) begin
            due[d] = q_enabled[d] && q_irq_enable[d] && pending[d] != 16'd0
                && ({16'd0, pending[d]} >= q_coalesce_count[32*d +: 32]
                    || q_coalesce_usecs[32*d +: 32] == 32'd0
                    || waited[d] >= q_coalesce_usecs[32*d +: 32]);
        end
        raise = due & (~due + {{(NUM_QUEUES-1){1'b0}}, 1'b1});
    end

    integer q;
    always @(posedge clk) begin
        q_fail <= {NUM_QUEUES{1'b0}};
        irq <= raise;
        prescale <= us_tick || rst ? {$clog2(CYCLES_PER_US){1'b0}} : prescale + 1'b1;
        if (raise != {NUM_QUEUES{1'b0}}) interrupts <= interrupts + 64'd1;
        for (q = 0; q < NUM_QUEUES; q = q + 1) begin
            if (!q_enabled[q] || !q_irq_enable[q]) begin
                pending[q] <= 16'd0;
                waited[q] <= 32'd0;
            end else if (raise[q]) begin
                pending[q] <= (posted && cur == q[QB-1:0]) ? 16'd1 : 16'd0;
                waited[q] <= 32'd0;
            end else begin
                if (posted && cur == q[QB-1:0] && pending[q] != 16'hffff)
                    pending[q] <= pending[q] + 16'd1;
                waited[q] <= pending[q] == 16'd0 ? 32'd0
                           : us_tick && waited[q] != 32'hffff_ffff ? waited[q] + 32'd1
                           : waited[q];
            end
        end
        if (rst) begin
            state <= S_IDLE;
            cur <= {QB{1'b0}};
            m_arvalid <= 1'b0;
            m_rready <= 1'b0;
            m_awvalid <= 1'b0;
            m_wvalid <= 1'b0;
            m_wlast <= 1'b0;
            m_bready <= 1'b0;
            m_araddr <= 64'd0;
            m_awaddr <= 64'd0;
            m_wdata <= 64'd0;
            beat <= 3'd0;
            fault <= 1'b0;
            completion_hi <= 64'd0;
            refused <= 1'b0;
            e_cmd_valid <= 1'b0;
            q_fail_code <= {32*NUM_QUEUES{1'b0}};
            jobs_ok <= 64'd0;
            jobs_failed <= 64'd0;
            interrupts <= 64'd0;
            irq <= {NUM_QUEUES{1'b0}};
            rejected <= 64'd0;
            descriptors_fetched <= 64'd0;
            for (q = 0; q < NUM_QUEUES; q = q + 1) begin
                sq_head[q] <= 32'd0;
                cq_tail[q] <= 32'd0;
                phase[q] <= 1'b1;
                pending[q] <= 16'd0;
                waited[q] <= 32'd0;
            end
        end else begin
            // A disabled queue starts afresh when enabled again (§3.1).
            for (q = 0; q < NUM_QUEUES; q = q + 1) begin
                if (!q_enabled[q] && !(state != S_IDLE && cur == q[QB-1:0])) begin
                    sq_head[q] <= 32'd0;
                    cq_tail[q] <= 32'd0;
                    phase[q] <= 1'b1;
                end
            end
            case (state)
                S_IDLE: begin
                    if (work && bad_doorbell) begin
                        q_fail[cur] <= 1'b1;
                        q_fail_code[32*cur +: 32] <= TLSA_QERR_BAD_DOORBELL;
                        cur <= cur + 1'b1;
                    end else if (work && !cq_full) begin
                        m_araddr <= sq_base + {26'd0, sq_head[cur], 6'd0};
                        m_arvalid <= 1'b1;
                        fault <= 1'b0;
                        beat <= 3'd0;
                        state <= S_AR;
                    end else begin
                        cur <= cur + 1'b1;
                    end
                end
                S_AR: if (m_arready) begin
                    m_arvalid <= 1'b0;
                    m_rready <= 1'b1;
                    state <= S_R;
                end
                S_R: if (m_rvalid) begin
                    desc[beat] <= m_rdata;
                    beat <= beat + 3'd1;
                    if (m_rresp != 2'b00) fault <= 1'b1;
                    if (m_rlast) begin
                        m_rready <= 1'b0;
                        state <= S_EXEC;
                    end
                end
                S_EXEC: begin
                    if (fault) begin
                        q_fail[cur] <= 1'b1;
                        q_fail_code[32*cur +: 32] <= TLSA_QERR_RING_NOT_MAPPED;
                        state <= S_IDLE;
                        cur <= cur + 1'b1;
                    end else if (hold) begin
                        // Held (test bench only): still inside the queue, even once it is
                        // disabled; the checks below run when the hold lifts.
                    end else if (!q_enabled[cur]) begin
                        state <= S_IDLE;
                        cur <= cur + 1'b1;
                    end else if (for_engine && !malformed) begin
                        descriptors_fetched <= descriptors_fetched + 64'd1;
                        e_cmd_valid <= 1'b1;
                        state <= S_ENGINE;
                    end else begin
                        descriptors_fetched <= descriptors_fetched + 64'd1;
                        // result_len 0 | status | info 0 | flags (PHASE)
                        completion_hi <= {7'd0, phase[cur], 8'd0, status, 32'd0};
                        refused <= status != TLSA_ST_OK;
                        m_awaddr <= cq_base + {28'd0, cq_tail[cur], 4'd0};
                        m_awvalid <= 1'b1;
                        state <= S_AW;
                    end
                end
                // The engine runs the job; a queue disabled meanwhile loses its completion.
                S_ENGINE: begin
                    if (e_cmd_valid && e_cmd_ready) e_cmd_valid <= 1'b0;
                    if (e_done) begin
                        completion_hi <= {6'd0, e_sequence_advanced, phase[cur], e_info,
                                          e_status, e_len};
                        refused <= e_rejected;
                        if (q_enabled[cur]) begin
                            m_awaddr <= cq_base + {28'd0, cq_tail[cur], 4'd0};
                            m_awvalid <= 1'b1;
                            state <= S_AW;
                        end else begin
                            state <= S_IDLE;
                            cur <= cur + 1'b1;
                        end
                    end
                end
                S_AW: if (m_awready) begin
                    m_awvalid <= 1'b0;
                    m_wdata <= desc[1];     // the cookie
                    m_wlast <= 1'b0;
                    m_wvalid <= 1'b1;
                    state <= S_W0;
                end
                S_W0: if (m_wready) begin
                    m_wdata <= completion_hi;
                    m_wlast <= 1'b1;
                    state <= S_W1;
                end
                S_W1: if (m_wready) begin
                    m_wvalid <= 1'b0;
                    m_wlast <= 1'b0;
                    m_bready <= 1'b1;
                    state <= S_B;
                end
                S_B: if (m_bvalid) begin
                    m_bready <= 1'b0;
                    if (m_bresp != 2'b00) begin
                        q_fail[cur] <= 1'b1;
                        q_fail_code[32*cur +: 32] <= TLSA_QERR_RING_NOT_MAPPED;
                    end else begin
                        sq_head[cur] <= (sq_head[cur] + 32'd1) & mask;
                        cq_tail[cur] <= (cq_tail[cur] + 32'd1) & mask;
                        if (((cq_tail[cur] + 32'd1) & mask) == 32'd0) phase[cur] <= !phase[cur];
                        if (completion_hi[47:32] == TLSA_ST_OK) begin
                            jobs_ok <= jobs_ok + 64'd1;
                        end else begin
                            jobs_failed <= jobs_failed + 64'd1;
                            if (refused) rejected <= rejected + 64'd1;
                        end
                    end
                    state <= S_IDLE;
                    cur <= cur + 1'b1;
                end
                default: state <= S_IDLE;
            endcase
        end
    end

    wire unused_ok = &{1'b0, m_rresp[0], m_bresp[0], head[31:0]};

`ifdef FORMAL
    // Ring and phase invariants, proved by fpga/formal/run (yosys-smtbmc) for every bus,
    // doorbell and engine behaviour within the bound: the bus, the doorbells, the record
    // engine and the test-bench hold (fpga/formal/run builds with it) are free inputs. The
    // host keeps each ring's size fixed (a power of two, 2-8 here), its CQ head inside the
    // ring and, as the register block does, the ring bases while the queue is enabled;
    // everything else is unconstrained.
    //
    // A shadow count of completions posted per queue, modulo twice the ring size: the
    // device's SQ head and CQ tail must be that count modulo the size, and the CQ phase 1
    // on even laps and 0 on odd ones (§3.4), so a host polling by phase never takes a stale
    // entry for a new one.
    reg [4:0] f_posted [0:NUM_QUEUES-1];
    reg       f_past_valid = 1'b0;
    integer f;
    always @(*) if (!f_past_valid) assume (rst);
    always @(posedge clk) begin
        f_past_valid <= 1'b1;
        for (f = 0; f < NUM_QUEUES; f = f + 1) begin
            assume (q_size[32*f +: 32] == 32'd2 || q_size[32*f +: 32] == 32'd4
                    || q_size[32*f +: 32] == 32'd8);
            assume (q_cq_head[32*f +: 32] < q_size[32*f +: 32]);
            // Interrupts are outside these properties (and their timer's multiply is what
            // slows the solver most).
            assume (!q_irq_enable[f]);
            if (f_past_valid) assume ($stable(q_size[32*f +: 32]));
            // The register block enables a queue only once the engine has let go of it
            // (§3.1), and keeps its ring bases while it is enabled or still busy (§2.4).
            if (f_past_valid && q_enabled[f] && !$past(q_enabled[f])) assume (!$past(q_busy[f]));
            if (f_past_valid && (q_enabled[f] || $past(q_busy[f]))
                && ($past(q_enabled[f]) || $past(q_busy[f]))) begin
                assume ($stable(q_sq_base[64*f +: 64]));
                assume ($stable(q_cq_base[64*f +: 64]));
            end
        end
    end
    always @(posedge clk) begin
        for (f = 0; f < NUM_QUEUES; f = f + 1) begin
            if (rst || !q_enabled[f]) begin
                f_posted[f] <= 5'd0;
            end else begin
                if (posted && cur == f[QB-1:0])
                    f_posted[f] <= (f_posted[f] + 5'd1) & (2 * q_size[32*f +: 5] - 5'd1);
            end
        end
        if (f_past_valid && !rst) begin
            for (f = 0; f < NUM_QUEUES; f = f + 1) begin
                if (q_enabled[f] && !(state != S_IDLE && cur == f[QB-1:0])) begin
                    // Positions stay inside the ring.
                    assert (sq_head[f] < q_size[32*f +: 32]);
                    assert (cq_tail[f] < q_size[32*f +: 32]);
                    // The CQ tail and phase follow the completions posted.
                    assert (cq_tail[f][4:0] == (f_posted[f] & (q_size[32*f +: 5] - 5'd1)));
                    assert (sq_head[f][4:0] == (f_posted[f] & (q_size[32*f +: 5] - 5'd1)));
                    assert (phase[f] == ((f_posted[f] & q_size[32*f +: 5]) == 5'd0));
                end
            end
            // A descriptor is fetched only from a queue with work and a free CQ entry.
            if (state == S_AR && !$past(state == S_AR)) begin
                assert ($past(work) && !$past(cq_full));
            end
            // A completion is written only to the entry at the CQ tail, which the host has
            // not been given yet, and only once per fetched descriptor.
            if (state == S_AW && m_awvalid)
                assert (m_awaddr == cq_base + {28'd0, cq_tail[cur], 4'd0});
            // A completion write starts only for a queue still enabled: a job of a queue
            // disabled meanwhile (held, or in the record engine) is dropped (§3.1).
            if (state == S_AW && $past(state) != S_AW) assert ($past(q_enabled[cur]));
`ifdef TLSACCEL_MODEL_FAULTS
            // The test-bench hold is free here: a held job makes no access to host memory.
            if (model_held) assert (!m_arvalid && !m_rready && !m_awvalid && !m_wvalid);
`endif
        end
    end
`endif
endmodule

`default_nettype wire
