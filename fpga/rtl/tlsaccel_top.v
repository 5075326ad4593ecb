// tlsaccel device top: the BAR0 register block, the queue engine and the record engine,
// between a PCIe DMA shell's AXI4-Lite master (BAR0) and its AXI4 slave (host memory). The
// queue engine's 64-bit master (descriptors, completions) and the record engine's 128-bit
// master (key blocks, job data) are separate ports; the shell's interconnect joins them
// (fpga/README.md).

`default_nettype none

module tlsaccel_top #(
    parameter integer NUM_QUEUES = 8,
    parameter integer NUM_KEY_SLOTS = 1024,
    parameter integer HEARTBEAT_CYCLES = 250000
) (
    input  wire        clk,
    input  wire        rst,

    // BAR0: AXI4-Lite slave
    input  wire [31:0] s_awaddr,
    input  wire        s_awvalid,
    output wire        s_awready,
    input  wire [31:0] s_wdata,
    input  wire [3:0]  s_wstrb,
    input  wire        s_wvalid,
    output wire        s_wready,
    output wire [1:0]  s_bresp,
    output wire        s_bvalid,
    input  wire        s_bready,
    input  wire [31:0] s_araddr,
    input  wire        s_arvalid,
    output wire        s_arready,
    output wire [31:0] s_rdata,
    output wire [1:0]  s_rresp,
    output wire        s_rvalid,
    input  wire        s_rready,

    // Host memory: AXI4 master, 64-bit
    output wire [63:0] m_araddr,
    output wire [7:0]  m_arlen,
    output wire [2:0]  m_arsize,
    output wire [1:0]  m_arburst,
    output wire        m_arvalid,
    input  wire        m_arready,
    input  wire [63:0] m_rdata,
    input  wire [1:0]  m_rresp,
    input  wire        m_rlast,
    input  wire        m_rvalid,
    output wire        m_rready,
    output wire [63:0] m_awaddr,
    output wire [7:0]  m_awlen,
    output wire [2:0]  m_awsize,
    output wire [1:0]  m_awburst,
    output wire        m_awvalid,
    input  wire        m_awready,
    output wire [63:0] m_wdata,
    output wire [7:0]  m_wstrb,
    output wire        m_wlast,
    output wire        m_wvalid,
    input  wire        m_wready,
    input  wire [1:0]  m_bresp,
    input  wire        m_bvalid,
    output wire        m_bready,

    // Job data: AXI4 master, 128-bit
    output wire [63:0]  e_araddr,
    output wire [7:0]   e_arlen,
    output wire [2:0]   e_arsize,
    output wire [1:0]   e_arburst,
    output wire         e_arvalid,
    input  wire         e_arready,
    input  wire [127:0] e_rdata,
    input  wire [1:0]   e_rresp,
    input  wire         e_rlast,
    input  wire         e_rvalid,
    output wire         e_rready,
    output wire [63:0]  e_awaddr,
    output wire [7:0]   e_awlen,
    output wire [2:0]   e_awsize,
    output wire [1:0]   e_awburst,
    output wire         e_awvalid,
    input  wire         e_awready,
    output wire [127:0] e_wdata,
    output wire [15:0]  e_wstrb,
    output wire         e_wlast,
    output wire         e_wvalid,
    input  wire         e_wready,
    input  wire [1:0]   e_bresp,
    input  wire         e_bvalid,
    output wire         e_bready,

    input  wire        fatal,
    input  wire [31:0] fatal_code,
    // Resets the DMA interconnect with the engines (the reset input, or RESET in
    // DEVICE_CONTROL): a burst cut short by a reset is abandoned on both sides.
    output wire        dma_reset,
    // One-cycle pulse per interrupt message, vector = queue (for the shell's MSI-X)
    output wire [NUM_QUEUES-1:0] irq,
`ifdef TLSACCEL_MODEL_FAULTS
    // Test bench only, never on a card (tlsaccel_queue_engine.v): `model_hold` holds a
    // fetched job before it runs, as the reference model's STALL does; `model_held` says
    // one is held.
    input  wire        model_hold,
    output wire        model_held,
