// SPDX-License-Identifier: GPL-2.0
//
// Managed cgroups that come and go: the kernel half of inject.managed_cgroups patterns.
//
// The redirect (bpf/redirect.c) is attached once, at the cgroup v2 root, and decides in the
// program whether the connecting task is managed: it walks the task's ancestors and looks
// each id up in `managed_cgroups`. Operators name cgroups by path or glob
// (/system.slice/agent-*.service); the map holds ids, and a cgroup deleted and made again
// (every systemd service restart) has a new id. This program keeps the map following the
// paths, from the cgroup:cgroup_mkdir and cgroup:cgroup_rmdir tracepoints:
//
// - mkdir of a cgroup at a depth some pattern has (WATCH_LEVELS, from user space): the new
//   id is written as PENDING, then an event goes to user space through the ring buffer;
//   the agent matches the path against the patterns and turns the entry into MANAGED or
//   deletes it (agent/inject/cgroup_watch.py). Deeper cgroups need nothing: a directory made
//   under a managed cgroup is managed already, by the ancestor walk.
// - rmdir: a v2 cgroup's entry, whatever its state, is deleted here, and the agent is told.
//
// Why no process in a new cgroup can connect uncredentialed before the agent has decided:
// cgroup_mkdir() (kernel/cgroup/cgroup.c) fires this tracepoint *before* kernfs_activate()
// makes the directory visible, so nothing can open its cgroup.procs (or pass it to
// clone3(CLONE_INTO_CGROUP)) yet: the PENDING entry exists before any task can be in the
// cgroup. While it is PENDING, bpf/redirect.c refuses (EPERM) the task's connects to
// intercepted destinations (and only those): they neither go out uncredentialed nor reach
// the proxy as a cgroup the agent has not decided about. User space decides within the
// time a ring-buffer wake-up takes; what it decides is written to the map, so a refused
// connect retried afterwards goes where it should. The entry is written before the event
// is submitted: user space never decides about an entry that is not there yet.
//
// Why a tracepoint and not attaching the connect programs to each matching cgroup as it
// appears: attaching from user space after an event is late by the event's latency (the
// race above), and the root attachment already pays for the ancestor walk: a PENDING
// entry is one more value of the lookup it does anyway (docs/cgroups.md has the figures).
//
// Why the tracepoint's fields are read by offset: this program is attached through a
// pinnable BPF link (perf-event link), not BCC's TRACEPOINT_PROBE, so the links outlive
// the agent like the redirect's: while no agent runs, a re-created managed cgroup is still
// PENDING (refused), never unmanaged. The offsets come from the tracepoint's format file in
// tracefs (agent/inject/cgroup_watch.py), a stable ABI, passed as TP_*_OFF.
//
// Only the cgroup v2 hierarchy (hierarchy id 0) counts: v1 hierarchies number their
// cgroups on their own, and their ids may equal v2 ids.
//
// Loss: a failed ring-buffer reservation is counted (cgroup_events_lost); the map is
// updated whether or not the event is published, and the agent re-reads the cgroup tree
// when the count grows. A full map (no PENDING entry written) is counted too.

#include <uapi/linux/bpf.h>
#include "cgroup_watch.h"  // managed_cgroups, shared with bpf/redirect.c

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 16
#endif
#ifndef WATCH_LEVELS
#define WATCH_LEVELS 0  // bit n: a pattern names cgroups at depth n
#endif
#ifndef TP_ROOT_OFF
#define TP_ROOT_OFF 8
#endif
#ifndef TP_LEVEL_OFF
#define TP_LEVEL_OFF 12
#endif
#ifndef TP_ID_OFF
#define TP_ID_OFF 16
#endif
#ifndef TP_PATH_OFF
#define TP_PATH_OFF 24
#endif

BPF_RINGBUF_OUTPUT(cgroup_events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(cgroup_watch_counts, u64, 2);  // 0: events lost, 1: PENDING not written

static __always_inline void watch_count(int i)
{
    u64 *c = cgroup_watch_counts.lookup(&i);
    if (c)
        (*c)++;
}

static __always_inline int watch_fields(void *ctx, u64 *id, u32 *level)
{
    int root = *(int *)(ctx + TP_ROOT_OFF);
    if (root != 0)  // a cgroup v1 hierarchy
        return 0;
    *id = *(u64 *)(ctx + TP_ID_OFF);
    *level = (u32) *(int *)(ctx + TP_LEVEL_OFF);
    return 1;
}

static __always_inline void watch_publish(void *ctx, u32 type, u64 id, u32 level, u32 state,
                                          u32 marked)
{
    struct cgroup_event *e = cgroup_events.ringbuf_reserve(sizeof(struct cgroup_event));
    if (!e) {
        watch_count(0);
        return;
    }
    e->type = type;
    e->level = level;
    e->id = id;
    e->state = state;
    e->marked = marked;
    u32 loc = *(u32 *)(ctx + TP_PATH_OFF);  // __data_loc: length << 16 | offset
    bpf_probe_read_kernel_str(e->path, sizeof(e->path), ctx + (loc & 0xffff));
    cgroup_events.ringbuf_submit(e, 0);
}

int credless_cgroup_mkdir(void *ctx)
{
    u64 id;
    u32 level;
    if (!watch_fields(ctx, &id, &level) || level >= 64)
        return 0;
    if (!((WATCH_LEVELS >> level) & 1))
        return 0;
    u32 pending = CREDLESS_CG_PENDING;
    u32 marked = managed_cgroups.update(&id, &pending) == 0;
    if (!marked)
        watch_count(1);  // map full: told to user space (marked = 0), which decides at once
    watch_publish(ctx, CREDLESS_CG_MKDIR, id, level, CREDLESS_CG_PENDING, marked);
    return 0;
}

int credless_cgroup_rmdir(void *ctx)
{
    u64 id;
    u32 level;
    if (!watch_fields(ctx, &id, &level))
        return 0;
    u32 *state = managed_cgroups.lookup(&id);
    if (!state)
        return 0;
    u32 was = *state;
    managed_cgroups.delete(&id);
    watch_publish(ctx, CREDLESS_CG_RMDIR, id, level, was, 0);
    return 0;
}
