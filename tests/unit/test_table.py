"""The process table's image rules: PID reuse, exec, exit grace, lineage, seeding."""

from __future__ import annotations

from agent.attest.table import (
    EV_EXEC,
    EV_EXIT,
    EV_FORK,
    LINEAGE_LIMIT,
    ProcessEvent,
    ProcessImage,
    ProcessTable,
)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def ev(type_, tgid, exec_ns, start_ns=None, ppid=1, comm="x"):
    return ProcessEvent(
        type=type_,
        tgid=tgid,
        pid=tgid,
        ppid=ppid,
        uid=0,
        gid=0,
        start_ns=start_ns if start_ns is not None else exec_ns,
        exec_ns=exec_ns,
        cgroup_id=7,
        ts_ns=exec_ns,
        comm=comm,
    )


def test_pid_reuse_same_pid_different_start_is_a_miss():
    clock = Clock()
    t = ProcessTable(grace_seconds=5, clock=clock)
    t.apply(ev(EV_FORK, 500, 1_000))
    t.apply(ev(EV_EXIT, 500, 1_000))
    clock.t += 10
    t.expire()
    t.apply(ev(EV_FORK, 500, 9_000))  # a new process got pid 500
    assert t.image(500, 1_000) is None  # the old identity never answers for it
    assert t.image(500, 9_000).start_ns == 9_000


def test_pid_reuse_within_grace_keeps_images_apart():
    clock = Clock()
    t = ProcessTable(grace_seconds=5, clock=clock)
    t.apply(ev(EV_EXEC, 500, 1_000, comm="old"))
    t.apply(ev(EV_EXIT, 500, 1_000))
    t.apply(ev(EV_EXEC, 500, 2_000, start_ns=2_000, comm="new"))
    assert t.image(500, 1_000).comm == "old" and t.image(500, 1_000).exited_at is not None
    assert t.image(500, 2_000).comm == "new" and t.image(500, 2_000).exited_at is None
    assert t.current(500).comm == "new"


def test_exec_is_a_new_image_and_the_old_one_misses_at_once():
    t = ProcessTable(grace_seconds=5, clock=Clock())
    t.apply(ev(EV_FORK, 600, 1_000))
    t.apply(ev(EV_EXEC, 600, 1_500, start_ns=1_000, comm="sh"))
    t.apply(ev(EV_EXEC, 600, 2_500, start_ns=1_000, comm="python"))
    assert t.image(600, 1_000) is None and t.image(600, 1_500) is None
    img = t.image(600, 2_500)
    assert img.comm == "python" and img.start_ns == 1_000
    assert len(t) == 1


def test_exit_grace_then_gone():
    clock = Clock()
    t = ProcessTable(grace_seconds=5, clock=clock)
    t.apply(ev(EV_EXEC, 700, 1_000))
    t.apply(ev(EV_EXIT, 700, 1_000))
    assert t.current(700) is None and len(t) == 0
    clock.t += 4.9
    assert t.image(700, 1_000) is not None and t.expire() == []
    clock.t += 0.2
    assert t.image(700, 1_000) is None
    assert [i.tgid for i in t.expire()] == [700]
    assert t.stats.expired == 1


def test_exit_of_a_stale_image_does_not_end_the_current_one():
    t = ProcessTable(clock=Clock())
    t.apply(ev(EV_EXEC, 800, 2_000))
    assert t.apply(ev(EV_EXIT, 800, 1_000)) is None
    assert t.current(800).exec_ns == 2_000


def test_lineage_follows_parents_as_they_were():
    t = ProcessTable(clock=Clock())
    t.apply(ev(EV_EXEC, 10, 100, comm="init"))
    t.apply(ev(EV_FORK, 20, 200, ppid=10))
    t.apply(ev(EV_EXEC, 20, 250, start_ns=200, ppid=10, comm="agent"))
    t.apply(ev(EV_FORK, 30, 300, ppid=20))
    t.apply(ev(EV_EXEC, 30, 350, start_ns=300, ppid=20, comm="tool"))
    assert [(p.tgid, p.comm) for p in t.lineage(t.current(30))] == [(20, "agent"), (10, "init")]


def test_seed_never_overrides_an_event():
    t = ProcessTable(clock=Clock())
    t.apply(ev(EV_EXEC, 900, 5_000, comm="from-event"))
    seeded = ProcessImage(
        tgid=900,
        exec_ns=100,
        start_ns=100,
        ppid=1,
        uid=0,
        gid=0,
        cgroup_id=0,
        comm="from-proc",
        filename="",
        source="proc",
    )
    assert t.seed(seeded) is False
    assert t.current(900).comm == "from-event"


def test_event_counters():
    t = ProcessTable(clock=Clock())
    t.apply(ev(EV_FORK, 1, 1))
    t.apply(ev(EV_EXEC, 1, 2))
    t.apply(ev(EV_EXIT, 1, 2))
    assert t.stats.events == {"exec": 1, "fork": 1, "exit": 1}


