// SPDX-License-Identifier: GPL-2.0
//
// Structures shared by the kernel programs and, through BCC's type export, by user space.
// Defined once here: agent/attest/events.py never restates the layout, it asks BCC for the
// ctypes class BCC derived from these declarations. (BCC's type export knows u32/u64, not
// __u32/__u64, hence the spelling.)

#ifndef CREDLESS_PROCESS_EVENTS_H
#define CREDLESS_PROCESS_EVENTS_H

#define CREDLESS_EV_EXEC 1
#define CREDLESS_EV_FORK 2
#define CREDLESS_EV_EXIT 3

#define CREDLESS_COMM_LEN 16
#define CREDLESS_FILENAME_LEN 256

// One record per process lifecycle step, written to the `process_events` ring buffer.
//
// Times are CLOCK_BOOTTIME nanoseconds: they keep counting across suspend, so they never
// repeat on one boot, which makes (tgid, exec_ns) a name no later process can take.
struct process_event {
    u32 type;          // CREDLESS_EV_*
    u32 tgid;          // process id (the thread-group leader)
    u32 pid;           // thread that triggered the event
    u32 ppid;          // real parent's tgid
    u32 uid;           // real uid and gid of the current task (fork: of the parent)
    u32 gid;
    u64 start_ns;      // task->start_boottime of the process
    u64 exec_ns;       // when the current image began: the exec time (EXEC), the start
                         // time (FORK: the child runs its parent's image until it execs),
                         // or the image that ended (EXIT)
    u64 cgroup_id;     // cgroup v2 id of the current task
    u64 ts_ns;         // when the event was recorded
    char comm[CREDLESS_COMM_LEN];
    char filename[CREDLESS_FILENAME_LEN];  // EXEC only: the path given to execve
};

// The kernel's own record of which image each live process runs, keyed by tgid. Maintained
// by the tracepoints below; read by user space to check that a pid still runs the image it
// attested (PID reuse, exec), and by the redirect program to tag connections.
struct process_image {
    u64 start_ns;
    u64 exec_ns;
};

#endif
