/* The one packet parser of every Weir BPF program.
 *
 * A cursor is a position in the packet plus its end. Each parse_* helper checks
 * that its header fits before [data_end), advances the cursor past the header,
 * points *hdr at it and returns the next protocol (an EtherType or IP protocol
 * number in host order), or a negative value when the packet is too short or
 * malformed. The helpers never read beyond what they checked, so the verifier
 * accepts them anywhere.
 *
 * parse_flow() puts them together: up to WEIR_VLAN_MAX VLAN tags, IPv4 with
 * its options, IPv6 with every extension header the kernel accepts (at most
 * WEIR_IPV6_EXT_MAX of them), then the L4 ports. Fragments are described in
 * the flow (first or later, datagram id); a later fragment carries no L4
 * header, and frag.h gives it the ports of its datagram.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "defs.h"

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

struct vlan_tag {
	__be16 tci;
	__be16 proto; /* the EtherType after the tag */
};

/* Ethernet and up to WEIR_VLAN_MAX 802.1Q / 802.1ad tags: returns the EtherType
 * of what follows (host order). More tags than that give the tag's EtherType,
 * which no caller takes for IP.
 */
static __always_inline int parse_ethhdr(struct cursor *c, struct ethhdr **eth)
{
	struct vlan_tag *tag;
	__be16 proto;

	if (!CURSOR_TAKE(c, struct ethhdr, eth))
		return -1;
	proto = (*eth)->h_proto;
#pragma unroll
	for (int i = 0; i < WEIR_VLAN_MAX; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if (!CURSOR_TAKE(c, struct vlan_tag, &tag))
			return -1;
		proto = tag->proto;
	}
	return bpf_ntohs(proto);
}

/* IPv4: returns the L4 protocol; the options are skipped. */
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

/* IPv6 fixed header: returns its next header (see parse_ipv6_ext for the rest). */
static __always_inline int parse_ipv6hdr(struct cursor *c, struct ipv6hdr **ip6)
{
	if (!CURSOR_TAKE(c, struct ipv6hdr, ip6))
		return -1;
	return (*ip6)->nexthdr;
}

/* What a flow knows of fragmentation. */
enum flow_frag {
	FLOW_FRAG_NONE = 0,  /* a whole datagram */
	FLOW_FRAG_FIRST = 1, /* offset 0, more to come: carries the L4 header */
	FLOW_FRAG_LATER = 2, /* offset > 0: no L4 header */
};

/* The IPv6 fragment header (not in the uapi headers). */
struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3, bit 0: more fragments */
	__be32 id;
};

#define IPV6_FRAG_OFFSET 0xfff8
#define IPV6_FRAG_MORE 0x0001
#define IPV4_FRAG_OFFSET 0x1fff
#define IPV4_FRAG_MORE 0x2000

#define PARSE_EXT_LIMIT -2
#define PARSE_MAX_OFF 0x4000 /* no header chain the parser walks reaches 16 KiB */

/* Hide a value from the compiler so that it keeps the arithmetic as written
 * (no branches): the verifier then follows one path instead of one per case.
 */
#define opaque(x) asm volatile("" : "+r"(x))

/* Whether an IPv6 next header is an extension header the parser walks. */
static __always_inline int ipv6_is_ext(int nexthdr)
{
	return nexthdr == WEIR_IP_PROTO_HOPOPTS || nexthdr == WEIR_IP_PROTO_ROUTING ||
	       nexthdr == WEIR_IP_PROTO_DSTOPTS || nexthdr == WEIR_IP_PROTO_AH ||
	       nexthdr == WEIR_IP_PROTO_FRAGMENT;
}

/* 1 when a == b, else 0, for values below 2^31, without a branch. */
static __always_inline __u32 same(__u32 a, __u32 b)
{
	__u32 x = a ^ b;

	opaque(x);
	x = ((x - 1) >> 31) & 1;
	opaque(x);
	return x;
}

/* Walk the IPv6 extension headers from `nexthdr` at *off: hop-by-hop, routing
 * and destination options are (hdrlen + 1) * 8 bytes, AH (hdrlen + 2) * 4, the
 * fragment header 8 (read into *frag / *frag_id). Returns the upper-layer
 * protocol with *off after the last header, -1 for a truncated header or
 * PARSE_EXT_LIMIT when more than WEIR_IPV6_EXT_MAX come. A later fragment stops
 * the walk at its fragment header: what follows is payload.
 *
 * The length is computed without branches so that the verifier's work grows
 * with the number of headers, not with the number of their orders.
 */
