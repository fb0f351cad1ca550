// SPDX-License-Identifier: GPL-2.0
//
// Process lifecycle events for attestation: exec, fork and exit, from the sched tracepoints.
//
// Why tracepoints: kprobes are compiled out on the kernels credless targets, and the sched
// tracepoints are a stable ABI that fires for every process, including ones that live for
// microseconds (an exec storm must be seen whole, not sampled from /proc).
//
// Why read task_struct by offset: BCC compiles this file against installed headers that do
// not match the running kernel. The loader reads the offsets of the four task_struct fields
// used here from /sys/kernel/btf/vmlinux and passes them as TASK_*_OFF (agent/attest/btf.py).
// Every other datum comes from BPF helpers or tracepoint arguments, whose layout BCC reads
// from tracefs at compile time.
//
// Loss: BCC's ring buffer API has no loss callback, so each failed reservation is counted
// in a per-CPU array that user space reads and exports. Nothing is dropped silently.

// Only the uapi header: task_struct is read by offset (above), so nothing here needs
// <linux/sched.h>, and leaving it out cuts BCC's compile at every agent start from about
// 1.7 s to 0.6 s of CPU (the same bytecode, compared with BPF.dump_func).
#include <uapi/linux/bpf.h>
#include "process_events.h"

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 2048
#endif
#ifndef MAX_PROCESSES
#define MAX_PROCESSES 65536
#endif

BPF_RINGBUF_OUTPUT(process_events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(process_events_lost, __u64, 1);
// LRU so that a missed exit can never fill the map and stop new processes being tracked.
// bpf/redirect.c reads it: compiled into one object with this file (the agent's case:
// agent/bpfload.py says why one object), it finds the map declared here, by this macro;
// compiled alone (a redirect without attestation in the same object), through the pin.
#define PROCESS_IMAGES_DECLARED
#ifdef PIN_DIR
BPF_TABLE_PINNED("lru_hash", u32, struct process_image, process_images, MAX_PROCESSES,
                 PIN_DIR "/process_images");
#else
BPF_TABLE("lru_hash", u32, struct process_image, process_images, MAX_PROCESSES);
#endif

// Image changes, for the proxy's per-request "is this still the process that connected?"
// check (agent/inject/proxy.py). Asking process_images costs a bpf(2) syscall per request;
// this array is mapped into the agent's memory, so most requests are answered by one load.
// Slot tgid % IMAGE_CHANGE_SLOTS is incremented *after* every change of that tgid's entry
// (exec, exit). A reader reads its slot, then process_images; while the slot keeps that
// value, no exec or exit of the tgid can have happened since, and the answer stands.
// Slots are shared (tgids that collide only cost a syscall each), and a bump always happens
// before the new image runs user code: a request it writes is read after the bump.
#ifndef IMAGE_CHANGE_SLOTS
#define IMAGE_CHANGE_SLOTS 65536
#endif
// u64: an array map's elements are 8-byte aligned in the mapping whatever their size.
BPF_F_TABLE("array", u32, u64, image_changes, IMAGE_CHANGE_SLOTS, BPF_F_MMAPABLE);

static __always_inline void image_changed(__u32 tgid)
{
    __u32 slot = tgid % IMAGE_CHANGE_SLOTS;
    __u64 *n = image_changes.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
}

static __always_inline __u32 task_u32(void *task, int off)
{
    __u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), task + off);
    return v;
}

static __always_inline __u64 task_u64(void *task, int off)
{
    __u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), task + off);
    return v;
}

static __always_inline __u32 task_parent_tgid(void *task)
{
    void *parent = 0;
    bpf_probe_read_kernel(&parent, sizeof(parent), task + TASK_REAL_PARENT_OFF);
    return parent ? task_u32(parent, TASK_TGID_OFF) : 0;
}

static __always_inline struct process_event *reserve(void)
{
    struct process_event *e = process_events.ringbuf_reserve(sizeof(struct process_event));
    if (!e) {
        int zero = 0;
        __u64 *lost = process_events_lost.lookup(&zero);
        if (lost)
            (*lost)++;
    }
    return e;
}

static __always_inline void fill_current(struct process_event *e, __u32 type)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u64 uid_gid = bpf_get_current_uid_gid();
    e->type = type;
    e->tgid = pid_tgid >> 32;
    e->pid = (__u32)pid_tgid;
    e->uid = (__u32)uid_gid;
    e->gid = uid_gid >> 32;
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->ts_ns = bpf_ktime_get_boot_ns();
    e->filename[0] = 0;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
}

// exec: the current task now runs a new image. After de_thread() the exec'ing thread is
// the group leader, so tgid is the process. The image map is updated *before* the event is
// published: a lookup that sees the event can trust the map to already agree.
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    void *task = (void *)bpf_get_current_task();
    __u64 now = bpf_ktime_get_boot_ns();
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct process_image img = {
        .start_ns = task_u64(task, TASK_START_BOOTTIME_OFF),
        .exec_ns = now,
    };
    process_images.update(&tgid, &img);
    image_changed(tgid);

    struct process_event *e = reserve();
    if (!e)
        return 0;
    fill_current(e, CREDLESS_EV_EXEC);
    e->ppid = task_parent_tgid(task);
    e->start_ns = img.start_ns;
    e->exec_ns = now;
    TP_DATA_LOC_READ_STR(&e->filename, filename, sizeof(e->filename));
    process_events.ringbuf_submit(e, 0);
    return 0;
}

// fork: the raw tracepoint hands over the child task itself (the classic tracepoint gives
// only its thread id), so thread creation (child pid != child tgid) can be told apart and
// ignored, and the child's start time and tgid read exactly.
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
    void *parent = (void *)ctx->args[0];
    void *child = (void *)ctx->args[1];
    __u32 child_pid = task_u32(child, TASK_PID_OFF);
    __u32 child_tgid = task_u32(child, TASK_TGID_OFF);
    if (child_pid != child_tgid)
        return 0;  // a new thread, not a new process

    struct process_image img = {
        .start_ns = task_u64(child, TASK_START_BOOTTIME_OFF),
    };
    img.exec_ns = img.start_ns;
    process_images.update(&child_tgid, &img);

    struct process_event *e = reserve();
    if (!e)
        return 0;
    fill_current(e, CREDLESS_EV_FORK);  // uid, gid, cgroup: the child inherits the parent's
    e->tgid = child_tgid;
    e->pid = child_pid;
    e->ppid = task_u32(parent, TASK_TGID_OFF);
    e->start_ns = img.start_ns;
    e->exec_ns = img.exec_ns;
    process_events.ringbuf_submit(e, 0);
    return 0;
}

// exit: fires for every thread; only the last one out (group_dead) ends the process.
TRACEPOINT_PROBE(sched, sched_process_exit)
{
#ifdef HAVE_GROUP_DEAD
    if (!args->group_dead)
        return 0;
#else
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if ((__u32)pid_tgid != pid_tgid >> 32)
        return 0;  // older kernels: approximate the process exit by the leader's exit
#endif
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct process_image *img = process_images.lookup(&tgid);
    __u64 exec_ns = img ? img->exec_ns : 0;
    void *task = (void *)bpf_get_current_task();
    process_images.delete(&tgid);
    image_changed(tgid);

    struct process_event *e = reserve();
    if (!e)
        return 0;
    fill_current(e, CREDLESS_EV_EXIT);
    e->ppid = task_parent_tgid(task);
    e->start_ns = task_u64(task, TASK_START_BOOTTIME_OFF);
    e->exec_ns = exec_ns;
    process_events.ringbuf_submit(e, 0);
    return 0;
}
