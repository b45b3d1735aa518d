/* gridckpt interposition shim: records, for every TCP byte a process sends or receives,
 * which connection direction, which byte range and which checkpoint interval.
 *
 * Loaded with LD_PRELOAD.  Configuration (environment, kept across exec):
 *   GRIDCKPT_SHIM_DIR      directory of the per-process logs (unset: record nothing)
 *   GRIDCKPT_UNIT          unit name written in each log's header
 *   GRIDCKPT_SHIM_CONTROL  control page file shared by the unit (interval, connection table)
 *
 * Hot path: no malloc, no stdio, no locks, no extra syscalls, no errno traffic.  A transfer
 * that continues this process's open record of the fd and direction contiguously grows that
 * record's end with one compare-and-swap (see note(): "coalescing"); otherwise a record is
 * appended to a shared memory mapping of the process's log file: an atomic fetch-and-add
 * reserves the slot, the magic word is stored last with release ordering; its time comes
 * from the TSC when the kernel's clocksource is the TSC (see "record clock").  Slow paths (first record of
 * a process, a new 1 MiB segment of the log, first use of an fd) may make syscalls and
 * spin on a flag; a thread-local guard turns any re-entry (signal handlers) into pure
 * pass-through.  See interpose/README.md for the design notes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "gridckpt_shim.h"

#define EXPORT __attribute__((visibility("default")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define TLS __thread __attribute__((tls_model("initial-exec")))

_Static_assert(sizeof(struct gc_record) == GC_REC_SIZE, "record size");
_Static_assert(sizeof(struct gc_ctl_slot) == GC_CTL_SLOT_SIZE, "slot size");
_Static_assert(offsetof(struct gc_ctl_slot, pad) == 64, "hot slot fields fit one cache line");

/* ------------------------------------------------------------------ real functions */

typedef ssize_t (*read_fn)(int, void *, size_t);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*readv_fn)(int, const struct iovec *, int);
typedef ssize_t (*recv_fn)(int, void *, size_t, int);
typedef ssize_t (*send_fn)(int, const void *, size_t, int);
typedef ssize_t (*recvfrom_fn)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
typedef ssize_t (*sendto_fn)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
typedef ssize_t (*recvmsg_fn)(int, struct msghdr *, int);
typedef ssize_t (*sendmsg_fn)(int, const struct msghdr *, int);
typedef int (*recvmmsg_fn)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
typedef int (*sendmmsg_fn)(int, struct mmsghdr *, unsigned int, int);
typedef ssize_t (*read_chk_fn)(int, void *, size_t, size_t);
typedef ssize_t (*recv_chk_fn)(int, void *, size_t, size_t, int);
typedef ssize_t (*recvfrom_chk_fn)(int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *);
typedef ssize_t (*sendfile_fn)(int, int, off_t *, size_t);
typedef ssize_t (*splice_fn)(int, loff_t *, int, loff_t *, size_t, unsigned int);
typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);
typedef int (*close_fn)(int);
typedef int (*shutdown_fn)(int, int);
typedef int (*dup_fn)(int);
typedef int (*dup2_fn)(int, int);
typedef int (*dup3_fn)(int, int, int);
typedef int (*fcntl_fn)(int, int, ...);
typedef int (*close_range_fn)(unsigned int, unsigned int, int);
typedef void (*closefrom_fn)(int);
typedef int (*fclose_fn)(FILE *);
typedef int (*socket_fn)(int, int, int);
typedef int (*socketpair_fn)(int, int, int, int *);
typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*pipe_fn)(int *);
typedef int (*pipe2_fn)(int *, int);
typedef int (*getsockopt_fn)(int, int, int, void *, socklen_t *);
typedef int (*execve_fn)(const char *, char *const[], char *const[]);
typedef int (*fexecve_fn)(int, char *const[], char *const[]);
typedef int (*posix_spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                              const posix_spawnattr_t *, char *const[], char *const[]);

#define REALS(X)                                   \
    X(read, read_fn)                               \
    X(write, write_fn)                             \
    X(readv, readv_fn)                             \
    X(writev, readv_fn)                            \
    X(recv, recv_fn)                               \
    X(send, send_fn)                               \
    X(recvfrom, recvfrom_fn)                       \
    X(sendto, sendto_fn)                           \
    X(recvmsg, recvmsg_fn)                         \
    X(sendmsg, sendmsg_fn)                         \
    X(recvmmsg, recvmmsg_fn)                       \
    X(sendmmsg, sendmmsg_fn)                       \
    X(__read_chk, read_chk_fn)                     \
    X(__recv_chk, recv_chk_fn)                     \
    X(__recvfrom_chk, recvfrom_chk_fn)             \
    X(sendfile, sendfile_fn)                       \
    X(sendfile64, sendfile_fn)                     \
    X(splice, splice_fn)                           \
    X(connect, connect_fn)                         \
    X(accept, accept_fn)                           \
    X(accept4, accept4_fn)                         \
    X(close, close_fn)                             \
    X(shutdown, shutdown_fn)                       \
    X(dup, dup_fn)                                 \
    X(dup2, dup2_fn)                               \
    X(dup3, dup3_fn)                               \
    X(fcntl, fcntl_fn)                             \
    X(fcntl64, fcntl_fn)                           \
    X(close_range, close_range_fn)                 \
    X(closefrom, closefrom_fn)                     \
    X(fclose, fclose_fn)                           \
    X(socket, socket_fn)                           \
    X(socketpair, socketpair_fn)                   \
    X(open, open_fn)                               \
    X(open64, open_fn)                             \
    X(openat, openat_fn)                           \
    X(openat64, openat_fn)                         \
    X(pipe, pipe_fn)                               \
    X(pipe2, pipe2_fn)                             \
    X(getsockopt, getsockopt_fn)                   \
    X(execve, execve_fn)                           \
    X(execvpe, execve_fn)                          \
    X(fexecve, fexecve_fn)                         \
    X(posix_spawn, posix_spawn_fn)                 \
    X(posix_spawnp, posix_spawn_fn)

/* The fortified variants are declared by glibc's headers only under _FORTIFY_SOURCE. */
ssize_t __read_chk(int, void *, size_t, size_t);
ssize_t __recv_chk(int, void *, size_t, size_t, int);
ssize_t __recvfrom_chk(int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *);

#define DECLARE_REAL(name, type) static type real_##name;
REALS(DECLARE_REAL)

/* ------------------------------------------------------------------ state */

enum { K_UNKNOWN = 0, K_OTHER = 1, K_PENDING = 2, K_CONN = 3 };
/* fd table entry: kind (8 bits) | slot index (24 bits) << 8 | gen (32 bits) << 32 */
#define E_KIND(e) ((unsigned)((e) & 0xff))
#define E_SLOT(e) ((uint32_t)(((e) >> 8) & 0xffffff))
#define E_GEN(e) ((uint32_t)((e) >> 32))
#define E_MAKE(kind, slot, gen) ((uint64_t)(kind) | ((uint64_t)(slot) << 8) | ((uint64_t)(gen) << 32))

#define SEG_RECORDS 12288u /* 96 * 12288 = 1152 KiB, a multiple of the page size */
#define SEG_BYTES ((uint64_t)SEG_RECORDS * GC_REC_SIZE)
#define MAX_SEGS 16384u    /* 18 GiB of log per process */
#define SEG_MAPPING ((char *)1)
#define SEG_FAILED ((char *)2)
#define MAX_FD_TABLE (1u << 20)
#define MADV_POPULATE_WRITE_ 23 /* Linux >= 5.14; older kernels: EINVAL, ignored */

enum { LOG_CLOSED = 0, LOG_OPENING = 1, LOG_OPEN = 2, LOG_FAILED = 3 };

/* One fd's state, in half a cache line: a hooked transfer on a socket reads its kind and
 * its open record together, from one line instead of two tables. */
struct fd_entry {
    uint64_t e;                   /* kind | slot | gen: see E_MAKE */
    struct gc_record *open[2];    /* [dir] this process's open record of fd (or NULL) */
    uint64_t pad;
};

