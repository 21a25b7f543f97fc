/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Records and map keys shared with userspace. Each struct is mirrored byte for byte by
 * node-ebpf/src/record.rs (offsets are asserted on both sides); padding is explicit and
 * always zeroed, so a record's bytes are fully defined. Change both sides together and
 * bump FLOW_RECORD_VERSION.
 */
#ifndef TENURE_FLOWS_H
#define TENURE_FLOWS_H

#define FLOW_RECORD_VERSION 2

/* flow_record.direction */
#define DIRECTION_UNKNOWN 0
#define DIRECTION_OUTBOUND 1
#define DIRECTION_INBOUND 2

/* flow_record.flags */
/* Emitted by the iter/tcp snapshot: the socket is still open, counters are cumulative. */
#define FLOW_FLAG_ONGOING 1
/*
 * The socket was born before capture saw it (it predates the program, or its birth was
 * evicted from the births table): start_ns is when capture first saw it, later than the
 * real start. Later is the safe side: a flow never claims ownership time it cannot prove.
 */
#define FLOW_FLAG_START_LATE 2

/*
 * Addresses are 16 bytes, IPv6 layout; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d), the
 * same key the workload maps use, and userspace turns it back into an IPv4 address.
 */
struct flow_record {
	__u8 local_addr[16];   /*  0 */
	__u8 remote_addr[16];  /* 16 */
	__u64 start_ns;        /* 32, CLOCK_MONOTONIC (bpf_ktime_get_ns) */
	__u64 end_ns;          /* 40, close time, or snapshot time when ongoing */
	__u64 bytes_sent;      /* 48, payload acknowledged: bytes_acked less SYN and FIN */
	__u64 bytes_received;  /* 56, payload received: bytes_received less FIN */
	__u32 segs_in;         /* 64, tcp_sock.segs_in */
	__u32 segs_out;        /* 68, tcp_sock.segs_out */
	__u32 retransmits;     /* 72, tcp_sock.total_retrans */
	__u32 srtt_us;         /* 76, tcp_sock.srtt_us >> 3 */
	__u32 workload_id;     /* 80, 0 = unknown */
	__u16 local_port;      /* 84, host byte order */
	__u16 remote_port;     /* 86, host byte order */
	__u8 version;          /* 88, FLOW_RECORD_VERSION */
	__u8 direction;        /* 89, DIRECTION_* */
	__u8 flags;            /* 90, FLOW_FLAG_* */
	__u8 _pad0;            /* 91 */
	__u32 _pad1;           /* 92 */
};                             /* 96 */

_Static_assert(sizeof(struct flow_record) == 96, "flow_record layout is shared with userspace");
_Static_assert(__builtin_offsetof(struct flow_record, workload_id) == 80, "flow_record layout");
_Static_assert(__builtin_offsetof(struct flow_record, version) == 88, "flow_record layout");

/* Key of the workload_by_endpoint map: (local address, local port). */
struct endpoint_key {
	__u8 addr[16];         /*  0, IPv6 layout, IPv4 mapped */
	__u16 port;            /* 16, host byte order */
	__u16 _pad;            /* 18, zero */
};                             /* 20 */

_Static_assert(sizeof(struct endpoint_key) == 20, "endpoint_key layout is shared with userspace");

/* Indexes of the per-CPU `stats` array; userspace sums them across CPUs. */
#define STAT_RINGBUF_FULL 0      /* a closed flow was lost: the ring buffer was full */
#define STAT_UNTRACKED_CLOSE 1   /* a socket closed that capture never saw open */
#define STAT_BIRTH_INSERT_FAILED 2
#define STAT_COUNT 3

/*
 * Indexes of the `workload_maps_used` array: nonzero while the map has entries. Userspace
 * sets it before it inserts and clears it after it has emptied the map, so 0 always
 * means empty and a close may skip the lookup.
 */
#define USED_BY_IP 0
#define USED_BY_ENDPOINT 1
#define USED_COUNT 2

#endif
