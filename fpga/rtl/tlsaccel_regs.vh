// tlsaccel RTL constants. GENERATED from tlsaccel-abi by
//   cargo run -p tlsaccel-fpga-gen -- fpga/rtl/tlsaccel_regs.vh
// Do not edit: change abi/ and regenerate (a test fails when this file drifts).
// Include inside a module body.

// Identity
localparam [31:0] TLSA_MAGIC = 32'h41534c54;
localparam [31:0] TLSA_VERSION = 32'h00010000;
localparam [15:0] TLSA_PCI_VENDOR_ID = 16'h1de5;
localparam [15:0] TLSA_PCI_DEVICE_ID = 16'h7a51;

// BAR0 global page (byte offsets)
localparam [31:0] TLSA_REG_MAGIC = 32'h00000000;
localparam [31:0] TLSA_REG_VERSION = 32'h00000004;
localparam [31:0] TLSA_REG_CAPABILITIES = 32'h00000008;
localparam [31:0] TLSA_REG_NUM_QUEUES = 32'h0000000c;
localparam [31:0] TLSA_REG_MAX_QUEUE_ENTRIES = 32'h00000010;
localparam [31:0] TLSA_REG_NUM_KEY_SLOTS = 32'h00000014;
localparam [31:0] TLSA_REG_MAX_DATA_LEN = 32'h00000018;
localparam [31:0] TLSA_REG_DOORBELL_STRIDE = 32'h0000001c;
localparam [31:0] TLSA_REG_DEVICE_CONTROL = 32'h00000020;
localparam [31:0] TLSA_REG_DEVICE_STATUS = 32'h00000024;
localparam [31:0] TLSA_REG_FATAL_CODE = 32'h00000028;
localparam [31:0] TLSA_REG_HEARTBEAT = 32'h0000002c;
localparam [31:0] TLSA_REG_COUNTERS_BASE = 32'h00000100;

// Counters: TLSA_REG_COUNTERS_BASE + 8 * index
localparam integer TLSA_COUNTER_JOBS_OK = 0;
localparam integer TLSA_COUNTER_JOBS_FAILED = 1;
localparam integer TLSA_COUNTER_BYTES_IN = 2;
localparam integer TLSA_COUNTER_BYTES_OUT = 3;
localparam integer TLSA_COUNTER_AUTH_FAILURES = 4;
localparam integer TLSA_COUNTER_DMA_FAULTS = 5;
localparam integer TLSA_COUNTER_REJECTED = 6;
localparam integer TLSA_COUNTER_INTERRUPTS = 7;
localparam integer TLSA_COUNTER_KEY_SLOTS_LOADED = 8;
localparam integer TLSA_COUNTER_RECORDS_SEALED = 9;
localparam integer TLSA_COUNTER_RECORDS_OPENED = 10;
localparam integer TLSA_COUNTER_DESCRIPTORS_FETCHED = 11;
localparam integer TLSA_COUNTER_SIGNATURES = 12;
localparam integer TLSA_COUNTER_KEY_EXCHANGES = 13;
localparam integer TLSA_NUM_COUNTERS = 14;

// Queue configuration blocks and doorbell pages
localparam [31:0] TLSA_QUEUE_REGS_BASE = 32'h00001000;
localparam [31:0] TLSA_QUEUE_REGS_STRIDE = 32'h00000080;
localparam integer TLSA_MAX_QUEUES = 64;
localparam [31:0] TLSA_Q_SQ_BASE = 32'h00000000;
localparam [31:0] TLSA_Q_CQ_BASE = 32'h00000008;
localparam [31:0] TLSA_Q_SIZE = 32'h00000010;
localparam [31:0] TLSA_Q_CONTROL = 32'h00000014;
localparam [31:0] TLSA_Q_STATUS = 32'h00000018;
localparam [31:0] TLSA_Q_ERROR = 32'h0000001c;
localparam [31:0] TLSA_Q_IRQ_COALESCE_COUNT = 32'h00000020;
localparam [31:0] TLSA_Q_IRQ_COALESCE_USECS = 32'h00000024;
localparam [31:0] TLSA_Q_SQ_HEAD = 32'h00000028;
localparam [31:0] TLSA_Q_CQ_TAIL = 32'h0000002c;
localparam [31:0] TLSA_DOORBELL_BASE = 32'h00010000;
localparam [31:0] TLSA_DOORBELL_STRIDE = 32'h00001000;
localparam [31:0] TLSA_DB_SQ_TAIL = 32'h00000000;
localparam [31:0] TLSA_DB_CQ_HEAD = 32'h00000004;
localparam integer TLSA_MIN_QUEUE_ENTRIES = 2;
localparam integer TLSA_MAX_QUEUE_ENTRIES = 4096;
localparam integer TLSA_RING_ALIGN = 4096;

