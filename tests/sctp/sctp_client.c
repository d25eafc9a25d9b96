/*
 * Multihomed SCTP client on usrsctp (raw IP, no UDP encapsulation).
 *
 *   sctp_client -p PORT -l LOCAL [-l LOCAL ...] -r REMOTE [-r REMOTE ...]
 *               [-s SPORT] [-i INTERVAL_MS] [-n COUNT] [-T key=value ...]
 *
 * Binds every LOCAL address (usrsctp_bindx, source port SPORT or one the
 * stack picks), connects to the REMOTE addresses (usrsctp_connectx: the
 * first is where the INIT goes, all of them are the peer's addresses we
 * announce knowing), then sends `seq=N` every INTERVAL_MS (default 100;
 * COUNT messages, 0 = until killed) and prints one line per event:
 *
 *   tuning ...                         stack settings in force
 *   bound port=P addrs=A,B             local addresses bound
 *   connected assoc=ID                 connectx returned
 *   assoc assoc=ID state=COMM_UP ...   association change (also COMM_LOST,
 *                                      RESTART, ...)
 *   peers assoc=ID addrs=X,Y           the peer's addresses (from its INIT-ACK)
 *   locals assoc=ID addrs=A,B          our addresses in the association
 *   primary assoc=ID addr=X            primary path (printed at start and
 *                                      whenever the path in use changes)
 *   paddr assoc=ID addr=X state=S      peer address change
 *   sent assoc=ID seq=N                a message handed to the stack
 *   echo assoc=ID from=X seq=N         its echo came back (from: the source
 *                                      address of the echo)
 *   send_error / closed                the association is gone
 */
#include "sctp_common.h"

static struct socket *sock;
static volatile sctp_assoc_t assoc_id;

static void *receiver(void *arg)
{
	char buf[65536];
	char one[INET6_ADDRSTRLEN];
	(void)arg;
	for (;;) {
		struct sockaddr_in6 from;
		socklen_t fromlen = sizeof(from);
		struct sctp_rcvinfo rcv;
		socklen_t infolen = sizeof(rcv);
		unsigned int infotype = 0;
		int flags = 0;
		ssize_t n;

		memset(&rcv, 0, sizeof(rcv));
		n = usrsctp_recvv(sock, buf, sizeof(buf) - 1, (struct sockaddr *)&from, &fromlen, &rcv, &infolen,
		                  &infotype, &flags);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			emit("closed errno=%d", errno);
			exit(3);
		}
		if (n == 0) {
			emit("closed eof=1");
			exit(3);
		}
		if (flags & MSG_NOTIFICATION) {
			uint16_t st = print_notification(buf, (size_t)n);
			if (st == SCTP_COMM_LOST || st == SCTP_SHUTDOWN_COMP || st == SCTP_CANT_STR_ASSOC) {
				emit("closed state=%s", assoc_state(st));
				exit(3);
			}
			continue;
		}
		buf[n] = '\0';
		{
			const char *seq = strstr(buf, "seq=");
			emit("echo assoc=%u from=%s seq=%s", (unsigned)rcv.rcv_assoc_id,
			     addr_str((struct sockaddr *)&from, one, sizeof(one)), seq ? seq + 4 : "?");
		}
	}
	return NULL;
}

/* The primary path's address, "" if unknown. */
static void primary_of(char *out, size_t len)
{
	struct sctp_status st;
	socklen_t sl = sizeof(st);
	memset(&st, 0, sizeof(st));
	st.sstat_assoc_id = assoc_id;
	out[0] = '\0';
	if (usrsctp_getsockopt(sock, IPPROTO_SCTP, SCTP_STATUS, &st, &sl) == 0)
		addr_str((struct sockaddr *)&st.sstat_primary.spinfo_address, out, len);
}

