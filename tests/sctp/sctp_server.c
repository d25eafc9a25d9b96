/*
 * Multihomed SCTP echo server on usrsctp (raw IP, no UDP encapsulation).
 *
 *   sctp_server -p PORT -a ADDR [-a ADDR ...] [-T key=value ...]
 *
 * Binds every ADDR (IPv4 and/or IPv6) with usrsctp_bindx on one
 * one-to-many socket, accepts any number of associations, echoes every
 * message back on the association it came from, and prints one line per
 * event:
 *
 *   tuning ...                         stack settings in force
 *   ready port=P addrs=A,B             listening
 *   assoc assoc=ID state=COMM_UP ...   association change (also COMM_LOST,
 *                                      RESTART, SHUTDOWN_COMP)
 *   peers assoc=ID addrs=X,Y           the peer's addresses (at COMM_UP)
 *   locals assoc=ID addrs=A,B          our addresses in the association
 *   primary assoc=ID addr=X            our primary path toward the peer
 *   paddr assoc=ID addr=X state=S      peer address change (UNREACHABLE,
 *                                      AVAILABLE, ...)
 *   data assoc=ID from=X count=N msg=M a message (from: the source
 *                                      address it arrived from; count: per
 *                                      association)
 */
#include "sctp_common.h"

#define MAX_ASSOCS 1024

static struct {
	sctp_assoc_t id;
	unsigned long count;
} counts[MAX_ASSOCS];

static unsigned long count_for(sctp_assoc_t id)
{
	int i;
	for (i = 0; i < MAX_ASSOCS; i++) {
		if (counts[i].id == id && counts[i].count > 0)
			return ++counts[i].count;
	}
	for (i = 0; i < MAX_ASSOCS; i++) {
		if (counts[i].count == 0) {
			counts[i].id = id;
			return ++counts[i].count;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct tuning t = tuning_defaults();
	struct addr_list local;
	const char *addrs[MAX_ADDRS];
	int naddrs = 0, port = 0, opt, i;
	struct socket *s;
	char buf[65536];
	char one[INET6_ADDRSTRLEN];

	memset(&local, 0, sizeof(local));
	while ((opt = getopt(argc, argv, "p:a:T:")) != -1) {
		switch (opt) {
		case 'p': port = atoi(optarg); break;
		case 'a':
			if (naddrs < MAX_ADDRS)
				addrs[naddrs++] = optarg;
			break;
		case 'T': tuning_set(&t, optarg); break;
		default:
			fprintf(stderr, "usage: %s -p PORT -a ADDR [-a ADDR ...] [-T key=value]\n", argv[0]);
			return 2;
		}
	}
	if (port <= 0 || naddrs == 0) {
		fprintf(stderr, "usage: %s -p PORT -a ADDR [-a ADDR ...] [-T key=value]\n", argv[0]);
		return 2;
	}
	for (i = 0; i < naddrs; i++)
		addr_list_add(&local, addrs[i], (uint16_t)port);

	stack_init(&t);
	s = usrsctp_socket(local.any_v6 ? AF_INET6 : AF_INET, SOCK_SEQPACKET, IPPROTO_SCTP, NULL, NULL, 0, NULL);
	if (!s)
		die("usrsctp_socket");
	subscribe(s);
	if (usrsctp_bindx(s, (struct sockaddr *)local.buf, local.n, SCTP_BINDX_ADD_ADDR) < 0)
		die("usrsctp_bindx");
	if (usrsctp_listen(s, 16) < 0)
		die("usrsctp_listen");
	emit("ready port=%d addrs=%s", port, local.text);

	for (;;) {
		struct sockaddr_in6 from;
		socklen_t fromlen = sizeof(from);
		struct sctp_rcvinfo rcv;
		socklen_t infolen = sizeof(rcv);
		unsigned int infotype = 0;
		int flags = 0;
		ssize_t n;

		memset(&rcv, 0, sizeof(rcv));
		n = usrsctp_recvv(s, buf, sizeof(buf) - 1, (struct sockaddr *)&from, &fromlen, &rcv, &infolen,
		                  &infotype, &flags);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("usrsctp_recvv");
		}
		if (n == 0)
			continue;
		if (flags & MSG_NOTIFICATION) {
			const union sctp_notification *no = (const void *)buf;
			if (print_notification(buf, (size_t)n) == SCTP_COMM_UP)
				print_paths(s, no->sn_assoc_change.sac_assoc_id);
			continue;
		}
		{
			struct sctp_sndinfo snd;
			ssize_t k;
			buf[n] = '\0';
			/* one token: no spaces or newlines in what we print */
			for (k = 0; k < n; k++)
				if (buf[k] == ' ' || buf[k] == '\n' || buf[k] == '\r' || buf[k] == '\0')
					buf[k] = '_';
			emit("data assoc=%u from=%s count=%lu msg=%s", (unsigned)rcv.rcv_assoc_id,
			     addr_str((struct sockaddr *)&from, one, sizeof(one)), count_for(rcv.rcv_assoc_id), buf);
			memset(&snd, 0, sizeof(snd));
			snd.snd_sid = rcv.rcv_sid;
			snd.snd_ppid = rcv.rcv_ppid;
			snd.snd_assoc_id = rcv.rcv_assoc_id;
			if (usrsctp_sendv(s, buf, (size_t)n, NULL, 0, &snd, sizeof(snd), SCTP_SENDV_SNDINFO, 0) < 0)
				emit("send_error assoc=%u errno=%d", (unsigned)rcv.rcv_assoc_id, errno);
		}
	}
}
