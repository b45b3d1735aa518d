/* Test program for the shim: TCP echo client and server that check their own data and
 * print their own per-connection byte counts, one JSON line per connection:
 *   {"local": "127.0.0.1:40000", "peer": "127.0.0.1:5000", "sent": N, "recv": M, "pid": P}
 *
 *   tcpprog server --mode blocking|epoll|thread|fork --conns N [--family 4|6] [--partial]
 *       prints "PORT <port>" first, serves N connections (echoes every byte), exits.
 *   tcpprog client --port P --conns N --bytes B [--mode blocking|epoll] [--family 4|6]
 *       [--threads] [--partial] [--dup] [--fork-split] [--local-port LP]
 *       sends B bytes per connection (byte i = pattern(i)), reads the echo back and checks it.
 *   tcpprog client-fd --fd FD --bytes B --offset X   continue on an inherited connected socket
 *       (exec test): sends stream bytes [X, B) and reads their echo
 *
 * The I/O calls rotate through every interposed API (send, write, sendmsg with several
 * iovecs, writev, sendto, sendmmsg; recv, read, recvmsg, readv, recvfrom, recvmmsg, and
 * the fortified __recv_chk/__read_chk when built with _FORTIFY_SOURCE).  Exit 0 = all data
 * checked, 1 = a data mismatch or I/O error. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static int g_family = 4, g_partial = 0, g_dup = 0, g_fork_split = 0, g_threads = 0;
static long g_bytes = 100000;
static int g_continued = 0; /* client-fd: this line continues the previous one's connection */
static int g_conns = 1, g_port = 0, g_local_port = 0;
static const char *g_mode = "blocking";
static pthread_mutex_t g_out_lock = PTHREAD_MUTEX_INITIALIZER;

static unsigned char pattern(uint64_t i) { return (unsigned char)(i * 7 + i / 251 + 3); }

