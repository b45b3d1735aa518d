/*
 * counter: a single-process example for checkpoint/restart.
 *
 *   counter [MEGABYTES [OUTFILE [INTERVAL_MS]]]
 *
 * Touches MEGABYTES (default 5) of heap memory, then counts forever.  Every
 * INTERVAL_MS (default 100) it prints "count N sum S" to stdout and appends the
 * line "N" to OUTFILE (default counter.out) through a file descriptor held open
 * for the whole run.  The memory is rewritten on every step and folded into S,
 * so a restart from a checkpoint with corrupted memory shows a wrong sum:
 * S must always equal 256 * MEGABYTES * (N mod 256).  After a restart, the first
 * printed N follows the checkpointed one, which proves the program continued.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long megabytes = argc > 1 ? atol(argv[1]) : 5;
	const char *outfile = argc > 2 ? argv[2] : "counter.out";
	long interval_ms = argc > 3 ? atol(argv[3]) : 100;
	size_t size = (size_t)megabytes << 20;
	unsigned char *mem = malloc(size ? size : 1);
	int out = open(outfile, O_WRONLY | O_CREAT | O_APPEND, 0644);
	struct timespec pause = { interval_ms / 1000, (interval_ms % 1000) * 1000000L };
	uint32_t sum = 0;

	if (!mem || out < 0) {
		fprintf(stderr, "counter: cannot allocate memory or open %s\n", outfile);
		return 1;
	}
	memset(mem, 0, size);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("start pid %d megabytes %ld\n", (int)getpid(), megabytes);
	for (uint64_t n = 1;; n++) {
		char line[64];
		int len;

		/* the first byte of every page counts N mod 256 */
		for (size_t off = 0; off < size; off += 4096)
			mem[off]++;
		sum = 0;
		for (size_t off = 0; off < size; off += 4096)
			sum += mem[off];
		printf("count %llu sum %u\n", (unsigned long long)n, sum);
		len = snprintf(line, sizeof(line), "%llu\n", (unsigned long long)n);
		if (write(out, line, len) != len) {
			perror("counter: write");
			return 1;
		}
		nanosleep(&pause, NULL);
	}
}
