/*
 * ref_server.c: the reference a rendezvous server is measured against.
 *
 * A plain classic rendezvous server: one UDP socket, one recvfrom() and one
 * sendto() per datagram, an open-addressing hash table keyed by the 32-byte
 * public key that stores the observed IPv4 address and port.
 *
 *   request: exactly 64 bytes, my_pubkey(32) + their_pubkey(32)
 *   action:  record my_pubkey -> source ip:port
 *   reply:   6 bytes (ipv4, port; network order) if their_pubkey is known,
 *            else an empty datagram.  Other lengths are dropped.
 *
 * No expiry and no capacity limit other than memory: it is a yardstick, not a
 * product.  `--mmsg N` switches to recvmmsg/sendmmsg batches of N datagrams;
 * the benchmark uses that only to show how far the load generator can go (it
 * is never the reference for the ratio).
 *
 * `--drop-every N` / `--corrupt-every N` withhold or damage (port + 1) every
 * Nth reply: they exist only so the benchmark can prove that the load
 * generator notices (bench_server.py --self-check).
 *
 * usage: ref_server ADDRESS PORT [--mmsg N] [--rcvbuf BYTES]
 *                   [--drop-every N] [--corrupt-every N]
 * Prints "ready <port>" on stdout once bound; SIGTERM/SIGINT end it and it
 * prints the number of datagrams it answered and dropped on stderr.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define KEY_LEN 32
#define REQ_LEN 64
#define REPLY_LEN 6
#define MAX_BATCH 1024

struct slot {
	uint8_t key[KEY_LEN];
	uint32_t ip;   /* network order */
	uint16_t port; /* network order */
	uint8_t used;
};

static struct slot *table;
static size_t cap = 1 << 16; /* power of two */
static size_t count;
static volatile sig_atomic_t stop;
static unsigned long long answered, dropped;
static unsigned long long drop_every, corrupt_every, nreq;

static uint64_t hash_key(const uint8_t *k)
{
	/* keys are public keys (uniformly random), but mix all 32 bytes anyway
	 * so that the table does not trust its input */
	uint64_t w[4], h = 0x9e3779b97f4a7c15ULL;
	memcpy(w, k, sizeof(w));
	for (int i = 0; i < 4; i++) {
		h ^= w[i];
		h *= 0xff51afd7ed558ccdULL;
		h ^= h >> 32;
	}
	return h;
}

static struct slot *find(struct slot *t, size_t c, const uint8_t *key)
{
	size_t i = hash_key(key) & (c - 1);
	for (;;) {
		struct slot *s = &t[i];
		if (!s->used || memcmp(s->key, key, KEY_LEN) == 0)
			return s;
		i = (i + 1) & (c - 1);
	}
}

static void grow(void)
{
	size_t ncap = cap * 2;
	struct slot *nt = calloc(ncap, sizeof(*nt));
	if (!nt) {
		perror("calloc");
		exit(1);
	}
	for (size_t i = 0; i < cap; i++)
		if (table[i].used)
			*find(nt, ncap, table[i].key) = table[i];
	free(table);
	table = nt;
	cap = ncap;
}

static void record(const uint8_t *key, const struct sockaddr_in *from)
{
	struct slot *s = find(table, cap, key);
	if (!s->used) {
		if ((count + 1) * 2 > cap) { /* keep the load factor <= 1/2 */
			grow();
			s = find(table, cap, key);
		}
		memcpy(s->key, key, KEY_LEN);
		s->used = 1;
		count++;
	}
	s->ip = from->sin_addr.s_addr;
	s->port = from->sin_port;
}

/* Handle one datagram; returns the reply length (0 or 6), or -1 to drop. */
static int handle(const uint8_t *req, ssize_t len, const struct sockaddr_in *from,
		  uint8_t *reply)
{
	if (len != REQ_LEN || from->sin_family != AF_INET)
		return -1;
	record(req, from);
	nreq++;
	if (drop_every && nreq % drop_every == 0)
		return -1;
	const struct slot *s = find(table, cap, req + KEY_LEN);
	if (!s->used)
		return 0;
	memcpy(reply, &s->ip, 4);
	uint16_t port = s->port;
	if (corrupt_every && nreq % corrupt_every == 0)
		port = htons(ntohs(port) + 1);
	memcpy(reply + 4, &port, 2);
	return REPLY_LEN;
}