static __always_inline int parse_ipv6_ext(void *data, void *data_end, __u32 *off, int nexthdr, __u8 *frag,
					  __be32 *frag_id)
{
	struct ipv6_frag *fh;
	__u32 len, ah, is_frag, hdrlen, at = *off;
	__u8 *h;

#pragma nounroll
	for (int i = 0; i < WEIR_IPV6_EXT_MAX; i++) {
		/* Before any branch on nexthdr, so that no path knows it. */
		ah = same(nexthdr, WEIR_IP_PROTO_AH);
		is_frag = same(nexthdr, WEIR_IP_PROTO_FRAGMENT);
		if (!ipv6_is_ext(nexthdr))
			break;
		if (at > PARSE_MAX_OFF)
			return -1;
		h = data + at;
		if ((void *)(h + 8) > data_end) /* every extension header has at least 8 bytes */
			return -1;
		if (nexthdr == WEIR_IP_PROTO_FRAGMENT) {
			fh = (struct ipv6_frag *)h;
			if (fh->frag_off & bpf_htons(IPV6_FRAG_OFFSET)) {
				*frag = FLOW_FRAG_LATER;
				*frag_id = fh->id;
				*off = at + sizeof(*fh);
				return fh->nexthdr;
			}
			if (fh->frag_off & bpf_htons(IPV6_FRAG_MORE)) {
				*frag = FLOW_FRAG_FIRST;
				*frag_id = fh->id;
			}
		}
		hdrlen = h[1] & (is_frag - 1); /* the fragment header's second byte is reserved */
		len = (hdrlen + 1 + ah) * (8 - 4 * ah);
		nexthdr = h[0];
		at += len;
	}
	*off = at;
	return ipv6_is_ext(nexthdr) ? PARSE_EXT_LIMIT : nexthdr;
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

/* The ports of TCP, UDP and SCTP: the first 4 bytes of each header. */
struct l4_ports {
	__be16 source;
	__be16 dest;
};

/* SCTP: only the ports of the common header are read, as for UDP. */
static __always_inline int parse_sctp_ports(struct cursor *c, struct l4_ports **ports)
{
	return CURSOR_TAKE(c, struct l4_ports, ports) ? 0 : -1;
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
	__u8 family; /* WEIR_FAMILY_INET or WEIR_FAMILY_INET6; 0 when not IP */
	__u8 proto;  /* the upper-layer protocol, after every extension header */
	__be16 sport; /* TCP, UDP, SCTP: the port; ICMP: the echo id */
	__be16 dport; /* ICMP: type << 8 | code */
	__u16 len;
	__u8 tcp_flags; /* enum weir_tcp_flag bits */
	__u8 l4_ok;     /* the ports are known: parsed here, or from the datagram's first fragment */
	__u8 frag;      /* enum flow_frag */
	__u8 pad;
	__u16 l3off; /* offsets from the start of the packet */
	__u16 l4off; /* 0 when there is no L4 header (a later fragment) */
	__be32 frag_id; /* IPv4: the 16-bit id in the first 2 bytes */
	__u8 saddr[16];
	__u8 daddr[16];
};

/* What parse_flow returns; a negative value is the drop reason, negated. */
#define PARSE_IP 0
#define PARSE_NOT_IP 1

/* The L4 ports (and TCP flags) of a packet that carries its L4 header. */
static __always_inline int parse_l4(struct cursor *c, struct flow *f)
{
	struct tcphdr *tcp;
	struct udphdr *udp;
	struct icmp_echo *icmp;
	struct l4_ports *ports;

	switch (f->proto) {
	case WEIR_IP_PROTO_TCP:
		if (parse_tcphdr(c, &tcp) < 0)
			return -WEIR_REASON_CT_INVALID;
		f->sport = tcp->source;
		f->dport = tcp->dest;
		f->tcp_flags = ((__u8 *)tcp)[13];
		break;
	case WEIR_IP_PROTO_UDP:
		if (parse_udphdr(c, &udp) < 0)
			return -WEIR_REASON_CT_INVALID;
		f->sport = udp->source;
		f->dport = udp->dest;
		break;
	case WEIR_IP_PROTO_SCTP:
		if (parse_sctp_ports(c, &ports) < 0)
			return -WEIR_REASON_CT_INVALID;
		f->sport = ports->source;
		f->dport = ports->dest;
		break;
	case WEIR_IP_PROTO_ICMP:
	case WEIR_IP_PROTO_ICMPV6:
		if (parse_icmp(c, &icmp) < 0)
			return -WEIR_REASON_CT_INVALID;
		f->sport = icmp->id;
		f->dport = bpf_htons(icmp->type << 8 | icmp->code);
		break;
	default:
		return PARSE_IP; /* no ports to read */
	}
	f->l4_ok = 1;
	return PARSE_IP;
}

/* Parse Ethernet (+ VLAN) + IP (+ options / extension headers) + L4 ports into
 * *f. Returns PARSE_IP, PARSE_NOT_IP, or -reason: -WEIR_REASON_INVALID_PACKET
 * for a truncated or malformed L2/L3 header, -WEIR_REASON_EXT_HDR_LIMIT for too
 * many extension headers, -WEIR_REASON_CT_INVALID for a truncated L4 header.
 * Protocols without ports parse with zero ports.
 */
static __always_inline int parse_flow(void *data, void *data_end, struct flow *f)
{
	struct cursor c;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct ipv6hdr *ip6;
	__u32 off;
	int proto;

	__builtin_memset(f, 0, sizeof(*f));
	cursor_init(&c, data, data_end);
	f->len = data_end - data;
	proto = parse_ethhdr(&c, &eth);
	if (proto < 0)
		return -WEIR_REASON_INVALID_PACKET;
	off = c.pos - data;
	f->l3off = off;
	if (proto == ETH_P_IP) {
		proto = parse_iphdr(&c, &ip);
		if (proto < 0)
			return -WEIR_REASON_INVALID_PACKET;
		f->family = WEIR_FAMILY_INET;
		__builtin_memcpy(f->saddr, &ip->saddr, 4);
		__builtin_memcpy(f->daddr, &ip->daddr, 4);
		if (ip->frag_off & bpf_htons(IPV4_FRAG_OFFSET | IPV4_FRAG_MORE)) {
			__builtin_memcpy(&f->frag_id, &ip->id, 2);
			f->frag = (ip->frag_off & bpf_htons(IPV4_FRAG_OFFSET)) ? FLOW_FRAG_LATER : FLOW_FRAG_FIRST;
		}
		off = c.pos - data;
	} else if (proto == ETH_P_IPV6) {
		proto = parse_ipv6hdr(&c, &ip6);
		if (proto < 0)
			return -WEIR_REASON_INVALID_PACKET;
		f->family = WEIR_FAMILY_INET6;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
		off += sizeof(*ip6);
		proto = parse_ipv6_ext(data, data_end, &off, proto, &f->frag, &f->frag_id);
		if (proto == PARSE_EXT_LIMIT)
			return -WEIR_REASON_EXT_HDR_LIMIT;
		if (proto < 0)
			return -WEIR_REASON_INVALID_PACKET;
	} else {
		return PARSE_NOT_IP;
	}
	f->proto = proto;
	if (f->frag == FLOW_FRAG_LATER)
		return PARSE_IP;
	if (off > PARSE_MAX_OFF)
		return -WEIR_REASON_INVALID_PACKET;
	f->l4off = off;
	cursor_init(&c, data + off, data_end);
	return parse_l4(&c, f);
}

/* Parse a TC packet. Makes the first WEIR_PARSE_PULL bytes linear when they
 * are not; when the headers go on past the linear part, pulls the whole packet
 * and parses once more, so a long header chain is never judged as truncated.
 */
static __always_inline int parse_skb(struct __sk_buff *skb, struct flow *f)
{
	__u32 want = skb->len < WEIR_PARSE_PULL ? skb->len : WEIR_PARSE_PULL;
	int ret = PARSE_NOT_IP;

	if (skb->data_end - skb->data < want)
		bpf_skb_pull_data(skb, want);
#pragma nounroll
	for (int i = 0; i < 2; i++) {
		ret = parse_flow((void *)(long)skb->data, (void *)(long)skb->data_end, f);
		if (ret >= 0 || skb->data_end - skb->data >= skb->len)
			break;
		bpf_skb_pull_data(skb, skb->len);
	}
	return ret;
}

/* ICMP error messages: they quote the packet that caused them. */
#define ICMP_DEST_UNREACH 3
#define ICMP_SOURCE_QUENCH 4
#define ICMP_REDIRECT 5
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4

/* Whether a parsed flow is an ICMP or ICMPv6 error message (RFC 792 / 4443),
 * which carries the offending packet's IP header and at least 8 bytes of L4.
 */
static __always_inline int flow_is_icmp_error(const struct flow *f)
{
	__u8 type = bpf_ntohs(f->dport) >> 8;

	if (!f->l4_ok || !f->l4off)
		return 0;
	if (f->family == WEIR_FAMILY_INET && f->proto == WEIR_IP_PROTO_ICMP)
		return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH || type == ICMP_REDIRECT ||
		       type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
	if (f->family == WEIR_FAMILY_INET6 && f->proto == WEIR_IP_PROTO_ICMPV6)
		return type >= ICMPV6_DEST_UNREACH && type <= ICMPV6_PARAMPROB;
	return 0;
}

/* The first 8 bytes of the quoted L4 header: all an ICMP error is sure to carry. */
struct l4_quoted {
	__be16 w0; /* TCP/UDP/SCTP source port; ICMP type and code */
	__be16 w1; /* TCP/UDP/SCTP destination port; ICMP checksum */
	__be16 w2; /* ICMP echo id */
	__be16 w3;
};

/* The tuple of the packet an ICMP error quotes, as that packet had it, into
 * *q (family, proto, addresses, ports; l4_ok set). `err` is the error's flow,
 * from parse_flow() on the same data. The quoted IPv4 header may carry options,
 * the quoted IPv6 header extension headers. Returns 0, or -1 when the quote is
 * cut short, of another family, a later fragment, or has no ports to read.
 */
static __always_inline int parse_icmp_quoted(void *data, void *data_end, const struct flow *err, struct flow *q)
{
	struct cursor c;
	struct iphdr *ip;
	struct ipv6hdr *ip6;
	struct l4_quoted *l4;
	__u32 off = err->l4off + sizeof(struct icmp_echo);
	int proto;

	__builtin_memset(q, 0, sizeof(*q));
	if (off > PARSE_MAX_OFF)
		return -1;
	cursor_init(&c, data + off, data_end);
	if (err->family == WEIR_FAMILY_INET) {
		proto = parse_iphdr(&c, &ip);
		if (proto < 0 || ip->version != 4 || (ip->frag_off & bpf_htons(IPV4_FRAG_OFFSET)))
			return -1;
		__builtin_memcpy(q->saddr, &ip->saddr, 4);
		__builtin_memcpy(q->daddr, &ip->daddr, 4);
		off = c.pos - data;
	} else {
		proto = parse_ipv6hdr(&c, &ip6);
		if (proto < 0 || ip6->version != 6)
			return -1;
		__builtin_memcpy(q->saddr, &ip6->saddr, 16);
		__builtin_memcpy(q->daddr, &ip6->daddr, 16);
		off += sizeof(*ip6);
		proto = parse_ipv6_ext(data, data_end, &off, proto, &q->frag, &q->frag_id);
		if (proto < 0 || q->frag == FLOW_FRAG_LATER)
			return -1;
	}
	if (off > PARSE_MAX_OFF)
		return -1;
	q->family = err->family;
	q->proto = proto;
	cursor_init(&c, data + off, data_end);
	if (!CURSOR_TAKE(&c, struct l4_quoted, &l4))
		return -1;
	switch (proto) {
	case WEIR_IP_PROTO_TCP:
	case WEIR_IP_PROTO_UDP:
	case WEIR_IP_PROTO_SCTP:
		q->sport = l4->w0;
		q->dport = l4->w1;
		break;
	case WEIR_IP_PROTO_ICMP:
	case WEIR_IP_PROTO_ICMPV6:
		q->sport = l4->w2;
		q->dport = l4->w0;
		break;
	default:
		return -1;
	}
	q->l4_ok = 1;
	return 0;
}
