/* Micro-benchmarks for the shim (driven by bench/bench_shim.py, with and without LD_PRELOAD).
 *   benchprog pingpong ROUNDS     1-byte TCP ping-pong over loopback between two processes;
 *                                 prints "ns_per_round <x>"
 *   benchprog bulk MIB            64 KiB writes -> 64 KiB reads over loopback TCP;
 *                                 prints "mib_per_s <x>"
 *   benchprog fileread FILE N     N read() calls of 4 KiB on a regular file (lseek back at EOF);
 *                                 prints "ns_per_read <x>"
 *   benchprog ab-pingpong ROUNDS BLOCKS | ab-bulk MIB BLOCKS | ab-fileread FILE N BLOCKS
 *                                 the same work in BLOCKS blocks that alternate (ABBA) between
 *                                 the functions as linked (the shim's hooks when it is
 *                                 preloaded) and libc's own, looked up in libc; both ends of a
 *                                 connection switch together.  Prints the median block of
 *                                 each: "hooked <x> direct <y>" (ns per round or read, or MiB/s).
 *                                 Without the shim both are libc's: an A/A of the method.
 * BENCH_CPU=n pins the process (and its forked peer) to CPU n. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <sched.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *m) {
    perror(m);
    exit(1);
}

/* A connected loopback pair: *a in this process, *b to hand to the child. */
static void tcp_pair(int *a, int *b) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    if (bind(l, (void *)&sa, len) || listen(l, 1) || getsockname(l, (void *)&sa, &len))
        die("listen");
    *a = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(*a, (void *)&sa, len))
        die("connect");
    *b = accept(l, NULL, NULL);
    if (*b < 0)
        die("accept");
    int one = 1;
    setsockopt(*a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(*b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    close(l);
}

static void echo_child(int a, int b, long per);

static int pingpong(long rounds) {
    int a, b;
    tcp_pair(&a, &b);
    pid_t p = fork();
    if (p == 0)
        echo_child(a, b, 0);
    close(b);
    char c = 'x';
    for (long i = 0; i < rounds / 10; i++) /* warm-up */
        if (send(a, &c, 1, 0) != 1 || recv(a, &c, 1, 0) != 1)
            die("pingpong");
    double t0 = now();
    for (long i = 0; i < rounds; i++)
        if (send(a, &c, 1, 0) != 1 || recv(a, &c, 1, 0) != 1)
            die("pingpong");
    double t = now() - t0;
    close(a);
    waitpid(p, NULL, 0);
    printf("ns_per_round %.1f\n", t * 1e9 / rounds);
    return 0;
}

#define WARMUP_MIB 64L

static int bulk(long mib) {
    int a, b;
    tcp_pair(&a, &b);
    static char buf[65536];
    pid_t p = fork();
    if (p == 0) {
        close(a);
        memset(buf, 'y', sizeof buf);
        long total = (mib + WARMUP_MIB) * 1048576;
        while (total > 0) {
            ssize_t w = write(b, buf, sizeof buf);
            if (w <= 0)
                _exit(1);
            total -= w;
        }
        close(b);
        _exit(0);
    }
    close(b);
    long warm = 0; /* steady state only: the first WARMUP_MIB (log creation etc.) are not timed */
    while (warm < WARMUP_MIB * 1048576L) {
        ssize_t r = read(a, buf, sizeof buf);
        if (r <= 0)
            die("warm-up read");
        warm += r;
    }
    double t0 = now();
    long got = warm - WARMUP_MIB * 1048576L;
    for (;;) {
        ssize_t r = read(a, buf, sizeof buf);
        if (r < 0)
            die("read");
        if (r == 0)
            break;
        got += r;
    }
    double t = now() - t0;
    waitpid(p, NULL, 0);
    if (got != mib * 1048576)
        die("short bulk");
    printf("mib_per_s %.1f\n", got / 1048576.0 / t);
    return 0;
}

static int fileread(const char *path, long n) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die("open");
    static char buf[4096];
    double t0 = now();
    for (long i = 0; i < n; i++) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0)
            die("read");
        if (r == 0)
            lseek(fd, 0, SEEK_SET);
    }
    double t = now() - t0;
    close(fd);
    printf("ns_per_read %.1f\n", t * 1e9 / n);
    return 0;
}

