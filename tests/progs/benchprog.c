/* Micro-benchmarks for the shim (driven by bench/bench_shim.py, with and without LD_PRELOAD).
 *   benchprog pingpong ROUNDS     1-byte TCP ping-pong over loopback between two processes;
 *                                 prints "ns_per_round <x>"
 *   benchprog bulk MIB            64 KiB writes -> 64 KiB reads over loopback TCP;
 *                                 prints "mib_per_s <x>"
 *   benchprog fileread FILE N     N read() calls of 4 KiB on a regular file (lseek back at EOF);
 *                                 prints "ns_per_read <x>"
 * BENCH_CPU=n pins the process (and its forked peer) to CPU n. */
#define _GNU_SOURCE
#include <arpa/inet.h>
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

static int pingpong(long rounds) {
    int a, b;
    tcp_pair(&a, &b);
    pid_t p = fork();
    if (p == 0) {
        close(a);
        char c;
        for (;;) {
            if (recv(b, &c, 1, 0) != 1)
                _exit(0);
            if (send(b, &c, 1, 0) != 1)
                _exit(1);
        }
    }
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

int main(int argc, char **argv) {
    pin();
    if (argc >= 3 && !strcmp(argv[1], "pingpong"))
        return pingpong(atol(argv[2]));
    if (argc >= 3 && !strcmp(argv[1], "bulk"))
        return bulk(atol(argv[2]));
    if (argc >= 4 && !strcmp(argv[1], "fileread"))
        return fileread(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: benchprog pingpong ROUNDS | bulk MIB | fileread FILE N\n");
    return 2;
}
