/* gridckpt log control: makes the shim's open determinant records final, for readers that
 * ship records while their writers still run (nodeagent/shipper.py, via interpose/logctl.py).
 *
 * A send/recv record of log version 2 stays open after it is complete: its writer may still
 * grow `end` with a compare-and-swap that expects `end` to equal the start of its next
 * transfer (see gridckpt_shim.h).  Setting GC_END_CLOSED with one atomic fetch-or on the
 * shared file mapping makes every later CAS fail, so the end value the fetch-or returns is
 * the record's final end: the writer starts a new record for its next bytes.  Closing a
 * closed record, a version 1 record or the record of a process that is gone is harmless.
 *
 * Not loaded into the units (no hooks here): a plain library for ctypes. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gridckpt_shim.h"

#define EXPORT __attribute__((visibility("default")))

_Static_assert(sizeof(struct gc_record) == GC_REC_SIZE, "record size");

/* The record layout version this library and the shim were built with. */
EXPORT int gc_logctl_version(void) { return GC_REC_VERSION; }

/* Close the complete records among the `count` records at `base` (a shared, writable
 * mapping of a log).  Stops at the first record not yet complete (first byte zero, as
 * interpose/reader.py decides); returns how many records precede it.  Records in that
 * prefix whose magic is wrong are counted but not touched (the reader reports them). */
EXPORT uint64_t gc_close_records(void *base, uint64_t count) {
    struct gc_record *recs = (struct gc_record *)base;
    uint64_t i;
    for (i = 0; i < count; i++) {
        struct gc_record *r = &recs[i];
        uint32_t magic = __atomic_load_n(&r->magic, __ATOMIC_ACQUIRE);
        if ((magic & 0xff) == 0)
            break;
        if (magic != GC_REC_MAGIC || (r->kind != GC_KIND_SEND && r->kind != GC_KIND_RECV))
            continue;
        /* A plain load first: a closed record's page is not dirtied again. */
        if (!(__atomic_load_n(&r->end, __ATOMIC_RELAXED) & GC_END_CLOSED))
            __atomic_fetch_or(&r->end, GC_END_CLOSED, __ATOMIC_ACQ_REL);
    }
    return i;
}

/* Close the complete records of the log open (read-write) on `fd`, from record index
 * `first` on, at most `max` of them.  Returns how many complete records there are from
 * `first` (all of them final now: a reader that decodes exactly these sees their final
 * ends), or -errno. */
EXPORT int64_t gc_close_log(int fd, uint64_t first, uint64_t max) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    uint64_t size = (uint64_t)st.st_size;
    uint64_t nrec = size / GC_REC_SIZE;
    if (first >= nrec || max == 0)
        return 0;
    uint64_t count = nrec - first;
    if (count > max)
        count = max;
    long page = sysconf(_SC_PAGESIZE);
    uint64_t start = first * GC_REC_SIZE;
    uint64_t map_off = start & ~((uint64_t)page - 1);
    uint64_t len = start + count * GC_REC_SIZE - map_off;
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)map_off);
    if (m == MAP_FAILED)
        return -errno;
    uint64_t n = gc_close_records((char *)m + (start - map_off), count);
    munmap(m, len);
    return (int64_t)n;
}
