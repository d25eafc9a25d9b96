/*
 * Shared by the usrsctp test peers (sctp_server.c, sctp_client.c): address
 * parsing, line-oriented output, and the stack-wide tuning that makes path
 * failure detection take about a second instead of minutes.
 *
 * usrsctp runs over raw IPv4/IPv6 sockets (protocol 132) when started with
 * UDP encapsulation port 0: SCTP straight over IP, in user space (this
 * kernel has no SCTP). Every line printed is `<event> key=value ...`,
 * flushed at once, so a test can follow it.
 */
#ifndef LOXILB_SCTP_COMMON_H
#define LOXILB_SCTP_COMMON_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <usrsctp.h>

#define MAX_ADDRS 8

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/* One output line: `<event> key=value ...` (time in ms since start first
 * is not printed: tests use their own clocks). */
static void emit(const char *fmt, ...)
{
	va_list ap;
	pthread_mutex_lock(&out_lock);
	va_start(ap, fmt);
	vfprintf(stdout, fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

static void die(const char *what)
{
	emit("error what=%s errno=%d msg=%s", what, errno, strerror(errno));
	exit(1);
}

/* A list of addresses packed as usrsctp_bindx/usrsctp_connectx want them:
 * sockaddr_in and sockaddr_in6 back to back (no sa_len on Linux). */
struct addr_list {
	int n;
	int any_v6;
	size_t len;
	unsigned char buf[MAX_ADDRS * sizeof(struct sockaddr_in6)];
	char text[MAX_ADDRS * (INET6_ADDRSTRLEN + 1)];
};

static void addr_list_add(struct addr_list *l, const char *s, uint16_t port)
{
	struct sockaddr_in a4;
	struct sockaddr_in6 a6;

	if (l->n >= MAX_ADDRS) {
		emit("error what=too_many_addresses addr=%s", s);
		exit(2);
	}
	memset(&a4, 0, sizeof(a4));
	memset(&a6, 0, sizeof(a6));
	if (inet_pton(AF_INET, s, &a4.sin_addr) == 1) {
		a4.sin_family = AF_INET;
		a4.sin_port = htons(port);
		memcpy(l->buf + l->len, &a4, sizeof(a4));
		l->len += sizeof(a4);
	} else if (inet_pton(AF_INET6, s, &a6.sin6_addr) == 1) {
		a6.sin6_family = AF_INET6;
		a6.sin6_port = htons(port);
		memcpy(l->buf + l->len, &a6, sizeof(a6));
		l->len += sizeof(a6);
		l->any_v6 = 1;
	} else {
		emit("error what=bad_address addr=%s", s);
		exit(2);
	}
	if (l->n > 0)
		strcat(l->text, ",");
	strcat(l->text, s);
	l->n++;
}

/* "a.b.c.d" / "x::y" of a sockaddr (port not shown). */
static const char *addr_str(const struct sockaddr *sa, char *buf, size_t len)
{
	switch (sa->sa_family) {
	case AF_INET:
		return inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, buf, len);
	case AF_INET6: {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
		if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
			return inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], buf, len);
		return inet_ntop(AF_INET6, &s6->sin6_addr, buf, len);
	}
	default:
		snprintf(buf, len, "family%d", sa->sa_family);
		return buf;
	}
}

static size_t sa_size(const struct sockaddr *sa)
{
	return sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
}

/* `out` = the `n` packed addresses at `addrs`, comma-separated. */
static void join_addrs(const struct sockaddr *addrs, int n, char *out)
{
	char one[INET6_ADDRSTRLEN];
	const unsigned char *p = (const unsigned char *)addrs;
	int i;

	out[0] = '\0';
	for (i = 0; i < n; i++) {
		const struct sockaddr *sa = (const struct sockaddr *)p;
		if (i > 0)
			strcat(out, ",");
		strcat(out, addr_str(sa, one, sizeof(one)));
		p += sa_size(sa);
	}
}

/* Print the peer addresses (`peers`) and local addresses (`locals`) of
 * an association, and its primary path (`primary`). */
