// SPDX-License-Identifier: GPL-2.0
//
// Socket-layer redirect of MCP traffic to the credless proxy.
//
// connect4/connect6 (cgroup sock_addr hooks) run inside connect() before the kernel picks a
// route: a connect to an intercepted target is rewritten to the agent's loopback listener,
// so the workload's packets never leave the host carrying (or lacking) credentials. What the
// workload asked for is kept by socket cookie. The decision uses the *current task's*
// cgroup (bpf_get_current_ancestor_cgroup_id), not the socket's: a socket created in one
// cgroup and handed to a process in another must follow the process that connects.
//
// IPv4 destinations reached through an AF_INET6 socket arrive as v4-mapped addresses
// (::ffff:a.b.c.d) at connect6, not connect4; they are matched against the IPv4 targets and
// sent to ::ffff:<listen_ip4>, which the IPv4 listener accepts on a dual-stack socket. A
// connect to the unspecified address (0.0.0.0, ::, ::ffff:0.0.0.0) is looked up as the
// local address Linux connects it to (reached4).
//
// sockops sees the same socket once its local port exists (TCP_CONNECT_CB) and maps
// (network namespace, local address and port, listener address and port) to the cookie: on
// accept() the proxy only knows the peer's address and which of its listeners accepted, and
// this map turns them back into the cookie, the original destination, and the process that
// connected. Both records are deleted when the client's socket reaches TCP_CLOSE (STATE_CB,
// asked for at TCP_CONNECT_CB): a connect refused while no agent listens, one made before a
// pod's listener exists, or one cut by a crash would otherwise leave a record behind (the
// maps are pinned across restarts), and a process that later bound the same local port and
// dialled the listener directly would be served as the process that made it.
//
// The rewritten destination (127.0.0.1 or ::1) is resolved in the *workload's* network
// namespace. For processes on the node's network that is the agent's own listener; for a
// pod (or container) with a network namespace of its own, the agent keeps a listener inside
// that namespace (agent/inject/netns.py). Until it does, the connect is refused: an
// intercepted destination is never reached unredirected.
//
// Managed cgroups (inject.managed_cgroups): the task's cgroup and each ancestor (levels 0 to
// MAX_CGROUP_DEPTH - 1 from the root, bpf_get_current_ancestor_cgroup_id) is looked up in
// `managed_cgroups`; any MANAGED one makes the task managed, so a cgroup made under a
// managed one is managed from its first instant. An entry still PENDING (a cgroup just
// made at a depth a pattern names, not yet decided by the agent: bpf/cgroup_watch.c) with
// no MANAGED ancestor refuses the connect (EPERM): fail closed, never out uncredentialed.
//
// The agent's own connects (to MCP and authorization servers) are exempt by its cgroup, not
// its tgid: a tgid pinned in the config outlives the agent, and while none runs a process
// given the same pid would go out unredirected. Nothing but root can move a process into the
// agent's cgroup, and cgroup ids are not reused. A missing config entry or enabled == 0
// leaves every connect untouched.

#include <uapi/linux/bpf.h>
#include "process_events.h"
#include "redirect.h"
#include "cgroup_watch.h"

// The two address families, as the socket ABI fixes them, rather than <linux/socket.h>:
// that header drags in most of the kernel's networking headers, which roughly doubled BCC's
// compile of this file at every agent start (1.7 s against 0.9 s of CPU; the bytecode is
// the same, compared with BPF.dump_func).
#define AF_INET 2
#define AF_INET6 10

#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/credless"
#endif
#ifndef MAX_TARGETS
#define MAX_TARGETS 4096
#endif
#ifndef MAX_CONNECTIONS
#define MAX_CONNECTIONS 65536
#endif
#ifndef MAX_CGROUP_DEPTH
#define MAX_CGROUP_DEPTH 16
#endif

BPF_TABLE_PINNED("hash", struct redirect_target, u32, redirect_targets, MAX_TARGETS,
                 PIN_DIR "/redirect_targets");
BPF_TABLE_PINNED("array", int, struct redirect_config, redirect_config, 1,
                 PIN_DIR "/redirect_config");
// managed_cgroups: declared in cgroup_watch.h (bpf/cgroup_watch.c writes it too)
BPF_TABLE_PINNED("lru_hash", u64, struct redirect_info, redirected, MAX_CONNECTIONS,
                 PIN_DIR "/redirected");
BPF_TABLE_PINNED("lru_hash", struct local_endpoint, u64, local_to_cookie, MAX_CONNECTIONS,
                 PIN_DIR "/local_to_cookie");
