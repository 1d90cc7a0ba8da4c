/*
 * loadgen.c: load generator for classic rendezvous servers (loopback only).
 *
 * Phase 1 (register): each of --keys keys is registered once from its own
 * socket bound to a distinct loopback endpoint (127.1.I.1:PORT), so every key
 * has a different expected endpoint.  The request asks for a key nobody
 * registers, so the reply must be empty.  A key whose registration got no
 * reply is counted lost and never looked up.
 *
 * Phase 2 (lookup): --sockets connected UDP sockets (one source port each,
 * spread over 127.0.0.2..) keep --window requests in flight each, sent with
 * sendmmsg and received with recvmmsg, driven by epoll.  Each socket has its
 * own client key (so lookups never move a registered key) and asks for a
 * random registered key (or, with --unknown-pct, a never-registered one, whose
 * answer must be empty).  The requests in flight on one socket always expect
 * different answers, so a reply identifies its request by value: a reply that
 * matches no request in flight is wrong, a request unanswered after --timeout
 * is lost.  The kernel only delivers replies whose source is the server's
 * address and port (the sockets are connected).
 *
 * Throughput counts replies received between --warmup and --seconds;
 * latency is send-to-receive per request in that window.  Stops by itself:
 * after --seconds (or --max-requests), it waits at most --timeout for the
 * last replies.  One line of JSON on stdout; with --watch-pid (up to 8), it
 * includes the CPU used by those processes during the measured window, in
 * cores (1.0 = one core busy all the time), next to the generator's own,
 * the whole machine's and the part of it spent in (soft)irqs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define KEY_LEN 32
#define REQ_LEN 64
#define WMAX 64
#define RBATCH 64
#define EMPTY (1ULL << 63)
#define BAD (1ULL << 62)
#define HIST_US 2000000 /* 1 us buckets up to 2 s */
#define PORTS_PER_IP 60000
#define PORT_BASE 2000

struct inflight {
	uint64_t expect; /* 6 reply bytes in the low bytes, or EMPTY */
	uint64_t sent_ns;
};

struct lsock {
	int fd;
	int n;
	uint8_t key[KEY_LEN];
	struct inflight f[WMAX];
};

static struct {
	struct sockaddr_in server;
	long keys, sockets, window, max_requests, unknown_pct;
	double seconds, warmup, timeout;
	uint64_t seed;
	int nwatch;
	int watch[8];
} opt = { .keys = 60000, .sockets = 256, .window = 4, .seconds = 5,
	  .warmup = 0.5, .timeout = 2.0, .seed = 1 };

static uint8_t (*keys)[KEY_LEN];
static uint64_t *endpoint; /* expected reply per key */
static uint32_t *registered; /* indices of keys whose registration was answered */
static long nregistered;
static uint32_t *hist;
static uint64_t rng_state;

static struct {
	unsigned long long reg_ok, reg_lost, reg_wrong, reg_skipped;
	unsigned long long sent, ok, wrong, lost, measured, overflow_us;
} st;

static uint64_t splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint64_t rnd(void)
{
	return splitmix(&rng_state);
}

