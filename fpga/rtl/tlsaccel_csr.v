// tlsaccel BAR0 register file: an AXI4-Lite slave implementing the global page, the queue
// configuration blocks and the doorbell pages of docs/device-spec.md (§2, §3). Offsets,
// bits and codes come from tlsaccel_regs.vh, generated from tlsaccel-abi.
//
// What it does on its own: identity and size registers; DEVICE_CONTROL with reset and
// enable (DEVICE_STATUS READY / RUNNING); a heartbeat; the 64-bit counter block (inputs from
// the engines); per-queue ring configuration with the enable-time checks of §3.1 (size a
// power of two in range, bases RING_ALIGN-aligned: else Q_STATUS.ERROR with BAD_CONFIG);
// doorbells captured per queue. The queue engine (fetch, completion, interrupts) reads the
// configuration from the q_* outputs and reports SQ_HEAD / CQ_TAIL back.
//
// Verilog-2001; one clock, synchronous active-high reset. 32-bit data; a 64-bit register is
// written low half then high half, as the spec allows.

`default_nettype none

module tlsaccel_csr #(
    parameter integer NUM_QUEUES = 8,
    parameter integer NUM_KEY_SLOTS = 1024,
    parameter integer MAX_DATA = 66048,
    // What this build can do: NOP, AES_128_GCM, AES_256_GCM, RAW_AEAD, TLS13_RECORD and
    // INTERRUPT_COALESCING (ChaCha20-Poly1305, TLS 1.2 records and the public-key engines
    // are simulator-only; device-spec §2.2).
    parameter [31:0] CAPABILITIES = 32'h000000b7,
    // Clock cycles per heartbeat tick (1 ms at 250 MHz).
    parameter integer HEARTBEAT_CYCLES = 250000
) (
    input  wire                          clk,
    input  wire                          rst,

    // AXI4-Lite slave
    input  wire [31:0]          s_awaddr,
    input  wire                          s_awvalid,
    output reg                           s_awready,
    input  wire [31:0]                   s_wdata,
    input  wire [3:0]                    s_wstrb,
    input  wire                          s_wvalid,
    output reg                           s_wready,
    output reg  [1:0]                    s_bresp,
    output reg                           s_bvalid,
    input  wire                          s_bready,
    input  wire [31:0]          s_araddr,
    input  wire                          s_arvalid,
    output reg                           s_arready,
    output reg  [31:0]                   s_rdata,
    output reg  [1:0]                    s_rresp,
    output reg                           s_rvalid,
    input  wire                          s_rready,

    // Device state
    output wire                          device_running,
    // The reset input or a RESET written to DEVICE_CONTROL: resets the engines (their
    // counters, jobs in flight and the key table) and the shell's DMA interconnect.
    output wire                          soft_reset,
    input  wire                          fatal,
    input  wire [31:0]                   fatal_code,
    // Counters from the engines, TLSA_NUM_COUNTERS x 64 bits, counter i at [64i +: 64]
    input  wire [64*14-1:0]              counters,

    // Per-queue configuration, queue q at [64q +: 64] / [32q +: 32] / [q]
    output wire [64*NUM_QUEUES-1:0]      q_sq_base,
    output wire [64*NUM_QUEUES-1:0]      q_cq_base,
    output wire [32*NUM_QUEUES-1:0]      q_size,
    output wire [NUM_QUEUES-1:0]         q_enabled,
    output wire [NUM_QUEUES-1:0]         q_irq_enable,
    output wire [NUM_QUEUES-1:0]         q_public_key,
    output wire [32*NUM_QUEUES-1:0]      q_coalesce_count,
    output wire [32*NUM_QUEUES-1:0]      q_coalesce_usecs,
    // Doorbells as last written
    output wire [32*NUM_QUEUES-1:0]      q_sq_tail,
    output wire [32*NUM_QUEUES-1:0]      q_cq_head,
    // One-cycle pulse per doorbell write
    output reg  [NUM_QUEUES-1:0]         q_sq_doorbell,
    output reg  [NUM_QUEUES-1:0]         q_cq_doorbell,
    // Positions reported by the queue engine
    input  wire [32*NUM_QUEUES-1:0]      q_sq_head,
    input  wire [32*NUM_QUEUES-1:0]      q_cq_tail,
    // The queue engine stopped a queue (e.g. RING_NOT_MAPPED)
    input  wire [NUM_QUEUES-1:0]         q_fail,
    input  wire [32*NUM_QUEUES-1:0]      q_fail_code,
    // The queue engine still accesses these queues' rings (a job it had started).
    input  wire [NUM_QUEUES-1:0]         q_busy
);
    // The shared constants: not every module uses every one.
    /* verilator lint_off UNUSEDPARAM */
    `include "tlsaccel_regs.vh"
    /* verilator lint_on UNUSEDPARAM */

    localparam integer NUM_COUNTERS = 14;
    // Bits of a queue index (NUM_QUEUES: a power of two, at least 2).
    localparam integer QB = $clog2(NUM_QUEUES);
    localparam [31:0] QUEUE_AREA = NUM_QUEUES * TLSA_QUEUE_REGS_STRIDE;
    localparam [31:0] DOORBELL_AREA = NUM_QUEUES * TLSA_DOORBELL_STRIDE;
    localparam [31:0] COUNTER_AREA = 8 * NUM_COUNTERS;

    // ---- state ----------------------------------------------------------------------
    reg        enable;
    reg [2:0]  reset_busy;      // cycles of reset left: READY is clear meanwhile
    reg [31:0] heartbeat;
    reg [31:0] heartbeat_div;

    reg [63:0] sq_base   [0:NUM_QUEUES-1];
    reg [63:0] cq_base   [0:NUM_QUEUES-1];
    reg [31:0] size      [0:NUM_QUEUES-1];
    reg [31:0] control   [0:NUM_QUEUES-1];
    reg        enabled   [0:NUM_QUEUES-1];
    reg        error     [0:NUM_QUEUES-1];
    reg [31:0] error_code[0:NUM_QUEUES-1];
    reg [31:0] ccount    [0:NUM_QUEUES-1];
    reg [31:0] cusecs    [0:NUM_QUEUES-1];
    reg [31:0] sq_tail   [0:NUM_QUEUES-1];
    reg [31:0] cq_head   [0:NUM_QUEUES-1];

    assign device_running = enable && !fatal && reset_busy == 0;

    genvar g;
    generate
        for (g = 0; g < NUM_QUEUES; g = g + 1) begin : outputs
            assign q_sq_base[64*g +: 64]        = sq_base[g];
            assign q_cq_base[64*g +: 64]        = cq_base[g];
            assign q_size[32*g +: 32]           = size[g];
            assign q_enabled[g]                 = enabled[g] && device_running;
            assign q_irq_enable[g]              = (control[g] & TLSA_Q_CONTROL_IRQ_ENABLE) != 0;
            assign q_public_key[g]              = (control[g] & TLSA_Q_CONTROL_PUBLIC_KEY) != 0;
            assign q_coalesce_count[32*g +: 32] = ccount[g];
            assign q_coalesce_usecs[32*g +: 32] = cusecs[g];
            assign q_sq_tail[32*g +: 32]        = sq_tail[g];
            assign q_cq_head[32*g +: 32]        = cq_head[g];
        end
    endgenerate

    // A ring configuration the device accepts at enable (§3.1).
    function ring_ok;
        input [31:0] entries;
        input [11:0] sq_low;   // ring bases must be RING_ALIGN (4 KiB) aligned
        input [11:0] cq_low;
        begin
            ring_ok = entries >= TLSA_MIN_QUEUE_ENTRIES
                   && entries <= TLSA_MAX_QUEUE_ENTRIES
                   && (entries & (entries - 1)) == 0
                   && sq_low == 12'd0
                   && cq_low == 12'd0;
        end
    endfunction

    // ---- address decoding -------------------------------------------------------------
    // Queue blocks: [QUEUE_REGS_BASE, QUEUE_REGS_BASE + MAX_QUEUES * STRIDE)
    function integer queue_of_block;
        input [31:0] address;
        begin
            queue_of_block = (address - TLSA_QUEUE_REGS_BASE) >> 7;
        end
    endfunction
    function integer queue_of_doorbell;
        input [31:0] address;
        begin
            queue_of_doorbell = (address - TLSA_DOORBELL_BASE) >> 12;
        end
    endfunction
    function in_queue_block;
        input [31:0] address;
        begin
            in_queue_block = address >= TLSA_QUEUE_REGS_BASE
                && address < TLSA_QUEUE_REGS_BASE + QUEUE_AREA;
        end
    endfunction
    function in_doorbell;
        input [31:0] address;
        begin
            in_doorbell = address >= TLSA_DOORBELL_BASE
                && address < TLSA_DOORBELL_BASE + DOORBELL_AREA;
        end
    endfunction

    // ---- write channel ----------------------------------------------------------------
    reg [31:0] waddr;
    reg                 have_aw;
    reg [31:0]          wdata;
    reg                 have_w;

    integer q;
    // The reset input, or a RESET written to DEVICE_CONTROL this cycle: every queue's
    // configuration goes.
    wire clear_queues = rst || (have_aw && have_w && !s_bvalid
        && waddr == TLSA_REG_DEVICE_CONTROL && (wdata & TLSA_DEVICE_CONTROL_RESET) != 0);
    // Which queue and register a write names (high bits beyond the queue count unused).
    /* verilator lint_off UNUSEDSIGNAL */
    wire [31:0] wq_block = (waddr - TLSA_QUEUE_REGS_BASE) >> 7;
    wire [31:0] wq_bell = (waddr - TLSA_DOORBELL_BASE) >> 12;
    /* verilator lint_on UNUSEDSIGNAL */
    wire [31:0] woff = {25'd0, waddr[6:0]};
    wire        in_use = enabled[wq_block[QB-1:0]] || q_busy[wq_block[QB-1:0]];
    assign soft_reset = clear_queues;

    always @(posedge clk) begin
        q_sq_doorbell <= {NUM_QUEUES{1'b0}};
        q_cq_doorbell <= {NUM_QUEUES{1'b0}};
        if (heartbeat_div + 1 >= HEARTBEAT_CYCLES) begin
            heartbeat_div <= 0;
            heartbeat <= heartbeat + 1;
        end else begin
            heartbeat_div <= heartbeat_div + 1;
        end
        if (reset_busy != 0) reset_busy <= reset_busy - 1;
        if (rst) begin
            s_awready <= 1'b0;
            s_wready <= 1'b0;
            s_bvalid <= 1'b0;
            s_bresp <= 2'b00;
            have_aw <= 1'b0;
            have_w <= 1'b0;
            enable <= 1'b0;
            reset_busy <= 3'd4;
            heartbeat <= 0;
            heartbeat_div <= 0;
        end else begin
            // Accept address and data independently; respond once both are in.
            s_awready <= !have_aw && !s_awready;
            s_wready <= !have_w && !s_wready;
            if (s_awvalid && s_awready) begin
                waddr <= s_awaddr;
                have_aw <= 1'b1;
                s_awready <= 1'b0;
            end
            if (s_wvalid && s_wready) begin
                wdata <= s_wdata;
                have_w <= 1'b1;
                s_wready <= 1'b0;
            end
            if (s_bvalid && s_bready) s_bvalid <= 1'b0;
            // The queue engine may stop a queue.
            for (q = 0; q < NUM_QUEUES; q = q + 1) begin
                if (q_fail[q] && enabled[q]) begin
                    enabled[q] <= 1'b0;
                    error[q] <= 1'b1;
                    error_code[q] <= q_fail_code[32*q +: 32];
                end
            end
            if (have_aw && have_w && !s_bvalid) begin
                have_aw <= 1'b0;
                have_w <= 1'b0;
                s_bvalid <= 1'b1;
                s_bresp <= 2'b00;
                if (waddr == TLSA_REG_DEVICE_CONTROL) begin
                    if ((wdata & TLSA_DEVICE_CONTROL_RESET) != 0) begin
                        // §8: a reset disables every queue and forgets its configuration
                        // (cleared below, with `clear_queues`).
                        enable <= 1'b0;
                        reset_busy <= 3'd4;
                    end else begin
                        // Not while the engine still finishes a job of a stopped device:
                        // RUNNING stays clear and the host tries again (§8).
                        enable <= (wdata & TLSA_DEVICE_CONTROL_ENABLE) != 0
                               && (enable || q_busy == {NUM_QUEUES{1'b0}});
                    end
                end else if (in_queue_block(waddr)) begin
                    case (woff)
                        // Ring registers hold still while the queue is in use (§2.4).
                        TLSA_Q_SQ_BASE:     if (!in_use) sq_base[wq_block[QB-1:0]][31:0] <= wdata;
                        TLSA_Q_SQ_BASE + 4: if (!in_use) sq_base[wq_block[QB-1:0]][63:32] <= wdata;
                        TLSA_Q_CQ_BASE:     if (!in_use) cq_base[wq_block[QB-1:0]][31:0] <= wdata;
                        TLSA_Q_CQ_BASE + 4: if (!in_use) cq_base[wq_block[QB-1:0]][63:32] <= wdata;
                        TLSA_Q_SIZE:        if (!in_use) size[wq_block[QB-1:0]] <= wdata;
                        TLSA_Q_IRQ_COALESCE_COUNT: ccount[wq_block[QB-1:0]] <= wdata;
                        TLSA_Q_IRQ_COALESCE_USECS: cusecs[wq_block[QB-1:0]] <= wdata;
                        TLSA_Q_CONTROL: begin
                            control[wq_block[QB-1:0]] <= wdata;
                            sq_tail[wq_block[QB-1:0]] <= 0;
                            cq_head[wq_block[QB-1:0]] <= 0;
                            if ((wdata & TLSA_Q_CONTROL_ENABLE) == 0) begin
                                enabled[wq_block[QB-1:0]] <= 1'b0;
                                error[wq_block[QB-1:0]] <= 1'b0;
                                error_code[wq_block[QB-1:0]] <= 0;
                            end else if (!q_busy[wq_block[QB-1:0]]
                                         && ring_ok(size[wq_block[QB-1:0]], sq_base[wq_block[QB-1:0]][11:0], cq_base[wq_block[QB-1:0]][11:0])) begin
                                enabled[wq_block[QB-1:0]] <= 1'b1;
                                error[wq_block[QB-1:0]] <= 1'b0;
                                error_code[wq_block[QB-1:0]] <= 0;
                            end else begin
                                enabled[wq_block[QB-1:0]] <= 1'b0;
                                error[wq_block[QB-1:0]] <= 1'b1;
                                error_code[wq_block[QB-1:0]] <= TLSA_QERR_BAD_CONFIG;
                            end
                        end
                        default: ;
                    endcase
                end else if (in_doorbell(waddr)) begin
                    if ({20'd0, waddr[11:0]} == TLSA_DB_SQ_TAIL) begin
                        sq_tail[wq_bell[QB-1:0]] <= wdata;
                        q_sq_doorbell[wq_bell[QB-1:0]] <= 1'b1;
                    end else if ({20'd0, waddr[11:0]} == TLSA_DB_CQ_HEAD) begin
                        cq_head[wq_bell[QB-1:0]] <= wdata;
                        q_cq_doorbell[wq_bell[QB-1:0]] <= 1'b1;
                    end
                end
                // Writes to read-only or unmapped registers are ignored (OKAY), as on the
                // simulator.
            end
        end
        // Last, so it wins over any other write to these registers in the same cycle.
        if (clear_queues) begin
            for (q = 0; q < NUM_QUEUES; q = q + 1) begin
                sq_base[q] <= 0; cq_base[q] <= 0; size[q] <= 0; control[q] <= 0;
                enabled[q] <= 1'b0; error[q] <= 1'b0; error_code[q] <= 0;
                ccount[q] <= 0; cusecs[q] <= 0; sq_tail[q] <= 0; cq_head[q] <= 0;
            end
        end
    end

    // ---- read channel -----------------------------------------------------------------
    reg [31:0] rvalue;
    integer rq;
    integer ci;
    reg [31:0] roff;

    always @(*) begin
        rvalue = 32'd0;
        rq = 0;
        ci = 0;
        roff = 32'd0;
        if (s_araddr == TLSA_REG_MAGIC) rvalue = TLSA_MAGIC;
        else if (s_araddr == TLSA_REG_VERSION) rvalue = TLSA_VERSION;
        else if (s_araddr == TLSA_REG_CAPABILITIES) rvalue = CAPABILITIES;
        else if (s_araddr == TLSA_REG_NUM_QUEUES) rvalue = NUM_QUEUES;
        else if (s_araddr == TLSA_REG_MAX_QUEUE_ENTRIES) rvalue = TLSA_MAX_QUEUE_ENTRIES;
        else if (s_araddr == TLSA_REG_NUM_KEY_SLOTS) rvalue = NUM_KEY_SLOTS;
        else if (s_araddr == TLSA_REG_MAX_DATA_LEN) rvalue = MAX_DATA;
        else if (s_araddr == TLSA_REG_DOORBELL_STRIDE) rvalue = TLSA_DOORBELL_STRIDE;
        else if (s_araddr == TLSA_REG_DEVICE_CONTROL) rvalue = enable ? TLSA_DEVICE_CONTROL_ENABLE : 32'd0;
        else if (s_araddr == TLSA_REG_DEVICE_STATUS)
            rvalue = (reset_busy == 0 ? TLSA_DEVICE_STATUS_READY : 32'd0)
                   | (device_running ? TLSA_DEVICE_STATUS_RUNNING : 32'd0)
                   | (fatal ? TLSA_DEVICE_STATUS_FATAL : 32'd0);
        else if (s_araddr == TLSA_REG_FATAL_CODE) rvalue = fatal ? fatal_code : 32'd0;
        else if (s_araddr == TLSA_REG_HEARTBEAT) rvalue = heartbeat;
        else if (s_araddr >= TLSA_REG_COUNTERS_BASE
                 && s_araddr < TLSA_REG_COUNTERS_BASE + COUNTER_AREA) begin
            ci = (s_araddr - TLSA_REG_COUNTERS_BASE) >> 3;
            rvalue = s_araddr[2] ? counters[64*ci + 32 +: 32] : counters[64*ci +: 32];
        end else if (in_queue_block(s_araddr)) begin
            rq = queue_of_block(s_araddr);
            roff = {25'd0, s_araddr[6:0]};
            case (roff)
                TLSA_Q_SQ_BASE:      rvalue = sq_base[rq][31:0];
                TLSA_Q_SQ_BASE + 4:  rvalue = sq_base[rq][63:32];
                TLSA_Q_CQ_BASE:      rvalue = cq_base[rq][31:0];
                TLSA_Q_CQ_BASE + 4:  rvalue = cq_base[rq][63:32];
                TLSA_Q_SIZE:         rvalue = size[rq];
                TLSA_Q_CONTROL:      rvalue = control[rq];
                // ENABLED stays set after a disable until the engine has let go of the
                // rings (§3.1): the host waits for it before reusing their memory.
                TLSA_Q_STATUS:       rvalue = (enabled[rq] || q_busy[rq] ? TLSA_Q_STATUS_ENABLED : 32'd0)
                                            | (error[rq] ? TLSA_Q_STATUS_ERROR : 32'd0);
                TLSA_Q_ERROR:        rvalue = error_code[rq];
                TLSA_Q_IRQ_COALESCE_COUNT: rvalue = ccount[rq];
                TLSA_Q_IRQ_COALESCE_USECS: rvalue = cusecs[rq];
                TLSA_Q_SQ_HEAD:      rvalue = q_sq_head[32*rq +: 32];
                TLSA_Q_CQ_TAIL:      rvalue = q_cq_tail[32*rq +: 32];
                default:             rvalue = 32'd0;
            endcase
        end
    end

    always @(posedge clk) begin
        if (rst) begin
            s_arready <= 1'b0;
            s_rvalid <= 1'b0;
            s_rresp <= 2'b00;
            s_rdata <= 32'd0;
        end else begin
            s_arready <= !s_rvalid && !s_arready;
            if (s_arvalid && s_arready) begin
                s_rdata <= rvalue;
                s_rresp <= 2'b00;
                s_rvalid <= 1'b1;
                s_arready <= 1'b0;
            end
            if (s_rvalid && s_rready) s_rvalid <= 1'b0;
        end
    end

    // Unused bits of the write strobe: the registers are written whole.
    wire unused_ok = &{1'b0, s_wstrb};
endmodule

`default_nettype wire
