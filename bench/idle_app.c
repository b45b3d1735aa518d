/* A unit for measuring the checkpoint protocol alone, in C: it idles and answers every app
 * checkpoint request at once (examples/APP_PROTOCOL.md), saving a few bytes of state.  The
 * Python idle_app.py does the same through nodeagent.appclient; this one shows what the
 * protocol costs when the program's own share (an interpreter waking up) is next to nothing.
 * Used by bench_checkpoint.py's scaling table.
 *
 *     gcc -O2 -o idle_app bench/idle_app.c
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int answer(int fd, const char *line)
{
    size_t len = strlen(line);
    while (len) {
        ssize_t n = write(fd, line, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        line += n;
        len -= (size_t)n;
    }
    return 0;
}

/* CHECKPOINT <id> <dir>: the state goes to <dir>/state (the dir runs to the end of the line). */
static const char *save(const char *rest, const char *state)
{
    const char *dir = strchr(rest, ' ');
    char path[4096];
    if (!dir || snprintf(path, sizeof path, "%s/state", dir + 1) >= (int)sizeof path)
        return "ERROR bad CHECKPOINT line\n";
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return "ERROR cannot create the state file\n";
    int bad = answer(fd, state) != 0;
    bad |= close(fd) != 0;
    return bad ? "ERROR cannot write the state file\n" : "DONE\n";
}

static const char *reply_to(char *line, const char *state)
{
    char *rest = strchr(line, ' ');
    if (rest)
        *rest++ = '\0';
    if (!strcmp(line, "CHECKPOINT"))
        return save(rest ? rest : "", state);
    if (!strcmp(line, "PING"))
        return "PONG\n";
    if (!strcmp(line, "RESUME") || !strcmp(line, "ABORT") || !strcmp(line, "RESTART") ||
        !strcmp(line, "PRE_CHECKPOINT") || !strcmp(line, "POST_CHECKPOINT"))
        return "OK\n";
    return "ERROR unknown request\n";
}

int main(void)
{
    const char *path = getenv("GRIDCKPT_APP_SOCKET");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!path || strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "idle_app: GRIDCKPT_APP_SOCKET unset or too long\n");
        return 2;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("idle_app: connect");
        return 1;
    }
    char state[32], hello[64];
    snprintf(state, sizeof state, "%d", (int)getpid());
    snprintf(hello, sizeof hello, "HELLO %d 1 -\n", (int)getpid());   /* no optional hooks */
    if (answer(fd, hello) != 0)
        return 1;
    static char buf[65536 + 2];
    size_t have = 0;
    for (;;) {
        char *nl;
        while ((nl = memchr(buf, '\n', have)) != NULL) {
            *nl = '\0';
            /* WELCOME is the agent's greeting, not a request */
            if (strncmp(buf, "WELCOME", 7) != 0 && answer(fd, reply_to(buf, state)) != 0)
                return 1;
            size_t used = (size_t)(nl - buf) + 1;
            memmove(buf, nl + 1, have - used);
            have -= used;
        }
        if (have == sizeof buf - 1)
            return 1;   /* a line longer than the protocol allows */
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;   /* the agent closed the connection */
        have += (size_t)n;
    }
}