static void make_key(uint64_t id, uint8_t *out)
{
	uint64_t x = opt.seed * 0x2545f4914f6cdd1dULL ^ id * 0x9e3779b97f4a7c15ULL, w;
	for (int i = 0; i < 4; i++) {
		w = splitmix(&x);
		memcpy(out + 8 * i, &w, 8);
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static uint64_t pack_reply(const uint8_t *b, int len)
{
	uint64_t v = 0;
	if (len == 0)
		return EMPTY;
	if (len != 6)
		return BAD;
	memcpy(&v, b, 6);
	return v;
}

static uint64_t pack_addr(const struct sockaddr_in *a)
{
	uint8_t b[6];
	memcpy(b, &a->sin_addr.s_addr, 4);
	memcpy(b + 4, &a->sin_port, 2);
	return pack_reply(b, 6);
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void raise_nofile(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static long nofile(void)
{
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	return (long)rl.rlim_cur;
}

/* ---- phase 1 ---------------------------------------------------------- */

static void reg_endpoint(long k, struct sockaddr_in *a)
{
	long ipi = k / PORTS_PER_IP; /* 127.1.ipi.1, up to 256 * 60000 keys */
	memset(a, 0, sizeof(*a));
	a->sin_family = AF_INET;
	a->sin_addr.s_addr = htonl(0x7f010001u | (uint32_t)(ipi & 0xff) << 8);
	a->sin_port = htons(PORT_BASE + k % PORTS_PER_IP);
}

static void register_keys(void)
{
	long chunk = nofile() - opt.sockets - 64;
	if (chunk > 1024)
		chunk = 1024;
	if (chunk < 16) {
		fprintf(stderr, "too few file descriptors\n");
		exit(1);
	}
	uint8_t nobody[KEY_LEN], req[REQ_LEN], buf[64];
	make_key(0x300000000ULL, nobody);
	memcpy(req + KEY_LEN, nobody, KEY_LEN);
	struct pollfd *pf = calloc(chunk, sizeof(*pf));
	long *which = calloc(chunk, sizeof(*which));
	if (!pf || !which)
		die("calloc");

	for (long base = 0; base < opt.keys; base += chunk) {
		long m = 0;
		for (long k = base; k < base + chunk && k < opt.keys; k++) {
			struct sockaddr_in a;
			reg_endpoint(k, &a);
			int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
			if (fd < 0)
				die("socket");
			if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
			    connect(fd, (struct sockaddr *)&opt.server, sizeof(opt.server)) < 0) {
				close(fd); /* endpoint busy (not in a private netns?) */
				st.reg_skipped++;
				continue;
			}
			endpoint[k] = pack_addr(&a);
			memcpy(req, keys[k], KEY_LEN);
			if (send(fd, req, REQ_LEN, 0) != REQ_LEN)
				die("send (register)");
			pf[m] = (struct pollfd){ .fd = fd, .events = POLLIN };
			which[m++] = k;
		}
		long pending = m;
		uint64_t deadline = now_ns() + (uint64_t)(opt.timeout * 1e9);
		while (pending > 0) {
			uint64_t t = now_ns();
			if (t >= deadline)
				break;
			int r = poll(pf, m, (int)((deadline - t) / 1000000) + 1);
			if (r < 0 && errno != EINTR)
				die("poll");
			for (long i = 0; i < m && r > 0; i++) {
				if (pf[i].fd < 0 || !(pf[i].revents & POLLIN))
					continue;
				ssize_t n = recv(pf[i].fd, buf, sizeof(buf), 0);
				if (n < 0)
					continue;
				if (n == 0) {
					st.reg_ok++;
					registered[nregistered++] = which[i];
				} else {
					st.reg_wrong++;
				}
				close(pf[i].fd);
				pf[i].fd = -1;
				pending--;
			}
		}
		for (long i = 0; i < m; i++)
			if (pf[i].fd >= 0) {
				close(pf[i].fd);
				st.reg_lost++;
			}
	}
	free(pf);
	free(which);
}

/* CPU seconds used so far by the watched server processes (user + system; the
 * system part alone in *sys) */
static double watched_cpu(double *sys)
{
	double total = 0;
	*sys = 0;
	for (int i = 0; i < opt.nwatch; i++) {
		char path[64], buf[1024];
		snprintf(path, sizeof(path), "/proc/%d/stat", opt.watch[i]);
		FILE *f = fopen(path, "r");
		if (!f)
			continue;
		size_t n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
		buf[n] = 0;
		char *p = strrchr(buf, ')');
		unsigned long ut = 0, stt = 0;
		/* after the command: state ppid pgrp session tty tpgid flags minflt
		 * cminflt majflt cmajflt utime stime */
		if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
				&ut, &stt) == 2)
		{
			total += (double)(ut + stt) / sysconf(_SC_CLK_TCK);
			*sys += (double)stt / sysconf(_SC_CLK_TCK);
		}
	}
	return total;
}

/* whole-machine busy and softirq time, in seconds of CPU (from /proc/stat) */
static void machine_cpu(double *busy, double *softirq)
{
	unsigned long long v[8] = { 0 };
	FILE *f = fopen("/proc/stat", "r");
	*busy = *softirq = 0;
	if (!f)
		return;
	/* cpu user nice system idle iowait irq softirq steal */
	if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
		   &v[4], &v[5], &v[6], &v[7]) == 8) {
		double hz = sysconf(_SC_CLK_TCK);
		*busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz;
		*softirq = (v[5] + v[6]) / hz;
	}
	fclose(f);
}

static double self_cpu(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
	       ru.ru_stime.tv_usec / 1e6;
}

/* ---- phase 2 ---------------------------------------------------------- */

static struct lsock *socks;
static uint64_t measure_from, measure_to;

