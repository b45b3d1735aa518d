/* Test program for record coalescing under races: many writers on one shared TCP socket.
 *
 *   racer --threads T --bytes B [--fork] [--readers R]
 *
 * Makes one loopback connection (a -> b) in this process.  With --fork a child shares both
 * sockets.  Every process runs T writer threads that each send B bytes on `a` (half of them
 * through a dup of `a`) in pseudo-random chunk sizes, rotating send/write/writev/sendmsg,
 * and R reader threads that receive from `b` until EOF.  The last writer (of all processes)
 * shuts `a` down for writing.  Before the fork the parent sends and receives 100 bytes (it
 * has open records then).  Each process prints one JSON line with the bytes it sent and
 * received:  {"pid": P, "sent": S, "recv": N, "child": 0|1}.  Exit 0 = success. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static int g_a, g_a_dup, g_b, g_threads = 4, g_readers = 2, g_fork = 0;
static long g_bytes = 1 << 20;
static int *g_writers_left; /* shared between the processes */
static uint64_t g_sent, g_recv;

static void fail(const char *what) {
    perror(what);
    exit(1);
}

static void tcp_pair(int *a, int *b) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    if (l < 0 || bind(l, (void *)&sa, len) || listen(l, 1) || getsockname(l, (void *)&sa, &len))
        fail("listen");
    *a = socket(AF_INET, SOCK_STREAM, 0);
    if (*a < 0 || connect(*a, (void *)&sa, len))
        fail("connect");
    *b = accept(l, NULL, NULL);
    if (*b < 0)
        fail("accept");
    close(l);
}

static uint32_t next_rand(uint32_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

static ssize_t send_rot(int fd, const char *buf, size_t n, unsigned k) {
    switch (k % 4) {
    case 0:
        return send(fd, buf, n, MSG_NOSIGNAL);
    case 1:
        return write(fd, buf, n);
    case 2: {
        size_t h = n / 2;
        struct iovec iov[2] = {{(void *)buf, h}, {(void *)(buf + h), n - h}};
        return writev(fd, iov, 2);
    }
    default: {
        struct iovec iov = {(void *)buf, n};
        struct msghdr m = {0};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        return sendmsg(fd, &m, MSG_NOSIGNAL);
    }
    }
}

static void *writer(void *arg) {
    long id = (long)arg;
    uint32_t seed = (uint32_t)(id * 2654435761u + (uint32_t)getpid()) | 1;
    int fd = id % 2 ? g_a_dup : g_a;
    static const char buf[8192];
    long left = g_bytes;
    uint64_t sent = 0;
    for (unsigned k = 0; left > 0; k++) {
        uint32_t r = next_rand(&seed);
        size_t n = r % 16 == 0 ? 1 + r % 8000 : 1 + r % 300; /* mostly small, sometimes big */
        if ((long)n > left)
            n = (size_t)left;
        ssize_t w = send_rot(fd, buf, n, k);
        if (w <= 0)
            fail("send");
        left -= w;
        sent += (uint64_t)w;
        if (r % 64 == 0)
            sched_yield();
    }
    __atomic_fetch_add(&g_sent, sent, __ATOMIC_RELAXED);
    if (__atomic_sub_fetch(g_writers_left, 1, __ATOMIC_ACQ_REL) == 0 && shutdown(g_a, SHUT_WR) != 0)
        fail("shutdown");
    return NULL;
}

static void *reader(void *arg) {
    uint32_t seed = (uint32_t)(long)arg * 7919u + 17u;
    char buf[8192];
    uint64_t got = 0;
    for (;;) {
        size_t n = 1 + next_rand(&seed) % sizeof buf;
        ssize_t r = recv(g_b, buf, n, 0);
        if (r < 0)
            fail("recv");
        if (r == 0)
            break;
        got += (uint64_t)r;
    }
    __atomic_fetch_add(&g_recv, got, __ATOMIC_RELAXED);
    return NULL;
}

static void run(int child) {
    pthread_t t[64];
    int nt = 0;
    for (long i = 0; i < g_threads; i++)
        if (pthread_create(&t[nt++], NULL, writer, (void *)(i + child * 100)))
            fail("pthread_create");
    for (long i = 0; i < g_readers; i++)
        if (pthread_create(&t[nt++], NULL, reader, (void *)(i + child * 100)))
            fail("pthread_create");
    for (int i = 0; i < nt; i++)
        pthread_join(t[i], NULL);
    printf("{\"pid\": %d, \"sent\": %llu, \"recv\": %llu, \"child\": %d}\n", (int)getpid(),
           (unsigned long long)g_sent, (unsigned long long)g_recv, child);
    fflush(stdout);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            g_threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--readers") && i + 1 < argc)
            g_readers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--bytes") && i + 1 < argc)
            g_bytes = atol(argv[++i]);
        else if (!strcmp(argv[i], "--fork"))
            g_fork = 1;
        else {
            fprintf(stderr, "racer: bad argument %s\n", argv[i]);
            return 2;
        }
    }
    if (g_threads < 1 || g_threads > 30 || g_readers < 1 || g_readers > 30)
        return 2;
    g_writers_left = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (g_writers_left == MAP_FAILED)
        fail("mmap");
    *g_writers_left = g_threads * (g_fork ? 2 : 1);
    tcp_pair(&g_a, &g_b);
    g_a_dup = dup(g_a);
    if (g_a_dup < 0)
        fail("dup");
    /* Bytes before the fork: the parent has an open record for `a` when the child starts
     * (the child must not continue it: it lives in the parent's log). */
    static const char hello[100];
    for (int i = 0; i < 4; i++) {
        if (send(g_a, hello, 25, MSG_NOSIGNAL) != 25)
            fail("send");
        g_sent += 25;
    }
    char first[100];
    for (size_t got = 0; got < sizeof first;) {
        ssize_t r = recv(g_b, first + got, sizeof first - got, 0);
        if (r <= 0)
            fail("recv");
        got += (size_t)r;
        g_recv += (uint64_t)r;
    }
    if (g_fork) {
        pid_t p = fork();
        if (p < 0)
            fail("fork");
        if (p == 0) {
            g_sent = g_recv = 0; /* the parent counted the first bytes */
            run(1);
            _exit(0);
        }
        run(0);
        int st;
        if (waitpid(p, &st, 0) != p || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            return 1;
        return 0;
    }
    run(0);
    return 0;
}
