"""Process accounting from /proc: CPU time and memory of a process tree.

Theory of operation: a proxy under test may be one process (Envoy, HAProxy), a master with
workers (nginx, ``meshproxy --workers 2``) or a launcher with a child (``taskset`` execs, so
it is not one). :func:`tree` finds the process and every live descendant by walking the ppid
links of ``/proc/*/stat`` once. CPU is ``utime + stime`` of each process (the kernel already
sums every thread of a thread group in ``/proc/PID/stat``), in clock ticks converted to
seconds; the harness samples it right before and right after a load run and subtracts, so
start-up work is not charged. Memory is read from ``/proc/PID/status``: ``VmRSS`` (resident
now, the "idle" figure right after start) and ``VmHWM`` (the high-water mark of the resident
set, i.e. the peak). Sums over processes count pages shared between a master and its workers
more than once, which is what ``ps`` and most published comparisons do as well; the per-process
figures are kept alongside in the JSON.

Everything here tolerates processes disappearing between the listing and the read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcMem:
    pid: int
    name: str
    rss_kib: int
    hwm_kib: int


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the ``(comm)`` one (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            raw = f.read()
    except OSError:
        return None
    close = raw.rfind(")")
    if close < 0:
        return None
    return raw[close + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants, root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        # fields[0] is state, fields[1] is ppid
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
            continue
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """Sum of user + system CPU seconds of ``pids`` (all their threads)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # utime and stime are fields 14 and 15 of stat; here (after pid and comm) 11 and 12
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICKS


def tree_cpu_seconds(root: int) -> float:
    return cpu_seconds(tree(root))


def memory(pids: list[int]) -> list[ProcMem]:
    out: list[ProcMem] = []
    for pid in pids:
        values: dict[str, str] = {}
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    values[key] = value.strip()
        except OSError:
            continue

        def kib(key: str, values: dict[str, str] = values) -> int:
            parts = values.get(key, "0 kB").split()
            return int(parts[0]) if parts else 0

        out.append(ProcMem(pid, values.get("Name", "?"), kib("VmRSS"), kib("VmHWM")))
    return out


def tree_memory(root: int) -> list[ProcMem]:
    return memory(tree(root))


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields[:8]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / _TICKS


def children_cpu_seconds() -> float:
    """CPU seconds of this process's waited-for children (e.g. a finished ``wrk``)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def load_side_cpu_seconds(upstream_pid: int | None) -> float:
    """CPU seconds of the harness's own processes: the upstream tree, this process and its
    waited-for children (wrk, loadgen runs)."""
    up = tree_cpu_seconds(upstream_pid) if upstream_pid is not None else 0.0
    return up + cpu_seconds([os.getpid()]) + children_cpu_seconds()