// Maintained by bpf/process_events.c: declared there when both are one object (it comes
// first), else shared through its pin.
#ifndef PROCESS_IMAGES_DECLARED
BPF_TABLE_PINNED("lru_hash", u32, struct process_image, process_images, 65536,
                 PIN_DIR "/process_images");
#endif
// Sender changes, for the proxy's per-request "is this still the process that connected
// writing?" check (agent/inject/proxy.py): slot cookie % SENDER_CHANGE_SLOTS is incremented
// each time a connection's `sender` gains a bit, and mapped into the agent's memory, so a
// request costs one load unless its slot moved (then the proxy reads the record itself).
#ifndef SENDER_CHANGE_SLOTS
#define SENDER_CHANGE_SLOTS 65536
#endif
BPF_F_TABLE("array", u32, u64, sender_changes, SENDER_CHANGE_SLOTS, BPF_F_MMAPABLE);
// 0: redirected v4, 1: redirected v6, 2: skipped cgroup, 3: refused (cgroup still PENDING)
BPF_ARRAY(redirect_counts, u64, 4);
// take()'s answer for a connect to refuse (no port is this: ports are 16 bits)
#define REFUSE 0xffffffff

static __always_inline void count(int i)
{
    u64 *c = redirect_counts.lookup(&i);
    if (c)
        __sync_fetch_and_add(c, 1);
}

// 1: managed; 0: not; -1: not yet known (a PENDING cgroup and no MANAGED ancestor)
static __always_inline int task_is_managed(struct redirect_config *cfg)
{
    if (bpf_get_current_cgroup_id() == cfg->excluded_cgroup)
        return 0;
    if (cfg->all_cgroups)
        return 1;
    int pending = 0;
#pragma unroll
    for (int level = 0; level < MAX_CGROUP_DEPTH; level++) {
        u64 id = bpf_get_current_ancestor_cgroup_id(level);
        if (!id)
            break;
        u32 *state = managed_cgroups.lookup(&id);
        if (!state)
            continue;
        if ((*state & 0xff) != CREDLESS_CG_PENDING)
            return 1;
        pending = 1;
    }
    return pending ? -1 : 0;
}

// Common part: should this connect go to the proxy? Records it if so, and returns 0 (no),
// 1 (yes, to the plain listener), the target's own listener port (network order), or
// REFUSE (the task's cgroup is not decided yet).
static __always_inline u32 take(struct bpf_sock_addr *ctx, struct redirect_target *key,
                                u32 family, struct redirect_config **out)
{
    int zero = 0;
    struct redirect_config *cfg = redirect_config.lookup(&zero);
    if (!cfg || !cfg->enabled)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u32 *listen_port = redirect_targets.lookup(key);
    if (!listen_port)
        return 0;
    int managed = task_is_managed(cfg);
    if (!managed) {
        count(2);
        return 0;
    }
    if (!cfg->agent_up && cfg->fail_open)
        return 0;
    if (managed < 0) {
        count(3);
        return REFUSE;
    }

    struct redirect_info info = {};
    __builtin_memcpy(info.orig_addr, key->addr, sizeof(info.orig_addr));
    info.orig_port = key->port;
    info.family = family;
    info.tgid = tgid;
    info.pid = (u32)pid_tgid;
    info.uid = (u32)bpf_get_current_uid_gid();
    info.cgroup_id = bpf_get_current_cgroup_id();
    struct process_image *img = process_images.lookup(&tgid);
    if (img) {
        info.start_ns = img->start_ns;
        info.exec_ns = img->exec_ns;
    }
    info.netns = bpf_get_netns_cookie(ctx);
    u64 cookie = bpf_get_socket_cookie(ctx);
    redirected.update(&cookie, &info);
    *out = cfg;
    // the target's own listener (TLS targets have one), else the plain one
    return *listen_port ? *listen_port : 1;
}

// The unspecified address is not refused by connect(): Linux connects it to a local address.
// tcp_v4_connect's route lookup (ip_route_output_key_hash_rcu) turns daddr 0.0.0.0 into the
// socket's bound source address, else 127.0.0.1; tcp_v6_connect turns :: into ::1, or into
// ::ffff:127.0.0.1 on a socket bound to a v4-mapped address (then tcp_v4_connect, as for
// ::ffff:0.0.0.0). Those rewrites come after these hooks (which run in the protocol's
// pre_connect), so a workload dialling 0.0.0.0:port, [::]:port or [::ffff:0.0.0.0]:port would
// reach a server configured as 127.0.0.1 or ::1 (or the address it bound) past the proxy:
// the hooks look the destination up as the address the kernel will reach, and record that.
#define LOOPBACK4 0x7f000001

