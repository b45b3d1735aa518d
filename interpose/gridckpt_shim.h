/* Binary layouts shared by the shim (C) and its readers (interpose/reader.py, control.py).
 * Change a layout -> bump its version here and in the Python modules. */
#ifndef GRIDCKPT_SHIM_H
#define GRIDCKPT_SHIM_H

#include <stdint.h>

/* ---- determinant log: det.<pid>.<start ns>.log, an array of 96-byte records ----
 * Record 0 is a header (kind GC_KIND_HEADER).  A record is complete when its first
 * 32-bit word equals GC_REC_MAGIC; it is written last, with release ordering, so a
 * reader that sees the magic sees the whole record.  Unused tail space is zeros.
 *
 * Version 2: a send/recv record is *open* after it is complete: `end` may grow (in place,
 * atomically, by the process that wrote the record) while later transfers of the same
 * connection direction continue its byte range contiguously, until the GC_END_CLOSED bit
 * of `end` is set; then the record is final.  A reader that ships records while their
 * writer runs must close them first (atomic fetch-or of GC_END_CLOSED on `end`, see
 * logctl.c) and use the end value it got back.  Readers always mask GC_END_CLOSED off.
 * mono_ns and tid are those of the record's first transfer.  Every other field is
 * immutable once the magic is set.  Version 1 records (never grown) read the same way. */
#define GC_REC_MAGIC 0x31544544u /* "DET1" little-endian */
#define GC_REC_VERSION 2
#define GC_END_CLOSED (1ull << 63) /* in `end`: the record is final (byte offsets never reach it) */
#define GC_REC_SIZE 96
#define GC_KIND_SEND 1
#define GC_KIND_RECV 2
#define GC_KIND_HEADER 16

struct gc_record {
    uint32_t magic;     /* 0: GC_REC_MAGIC once complete */
    uint8_t version;    /* 4 */
    uint8_t kind;       /* 5: send / recv / header */
    uint8_t family;     /* 6: 4 or 6 (IPv4-mapped IPv6 addresses are stored as 4) */
    uint8_t flags;      /* 7 */
    uint32_t pid;       /* 8 */
    uint32_t gen;       /* 12: generation of the address pair (header: ppid) */
    uint64_t start;     /* 16: byte offset in this direction's stream (header: realtime ns) */
    uint64_t end;       /* 24: exclusive; may grow until GC_END_CLOSED is set (mask it off) */
    uint64_t interval;  /* 32: checkpoint interval from the control page */
    uint64_t mono_ns;   /* 40: CLOCK_MONOTONIC of the first transfer (may be TSC-extrapolated: within ~0.1 us) */
    uint8_t src[16];    /* 48: sender's address (header: unit name, 32 bytes incl. dst) */
    uint8_t dst[16];    /* 64: receiver's address */
    uint16_t src_port;  /* 80 */
    uint16_t dst_port;  /* 82 */
    uint32_t tid;       /* 84: thread of the first transfer */
    uint64_t conn_key;  /* 88: the writer's private key of the connection direction (readers ignore it) */
};

/* ---- control page: GRIDCKPT_SHIM_CONTROL, shared by every process of a unit ----
 * A header page, then a table of connection slots (open addressing, keyed by the
 * oriented address pair local>peer).  A slot counts the generations of its pair and the
 * stream offsets of the current generation, so forked children and dup'ed fds continue
 * the same counters. */
#define GC_CTL_MAGIC 0x31304c544b434347ull /* "GCCKTL01" */
#define GC_CTL_VERSION 2
#define GC_CTL_HEADER 4096
#define GC_CTL_SLOT_SIZE 128
#define GC_CTL_NSLOTS 32768
#define GC_CTL_SIZE (GC_CTL_HEADER + (uint64_t)GC_CTL_NSLOTS * GC_CTL_SLOT_SIZE)

struct gc_ctl_header {
    uint64_t magic;        /* 0 */
    uint32_t version;      /* 8 */
    uint32_t nslots;       /* 12 */
    uint64_t pad0[6];      /* 16 */
    uint64_t interval;     /* 64: the agent bumps it at resume_cp */
    uint64_t pad1[7];      /* 72 */
    uint64_t lost;         /* 128: records the shim could not write (table/log full) */
};

#define GC_SLOT_EMPTY 0
#define GC_SLOT_BUSY 1

struct gc_ctl_slot {       /* everything a record needs is in the first 64 bytes */
    uint32_t tag;          /* 0 empty, 1 being claimed, else hash of the key */
    uint32_t gen_count;    /* generations opened so far; current gen = gen_count - 1 */
    uint16_t family;       /* 4 or 6 */
    uint16_t local_port;
    uint16_t peer_port;
    uint16_t pad0;
    uint64_t send_off;     /* bytes sent so far on the current generation */
    uint64_t recv_off;     /* bytes received so far */
    uint8_t local[16];
    uint8_t peer[16];
    uint8_t pad[128 - 64];
};

#endif
