"""A real SLURM cluster on this machine for tests: munged, slurmctld and two slurmd "nodes" (n1, n2).

Debian's ``slurmctld slurmd slurm-client munge`` packages (Slurm 22.05) are installed with apt-get if
missing. Every daemon runs in the foreground as a child of the test process (so its PID is known and
it gets SIGTERM if the test process dies), with all state, spool, log and pid files in one scratch
folder; clients reach the cluster through ``SLURM_CONF``. The node names do not resolve on this
machine, so each slurmd runs in a private mount namespace with a hosts file that maps them to
127.0.0.1: jobs started by that slurmd (the batch script, srun tasks, ``MASTER_ADDR=n1``) see it too.

Run it by hand to get a cluster for experiments (Ctrl-C stops it)::

    python tests/slurm/slurm_cluster.py /tmp/slurm-play
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
POLICY_RC = Path("/usr/sbin/policy-rc.d")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed on this machine at all (no apt-get, not root): tests skip."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed(log=print) -> float:
    """Install the SLURM and munge packages if any binary is missing; returns the seconds spent.

    A temporary ``policy-rc.d`` that exits 101 keeps the packages from starting system daemons of
    their own (a system munged would hold the default socket); a policy file that was already
    there is left alone."""
    if not missing_binaries():
        return 0.0
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            f"SLURM binaries {missing_binaries()} are missing and there is no apt-get to install "
            f"them (needs Debian/Ubuntu packages {' '.join(PACKAGES)})"
        )
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"SLURM binaries {missing_binaries()} are missing and installing them needs root "
            f"(apt-get install {' '.join(PACKAGES)})"
        )
    start = time.monotonic()
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\n# written by tests/slurm: keep packages from starting daemons\nexit 101\n")
        POLICY_RC.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        log("installing SLURM packages with apt-get (about 10-15 s)")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # stale or empty package lists on a fresh machine
            update = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
            proc = subprocess.run(install, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"apt-get install {' '.join(PACKAGES)} failed (status {proc.returncode}):\n"
                    f"{update.stdout[-1500:]}{update.stderr[-1500:]}\n{proc.stdout[-3000:]}"
                    f"{proc.stderr[-3000:]}"
                )
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    if missing_binaries():
        raise RuntimeError(f"apt-get installed {PACKAGES} but {missing_binaries()} are still missing")
    return time.monotonic() - start


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the test process dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, all different (sockets held open until every one is chosen)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    """Two one-machine "nodes" n1, n2 in partition ``debug``, plus controller and munge."""

    root: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    cpus: int = field(default_factory=lambda: os.cpu_count() or 2)
    memory_mb: int = 4000
    # free ports, not Slurm's 6817-6819: a system Slurm or a second test session may hold those
    ports: list[int] = field(default_factory=list)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ------------------------------------------------------------------ configuration
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Variables a client (sbatch, scontrol, a job) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_configs(self) -> None:
        for sub in ("etc", "state", "log", "run", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.chmod(0o755)  # munged refuses a socket folder that others can write to
        self.root.chmod(0o755)  # and warns when clients cannot reach the socket through its parent
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        r = self.root
        self.ports = _free_ports(1 + len(self.nodes))
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.ports[1 + i]} "
            f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN"
            for i, name in enumerate(self.nodes)
        )
        self.conf.write_text(f"""\
# written by tests/slurm/slurm_cluster.py
ClusterName=mtlora-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ports[0]}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job is held before it may start again (default 120 s)
AuthInfo=socket={munge}/munge.socket.2,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
# seconds between a cancelled job's TERM and KILL: time for the trainer's checkpoint and the script's decision
KillWait=15
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        # without a cgroup.conf slurmd dies on a fresh machine ("No filesystem mounted on /sys/fs/cgroup")
        (r / "etc" / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        (r / "etc" / "hosts").write_text(hosts.rstrip("\n") + f"\n127.0.0.1 {' '.join(self.nodes)}\n")

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        env = {**os.environ, **self.env}
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        log.close()

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        self._write_configs()
        r, munge = self.root, self.root / "munge"
        try:
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    "--force",
                    f"--key-file={munge}/munge.key",
                    f"--socket={munge}/munge.socket.2",
                    f"--pid-file={r}/run/munged.pid",
                    f"--log-file={r}/log/munged.log",
                    f"--seed-file={munge}/munge.seed",
                ],
            )
            self._wait(lambda: (munge / "munge.socket.2").exists(), "munged socket", 15, ("munged",))
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(self._controller_up, "slurmctld answering", timeout, ("munged", "slurmctld"))
            for name in self.nodes:
                # private mount namespace: the node names resolve for this slurmd and its jobs only
                inner = 'mount --bind "$1" /etc/hosts && exec "$2" -D -N "$3" -f "$4"'
                self._spawn(
                    f"slurmd-{name}",
                    [
                        "unshare",
                        "--mount",
                        "sh",
                        "-c",
                        inner,
                        "sh",
                        str(r / "etc" / "hosts"),
                        _which("slurmd"),
                        name,
                        str(self.conf),
                    ],
                )
            self._wait(self._nodes_idle, "nodes idle", timeout, tuple(self.procs))
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, ready, what: str, timeout: float, daemons: tuple[str, ...]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [d for d in daemons if self.procs[d].poll() is not None]
            if dead:
                raise RuntimeError(
                    f"SLURM test cluster: {', '.join(dead)} exited while waiting for {what}\n" + self.logs_tail()
                )
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"SLURM test cluster: timed out after {timeout:.0f} s waiting for {what}\n" + self.logs_tail()
        )

    def _controller_up(self) -> bool:
        return self.run(["scontrol", "ping"], check=False).stdout.find("UP") >= 0

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n, "").startswith("idle") for n in self.nodes)

    def logs_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            if text.strip():
                parts.append(f"--- {path.name} ---\n{text[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, wait for it to leave the nodes, then stop the daemons by PID (nodes, controller,
        munged), SIGKILL after a grace period. Safe to call twice and after a failed start."""
        try:
            self._cancel_jobs()
        except (OSError, subprocess.SubprocessError) as err:  # the daemons are stopped below regardless
            print(f"SLURM test cluster: could not cancel the remaining jobs: {err}", file=sys.stderr)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()

    def _cancel_jobs(self, timeout: float = 30) -> None:
        """Cancel what is left and wait until the nodes are free, so that no job step outlives slurmd."""
        if not (self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None):
            return
        self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
            time.sleep(0.5)

    # ------------------------------------------------------------------ clients
    def run(
        self, cmd: list[str], *, check: bool = True, env: dict | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **self.env, **(env or {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        full_env = {**os.environ, **self.env, **(env or {})}
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=30
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); empty once it is forgotten."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def main(argv: list[str]) -> None:
    root = Path(argv[1] if len(argv) > 1 else "/tmp/slurm-play").resolve()
    print(f"installed in {ensure_installed():.1f} s" if missing_binaries() else "SLURM already installed")
    cluster = SlurmCluster(root).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill PID` stops the cluster cleanly too
    print(f"cluster up: export SLURM_CONF={cluster.conf}   (Ctrl-C or kill {os.getpid()} stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main(sys.argv)