/* The globals every hooked call reads share one cache line; the record counter, written
 * for every record, has a line of its own (no false sharing with the read-mostly ones). */
static struct {
    int init_state;               /* 0 none, 1 running, 2 done */
    int enabled;                  /* GRIDCKPT_SHIM_DIR set and usable */
    unsigned fdtab_size;
    int log_state;
    struct fd_entry *fdtab;       /* fd -> entry and open records */
    struct gc_ctl_header *ctl;
    struct gc_ctl_slot *slots;
    uint32_t nslots;
    uint32_t pid;
    int log_fd;                   /* the shim's own fd, kept high and protected */
} g_hot __attribute__((aligned(64))) = {.log_fd = -1};
static struct {
    uint64_t next; /* next record index in this process's log */
} g_tail __attribute__((aligned(64)));
#define g_init_state g_hot.init_state
#define g_enabled g_hot.enabled
#define g_fdtab g_hot.fdtab
#define g_fdtab_size g_hot.fdtab_size
#define g_ctl g_hot.ctl
#define g_slots g_hot.slots
#define g_nslots g_hot.nslots
#define g_pid g_hot.pid
#define g_log_state g_hot.log_state
#define g_log_fd g_hot.log_fd
#define g_next g_tail.next
static char *g_segs[MAX_SEGS] __attribute__((aligned(64)));
static int g_grow_lock;
static unsigned g_fd_hwm; /* fds below it may have a table entry */
static uint64_t g_file_size;
static uint64_t g_local_lost;

static char g_dir[4096];
static char g_unit[64]; /* only the first 31 bytes go into the log header */
static char g_env_dir[4200], g_env_unit[128], g_env_ctl[4200], g_env_preload[8192];
static char g_self_path[4096];

static TLS int t_guard;
static TLS uint32_t t_tid;

/* ------------------------------------------------------------------ small helpers */

static void die(const char *msg) {
    /* No stdio: write the message with a raw syscall, then abort. */
    syscall(SYS_write, 2, "gridckpt shim: ", 15);
    syscall(SYS_write, 2, msg, strlen(msg));
    syscall(SYS_write, 2, "\n", 1);
    abort();
}

static void cpu_relax(unsigned *spins) {
    if (++*spins < 64)
        __builtin_ia32_pause();
    else
        sched_yield();
}

static size_t u64_to_dec(char *out, uint64_t v) {
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

static uint64_t now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ record clock
 * Records carry CLOCK_MONOTONIC nanoseconds.  When the kernel itself keeps time with the
 * TSC (clocksource "tsc": constant, synchronised across CPUs), a record reads the TSC and
 * extrapolates from a calibration point taken with clock_gettime at most ~1 ms earlier;
 * the ns-per-tick rate is measured over the whole life of the process.  The value stays
 * within a few tens of ns of clock_gettime's, and the hot path touches one cache line of
 * ours instead of the vDSO's code and data pages.  Other clocksources, or any doubt (an
 * update in progress, a TSC that went backwards or jumped), fall back to clock_gettime.
 * A seqlock guards the calibration; readers never wait, writers only try once. */
#define CLK_WINDOW_NS 1000000ull   /* recalibrate after this long */
#define CLK_BASELINE_NS 1000000ull /* measure the rate over at least this long */
#define CLK_MAX_PAIR 4000u         /* ticks: no calibration from a pair wider than this */

static struct {
    uint32_t seq;       /* odd while a writer updates the fields below */
    uint32_t usable;    /* clocksource is tsc */
    uint32_t best_pair; /* narrowest TSC/clock_gettime pair seen, in ticks */
    uint32_t pad;
    uint64_t tsc0;      /* last calibration point */
    uint64_t mono0;
    uint64_t mult;      /* ns per tick, 32.32 fixed point; 0 until measured */
    uint64_t window;    /* ticks after tsc0 that may be extrapolated; 0 forces a calibration */
    uint64_t tsc_base;  /* first calibration point: the long baseline of the rate */
    uint64_t mono_base;
} g_clk __attribute__((aligned(64)));

#if defined(__x86_64__) || defined(__i386__)
static inline uint64_t read_tsc(void) { return __builtin_ia32_rdtsc(); }
#define HAVE_TSC 1
#else
static inline uint64_t read_tsc(void) { return 0; }
#define HAVE_TSC 0
#endif

#define CLK_LOAD(f) __atomic_load_n(&g_clk.f, __ATOMIC_RELAXED)
#define CLK_STORE(f, v) __atomic_store_n(&g_clk.f, (v), __ATOMIC_RELAXED)

