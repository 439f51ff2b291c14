"""Run one ``kd`` command in this process with a SIGKILL armed before its Nth filesystem change.

A helper of ``tests/test_faults.py`` and ``benchmarks/bench_faults.py`` (not a test module).

Why filesystem changes and not a timer: what a killed run leaves behind is decided by the
on-disk state at the moment it dies, and that state only changes at a file create, write,
rename, link, mkdir or delete. Killing the process just before its Nth such change, for N
drawn over every change a run makes, therefore reaches every state a SIGKILL at a random
time can leave (random wall-clock kills would land in compute almost always and hit a
one-millisecond commit window almost never), and ``tear`` adds the torn write: half of the
bytes written, then the kill. Nothing in kd is modified: the wrappers below are installed in
this process only, so the code under test is the shipped code and costs nothing in
production.

Processes: ``serve`` (``python tests/fault_child.py --serve``) is a zygote that imports kd,
torch and transformers once and forks one child per job, so a kill trial costs about a second
instead of the ~5 s import; each child runs the real CLI (``kd.cli.app``) in a fresh process
and dies by a real SIGKILL. ``python tests/fault_child.py JOB.json`` runs one job directly.

Each change under one of the job's ``watch`` folders is an event, labelled by the kd function
that made it (``shard data``, ``shard commit``, ``checkpoint write``, ``checkpoint pointer``,
...; ``refresh/`` in front when it happened inside an on-policy refresh round). The event log
(every event, or the one that killed) is written as JSON for the parent to read.

Job (a dict): ``argv`` (the kd CLI arguments), ``watch`` (folders), ``kill_at`` (1-based event
index or None; with ``kill_label`` (and ``kill_kind``) it counts only the changes with that label
(and kind)), ``tear`` (bool), ``log`` (path of the JSON event log), ``output`` (path that
receives stdout and stderr), ``threads`` (torch threads).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import sys

KD_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_real = {"open": builtins.open, "replace": os.replace, "rename": os.rename, "link": os.link,
         "mkdir": os.mkdir, "unlink": os.unlink, "remove": os.remove, "rmdir": os.rmdir,
         "rmtree": shutil.rmtree}


def _label() -> str:
    """The kd function making the current change, as a short name (see the module docstring)."""
    import threading

    frame, where, refresh = sys._getframe(2), None, False
    if threading.current_thread() is not threading.main_thread():
        # zarr writes from its I/O thread while the main thread waits inside kd's call
        frame = sys._current_frames().get(threading.main_thread().ident, frame)
    while frame is not None:
        path, fn = frame.f_code.co_filename, frame.f_code.co_name
        if path.startswith(KD_ROOT) and "/tests/" not in path and "/.venv/" not in path:
            base = os.path.basename(path)
            if fn in ("write_round", "_sync_round"):
                refresh = True
            if where is None:
                where = _name(base, fn)  # None: the caller names the change
        frame = frame.f_back
    return ("refresh/" if refresh else "") + (where or "other")


def _name(base: str, fn: str) -> str | None:
    if base == "cache.py":
        if "commit" in fn:
            return "shard commit"
        return {"write_shard": "shard data", "put": "shard data", "_upload": "shard data",
                "create": "cache create"}.get(fn, f"cache {fn}")
    if base == "checkpoint.py":
        return {"save_checkpoint": "checkpoint write", "_write_pointer": "checkpoint pointer",
                "prune_checkpoints": "checkpoint cleanup", "discard_checkpoints_after": "checkpoint cleanup",
                "_fsync_tree": "checkpoint write"}.get(fn, f"checkpoint {fn}")
    if base == "remote.py":
        if "exclusive" in fn:  # a shard's commit record, or the cache's root metadata at creation
            return None
        return "shard commit" if "commit" in fn else f"remote {fn}"
    if base == "run.py" and fn in ("write", "__init__"):
        return "metrics"
    if base in ("run.py", "refresh.py") and fn in ("_run", "write_run_file"):
        return "run files"
    return f"{base[:-3]} {fn}"


class Injector:
    def __init__(self, job: dict):
        self.watch = [os.path.abspath(w) + os.sep for w in job["watch"]]
        self.kill_at, self.tear, self.log_path = job.get("kill_at"), bool(job.get("tear")), job.get("log")
        # kill at the nth change with this label (and kind): stable where concurrent writes reorder changes
        self.kill_label, self.kill_kind = job.get("kill_label"), job.get("kill_kind")
        self.count, self.matching, self.events, self.in_rmtree = 0, 0, [], False

    def watched(self, *paths) -> bool:
        for p in paths:
            if isinstance(p, int) or p is None:
                continue
            p = os.path.abspath(os.fsdecode(p)) + os.sep
            if any(p.startswith(w) for w in self.watch):
                return True
        return False

    def event(self, kind: str, path, tear=None) -> None:
        """Count one change; at the armed index, (optionally tear, then) SIGKILL this process."""
        self.count += 1
        record = {"i": self.count, "kind": kind, "label": _label(), "path": os.fsdecode(path)}
        if self.kill_at is None:
            self.events.append(record)
            return
        if self.kill_label is not None:
            if record["label"] != self.kill_label or self.kill_kind not in (None, kind):
                return
            self.matching += 1
        if (self.matching if self.kill_label is not None else self.count) == self.kill_at:
            if self.tear and tear is not None:
                tear()
                record["torn"] = True
            self.events.append(record)
            self.dump()
            os.kill(os.getpid(), signal.SIGKILL)

    def dump(self) -> None:
        if self.log_path:
            with _real["open"](self.log_path, "w") as f:
                json.dump({"events": self.events, "count": self.count}, f)

    # ------------------------------------------------------------ wrappers
    def install(self) -> None:
        inj = self

        def wrap_path_op(kind, real, n_paths=1, changes=None):
            """``real`` counted as a change when it touches a watched path (and would change it)."""
            def op(*args, **kwargs):
                if kwargs.get("dir_fd") is not None:
                    if inj.in_rmtree:
                        inj.event(kind, args[0])
                elif inj.watched(*args[:n_paths]) and (changes is None or changes(args[0])):
                    inj.event(kind, args[0] if n_paths == 1 else args[1])
                return real(*args, **kwargs)
            return op

        os.replace = wrap_path_op("rename", _real["replace"], 2)
        os.rename = wrap_path_op("rename", _real["rename"], 2)
        os.link = wrap_path_op("link", _real["link"], 2)
        for name, kind, changes in (("mkdir", "mkdir", lambda p: not os.path.isdir(p)),
                                    ("unlink", "delete", os.path.lexists), ("remove", "delete", os.path.lexists),
                                    ("rmdir", "delete", os.path.isdir)):
            setattr(os, name, wrap_path_op(kind, _real[name], changes=changes))

        def rmtree(path, *args, **kwargs):
            if not inj.watched(path):
                return _real["rmtree"](path, *args, **kwargs)
            inj.event("delete", path)
            outer, inj.in_rmtree = inj.in_rmtree, True
            try:
                return _real["rmtree"](path, *args, **kwargs)
            finally:
                inj.in_rmtree = outer

        shutil.rmtree = rmtree

        def open_(file, mode="r", *args, **kwargs):
            writing = isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+")
            if not (writing and inj.watched(file)):
                return _real["open"](file, mode, *args, **kwargs)
            inj.event("create", file)
            return _Writer(_real["open"](file, mode, *args, **kwargs), file, inj)

        builtins.open = io.open = open_


class _Writer:
    """A file opened for writing: every write() is an event (torn: half of it lands first)."""

    def __init__(self, f, path, inj: Injector):
        self._f, self._path, self._inj = f, path, inj

    def write(self, data):
        def tear():
            self._f.write(data[: len(data) // 2])
            self._f.flush()
        self._inj.event("write", self._path, tear if len(data) > 1 else None)
        return self._f.write(data)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def main(job: dict) -> None:
    """Run ``kd <argv>`` with the injector of ``job``; exit with the CLI's exit code."""
    if job.get("output"):
        fd = os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    import torch

    torch.set_num_threads(int(job.get("threads", 1)))
    from kd.cli import app

    inj = Injector(job)
    inj.install()
    code = 0
    try:
        app(args=list(job["argv"]), prog_name="kd")  # click's standalone mode: always SystemExit
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # a traceback: anything but kd's own errors is a bug
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        inj.dump()
    os._exit(code)