// Control and status bits
localparam [31:0] TLSA_DEVICE_CONTROL_ENABLE = 32'h00000001;
localparam [31:0] TLSA_DEVICE_CONTROL_RESET = 32'h00000002;
localparam [31:0] TLSA_DEVICE_STATUS_READY = 32'h00000001;
localparam [31:0] TLSA_DEVICE_STATUS_RUNNING = 32'h00000002;
localparam [31:0] TLSA_DEVICE_STATUS_FATAL = 32'h00000004;
localparam [31:0] TLSA_Q_CONTROL_ENABLE = 32'h00000001;
localparam [31:0] TLSA_Q_CONTROL_IRQ_ENABLE = 32'h00000002;
localparam [31:0] TLSA_Q_CONTROL_PUBLIC_KEY = 32'h00000004;
localparam [31:0] TLSA_Q_STATUS_ENABLED = 32'h00000001;
localparam [31:0] TLSA_Q_STATUS_ERROR = 32'h00000002;
localparam [31:0] TLSA_CAP_NOP = 32'h00000001;
localparam [31:0] TLSA_CAP_AES_128_GCM = 32'h00000002;
localparam [31:0] TLSA_CAP_AES_256_GCM = 32'h00000004;
localparam [31:0] TLSA_CAP_CHACHA20_POLY1305 = 32'h00000008;
localparam [31:0] TLSA_CAP_RAW_AEAD = 32'h00000010;
localparam [31:0] TLSA_CAP_TLS13_RECORD = 32'h00000020;
localparam [31:0] TLSA_CAP_TLS12_RECORD = 32'h00000040;
localparam [31:0] TLSA_CAP_INTERRUPT_COALESCING = 32'h00000080;
localparam [31:0] TLSA_CAP_ECDSA_P256 = 32'h00000100;
localparam [31:0] TLSA_CAP_ECDSA_P384 = 32'h00000200;
localparam [31:0] TLSA_CAP_RSA = 32'h00000400;
localparam [31:0] TLSA_CAP_X25519 = 32'h00000800;
localparam [31:0] TLSA_CAP_ECDH_P256 = 32'h00001000;
localparam [31:0] TLSA_CAP_MODEL_FAULTS = 32'h80000000;
localparam [7:0] TLSA_CQE_FLAG_PHASE = 8'h01;
localparam [7:0] TLSA_CQE_FLAG_SEQUENCE_ADVANCED = 8'h02;

// Descriptor (64 bytes): byte offsets of its fields
localparam integer TLSA_DESCRIPTOR_SIZE = 64;
localparam integer TLSA_DESC_OPCODE = 0;
localparam integer TLSA_DESC_FLAGS = 1;
localparam integer TLSA_DESC_RESERVED = 2;
localparam integer TLSA_DESC_KEY_SLOT = 4;
localparam integer TLSA_DESC_COOKIE = 8;
localparam integer TLSA_DESC_SRC_IOVA = 16;
localparam integer TLSA_DESC_DST_IOVA = 24;
localparam integer TLSA_DESC_SRC_LEN = 32;
localparam integer TLSA_DESC_DST_LEN = 36;
localparam integer TLSA_DESC_AAD_IOVA = 40;
localparam integer TLSA_DESC_AAD_LEN = 48;
localparam integer TLSA_DESC_PARAM = 52;