static void fail(const char *what) {
    fprintf(stderr, "tcpprog: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void addr_str(const struct sockaddr_storage *ss, char *out, size_t cap) {
    char ip[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const void *)ss;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
        snprintf(out, cap, "%s:%d", ip, ntohs(a->sin_port));
    } else {
        const struct sockaddr_in6 *a = (const void *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
        snprintf(out, cap, "[%s]:%d", ip, ntohs(a->sin6_port));
    }
}

/* Addresses are captured while connected: after the peer's FIN getpeername fails. */
struct names {
    char local[80], peer[80];
};

static struct names names_of(int fd) {
    struct names n;
    struct sockaddr_storage a, b;
    socklen_t la = sizeof a, lb = sizeof b;
    if (getsockname(fd, (void *)&a, &la) || getpeername(fd, (void *)&b, &lb))
        fail("getsockname/getpeername");
    addr_str(&a, n.local, sizeof n.local);
    addr_str(&b, n.peer, sizeof n.peer);
    return n;
}

static void report(const struct names *n, uint64_t sent, uint64_t recvd) {
    pthread_mutex_lock(&g_out_lock);
    printf("{\"local\": \"%s\", \"peer\": \"%s\", \"sent\": %llu, \"recv\": %llu, \"pid\": %d%s}\n", n->local,
           n->peer, (unsigned long long)sent, (unsigned long long)recvd, (int)getpid(),
           g_continued ? ", \"continued\": true" : "");
    fflush(stdout);
    pthread_mutex_unlock(&g_out_lock);
}

/* ---------------------------------------------------------------- rotating I/O */

static ssize_t send_some(int fd, const unsigned char *buf, size_t n, unsigned k) {
    switch (k % 6) {
    case 0:
        return send(fd, buf, n, MSG_NOSIGNAL);
    case 1:
        return write(fd, buf, n);
    case 2: { /* sendmsg with three iovecs */
        size_t a = n / 3, b = n / 3;
        struct iovec iov[3] = {{(void *)buf, a}, {(void *)(buf + a), b}, {(void *)(buf + a + b), n - a - b}};
        struct msghdr m = {0};
        m.msg_iov = iov;
        m.msg_iovlen = 3;
        return sendmsg(fd, &m, MSG_NOSIGNAL);
    }
    case 3: {
        size_t a = n / 2;
        struct iovec iov[2] = {{(void *)buf, a}, {(void *)(buf + a), n - a}};
        return writev(fd, iov, 2);
    }
    case 4:
        return sendto(fd, buf, n, MSG_NOSIGNAL, NULL, 0);
    default: { /* sendmmsg with two messages */
        if (n < 2)
            return send(fd, buf, n, MSG_NOSIGNAL);
        size_t a = n / 2;
        struct iovec i1 = {(void *)buf, a}, i2 = {(void *)(buf + a), n - a};
        struct mmsghdr mm[2];
        memset(mm, 0, sizeof mm);
        mm[0].msg_hdr.msg_iov = &i1;
        mm[0].msg_hdr.msg_iovlen = 1;
        mm[1].msg_hdr.msg_iov = &i2;
        mm[1].msg_hdr.msg_iovlen = 1;
        int r = sendmmsg(fd, mm, 2, MSG_NOSIGNAL);
        if (r < 0)
            return -1;
        return (ssize_t)(mm[0].msg_len + (r > 1 ? mm[1].msg_len : 0));
    }
    }
}

static ssize_t recv_some(int fd, unsigned char *buf, size_t n, unsigned k) {
    /* A fixed-size local array makes _FORTIFY_SOURCE route recv/read to __recv_chk/__read_chk. */
    unsigned char small[4096];
    switch (k % 8) {
    case 0:
        return recv(fd, buf, n, 0);
    case 1:
        return read(fd, buf, n);
    case 2: {
        size_t a = n / 2;
        struct iovec iov[2] = {{buf, a}, {buf + a, n - a}};
        struct msghdr m = {0};
        m.msg_iov = iov;
        m.msg_iovlen = 2;
        return recvmsg(fd, &m, 0);
    }
    case 3: {
        size_t a = n / 3;
        struct iovec iov[3] = {{buf, a}, {buf + a, a}, {buf + 2 * a, n - 2 * a}};
        return readv(fd, iov, 3);
    }
    case 4:
        return recvfrom(fd, buf, n, 0, NULL, NULL);
    case 5: {
        struct iovec iov = {buf, n};
        struct mmsghdr mm;
        memset(&mm, 0, sizeof mm);
        mm.msg_hdr.msg_iov = &iov;
        mm.msg_hdr.msg_iovlen = 1;
        int r = recvmmsg(fd, &mm, 1, 0, NULL);
        return r < 0 ? -1 : (r == 0 ? 0 : (ssize_t)mm.msg_len);
    }
    case 6: {
        size_t m = n < sizeof small ? n : sizeof small;
        __asm__("" : "+r"(m)); /* hide the bound from the optimiser: forces __recv_chk */
        ssize_t r = recv(fd, small, m, 0);
        if (r > 0)
            memcpy(buf, small, (size_t)r);
        return r;
    }
    default: {
        size_t m = n < sizeof small ? n : sizeof small;
        __asm__("" : "+r"(m)); /* forces __read_chk */
        ssize_t r = read(fd, small, m);
        if (r > 0)
            memcpy(buf, small, (size_t)r);
        return r;
    }
    }
}

static size_t chunk_size(unsigned k, size_t left) {
    size_t c = g_partial ? 1 + (k * 37) % 17 : 1 + (k * 7919u) % 65536;
    return c < left ? c : left;
}

/* ---------------------------------------------------------------- server */

struct conn_stat {
    uint64_t sent, recvd;
};

/* Echo everything until EOF; verify the pattern.  Blocking fd. */
static void serve_blocking(int fd) {
    struct names nm = names_of(fd);
    unsigned char buf[65536];
    uint64_t got = 0, sent = 0;
    unsigned k = 0;
    for (;;) {
        size_t want = g_partial ? 1 + (k * 13) % 23 : sizeof buf;
        ssize_t r = recv_some(fd, buf, want, k++);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == ECONNRESET)
            break;
        if (r < 0)
            fail("server recv");
        if (r == 0)
            break;
        for (ssize_t i = 0; i < r; i++)
            if (buf[i] != pattern(got + (uint64_t)i)) {
                fprintf(stderr, "tcpprog: server data mismatch at %llu\n", (unsigned long long)(got + i));
                exit(1);
            }
        got += (uint64_t)r;
        ssize_t off = 0;
        while (off < r) {
            ssize_t w = send_some(fd, buf + off, (size_t)(r - off), k++);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0)
                fail("server send");
            off += w;
        }
        sent += (uint64_t)r;
    }
    report(&nm, sent, got);
}