PRELOAD = ("torch", "transformers", "transformers.models.llama.modeling_llama", "datasets", "zarr",
           "kd.cli", "kd.stages.models", "kd.stages.generate.run", "kd.stages.generate.hf_backend",
           "kd.stages.train.run", "kd.storage.cache", "kd.storage.verify")


def serve() -> None:
    """A zygote: import kd and its heavy dependencies once, then fork one child per job.

    Reads one JSON line per request on stdin (a list of jobs, run at the same time) and answers
    one JSON line: their exit statuses (-9 for a SIGKILL; "timeout" after ``timeout_s``, then
    killed). Forking from here saves the ~5 s import of every child and starts no threads
    before the fork (only imports run here).
    """
    import importlib
    import time

    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout
    sys.stdout = sys.stderr  # children write to their own files; the answer line is ours alone
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pids = []
        for job in request["jobs"]:
            pid = os.fork()
            if pid == 0:
                try:
                    main(job)
                finally:
                    os._exit(1)
            pids.append(pid)
        deadline, status = time.time() + float(request.get("timeout_s", 600)), {}
        while len(status) < len(pids):
            for pid in pids:
                if pid in status:
                    continue
                done, code = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[pid] = -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)
                elif time.time() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status[pid] = "timeout"
            time.sleep(0.005)
        print(json.dumps({"rc": [status[p] for p in pids]}), file=out, flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        with open(sys.argv[1]) as f:
            main(json.load(f))