// Completion (16 bytes): byte offsets of its fields
localparam integer TLSA_COMPLETION_SIZE = 16;
localparam integer TLSA_CQE_COOKIE = 0;
localparam integer TLSA_CQE_RESULT_LEN = 8;
localparam integer TLSA_CQE_STATUS = 12;
localparam integer TLSA_CQE_INFO = 14;
localparam integer TLSA_CQE_FLAGS = 15;

// Key block (64 bytes): byte offsets of its fields
localparam integer TLSA_KEY_BLOCK_SIZE = 64;
localparam integer TLSA_KEYBLOCK_ALGORITHM = 0;
localparam integer TLSA_KEYBLOCK_PROTOCOL = 1;
localparam integer TLSA_KEYBLOCK_DIRECTION = 2;
localparam integer TLSA_KEYBLOCK_SEQUENCE = 8;
localparam integer TLSA_KEYBLOCK_KEY = 16;
localparam integer TLSA_KEYBLOCK_IV = 48;

// Opcodes
localparam [7:0] TLSA_OP_NOP = 8'h00;
localparam [7:0] TLSA_OP_KEY_LOAD = 8'h01;
localparam [7:0] TLSA_OP_KEY_DESTROY = 8'h02;
localparam [7:0] TLSA_OP_AEAD_SEAL = 8'h10;
localparam [7:0] TLSA_OP_AEAD_OPEN = 8'h11;
localparam [7:0] TLSA_OP_TLS13_SEAL = 8'h20;
localparam [7:0] TLSA_OP_TLS13_OPEN = 8'h21;
localparam [7:0] TLSA_OP_TLS12_SEAL = 8'h22;
localparam [7:0] TLSA_OP_TLS12_OPEN = 8'h23;
localparam [7:0] TLSA_OP_PKE_KEY_LOAD = 8'h30;
localparam [7:0] TLSA_OP_ECDSA_SIGN = 8'h31;
localparam [7:0] TLSA_OP_RSA_SIGN = 8'h32;
localparam [7:0] TLSA_OP_KX_GENERATE = 8'h33;
localparam [7:0] TLSA_OP_KX_DERIVE = 8'h34;

// Completion status codes
localparam [15:0] TLSA_ST_OK = 16'h0000;
localparam [15:0] TLSA_ST_AUTH_FAILED = 16'h0001;
localparam [15:0] TLSA_ST_BAD_OPCODE = 16'h0002;
localparam [15:0] TLSA_ST_BAD_DESCRIPTOR = 16'h0003;
localparam [15:0] TLSA_ST_BAD_SLOT = 16'h0004;
localparam [15:0] TLSA_ST_SLOT_EMPTY = 16'h0005;
localparam [15:0] TLSA_ST_SLOT_MISMATCH = 16'h0006;
localparam [15:0] TLSA_ST_LENGTH_ERROR = 16'h0007;
localparam [15:0] TLSA_ST_DMA_FAULT = 16'h0008;
localparam [15:0] TLSA_ST_UNSUPPORTED = 16'h0009;
localparam [15:0] TLSA_ST_SEQUENCE_EXHAUSTED = 16'h000a;
localparam [15:0] TLSA_ST_RECORD_MALFORMED = 16'h000b;
localparam [15:0] TLSA_ST_RECORD_OVERFLOW = 16'h000c;
localparam [15:0] TLSA_ST_INVALID_PUBLIC_KEY = 16'h000d;
localparam [15:0] TLSA_ST_INVALID_KEY = 16'h000e;

// Queue error codes (Q_ERROR)
localparam [31:0] TLSA_QERR_NONE = 32'h00000000;
localparam [31:0] TLSA_QERR_BAD_CONFIG = 32'h00000001;
localparam [31:0] TLSA_QERR_RING_NOT_MAPPED = 32'h00000002;
localparam [31:0] TLSA_QERR_BAD_DOORBELL = 32'h00000003;