static void *serve_thread(void *arg) {
    int fd = (int)(intptr_t)arg;
    serve_blocking(fd);
    close(fd);
    return NULL;
}

static int listen_socket(void) {
    int fd = socket(g_family == 6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        fail("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t len;
    if (g_family == 6) {
        struct sockaddr_in6 *a = (void *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        len = sizeof *a;
    } else {
        struct sockaddr_in *a = (void *)&ss;
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof *a;
    }
    if (bind(fd, (void *)&ss, len) || listen(fd, 128))
        fail("bind/listen");
    len = sizeof ss;
    getsockname(fd, (void *)&ss, &len);
    int port = g_family == 6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port) : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    printf("PORT %d\n", port);
    fflush(stdout);
    return fd;
}

struct econn {
    int fd;
    struct names nm;
    unsigned char buf[65536];
    size_t have, off; /* pending echo bytes [off, have) */
    uint64_t got, sent;
    unsigned k;
    int eof;
};

static int serve_epoll(int lfd) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    int accepted = 0, done = 0;
    while (done < g_conns) {
        struct epoll_event evs[16];
        int n = epoll_wait(ep, evs, 16, 10000);
        if (n <= 0)
            fail("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct econn *c = evs[i].data.ptr;
            if (!c) {
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0)
                    continue;
                accepted++;
                c = calloc(1, sizeof *c);
                c->fd = fd;
                c->nm = names_of(fd);
                struct epoll_event e2 = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
                continue;
            }
            for (;;) { /* edge-triggered: drain until EAGAIN */
                int progress = 0;
                while (c->off < c->have) {
                    ssize_t w = send_some(c->fd, c->buf + c->off, c->have - c->off, c->k++);
                    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        break;
                    if (w < 0)
                        fail("epoll server send");
                    c->off += (size_t)w;
                    c->sent += (uint64_t)w;
                    progress = 1;
                }
                if (c->off == c->have && !c->eof) {
                    c->off = c->have = 0;
                    size_t want = g_partial ? 1 + (c->k * 13) % 23 : sizeof c->buf;
                    ssize_t r = recv_some(c->fd, c->buf, want, c->k++);
                    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        break;
                    if (r < 0 && errno == ECONNRESET)
                        r = 0;
                    if (r < 0)
                        fail("epoll server recv");
                    if (r == 0) {
                        c->eof = 1;
                    } else {
                        for (ssize_t j = 0; j < r; j++)
                            if (c->buf[j] != pattern(c->got + (uint64_t)j)) {
                                fprintf(stderr, "tcpprog: epoll server data mismatch\n");
                                exit(1);
                            }
                        c->got += (uint64_t)r;
                        c->have = (size_t)r;
                    }
                    progress = 1;
                }
                if (c->eof && c->off == c->have) {
                    report(&c->nm, c->sent, c->got);
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                    free(c);
                    done++;
                    break;
                }
                if (!progress)
                    break;
            }
        }
    }
    (void)accepted;
    close(ep);
    return 0;
}

