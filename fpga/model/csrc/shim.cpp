// C interface to the Verilated tlsaccel_top: one clock per tick; AXI4-Lite transactions on
// BAR0 run to completion (or a cycle limit); the two AXI4 masters' reads and writes of host
// memory (the queue engine's 64-bit one, the record engine's 128-bit one) are served
// through callbacks into Rust, which looks them up in the regions the driver mapped; reads
// may wait a set latency first, as behind PCIe.
//
// Test-bench faults (the reference model's faults of docs/device-spec.md §9 that a bench can
// show from outside the device): the queue engine's hold input (STALL), the next completion
// write swallowed (answered OKAY, memory untouched), the record engine's next read burst
// answered SLVERR, and the fatal input with a code. A reset of the engines (the reset input,
// or RESET written to DEVICE_CONTROL) clears them, as a reset clears the model's faults.
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
    // Cycles from a read request to its first data beat: host memory behind PCIe (0: the
    // next cycle).
    uint32_t read_latency = 0;
    void* memory = nullptr;
    tlsa_mem_read_fn read = nullptr;
    tlsa_mem_write_fn write = nullptr;
    tlsa_irq_fn irq = nullptr;
    // The AXI4 slave's state for one master: the queue engine's 64-bit one (`q`) and the
    // record engine's 128-bit one (`e`).
    struct Port {
        bool rd_busy = false;
        uint32_t rd_wait = 0;
        uint64_t rd_address = 0;
        uint32_t rd_beats = 0;
        uint32_t rd_beat = 0;
        bool wr_address = false;
        uint64_t wr_base = 0;
        uint32_t wr_beat = 0;
        bool wr_error = false;
        bool b_pending = false;
        int b_resp = 0;
        // Test-bench faults on this burst: its writes are dropped; its reads answer SLVERR.
        bool wr_drop = false;
        bool rd_error = false;
    };
    Port q;
    Port e;
    // Test-bench faults still to happen: the next completion write (queue engine) is
    // dropped; the next read burst of the record engine fails.
    bool drop_next_completion = false;
    bool fail_next_engine_read = false;
    // The fatal input: as the shell drives it (`tlsa_rtl_set_fatal`), or injected until the
    // next reset.
    bool fatal = false;
    uint32_t fatal_code = 0;
    bool injected_fatal = false;
    uint32_t injected_fatal_code = 0;
};

constexpr int kLimit = 256;

void load_read_beat(Rtl* r) {
    auto* m = r->model.get();
    uint8_t bytes[8] = {0};
    const int ok = r->read(r->memory, r->q.rd_address + 8ull * r->q.rd_beat, bytes, 8);
    uint64_t word = 0;
    std::memcpy(&word, bytes, 8);  // little-endian host, as the bus
    m->m_rdata = word;
    m->m_rresp = ok == 0 ? 0 : 2;  // SLVERR outside the mappings
    m->m_rlast = (r->q.rd_beat + 1 == r->q.rd_beats) ? 1 : 0;
    m->m_rvalid = 1;
}

void load_engine_beat(Rtl* r) {
    auto* m = r->model.get();
    uint8_t bytes[16] = {0};
    const int ok = r->e.rd_error
        ? -1
        : r->read(r->memory, r->e.rd_address + 16ull * r->e.rd_beat, bytes, 16);
    std::memcpy(m->e_rdata.data(), bytes, 16);
    m->e_rresp = ok == 0 ? 0 : 2;
    m->e_rlast = (r->e.rd_beat + 1 == r->e.rd_beats) ? 1 : 0;
    m->e_rvalid = 1;
}