`endif
    output wire        idle
);
    wire [64*NUM_QUEUES-1:0] q_sq_base, q_cq_base;
    wire [32*NUM_QUEUES-1:0] q_size, q_coalesce_count, q_coalesce_usecs, q_sq_tail, q_cq_head;
    wire [32*NUM_QUEUES-1:0] q_sq_head, q_cq_tail, q_fail_code;
    wire [NUM_QUEUES-1:0]    q_enabled, q_irq_enable, q_public_key, q_fail, q_busy;
    wire [NUM_QUEUES-1:0]    q_sq_doorbell, q_cq_doorbell;
    wire                     device_running;
    wire [63:0]              jobs_ok, jobs_failed, rejected, descriptors_fetched, interrupts;
    wire [63:0]              bytes_in, bytes_out, auth_failures, dma_faults, key_slots_loaded;
    wire [63:0]              records_sealed, records_opened;
    wire                     queues_idle, engine_idle, soft_reset;
    assign dma_reset = soft_reset;
    wire                     e_cmd_valid, e_cmd_ready, e_done, e_sequence_advanced, e_rejected;
    wire [511:0]             e_cmd_desc;
    wire [15:0]              e_status;
    wire [31:0]              e_len;
    wire [7:0]               e_info;

    // Counter block, in register order (tlsaccel_regs.vh TLSA_COUNTER_*): jobs_ok,
    // jobs_failed, bytes_in, bytes_out, auth_failures, dma_faults, rejected, interrupts,
    // key_slots_loaded, records_sealed, records_opened, descriptors_fetched, signatures,
    // key_exchanges.
    wire [64*14-1:0] counters = {
        64'd0, 64'd0, descriptors_fetched, records_opened, records_sealed, key_slots_loaded,
        interrupts, rejected, dma_faults, auth_failures, bytes_out, bytes_in, jobs_failed,
        jobs_ok
    };
    assign idle = queues_idle && engine_idle;

    tlsaccel_csr #(
        .NUM_QUEUES(NUM_QUEUES),
        .NUM_KEY_SLOTS(NUM_KEY_SLOTS),
        .HEARTBEAT_CYCLES(HEARTBEAT_CYCLES)
    ) csr (
        .clk(clk), .rst(rst),
        .s_awaddr(s_awaddr), .s_awvalid(s_awvalid), .s_awready(s_awready),
        .s_wdata(s_wdata), .s_wstrb(s_wstrb), .s_wvalid(s_wvalid), .s_wready(s_wready),
        .s_bresp(s_bresp), .s_bvalid(s_bvalid), .s_bready(s_bready),
        .s_araddr(s_araddr), .s_arvalid(s_arvalid), .s_arready(s_arready),
        .s_rdata(s_rdata), .s_rresp(s_rresp), .s_rvalid(s_rvalid), .s_rready(s_rready),
        .device_running(device_running), .soft_reset(soft_reset), .fatal(fatal), .fatal_code(fatal_code),
        .counters(counters),
        .q_sq_base(q_sq_base), .q_cq_base(q_cq_base), .q_size(q_size),
        .q_enabled(q_enabled), .q_irq_enable(q_irq_enable), .q_public_key(q_public_key),
        .q_coalesce_count(q_coalesce_count), .q_coalesce_usecs(q_coalesce_usecs),
        .q_sq_tail(q_sq_tail), .q_cq_head(q_cq_head),
        .q_sq_doorbell(q_sq_doorbell), .q_cq_doorbell(q_cq_doorbell),
        .q_sq_head(q_sq_head), .q_cq_tail(q_cq_tail),
        .q_fail(q_fail), .q_fail_code(q_fail_code), .q_busy(q_busy)
    );

    tlsaccel_queue_engine #(.NUM_QUEUES(NUM_QUEUES)) queues (
        .clk(clk), .rst(soft_reset),
        .q_enabled(q_enabled), .q_sq_base(q_sq_base), .q_cq_base(q_cq_base),
        .q_size(q_size), .q_sq_tail(q_sq_tail), .q_cq_head(q_cq_head),
        .q_irq_enable(q_irq_enable), .q_coalesce_count(q_coalesce_count),
        .q_coalesce_usecs(q_coalesce_usecs), .irq(irq),
        .q_sq_head(q_sq_head), .q_cq_tail(q_cq_tail),
        .q_fail(q_fail), .q_fail_code(q_fail_code), .q_busy(q_busy),
        .m_araddr(m_araddr), .m_arlen(m_arlen), .m_arsize(m_arsize), .m_arburst(m_arburst),
        .m_arvalid(m_arvalid), .m_arready(m_arready),
        .m_rdata(m_rdata), .m_rresp(m_rresp), .m_rlast(m_rlast), .m_rvalid(m_rvalid),
        .m_rready(m_rready),
        .m_awaddr(m_awaddr), .m_awlen(m_awlen), .m_awsize(m_awsize), .m_awburst(m_awburst),
        .m_awvalid(m_awvalid), .m_awready(m_awready),
        .m_wdata(m_wdata), .m_wstrb(m_wstrb), .m_wlast(m_wlast), .m_wvalid(m_wvalid),
        .m_wready(m_wready),
        .m_bresp(m_bresp), .m_bvalid(m_bvalid), .m_bready(m_bready),
        .jobs_ok(jobs_ok), .jobs_failed(jobs_failed), .rejected(rejected),
        .e_cmd_valid(e_cmd_valid), .e_cmd_ready(e_cmd_ready), .e_cmd_desc(e_cmd_desc),
        .e_done(e_done), .e_status(e_status), .e_len(e_len), .e_info(e_info),
        .e_sequence_advanced(e_sequence_advanced), .e_rejected(e_rejected),
        .descriptors_fetched(descriptors_fetched), .interrupts(interrupts),
`ifdef TLSACCEL_MODEL_FAULTS
        .model_hold(model_hold), .model_held(model_held),