static int run_server(void) {
    int lfd = listen_socket();
    if (!strcmp(g_mode, "epoll")) {
        fcntl(lfd, F_SETFL, O_NONBLOCK);
        return serve_epoll(lfd);
    }
    pthread_t th[256];
    int nth = 0, nchild = 0;
    for (int i = 0; i < g_conns; i++) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            fail("accept");
        if (!strcmp(g_mode, "thread")) {
            pthread_create(&th[nth++], NULL, serve_thread, (void *)(intptr_t)fd);
        } else if (!strcmp(g_mode, "fork")) {
            pid_t p = fork();
            if (p < 0)
                fail("fork");
            if (p == 0) {
                close(lfd);
                serve_blocking(fd);
                close(fd);
                _exit(0);
            }
            nchild++;
            close(fd);
        } else {
            serve_blocking(fd);
            close(fd);
        }
    }
    for (int i = 0; i < nth; i++)
        pthread_join(th[i], NULL);
    int rc = 0;
    for (int i = 0; i < nchild; i++) {
        int st;
        if (wait(&st) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
            rc = 1;
    }
    close(lfd);
    return rc;
}

/* ---------------------------------------------------------------- client */

static int connect_to(int nonblock) {
    int fd = socket(g_family == 6 ? AF_INET6 : AF_INET, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        fail("socket");
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t len;
    if (g_local_port) { /* a fixed local port: the reconnect test reuses the address pair */
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (g_family == 6) {
            struct sockaddr_in6 *a = (void *)&ss;
            a->sin6_family = AF_INET6;
            a->sin6_addr = in6addr_loopback;
            a->sin6_port = htons((uint16_t)g_local_port);
            len = sizeof *a;
        } else {
            struct sockaddr_in *a = (void *)&ss;
            a->sin_family = AF_INET;
            a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            a->sin_port = htons((uint16_t)g_local_port);
            len = sizeof *a;
        }
        if (bind(fd, (void *)&ss, len))
            fail("bind local port");
    }
    memset(&ss, 0, sizeof ss);
    if (g_family == 6) {
        struct sockaddr_in6 *a = (void *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_loopback;
        a->sin6_port = htons((uint16_t)g_port);
        len = sizeof *a;
    } else {
        struct sockaddr_in *a = (void *)&ss;
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a->sin_port = htons((uint16_t)g_port);
        len = sizeof *a;
    }
    if (connect(fd, (void *)&ss, len) != 0 && !(nonblock && errno == EINPROGRESS))
        fail("connect");
    return fd;
}

struct sender {
    int fd;
    uint64_t from, to, sent;
};

static void *send_range(void *arg) {
    struct sender *s = arg;
    unsigned char buf[65536];
    unsigned k = (unsigned)s->from;
    uint64_t pos = s->from;
    while (pos < s->to) {
        size_t n = chunk_size(k, (size_t)(s->to - pos));
        for (size_t i = 0; i < n; i++)
            buf[i] = pattern(pos + i);
        size_t off = 0;
        while (off < n) {
            ssize_t w = send_some(s->fd, buf + off, n - off, k++);
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0)
                fail("client send");
            off += (size_t)w;
        }
        pos += n;
    }
    s->sent = pos - s->from;
    return NULL;
}

/* Read the echo of stream bytes [from, total) and check it; returns the count. */
static uint64_t read_echo_from(int fd, uint64_t from, uint64_t total) {
    unsigned char buf[65536];
    uint64_t got = from;
    unsigned k = 0;
    while (got < total) {
        size_t want = g_partial ? 1 + (k * 11) % 19 : sizeof buf;
        ssize_t r = recv_some(fd, buf, want, k++);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            fail("client recv (short echo)");
        for (ssize_t i = 0; i < r; i++)
            if (buf[i] != pattern(got + (uint64_t)i)) {
                fprintf(stderr, "tcpprog: client echo mismatch at %llu\n", (unsigned long long)(got + i));
                exit(1);
            }
        got += (uint64_t)r;
    }
    return got - from;
}

static uint64_t read_echo(int fd, uint64_t total) { return read_echo_from(fd, 0, total); }

static void close_abortive(int fd) {
    /* RST instead of FIN: no TIME_WAIT, so the same address pair can be reused at once. */
    if (g_local_port) {
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    close(fd);
}

static void client_blocking_one(void) {
    int fd = connect_to(0);
    struct names nm = names_of(fd);
    int wfd = fd, rfd = fd;
    if (g_dup) { /* write through dup(), read through fcntl(F_DUPFD_CLOEXEC), close the original */
        wfd = dup(fd);
        rfd = fcntl(fd, F_DUPFD_CLOEXEC, 50);
        static int next_target = 200; /* a distinct dup2 target per connection (threads) */
        int moved = dup2(rfd, __atomic_fetch_add(&next_target, 1, __ATOMIC_RELAXED));
        close(rfd);
        rfd = moved;
        close(fd);
        fd = rfd;
    }
    uint64_t total = (uint64_t)g_bytes;
    if (g_fork_split) { /* child sends the first half, then the parent sends the rest */
        pid_t p = fork();
        if (p < 0)
            fail("fork");
        if (p == 0) {
            struct sender s = {wfd, 0, total / 2, 0};
            send_range(&s);
            printf("{\"child_sent\": %llu, \"pid\": %d}\n", (unsigned long long)s.sent, (int)getpid());
            fflush(stdout);
            _exit(0);
        }
        int st;
        waitpid(p, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st))
            exit(1);
        struct sender s = {wfd, total / 2, total, 0};
        pthread_t th;
        pthread_create(&th, NULL, send_range, &s);
        uint64_t got = read_echo(rfd, total);
        pthread_join(th, NULL);
        shutdown(wfd, SHUT_WR);
        char extra;
        if (recv(rfd, &extra, 1, 0) != 0)
            fail("expected EOF");
        report(&nm, total / 2 + s.sent, got); /* the child exited 0: it sent total / 2 */
    } else {
        struct sender s = {wfd, 0, total, 0};
        pthread_t th;
        pthread_create(&th, NULL, send_range, &s);
        uint64_t got = read_echo(rfd, total);
        pthread_join(th, NULL);
        if (!g_local_port) { /* orderly close; with a fixed local port, RST (see close_abortive) */
            shutdown(wfd, SHUT_WR);
            char extra;
            if (recv(rfd, &extra, 1, 0) != 0)
                fail("expected EOF");
        }
        report(&nm, s.sent, got);
    }
    if (wfd != rfd)
        close(wfd);
    close_abortive(rfd);
}

static void *client_thread(void *arg) {
    (void)arg;
    client_blocking_one();
    return NULL;
}

static void client_epoll_one(void) {
    int fd = connect_to(1);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    struct epoll_event out;
    if (epoll_wait(ep, &out, 1, 10000) != 1)
        fail("connect timeout");
    int err = 0;
    socklen_t l = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
    if (err) {
        errno = err;
        fail("non-blocking connect");
    }
    struct names nm = names_of(fd);
    ev.events = EPOLLIN | EPOLLOUT;
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    uint64_t total = (uint64_t)g_bytes, pos = 0, got = 0, eagain = 0;
    unsigned char obuf[65536], ibuf[65536];
    unsigned k = 0;
    int shut = 0;
    for (;;) {
        if (epoll_wait(ep, &out, 1, 10000) != 1)
            fail("epoll_wait");
        if ((out.events & EPOLLOUT) && pos < total) {
            for (;;) {
                size_t n = chunk_size(k, (size_t)(total - pos));
                for (size_t i = 0; i < n; i++)
                    obuf[i] = pattern(pos + i);
                ssize_t w = send_some(fd, obuf, n, k++);
                if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                    eagain++;
                    break;
                }
                if (w < 0)
                    fail("epoll client send");
                pos += (uint64_t)w; /* partial writes: resend the rest next time */
                if (pos == total)
                    break;
            }
        }
        if (pos == total && !shut) {
            shutdown(fd, SHUT_WR);
            shut = 1;
            ev.events = EPOLLIN;
            epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
        }
        if (out.events & (EPOLLIN | EPOLLHUP)) {
            for (;;) {
                size_t want = g_partial ? 1 + (k * 11) % 19 : sizeof ibuf;
                ssize_t r = recv_some(fd, ibuf, want, k++);
                if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                    eagain++;
                    break;
                }
                if (r < 0)
                    fail("epoll client recv");
                if (r == 0)
                    goto done;
                for (ssize_t i = 0; i < r; i++)
                    if (ibuf[i] != pattern(got + (uint64_t)i)) {
                        fprintf(stderr, "tcpprog: epoll client mismatch\n");
                        exit(1);
                    }
                got += (uint64_t)r;
            }
        }
    }