static int expected_busy(const struct lsock *s, uint64_t e)
{
	for (int i = 0; i < s->n; i++)
		if (s->f[i].expect == e)
			return 1;
	return 0;
}

static void refill(struct lsock *s, uint64_t t)
{
	static uint8_t reqs[WMAX][REQ_LEN];
	static struct iovec iov[WMAX];
	static struct mmsghdr msgs[WMAX];
	static uint8_t unknown[KEY_LEN];
	int k = 0, n0 = s->n;

	while (s->n < opt.window) {
		if (opt.max_requests && st.sent + k >= (unsigned long long)opt.max_requests)
			break;
		const uint8_t *their = NULL;
		uint64_t e = 0;
		for (int tries = 0; tries < 32 && !their; tries++) {
			uint64_t r = rnd();
			if (opt.unknown_pct && (long)(r % 100) < opt.unknown_pct) {
				e = EMPTY;
				make_key(0x200000000ULL + (r >> 32) % 4096, unknown);
				their = unknown;
			} else {
				uint32_t key = registered[(r >> 8) % nregistered];
				e = endpoint[key];
				their = keys[key];
			}
			if (expected_busy(s, e))
				their = NULL;
		}
		if (!their)
			break;
		memcpy(reqs[k], s->key, KEY_LEN);
		memcpy(reqs[k] + KEY_LEN, their, KEY_LEN);
		iov[k] = (struct iovec){ reqs[k], REQ_LEN };
		msgs[k].msg_hdr = (struct msghdr){ .msg_iov = &iov[k], .msg_iovlen = 1 };
		s->f[s->n++] = (struct inflight){ .expect = e, .sent_ns = t };
		k++;
	}
	int done = 0;
	while (done < k) {
		int r = sendmmsg(s->fd, msgs + done, k - done, MSG_DONTWAIT);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == ENOBUFS || errno == ECONNREFUSED)
				break;
			die("sendmmsg");
		}
		done += r;
	}
	s->n = n0 + done; /* forget what could not be sent */
	st.sent += done;
}

static void complete(struct lsock *s, uint64_t v, uint64_t t)
{
	for (int i = 0; i < s->n; i++) {
		if (s->f[i].expect != v)
			continue;
		if (t >= measure_from && t <= measure_to) {
			uint64_t us = (t - s->f[i].sent_ns) / 1000;
			if (us >= HIST_US) {
				us = HIST_US - 1;
				st.overflow_us++;
			}
			hist[us]++;
			st.measured++;
		}
		s->f[i] = s->f[--s->n];
		st.ok++;
		return;
	}
	st.wrong++;
}

static void expire(uint64_t t, int sending)
{
	uint64_t limit = (uint64_t)(opt.timeout * 1e9);
	for (long j = 0; j < opt.sockets; j++) {
		struct lsock *s = &socks[j];
		for (int i = 0; i < s->n;) {
			if (t - s->f[i].sent_ns > limit) {
				s->f[i] = s->f[--s->n];
				st.lost++;
			} else {
				i++;
			}
		}
		if (sending)
			refill(s, t);
	}
}

static double percentile(double p)
{
	unsigned long long want = (unsigned long long)(p * st.measured), acc = 0;
	if (!st.measured)
		return 0;
	for (long i = 0; i < HIST_US; i++) {
		acc += hist[i];
		if (acc > want)
			return (double)i + 0.5;
	}
	return HIST_US;
}