`endif
        .idle(queues_idle)
    );

    tlsaccel_record_engine #(.NUM_KEY_SLOTS(NUM_KEY_SLOTS)) records (
        .clk(clk), .rst(soft_reset),
        .cmd_valid(e_cmd_valid), .cmd_ready(e_cmd_ready), .cmd_desc(e_cmd_desc),
        .done(e_done), .done_status(e_status), .done_len(e_len), .done_info(e_info),
        .done_sequence_advanced(e_sequence_advanced), .done_rejected(e_rejected),
        .m_araddr(e_araddr), .m_arlen(e_arlen), .m_arsize(e_arsize), .m_arburst(e_arburst),
        .m_arvalid(e_arvalid), .m_arready(e_arready),
        .m_rdata(e_rdata), .m_rresp(e_rresp), .m_rlast(e_rlast), .m_rvalid(e_rvalid),
        .m_rready(e_rready),
        .m_awaddr(e_awaddr), .m_awlen(e_awlen), .m_awsize(e_awsize), .m_awburst(e_awburst),
        .m_awvalid(e_awvalid), .m_awready(e_awready),
        .m_wdata(e_wdata), .m_wstrb(e_wstrb), .m_wlast(e_wlast), .m_wvalid(e_wvalid),
        .m_wready(e_wready),
        .m_bresp(e_bresp), .m_bvalid(e_bvalid), .m_bready(e_bready),
        .bytes_in(bytes_in), .bytes_out(bytes_out), .auth_failures(auth_failures),
        .dma_faults(dma_faults), .key_slots_loaded(key_slots_loaded),
        .records_sealed(records_sealed), .records_opened(records_opened),
        .idle(engine_idle)
    );

    // The public-key flag belongs to the public-key engines (simulator-only); doorbell
    // pulses are not needed while the engine compares positions itself.
    wire unused_ok = &{1'b0, q_public_key, q_sq_doorbell, q_cq_doorbell, device_running};
endmodule

`default_nettype wire