int main(int argc, char **argv)
{
	struct tuning t = tuning_defaults();
	struct addr_list local, remote;
	const char *laddrs[MAX_ADDRS], *raddrs[MAX_ADDRS];
	int nl = 0, nr = 0, port = 0, sport = 0, interval = 100, count = 0, opt, i;
	sctp_assoc_t id = 0;
	pthread_t th;
	char prim[INET6_ADDRSTRLEN], now[INET6_ADDRSTRLEN];
	unsigned long seq;

	memset(&local, 0, sizeof(local));
	memset(&remote, 0, sizeof(remote));
	while ((opt = getopt(argc, argv, "p:l:r:s:i:n:T:")) != -1) {
		switch (opt) {
		case 'p': port = atoi(optarg); break;
		case 's': sport = atoi(optarg); break;
		case 'i': interval = atoi(optarg); break;
		case 'n': count = atoi(optarg); break;
		case 'l':
			if (nl < MAX_ADDRS)
				laddrs[nl++] = optarg;
			break;
		case 'r':
			if (nr < MAX_ADDRS)
				raddrs[nr++] = optarg;
			break;
		case 'T': tuning_set(&t, optarg); break;
		default:
			goto usage;
		}
	}
	if (port <= 0 || nl == 0 || nr == 0)
		goto usage;
	for (i = 0; i < nl; i++)
		addr_list_add(&local, laddrs[i], (uint16_t)sport);
	for (i = 0; i < nr; i++)
		addr_list_add(&remote, raddrs[i], (uint16_t)port);

	stack_init(&t);
	sock = usrsctp_socket(local.any_v6 || remote.any_v6 ? AF_INET6 : AF_INET, SOCK_STREAM, IPPROTO_SCTP, NULL,
	                      NULL, 0, NULL);
	if (!sock)
		die("usrsctp_socket");
	subscribe(sock);
	if (usrsctp_bindx(sock, (struct sockaddr *)local.buf, local.n, SCTP_BINDX_ADD_ADDR) < 0)
		die("usrsctp_bindx");
	{
		struct sockaddr *la = NULL;
		int n = usrsctp_getladdrs(sock, 0, &la);
		int p = 0;
		if (n > 0) {
			p = ntohs(((struct sockaddr_in *)la)->sin_port);
			usrsctp_freeladdrs(la);
		}
		emit("bound port=%d addrs=%s", p, local.text);
	}
	if (usrsctp_connectx(sock, (struct sockaddr *)remote.buf, remote.n, &id) < 0)
		die("usrsctp_connectx");
	assoc_id = id;
	emit("connected assoc=%u", (unsigned)id);
	print_paths(sock, id);
	primary_of(prim, sizeof(prim));
	if (pthread_create(&th, NULL, receiver, NULL) != 0)
		die("pthread_create");

	for (seq = 1; count == 0 || seq <= (unsigned long)count; seq++) {
		char msg[64];
		int len = snprintf(msg, sizeof(msg), "seq=%lu", seq);
		if (usrsctp_sendv(sock, msg, (size_t)len, NULL, 0, NULL, 0, SCTP_SENDV_NOINFO, 0) < 0) {
			emit("send_error seq=%lu errno=%d", seq, errno);
			exit(3);
		}
		emit("sent assoc=%u seq=%lu", (unsigned)id, seq);
		usleep((useconds_t)interval * 1000);
		primary_of(now, sizeof(now));
		if (strcmp(now, prim) != 0) {
			strcpy(prim, now);
			emit("primary assoc=%u addr=%s", (unsigned)id, prim);
		}
	}
	/* let the last echoes arrive */
	usleep(500 * 1000);
	emit("done sent=%lu", seq - 1);
	return 0;

usage:
	fprintf(stderr,
	        "usage: %s -p PORT -l LOCAL [-l LOCAL...] -r REMOTE [-r REMOTE...] [-s SPORT] [-i MS] [-n COUNT] [-T key=value]\n",
	        argv[0]);
	return 2;
}