/* Pin to one CPU (inherited by the forked peer): on a VM, waking an idle vCPU for every
 * message costs tens of microseconds and varies wildly; on one CPU the numbers are stable
 * and every nanosecond the shim adds shows. */
static void pin(void) {
    const char *c = getenv("BENCH_CPU");
    if (!c || !*c)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(atoi(c), &set);
    sched_setaffinity(0, sizeof set, &set);
}

/* ------------------------------------------------------------ in-process A/B */

struct io {
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*recv)(int, void *, size_t, int);
};
/* 0: as linked (hooked under the shim), 1: libc's own (ab_init) */
static struct io g_io[2] = {{read, write, send, recv}, {read, write, send, recv}};

static void ab_init(void) {
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    if (!libc)
        die("dlopen libc.so.6");
    g_io[1].read = (ssize_t (*)(int, void *, size_t))dlsym(libc, "read");
    g_io[1].write = (ssize_t (*)(int, const void *, size_t))dlsym(libc, "write");
    g_io[1].send = (ssize_t (*)(int, const void *, size_t, int))dlsym(libc, "send");
    g_io[1].recv = (ssize_t (*)(int, void *, size_t, int))dlsym(libc, "recv");
    if (!g_io[1].read || !g_io[1].write || !g_io[1].send || !g_io[1].recv)
        die("dlsym libc");
}

/* Block k's variant, ABBA order: drift over the run hits both variants alike. */
static int ab_mode(long k) { return (k % 4 == 1 || k % 4 == 2); }

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of the blocks of each variant: `seconds * scale` per block (time per operation)
 * or, with `rate`, `scale / seconds` (throughput). */
static void ab_report(const double *secs, long blocks, double scale, int rate) {
    double *v[2] = {malloc(sizeof(double) * blocks), malloc(sizeof(double) * blocks)};
    long n[2] = {0, 0};
    for (long k = 0; k < blocks; k++) {
        int m = ab_mode(k);
        v[m][n[m]++] = rate ? scale / secs[k] : secs[k] * scale;
    }
    for (int m = 0; m < 2; m++)
        qsort(v[m], n[m], sizeof(double), cmp_double);
    printf("hooked %.2f direct %.2f\n", v[0][n[0] / 2], v[1][n[1] / 2]);
}

/* The ping-pong peer: echo every byte back.  per > 0: in the A/B run, round i (after the
 * first per, the warm-up) uses block (i - per) / per's functions; else always as linked. */
static void echo_child(int a, int b, long per) {
    close(a);
    char c;
    for (long i = 0;; i++) {
        const struct io *io = &g_io[per <= 0 || i < per ? 0 : ab_mode((i - per) / per)];
        if (io->recv(b, &c, 1, 0) != 1)
            _exit(0);
        if (io->send(b, &c, 1, 0) != 1)
            _exit(1);
    }
}

static int ab_pingpong(long rounds, long blocks) {
    ab_init();
    long per = rounds / blocks;
    int a, b;
    tcp_pair(&a, &b);
    pid_t p = fork();
    if (p == 0)
        echo_child(a, b, per);
    close(b);
    char c = 'x';
    for (long i = 0; i < per; i++) /* warm-up, hooked */
        if (send(a, &c, 1, 0) != 1 || recv(a, &c, 1, 0) != 1)
            die("pingpong");
    double *secs = malloc(sizeof(double) * blocks);
    for (long k = 0; k < blocks; k++) {
        const struct io *io = &g_io[ab_mode(k)];
        double t0 = now();
        for (long i = 0; i < per; i++)
            if (io->send(a, &c, 1, 0) != 1 || io->recv(a, &c, 1, 0) != 1)
                die("pingpong");
        secs[k] = now() - t0;
    }
    close(a);
    waitpid(p, NULL, 0);
    ab_report(secs, blocks, 1e9 / per, 0);
    return 0;
}

