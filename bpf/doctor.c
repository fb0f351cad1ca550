// SPDX-License-Identifier: GPL-2.0
//
// Probe programs for `credless doctor`. They do nothing on purpose: the doctor checks that
// the kernel *accepts* the program types credless depends on, by really loading and
// attaching them, rather than guessing from version strings or config files (a kernel can
// be new enough and still have BPF, tracepoints or cgroup hooks compiled out or locked down).

#include <uapi/linux/bpf.h>

// The attestation pipeline rests on the sched tracepoints (kprobes are compiled out on the
// kernels credless targets), so the probe uses the same family.
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    return 0;
}

// The redirect rests on cgroup sock_addr hooks. Returning 1 allows the connect unchanged;
// the doctor attaches this only to a throwaway cgroup with no processes in it.
int doctor_connect4(struct bpf_sock_addr *ctx)
{
    return 1;
}
