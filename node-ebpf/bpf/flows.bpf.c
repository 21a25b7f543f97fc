// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
/*
 * tenure per-host flow capture.
 *
 * One record per TCP socket lifetime: the tracepoint inet_sock_set_state notes each
 * socket's birth (CLOSE->SYN_SENT is an active open, LISTEN->SYN_RECV the accepted child of
 * a passive open) in the `births` table, keyed by the socket's address, and at ->CLOSE
 * reads the socket's counters, emits one flow_record through the `events` ring buffer and
 * forgets the socket. The iter/tcp program `snapshot_tcp` walks the live sockets of the
 * caller's network namespace and writes one ongoing record per socket, so that long-lived
 * flows are reported every heartbeat and sockets born before capture started get adopted.
 *
 * Cost. The program runs at every state change of every TCP socket of the host (about 11
 * per loopback connection, two sockets), so what it does per socket is budgeted: the
 * overhead bench (benches/overhead.rs) targets <= 5% of a connect/close loop. Program time
 * per connection, by kernel.bpf_stats_enabled (which itself adds ~40 ns per run), was:
 * ~3.8 us with an LRU hash map for births, ~12 socket fields read by bpf_probe_read_kernel
 * and a forced reader wakeup for every record once the reader lagged; ~2.2 us with one
 * wakeup per eighth of the ring; ~1.9 us with fields read by plain BTF loads; ~1.25 us
 * with births in the lock-free table below and no lookup in an empty workload map. Of
 * that, ~0.45 us is the floor of running at all (an empty program), ~0.35 us the ring
 * buffer. Tried and dropped: socket-local storage for births (its allocation and memory
 * cgroup charge at every birth cost more than the LRU map), BPF_F_NO_COMMON_LRU (no
 * measurable change), a 512 KiB ring buffer (no measurable change).
 *
 * fentry/kprobes are unavailable on the target kernels, hence the tracepoint. It is
 * attached as a BTF tracepoint (tp_btf: no trampoline needed): the program gets the
 * tracepoint's arguments, a typed socket pointer and both states, rather than the record
 * the kernel would first build for a classic tracepoint, so a state change the program
 * ignores costs almost nothing, and only a close reads the socket's addresses and ports.
 * The births table's compare-and-swap needs BPF atomics (build.sh compiles for -mcpu=v3),
 * so Linux 5.12 or later.
 */
#include <stdbool.h>
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
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
 * Births of sockets whose close is still to come: a set-associative table, BIRTH_WAYS
 * slots in each of BIRTH_BUCKETS buckets, the bucket chosen by a hash of the socket's
 * address. It replaces an LRU hash map, whose locks (bucket lock, LRU list locks, with
 * interrupts off) around every birth and every close cost ~0.3-0.6 us per connection;
 * here a birth or a close is a few loads and two atomic instructions.
 *
 * The promises are the LRU map's: the table is bounded; a birth that finds its bucket
 * full evicts the oldest birth there, so a missed close (or any number of them) cannot
 * fill it; a socket whose birth was evicted, or never recorded, is still reported at
 * close, flagged FLOW_FLAG_START_LATE, never with another socket's start time; a close
 * removes its socket's birth. One difference: a bucket can fill before the table does.
 * With n sockets open at once in B buckets, the share of births that evict a live one is
 * about P(Poisson(n / B) >= 4): with the default 32768 buckets (3 MiB), ~0.03% at 10 000
 * open sockets, ~1.4% at 30 000, ~14% at 65 536 (where the LRU map began to evict);
 * hosts that hold that many raise births_max.
 *
 * A slot's owner is the socket's address, 0 when free. Only the program run that has
 * claimed a slot, by swapping its owner to an address tagged SLOT_BUSY with one
 * compare-and-swap, touches the slot's birth; it ends the claim with an atomic exchange,
 * which publishes the birth together with the new owner. So a birth read under a claim of
 * owner S was written by the run that published S, for socket S, on every CPU. A claim
 * that loses a race is not retried: the birth is not recorded (STAT_BIRTH_INSERT_FAILED)
 * or the close finds none and is flagged START_LATE, the LRU map's behaviour under
 * eviction. Nothing waits on a claim, so nothing can spin or deadlock.
 */
#define BIRTH_WAYS 4
/*
 * log2 of the number of buckets. The loader sets it with the map's size (its births_max
 * option); the default is 2^15 buckets of 4 slots, 131072 births.
 */
const volatile __u32 birth_bucket_bits = 15;
/* Socket addresses are at least 8-byte aligned, so the low bit is free for the tag. */
#define SLOT_BUSY 1ULL

struct birth_slot {
	__u64 owner;
	struct birth birth;
};

