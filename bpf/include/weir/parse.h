/* Cursor-style packet parsing shared by every Weir BPF program.
 *
 * A cursor is a position in the packet plus its end. Each parse_* helper checks
 * that its header fits before [data_end), advances the cursor past the header,
 * points *hdr at it and returns the next protocol (an ETH_P_* or IPPROTO_*
 * value in host order), or -1 when the packet is too short or malformed. The
 * helpers never read beyond what they checked, so the verifier accepts them
 * anywhere.
 */
#pragma once

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct cursor {
	void *pos;
	void *end;
};

static __always_inline void cursor_init(struct cursor *c, void *data, void *data_end)
{
	c->pos = data;
	c->end = data_end;
}

#define CURSOR_TAKE(c, type, hdr)                         \
	({                                                \
		type *__h = (c)->pos;                     \
		int __ok = (void *)(__h + 1) <= (c)->end; \
		if (__ok) {                               \
			(c)->pos = __h + 1;               \
			*(hdr) = __h;                     \
		}                                         \
		__ok;                                     \
	})

/* Ethernet: returns the EtherType (host order). VLAN tags are not unwrapped. */
static __always_inline int parse_ethhdr(struct cursor *c, struct ethhdr **eth)
{
	if (!CURSOR_TAKE(c, struct ethhdr, eth))
		return -1;
	return bpf_ntohs((*eth)->h_proto);
}

/* IPv4: returns the L4 protocol; skips options; fragments after the first give -1
 * only for callers that ask for ports (see parse_ports).
 */
static __always_inline int parse_iphdr(struct cursor *c, struct iphdr **ip)
{
	struct iphdr *h = c->pos;
	int len;

	if ((void *)(h + 1) > c->end)
		return -1;
	len = h->ihl * 4;
	if (len < (int)sizeof(*h) || (void *)h + len > c->end)
		return -1;
	c->pos = (void *)h + len;
	*ip = h;
	return h->protocol;
}

/* IPv6: returns the next header of the fixed header (extension headers are
 * returned as they are, not walked).
 */
static __always_inline int parse_ipv6hdr(struct cursor *c, struct ipv6hdr **ip6)
{
	if (!CURSOR_TAKE(c, struct ipv6hdr, ip6))
		return -1;
	return (*ip6)->nexthdr;
}

static __always_inline int parse_tcphdr(struct cursor *c, struct tcphdr **tcp)
{
	struct tcphdr *h = c->pos;
	int len;

	if ((void *)(h + 1) > c->end)
		return -1;
	len = h->doff * 4;
	if (len < (int)sizeof(*h) || (void *)h + len > c->end)
		return -1;
	c->pos = (void *)h + len;
	*tcp = h;
	return 0;
}

static __always_inline int parse_udphdr(struct cursor *c, struct udphdr **udp)
{
	return CURSOR_TAKE(c, struct udphdr, udp) ? 0 : -1;
}

/* ICMP and ICMPv6 share this layout for the fields Weir reads (echo id/seq).
 * Declared here because <linux/icmp.h> drags in libc headers.
 */
struct icmp_echo {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 id;
	__u16 seq;
};

/* ICMP or ICMPv6: returns the message type. */
static __always_inline int parse_icmp(struct cursor *c, struct icmp_echo **icmp)
{
	return CURSOR_TAKE(c, struct icmp_echo, icmp) ? (*icmp)->type : -1;
}

/* A flow tuple in one layout for both families (IPv4 in the first 4 bytes). */
struct flow {
	__u8 family; /* AF_INET (2) or AF_INET6 (10); 0 when not IP */
	__u8 proto;
	__u16 sport; /* network order; ICMP: the echo id, else 0 */
	__u16 dport; /* network order; ICMP: type << 8 | code */
	__u16 len;
	__u8 tcp_flags; /* FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10 */
	__u8 l4_ok;     /* the L4 header was there and parsed */
	__u8 saddr[16];
	__u8 daddr[16];
};

/* Parse Ethernet + IP + L4 ports into *f. Returns 0 for IP packets (ports are
 * zero for protocols without them), -1 for malformed IP, 1 for non-IP.
 */
static __always_inline int parse_flow(void *data, void *data_end, struct flow *f)
{
	struct cursor c;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct ipv6hdr *ip6;
	struct tcphdr *tcp;
	struct udphdr *udp;
	struct icmp_echo *icmp;
	int proto;

	__builtin_memset(f, 0, sizeof(*f));
	cursor_init(&c, data, data_end);
	f->len = data_end - data;
	proto = parse_ethhdr(&c, &eth);
	if (proto == ETH_P_IP) {
		proto = parse_iphdr(&c, &ip);
		if (proto < 0)
			return -1;
		f->family = 2;
		__builtin_memcpy(f->saddr, &ip->saddr, 4);
		__builtin_memcpy(f->daddr, &ip->daddr, 4);
		if (ip->frag_off & bpf_htons(0x1fff))
			proto = -2; /* a later fragment: no L4 header */
	} else if (proto == ETH_P_IPV6) {
		proto = parse_ipv6hdr(&c, &ip6);
		if (proto < 0)
			return -1;
		f->family = 10;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
	} else {
		return proto < 0 ? -1 : 1;
	}
	if (proto == -2) {
		f->proto = ip->protocol;
		return 0;
	}
	f->proto = proto;
	switch (proto) {
	case IPPROTO_TCP:
		if (parse_tcphdr(&c, &tcp) < 0)
			return -1;
		f->sport = tcp->source;
		f->dport = tcp->dest;
		f->tcp_flags = ((__u8 *)tcp)[13];
		f->l4_ok = 1;
		break;
	case IPPROTO_UDP:
		if (parse_udphdr(&c, &udp) < 0)
			return -1;
		f->sport = udp->source;
		f->dport = udp->dest;
		f->l4_ok = 1;
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (parse_icmp(&c, &icmp) < 0)
			return -1;
		f->sport = icmp->id;
		f->dport = bpf_htons(icmp->type << 8 | icmp->code);
		f->l4_ok = 1;
		break;
	}
	return 0;
}
