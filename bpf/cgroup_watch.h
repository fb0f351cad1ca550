// SPDX-License-Identifier: GPL-2.0
//
// Shared by bpf/cgroup_watch.c, bpf/redirect.c and (through BCC's type export)
// agent/inject/cgroup_watch.py: the `managed_cgroups` map, the states of its entries and the
// event the watcher publishes. Defined once here.

#ifndef CREDLESS_CGROUP_WATCH_H
#define CREDLESS_CGROUP_WATCH_H

// managed_cgroups values (low byte). Any other value (an older agent wrote 1 for every
// entry) reads as MANAGED.
#define CREDLESS_CG_MANAGED 1   // its processes' intercepted connects go to the proxy
#define CREDLESS_CG_PENDING 2   // new, not yet decided by the agent: intercepted connects
                                // are refused until it is (bpf/cgroup_watch.c says why)

// entries of managed_cgroups: managed cgroups, and new ones while undecided
#define CREDLESS_MAX_MANAGED 16384

#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/credless"
#endif
// Written by the agent and by bpf/cgroup_watch.c, read by bpf/redirect.c; values
// CREDLESS_CG_*. Declared here, once: the agent compiles both files as one object
// (agent/bpfload.py says why), where a second declaration would not compile; compiled apart,
// each finds the other's map through the pin.
BPF_TABLE_PINNED("hash", u64, u32, managed_cgroups, CREDLESS_MAX_MANAGED,
                 PIN_DIR "/managed_cgroups");

#define CREDLESS_CG_MKDIR 1
#define CREDLESS_CG_RMDIR 2

#define CREDLESS_CG_PATH_LEN 512

struct cgroup_event {
    u32 type;          // CREDLESS_CG_MKDIR or CREDLESS_CG_RMDIR
    u32 level;         // depth below the cgroup v2 root (the root is 0)
    u64 id;            // cgroup id (its directory's inode number)
    u32 state;         // RMDIR: the entry the kernel removed (MANAGED or PENDING)
    u32 marked;        // MKDIR: 1 if the PENDING entry was written (0: map full)
    char path[CREDLESS_CG_PATH_LEN];  // relative to the cgroup v2 root; may be truncated
};

#endif