struct birth_bucket {
	struct birth_slot slot[BIRTH_WAYS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << 15);
	__type(key, __u32);
	__type(value, struct birth_bucket);
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
 * Whether each workload map has entries (USED_* in flows.h). Most hosts leave
 * workload_by_endpoint empty, and a lookup in an empty hash map still hashes the key and
 * reads a bucket, likely a cache miss: a close skips it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, USED_COUNT);
	__type(key, __u32);
	__type(value, __u32);
} workload_maps_used SEC(".maps");

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
 * reader costs an interrupt and a context switch, so records are submitted quietly and
 * the reader is woken once per WAKEUP_BYTES of records waiting: by the record whose
 * reservation takes the waiting bytes past a multiple of WAKEUP_BYTES, not by every
 * record submitted while the threshold is exceeded (that woke the reader for nearly every
 * record whenever it lagged). Wakeups only shorten the wait: the loader also drains on a
 * short timer, which bounds how long a record can wait, so a crossing missed because two
 * CPUs reserved at once costs latency, never a record.
 */
#define RINGBUF_BYTES (1 << 21)
#define RECORD_BYTES (sizeof(struct flow_record) + 8) /* with the ring's record header */
#define WAKEUP_BYTES (RINGBUF_BYTES / 8)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RINGBUF_BYTES);
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

static __always_inline bool workload_map_used(__u32 map)
{
	__u32 *used = bpf_map_lookup_elem(&workload_maps_used, &map);

	return used && *used;
}

static __always_inline __u32 workload_of(const __u8 addr[16], __u16 port)
{
	struct endpoint_key key = {};
	__u32 *id;

	__builtin_memcpy(key.addr, addr, 16);
	key.port = port;
	if (workload_map_used(USED_BY_ENDPOINT)) {
		id = bpf_map_lookup_elem(&workload_by_endpoint, &key);
		if (id)
			return *id;
	}
	if (workload_map_used(USED_BY_IP)) {
		id = bpf_map_lookup_elem(&workload_by_ip, key.addr);
		if (id)
			return *id;
	}
	return 0;
}

static __always_inline void set_v4_mapped(__u8 dst[16], __be32 addr)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(dst + 12, &addr, 4);
}

/* The socket's flags (SOCK_* bits), in sock_common on recent kernels, in sock before. */
static __always_inline unsigned long sock_flags(const struct tcp_sock *tp)
{
	const struct sock_common *skc = (const struct sock_common *)tp;

	if (bpf_core_field_exists(skc->skc_flags))
		return skc->skc_flags;
	return ((const struct sock___flags_in_sock *)tp)->sk_flags;
}

/*
 * Counters common to close records and snapshots. Plain loads, not BPF_CORE_READ: the
 * socket is a BTF-typed pointer (tp_btf argument, bpf_skc_to_tcp_sock), so the verifier
 * lets the program load its fields directly (a fault-safe load, offsets relocated by
 * CO-RE), where BPF_CORE_READ would call bpf_probe_read_kernel once per field.
 *
 * Payload bytes. The kernel's bytes_acked and bytes_received (RFC 4898) count sequence
 * numbers, and a SYN and a FIN take one each; what the kernel counted of them is
 * subtracted, from the socket's own state:
 * - bytes_acked counts from the first value of snd_una: the ISN after an active open,
 *   whose SYN therefore counts as soon as anything is acknowledged (an acknowledgement
 *   covers the SYN first); ISN + 1 for the child of a passive open, created with its
 *   SYN-ACK acknowledged, which never counts it.
 * - Our FIN has been queued exactly in FIN_WAIT1, FIN_WAIT2, CLOSING and LAST_ACK (the
 *   state before CLOSE, or the live state for a snapshot; TIME_WAIT sockets are
 *   minisocks, never read), and it takes the last sequence number of write_seq: it has
 *   been acknowledged, and counted, exactly when snd_una has reached write_seq.
 * - bytes_received counts from rcv_nxt after the peer's SYN, so that SYN never counts;
 *   the peer's FIN counts once rcv_nxt passes it, and tcp_fin(), which runs right then,
 *   is the one place that marks a TCP socket SOCK_DONE.
 * So the payload is exact each way for every kind of close (FINs crossing, RST, timeout)
 * whenever the program knows whether the socket opened actively: always when it saw the
 * birth; for a socket adopted or closed unseen (FLOW_FLAG_START_LATE) it goes by the
 * direction guessed from the listening ports.
 */
static __always_inline void fill_counters(struct flow_record *r, const struct tcp_sock *tp,
					  int state)
{
	__u64 acked = tp->bytes_acked, received = tp->bytes_received;

	if (r->direction == DIRECTION_OUTBOUND && acked)
		acked--;
	if ((state == TCP_FIN_WAIT1 || state == TCP_FIN_WAIT2 || state == TCP_CLOSING ||
	     state == TCP_LAST_ACK) &&
	    tp->snd_una == tp->write_seq && acked)
		acked--;
	if ((sock_flags(tp) >> SOCK_DONE) & 1 && received)
		received--;
	r->bytes_sent = acked;
	r->bytes_received = received;
	r->segs_in = tp->segs_in;
	r->segs_out = tp->segs_out;
	r->retransmits = tp->total_retrans;
	/* The kernel keeps the smoothed RTT in units of 1/8 us. */
	r->srtt_us = tp->srtt_us >> 3;
}