def lineage(t: ProcessTable, tgid: int) -> list[tuple[int, str]]:
    return [(p.tgid, p.comm) for p in t.lineage(t.current(tgid))]


def spawn(t: ProcessTable, tgid: int, at: int, ppid: int, comm: str) -> None:
    """fork by ppid, then exec of comm in the child"""
    t.apply(ev(EV_FORK, tgid, at, ppid=ppid, comm="fork"))
    t.apply(ev(EV_EXEC, tgid, at + 1, start_ns=at, ppid=ppid, comm=comm))


def test_a_double_forked_child_keeps_the_process_that_started_it():
    """`(sleep 1; exec tool) &` in a subshell: the subshell forks the child and exits, the
    child is reparented (to init, or a subreaper) before it execs, and the kernel names
    init as its parent at exec. Its lineage is who started it, not who adopted it."""
    t = ProcessTable(clock=Clock())
    t.apply(ev(EV_EXEC, 1, 10, comm="init"))
    spawn(t, 20, 200, ppid=1, comm="agent-a")
    t.apply(ev(EV_FORK, 30, 300, ppid=20))  # the subshell
    t.apply(ev(EV_FORK, 40, 400, ppid=30))  # its background child
    t.apply(ev(EV_EXIT, 30, 300))
    t.apply(ev(EV_EXEC, 40, 450, start_ns=400, ppid=1, comm="tool"))  # reparented to init
    assert lineage(t, 40) == [(30, "x"), (20, "agent-a"), (1, "init")]


def test_a_lineage_outlives_its_ancestors_exit_expiry_and_exec():
    clock = Clock()
    t = ProcessTable(grace_seconds=5, clock=clock)
    t.apply(ev(EV_EXEC, 1, 10, comm="init"))
    spawn(t, 20, 200, ppid=1, comm="agent-a")
    spawn(t, 30, 300, ppid=20, comm="tool")
    t.apply(ev(EV_EXEC, 20, 500, start_ns=200, ppid=1, comm="other"))  # a re-execs
    assert t.image(20, 201) is None  # its old image is gone from the table
    t.apply(ev(EV_EXIT, 20, 500))
    clock.t += 60
    t.expire()
    assert lineage(t, 30) == [(20, "agent-a"), (1, "init")]  # as it was when tool began


def test_a_program_that_execs_another_started_it():
    """No fork: agent-a calls execve on tool. It chose tool's arguments, environment and
    input, so tool's lineage begins with it (a sub-agent policy limits tool by it)."""
    t = ProcessTable(clock=Clock())
    t.apply(ev(EV_EXEC, 1, 10, comm="init"))
    spawn(t, 20, 200, ppid=1, comm="agent-a")
    t.apply(ev(EV_EXEC, 20, 300, start_ns=200, ppid=1, comm="tool"))
    assert lineage(t, 20) == [(20, "agent-a"), (1, "init")]


def test_a_process_that_execs_in_a_loop_keeps_a_bounded_lineage():
    t = ProcessTable(clock=Clock())
    t.apply(ev(EV_EXEC, 1, 10, comm="init"))
    for n in range(LINEAGE_LIMIT * 3):
        t.apply(ev(EV_EXEC, 20, 100 + n, start_ns=100, ppid=1, comm=f"p{n}"))
    got = lineage(t, 20)
    assert len(got) == LINEAGE_LIMIT
    assert got[0] == (20, f"p{LINEAGE_LIMIT * 3 - 2}")  # the nearest first


def test_seeded_processes_get_their_lineage_whatever_order_they_were_read_in():
    t = ProcessTable(clock=Clock())

    def seeded(tgid: int, ppid: int, comm: str) -> ProcessImage:
        return ProcessImage(tgid, tgid * 10, tgid * 10, ppid, 0, 0, 0, comm, "", "proc")

    # pids wrapped: the child (532) was read before its parent (32762)
    for img in (seeded(532, 32762, "tool"), seeded(32762, 1, "agent"), seeded(1, 0, "init")):
        assert t.seed(img)
    t.link_parents()
    assert lineage(t, 532) == [(32762, "agent"), (1, "init")]
    assert lineage(t, 1) == []


def test_seeded_processes_naming_each_other_parent_get_no_endless_lineage():
    t = ProcessTable(clock=Clock())
    for tgid, ppid in ((7, 8), (8, 7)):  # not a tree /proc can show, but read at two moments
        t.seed(ProcessImage(tgid, tgid, tgid, ppid, 0, 0, 0, str(tgid), "", "proc"))
    t.link_parents()
    assert len(lineage(t, 7)) <= 2 and len(lineage(t, 8)) <= 2  # once round, at most


def test_a_child_seen_before_its_parent_was_seeded_is_linked_once_it_is():
    t = ProcessTable(clock=Clock())
    t.apply(ev(EV_EXEC, 40, 400, ppid=30, comm="tool"))  # the parent was not read yet
    t.seed(ProcessImage(30, 3, 3, 1, 0, 0, 0, "agent", "", "proc"))
    t.link_parents()
    assert lineage(t, 40) == [(30, "agent")]