static void clk_init(void) {
    /* The kernel's choice of clocksource tells whether the TSC is trustworthy here. */
    char buf[16] = {0};
    int fd = (int)syscall(SYS_openat, AT_FDCWD, "/sys/devices/system/clocksource/clocksource0/current_clocksource",
                          O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    long n = syscall(SYS_read, fd, buf, sizeof buf - 1);
    syscall(SYS_close, fd);
    if (HAVE_TSC && n >= 3 && memcmp(buf, "tsc", 3) == 0 && (n == 3 || buf[3] == '\n'))
        CLK_STORE(usable, 1); /* the first record takes the first calibration point */
}

/* The real clock; also takes a calibration point if no other thread is doing so. */
static __attribute__((noinline)) uint64_t clk_calibrate(void) {
    uint64_t t1 = read_tsc();
    uint64_t m = now_ns(CLOCK_MONOTONIC);
    uint64_t t2 = read_tsc();
    uint32_t q = __atomic_load_n(&g_clk.seq, __ATOMIC_RELAXED);
    /* Only a tight pair is a good point: an interrupt between the reads would bias it. */
    uint64_t best = CLK_LOAD(best_pair);
    if ((q & 1) || t2 < t1 || t2 - t1 > CLK_MAX_PAIR || (best && t2 - t1 > 2 * best + 64) ||
        !__atomic_compare_exchange_n(&g_clk.seq, &q, q + 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return m;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (!best || t2 - t1 < best)
        CLK_STORE(best_pair, (uint32_t)(t2 - t1));
    uint64_t t = t1 + (t2 - t1) / 2;
    uint64_t tb = CLK_LOAD(tsc_base), mb = CLK_LOAD(mono_base), old = CLK_LOAD(mult);
    uint64_t mult = old;
    if (tb == 0 || t <= tb || m <= mb) { /* first point, or TSC/clock went backwards: start over */
        CLK_STORE(tsc_base, t);
        CLK_STORE(mono_base, m);
        mult = 0;
    } else if (m - mb >= CLK_BASELINE_NS) {
        uint64_t fresh = (uint64_t)(((unsigned __int128)(m - mb) << 32) / (t - tb));
        /* A rate that moved by more than 0.1 %: the TSC jumped; restart the baseline. */
        if (old && (fresh > old + old / 1000 || fresh < old - old / 1000)) {
            CLK_STORE(tsc_base, t);
            CLK_STORE(mono_base, m);
            mult = 0;
        } else {
            mult = fresh;
        }
    }
    CLK_STORE(tsc0, t);
    CLK_STORE(mono0, m);
    CLK_STORE(mult, mult);
    /* Extrapolate over at most 1/32 of the baseline: the pairing jitter of the two ends of
     * the baseline then adds at most 1/32 of itself to a record's time. */
    uint64_t span = mult ? (m - CLK_LOAD(mono_base)) / 32 : 0;
    if (span > CLK_WINDOW_NS)
        span = CLK_WINDOW_NS;
    CLK_STORE(window, mult ? (uint64_t)(((unsigned __int128)span << 32) / mult) : 0);
    __atomic_store_n(&g_clk.seq, q + 2, __ATOMIC_RELEASE);
    return m;
}

/* CLOCK_MONOTONIC in ns for a record. */
static inline uint64_t record_clock(void) {
    if (LIKELY(CLK_LOAD(usable))) {
        uint32_t q = __atomic_load_n(&g_clk.seq, __ATOMIC_ACQUIRE);
        uint64_t tsc0 = CLK_LOAD(tsc0), mono0 = CLK_LOAD(mono0), mult = CLK_LOAD(mult), window = CLK_LOAD(window);
        uint64_t t = read_tsc();
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LIKELY(!(q & 1) && __atomic_load_n(&g_clk.seq, __ATOMIC_RELAXED) == q && t - tsc0 < window))
            return mono0 + (uint64_t)(((unsigned __int128)(t - tsc0) * mult) >> 32);
        return clk_calibrate();
    }
    return now_ns(CLOCK_MONOTONIC);
}

static void save_env(char *dst, size_t cap, const char *name) {
    const char *v = getenv(name);
    dst[0] = 0;
    if (!v)
        return;
    size_t nl = strlen(name), vl = strlen(v);
    if (nl + 1 + vl + 1 > cap)
        return;
    memcpy(dst, name, nl);
    dst[nl] = '=';
    memcpy(dst + nl + 1, v, vl + 1);
}

/* ------------------------------------------------------------------ initialisation */

static void resolve_reals(void) {
#define RESOLVE(name, type)                                                      \
    do {                                                                         \
        void *p = dlsym(RTLD_NEXT, #name);                                       \
        if (p == (void *)&name)                                                  \
            die("dlsym(RTLD_NEXT, \"" #name "\") resolved to the shim itself");  \
        __atomic_store_n(&real_##name, (type)p, __ATOMIC_RELEASE);              \
    } while (0);
    REALS(RESOLVE)
#undef RESOLVE
    if (!real_read || !real_write || !real_close || !real_connect || !real_fcntl || !real_execve)
        die("cannot resolve libc functions with dlsym(RTLD_NEXT)");
}

static void after_fork_child(void);

static void map_control(void) {
    const char *path = getenv("GRIDCKPT_SHIM_CONTROL");
    void *p = MAP_FAILED;
    if (path && *path) {
        int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0) {
            struct stat st;
            if (fstat(fd, &st) == 0) {
                if ((uint64_t)st.st_size < GC_CTL_SIZE && ftruncate(fd, (off_t)GC_CTL_SIZE) != 0)
                    st.st_size = 0;
                else
                    st.st_size = (off_t)GC_CTL_SIZE;
                if (st.st_size)
                    p = mmap(NULL, GC_CTL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            }
            syscall(SYS_close, fd);
        }
    }
    if (p == MAP_FAILED) /* private to this process tree, still shared with forked children */
        p = mmap(NULL, GC_CTL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        g_enabled = 0;
        return;
    }
    g_ctl = (struct gc_ctl_header *)p;
    uint64_t zero = 0;
    __atomic_compare_exchange_n(&g_ctl->magic, &zero, GC_CTL_MAGIC, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    uint32_t z32 = 0;
    __atomic_compare_exchange_n(&g_ctl->nslots, &z32, GC_CTL_NSLOTS, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    __atomic_compare_exchange_n(&g_ctl->version, (z32 = 0, &z32), GC_CTL_VERSION, 0, __ATOMIC_ACQ_REL,
                                __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&g_ctl->magic, __ATOMIC_ACQUIRE) != GC_CTL_MAGIC ||
        __atomic_load_n(&g_ctl->version, __ATOMIC_ACQUIRE) != GC_CTL_VERSION) {
        /* not our layout: keep the program running, with a control page of its own */
        munmap(p, GC_CTL_SIZE);
        g_ctl = NULL;
        if (path && *path) {
            p = mmap(NULL, GC_CTL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
            if (p != MAP_FAILED) {
                g_ctl = (struct gc_ctl_header *)p;
                g_ctl->magic = GC_CTL_MAGIC;
                g_ctl->version = GC_CTL_VERSION;
                g_ctl->nslots = GC_CTL_NSLOTS;
            }
        }
        if (!g_ctl) {
            g_enabled = 0;
            return;
        }
    }
    g_slots = (struct gc_ctl_slot *)((char *)p + GC_CTL_HEADER);
    g_nslots = GC_CTL_NSLOTS;
}

static void do_init(void) {
    resolve_reals();
    const char *dir = getenv("GRIDCKPT_SHIM_DIR");
    const char *unit = getenv("GRIDCKPT_UNIT");
    save_env(g_env_dir, sizeof g_env_dir, "GRIDCKPT_SHIM_DIR");
    save_env(g_env_unit, sizeof g_env_unit, "GRIDCKPT_UNIT");
    save_env(g_env_ctl, sizeof g_env_ctl, "GRIDCKPT_SHIM_CONTROL");
    save_env(g_env_preload, sizeof g_env_preload, "LD_PRELOAD");
    Dl_info info;
    if (dladdr((void *)&do_init, &info) && info.dli_fname && strlen(info.dli_fname) < sizeof g_self_path)
        strcpy(g_self_path, info.dli_fname);
    if (unit)
        strncpy(g_unit, unit, 31);
    if (!dir || !*dir || strlen(dir) >= sizeof g_dir - 64)
        return;
    strcpy(g_dir, dir);

    struct rlimit rl;
    unsigned size = 65536;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rlim_t m = rl.rlim_max > rl.rlim_cur ? rl.rlim_max : rl.rlim_cur;
        size = m == RLIM_INFINITY || m > MAX_FD_TABLE ? MAX_FD_TABLE : (unsigned)m;
        if (size < 1024)
            size = 1024;
    }
    /* The fd table: pages are only backed once touched. */
    void *t = mmap(NULL, (size_t)size * sizeof(struct fd_entry), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (t == MAP_FAILED)
        return;
    g_fdtab = (struct fd_entry *)t;
    g_fdtab_size = size;
    g_pid = (uint32_t)syscall(SYS_getpid);
    g_enabled = 1;
    clk_init();
    map_control();
    if (g_enabled)
        pthread_atfork(NULL, NULL, after_fork_child);
}

static void ensure_init_slow(void) {
    int expected = 0;
    if (__atomic_compare_exchange_n(&g_init_state, &expected, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        int saved = errno;
        do_init();
        errno = saved;
        __atomic_store_n(&g_init_state, 2, __ATOMIC_RELEASE);
        return;
    }
    unsigned spins = 0;
    while (__atomic_load_n(&g_init_state, __ATOMIC_ACQUIRE) != 2) {
        if (t_guard) { /* re-entered from our own initialisation (dlsym): resolve now */
            resolve_reals();
            return;
        }
        cpu_relax(&spins);
    }
}

#define ENSURE_INIT()                                                     \
    do {                                                                  \
        if (UNLIKELY(__atomic_load_n(&g_init_state, __ATOMIC_ACQUIRE) != 2)) \
            ensure_init_slow();                                           \
    } while (0)

__attribute__((constructor)) static void shim_constructor(void) { ENSURE_INIT(); }

/* ------------------------------------------------------------------ the log */

static int move_fd_high(int fd) {
    /* Keep the shim's fd out of the program's way: near the top of the fd space. */
    struct rlimit rl;
    long target = 1000;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur > 64)
        target = (long)rl.rlim_cur - 48;
    if (target < 3)
        return fd;
    int hi = (int)syscall(SYS_fcntl, fd, F_DUPFD_CLOEXEC, target);
    if (hi < 0)
        hi = (int)syscall(SYS_fcntl, fd, F_DUPFD_CLOEXEC, 3);
    if (hi < 0)
        return fd;
    syscall(SYS_close, fd);
    return hi;
}

static int grow_file(uint64_t need) {
    unsigned spins = 0;
    while (__atomic_exchange_n(&g_grow_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax(&spins);
    int ok = 1;
    if (g_file_size < need) {
        if (syscall(SYS_ftruncate, g_log_fd, (off_t)need) == 0)
            g_file_size = need;
        else
            ok = 0;
    }
    __atomic_store_n(&g_grow_lock, 0, __ATOMIC_RELEASE);
    return ok;
}

/* Write the segment's zeros through the page cache in 64 KiB pieces before mapping it:
 * on ext4 that allocates the pages about twice as cheaply as write faults on a hole (it
 * uses large folios), and the MADV_POPULATE_WRITE that follows only has to map them.
 * Best effort: a failure leaves the hole to the page faults, as before. */
#define PREFILL_CHUNK 65536u
static char g_zeros[PREFILL_CHUNK];

static void prefill_segment(uint64_t seg) {
    for (uint64_t off = 0; off < SEG_BYTES; off += PREFILL_CHUNK) {
        uint64_t len = SEG_BYTES - off < PREFILL_CHUNK ? SEG_BYTES - off : PREFILL_CHUNK;
        if (syscall(SYS_pwrite64, g_log_fd, g_zeros, (size_t)len, (off_t)(seg * SEG_BYTES + off)) != (long)len)
            return;
    }
}

static char *map_segment(uint64_t seg) {
    char *cur = __atomic_load_n(&g_segs[seg], __ATOMIC_ACQUIRE);
    if (cur == NULL && __atomic_compare_exchange_n(&g_segs[seg], &cur, SEG_MAPPING, 0, __ATOMIC_ACQ_REL,
                                                   __ATOMIC_ACQUIRE)) {
        char *p = SEG_FAILED;
        if (grow_file((seg + 1) * SEG_BYTES)) {
            prefill_segment(seg);
            void *m = mmap(NULL, SEG_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, g_log_fd, (off_t)(seg * SEG_BYTES));
            if (m != MAP_FAILED) {
                /* Fault the whole segment in now, writable, in one kernel call: one page
                 * fault per 42 records on the hot path costs more than the record itself. */
                madvise(m, SEG_BYTES, MADV_POPULATE_WRITE_);
                p = (char *)m;
            }
        }
        __atomic_store_n(&g_segs[seg], p, __ATOMIC_RELEASE);
        return p;
    }
    unsigned spins = 0;
    while ((cur = __atomic_load_n(&g_segs[seg], __ATOMIC_ACQUIRE)) == SEG_MAPPING)
        cpu_relax(&spins);
    return cur;
}

static struct gc_record *slot_at(uint64_t idx) {
    uint64_t seg = idx / SEG_RECORDS;
    if (UNLIKELY(seg >= MAX_SEGS))
        return NULL;
    char *base = __atomic_load_n(&g_segs[seg], __ATOMIC_ACQUIRE);
    if (UNLIKELY(base == NULL || base == SEG_MAPPING))
        base = map_segment(seg);
    if (UNLIKELY(base == SEG_FAILED))
        return NULL;
    return (struct gc_record *)(base + (idx % SEG_RECORDS) * GC_REC_SIZE);
}

static void open_log_slow(void) {
    int expected = LOG_CLOSED;
    if (!__atomic_compare_exchange_n(&g_log_state, &expected, LOG_OPENING, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        unsigned spins = 0;
        while (__atomic_load_n(&g_log_state, __ATOMIC_ACQUIRE) == LOG_OPENING)
            cpu_relax(&spins);
        return;
    }
    char path[sizeof g_dir + 80];
    size_t n = strlen(g_dir);
    memcpy(path, g_dir, n);
    memcpy(path + n, "/det.", 5);
    n += 5;
    n += u64_to_dec(path + n, g_pid);
    path[n++] = '.';
    uint64_t start = now_ns(CLOCK_REALTIME);
    int fd = -1;
    for (int attempt = 0; attempt < 100 && fd < 0; attempt++) {
        size_t m = n + u64_to_dec(path + n, start + (uint64_t)attempt);
        memcpy(path + m, ".log", 5);
        fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0 && errno != EEXIST)
            break;
    }
    if (fd < 0) {
        __atomic_store_n(&g_log_state, LOG_FAILED, __ATOMIC_RELEASE);
        return;
    }
    g_log_fd = move_fd_high(fd);
    g_file_size = 0;
    struct gc_record *h = slot_at(0);
    if (!h) {
        __atomic_store_n(&g_log_state, LOG_FAILED, __ATOMIC_RELEASE);
        return;
    }
    h->version = GC_REC_VERSION;
    h->kind = GC_KIND_HEADER;
    h->pid = g_pid;
    h->gen = (uint32_t)getppid();
    h->start = start;
    h->mono_ns = now_ns(CLOCK_MONOTONIC);
    memcpy((char *)h + offsetof(struct gc_record, src), g_unit, 32); /* unit name, NUL-padded */
    __atomic_store_n(&h->magic, GC_REC_MAGIC, __ATOMIC_RELEASE);
    __atomic_store_n(&g_next, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&g_log_state, LOG_OPEN, __ATOMIC_RELEASE);
}

static void count_lost(void) {
    __atomic_fetch_add(&g_local_lost, 1, __ATOMIC_RELAXED);
    if (g_ctl)
        __atomic_fetch_add(&g_ctl->lost, 1, __ATOMIC_RELAXED);
}

static void after_fork_child(void) {
    /* Only the forking thread exists: plain stores are safe.  The child must not write into
     * its parent's log: drop the inherited mappings and fd, open its own log lazily. */
    g_pid = (uint32_t)syscall(SYS_getpid);
    t_tid = 0;
    /* The open records are in the parent's log: the child starts with none.  Entries at or
     * above the high-water mark were never set. */
    for (unsigned fd = 0; g_fdtab && fd < g_fd_hwm; fd++)
        g_fdtab[fd].open[0] = g_fdtab[fd].open[1] = NULL;
    if (g_clk.seq & 1) /* a thread of the parent was calibrating */
        g_clk.seq++;
    for (unsigned i = 0; i < MAX_SEGS; i++) { /* no early exit: a fork can leave gaps */
        char *p = g_segs[i];
        if (p == NULL)
            continue;
        if (p != SEG_MAPPING && p != SEG_FAILED)
            munmap(p, SEG_BYTES);
        g_segs[i] = NULL;
    }
    if (g_log_fd >= 0)
        syscall(SYS_close, g_log_fd);
    g_log_fd = -1;
    g_file_size = 0;
    g_grow_lock = 0;
    g_next = 0;
    g_log_state = LOG_CLOSED;
}

/* ------------------------------------------------------------------ connections */

struct conn_key {
    uint32_t family;
    uint8_t local[16], peer[16];
    uint16_t local_port, peer_port;
};

static int norm_addr(const struct sockaddr_storage *ss, uint8_t out[16], uint16_t *port, uint32_t *family) {
    memset(out, 0, 16);
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        memcpy(out, &a->sin_addr, 4);
        *port = ntohs(a->sin_port);
        *family = 4;
        return 0;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        const uint8_t *b = a->sin6_addr.s6_addr;
        static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        *port = ntohs(a->sin6_port);
        if (memcmp(b, mapped, 12) == 0) { /* IPv4-mapped: name it as the IPv4 peer does */
            memcpy(out, b + 12, 4);
            *family = 4;
        } else {
            memcpy(out, b, 16);
            *family = 6;
        }
        return 0;
    }
    return -1;
}

/* Is fd a connected TCP socket?  1 yes (key filled), 0 not TCP at all, -1 TCP but not
 * connected (or a transient error: do not cache). */
static int probe_tcp(int fd, struct conn_key *key, int check_type) {
    int v = 0;
    socklen_t l = sizeof v;
    if (check_type) {
        if (real_getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &l) != 0)
            return errno == ENOTSOCK ? 0 : -1;
        if (v != SOCK_STREAM)
            return 0;
        l = sizeof v;
        if (real_getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &l) != 0)
            return -1;
        if (v != AF_INET && v != AF_INET6)
            return 0;
        l = sizeof v;
        if (real_getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &v, &l) != 0)
            return -1;
        if (v != IPPROTO_TCP && v != 262 /* IPPROTO_MPTCP */)
            return 0;
    }
    struct sockaddr_storage a, b;
    socklen_t la = sizeof a, lb = sizeof b;
    if (getsockname(fd, (struct sockaddr *)&a, &la) != 0 || getpeername(fd, (struct sockaddr *)&b, &lb) != 0)
        return -1;
    uint32_t f1, f2;
    memset(key, 0, sizeof *key);
    if (norm_addr(&a, key->local, &key->local_port, &f1) || norm_addr(&b, key->peer, &key->peer_port, &f2))
        return 0;
    key->family = f1 == f2 ? f1 : 6;
    return 1;
}

static uint32_t key_hash(const struct conn_key *k) {
    const uint8_t *p = (const uint8_t *)k;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof *k; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    uint32_t t = (uint32_t)(h ^ (h >> 32));
    return t < 2 ? t + 2 : t;
}

static int key_equal(const struct gc_ctl_slot *s, const struct conn_key *k) {
    return s->family == k->family && s->local_port == k->local_port && s->peer_port == k->peer_port &&
           memcmp(s->local, k->local, 16) == 0 && memcmp(s->peer, k->peer, 16) == 0;
}

/* Find or claim the control-page slot of an address pair (lock-free open addressing). */
static int64_t find_slot(const struct conn_key *k) {
    uint32_t tag = key_hash(k);
    for (uint32_t i = 0; i < g_nslots; i++) {
        uint32_t idx = (uint32_t)((tag + i) % g_nslots);
        struct gc_ctl_slot *s = &g_slots[idx];
        unsigned spins = 0;
        for (;;) {
            uint32_t t = __atomic_load_n(&s->tag, __ATOMIC_ACQUIRE);
            if (t == GC_SLOT_EMPTY) {
                if (__atomic_compare_exchange_n(&s->tag, &t, GC_SLOT_BUSY, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                    s->family = (uint16_t)k->family;
                    memcpy(s->local, k->local, 16);
                    memcpy(s->peer, k->peer, 16);
                    s->local_port = k->local_port;
                    s->peer_port = k->peer_port;
                    __atomic_store_n(&s->tag, tag, __ATOMIC_RELEASE);
                    return idx;
                }
                continue;
            }
            if (t == GC_SLOT_BUSY) {
                cpu_relax(&spins);
                continue;
            }
            if (t == tag && key_equal(s, k))
                return idx;
            break;
        }
    }
    return -1;
}

/* A new connection on fd (accept, connect): next generation of its pair, offsets at 0.
 * An fd of unknown origin (inherited over exec, passed over a unix socket): the pair's
 * current generation.  Returns the fd entry, or K_UNKNOWN if fd is not usable now. */
static uint64_t resolve(int fd, int is_new, int check_type) {
    struct conn_key k;
    int r = probe_tcp(fd, &k, check_type);
    if (r == 0)
        return E_MAKE(K_OTHER, 0, 0);
    if (r < 0)
        return K_UNKNOWN;
    int64_t idx = find_slot(&k);
    if (idx < 0) {
        count_lost();
        return K_UNKNOWN;
    }
    struct gc_ctl_slot *s = &g_slots[idx];
    uint32_t gen;
    if (!is_new) {
        uint32_t c = __atomic_load_n(&s->gen_count, __ATOMIC_ACQUIRE);
        if (c == 0 && __atomic_compare_exchange_n(&s->gen_count, &c, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            c = 1;
        gen = c - 1;
    } else {
        __atomic_store_n(&s->send_off, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->recv_off, 0, __ATOMIC_RELAXED);
        gen = __atomic_fetch_add(&s->gen_count, 1, __ATOMIC_ACQ_REL);
    }
    return E_MAKE(K_CONN, (uint64_t)idx, gen);
}

static inline uint64_t fdtab_get(int fd) {
    return (unsigned)fd < g_fdtab_size ? __atomic_load_n(&g_fdtab[fd].e, __ATOMIC_RELAXED) : K_UNKNOWN;
}

/* Raise the fd high-water mark to at least `hwm` (threads may race: keep the largest). */
static void bump_fd_hwm(unsigned hwm) {
    unsigned cur = __atomic_load_n(&g_fd_hwm, __ATOMIC_RELAXED);
    while (cur < hwm && !__atomic_compare_exchange_n(&g_fd_hwm, &cur, hwm, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

/* Every change of an fd's entry (close, dup target, new socket or file, classification)
 * also forgets its open records: a record is only continued by the fd it was made for. */
static inline void fdtab_put(int fd, uint64_t e) {
    if ((unsigned)fd < g_fdtab_size) {
        struct fd_entry *f = &g_fdtab[fd];
        __atomic_store_n(&f->e, e, __ATOMIC_RELAXED);
        __atomic_store_n(&f->open[0], NULL, __ATOMIC_RELAXED);
        __atomic_store_n(&f->open[1], NULL, __ATOMIC_RELAXED);
        if ((unsigned)fd >= __atomic_load_n(&g_fd_hwm, __ATOMIC_RELAXED))
            bump_fd_hwm((unsigned)fd + 1);
    }
}

/* The key of one direction of the connection an fd entry names (slot, gen, kind): stored in
 * each record, so a record is only ever continued for the same connection direction. */
#define REC_KEY(e, kind) (((e) & ~(uint64_t)0xff) | (uint64_t)(kind))
#define OPEN_SLOT(fd, kind) (&g_fdtab[fd].open[(kind) == GC_KIND_RECV])

/* Fill the reserved record `r` and publish it (magic last, release). */
static inline __attribute__((always_inline)) void write_record(struct gc_record *r, const struct gc_ctl_slot *s,
                                                               int kind, uint64_t e, uint64_t start, uint64_t n,
                                                               uint32_t tid) {
    r->version = GC_REC_VERSION;
    r->kind = (uint8_t)kind;
    r->family = (uint8_t)s->family;
    r->flags = 0;
    r->pid = g_pid;
    r->gen = E_GEN(e);
    r->start = start;
    r->end = start + n;
    r->interval = __atomic_load_n(&g_ctl->interval, __ATOMIC_RELAXED);
    r->mono_ns = record_clock();
    if (kind == GC_KIND_SEND) {
        memcpy(r->src, s->local, 16);
        memcpy(r->dst, s->peer, 16);
        r->src_port = s->local_port;
        r->dst_port = s->peer_port;
    } else {
        memcpy(r->src, s->peer, 16);
        memcpy(r->dst, s->local, 16);
        r->src_port = s->peer_port;
        r->dst_port = s->local_port;
    }
    r->tid = tid;
    r->conn_key = REC_KEY(e, kind);
    __atomic_store_n(&r->magic, GC_REC_MAGIC, __ATOMIC_RELEASE);
    /* Bring the next record's cache lines in for writing now, while the program runs,
     * rather than stalling on the miss at the next record. */
    if (LIKELY(((uintptr_t)(r + 1) & 4095) + 2 * GC_REC_SIZE <= 4096)) {
        __builtin_prefetch((char *)(r + 1), 1, 3);
        __builtin_prefetch((char *)(r + 1) + 64, 1, 3);
    }
}

/* A record slot in this process's log.  In a single-threaded process (glibc's
 * __libc_single_threaded, weak: older glibc means "maybe not") no other thread can race
 * for the counter, and one non-locked read-modify-write instruction is still atomic with
 * respect to a signal handler on this thread: no lock prefix, no store-buffer drain. */
extern char __libc_single_threaded __attribute__((weak));

static inline uint64_t reserve_record(void) {
#if defined(__x86_64__)
    if (LIKELY(&__libc_single_threaded != NULL && __libc_single_threaded)) {
        uint64_t v = 1;
        __asm__ volatile("xaddq %0, %1" : "+r"(v), "+m"(g_next) : : "memory");
        return v;
    }
#endif
    return __atomic_fetch_add(&g_next, 1, __ATOMIC_RELAXED);
}

/* The general path of a record: classifies the fd, opens the log, maps a new segment,
 * learns the thread id.  May make syscalls: guarded against re-entry, keeps errno.
 * `reserved` is a record index already taken by the fast path (or UINT64_MAX), `start`
 * the stream offset it already took (valid only with `reserved`). */
static __attribute__((noinline, cold)) void note_slow(int fd, int kind, uint64_t n, uint64_t e,
                                                      uint64_t reserved, uint64_t start) {
    int saved = errno;
    t_guard = 1;
    if (E_KIND(e) == K_UNKNOWN || E_KIND(e) == K_PENDING) {
        e = resolve(fd, E_KIND(e) == K_PENDING, E_KIND(e) == K_UNKNOWN);
        if (E_KIND(e) != K_UNKNOWN)
            fdtab_put(fd, e);
        if (E_KIND(e) != K_CONN)
            goto out;
    }
    {
        struct gc_ctl_slot *s = &g_slots[E_SLOT(e)];
        if (reserved == UINT64_MAX) {
            uint64_t *off = kind == GC_KIND_SEND ? &s->send_off : &s->recv_off;
            start = __atomic_fetch_add(off, n, __ATOMIC_RELAXED);
            if (UNLIKELY(__atomic_load_n(&g_log_state, __ATOMIC_ACQUIRE) != LOG_OPEN)) {
                open_log_slow();
                if (__atomic_load_n(&g_log_state, __ATOMIC_ACQUIRE) != LOG_OPEN) {
                    count_lost();
                    goto out;
                }
            }
            reserved = reserve_record();
        }
        struct gc_record *r = slot_at(reserved);
        if (UNLIKELY(!r)) {
            count_lost();
            goto out;
        }
        if (UNLIKELY(!t_tid))
            t_tid = (uint32_t)syscall(SYS_gettid);
        write_record(r, s, kind, e, start, n, t_tid);
        if ((unsigned)fd < g_fdtab_size) /* published once complete: see note() */
            __atomic_store_n(OPEN_SLOT(fd, kind), r, __ATOMIC_RELEASE);
    }
out:
    t_guard = 0;
    errno = saved;
}

/* Record `n` > 0 bytes moved on fd (fdtab entry `e`, not K_OTHER) in direction `kind`.
 * The common case (a known TCP fd, log open, segment mapped, thread id known) makes no
 * call at all and never touches errno; it needs no re-entry guard beyond the check (a
 * signal handler's record reserves its own offsets and slot).
 *
 * Coalescing: when this process's last record for fd and direction (the fd's entry) belongs to the
 * same connection direction and interval, and ends exactly where this transfer's bytes
 * start, one compare-and-swap moves its end: no new record, no clock read.  The CAS fails
 * when the range is not contiguous (another thread, process or fd took bytes in between)
 * or when a reader closed the record (GC_END_CLOSED set in end): then a new record is
 * appended and becomes the open one.  That makes it safe with threads, signal handlers,
 * dup'ed fds and processes sharing the socket, without a lock. */
static __attribute__((noinline)) void note_transfer(int fd, int kind, ssize_t n, uint64_t e) {
    if (UNLIKELY(!g_enabled || t_guard))
        return;
    if (UNLIKELY(E_KIND(e) != K_CONN || (unsigned)fd >= g_fdtab_size ||
                 __atomic_load_n(&g_log_state, __ATOMIC_ACQUIRE) != LOG_OPEN)) {
        note_slow(fd, kind, (uint64_t)n, e, UINT64_MAX, 0);
        return;
    }
    struct gc_ctl_slot *s = &g_slots[E_SLOT(e)];
    uint64_t start = __atomic_fetch_add(kind == GC_KIND_SEND ? &s->send_off : &s->recv_off, (uint64_t)n,
                                        __ATOMIC_RELAXED);
    struct gc_record **op = OPEN_SLOT(fd, kind);
    struct gc_record *o = __atomic_load_n(op, __ATOMIC_ACQUIRE); /* complete: see below */
    if (LIKELY(o != NULL) && LIKELY(o->conn_key == REC_KEY(e, kind)) &&
        LIKELY(o->interval == __atomic_load_n(&g_ctl->interval, __ATOMIC_RELAXED))) {
        uint64_t expected = start;
        if (LIKELY(__atomic_compare_exchange_n(&o->end, &expected, start + (uint64_t)n, 0, __ATOMIC_RELAXED,
                                               __ATOMIC_RELAXED)))
            return;
    }
    uint64_t idx = reserve_record();
    uint64_t seg = idx / SEG_RECORDS;
    char *base = LIKELY(seg < MAX_SEGS) ? __atomic_load_n(&g_segs[seg], __ATOMIC_ACQUIRE) : NULL;
    uint32_t tid = t_tid;
    if (UNLIKELY(base == NULL || base == SEG_MAPPING || base == SEG_FAILED || tid == 0)) {
        note_slow(fd, kind, (uint64_t)n, e, idx, start);
        return;
    }
    struct gc_record *r = (struct gc_record *)(base + (idx % SEG_RECORDS) * GC_REC_SIZE);
    write_record(r, s, kind, e, start, (uint64_t)n, tid);
    /* Only a complete record becomes the open one: another thread or a signal handler that
     * finds it in the fd's entry sees all of its fields (release here, acquire above). */
    __atomic_store_n(op, r, __ATOMIC_RELEASE);
}

/* Record that `n` bytes moved on fd in direction `kind`.  Called after every transfer;
 * records only if n > 0.  Inlined into every hook: a non-socket fd costs one table load
 * and no call (the transfer path, out of line, would make every hook save six registers
 * first). */
static inline __attribute__((always_inline)) void note(int fd, int kind, ssize_t n) {
    if (n <= 0)
        return;
    uint64_t e;
    if (LIKELY((unsigned)fd < g_fdtab_size)) { /* 0 while the shim is disabled */
        e = __atomic_load_n(&g_fdtab[fd].e, __ATOMIC_RELAXED);
        if (LIKELY(E_KIND(e) == K_OTHER))
            return;
    } else {
        e = K_UNKNOWN; /* beyond the table: classify every time */
    }
    note_transfer(fd, kind, n, e);
}

/* Track a new fd from accept/connect; or mark a fresh fd of another kind. */
static void track_new(int fd, int is_new) {
    if (!g_enabled || t_guard || fd < 0)
        return;
    int saved = errno;
    t_guard = 1;
    uint64_t e = resolve(fd, is_new, 1);
    fdtab_put(fd, e);
    t_guard = 0;
    errno = saved;
}

/* A pending non-blocking connect that turned out established: count its generation. */
static void settle_pending(int fd) {
    if (!g_enabled || t_guard || E_KIND(fdtab_get(fd)) != K_PENDING)
        return;
    int saved = errno;
    t_guard = 1;
    uint64_t e = resolve(fd, 1, 0);
    if (E_KIND(e) == K_CONN)
        fdtab_put(fd, e);
    t_guard = 0;
    errno = saved;
}

static inline int is_shim_fd(int fd) { return fd >= 0 && fd == __atomic_load_n(&g_log_fd, __ATOMIC_RELAXED); }

/* The program wants fd number `fd` (dup2 target, close_range): move the shim's fd away. */
static void evict_shim_fd(int fd) {
    if (!is_shim_fd(fd))
        return;
    int saved = errno;
    int hi = (int)syscall(SYS_fcntl, fd, F_DUPFD_CLOEXEC, fd + 1);
    if (hi < 0)
        hi = (int)syscall(SYS_fcntl, fd, F_DUPFD_CLOEXEC, 3);
    if (hi >= 0)
        __atomic_store_n(&g_log_fd, hi, __ATOMIC_RELEASE);
    errno = saved;
}

/* ------------------------------------------------------------------ hooks: data */

EXPORT ssize_t read(int fd, void *buf, size_t n) {
    ENSURE_INIT();
    ssize_t r = real_read(fd, buf, n);
    note(fd, GC_KIND_RECV, r);
    return r;
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen) {
    ENSURE_INIT();
    ssize_t r = real___read_chk(fd, buf, n, buflen);
    note(fd, GC_KIND_RECV, r);
    return r;
}

EXPORT ssize_t write(int fd, const void *buf, size_t n) {
    ENSURE_INIT();
    ssize_t r = real_write(fd, buf, n);
    note(fd, GC_KIND_SEND, r);
    return r;
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt) {
    ENSURE_INIT();
    ssize_t r = real_readv(fd, iov, cnt);
    note(fd, GC_KIND_RECV, r);
    return r;
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    ENSURE_INIT();
    ssize_t r = real_writev(fd, iov, cnt);
    note(fd, GC_KIND_SEND, r);
    return r;
}

/* MSG_PEEK moves no bytes; MSG_OOB bytes are outside the ordinary stream. */
#define RECV_COUNTS(flags) (!((flags) & (MSG_PEEK | MSG_OOB)))

EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags) {
    ENSURE_INIT();
    ssize_t r = real_recv(fd, buf, n, flags);
    if (RECV_COUNTS(flags))
        note(fd, GC_KIND_RECV, r);
    return r;
}

EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags) {
    ENSURE_INIT();
    ssize_t r = real___recv_chk(fd, buf, n, buflen, flags);
    if (RECV_COUNTS(flags))
        note(fd, GC_KIND_RECV, r);
    return r;
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *a, socklen_t *al) {
    ENSURE_INIT();
    ssize_t r = real_recvfrom(fd, buf, n, flags, a, al);
    if (RECV_COUNTS(flags))
        note(fd, GC_KIND_RECV, r);
    return r;
}

EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags, struct sockaddr *a,
                              socklen_t *al) {
    ENSURE_INIT();
    ssize_t r = real___recvfrom_chk(fd, buf, n, buflen, flags, a, al);
    if (RECV_COUNTS(flags))
        note(fd, GC_KIND_RECV, r);
    return r;
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *m, int flags) {
    ENSURE_INIT();
    ssize_t r = real_recvmsg(fd, m, flags);
    if (RECV_COUNTS(flags))
        note(fd, GC_KIND_RECV, r);
    return r;
}

EXPORT int recvmmsg(int fd, struct mmsghdr *v, unsigned int vlen, int flags, struct timespec *tmo) {
    ENSURE_INIT();
    int r = real_recvmmsg(fd, v, vlen, flags, tmo);
    if (r > 0 && RECV_COUNTS(flags)) {
        uint64_t total = 0;
        for (int i = 0; i < r; i++)
            total += v[i].msg_len;
        note(fd, GC_KIND_RECV, (ssize_t)total);
    }
    return r;
}

EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags) {
    ENSURE_INIT();
    ssize_t r = real_send(fd, buf, n, flags);
    if (!(flags & MSG_OOB))
        note(fd, GC_KIND_SEND, r);
    return r;
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *a, socklen_t al) {
    ENSURE_INIT();
    ssize_t r = real_sendto(fd, buf, n, flags, a, al);
    if (!(flags & MSG_OOB))
        note(fd, GC_KIND_SEND, r);
    return r;
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *m, int flags) {
    ENSURE_INIT();
    ssize_t r = real_sendmsg(fd, m, flags);
    if (!(flags & MSG_OOB))
        note(fd, GC_KIND_SEND, r);
    return r;
}

EXPORT int sendmmsg(int fd, struct mmsghdr *v, unsigned int vlen, int flags) {
    ENSURE_INIT();
    int r = real_sendmmsg(fd, v, vlen, flags);
    if (r > 0 && !(flags & MSG_OOB)) {
        uint64_t total = 0;
        for (int i = 0; i < r; i++)
            total += v[i].msg_len;
        note(fd, GC_KIND_SEND, (ssize_t)total);
    }
    return r;
}

EXPORT ssize_t sendfile(int out, int in, off_t *off, size_t n) {
    ENSURE_INIT();
    ssize_t r = real_sendfile(out, in, off, n);
    note(in, GC_KIND_RECV, r);
    note(out, GC_KIND_SEND, r);
    return r;
}

EXPORT ssize_t sendfile64(int out, int in, off_t *off, size_t n) {
    ENSURE_INIT();
    ssize_t r = (real_sendfile64 ? real_sendfile64 : real_sendfile)(out, in, off, n);
    note(in, GC_KIND_RECV, r);
    note(out, GC_KIND_SEND, r);
    return r;
}

EXPORT ssize_t splice(int in, loff_t *offin, int out, loff_t *offout, size_t n, unsigned int flags) {
    ENSURE_INIT();
    ssize_t r = real_splice(in, offin, out, offout, n, flags);
    note(in, GC_KIND_RECV, r);
    note(out, GC_KIND_SEND, r);
    return r;
}

/* ------------------------------------------------------------------ hooks: fd life */

EXPORT int connect(int fd, const struct sockaddr *a, socklen_t al) {
    ENSURE_INIT();
    int r = real_connect(fd, a, al);
    if (g_enabled && !t_guard) {
        if (r == 0)
            track_new(fd, 1);
        else if (errno == EINPROGRESS)
            fdtab_put(fd, E_MAKE(K_PENDING, 0, 0));
    }
    return r;
}

EXPORT int accept(int fd, struct sockaddr *a, socklen_t *al) {
    ENSURE_INIT();
    int r = real_accept(fd, a, al);
    track_new(r, 1);
    return r;
}

EXPORT int accept4(int fd, struct sockaddr *a, socklen_t *al, int flags) {
    ENSURE_INIT();
    int r = real_accept4(fd, a, al, flags);
    track_new(r, 1);
    return r;
}

EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len) {
    ENSURE_INIT();
    int r = real_getsockopt(fd, level, name, val, len);
    if (r == 0 && level == SOL_SOCKET && name == SO_ERROR && val && *(int *)val == 0)
        settle_pending(fd);
    return r;
}

EXPORT int shutdown(int fd, int how) {
    ENSURE_INIT();
    settle_pending(fd);
    return real_shutdown(fd, how);
}

EXPORT int close(int fd) {
    ENSURE_INIT();
    if (UNLIKELY(is_shim_fd(fd))) {
        errno = EBADF; /* not the program's fd */
        return -1;
    }
    settle_pending(fd);
    fdtab_put(fd, K_UNKNOWN);
    int r = real_close(fd);
    fdtab_put(fd, K_UNKNOWN);
    return r;
}

EXPORT int fclose(FILE *f) {
    ENSURE_INIT();
    int fd = f ? fileno(f) : -1;
    int r = real_fclose(f);
    if (fd >= 0)
        fdtab_put(fd, K_UNKNOWN);
    return r;
}

static void clear_range(unsigned first, unsigned last) {
    if (!g_fdtab)
        return;
    if (last >= g_fdtab_size)
        last = g_fdtab_size - 1;
    for (unsigned i = first; i <= last && i < g_fdtab_size; i++)
        if (g_fdtab[i].e)
            fdtab_put((int)i, K_UNKNOWN);
}

static int close_range_sys(unsigned first, unsigned last, int flags) {
    if (real_close_range)
        return real_close_range(first, last, flags);
    return (int)syscall(SYS_close_range, first, last, flags);
}

EXPORT int close_range(unsigned int first, unsigned int last, int flags) {
    ENSURE_INIT();
    int sfd = __atomic_load_n(&g_log_fd, __ATOMIC_RELAXED);
    int r;
    if (sfd >= 0 && (unsigned)sfd >= first && (unsigned)sfd <= last) {
        r = 0;
        if ((unsigned)sfd > first)
            r = close_range_sys(first, (unsigned)sfd - 1, flags);
        if (r == 0 && (unsigned)sfd < last)
            r = close_range_sys((unsigned)sfd + 1, last, flags);
    } else {
        r = close_range_sys(first, last, flags);
    }
    if (r == 0 && !(flags & CLOSE_RANGE_CLOEXEC))
        clear_range(first, last);
    return r;
}

EXPORT void closefrom(int low) {
    ENSURE_INIT();
    if (low < 0)
        low = 0;
    int sfd = __atomic_load_n(&g_log_fd, __ATOMIC_RELAXED);
    if (sfd >= low) {
        if (sfd > low)
            close_range_sys((unsigned)low, (unsigned)sfd - 1, 0);
        close_range_sys((unsigned)sfd + 1, ~0u, 0);
    } else if (real_closefrom) {
        real_closefrom(low);
    } else {
        close_range_sys((unsigned)low, ~0u, 0);
    }
    clear_range((unsigned)low, ~0u);
}

static void copy_entry(int from, int to) {
    uint64_t e = fdtab_get(from);
    fdtab_put(to, E_KIND(e) == K_PENDING ? K_UNKNOWN : e);
}

EXPORT int dup(int fd) {
    ENSURE_INIT();
    int r = real_dup(fd);
    if (r >= 0)
        copy_entry(fd, r);
    return r;
}

EXPORT int dup2(int fd, int fd2) {
    ENSURE_INIT();
    if (fd != fd2)
        evict_shim_fd(fd2);
    int r = real_dup2(fd, fd2);
    if (r >= 0 && fd != fd2)
        copy_entry(fd, r);
    return r;
}

EXPORT int dup3(int fd, int fd2, int flags) {
    ENSURE_INIT();
    if (fd != fd2)
        evict_shim_fd(fd2);
    int r = real_dup3(fd, fd2, flags);
    if (r >= 0)
        copy_entry(fd, r);
    return r;
}

static int fcntl_common(fcntl_fn fn, int fd, int cmd, void *arg) {
    int r = fn(fd, cmd, arg);
    if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
        copy_entry(fd, r);
    return r;
}

EXPORT int fcntl(int fd, int cmd, ...) {
    ENSURE_INIT();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(real_fcntl, fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...) {
    ENSURE_INIT();
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(real_fcntl64 ? real_fcntl64 : real_fcntl, fd, cmd, arg);
}

EXPORT int socket(int domain, int type, int proto) {
    ENSURE_INIT();
    int r = real_socket(domain, type, proto);
    if (r >= 0) {
        int tcp = (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM;
        fdtab_put(r, tcp ? K_UNKNOWN : E_MAKE(K_OTHER, 0, 0));
    }
    return r;
}

EXPORT int socketpair(int domain, int type, int proto, int sv[2]) {
    ENSURE_INIT();
    int r = real_socketpair(domain, type, proto, sv);
    if (r == 0) {
        fdtab_put(sv[0], E_MAKE(K_OTHER, 0, 0));
        fdtab_put(sv[1], E_MAKE(K_OTHER, 0, 0));
    }
    return r;
}

/* open() never returns a socket: a file, pipe or device, recorded as such. */
#define OPEN_HOOK(name, ...)                                  \
    ENSURE_INIT();                                            \
    mode_t mode = 0;                                          \
    if (flags & (O_CREAT | __O_TMPFILE)) {                    \
        va_list ap;                                           \
        va_start(ap, flags);                                  \
        mode = (mode_t)va_arg(ap, int);                       \
        va_end(ap);                                           \
    }                                                         \
    int r = real_##name(__VA_ARGS__, mode);                   \
    if (r >= 0)                                               \
        fdtab_put(r, E_MAKE(K_OTHER, 0, 0));                     \
    return r;

EXPORT int open(const char *path, int flags, ...) { OPEN_HOOK(open, path, flags) }
EXPORT int open64(const char *path, int flags, ...) { OPEN_HOOK(open64, path, flags) }
EXPORT int openat(int dfd, const char *path, int flags, ...) { OPEN_HOOK(openat, dfd, path, flags) }
EXPORT int openat64(int dfd, const char *path, int flags, ...) { OPEN_HOOK(openat64, dfd, path, flags) }

EXPORT int pipe(int p[2]) {
    ENSURE_INIT();
    int r = real_pipe(p);
    if (r == 0) {
        fdtab_put(p[0], E_MAKE(K_OTHER, 0, 0));
        fdtab_put(p[1], E_MAKE(K_OTHER, 0, 0));
    }
    return r;
}

EXPORT int pipe2(int p[2], int flags) {
    ENSURE_INIT();
    int r = real_pipe2(p, flags);
    if (r == 0) {
        fdtab_put(p[0], E_MAKE(K_OTHER, 0, 0));
        fdtab_put(p[1], E_MAKE(K_OTHER, 0, 0));
    }
    return r;
}

/* ------------------------------------------------------------------ hooks: exec */

#define ENV_EXTRA 4
#define ENV_MAX 1024 /* bigger environments are passed through unchanged */

static int env_has(char *const envp[], const char *assignment) {
    const char *eq = strchr(assignment, '=');
    size_t nl = (size_t)(eq - assignment) + 1;
    for (size_t i = 0; envp[i]; i++)
        if (strncmp(envp[i], assignment, nl) == 0)
            return 1;
    return 0;
}

/* Build, on the caller's stack, an environment that still carries the shim's settings.
 * Returns envp itself when nothing is missing. */
static char *const *fix_env(char *const envp[], char **out, size_t cap, char *preload_buf, size_t pcap) {
    if (!g_enabled || !envp || !g_env_dir[0])
        return envp;
    size_t n = 0;
    while (envp[n])
        n++;
    if (n + ENV_EXTRA + 1 > cap)
        return envp;
    const char *ours[] = {g_env_dir, g_env_unit, g_env_ctl};
    int missing = 0;
    for (size_t j = 0; j < 3; j++)
        if (ours[j][0] && !env_has(envp, ours[j]))
            missing = 1;
    const char *preload_entry = NULL;
    int preload_ok = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(envp[i], "LD_PRELOAD=", 11) == 0) {
            preload_entry = envp[i];
            preload_ok = g_self_path[0] && strstr(envp[i], g_self_path) != NULL;
        }
    if (!missing && preload_ok)
        return envp;
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (envp[i] != preload_entry)
            out[m++] = envp[i];
    for (size_t j = 0; j < 3; j++)
        if (ours[j][0] && !env_has(envp, ours[j]))
            out[m++] = (char *)ours[j];
    if (preload_ok) {
        out[m++] = (char *)preload_entry;
    } else if (preload_entry && g_self_path[0]) {
        size_t sl = strlen(g_self_path), rest = strlen(preload_entry + 11);
        if (11 + sl + 1 + rest + 1 <= pcap) {
            memcpy(preload_buf, "LD_PRELOAD=", 11);
            memcpy(preload_buf + 11, g_self_path, sl);
            preload_buf[11 + sl] = ':';
            memcpy(preload_buf + 12 + sl, preload_entry + 11, rest + 1);
            out[m++] = preload_buf;
        } else {
            out[m++] = (char *)preload_entry;
        }
    } else if (g_env_preload[0]) {
        out[m++] = g_env_preload;
    }
    out[m] = NULL;
    return out;
}

#define WITH_FIXED_ENV(envp, fixed)     \
    char *env_buf_[ENV_MAX];            \
    char preload_buf_[4096];            \
    char *const *fixed = fix_env(envp, env_buf_, ENV_MAX, preload_buf_, sizeof preload_buf_)

EXPORT int execve(const char *path, char *const argv[], char *const envp[]) {
    ENSURE_INIT();
    WITH_FIXED_ENV(envp, e);
    return real_execve(path, argv, e);
}

EXPORT int execvpe(const char *file, char *const argv[], char *const envp[]) {
    ENSURE_INIT();
    WITH_FIXED_ENV(envp, e);
    return real_execvpe(file, argv, e);
}

EXPORT int fexecve(int fd, char *const argv[], char *const envp[]) {
    ENSURE_INIT();
    WITH_FIXED_ENV(envp, e);
    return real_fexecve(fd, argv, e);
}

EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                       const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    ENSURE_INIT();
    WITH_FIXED_ENV(envp, e);
    return real_posix_spawn(pid, path, fa, attr, argv, e);
}

EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                        const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    ENSURE_INIT();
    WITH_FIXED_ENV(envp, e);
    return real_posix_spawnp(pid, file, fa, attr, argv, e);
}
