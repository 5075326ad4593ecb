// tlsaccel device top: the BAR0 register block and the queue engine, between a PCIe DMA
// shell's AXI4-Lite master (BAR0) and AXI4 slave (host memory). fpga/README.md shows how
// it sits in a shell; the record engine joins here next.

`default_nettype none

module tlsaccel_top #(
    parameter integer NUM_QUEUES = 8,
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

    input  wire        fatal,
    input  wire [31:0] fatal_code,
    // One-cycle pulse per interrupt message, vector = queue (for the shell's MSI-X)
    output wire [NUM_QUEUES-1:0] irq,
    output wire        idle
);
    wire [64*NUM_QUEUES-1:0] q_sq_base, q_cq_base;
    wire [32*NUM_QUEUES-1:0] q_size, q_coalesce_count, q_coalesce_usecs, q_sq_tail, q_cq_head;
    wire [32*NUM_QUEUES-1:0] q_sq_head, q_cq_tail, q_fail_code;
    wire [NUM_QUEUES-1:0]    q_enabled, q_irq_enable, q_public_key, q_fail;
    wire [NUM_QUEUES-1:0]    q_sq_doorbell, q_cq_doorbell;
    wire                     device_running;
    wire [63:0]              jobs_ok, jobs_failed, rejected, descriptors_fetched, interrupts;

    // Counter block, in register order (tlsaccel_regs.vh TLSA_COUNTER_*): jobs_ok,
    // jobs_failed, bytes_in, bytes_out, auth_failures, dma_faults, rejected, interrupts,
    // key_slots_loaded, records_sealed, records_opened, descriptors_fetched, signatures,
    // key_exchanges.
    wire [64*14-1:0] counters = {
        64'd0, 64'd0, descriptors_fetched, 64'd0, 64'd0, 64'd0, interrupts, rejected,
        64'd0, 64'd0, 64'd0, 64'd0, jobs_failed, jobs_ok
    };

    tlsaccel_csr #(
        .NUM_QUEUES(NUM_QUEUES),
        .HEARTBEAT_CYCLES(HEARTBEAT_CYCLES)
    ) csr (
        .clk(clk), .rst(rst),
        .s_awaddr(s_awaddr), .s_awvalid(s_awvalid), .s_awready(s_awready),
        .s_wdata(s_wdata), .s_wstrb(s_wstrb), .s_wvalid(s_wvalid), .s_wready(s_wready),
        .s_bresp(s_bresp), .s_bvalid(s_bvalid), .s_bready(s_bready),
        .s_araddr(s_araddr), .s_arvalid(s_arvalid), .s_arready(s_arready),
        .s_rdata(s_rdata), .s_rresp(s_rresp), .s_rvalid(s_rvalid), .s_rready(s_rready),
        .device_running(device_running), .fatal(fatal), .fatal_code(fatal_code),
        .counters(counters),
        .q_sq_base(q_sq_base), .q_cq_base(q_cq_base), .q_size(q_size),
        .q_enabled(q_enabled), .q_irq_enable(q_irq_enable), .q_public_key(q_public_key),
        .q_coalesce_count(q_coalesce_count), .q_coalesce_usecs(q_coalesce_usecs),
        .q_sq_tail(q_sq_tail), .q_cq_head(q_cq_head),
        .q_sq_doorbell(q_sq_doorbell), .q_cq_doorbell(q_cq_doorbell),
        .q_sq_head(q_sq_head), .q_cq_tail(q_cq_tail),
        .q_fail(q_fail), .q_fail_code(q_fail_code)
    );

    tlsaccel_queue_engine #(.NUM_QUEUES(NUM_QUEUES)) queues (
        .clk(clk), .rst(rst),
        .q_enabled(q_enabled), .q_sq_base(q_sq_base), .q_cq_base(q_cq_base),
        .q_size(q_size), .q_sq_tail(q_sq_tail), .q_cq_head(q_cq_head),
        .q_irq_enable(q_irq_enable), .q_coalesce_count(q_coalesce_count),
        .q_coalesce_usecs(q_coalesce_usecs), .irq(irq),
        .q_sq_head(q_sq_head), .q_cq_tail(q_cq_tail),
        .q_fail(q_fail), .q_fail_code(q_fail_code),
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
        .descriptors_fetched(descriptors_fetched), .interrupts(interrupts), .idle(idle)
    );

    // The public-key flag belongs to the public-key engines (simulator-only); doorbell
    // pulses are not needed while the engine compares positions itself.
    wire unused_ok = &{1'b0, q_public_key, q_sq_doorbell, q_cq_doorbell, device_running};
endmodule

`default_nettype wire