// The record engine's port: the same slave, 16-byte beats, writes by strobe.
void engine_port(Rtl* r, bool ar, uint64_t araddr, uint32_t arlen, bool rd, bool aw,
                 uint64_t awaddr, bool w, const uint8_t* wdata, uint32_t wstrb, bool wlast,
                 bool b) {
    auto* m = r->model.get();
    auto& e = r->e;
    if (ar) {
        e.rd_busy = true;
        e.rd_address = araddr;
        e.rd_beats = arlen + 1;
        e.rd_beat = 0;
        e.rd_error = r->fail_next_engine_read;
        r->fail_next_engine_read = false;
        e.rd_wait = r->read_latency;
        if (e.rd_wait == 0) load_engine_beat(r);
    } else if (e.rd_busy && e.rd_wait > 0) {
        if (--e.rd_wait == 0) load_engine_beat(r);
    } else if (rd) {
        e.rd_beat++;
        if (e.rd_beat == e.rd_beats) {
            e.rd_busy = false;
            m->e_rvalid = 0;
            m->e_rlast = 0;
        } else {
            load_engine_beat(r);
        }
    }
    if (aw) {
        e.wr_address = true;
        e.wr_base = awaddr;
        e.wr_beat = 0;
        e.wr_error = false;
    }
    if (w) {
        // Runs of enabled bytes, each one write.
        const uint64_t beat = e.wr_base + 16ull * e.wr_beat;
        int i = 0;
        while (i < 16) {
            if (!((wstrb >> i) & 1)) {
                i++;
                continue;
            }
            int j = i;
            while (j < 16 && ((wstrb >> j) & 1)) j++;
            if (r->write(r->memory, beat + i, wdata + i, j - i) != 0) e.wr_error = true;
            i = j;
        }
        e.wr_beat++;
        if (wlast) {
            e.wr_address = false;
            e.b_pending = true;
            e.b_resp = e.wr_error ? 2 : 0;
        }
    }
    if (b) e.b_pending = false;
    m->e_arready = e.rd_busy ? 0 : 1;
    m->e_awready = (e.wr_address || e.b_pending) ? 0 : 1;
    m->e_wready = e.wr_address ? 1 : 0;
    m->e_bvalid = e.b_pending ? 1 : 0;
    m->e_bresp = e.b_resp;
}

void drive_fatal(Rtl* r) {
    auto* m = r->model.get();
    m->fatal = (r->fatal || r->injected_fatal) ? 1 : 0;
    m->fatal_code = r->injected_fatal ? r->injected_fatal_code : r->fatal_code;
}

