/*
 * cps_loop: new TCP connections per second, with as little client work per connection as a client can do.
 *
 *   cps_loop IP PORT SECONDS CONCURRENCY PROCS MODE
 *
 * PROCS processes each keep CONCURRENCY non-blocking connects in flight (epoll). A connection counts once its
 * handshake has completed and it has been closed:
 *   rst  close at once with SO_LINGER 0: SYN, SYN-ACK, ACK, RST (no TIME_WAIT anywhere);
 *   http send "GET / HTTP/1.0" and read to the server's close: a whole short HTTP exchange, the server closing
 *        first (its TIME_WAIT, as wrk with Connection: close leaves).
 * Prints one line: "<connections/s> <errors>". wrk and nginx spend most of a short connection's CPU in the
 * client and server; this leaves the balancer's share of the two cores larger, which is what is compared.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXFD 65536

static const char REQ[] = "GET / HTTP/1.0\r\nHost: vip\r\n\r\n";
static unsigned char state[MAXFD]; /* 1: connecting, 2: reading the answer */

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int start(int ep, const struct sockaddr_in *sa, long *errs)
{
	struct epoll_event ev = { .events = EPOLLOUT };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0 || fd >= MAXFD) {
		if (fd >= 0)
			close(fd);
		(*errs)++;
		return -1;
	}
	if (connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) < 0 && errno != EINPROGRESS) {
		close(fd);
		(*errs)++;
		return -1;
	}
	state[fd] = 1;
	ev.data.fd = fd;
	epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
	return fd;
}

static void finish(int ep, int fd, int rst)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, fd, 0);
	if (rst) {
		struct linger l = { .l_onoff = 1, .l_linger = 0 };

		setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
	}
	state[fd] = 0;
	close(fd);
}

static void run(const struct sockaddr_in *sa, double secs, int conc, int rst, int out)
{
	struct epoll_event evs[256];
	long done = 0, errs = 0;
	double t0 = now(), end = t0 + secs;
	char buf[4096];
	int ep = epoll_create1(0);

	for (int i = 0; i < conc; i++)
		start(ep, sa, &errs);
	while (now() < end) {
		int n = epoll_wait(ep, evs, 256, 100);

		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd, err = 0;
			socklen_t len = sizeof(err);

			if (state[fd] == 1) {
				getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
				if (err || (evs[i].events & (EPOLLERR | EPOLLHUP))) {
					errs++;
					finish(ep, fd, 1);
				} else if (rst) {
					finish(ep, fd, 1);
					done++;
				} else {
					struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

					if (write(fd, REQ, sizeof(REQ) - 1) != (ssize_t)(sizeof(REQ) - 1)) {
						errs++;
						finish(ep, fd, 1);
					} else {
						state[fd] = 2;
						epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
						continue;
					}
				}
			} else {
				ssize_t r = read(fd, buf, sizeof(buf));

				if (r > 0 || (r < 0 && errno == EAGAIN))
					continue;
				if (r < 0)
					errs++;
				else
					done++;
				finish(ep, fd, 0);
			}
			start(ep, sa, &errs);
		}
	}
	dprintf(out, "%ld %ld %f\n", done, errs, now() - t0);
}

int main(int argc, char **argv)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	int pfd[2], procs, conc, rst;
	double secs, total = 0, took = 0;
	long errs = 0;
	FILE *f;

	if (argc != 7 || inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
		fprintf(stderr, "usage: cps_loop IP PORT SECONDS CONCURRENCY PROCS rst|http\n");
		return 2;
	}
	sa.sin_port = htons(atoi(argv[2]));
	secs = atof(argv[3]);
	conc = atoi(argv[4]);
	procs = atoi(argv[5]);
	rst = strcmp(argv[6], "rst") == 0;
	if (pipe(pfd) < 0)
		return 1;
	for (int i = 0; i < procs; i++) {
		if (fork() == 0) {
			close(pfd[0]);
			run(&sa, secs, conc, rst, pfd[1]);
			_exit(0);
		}
	}
	close(pfd[1]);
	f = fdopen(pfd[0], "r");
	for (int i = 0; i < procs; i++) {
		long d, e;
		double t;

		if (fscanf(f, "%ld %ld %lf", &d, &e, &t) != 3)
			break;
		total += d;
		errs += e;
		if (t > took)
			took = t;
	}
	while (wait(0) > 0)
		;
	printf("%.0f %ld\n", took > 0 ? total / took : 0.0, errs);
	return 0;
}