static void run_load(void)
{
	socks = calloc(opt.sockets, sizeof(*socks));
	int ep = epoll_create1(0);
	if (!socks || ep < 0)
		die("setup");
	for (long j = 0; j < opt.sockets; j++) {
		struct lsock *s = &socks[j];
		struct sockaddr_in a = { .sin_family = AF_INET,
					 .sin_addr.s_addr = htonl(0x7f000002u + j % 250) };
		s->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
		if (s->fd < 0)
			die("socket");
		int sz = 1 << 20;
		if (setsockopt(s->fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof(sz)) < 0)
			setsockopt(s->fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof(sz));
		if (bind(s->fd, (struct sockaddr *)&a, sizeof(a)) < 0)
			die("bind (load socket)");
		if (connect(s->fd, (struct sockaddr *)&opt.server, sizeof(opt.server)) < 0)
			die("connect");
		make_key(0x100000000ULL + j, s->key);
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = s };
		if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) < 0)
			die("epoll_ctl");
	}

	static uint8_t bufs[RBATCH][64];
	static struct iovec iov[RBATCH];
	static struct mmsghdr msgs[RBATCH];
	static struct epoll_event evs[1024];
	uint64_t t0 = now_ns();
	uint64_t stop_at = t0 + (uint64_t)(opt.seconds * 1e9);
	measure_from = t0 + (uint64_t)(opt.warmup * 1e9);
	measure_to = stop_at;
	uint64_t next_expire = t0 + 50000000ULL, drain_until = 0;
	int sending = 1, cpu_started = 0;
	double srv_cpu0 = 0, lg_cpu0 = 0, srv_cpu = 0, lg_cpu = 0, srv_sys0 = 0, srv_sys = 0;
	double m_busy0 = 0, m_irq0 = 0, m_busy = 0, m_irq = 0;
	for (long j = 0; j < opt.sockets; j++)
		refill(&socks[j], now_ns());

	for (;;) {
		uint64_t t = now_ns();
		if (!cpu_started && t >= measure_from) {
			cpu_started = 1;
			srv_cpu0 = watched_cpu(&srv_sys0);
			lg_cpu0 = self_cpu();
			machine_cpu(&m_busy0, &m_irq0);
		}
		if (sending && (t >= stop_at ||
				(opt.max_requests && st.sent >= (unsigned long long)opt.max_requests))) {
			sending = 0;
			measure_to = t < measure_to ? t : measure_to;
			drain_until = t + (uint64_t)(opt.timeout * 1e9);
			if (cpu_started) {
				srv_cpu = watched_cpu(&srv_sys) - srv_cpu0;
				srv_sys -= srv_sys0;
				lg_cpu = self_cpu() - lg_cpu0;
				machine_cpu(&m_busy, &m_irq);
				m_busy -= m_busy0;
				m_irq -= m_irq0;
			}
		}
		if (!sending) {
			long busy = 0;
			for (long j = 0; j < opt.sockets; j++)
				busy += socks[j].n;
			if (!busy || t >= drain_until)
				break;
		}
		if (t >= next_expire) {
			expire(t, sending);
			next_expire = t + 50000000ULL;
		}
		int ne = epoll_wait(ep, evs, 1024, 5);
		if (ne < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int e = 0; e < ne; e++) {
			struct lsock *s = evs[e].data.ptr;
			for (int i = 0; i < RBATCH; i++) {
				iov[i] = (struct iovec){ bufs[i], sizeof(bufs[i]) };
				msgs[i].msg_hdr = (struct msghdr){ .msg_iov = &iov[i], .msg_iovlen = 1 };
			}
			int n = recvmmsg(s->fd, msgs, RBATCH, MSG_DONTWAIT, NULL);
			if (n < 0) {
				if (errno == EAGAIN || errno == EINTR || errno == ECONNREFUSED)
					continue;
				die("recvmmsg");
			}
			uint64_t tr = now_ns();
			for (int i = 0; i < n; i++)
				complete(s, pack_reply(bufs[i], msgs[i].msg_len), tr);
			if (sending)
				refill(s, tr);
		}
	}
	for (long j = 0; j < opt.sockets; j++) {
		st.lost += socks[j].n;
		close(socks[j].fd);
	}
	double secs = (double)(measure_to - measure_from) / 1e9;
	printf("{\"keys\": %ld, \"registered\": %llu, \"reg_lost\": %llu, \"reg_wrong\": %llu, "
	       "\"reg_skipped\": %llu, \"sockets\": %ld, \"window\": %ld, \"sent\": %llu, "
	       "\"ok\": %llu, \"wrong\": %llu, \"lost\": %llu, \"measured\": %llu, "
	       "\"seconds\": %.3f, \"reqps\": %.0f, \"p50_us\": %.1f, \"p99_us\": %.1f, "
	       "\"p999_us\": %.1f, \"over_2s\": %llu, \"server_cpu\": %.3f, "
	       "\"server_sys_cpu\": %.3f, \"loadgen_cpu\": %.3f, \"machine_cpu\": %.3f, \"softirq_cpu\": %.3f}\n",
	       opt.keys, st.reg_ok, st.reg_lost, st.reg_wrong, st.reg_skipped, opt.sockets,
	       opt.window, st.sent, st.ok, st.wrong, st.lost, st.measured, secs,
	       secs > 0 ? st.measured / secs : 0.0, percentile(0.50), percentile(0.99),
	       percentile(0.999), st.overflow_us, opt.nwatch && secs > 0 ? srv_cpu / secs : -1.0,
	       opt.nwatch && secs > 0 ? srv_sys / secs : -1.0,
	       secs > 0 ? lg_cpu / secs : 0.0, secs > 0 ? m_busy / secs : 0.0,
	       secs > 0 ? m_irq / secs : 0.0);
}