static void serve_plain(int fd)
{
	uint8_t buf[2048], reply[REPLY_LEN];
	struct sockaddr_in from;
	while (!stop) {
		socklen_t flen = sizeof(from);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &flen);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("recvfrom");
			exit(1);
		}
		int r = handle(buf, n, &from, reply);
		if (r < 0) {
			dropped++;
			continue;
		}
		if (sendto(fd, reply, r, 0, (struct sockaddr *)&from, flen) < 0 && errno != EINTR)
			perror("sendto");
		answered++;
	}
}

static void serve_mmsg(int fd, int batch)
{
	static uint8_t bufs[MAX_BATCH][128], replies[MAX_BATCH][REPLY_LEN];
	static struct sockaddr_in froms[MAX_BATCH];
	static struct iovec iov[MAX_BATCH], oiov[MAX_BATCH];
	static struct mmsghdr in[MAX_BATCH], out[MAX_BATCH];
	while (!stop) {
		for (int i = 0; i < batch; i++) {
			iov[i] = (struct iovec){ bufs[i], sizeof(bufs[i]) };
			in[i].msg_hdr = (struct msghdr){ .msg_name = &froms[i],
							 .msg_namelen = sizeof(froms[i]),
							 .msg_iov = &iov[i],
							 .msg_iovlen = 1 };
		}
		int n = recvmmsg(fd, in, batch, MSG_WAITFORONE, NULL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("recvmmsg");
			exit(1);
		}
		int m = 0;
		for (int i = 0; i < n; i++) {
			int r = handle(bufs[i], in[i].msg_len, &froms[i], replies[m]);
			if (r < 0) {
				dropped++;
				continue;
			}
			oiov[m] = (struct iovec){ replies[m], (size_t)r };
			out[m].msg_hdr = (struct msghdr){ .msg_name = &froms[i],
							  .msg_namelen = sizeof(froms[i]),
							  .msg_iov = &oiov[m],
							  .msg_iovlen = 1 };
			m++;
		}
		for (int done = 0; done < m;) {
			int s = sendmmsg(fd, out + done, m - done, 0);
			if (s < 0) {
				if (errno == EINTR)
					continue;
				perror("sendmmsg");
				break;
			}
			done += s;
		}
		answered += m;
	}
}

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	int batch = 0, rcvbuf = 4 << 20;
	if (argc < 3) {
		fprintf(stderr, "usage: %s ADDRESS PORT [--mmsg N] [--rcvbuf BYTES] "
			"[--drop-every N] [--corrupt-every N]\n", argv[0]);
		return 2;
	}
	for (int i = 3; i < argc; i++) {
		if (!strcmp(argv[i], "--mmsg") && i + 1 < argc)
			batch = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--rcvbuf") && i + 1 < argc)
			rcvbuf = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--drop-every") && i + 1 < argc)
			drop_every = strtoull(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "--corrupt-every") && i + 1 < argc)
			corrupt_every = strtoull(argv[++i], NULL, 10);
		else {
			fprintf(stderr, "unknown argument %s\n", argv[i]);
			return 2;
		}
	}
	if (batch < 0 || batch > MAX_BATCH) {
		fprintf(stderr, "--mmsg must be 0..%d\n", MAX_BATCH);
		return 2;
	}

	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
	if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
		fprintf(stderr, "bad IPv4 address %s\n", argv[1]);
		return 2;
	}
	table = calloc(cap, sizeof(*table));
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (!table || fd < 0) {
		perror("setup");
		return 1;
	}
	/* FORCE needs CAP_NET_ADMIN; fall back to what net.core.rmem_max allows */
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("bind");
		return 1;
	}
	socklen_t alen = sizeof(addr);
	getsockname(fd, (struct sockaddr *)&addr, &alen);

	struct sigaction sa = { .sa_handler = on_signal }; /* no SA_RESTART: EINTR ends the wait */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	printf("ready %d\n", ntohs(addr.sin_port));
	fflush(stdout);
	if (batch > 0)
		serve_mmsg(fd, batch);
	else
		serve_plain(fd);
	fprintf(stderr, "answered %llu dropped %llu keys %zu\n", answered, dropped, count);
	return 0;
}
