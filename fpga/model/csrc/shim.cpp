// C interface to the Verilated tlsaccel_top: one clock per tick; AXI4-Lite transactions on
// BAR0 run to completion (or a cycle limit); the AXI4 master's reads and writes of host
// memory are served through callbacks into Rust, which looks them up in the regions the
// driver mapped.
#include <cstdint>
#include <cstring>
#include <memory>

#include "Vtlsaccel_top.h"
#include "verilated.h"

extern "C" {
typedef int (*tlsa_mem_read_fn)(void* context, uint64_t address, uint8_t* buf, uint32_t len);
typedef int (*tlsa_mem_write_fn)(void* context, uint64_t address, const uint8_t* buf,
                                 uint32_t len);
typedef void (*tlsa_irq_fn)(void* context, uint32_t vector);
}

namespace {

struct Rtl {
    std::unique_ptr<VerilatedContext> context;
    std::unique_ptr<Vtlsaccel_top> model;
    uint64_t cycles = 0;
    void* memory = nullptr;
    tlsa_mem_read_fn read = nullptr;
    tlsa_mem_write_fn write = nullptr;
    tlsa_irq_fn irq = nullptr;
    // AXI4 slave (host memory) state
    bool rd_busy = false;
    uint64_t rd_address = 0;
    uint32_t rd_beats = 0;
    uint32_t rd_beat = 0;
    bool wr_address = false;
    uint64_t wr_base = 0;
    uint32_t wr_beat = 0;
    bool wr_error = false;
    bool b_pending = false;
    int b_resp = 0;
};

constexpr int kLimit = 256;

void load_read_beat(Rtl* r) {
    auto* m = r->model.get();
    uint8_t bytes[8] = {0};
    const int ok = r->read(r->memory, r->rd_address + 8ull * r->rd_beat, bytes, 8);
    uint64_t word = 0;
    std::memcpy(&word, bytes, 8);  // little-endian host, as the bus
    m->m_rdata = word;
    m->m_rresp = ok == 0 ? 0 : 2;  // SLVERR outside the mappings
    m->m_rlast = (r->rd_beat + 1 == r->rd_beats) ? 1 : 0;
    m->m_rvalid = 1;
}

void tick(Rtl* r) {
    auto* m = r->model.get();
    m->clk = 0;
    m->eval();
    // What the coming edge transfers.
    const bool ar = m->m_arvalid && m->m_arready;
    const bool rd = m->m_rvalid && m->m_rready;
    const bool aw = m->m_awvalid && m->m_awready;
    const bool w = m->m_wvalid && m->m_wready;
    const bool b = m->m_bvalid && m->m_bready;
    const uint64_t araddr = m->m_araddr;
    const uint32_t arlen = m->m_arlen;
    const uint64_t awaddr = m->m_awaddr;
    const uint64_t wdata = m->m_wdata;
    const uint32_t wstrb = m->m_wstrb;
    const bool wlast = m->m_wlast;
    r->context->timeInc(1);
    m->clk = 1;
    m->eval();
    r->context->timeInc(1);
    r->cycles++;

    // The slave's side of those transfers, and its outputs for the next cycle.
    if (ar) {
        r->rd_busy = true;
        r->rd_address = araddr;
        r->rd_beats = arlen + 1;
        r->rd_beat = 0;
        load_read_beat(r);
    } else if (rd) {
        r->rd_beat++;
        if (r->rd_beat == r->rd_beats) {
            r->rd_busy = false;
            m->m_rvalid = 0;
            m->m_rlast = 0;
        } else {
            load_read_beat(r);
        }
    }
    if (aw) {
        r->wr_address = true;
        r->wr_base = awaddr;
        r->wr_beat = 0;
        r->wr_error = false;
    }
    if (w) {
        uint8_t bytes[8];
        std::memcpy(bytes, &wdata, 8);
        // Bytes in address order, so the completion's status word lands last.
        for (int i = 0; i < 8; i++) {
            if ((wstrb >> i) & 1) {
                if (r->write(r->memory, r->wr_base + 8ull * r->wr_beat + i, &bytes[i], 1) != 0) {
                    r->wr_error = true;
                }
            }
        }
        r->wr_beat++;
        if (wlast) {
            r->wr_address = false;
            r->b_pending = true;
            r->b_resp = r->wr_error ? 2 : 0;
        }
    }
    if (b) r->b_pending = false;
    // Interrupt messages: one pulse per vector, delivered as the MSI-X write would be.
    if (m->irq != 0) {
        for (uint32_t v = 0; v < 8; v++) {
            if ((m->irq >> v) & 1) r->irq(r->memory, v);
        }
    }
    m->m_arready = r->rd_busy ? 0 : 1;
    m->m_awready = (r->wr_address || r->b_pending) ? 0 : 1;
    m->m_wready = r->wr_address ? 1 : 0;
    m->m_bvalid = r->b_pending ? 1 : 0;
    m->m_bresp = r->b_resp;
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

void* tlsa_rtl_new(void* memory, tlsa_mem_read_fn read, tlsa_mem_write_fn write,
                   tlsa_irq_fn irq) {
    auto* r = new Rtl;
    r->memory = memory;
    r->read = read;
    r->write = write;
    r->irq = irq;
    r->context = std::make_unique<VerilatedContext>();
    r->model = std::make_unique<Vtlsaccel_top>(r->context.get());
    auto* m = r->model.get();
    m->s_awvalid = 0;
    m->s_wvalid = 0;
    m->s_bready = 0;
    m->s_arvalid = 0;
    m->s_rready = 0;
    m->s_wstrb = 0xf;
    m->fatal = 0;
    m->fatal_code = 0;
    m->m_arready = 1;
    m->m_rvalid = 0;
    m->m_awready = 1;
    m->m_wready = 0;
    m->m_bvalid = 0;
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

int tlsa_rtl_idle(void* handle) {
    auto* r = static_cast<Rtl*>(handle);
    return r->model->idle && !r->rd_busy && !r->wr_address && !r->b_pending;
}

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

void tlsa_rtl_set_fatal(void* handle, uint32_t fatal, uint32_t code) {
    auto* m = static_cast<Rtl*>(handle)->model.get();
    m->fatal = fatal ? 1 : 0;
    m->fatal_code = code;
}
}
