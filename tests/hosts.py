"""Another machine, as far as a shared filesystem can tell: a process in new UTS and pid namespaces, with its
own host name and pids that are not alive here (needs unshare, as root in CI)."""

from __future__ import annotations

import shutil
import subprocess

OTHER_HOST = "other-host"
# The other host's processes get pids near pid_max, ones that are not alive in this host's pid namespace (where
# ns_last_pid is not writable they get small pids and the tests still run).
NS_INIT = (
    f"hostname {OTHER_HOST} && {{ echo $(( $(cat /proc/sys/kernel/pid_max) - 100 )) > /proc/sys/kernel/ns_last_pid; }} "
    '2>/dev/null; "$0" "$@"'
)
UNSHARE = ["unshare", "--uts", "--pid", "--mount-proc", "--kill-child", "sh", "-c", NS_INIT]


def namespaces_work() -> bool:
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    try:
        probe = subprocess.run([*UNSHARE, "hostname"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0 and probe.stdout.strip() == OTHER_HOST
