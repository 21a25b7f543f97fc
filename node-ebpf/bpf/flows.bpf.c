// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
/*
 * tenure per-host flow capture.
 *
 * One record per TCP socket lifetime: the tracepoint sock/inet_sock_set_state notes each
 * socket's birth (CLOSE->SYN_SENT is an active open, LISTEN->SYN_RECV the accepted child of
 * a passive open) in an LRU map keyed by the socket's address, and at ->CLOSE reads the
 * socket's counters, emits one flow_record through the `events` ring buffer and forgets
 * the socket. The iter/tcp program `snapshot_tcp` walks the live sockets of the caller's
 * network namespace and writes one ongoing record per socket, so that long-lived flows
 * are reported every heartbeat and sockets born before capture started get adopted.
 *
 * fentry/kprobes are unavailable on the target kernels, hence the tracepoint; its context
 * is read field by field, and the address arrays are copied with bpf_probe_read_kernel
 * because a plain memcpy out of the context is rejected by the verifier.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "flows.h"

/* GPL-compatible so the program may call bpf_probe_read_kernel and bpf_seq_write. */
char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Per-socket birth, internal to this program. */
struct birth {
	__u64 start_ns;
	__u8 direction;
	__u8 flags;
	__u8 _pad[6];
};

/*
 * Sockets whose close is still to come. LRU so that a missed close (the program was
 * replaced mid-flight) cannot fill the map; an evicted socket is still reported at close,
 * flagged FLOW_FLAG_START_LATE.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct birth);
} births SEC(".maps");

/* Local IP -> workload id, filled by userspace (Capture::set_workloads). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u8[16]);
	__type(value, __u32);
} workload_by_ip SEC(".maps");

/* (local IP, local port) -> workload id; wins over workload_by_ip when present. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct endpoint_key);
	__type(value, __u32);
} workload_by_endpoint SEC(".maps");

/*
 * Local ports seen listening by the last snapshot. Only used to guess the direction of
 * sockets that capture did not see being born.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u16);
	__type(value, __u8);
} listen_ports SEC(".maps");

/*
 * Closed flows. 2 MiB holds about 20 000 records between two userspace reads. Waking the
 * reader for every record costs a context switch per closed socket, so records are
 * submitted quietly and the reader is woken only once WAKEUP_BYTES are waiting; the
 * loader also drains on a short timer, which bounds how long a record can wait.
 */
#define WAKEUP_BYTES (64 * (sizeof(struct flow_record) + 8))

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 21);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&stats, &index);

	if (value)
		*value += 1;
}

static __always_inline __u32 workload_of(const __u8 addr[16], __u16 port)
{
	struct endpoint_key key = {};
	__u32 *id;

	__builtin_memcpy(key.addr, addr, 16);
	key.port = port;
	id = bpf_map_lookup_elem(&workload_by_endpoint, &key);
	if (id)
		return *id;
	id = bpf_map_lookup_elem(&workload_by_ip, key.addr);
	if (id)
		return *id;
	return 0;
}

static __always_inline void set_v4_mapped(__u8 dst[16], __be32 addr)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &addr, 4);
}

/* Counters common to close records and snapshots. */
static __always_inline void fill_counters(struct flow_record *r, const struct tcp_sock *tp)
{
	r->bytes_sent = BPF_CORE_READ(tp, bytes_acked);
	r->bytes_received = BPF_CORE_READ(tp, bytes_received);
	r->segs_in = BPF_CORE_READ(tp, segs_in);
	r->segs_out = BPF_CORE_READ(tp, segs_out);
	r->retransmits = BPF_CORE_READ(tp, total_retrans);
	/* The kernel keeps the smoothed RTT in units of 1/8 us. */
	r->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
}

static __always_inline __u8 guess_direction(__u16 local_port)
{
	if (bpf_map_lookup_elem(&listen_ports, &local_port))
		return DIRECTION_INBOUND;
	return DIRECTION_UNKNOWN;
}