// A reset lifts every test-bench fault (held jobs are dropped by the engines' reset).
void clear_faults(Rtl* r) {
    r->model->model_hold = 0;
    r->drop_next_completion = false;
    r->fail_next_engine_read = false;
    r->injected_fatal = false;
    drive_fatal(r);
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
    const bool e_ar = m->e_arvalid && m->e_arready;
    const bool e_rd = m->e_rvalid && m->e_rready;
    const bool e_aw = m->e_awvalid && m->e_awready;
    const bool e_w = m->e_wvalid && m->e_wready;
    const bool e_b = m->e_bvalid && m->e_bready;
    const uint64_t e_araddr = m->e_araddr;
    const uint32_t e_arlen = m->e_arlen;
    const uint64_t e_awaddr = m->e_awaddr;
    uint8_t e_wdata[16];
    std::memcpy(e_wdata, m->e_wdata.data(), 16);
    const uint32_t e_wstrb = m->e_wstrb;
    const bool e_wlast = m->e_wlast;
    r->context->timeInc(1);
    m->clk = 1;
    m->eval();
    r->context->timeInc(1);
    r->cycles++;

    // The slave's side of those transfers, and its outputs for the next cycle.
    if (ar) {
        r->q.rd_busy = true;
        r->q.rd_address = araddr;
        r->q.rd_beats = arlen + 1;
        r->q.rd_beat = 0;
        r->q.rd_wait = r->read_latency;
        if (r->q.rd_wait == 0) load_read_beat(r);
    } else if (r->q.rd_busy && r->q.rd_wait > 0) {
        if (--r->q.rd_wait == 0) load_read_beat(r);
    } else if (rd) {
        r->q.rd_beat++;
        if (r->q.rd_beat == r->q.rd_beats) {
            r->q.rd_busy = false;
            m->m_rvalid = 0;
            m->m_rlast = 0;
        } else {
            load_read_beat(r);
        }
    }
    if (aw) {
        r->q.wr_address = true;
        r->q.wr_base = awaddr;
        r->q.wr_beat = 0;
        r->q.wr_error = false;
        // The queue engine writes nothing but completions, one burst each.
        r->q.wr_drop = r->drop_next_completion;
        r->drop_next_completion = false;
    }
    if (w) {
        uint8_t bytes[8];
        std::memcpy(bytes, &wdata, 8);
        // Bytes in address order, so the completion's status word lands last.
        for (int i = 0; i < 8 && !r->q.wr_drop; i++) {
            if ((wstrb >> i) & 1) {
                if (r->write(r->memory, r->q.wr_base + 8ull * r->q.wr_beat + i, &bytes[i], 1) != 0) {
                    r->q.wr_error = true;
                }
            }
        }
        r->q.wr_beat++;
        if (wlast) {
            r->q.wr_address = false;
            r->q.b_pending = true;
            r->q.b_resp = r->q.wr_error ? 2 : 0;
        }
    }
    if (b) r->q.b_pending = false;
    if (m->dma_reset) {
        // The interconnect resets with the engines: open bursts are abandoned.
        r->q = Rtl::Port{};
        r->e = Rtl::Port{};
        m->m_rvalid = 0;
        m->m_rlast = 0;
        m->e_rvalid = 0;
        m->e_rlast = 0;
        clear_faults(r);
    }
    const bool live = !m->dma_reset;
    engine_port(r, live && e_ar, e_araddr, e_arlen, live && e_rd, live && e_aw, e_awaddr,
                live && e_w, e_wdata, e_wstrb, e_wlast, live && e_b);
    // Interrupt messages: one pulse per vector, delivered as the MSI-X write would be.
    if (m->irq != 0) {
        for (uint32_t v = 0; v < 8; v++) {
            if ((m->irq >> v) & 1) r->irq(r->memory, v);
        }
    }
    m->m_arready = r->q.rd_busy ? 0 : 1;
    m->m_awready = (r->q.wr_address || r->q.b_pending) ? 0 : 1;
    m->m_wready = r->q.wr_address ? 1 : 0;
    m->m_bvalid = r->q.b_pending ? 1 : 0;
    m->m_bresp = r->q.b_resp;
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
    m->model_hold = 0;
    m->m_arready = 1;
    m->m_rvalid = 0;
    m->m_awready = 1;
    m->m_wready = 0;
    m->m_bvalid = 0;
    m->e_arready = 1;
    m->e_rvalid = 0;
    m->e_awready = 1;
    m->e_wready = 0;
    m->e_bvalid = 0;
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
    return r->model->idle && !r->q.rd_busy && !r->q.wr_address && !r->q.b_pending && !r->e.rd_busy &&
           !r->e.wr_address && !r->e.b_pending;
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

void tlsa_rtl_set_read_latency(void* handle, uint32_t cycles) {
    static_cast<Rtl*>(handle)->read_latency = cycles;
}

void tlsa_rtl_set_fatal(void* handle, uint32_t fatal, uint32_t code) {
    auto* r = static_cast<Rtl*>(handle);
    r->fatal = fatal != 0;
    r->fatal_code = code;
    drive_fatal(r);
}

// Test-bench faults (see the top of the file); each lasts until it happens or a reset.
void tlsa_rtl_set_hold(void* handle, uint32_t hold) {
    static_cast<Rtl*>(handle)->model->model_hold = hold ? 1 : 0;
}

uint32_t tlsa_rtl_held(void* handle) { return static_cast<Rtl*>(handle)->model->model_held; }

void tlsa_rtl_drop_next_completion(void* handle) {
    static_cast<Rtl*>(handle)->drop_next_completion = true;
}

void tlsa_rtl_fail_next_engine_read(void* handle) {
    static_cast<Rtl*>(handle)->fail_next_engine_read = true;
}

void tlsa_rtl_inject_fatal(void* handle, uint32_t code) {
    auto* r = static_cast<Rtl*>(handle);
    r->injected_fatal = true;
    r->injected_fatal_code = code;
    drive_fatal(r);
}
}
