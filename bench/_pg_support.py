"""A throwaway PostgreSQL cluster for the benchmarks (initdb + pg_ctl on a Unix socket in a
temporary folder, as a non-root user when run as root), and the CPU its processes used.

    with ThrowawayPostgres() as pg:
        pg.uri                      # postgresql://fleet@/fleet?host=/tmp/...
        pg.cpu_seconds()            # user + system CPU of the postmaster and its children

Durability as a real server runs it (fsync on, synchronous_commit on) unless
`durable=False`.  Needs Debian's postgresql (server binaries) and psycopg (fleetid's
[postgres] extra); `missing()` says which is absent.  No tests/ imports: bench/fleet.py
runs on it from `bash scripts/setup.sh` (with those two installed).
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid

DATABASE = "fleet"
USER = "fleet"


def pg_tool(name):
    """Path of a PostgreSQL server binary (PATH, then /usr/lib/postgresql/*/bin), or None."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/" + name))
    return candidates[-1] if candidates else None


def missing():
    """What a throwaway cluster lacks here (list of str; empty when it can run)."""
    out = []
    if not (pg_tool("initdb") and pg_tool("pg_ctl")):
        out.append("the PostgreSQL server binaries (apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        out.append("psycopg (pip install 'fleetid[postgres]', or scripts/setup.sh --test)")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        out.append("runuser (PostgreSQL refuses to run as root)")
    return out


def _user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _proc_stat(pid):
    """(ppid, utime + stime in seconds) of `pid` from /proc, or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def process_cpu_seconds(pid):
    """User + system CPU seconds of one process so far (0.0 when it is gone)."""
    stat = _proc_stat(pid)
    return stat[1] if stat else 0.0


def _children_cpu_seconds(pid):
    """{child pid: user + system CPU seconds} of the live direct children of `pid`."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            child = _proc_stat(int(entry))
            if child and child[0] == pid:
                out[int(entry)] = child[1]
    return out


def child_pids(pid):
    """The live direct children of `pid` (a supervisor's workers, a postmaster's
    backends), in pid order, from /proc."""
    return sorted(_children_cpu_seconds(pid))


def process_tree_cpu_seconds(pid):
    """{pid: user + system CPU seconds} of `pid` and its direct children (a supervisor
    and its workers) so far."""
    out = {}
    stat = _proc_stat(pid)
    if stat:
        out[pid] = stat[1]
    out.update(_children_cpu_seconds(pid))
    return out


def machine_busy():
    """(busy, total) jiffies of all CPUs so far (/proc/stat): the share of the machine in
    use between two readings, whoever used it (the machine may be shared)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


class ThrowawayPostgres:
    """A PostgreSQL cluster in a temporary folder, stopped and removed on exit."""

    def __init__(self, durable=True, max_connections=200):
        self.durable = durable
        self.max_connections = max_connections
        self.base = None
        self.as_user = []
        self.keep_log = None  # a path: the server's log is copied there when it stops

    def __enter__(self):
        initdb, pg_ctl = pg_tool("initdb"), pg_tool("pg_ctl")
        self.pg_ctl = pg_ctl
        self.base = tempfile.mkdtemp(prefix="fleetid-bench-pg-")
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            user = "postgres" if _user_exists("postgres") else "nobody"
            os.chmod(self.base, 0o755)
            os.chown(self.base, pwd.getpwnam(user).pw_uid, -1)
            self.as_user = ["runuser", "-u", user, "--"]
        self.data = os.path.join(self.base, "data")
        subprocess.run(self.as_user + [initdb, "--no-sync", "-D", self.data, "-A", "trust",
                                       "-U", USER], check=True, capture_output=True,
                       timeout=120)
        options = "-k %s -c listen_addresses='' -c max_connections=%d" % (
            self.base, self.max_connections)
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off"
        subprocess.run(self.as_user + [pg_ctl, "-D", self.data, "-w", "-l",
                                       os.path.join(self.base, "log"), "-o", options, "start"],
                       check=True, capture_output=True, timeout=60)
        self.new_database(DATABASE)
        self.uri = "postgresql://%s@/%s?host=%s" % (USER, DATABASE, self.base)
        return self

    @property
    def admin_conninfo(self):
        """libpq conninfo of the cluster's maintenance database (postgres)."""
        return "host=%s user=%s dbname=postgres" % (self.base, USER)

    def new_database(self, name=None, template=None):
        """CREATE DATABASE `name` (a fresh random one by default), a copy of `template`
        when given.  Returns its libpq conninfo."""
        import psycopg

        name = name or "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_conninfo, autocommit=True) as conn:
            conn.execute("CREATE DATABASE %s%s" % (name, " TEMPLATE " + template
                                                   if template else ""))
        return self.admin_conninfo.replace("dbname=postgres", "dbname=" + name)

    def __exit__(self, *exc):
        subprocess.run(self.as_user + [self.pg_ctl, "-D", self.data, "-m", "immediate",
                                       "stop"], capture_output=True, timeout=60)
        if self.keep_log:
            shutil.copyfile(os.path.join(self.base, "log"), self.keep_log)
        shutil.rmtree(self.base, ignore_errors=True)
        return False

    def postmaster_pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline())

    def cpu_seconds(self):
        """CPU seconds of the postmaster and every process it started (backends, the WAL
        writer, the checkpointer ...) so far.  Backends that exited are not counted:
        compare two readings taken while the same connections are open."""
        return sum(process_tree_cpu_seconds(self.postmaster_pid()).values())
