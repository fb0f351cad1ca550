// SPDX-License-Identifier: GPL-2.0
//
// Structures shared by bpf/redirect.c and user space (agent/inject/redirect.py gets the
// ctypes classes from BCC; it never restates these layouts).

#ifndef CREDLESS_REDIRECT_H
#define CREDLESS_REDIRECT_H

// A destination to intercept: address and port as the connect() call gave them. The map's
// value is the proxy port to send it to (network order), or 0 for the plain listener.
// IPv4 uses addr[0]; IPv6 all four words; ports in network byte order.
struct redirect_target {
    u32 family;       // AF_INET (2) or AF_INET6 (10)
    u32 port;         // network byte order, in the low 16 bits
    u32 addr[4];
};

// The agent's listeners and switches. One entry, index 0.
struct redirect_config {
    u32 enabled;
    u32 all_cgroups;          // 1: every cgroup except the excluded one; 0: managed subtrees
    u32 fail_open;            // 1: while agent_up is 0, leave connects alone
    u32 agent_up;             // set while the agent's proxy accepts connections
    u32 listen_ip4;           // network byte order
    u32 listen_port4;         // network byte order, low 16 bits
    u32 listen_port6;         // network byte order, low 16 bits; the v6 listener is on ::1
    u32 pad;
    u64 excluded_cgroup;      // the agent's own cgroup: its connects are never redirected
};

// redirect_info.sender: a write on the connection by a task that is not the one that
// connected (bpf/redirect.c, tcp_sendmsg_locked). Sticky: set bits are never cleared. The
// field took the place of a pad word, so the pinned map's layout is unchanged.
#define CREDLESS_SENDER_PROCESS 1  // another process (tgid)
#define CREDLESS_SENDER_UID 2      // another uid (the same process after setuid, say)
#define CREDLESS_SENDER_CGROUP 4   // another cgroup (the process moved since it connected)

// What the proxy needs to know about a redirected connection, keyed by socket cookie.
struct redirect_info {
    u32 orig_addr[4];
    u32 orig_port;            // network byte order, low 16 bits
    u32 family;               // family of the original destination
    u32 tgid;
    u32 pid;
    u32 uid;
    u32 sender;               // CREDLESS_SENDER_* bits: who else has written on the socket
    u64 cgroup_id;            // of the connecting *task*, not of the socket
    u64 start_ns;             // the process image that connected (from process_images)
    u64 exec_ns;
    u64 netns;                // network namespace cookie of the connecting socket
};

// A redirected connection as the proxy sees it on accept(): the full 4-tuple (the client's
// address and port, and the listener's, which the connect was rewritten to) and the network
// namespace. The namespace is part of the key because every pod has its own 127.0.0.1: two
// workloads in two pods can hold the same address and port at the same time, and the
// proxy's listener inside each pod knows which namespace it accepted in (SO_NETNS_COOKIE).
// The listener's half makes a record name one connection, not a port a process may bind
// later; the record is also deleted when the client's socket closes (bpf/redirect.c).
struct local_endpoint {
    u32 family;               // of both ends: a v4-mapped client counts as AF_INET
    u32 port;                 // the client's, host byte order (as sockops reports it)
    u32 addr[4];
    u32 listen_port;          // the listener's, host byte order
    u32 listen_addr[4];
    u32 pad;
    u64 netns;                // bpf_get_netns_cookie() of the client's socket
};

#endif