SEC("tracepoint/sock/inet_sock_set_state")
int inet_sock_set_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 sk;
	int oldstate, newstate;
	struct birth b = {};
	struct birth *known;
	struct flow_record *r;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	oldstate = ctx->oldstate;
	newstate = ctx->newstate;
	sk = (__u64)ctx->skaddr;

	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT) {
		b.start_ns = now;
		b.direction = DIRECTION_OUTBOUND;
		if (bpf_map_update_elem(&births, &sk, &b, BPF_ANY))
			count(STAT_BIRTH_INSERT_FAILED);
		return 0;
	}
	if (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV) {
		/* The accepted child is cloned from the listener, hence "LISTEN". */
		b.start_ns = now;
		b.direction = DIRECTION_INBOUND;
		if (bpf_map_update_elem(&births, &sk, &b, BPF_ANY))
			count(STAT_BIRTH_INSERT_FAILED);
		return 0;
	}
	if (newstate != TCP_CLOSE)
		return 0;
	/* A listener or a never-connected socket closing is not a flow. */
	if (oldstate == TCP_LISTEN || oldstate == TCP_CLOSE)
		return 0;

	known = bpf_map_lookup_elem(&births, &sk);
	r = bpf_ringbuf_reserve(&events, sizeof(*r), 0);
	if (!r) {
		count(STAT_RINGBUF_FULL);
		bpf_map_delete_elem(&births, &sk);
		return 0;
	}
	__builtin_memset(r, 0, sizeof(*r));
	/* For AF_INET the tracepoint already stores the addresses IPv4-mapped here. */
	bpf_probe_read_kernel(r->local_addr, 16, ctx->saddr_v6);
	bpf_probe_read_kernel(r->remote_addr, 16, ctx->daddr_v6);
	r->local_port = ctx->sport;
	r->remote_port = ctx->dport;
	r->end_ns = now;
	if (known) {
		r->start_ns = known->start_ns;
		r->direction = known->direction;
		r->flags = known->flags;
	} else {
		count(STAT_UNTRACKED_CLOSE);
		r->start_ns = now;
		r->direction = guess_direction(r->local_port);
		r->flags = FLOW_FLAG_START_LATE;
	}
	r->version = FLOW_RECORD_VERSION;
	fill_counters(r, (const struct tcp_sock *)sk);
	r->workload_id = workload_of(r->local_addr, r->local_port);
	bpf_ringbuf_submit(r, bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES
				      ? BPF_RB_FORCE_WAKEUP
				      : BPF_RB_NO_WAKEUP);
	bpf_map_delete_elem(&births, &sk);
	return 0;
}

SEC("iter/tcp")
int snapshot_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct seq_file *seq = ctx->meta->seq;
	struct flow_record r = {};
	struct birth fresh = {};
	struct birth *known;
	struct tcp_sock *tp;
	__u64 now, sk;
	__u16 family;
	__u8 state;
	__u8 one = 1;

	if (!skc)
		return 0;
	state = BPF_CORE_READ(skc, skc_state);
	family = BPF_CORE_READ(skc, skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	r.local_port = BPF_CORE_READ(skc, skc_num);
	if (state == TCP_LISTEN) {
		/* The iterator walks listeners before connections, so this is complete in time. */
		bpf_map_update_elem(&listen_ports, &r.local_port, &one, BPF_ANY);
		return 0;
	}
	if (state == TCP_CLOSE)
		return 0;
	/* NULL for request and time-wait minisocks: they carry no counters. */
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;

	now = bpf_ktime_get_ns();
	sk = (__u64)skc;
	known = bpf_map_lookup_elem(&births, &sk);
	if (!known) {
		/* Born before capture started: adopt it, so its close is reported in full. */
		fresh.start_ns = now;
		fresh.direction = guess_direction(r.local_port);
		if (fresh.direction == DIRECTION_UNKNOWN)
			fresh.direction = DIRECTION_OUTBOUND;
		fresh.flags = FLOW_FLAG_START_LATE;
		if (bpf_map_update_elem(&births, &sk, &fresh, BPF_NOEXIST))
			count(STAT_BIRTH_INSERT_FAILED);
		known = &fresh;
	}

	if (family == AF_INET) {
		set_v4_mapped(r.local_addr, BPF_CORE_READ(skc, skc_rcv_saddr));
		set_v4_mapped(r.remote_addr, BPF_CORE_READ(skc, skc_daddr));
	} else {
		BPF_CORE_READ_INTO(&r.local_addr, skc, skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&r.remote_addr, skc, skc_v6_daddr.in6_u.u6_addr8);
	}
	r.remote_port = bpf_ntohs(BPF_CORE_READ(skc, skc_dport));
	r.start_ns = known->start_ns;
	r.end_ns = now;
	r.direction = known->direction;
	r.flags = known->flags | FLOW_FLAG_ONGOING;
	r.version = FLOW_RECORD_VERSION;
	fill_counters(&r, tp);
	r.workload_id = workload_of(r.local_addr, r.local_port);
	/* On overflow the iterator core flushes and runs us again for this socket. */
	bpf_seq_write(seq, &r, sizeof(r));
	return 0;
}