static int ab_bulk(long mib, long blocks) {
    ab_init();
    static char buf[65536];
    long block = mib * 1048576L / blocks / 65536 * 65536; /* whole writes per block */
    long warm = WARMUP_MIB * 1048576L, total = warm + block * blocks;
    int a, b;
    tcp_pair(&a, &b);
    pid_t p = fork();
    if (p == 0) {
        close(a);
        memset(buf, 'y', sizeof buf);
        for (long pos = 0; pos < total;) {
            int m = pos < warm ? 0 : ab_mode((pos - warm) / block);
            ssize_t w = g_io[m].write(b, buf, sizeof buf);
            if (w <= 0)
                _exit(1);
            pos += w;
            if (w != (ssize_t)sizeof buf) /* blocking socket: always whole; guard anyway */
                _exit(1);
        }
        close(b);
        _exit(0);
    }
    close(b);
    double *secs = malloc(sizeof(double) * blocks);
    long pos = 0;
    double t0 = 0;
    while (pos < total) {
        long k = pos < warm ? -1 : (pos - warm) / block;
        long end = k < 0 ? warm : warm + (k + 1) * block;
        size_t want = (size_t)(end - pos) < sizeof buf ? (size_t)(end - pos) : sizeof buf;
        ssize_t r = g_io[k < 0 ? 0 : ab_mode(k)].read(a, buf, want);
        if (r <= 0)
            die("bulk read");
        pos += r;
        if (pos == end) {
            double t = now();
            if (k >= 0)
                secs[k] = t - t0;
            t0 = t;
        }
    }
    waitpid(p, NULL, 0);
    ab_report(secs, blocks, block / 1048576.0, 1);
    return 0;
}

static int ab_fileread(const char *path, long n, long blocks) {
    ab_init();
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die("open");
    static char buf[4096];
    long per = n / blocks;
    double *secs = malloc(sizeof(double) * blocks);
    for (long k = 0; k < blocks; k++) {
        const struct io *io = &g_io[ab_mode(k)];
        double t0 = now();
        for (long i = 0; i < per; i++) {
            ssize_t r = io->read(fd, buf, sizeof buf);
            if (r < 0)
                die("read");
            if (r == 0)
                lseek(fd, 0, SEEK_SET);
        }
        secs[k] = now() - t0;
    }
    close(fd);
    ab_report(secs, blocks, 1e9 / per, 0);
    return 0;
}

int main(int argc, char **argv) {
    pin();
    if (argc >= 4 && !strcmp(argv[1], "ab-pingpong"))
        return ab_pingpong(atol(argv[2]), atol(argv[3]));
    if (argc >= 4 && !strcmp(argv[1], "ab-bulk"))
        return ab_bulk(atol(argv[2]), atol(argv[3]));
    if (argc >= 5 && !strcmp(argv[1], "ab-fileread"))
        return ab_fileread(argv[2], atol(argv[3]), atol(argv[4]));
    if (argc >= 3 && !strcmp(argv[1], "pingpong"))
        return pingpong(atol(argv[2]));
    if (argc >= 3 && !strcmp(argv[1], "bulk"))
        return bulk(atol(argv[2]));
    if (argc >= 4 && !strcmp(argv[1], "fileread"))
        return fileread(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: benchprog pingpong ROUNDS | bulk MIB | fileread FILE N"
                    " | ab-pingpong ROUNDS BLOCKS | ab-bulk MIB BLOCKS | ab-fileread FILE N BLOCKS\n");
    return 2;
}