static void usage(const char *p)
{
	fprintf(stderr,
		"usage: %s --server IP:PORT [--keys N] [--sockets N] [--window N]\n"
		"          [--seconds S] [--warmup S] [--timeout S] [--max-requests N]\n"
		"          [--unknown-pct P] [--seed N] [--watch-pid PID]...\n", p);
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "server", 1, 0, 's' },  { "keys", 1, 0, 'k' },    { "sockets", 1, 0, 'S' },
		{ "window", 1, 0, 'w' },  { "seconds", 1, 0, 't' }, { "warmup", 1, 0, 'W' },
		{ "timeout", 1, 0, 'T' }, { "max-requests", 1, 0, 'm' },
		{ "unknown-pct", 1, 0, 'u' }, { "seed", 1, 0, 'r' }, { "watch-pid", 1, 0, 'p' },
		{ 0, 0, 0, 0 }
	};
	int c, have_server = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 's': {
			char host[64], *colon = strrchr(optarg, ':');
			if (!colon || colon - optarg >= (long)sizeof(host))
				usage(argv[0]);
			memcpy(host, optarg, colon - optarg);
			host[colon - optarg] = 0;
			opt.server.sin_family = AF_INET;
			opt.server.sin_port = htons(atoi(colon + 1));
			if (inet_pton(AF_INET, host, &opt.server.sin_addr) != 1)
				usage(argv[0]);
			if ((ntohl(opt.server.sin_addr.s_addr) >> 24) != 127) {
				fprintf(stderr, "loopback servers only (127.0.0.0/8)\n");
				return 2;
			}
			have_server = 1;
			break;
		}
		case 'k': opt.keys = atol(optarg); break;
		case 'S': opt.sockets = atol(optarg); break;
		case 'w': opt.window = atol(optarg); break;
		case 't': opt.seconds = atof(optarg); break;
		case 'W': opt.warmup = atof(optarg); break;
		case 'T': opt.timeout = atof(optarg); break;
		case 'm': opt.max_requests = atol(optarg); break;
		case 'u': opt.unknown_pct = atol(optarg); break;
		case 'r': opt.seed = strtoull(optarg, NULL, 0); break;
		case 'p':
			if (opt.nwatch < 8)
				opt.watch[opt.nwatch++] = atoi(optarg);
			break;
		default: usage(argv[0]);
		}
	}
	if (!have_server || opt.keys < 1 || opt.keys > 256L * PORTS_PER_IP ||
	    opt.sockets < 1 || opt.window < 1 || opt.window > WMAX ||
	    opt.unknown_pct < 0 || opt.unknown_pct > 100 || opt.seconds <= 0 ||
	    opt.warmup < 0 || opt.warmup >= opt.seconds || opt.timeout <= 0)
		usage(argv[0]);

	raise_nofile();
	if (opt.sockets + 80 > nofile()) {
		fprintf(stderr, "--sockets %ld needs more file descriptors (limit %ld)\n",
			opt.sockets, nofile());
		return 2;
	}
	rng_state = opt.seed;
	keys = malloc(opt.keys * sizeof(*keys));
	endpoint = calloc(opt.keys, sizeof(*endpoint));
	registered = malloc(opt.keys * sizeof(*registered));
	hist = calloc(HIST_US, sizeof(*hist));
	if (!keys || !endpoint || !registered || !hist)
		die("malloc");
	for (long k = 0; k < opt.keys; k++)
		make_key(k, keys[k]);

	uint64_t t = now_ns();
	register_keys();
	fprintf(stderr, "registered %llu/%ld keys in %.2f s\n", st.reg_ok, opt.keys,
		(now_ns() - t) / 1e9);
	if (!nregistered) {
		fprintf(stderr, "no key registered: is the server running?\n");
		printf("{\"keys\": %ld, \"registered\": 0, \"reg_lost\": %llu, \"reg_wrong\": %llu, "
		       "\"error\": \"no key registered\"}\n", opt.keys, st.reg_lost, st.reg_wrong);
		return 1;
	}
	if (opt.unknown_pct < 100 && nregistered < opt.window) {
		fprintf(stderr, "--window must not exceed the number of registered keys\n");
		return 2;
	}
	run_load();
	return 0;
}