static __always_inline __u8 guess_direction(__u16 local_port)
{
	if (bpf_map_lookup_elem(&listen_ports, &local_port))
		return DIRECTION_INBOUND;
	return DIRECTION_UNKNOWN;
}

static __always_inline struct birth_bucket *bucket_of(__u64 sk)
{
	/* Fibonacci hashing: the top bits of the product mix all bits of the address. */
	__u32 index = (sk * 0x9E3779B97F4A7C15ULL) >> (64 - birth_bucket_bits);

	return bpf_map_lookup_elem(&births, &index);
}

/*
 * Records the birth of socket `sk`, in the slot it already owns (a stale birth, when its
 * close was missed), else a free slot, else in place of the bucket's oldest birth.
 */
static __always_inline void birth_put(__u64 sk, const struct birth *birth)
{
	struct birth_bucket *bucket = bucket_of(sk);
	struct birth_slot *victim = NULL, *slot;
	__u64 seen = 0, owner, oldest = ~0ULL;
	int i;

	if (!bucket || !sk) {
		count(STAT_BIRTH_INSERT_FAILED);
		return;
	}
#pragma unroll
	for (i = 0; i < BIRTH_WAYS; i++) {
		slot = &bucket->slot[i];
		owner = *(volatile __u64 *)&slot->owner;
		if ((owner & ~SLOT_BUSY) == sk) {
			/* Its own slot, or none: never a second slot for one socket. */
			victim = owner & SLOT_BUSY ? NULL : slot;
			seen = owner;
			break;
		}
		if (owner & SLOT_BUSY)
			continue;
		if (owner == 0) {
			if (oldest) {
				victim = slot;
				seen = 0;
				oldest = 0;
			}
		} else if (slot->birth.start_ns < oldest) {
			/* A hint only (read unclaimed): the claim below checks the owner. */
			victim = slot;
			seen = owner;
			oldest = slot->birth.start_ns;
		}
	}
	if (!victim ||
	    __sync_val_compare_and_swap(&victim->owner, seen, sk | SLOT_BUSY) != seen) {
		count(STAT_BIRTH_INSERT_FAILED);
		return;
	}
	victim->birth = *birth;
	__sync_lock_test_and_set(&victim->owner, sk);
}

/*
 * Copies the birth of socket `sk` into `out`, and frees its slot when `remove`. False when
 * the table holds no birth for `sk` (never recorded, or evicted).
 */
static __always_inline bool birth_get(__u64 sk, struct birth *out, bool remove)
{
	struct birth_bucket *bucket = bucket_of(sk);
	struct birth_slot *slot;
	int i;

	/* (A zero address must not match a free slot.) */
	if (!bucket || !sk)
		return false;
#pragma unroll
	for (i = 0; i < BIRTH_WAYS; i++) {
		slot = &bucket->slot[i];
		if (*(volatile __u64 *)&slot->owner != sk)
			continue;
		if (__sync_val_compare_and_swap(&slot->owner, sk, sk | SLOT_BUSY) != sk)
			return false;
		*out = slot->birth;
		__sync_lock_test_and_set(&slot->owner, remove ? 0 : sk);
		return true;
	}
	return false;
}

static __always_inline void copy_v6(__u8 dst[16], const struct in6_addr *src)
{
	__u32 *words = (__u32 *)dst;

	words[0] = src->in6_u.u6_addr32[0];
	words[1] = src->in6_u.u6_addr32[1];
	words[2] = src->in6_u.u6_addr32[2];
	words[3] = src->in6_u.u6_addr32[3];
}

/*
 * The socket's addresses, IPv4 ones IPv4-mapped, and ports, into a record, by plain loads
 * as in fill_counters. A tcp_sock is its own sock_common and inet_sock (both sit at its
 * start), so the casts only pick the CO-RE relocation; the verifier checks every load
 * against the kernel's tcp_sock.
 */
static __always_inline void fill_endpoints(struct flow_record *r, const struct tcp_sock *tp)
{
	const struct sock_common *skc = (const struct sock_common *)tp;
	const struct inet_sock *inet = (const struct inet_sock *)tp;

	if (skc->skc_family == AF_INET) {
		set_v4_mapped(r->local_addr, skc->skc_rcv_saddr);
		set_v4_mapped(r->remote_addr, skc->skc_daddr);
	} else {
		copy_v6(r->local_addr, &skc->skc_v6_rcv_saddr);
		copy_v6(r->remote_addr, &skc->skc_v6_daddr);
	}
	/* Not skc_num: a closing socket has already given its port back (skc_num is 0). */
	r->local_port = bpf_ntohs(inet->inet_sport);
	r->remote_port = bpf_ntohs(skc->skc_dport);
}