static void print_paths(struct socket *s, sctp_assoc_t id)
{
	struct sockaddr *addrs = NULL;
	char out[MAX_ADDRS * (INET6_ADDRSTRLEN + 1) + 64];
	char one[INET6_ADDRSTRLEN];
	int n;
	struct sctp_status st;
	socklen_t len = sizeof(st);

	n = usrsctp_getpaddrs(s, id, &addrs);
	join_addrs(addrs, n, out);
	if (n > 0)
		usrsctp_freepaddrs(addrs);
	emit("peers assoc=%u addrs=%s", (unsigned)id, out);

	addrs = NULL;
	n = usrsctp_getladdrs(s, id, &addrs);
	join_addrs(addrs, n, out);
	if (n > 0)
		usrsctp_freeladdrs(addrs);
	emit("locals assoc=%u addrs=%s", (unsigned)id, out);

	memset(&st, 0, sizeof(st));
	st.sstat_assoc_id = id;
	if (usrsctp_getsockopt(s, IPPROTO_SCTP, SCTP_STATUS, &st, &len) == 0)
		emit("primary assoc=%u addr=%s", (unsigned)id,
		     addr_str((struct sockaddr *)&st.sstat_primary.spinfo_address, one, sizeof(one)));
}

static const char *assoc_state(uint16_t s)
{
	switch (s) {
	case SCTP_COMM_UP: return "COMM_UP";
	case SCTP_COMM_LOST: return "COMM_LOST";
	case SCTP_RESTART: return "RESTART";
	case SCTP_SHUTDOWN_COMP: return "SHUTDOWN_COMP";
	case SCTP_CANT_STR_ASSOC: return "CANT_STR_ASSOC";
	default: return "OTHER";
	}
}

static const char *paddr_state(uint32_t s)
{
	switch (s) {
	case SCTP_ADDR_AVAILABLE: return "AVAILABLE";
	case SCTP_ADDR_UNREACHABLE: return "UNREACHABLE";
	case SCTP_ADDR_REMOVED: return "REMOVED";
	case SCTP_ADDR_ADDED: return "ADDED";
	case SCTP_ADDR_MADE_PRIM: return "MADE_PRIM";
	case SCTP_ADDR_CONFIRMED: return "CONFIRMED";
	default: return "OTHER";
	}
}

/* Print a notification; returns the association state for ASSOC_CHANGE
 * (0 for other notifications). */
static uint16_t print_notification(const void *buf, size_t len)
{
	const union sctp_notification *n = buf;
	char one[INET6_ADDRSTRLEN];

	if (len < sizeof(n->sn_header))
		return 0;
	switch (n->sn_header.sn_type) {
	case SCTP_ASSOC_CHANGE:
		emit("assoc assoc=%u state=%s error=%u out=%u in=%u",
		     (unsigned)n->sn_assoc_change.sac_assoc_id, assoc_state(n->sn_assoc_change.sac_state),
		     n->sn_assoc_change.sac_error, n->sn_assoc_change.sac_outbound_streams,
		     n->sn_assoc_change.sac_inbound_streams);
		return n->sn_assoc_change.sac_state;
	case SCTP_PEER_ADDR_CHANGE:
		emit("paddr assoc=%u addr=%s state=%s error=%u", (unsigned)n->sn_paddr_change.spc_assoc_id,
		     addr_str((const struct sockaddr *)&n->sn_paddr_change.spc_aaddr, one, sizeof(one)),
		     paddr_state(n->sn_paddr_change.spc_state), n->sn_paddr_change.spc_error);
		return 0;
	case SCTP_SHUTDOWN_EVENT:
		emit("shutdown assoc=%u", (unsigned)n->sn_shutdown_event.sse_assoc_id);
		return 0;
	case SCTP_REMOTE_ERROR:
		emit("remote_error assoc=%u", (unsigned)n->sn_remote_error.sre_assoc_id);
		return 0;
	case SCTP_SEND_FAILED_EVENT:
		emit("send_failed assoc=%u", (unsigned)n->sn_send_failed_event.ssfe_assoc_id);
		return 0;
	default:
		emit("notification type=%u", n->sn_header.sn_type);
		return 0;
	}
}