done:
    if (got != total) {
        fprintf(stderr, "tcpprog: short echo %llu/%llu\n", (unsigned long long)got, (unsigned long long)total);
        exit(1);
    }
    report(&nm, pos, got);
    close(ep);
    close_abortive(fd);
}

static int run_client(void) {
    if (g_threads) {
        pthread_t th[256];
        for (int i = 0; i < g_conns; i++)
            pthread_create(&th[i], NULL, client_thread, NULL);
        for (int i = 0; i < g_conns; i++)
            pthread_join(th[i], NULL);
        return 0;
    }
    for (int i = 0; i < g_conns; i++) {
        if (!strcmp(g_mode, "epoll"))
            client_epoll_one();
        else
            client_blocking_one();
    }
    return 0;
}

/* An inherited connected socket (exec test): send g_bytes, read the echo, report. */
static int run_client_fd(int fd, uint64_t offset) {
    uint64_t total = (uint64_t)g_bytes;
    struct names nm = names_of(fd);
    struct sender s = {fd, offset, total, 0};
    pthread_t th;
    pthread_create(&th, NULL, send_range, &s);
    uint64_t got = read_echo_from(fd, offset, total);
    pthread_join(th, NULL);
    shutdown(fd, SHUT_WR);
    report(&nm, s.sent, got);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: tcpprog server|client|client-fd [options]\n");
        return 2;
    }
    int inherited = -1;
    long offset = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "--mode")) g_mode = v, i++;
        else if (!strcmp(a, "--conns")) g_conns = atoi(v), i++;
        else if (!strcmp(a, "--bytes")) g_bytes = atol(v), i++;
        else if (!strcmp(a, "--family")) g_family = atoi(v), i++;
        else if (!strcmp(a, "--port")) g_port = atoi(v), i++;
        else if (!strcmp(a, "--local-port")) g_local_port = atoi(v), i++;
        else if (!strcmp(a, "--fd")) inherited = atoi(v), i++;
        else if (!strcmp(a, "--offset")) offset = atol(v), i++;
        else if (!strcmp(a, "--partial")) g_partial = 1;
        else if (!strcmp(a, "--dup")) g_dup = 1;
        else if (!strcmp(a, "--threads")) g_threads = 1;
        else if (!strcmp(a, "--fork-split")) g_fork_split = 1;
        else {
            fprintf(stderr, "tcpprog: unknown option %s\n", a);
            return 2;
        }
    }
    if (g_conns > 256) g_conns = 256;
    if (!strcmp(argv[1], "server")) return run_server();
    if (!strcmp(argv[1], "client")) return run_client();
    if (!strcmp(argv[1], "client-fd")) return g_continued = 1, run_client_fd(inherited, (uint64_t)offset);
    fprintf(stderr, "tcpprog: unknown role %s\n", argv[1]);
    return 2;
}
