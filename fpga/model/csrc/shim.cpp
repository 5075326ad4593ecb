// C interface to the Verilated tlsaccel_csr: one clock per tick, AXI4-Lite transactions
// run to completion (or a cycle limit), side inputs and outputs by queue.
#include <cstdint>
#include <memory>

#include "Vtlsaccel_csr.h"
#include "verilated.h"

namespace {

struct Rtl {
    std::unique_ptr<VerilatedContext> context;
    std::unique_ptr<Vtlsaccel_csr> model;
    uint64_t cycles = 0;
};

constexpr int kLimit = 256;

void tick(Rtl* r) {
    r->model->clk = 0;
    r->model->eval();
    r->context->timeInc(1);
    r->model->clk = 1;
    r->model->eval();
    r->context->timeInc(1);
    r->cycles++;
}

void hold_reset(Rtl* r) {
    r->model->rst = 1;
    tick(r);
    tick(r);
    r->model->rst = 0;
    tick(r);
}

}  // namespace

extern "C" {

void* tlsa_rtl_new() {
    auto* r = new Rtl;
    r->context = std::make_unique<VerilatedContext>();
    r->model = std::make_unique<Vtlsaccel_csr>(r->context.get());
    auto* m = r->model.get();
    m->s_awvalid = 0;
    m->s_wvalid = 0;
    m->s_bready = 0;
    m->s_arvalid = 0;
    m->s_rready = 0;
    m->s_wstrb = 0xf;
    m->fatal = 0;
    m->fatal_code = 0;
    m->q_fail = 0;
    for (int i = 0; i < 28; i++) m->counters[i] = 0;
    for (int i = 0; i < 8; i++) {
        m->q_sq_head[i] = 0;
        m->q_cq_tail[i] = 0;
        m->q_fail_code[i] = 0;
    }
    hold_reset(r);
    return r;
}

void tlsa_rtl_free(void* handle) { delete static_cast<Rtl*>(handle); }

void tlsa_rtl_reset(void* handle) { hold_reset(static_cast<Rtl*>(handle)); }

void tlsa_rtl_tick(void* handle, uint32_t n) {
    auto* r = static_cast<Rtl*>(handle);
    for (uint32_t i = 0; i < n; i++) tick(r);
}

uint64_t tlsa_rtl_cycles(void* handle) { return static_cast<Rtl*>(handle)->cycles; }

// An AXI4-Lite write: returns BRESP, or -1 when the slave did not answer in time.
int tlsa_rtl_write(void* handle, uint32_t address, uint32_t data) {
    auto* r = static_cast<Rtl*>(handle);
    auto* m = r->model.get();
    m->s_awaddr = address;
    m->s_awvalid = 1;
    m->s_wdata = data;
    m->s_wvalid = 1;
    m->s_bready = 1;
    for (int i = 0; i < kLimit; i++) {
        const bool aw = m->s_awvalid && m->s_awready;
        const bool w = m->s_wvalid && m->s_wready;
        const bool b = m->s_bvalid && m->s_bready;
        const int bresp = m->s_bresp;
        tick(r);
        if (aw) m->s_awvalid = 0;
        if (w) m->s_wvalid = 0;
        if (b) {
            m->s_bready = 0;
            return bresp;
        }
    }
    m->s_awvalid = 0;
    m->s_wvalid = 0;
    m->s_bready = 0;
    return -1;
}

// An AXI4-Lite read: returns RRESP and stores the data, or -1 on no answer.
int tlsa_rtl_read(void* handle, uint32_t address, uint32_t* data) {
    auto* r = static_cast<Rtl*>(handle);
    auto* m = r->model.get();
    m->s_araddr = address;
    m->s_arvalid = 1;
    m->s_rready = 1;
    for (int i = 0; i < kLimit; i++) {
        const bool ar = m->s_arvalid && m->s_arready;
        const bool rd = m->s_rvalid && m->s_rready;
        const uint32_t value = m->s_rdata;
        const int rresp = m->s_rresp;
        tick(r);
        if (ar) m->s_arvalid = 0;
        if (rd) {
            m->s_rready = 0;
            *data = value;
            return rresp;
        }
    }
    m->s_arvalid = 0;
    m->s_rready = 0;
    return -1;
}

void tlsa_rtl_set_counter(void* handle, uint32_t index, uint64_t value) {
    auto* m = static_cast<Rtl*>(handle)->model.get();
    if (index >= 14) return;
    m->counters[2 * index] = static_cast<uint32_t>(value);
    m->counters[2 * index + 1] = static_cast<uint32_t>(value >> 32);
}

void tlsa_rtl_set_fatal(void* handle, uint32_t fatal, uint32_t code) {
    auto* m = static_cast<Rtl*>(handle)->model.get();
    m->fatal = fatal ? 1 : 0;
    m->fatal_code = code;
}

// What the queue engine would see of queue `q`.
void tlsa_rtl_queue(void* handle, uint32_t q, uint32_t* enabled, uint32_t* sq_tail,
                    uint32_t* cq_head) {
    auto* m = static_cast<Rtl*>(handle)->model.get();
    if (q >= 8) return;
    *enabled = (m->q_enabled >> q) & 1;
    *sq_tail = m->q_sq_tail[q];
    *cq_head = m->q_cq_head[q];
}
}