static void subscribe(struct socket *s)
{
	struct sctp_event ev;
	uint16_t types[] = {SCTP_ASSOC_CHANGE, SCTP_PEER_ADDR_CHANGE, SCTP_REMOTE_ERROR,
	                    SCTP_SHUTDOWN_EVENT, SCTP_SEND_FAILED_EVENT};
	const int on = 1;
	unsigned i;

	memset(&ev, 0, sizeof(ev));
	ev.se_assoc_id = SCTP_FUTURE_ASSOC;
	ev.se_on = 1;
	for (i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		ev.se_type = types[i];
		if (usrsctp_setsockopt(s, IPPROTO_SCTP, SCTP_EVENT, &ev, sizeof(ev)) < 0)
			die("SCTP_EVENT");
	}
	if (usrsctp_setsockopt(s, IPPROTO_SCTP, SCTP_RECVRCVINFO, &on, sizeof(on)) < 0)
		die("SCTP_RECVRCVINFO");
	if (usrsctp_setsockopt(s, IPPROTO_SCTP, SCTP_NODELAY, &on, sizeof(on)) < 0)
		die("SCTP_NODELAY");
}

/* Timers (ms) and retransmission limits; defaults give path failure in
 * about a second. Set from the command line with -T key=value. */
struct tuning {
	uint32_t rto_min, rto_max, rto_initial, hb_interval;
	uint32_t path_max_rxt, assoc_max_rxt, init_max_rxt;
	uint32_t blackhole;
};

static struct tuning tuning_defaults(void)
{
	struct tuning t = {
		.rto_min = 100,
		.rto_max = 400,
		.rto_initial = 200,
		.hb_interval = 200,
		.path_max_rxt = 2,
		.assoc_max_rxt = 20,
		.init_max_rxt = 8,
		.blackhole = 0,
	};
	return t;
}

static void tuning_set(struct tuning *t, const char *kv)
{
	const char *eq = strchr(kv, '=');
	uint32_t v;

	if (!eq) {
		emit("error what=bad_tuning arg=%s", kv);
		exit(2);
	}
	v = (uint32_t)strtoul(eq + 1, NULL, 0);
#define T(name) if (!strncmp(kv, #name, (size_t)(eq - kv)) && strlen(#name) == (size_t)(eq - kv)) { t->name = v; return; }
	T(rto_min) T(rto_max) T(rto_initial) T(hb_interval)
	T(path_max_rxt) T(assoc_max_rxt) T(init_max_rxt) T(blackhole)
#undef T
	emit("error what=unknown_tuning arg=%s", kv);
	exit(2);
}

/* Start usrsctp on raw IP (UDP encapsulation port 0) with the tuning as
 * stack-wide defaults (they apply to every association made afterwards). */
static void stack_init(const struct tuning *t)
{
	usrsctp_init(0, NULL, NULL);
	/* Checksum every packet, also on loopback (the tests check CRCs). */
	usrsctp_sysctl_set_sctp_no_csum_on_loopback(0);
	/* 0: answer out-of-the-blue packets with ABORT, as a kernel would.
	 * 2: stay silent (needed when two usrsctp stacks share a namespace:
	 * each sees every SCTP packet and would ABORT the other's). */
	usrsctp_sysctl_set_sctp_blackhole(t->blackhole);
	/* No ASCONF: the address set is fixed for the association's life
	 * (what a load balancer in the middle can handle). */
	usrsctp_sysctl_set_sctp_auto_asconf(0);
	usrsctp_sysctl_set_sctp_rto_min_default(t->rto_min);
	usrsctp_sysctl_set_sctp_rto_max_default(t->rto_max);
	usrsctp_sysctl_set_sctp_rto_initial_default(t->rto_initial);
	usrsctp_sysctl_set_sctp_init_rto_max_default(t->rto_max);
	usrsctp_sysctl_set_sctp_heartbeat_interval_default(t->hb_interval);
	usrsctp_sysctl_set_sctp_path_rtx_max_default(t->path_max_rxt);
	usrsctp_sysctl_set_sctp_assoc_rtx_max_default(t->assoc_max_rxt);
	usrsctp_sysctl_set_sctp_init_rtx_max_default(t->init_max_rxt);
	emit("tuning rto_min=%u rto_max=%u rto_initial=%u hb_interval=%u path_max_rxt=%u assoc_max_rxt=%u blackhole=%u",
	     t->rto_min, t->rto_max, t->rto_initial, t->hb_interval, t->path_max_rxt, t->assoc_max_rxt,
	     t->blackhole);
}

#endif