/* TP_PROTO(const struct sock *sk, const int oldstate, const int newstate) */
SEC("tp_btf/inet_sock_set_state")
int inet_sock_set_state(__u64 *ctx)
{
	struct sock *sk = (struct sock *)ctx[0];
	int oldstate = (int)ctx[1];
	int newstate = (int)ctx[2];
	__u64 key = 0, now, waiting;
	struct birth fresh = {};
	struct flow_record *r;
	struct tcp_sock *tp;
	__u8 direction;

	/* Only births and closes matter; most state changes leave here, reading nothing. */
	if (oldstate == TCP_CLOSE && newstate == TCP_SYN_SENT)
		direction = DIRECTION_OUTBOUND;
	else if (oldstate == TCP_LISTEN && newstate == TCP_SYN_RECV)
		/* The accepted child is cloned from the listener, hence "LISTEN". */
		direction = DIRECTION_INBOUND;
	else if (newstate == TCP_CLOSE && oldstate != TCP_LISTEN && oldstate != TCP_CLOSE)
		/* (A listener or a never-connected socket closing is not a flow.) */
		direction = DIRECTION_UNKNOWN;
	else
		return 0;
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	now = bpf_ktime_get_ns();
	/*
	 * The socket's address as a number, to hash: the verifier forbids arithmetic on the
	 * typed pointer itself, so the argument is copied out as plain bytes. (It cannot
	 * fail; if it did, the key would stay 0, which matches no birth.)
	 */
	bpf_probe_read_kernel(&key, sizeof(key), &ctx[0]);

	if (direction != DIRECTION_UNKNOWN) {
		fresh.start_ns = now;
		fresh.direction = direction;
		birth_put(key, &fresh);
		return 0;
	}

	/* NULL only for what is not a full TCP stream socket, which never had a birth. */
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	r = bpf_ringbuf_reserve(&events, sizeof(*r), 0);
	if (!r) {
		count(STAT_RINGBUF_FULL);
		birth_get(key, &fresh, true);
		return 0;
	}
	__builtin_memset(r, 0, sizeof(*r));
	fill_endpoints(r, tp);
	r->end_ns = now;
	if (birth_get(key, &fresh, true)) {
		r->start_ns = fresh.start_ns;
		r->direction = fresh.direction;
		r->flags = fresh.flags;
	} else {
		count(STAT_UNTRACKED_CLOSE);
		r->start_ns = now;
		r->direction = guess_direction(r->local_port);
		r->flags = FLOW_FLAG_START_LATE;
	}
	r->version = FLOW_RECORD_VERSION;
	fill_counters(r, tp, oldstate);
	r->workload_id = workload_of(r->local_addr, r->local_port);
	waiting = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(r, waiting >= RECORD_BYTES &&
				      waiting / WAKEUP_BYTES != (waiting - RECORD_BYTES) / WAKEUP_BYTES
			      ? BPF_RB_FORCE_WAKEUP
			      : BPF_RB_NO_WAKEUP);
	return 0;
}

SEC("iter/tcp")
int snapshot_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct seq_file *seq = ctx->meta->seq;
	struct flow_record r = {};
	struct birth fresh = {};
	struct tcp_sock *tp;
	__u64 now, key = 0;
	__u16 family;
	__u8 state;
	__u8 one = 1;

	if (!skc)
		return 0;
	state = skc->skc_state;
	family = skc->skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	r.local_port = skc->skc_num;
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
	bpf_probe_read_kernel(&key, sizeof(key), &ctx->sk_common);
	if (!birth_get(key, &fresh, false)) {
		/* Born before capture started: adopt it, so its close is reported in full. */
		fresh.start_ns = now;
		fresh.direction = guess_direction(r.local_port);
		if (fresh.direction == DIRECTION_UNKNOWN)
			fresh.direction = DIRECTION_OUTBOUND;
		fresh.flags = FLOW_FLAG_START_LATE;
		/* The socket is locked while the iterator runs us: its close cannot interleave. */
		birth_put(key, &fresh);
	}

	fill_endpoints(&r, tp);
	r.start_ns = fresh.start_ns;
	r.end_ns = now;
	r.direction = fresh.direction;
	r.flags = fresh.flags | FLOW_FLAG_ONGOING;
	r.version = FLOW_RECORD_VERSION;
	fill_counters(&r, tp, state);
	r.workload_id = workload_of(r.local_addr, r.local_port);
	/* On overflow the iterator core flushes and runs us again for this socket. */
	bpf_seq_write(seq, &r, sizeof(r));
	return 0;
}