static __always_inline int is_mapped(u32 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

// The IPv4 address a connect to dst reaches from a socket bound to src (0: unbound).
static __always_inline u32 reached4(u32 dst, u32 src)
{
    if (dst)
        return dst;
    return src ? src : bpf_htonl(LOOPBACK4);
}

int credless_connect4(struct bpf_sock_addr *ctx)
{
    struct redirect_target key = {};
    struct bpf_sock *sk = ctx->sk;
    key.family = AF_INET;
    key.port = ctx->user_port;
    key.addr[0] = reached4(ctx->user_ip4, sk ? sk->src_ip4 : 0);
    struct redirect_config *cfg = 0;
    u32 port = take(ctx, &key, AF_INET, &cfg);
    if (port == REFUSE)
        return 0;
    if (!port || !cfg)
        return 1;
    ctx->user_ip4 = cfg->listen_ip4;
    ctx->user_port = port > 1 ? port : cfg->listen_port4;
    count(0);
    return 1;
}

int credless_connect6(struct bpf_sock_addr *ctx)
{
    struct redirect_target key = {};
    struct bpf_sock *sk = ctx->sk;
    u32 a[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
    u32 src[4] = {};
    if (sk) {
        src[0] = sk->src_ip6[0];
        src[1] = sk->src_ip6[1];
        src[2] = sk->src_ip6[2];
        src[3] = sk->src_ip6[3];
    }
    struct redirect_config *cfg = 0;
    key.port = ctx->user_port;
    if (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0) {  // :: (see reached4)
        if (is_mapped(src)) {  // ::ffff:127.0.0.1, not the bound address
            a[2] = bpf_htonl(0x0000ffff);
            a[3] = bpf_htonl(LOOPBACK4);
        } else {
            a[3] = bpf_htonl(1);  // ::1
        }
    }
    // ::ffff:a.b.c.d — an IPv4 destination on a dual-stack socket: connect4 never sees it
    // (tcp_v6_connect calls tcp_v4_connect itself, not its pre_connect hook)
    if (is_mapped(a)) {
        key.family = AF_INET;
        key.addr[0] = reached4(a[3], is_mapped(src) ? src[3] : 0);
        u32 port4 = take(ctx, &key, AF_INET, &cfg);
        if (port4 == REFUSE)
            return 0;
        if (!port4 || !cfg)
            return 1;
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
        ctx->user_ip6[3] = cfg->listen_ip4;
        ctx->user_port = port4 > 1 ? port4 : cfg->listen_port4;
        count(1);
        return 1;
    }
    key.family = AF_INET6;
    key.addr[0] = a[0];
    key.addr[1] = a[1];
    key.addr[2] = a[2];
    key.addr[3] = a[3];
    u32 port6 = take(ctx, &key, AF_INET6, &cfg);
    if (port6 == REFUSE)
        return 0;
    if (!port6 || !cfg)
        return 1;
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bpf_htonl(1);   // ::1
    ctx->user_port = port6 > 1 ? port6 : cfg->listen_port6;
    count(1);
    return 1;
}

// An address as the proxy's listener will see it: a v4-mapped IPv6 address (a dual-stack
// socket talking IPv4) is the IPv4 address its IPv4 listener accepts from.
static __always_inline void endpoint_addr(u32 family, u32 ip4, u32 *ip6, u32 *out_family,
                                          u32 *out)
{
    if (family == AF_INET) {
        *out_family = AF_INET;
        out[0] = ip4;
    } else if (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == bpf_htonl(0x0000ffff)) {
        *out_family = AF_INET;
        out[0] = ip6[3];
    } else {
        *out_family = AF_INET6;
        out[0] = ip6[0];
        out[1] = ip6[1];
        out[2] = ip6[2];
        out[3] = ip6[3];
    }
}

static __always_inline void endpoint_key(struct bpf_sock_ops *skops,
                                         struct local_endpoint *key)
{
    u32 local6[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
                     skops->local_ip6[3]};
    u32 remote6[4] = {skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
                      skops->remote_ip6[3]};
    u32 remote_family = 0;
    endpoint_addr(skops->family, skops->local_ip4, local6, &key->family, key->addr);
    endpoint_addr(skops->family, skops->remote_ip4, remote6, &remote_family,
                  key->listen_addr);
    key->port = skops->local_port;
    // remote_port is the network-order port in the upper half of the word
    key->listen_port = bpf_ntohl(skops->remote_port);
    key->netns = bpf_get_netns_cookie(skops);
}

int credless_sockops(struct bpf_sock_ops *skops)
{
    u64 cookie;
    struct local_endpoint key;
    switch (skops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        cookie = bpf_get_socket_cookie(skops);
        if (!redirected.lookup(&cookie))
            return 1;
        __builtin_memset(&key, 0, sizeof(key));
        endpoint_key(skops, &key);
        local_to_cookie.update(&key, &cookie);
        // be told when this socket closes, to delete both records
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
                                  BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    case BPF_SOCK_OPS_STATE_CB:
        if (skops->args[1] != BPF_TCP_CLOSE)
            return 1;
        cookie = bpf_get_socket_cookie(skops);
        if (!redirected.lookup(&cookie))
            return 1;
        __builtin_memset(&key, 0, sizeof(key));
        endpoint_key(skops, &key);
        local_to_cookie.delete(&key);
        redirected.delete(&cookie);
        return 1;
    }
    return 1;
}

// Who writes on a redirected connection.
//
// The proxy serves a connection as the process image that connected (take() recorded its
// tgid, uid and cgroup), and checks per request that this tgid still runs that image. That
// check cannot see *who sent* the bytes: a child that inherited the socket, or a process
// handed it over SCM_RIGHTS, writes while the connecting process still runs, and would be
// served as it. So every write on a recorded socket is compared with the record, here, in
// the writer's own context, and any difference is kept on the record for the proxy.
//
// Why tcp_sendmsg_locked, as a raw tracepoint: every path that queues data on a TCP socket
// from a task (write, send*, writev, sendfile and splice since 6.5, io_uring, whose workers
// are threads of the submitting process) goes through tcp_sendmsg_locked, and the tracepoint
// fires inside its copy loop *before* the data is queued, so the mark is made before the
// proxy can read the bytes it marks. (fentry and kprobes are not available on every host
// credless runs on; raw tracepoints are. The classic tracepoint's record has no socket.)
// The socket's cookie is read at its BTF offset (SK_COOKIE_OFF, agent/attest/btf.py): it
// was assigned when the connect hook asked for it, and an unrecorded socket's lookup misses.
// Kernel threads (kTLS's transmit worker) write for the process that owns the data: not a
// sender of their own.
// Kernels without the tracepoint (it is recent) get no probe (HAVE_SENDMSG_TRACEPOINT, set by
// agent/inject/redirect.py from tracefs), and the agent says at start that writers are not
// checked there.
#ifdef HAVE_SENDMSG_TRACEPOINT
#ifndef SK_COOKIE_OFF
#error "SK_COOKIE_OFF (struct sock's cookie offset, from BTF) must be defined"
#endif
#ifndef TASK_FLAGS_OFF
#error "TASK_FLAGS_OFF (task_struct.flags offset, from BTF) must be defined"
#endif
#define PF_KTHREAD 0x00200000

RAW_TRACEPOINT_PROBE(tcp_sendmsg_locked)
{
    void *sk = (void *)ctx->args[0];
    u64 cookie = 0;
    bpf_probe_read_kernel(&cookie, sizeof(cookie), sk + SK_COOKIE_OFF);
    if (!cookie)
        return 0;  // never asked for: not a socket the connect hooks recorded
    struct redirect_info *info = redirected.lookup(&cookie);
    if (!info)
        return 0;
    u32 flags = 0;
    bpf_probe_read_kernel(&flags, sizeof(flags), (void *)bpf_get_current_task() + TASK_FLAGS_OFF);
    if (flags & PF_KTHREAD)
        return 0;
    u32 seen = 0;
    if ((u32)(bpf_get_current_pid_tgid() >> 32) != info->tgid)
        seen |= CREDLESS_SENDER_PROCESS;
    if ((u32)bpf_get_current_uid_gid() != info->uid)
        seen |= CREDLESS_SENDER_UID;
    if (bpf_get_current_cgroup_id() != info->cgroup_id)
        seen |= CREDLESS_SENDER_CGROUP;
    if (seen & ~info->sender) {
        // not atomic (BCC 0.26 emits no 32-bit atomic or): two writers at once may lose
        // one's bits, never both, and any bit closes the connection
        info->sender |= seen;
        u32 slot = cookie % SENDER_CHANGE_SLOTS;
        u64 *n = sender_changes.lookup(&slot);
        if (n)
            __sync_fetch_and_add(n, 1);  // after the bits: a reader that sees it sees them
    }
    return 0;
}
#endif  // HAVE_SENDMSG_TRACEPOINT
