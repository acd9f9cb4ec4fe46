"""Background jobs with progress for the console: one thread per job, one job of a kind at a time.

A job reports ``progress`` in [0, 1] and a message; the console polls :meth:`Jobs.list`. :class:`TqdmWatcher`
turns the tqdm bars a long organ call opens (embedding, training) into that progress, with no callback needed.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from chatbot.errors import InvalidInputError

log = logging.getLogger(__name__)

Report = Callable[[float, str], None]


@dataclass
class Job:
    """A background operator job.

    Attributes:
        kind: ``reindex`` | ``train`` | ...
        status: ``running`` | ``done`` | ``failed``.
        progress: fraction done in [0, 1].
        message: the latest progress message (or the error).
        result: what the job returned (JSON-able) when done.
    """

    id: str
    kind: str
    user: str | None
    status: str = "running"
    progress: float = 0.0
    message: str = "starting"
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: dict | None = None

    def as_dict(self) -> dict:
        end = self.finished_at or time.time()
        return {"id": self.id, "kind": self.kind, "user": self.user, "status": self.status,
                "progress": round(self.progress, 4), "message": self.message,
                "started_at": _dt.datetime.fromtimestamp(self.started_at, _dt.timezone.utc).isoformat(),
                "elapsed_s": round(end - self.started_at, 1), "result": self.result}


class Jobs:
    """Background jobs of one app (kept in memory; the newest 50)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, fn: Callable[[Report], dict | None], user: str | None = None) -> Job:
        """Run ``fn(report)`` in a thread as a job of ``kind``.

        Raises:
            InvalidInputError: a job of this kind is still running.
        """
        with self._lock:
            for j in self._jobs.values():
                if j.kind == kind and j.status == "running":
                    raise InvalidInputError(f"a {kind} job ({j.id}) is still running; wait for it to finish")
            job = Job(uuid.uuid4().hex[:12], kind, user)
            self._jobs[job.id] = job
            while len(self._jobs) > 50:
                self._jobs.pop(next(iter(self._jobs)))

        def report(progress: float, message: str) -> None:
            job.progress = min(1.0, max(job.progress, float(progress)))
            job.message = message

        def run() -> None:
            try:
                job.result = fn(report) or {}
                job.status, job.progress = "done", 1.0
                job.message = job.result.get("summary", "done") if isinstance(job.result, dict) else "done"
            except Exception as exc:  # a job's failure is shown in the console, not raised anywhere
                log.exception("%s job %s failed", kind, job.id)
                job.status, job.message = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                job.finished_at = time.time()

        threading.Thread(target=run, name=f"job-{kind}-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        return self._jobs.get(job_id)

    def list(self, kind: str | None = None) -> list[Job]:
        """Jobs, newest first (only of ``kind`` when given)."""
        jobs = [j for j in self._jobs.values() if kind is None or j.kind == kind]
        return sorted(jobs, key=lambda j: j.started_at, reverse=True)

    def wait(self, job_id: str, timeout: float = 600.0) -> Job:
        """Block until the job has finished (tests, CLI).

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self._jobs[job_id]
            if j.status != "running":
                return j
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still running after {timeout} s")


class TqdmWatcher:
    """Reads the progress of the tqdm bars that are open while a job runs (no callback needed)."""

    def __init__(self, report: Report, lo: float, hi: float, label: str) -> None:
        self.report, self.lo, self.hi, self.label = report, lo, hi, label
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from tqdm import tqdm

        while not self._stop.wait(0.3):
            bars = [b for b in list(getattr(tqdm, "_instances", [])) if getattr(b, "total", None)]
            if not bars:
                continue
            b = bars[-1]
            frac = min(1.0, b.n / b.total) if b.total else 0.0
            desc = (b.desc or self.label).rstrip(": ")
            self.report(self.lo + (self.hi - self.lo) * frac, f"{desc}: {b.n}/{b.total}")

    def __enter__(self) -> "TqdmWatcher":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join(timeout=2)
