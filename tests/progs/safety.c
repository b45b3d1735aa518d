/* Checks that the shim is invisible to a program (run under the shim by
 * tests/test_interpose_safety.py, which also checks the records).  Prints one JSON object
 * with the bytes it moved; exits 1 naming the first broken property. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHECK(cond, what)                                                \
    do {                                                                 \
        if (!(cond)) {                                                   \
            fprintf(stderr, "safety: %s (errno %d)\n", what, errno);     \
            exit(1);                                                     \
        }                                                                \
    } while (0)

static void tcp_pair(int *a, int *b) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    CHECK(bind(l, (void *)&sa, len) == 0 && listen(l, 4) == 0 && getsockname(l, (void *)&sa, &len) == 0, "listen");
    *a = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(*a, (void *)&sa, len) == 0, "connect");
    *b = accept(l, NULL, NULL);
    CHECK(*b >= 0, "accept");
    close(l);
}

/* The shim's log fd: the fd whose link names a det.*.log file. */
static int find_log_fd(void) {
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d))) {
        char p[300], t[4096];
        snprintf(p, sizeof p, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(p, t, sizeof t - 1);
        if (n > 0) {
            t[n] = 0;
            if (strstr(t, "/det.") && strstr(t, ".log"))
                found = atoi(e->d_name);
        }
    }
    closedir(d);
    return found;
}

int main(void) {
    long sent_ab = 0, sent_ba = 0;
    int a, b;
    char buf[256];
    tcp_pair(&a, &b);

    /* errno survives the shim's first-use slow path and every recorded call */
    errno = EXDEV;
    CHECK(send(a, "hello", 5, 0) == 5, "send");
    CHECK(errno == EXDEV, "errno changed by a successful send");
    sent_ab += 5;
    errno = EXDEV;
    CHECK(recv(b, buf, 5, 0) == 5, "recv");
    CHECK(errno == EXDEV, "errno changed by a successful recv");

    /* MSG_PEEK moves no bytes: not recorded; the following recv is */
    CHECK(send(a, "peekaboo", 8, 0) == 8, "send 2");
    sent_ab += 8;
    CHECK(recv(b, buf, 8, MSG_PEEK | MSG_WAITALL) == 8, "peek");
    CHECK(recv(b, buf, 8, MSG_WAITALL) == 8 && memcmp(buf, "peekaboo", 8) == 0, "recv after peek");

    /* non-blocking: EAGAIN records nothing and keeps its errno */
    fcntl(b, F_SETFL, O_NONBLOCK);
    errno = 0;
    CHECK(recv(b, buf, sizeof buf, 0) == -1 && errno == EAGAIN, "EAGAIN on empty non-blocking socket");
    fcntl(b, F_SETFL, 0);

    /* non-socket fds: file, pipe, UDP socket pass through and are not recorded */
    int p[2];
    CHECK(pipe(p) == 0, "pipe");
    CHECK(write(p[1], "pipe", 4) == 4 && read(p[0], buf, 4) == 4, "pipe io");
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in ua = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t ul = sizeof ua;
    CHECK(bind(u, (void *)&ua, ul) == 0 && getsockname(u, (void *)&ua, &ul) == 0, "udp bind");
    CHECK(sendto(u, "dgram", 5, 0, (void *)&ua, ul) == 5 && recv(u, buf, 5, 0) == 5, "udp io");
    close(u);

    /* the shim's fd is protected from the program */
    int lfd = find_log_fd();
    CHECK(lfd >= 3, "shim log fd not found");
    CHECK(lfd >= 100, "shim log fd not moved high");
    errno = 0;
    CHECK(close(lfd) == -1 && errno == EBADF, "close(shim fd) must fail with EBADF");
    CHECK(fcntl(lfd, F_GETFD) >= 0, "shim fd closed by the program");
    /* dup2 onto the shim's fd: the program gets its fd, the shim moves away */
    CHECK(dup2(p[0], lfd) == lfd, "dup2 onto the shim fd");
    int lfd2 = find_log_fd();
    CHECK(lfd2 >= 0 && lfd2 != lfd, "shim fd not moved away from a dup2 target");
    close(lfd);
    CHECK(send(b, "after-dup2", 10, 0) == 10 && recv(a, buf, 10, MSG_WAITALL) == 10, "io after dup2");
    sent_ba += 10;
    close(p[0]);
    close(p[1]);

    /* close_range over everything but stdio: the shim keeps its log */
    close_range(3, ~0U, 0);
    CHECK(find_log_fd() >= 0, "close_range closed the shim fd");
    tcp_pair(&a, &b);
    CHECK(send(a, "again", 5, 0) == 5 && recv(b, buf, 5, MSG_WAITALL) == 5, "io after close_range");

    /* splice: pipe -> socket is a send, socket -> pipe is a receive */
    int in[2], out[2];
    CHECK(pipe(in) == 0 && pipe(out) == 0, "pipes");
    CHECK(write(in[1], "spliced", 7) == 7, "fill pipe");
    CHECK(splice(in[0], NULL, a, NULL, 7, 0) == 7, "splice pipe->socket");
    long moved = 0;
    while (moved < 7) {
        ssize_t r = splice(b, NULL, out[1], NULL, (size_t)(7 - moved), 0);
        CHECK(r > 0, "splice socket->pipe");
        moved += r;
    }
    CHECK(read(out[0], buf, 7) == 7 && memcmp(buf, "spliced", 7) == 0, "spliced data");
    printf("{\"first_ab\": %ld, \"first_ba\": %ld, \"second_ab\": 12}\n", sent_ab, sent_ba);
    return 0;
}
