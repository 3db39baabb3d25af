"""Running a sweep: one Optuna study as the ledger, workers that take one point at a time, recovery of cut-off trials.

Why a sweep stays exact when it is killed at any moment or run by several workers:

- A point is done only when a trial for it is COMPLETE, and a trial is told COMPLETE only after its
  run directory holds summary.json (written atomically by `train_run`).
- Grid points are handed out by Optuna's GridSampler. A cut-off trial is put back in the study's
  queue as a WAITING copy; taking a queued trial is atomic in the storage.
- A RUNNING trial is known dead when the lock file of its worker on this host is free (the kernel
  drops a flock when a process dies, even by kill -9), or, for workers on other hosts, when its
  heartbeat is stale (`RDBStorage(heartbeat_interval=...)`).
- Before training, a worker gives way if the point is complete, or if a queued or live trial with a
  lower number holds it, and it takes a per-point file lock; so no two workers train one point.
- Rerunning a cut-off point resumes its run directory from last.pt, or starts it again if no epoch
  had finished; a run that finished but was never recorded is recorded from its summary.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import multiprocessing
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from kmnist import __version__, runs
from kmnist.config import same_experiment
from kmnist.data import selection_metric
from kmnist.errors import KmnistError, KmnistWarning, exception_chain, interrupted
from kmnist.files import machine_error
from kmnist.sweep_spec import (SEED, SweepSpec, check_points, corner_points, grid_points, planned_points,
                               format_value, point_config, search_space, trial_name)

SWEEP_FILE = "sweep.json"
DATABASE = "optuna.db"
TRIALS = "trials"  # run directories, one per point: <out>/trials/<trial name>/
LOCKS = ".locks"  # one lock file per point: held while a worker trains it
WORKERS = ".workers"  # one lock file per live worker: free once the worker is gone
STORAGE_LOCK = ".storage.lock"  # held while a process opens the study (its tables are created on first use)
UNCLAIMED_SECONDS = 300  # a RUNNING trial that never named its worker this long after starting is dead
POLL_SECONDS = 1.0  # how often idle workers and the progress display read the study
SAMPLING_PATIENCE = 20  # consecutive re-sampled points after which a worker stops asking a search for more
IDENTITY_KEYS = ("method", "axes", "seeds", "trials", "preset", "config")  # what makes two sweeps the same
HOST = socket.gethostname()


@dataclass(frozen=True)
class SweepPlacement:
    """Where and how a sweep runs; nothing here changes what a trial computes."""

    out: Path
    data_dir: Path
    storage: str | None = None  # an RDB URL shared by every worker; default: SQLite in `out`
    study: str | None = None  # the study's name in the storage; default: the name of `out`
    jobs: int = 1  # worker processes on this machine
    threads: int = 0  # torch threads per worker; 0: cores // jobs
    device: str | None = None
    eval_batch_size: int | None = None
    compile: str | None = None
    oversubscribe: bool = False  # allow jobs x threads > cores
    check_md5: bool = True
    heartbeat_seconds: int = 30  # workers on other hosts count as dead after 4 missed heartbeats
    retry_failed: bool = False  # run again points whose trial raised an error before this command started
    started: float = field(default_factory=time.time)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(Path(self.out) / DATABASE).resolve()}"

    @property
    def study_name(self) -> str:
        return self.study or Path(self.out).resolve().name

    def config_placement(self) -> dict[str, Any]:
        placement: dict[str, Any] = {"threads": self.threads}
        if self.device is not None:
            placement["device"] = self.device
        if self.eval_batch_size is not None:
            placement["eval_batch_size"] = self.eval_batch_size
        if self.compile is not None:
            placement["compile"] = self.compile
        return placement


# ---------------------------------------------------------------------------------------------
# workers per machine


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_workers(jobs: int, threads: int, runs_planned: int, oversubscribe: bool) -> tuple[int, int]:
    """(jobs, threads per worker): never more workers than runs, never more threads than cores unless told."""
    if jobs < 1:
        raise KmnistError(f"--jobs must be at least 1, got {jobs}")
    jobs = min(jobs, max(1, runs_planned))
    cores = available_cores()
    threads = threads or max(1, cores // jobs)
    if jobs * threads > cores and not oversubscribe:
        raise KmnistError(f"--jobs {jobs} x {threads} threads per worker = {jobs * threads} threads, more than the "
                          f"{cores} cores here; lower --jobs or --threads, or pass --oversubscribe")
    return jobs, threads


# ---------------------------------------------------------------------------------------------
# storage and study


def redact(url: str) -> str:
    """A storage URL without its password, for messages and files."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def quiet_optuna() -> None:
    """Optuna's per-trial log lines would drown the progress display; errors are recorded on each trial instead."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def open_storage(url: str, heartbeat_seconds: int):
    import optuna

    # SQLite: seconds a worker waits for another's write lock before failing (several workers share one file).
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                                              grace_period=4 * heartbeat_seconds)
    except Exception as error:  # bad URL, missing database driver, unreachable server
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KmnistError(f"cannot open sweep storage {redact(url)}: {reason[:200]}") from None


def sampler_seed(spec: SweepSpec, trials_before: int = 0) -> int:
    """The seed of this process's search sampler, from the sweep's first training seed, the worker (each worker
    of a parallel sweep draws its own sequence, else they would draw alike) and the trials the study held when
    the worker started (Optuna keeps no sampler state: a continued search must not draw its first points
    again). So a new search with --jobs 1 samples the same points every time."""
    import multiprocessing

    name = multiprocessing.current_process().name  # kmnist-sweep-N for worker N (run_sweep names them)
    worker = int(name.rsplit("-", 1)[1]) if name.startswith("kmnist-sweep-") else 0
    return hash((spec.seeds[0], worker, trials_before)) % 2**32  # ints hash alike in every process


def make_sampler(spec: SweepSpec, trials_before: int = 0):
    import optuna

    if spec.method == "grid":
        # The same seed in every worker, so a grid id names the same point everywhere.
        return optuna.samplers.GridSampler(search_space(spec), seed=0)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=sampler_seed(spec, trials_before))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: parallel workers do not all try one region
        return optuna.samplers.TPESampler(constant_liar=True, seed=sampler_seed(spec, trials_before))


def identity(spec: SweepSpec) -> dict[str, Any]:
    data = json.loads(json.dumps(spec.to_dict()))
    return {key: data[key] for key in IDENTITY_KEYS}


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    return ", ".join(key for key in IDENTITY_KEYS if saved.get(key) != wanted.get(key)) or "?"


def storage_failure(error: BaseException, placement: SweepPlacement) -> KmnistError | None:
    """One line for a sweep database that could not be read or written (read-only, full disk, locked too
    long), or None for any other error."""
    try:
        import optuna
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # no sweep ran, so no database refused anything
        return None
    if not isinstance(error, (optuna.exceptions.StorageInternalError, SQLAlchemyError)):
        return None
    *_, innermost = exception_chain(error)  # the database's own words (sqlite3: "attempt to write a readonly ...")
    reason = (str(innermost).strip().splitlines() or [type(innermost).__name__])[0]
    return KmnistError(f"sweep storage {redact(placement.storage_url)}: {reason[:200]}; the same command "
                       "continues the sweep once it can be written")


def connect(spec: SweepSpec, placement: SweepPlacement) -> tuple[Any, Any]:
    """The storage and the study, opened one process at a time: two sweeps starting together on a new database
    would both create its tables, and one would fail."""
    path = Path(placement.out) / STORAGE_LOCK
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        storage = open_storage(placement.storage_url, placement.heartbeat_seconds)
        return storage, open_study(spec, placement, storage)


def open_study(spec: SweepSpec, placement: SweepPlacement, storage):
    import optuna

    try:
        study = optuna.create_study(storage=storage, sampler=make_sampler(spec), study_name=placement.study_name,
                                    direction="maximize", load_if_exists=True)
    except Exception as error:
        failure = storage_failure(error, placement)
        if failure is None:
            raise
        raise failure from None
    if spec.method != "grid":  # a continued search draws on from where it stands, not from its first points
        study.sampler = make_sampler(spec, len(study.get_trials(deepcopy=False)))
    saved, wanted = study.user_attrs.get("kmnist_sweep"), identity(spec)
    if saved is None:
        study.set_user_attr("kmnist_sweep", wanted)
    elif saved != wanted:
        raise KmnistError(f"study {placement.study_name!r} in {redact(placement.storage_url)} holds a different "
                          f"sweep (it differs in {differences(saved, wanted)}); give this one another --study")
    return study


def check_same_sweep(spec: SweepSpec, out: Path) -> bool:
    """Whether `out` already holds this sweep (False: none yet); a one-line error if it holds another."""
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        return False
    saved, wanted = runs.read_record(path).get("spec", {}), identity(spec)
    if {key: saved.get(key) for key in IDENTITY_KEYS} != wanted:
        raise KmnistError(f"{out} holds a different sweep (it differs in {differences(saved, wanted)}); "
                          "continue it with the command that started it, or choose another --out")
    return True


def record_sweep(spec: SweepSpec, placement: SweepPlacement) -> None:
    """Write sweep.json, or check that the sweep already in `out` is this one."""
    path = Path(placement.out) / SWEEP_FILE
    if check_same_sweep(spec, placement.out):
        return
    runs.write_json(path, {"spec": spec.to_dict(), "study": placement.study_name,
                           "storage": redact(placement.storage_url), "kmnist": __version__,
                           "started_by": " ".join(sys.argv)})


# ---------------------------------------------------------------------------------------------
# locks


@contextmanager
def worker_lock(out: Path, worker_id: str) -> Iterator[None]:
    """Hold <out>/.workers/<id>.lock while this worker lives; a free lock means a dead worker."""
    path = Path(out) / WORKERS / f"{worker_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def try_lock(path: Path) -> IO | None:
    """An exclusive lock on `path`, or None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def release(handle: IO) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def lock_is_held(path: Path) -> bool:
    handle = try_lock(path)
    if handle is None:
        return True
    release(handle)
    return False


# ---------------------------------------------------------------------------------------------
# the ledger: what the study's trials say about each point


def objective_value(summary: dict[str, Any]) -> float:
    """What Optuna maximises: the validation score that chose the run's epoch (balanced accuracy for K49),
    or training accuracy for runs without a validation split."""
    key = "best_val_bal_acc" if summary.get("selected_on") == "val_bal_acc" else "best_val_acc"
    value = summary.get(key)
    return float(value if value is not None else summary["final_train_acc"])


def epoch_value(row: dict[str, Any], column: str) -> float:
    """The epoch's validation score in `column`; its training accuracy when nothing is held out."""
    value = row[column]
    return float(row["train_acc"] if value != value else value)  # NaN without a validation split


@dataclass
class Ledger:
    """The state of every point, read from the study's trials."""

    spec: SweepSpec
    points: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial name -> point, all planned so far
    complete: dict[str, Any] = field(default_factory=dict)  # the first COMPLETE trial of each point
    failed: dict[str, Any] = field(default_factory=dict)  # the trial whose error ended a point
    lost: dict[str, Any] = field(default_factory=dict)  # the latest cut-off trial (killed, interrupted, stale)
    queued: dict[str, list[Any]] = field(default_factory=dict)
    running: dict[str, list[Any]] = field(default_factory=dict)
    lost_unplaced: list[Any] = field(default_factory=list)  # cut off before the point was known; not yet rerun
    failed_unplaced: list[Any] = field(default_factory=list)  # raised an error before the point was known
    waiting_count: int = 0
    running_count: int = 0
    grid_ids: set[int] = field(default_factory=set)  # GridSampler grid ids some trial has taken
    origins: int = 0  # searches: points sampled so far

    def finished(self, key: str) -> bool:
        return key in self.complete or key in self.failed

    def done(self, sampling_open: bool = True) -> bool:
        if not all(self.finished(key) for key in self.points):
            return False
        if self.spec.method == "grid":
            return True
        return self.origins >= (self.spec.trials or 0) or not sampling_open

    def claimable(self, sampling_open: bool = True) -> bool:
        """Whether asking the study for a trial may give this worker a point to run."""
        if self.waiting_count:
            return True
        if self.spec.method == "grid":
            return len(self.grid_ids) < len(self.points)
        return sampling_open and self.origins < (self.spec.trials or 0)


def retryable_error(trial: Any, placement: SweepPlacement) -> bool:
    if not placement.retry_failed or trial.datetime_complete is None:
        return False
    return trial.datetime_complete < datetime.datetime.fromtimestamp(placement.started)


def read_ledger(spec: SweepSpec, trials: list[Any], placement: SweepPlacement) -> Ledger:
    from optuna.trial import TrialState

    ledger = Ledger(spec)
    if spec.method == "grid":
        ledger.points = {trial_name(spec, point): point for point in grid_points(spec)}
    rerun = {t.system_attrs.get("retry_of") for t in trials}
    for t in trials:
        if "grid_id" in t.system_attrs:
            ledger.grid_ids.add(t.system_attrs["grid_id"])
        ledger.waiting_count += t.state == TrialState.WAITING
        ledger.running_count += t.state == TrialState.RUNNING
        key = t.user_attrs.get("point")
        if t.user_attrs.get("skipped"):
            continue
        if key is None:
            if t.state == TrialState.FAIL and "error" in t.user_attrs:
                ledger.failed_unplaced.append(t)
            elif t.state == TrialState.FAIL and t.number not in rerun and spec.method == "grid":
                ledger.lost_unplaced.append(t)
            continue
        if t.user_attrs.get("origin"):
            ledger.origins += 1
            params = {name: t.params[name] for name in spec.swept_names}
            for seed in spec.seeds:
                point = {**params, SEED: seed}
                ledger.points.setdefault(trial_name(spec, point), point)
        if t.state == TrialState.COMPLETE:
            ledger.complete.setdefault(key, t)
        elif t.state == TrialState.WAITING:
            ledger.queued.setdefault(key, []).append(t)
        elif t.state == TrialState.RUNNING:
            ledger.running.setdefault(key, []).append(t)
        elif t.state == TrialState.FAIL:
            if "error" in t.user_attrs and not retryable_error(t, placement):
                ledger.failed[key] = t
            else:
                ledger.lost[key] = t
    for key in ledger.complete:  # failed once, then run again with --retry-failed and completed: complete
        ledger.failed.pop(key, None)
        ledger.lost.pop(key, None)
    return ledger


# ---------------------------------------------------------------------------------------------
# a worker


class Worker:
    """Takes points from the study one at a time and trains each into its run directory, until none is left."""

    def __init__(self, spec: SweepSpec, placement: SweepPlacement, datasets: dict[str, Any] | None = None):
        self.spec, self.placement = spec, placement
        self.out = Path(placement.out)
        self.identity = {"host": HOST, "pid": os.getpid(), "id": f"{HOST}-{os.getpid()}-{secrets.token_hex(4)}"}
        self.storage, self.study = connect(spec, placement)
        self.datasets = dict(datasets or {})
        self.held: IO | None = None  # the point lock, held from the claim until Optuna has recorded the result
        self.ran = False  # whether the last trial asked for was this worker's to run
        self.stopped_by: BaseException | None = None  # the machine's error that ended the last trial, if any
        self.run_dir: Path | None = None
        self.sampling_open = True
        self.resampled = 0

    def run(self) -> None:
        with worker_lock(self.out, self.identity["id"]):
            while True:
                ledger = self.reconcile()
                if ledger.done(self.sampling_open):
                    return
                if ledger.claimable(self.sampling_open):
                    if not self.run_one():
                        time.sleep(POLL_SECONDS * (0.5 + secrets.randbelow(100) / 100))
                elif ledger.running_count:
                    time.sleep(POLL_SECONDS)  # the rest is running elsewhere; take it over if its worker dies
                else:
                    return  # nothing left to run: what is unfinished ended in errors before its point was known

    def run_one(self) -> bool:
        """Ask the study for one trial and run it; False when it turned out to be someone else's point."""
        import optuna

        self.ran = False
        self.stopped_by = None
        try:
            self.study.optimize(self.objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            pass  # another worker failed our trial as stale; a rerun resumes its run directory
        finally:
            if self.held is not None:
                release(self.held)
                self.held = None
        if self.stopped_by is not None:  # a full disk, a read-only folder: every other point would fail too
            failure = storage_failure(self.stopped_by, self.placement)
            if failure is not None:
                raise failure
            cause = machine_error(self.stopped_by)
            where = f"{cause.filename}: " if cause.filename else ""
            raise KmnistError(f"{where}{cause.strerror or cause}; the sweep stopped, and the same command continues it")
        return self.ran

    # --- keeping the ledger whole ----------------------------------------------------------------

    def is_live(self, trial: Any) -> bool:
        worker = trial.user_attrs.get("worker")
        if not worker:
            started = trial.datetime_start
            return started is None or (datetime.datetime.now() - started).total_seconds() < UNCLAIMED_SECONDS
        if worker.get("host") != HOST:
            return True  # other hosts: heartbeats decide (fail_stale_trials)
        path = self.out / WORKERS / f"{worker['id']}.lock"
        return not path.exists() or lock_is_held(path)

    def reconcile(self) -> Ledger:
        """Fail trials whose worker is gone and queue their points again; returns the ledger afterwards."""
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        dead = [t for t in trials if t.state == TrialState.RUNNING and not self.is_live(t)]
        for t in dead:
            try:  # the storage call Optuna's own fail_stale_trials makes; one worker wins, the rest raise
                self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
            if t.user_attrs.get("worker"):  # the dead worker's lock file has served its purpose
                (self.out / WORKERS / f"{t.user_attrs['worker']['id']}.lock").unlink(missing_ok=True)
        if dead:
            trials = self.study.get_trials(deepcopy=False)
        ledger = read_ledger(self.spec, trials, self.placement)
        queued = 0
        for key, point in ledger.points.items():
            if ledger.finished(key) or key in ledger.queued or key in ledger.running:
                continue
            if self.spec.method != "grid":
                params = {name: value for name, value in point.items() if name != SEED}
                self.study.enqueue_trial(params, user_attrs={"point": key, SEED: point[SEED]})
                queued += 1
            elif key in ledger.lost:
                self.requeue(ledger.lost[key])
                queued += 1
            # grid points never started are GridSampler's to hand out
        for t in ledger.lost_unplaced:
            self.requeue(t)
            queued += 1
        return read_ledger(self.spec, self.study.get_trials(deepcopy=False), self.placement) if queued else ledger

    def requeue(self, lost: Any) -> None:
        """Queue a WAITING copy of a cut-off grid trial: same parameters, same grid id."""
        import optuna
        from optuna.trial import TrialState

        keep = {k: lost.system_attrs[k] for k in ("grid_id", "search_space", "fixed_params") if k in lost.system_attrs}
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=lost.params, distributions=lost.distributions,
            user_attrs={k: lost.user_attrs[k] for k in ("point", SEED) if k in lost.user_attrs},
            system_attrs={**keep, "retry_of": lost.number}))

    # --- one trial -------------------------------------------------------------------------------

    def objective(self, trial: Any) -> float:
        import optuna

        self.run_dir = None
        try:
            return self.claim_and_run(trial)
        except (optuna.TrialPruned, optuna.exceptions.UpdateFinishedTrialError):
            raise  # skipped, or failed by another worker as stale: the rerun resumes the run directory
        except Exception as error:  # the point ends with this error (unless --retry-failed in a later command)
            if interrupted(error):  # a stop that a library turned into an error of its own: the point is unfinished
                raise KeyboardInterrupt from error
            if machine_error(error) is not None or storage_failure(error, self.placement) is not None:
                self.stopped_by = error  # not the point's fault: left unfinished, for the same command to resume
                raise
            message = (str(error).strip().splitlines() or [type(error).__name__])[0]
            trial.set_user_attr("error", f"{message[:500]}")
            if not isinstance(error, KmnistError):  # a bug: keep the whole traceback beside the run
                path = (self.run_dir / "sweep_error.txt" if self.run_dir is not None
                        else self.out / f"trial-{trial.number}-error.txt")
                runs.atomic_write_text(path, traceback.format_exc())
            raise

    def claim_and_run(self, trial: Any) -> float:
        import optuna

        trial.set_user_attr("worker", self.identity)
        fresh = "point" not in trial.user_attrs  # queued trials carry their point
        point = self.suggest(trial)
        key = trial_name(self.spec, point)
        trial.set_user_attr("point", key)
        trial.set_user_attr(SEED, point[SEED])
        if self.spec.method != "grid" and fresh:
            self.check_new_point(trial, key)
        if self.taken(trial, key):
            trial.set_user_attr("skipped", "the point belongs to another trial")
            raise optuna.TrialPruned()
        self.held = try_lock(self.out / LOCKS / f"{key}.lock")
        if self.held is None or self.taken(trial, key):  # re-checked under the lock: a holder records, then unlocks
            trial.set_user_attr("skipped", "another process on this machine holds the point")
            raise optuna.TrialPruned()
        self.ran = True
        self.run_dir = self.out / TRIALS / key
        trial.set_user_attr("run_dir", f"{TRIALS}/{key}")
        summary = self.train_or_recover(trial, point, self.run_dir)
        trial.set_user_attr("summary", summary)
        return objective_value(summary)

    def suggest(self, trial: Any) -> dict[str, Any]:
        point: dict[str, Any] = {}
        for axis in self.spec.axes:
            if not axis.is_range:
                point[axis.name] = trial.suggest_categorical(axis.name, list(axis.values))
            elif isinstance(axis.low, int) and isinstance(axis.high, int):
                point[axis.name] = trial.suggest_int(axis.name, axis.low, axis.high, log=axis.log)
            else:
                point[axis.name] = trial.suggest_float(axis.name, axis.low, axis.high, log=axis.log)
        if self.spec.method == "grid":
            point[SEED] = trial.suggest_categorical(SEED, list(self.spec.seeds))
        else:  # searches sample points; each point then runs once per seed
            point[SEED] = trial.user_attrs.get(SEED, self.spec.seeds[0])
        return point

    def check_new_point(self, trial: Any, key: str) -> None:
        """A freshly sampled search point: skip it if sampled before or past the budget, else it becomes an origin."""
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        origins = [t for t in trials if t.user_attrs.get("origin") and not t.user_attrs.get("skipped")]
        if any(t.user_attrs.get("point") == key for t in origins):
            self.resampled += 1
            self.sampling_open = self.resampled < SAMPLING_PATIENCE
            trial.set_user_attr("skipped", "sampled an earlier point again")
            raise optuna.TrialPruned()
        if sum(t.number < trial.number for t in origins) >= (self.spec.trials or 0):
            trial.set_user_attr("skipped", "past the --trials budget")
            raise optuna.TrialPruned()
        self.resampled = 0
        trial.set_user_attr("origin", True)

    def taken(self, trial: Any, key: str) -> bool:
        """Whether the point is done, or held by a queued or live trial with a lower number."""
        from optuna.trial import TrialState

        for other in self.study.get_trials(deepcopy=False):
            if other.number == trial.number or other.user_attrs.get("point") != key or other.user_attrs.get("skipped"):
                continue
            if other.state == TrialState.COMPLETE:
                return True
            if (other.state == TrialState.FAIL and "error" in other.user_attrs
                    and not retryable_error(other, self.placement)):
                return True
            if other.number < trial.number and (other.state == TrialState.WAITING
                                                or (other.state == TrialState.RUNNING and self.is_live(other))):
                return True
        return False

    def train_or_recover(self, trial: Any, point: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        from kmnist.runner import train_run

        if (run_dir / runs.SUMMARY).is_file():
            trial.set_user_attr("recovered", True)  # it finished before its worker could record it
            return runs.read_record(run_dir / runs.SUMMARY)
        config = point_config(self.spec, point, self.placement.config_placement())
        resume = (run_dir / runs.CONFIG).is_file()
        column = selection_metric(config.dataset)
        if resume:
            if not same_experiment(runs.read_record(run_dir / runs.CONFIG), config.to_dict()):
                raise KmnistError(f"{run_dir} holds a run of another configuration; move it away to rerun this point")
            trial.set_user_attr("resumed", True)
            if (run_dir / runs.METRICS).is_file():  # the trial's history shows every epoch, not only the new ones
                for row in runs.read_metrics(run_dir):
                    trial.report(epoch_value(row, column), row["epoch"])
        return train_run(config, run_dir, self.placement.data_dir, resume=resume, progress=False,
                         on_epoch=lambda row: trial.report(epoch_value(row, column), row["epoch"]),
                         dataset=self.dataset(config.dataset), check_md5=self.placement.check_md5)

    def dataset(self, name: str):
        from kmnist.data import load_dataset

        if name not in self.datasets:
            self.datasets[name] = load_dataset(name, self.placement.data_dir, check_md5=self.placement.check_md5,
                                               progress=False)
        return self.datasets[name]


def _exit_with_parent() -> None:
    """Linux: die with the sweep process, so kill -9 of the sweep stops its workers too (the sweep resumes later)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_process(spec_data: dict[str, Any], placement: SweepPlacement, parent: int) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    _exit_with_parent()
    if os.getppid() != parent:  # the sweep died before this worker was ready
        return
    from kmnist.runinfo import git_revision

    git_revision()  # read once, now: every trial's environment.json names the code this worker loaded

    quiet_optuna()
    try:
        Worker(SweepSpec.from_dict(spec_data), placement).run()
    except KmnistError as error:
        print(f"kmnist sweep worker: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except BaseException as error:
        if interrupted(error):
            sys.exit(130)
        failure = storage_failure(error, placement) if isinstance(error, Exception) else None
        if failure is None:
            raise
        print(f"kmnist sweep worker: error: {failure}", file=sys.stderr)
        sys.exit(failure.exit_code)


# ---------------------------------------------------------------------------------------------
# progress: trials done / total, best so far, time left


@dataclass
class Progress:
    """One reading of the study, for the progress display and the final result."""

    total: int
    done: int
    running: int
    epochs_total: float
    epochs_done: float
    best: dict[str, Any] | None
    failed: list[dict[str, Any]]


def best_setting(spec: SweepSpec, ledger: Ledger) -> dict[str, Any] | None:
    """The setting (a point without its seed) with the best mean validation score over its finished seeds.

    The mean, not the best single run: with several seeds the luckiest seed would flatter its setting.
    Its test accuracies are the means over the same runs, at each run's validation-chosen epoch.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, t in ledger.complete.items():
        point = ledger.points.get(key)
        if point is None:  # not planned by this ledger: its run name stands for it
            setting = key
        else:
            setting = ",".join(f"{name}={format_value(point[name])}" for name in spec.swept_names) or "the one setting"
        groups.setdefault(setting, []).append(t.user_attrs.get("summary") or {})
    best = None
    for setting, summaries in groups.items():
        value = sum(map(objective_value, summaries)) / len(summaries)
        if best is None or value > best["value"]:
            mean = {}
            for name in ("test_acc_at_best_val", "test_bal_acc_at_best_val"):
                values = [summary[name] for summary in summaries if summary.get(name) is not None]
                mean[name] = sum(values) / len(values) if len(values) == len(summaries) else None
            mean["selected_on"] = summaries[0].get("selected_on")
            best = {"point": setting, "value": value, "runs": len(summaries), "summary": mean}
    return best


def read_progress(spec: SweepSpec, trials: list[Any], ledger: Ledger,
                  epochs_per_point: Callable[[dict], int]) -> Progress:
    planned = planned_points(spec)
    epochs_of = {key: epochs_per_point(point) for key, point in ledger.points.items()}
    mean_epochs = sum(epochs_of.values()) / len(epochs_of) if epochs_of else float(epochs_per_point({}))
    reported: dict[str, int] = {}
    for t in trials:
        key = t.user_attrs.get("point")
        if key is not None:
            reported[key] = max(reported.get(key, 0), len(t.intermediate_values))
    epochs_done = sum(epochs_of[key] if ledger.finished(key) else min(reported.get(key, 0), epochs_of[key])
                      for key in epochs_of)
    best = best_setting(spec, ledger)
    failed = [{"point": key, "error": t.user_attrs.get("error", "")} for key, t in sorted(ledger.failed.items())]
    failed += [{"point": f"(trial {t.number})", "error": t.user_attrs["error"]} for t in ledger.failed_unplaced]
    done = sum(ledger.finished(key) for key in ledger.points)
    return Progress(total=max(planned, len(ledger.points)), done=done, running=len(ledger.running),
                    epochs_total=sum(epochs_of.values()) + mean_epochs * max(0, planned - len(ledger.points)),
                    epochs_done=epochs_done, best=best, failed=failed)


class Monitor:
    """Reads the study every second: a progress bar, and one event per trial that ends while it watches."""

    def __init__(self, spec: SweepSpec, placement: SweepPlacement, progress: bool,
                 on_trial: Callable[[dict[str, Any]], None] | None):
        self.spec, self.placement, self.on_trial = spec, placement, on_trial
        self.storage, self.study = connect(spec, placement)
        self.epochs: dict[str, int] = {}
        self.seen: set[str] | None = None
        self.started = time.time()
        self.first: Progress | None = None
        self.bar = None
        self.show_bar = progress
        self.stop = threading.Event()

    def epochs_per_point(self, point: dict[str, Any]) -> int:
        key = json.dumps(point, sort_keys=True, default=str)
        if key not in self.epochs:
            if point:
                self.epochs[key] = point_config(self.spec, point).epochs
            else:
                self.epochs[key] = point_config(self.spec, corner_points(self.spec)[0]).epochs
        return self.epochs[key]

    def eta_seconds(self, progress: Progress) -> float | None:
        assert self.first is not None
        gained = progress.epochs_done - self.first.epochs_done
        if gained <= 0:
            return None
        return (time.time() - self.started) / gained * (progress.epochs_total - progress.epochs_done)

    def poll(self) -> Progress:
        trials = self.study.get_trials(deepcopy=False)
        ledger = read_ledger(self.spec, trials, self.placement)
        progress = read_progress(self.spec, trials, ledger, self.epochs_per_point)
        ended = {**{key: ("complete", t) for key, t in ledger.complete.items()},
                 **{key: ("failed", t) for key, t in ledger.failed.items() if key not in ledger.complete}}
        if self.seen is None:  # what had ended before this command is not news
            self.seen, self.first = set(ended), progress
            self.open_bar(progress)
        self.update_bar(progress)
        news = sorted(set(ended) - self.seen, key=lambda k: ended[k][1].datetime_complete or datetime.datetime.max)
        for count, key in enumerate(news, start=progress.done - len(news) + 1):
            self.seen.add(key)
            state, t = ended[key]
            if self.on_trial is not None:
                self.on_trial({"point": key, "state": state, "summary": t.user_attrs.get("summary"),
                               "error": t.user_attrs.get("error"), "resumed": bool(t.user_attrs.get("resumed")),
                               "run_dir": str(self.placement.out / TRIALS / key), "done": count,
                               "total": progress.total, "eta_seconds": self.eta_seconds(progress)})
        return progress

    def open_bar(self, progress: Progress) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=round(progress.epochs_total), initial=round(progress.epochs_done), unit="epoch",
                        desc="sweep", disable=None if self.show_bar else True, dynamic_ncols=True,
                        leave=False)  # None: no bar where stderr is not a terminal (a log file)

    def update_bar(self, progress: Progress) -> None:
        if self.bar is None:
            return
        self.bar.total = round(progress.epochs_total)
        self.bar.update(round(progress.epochs_done) - self.bar.n)
        best = ""
        if progress.best is not None:
            summary = progress.best["summary"]
            test = summary.get("test_acc_at_best_val")
            best = f" | best val {progress.best['value']:.2f}%" + (f" (test {test:.2f}%)" if test is not None else "")
        self.bar.set_description_str(f"trials {progress.done}/{progress.total} ({progress.running} running){best}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def watch(self) -> None:
        """Poll until `stop` is set (a thread beside an in-process worker)."""
        while not self.stop.wait(POLL_SECONDS):
            try:
                self.poll()
            except Exception:  # a busy database now and then must not end the display
                pass


# ---------------------------------------------------------------------------------------------
# the sweep


def checked_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """A grid's points, or a search's corners, each checked to build a valid configuration and model."""
    points = grid_points(spec) if spec.method == "grid" else corner_points(spec)
    check_points(spec, points)
    if spec.method != "grid" and any(point_config(spec, point).val_size == 0 for point in points):
        raise KmnistError(f"a {spec.method} search chooses points by validation accuracy; it needs --val-size > 0")
    return points


def describe(spec: SweepSpec) -> dict[str, Any]:
    """What a sweep would run, without running it; its points are checked as a real sweep checks them."""
    points = checked_points(spec)
    names = [trial_name(spec, point) for point in points] if spec.method == "grid" else []
    return {"method": spec.method, "axes": [axis.to_dict() for axis in spec.axes], "seeds": list(spec.seeds),
            "runs": planned_points(spec), "trial_names": names, "preset": spec.preset, "config": spec.config}


def prepare(spec: SweepSpec, placement: SweepPlacement) -> dict[str, Any]:
    """Check every point, the data and the sweep directory before any work; returns the loaded datasets."""
    from kmnist.data import check_val_size, load_dataset
    from kmnist.train import check_teacher, training_device

    points = checked_points(spec)
    configs = [point_config(spec, point) for point in points]
    for point in points:  # --device cuda without one, --compile cuda-graph on a CPU
        training_device(point_config(spec, point, placement.config_placement()))
    datasets = {name: load_dataset(name, placement.data_dir, check_md5=placement.check_md5, progress=False)
                for name in sorted({config.dataset for config in configs})}
    for config in configs:  # what every trial would fail on, found once
        check_val_size(config.val_size, len(datasets[config.dataset].train))
    with warnings.catch_warnings():  # each trial warns of a teacher's other validation split as it starts
        warnings.simplefilter("ignore", KmnistWarning)
        for config in {(c.teacher, c.dataset): c for c in configs if c.teacher}.values():  # once per teacher
            check_teacher(config)
    Path(placement.out).mkdir(parents=True, exist_ok=True)
    record_sweep(spec, placement)
    return datasets


def run_sweep(spec: SweepSpec, placement: SweepPlacement, progress: bool = True,
              on_trial: Callable[[dict[str, Any]], None] | None = None,
              on_start: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or continue) a sweep until every point has a result; returns how it ended."""
    quiet_optuna()
    if placement.heartbeat_seconds < 1:
        raise KmnistError(f"--heartbeat must be at least 1 second, got {placement.heartbeat_seconds}")
    jobs, threads = plan_workers(placement.jobs, placement.threads, planned_points(spec), placement.oversubscribe)
    placement = dataclasses.replace(placement, jobs=jobs, threads=threads, out=Path(placement.out))
    datasets = prepare(spec, placement)
    monitor = Monitor(spec, placement, progress, on_trial)
    first = monitor.poll()
    if on_start is not None:
        on_start({"out": str(placement.out), "study": placement.study_name, "storage": redact(placement.storage_url),
                  "total": first.total, "done": first.done, "jobs": jobs, "threads": threads})
    exit_codes: list[int] = []
    try:
        if jobs == 1:
            watcher = threading.Thread(target=monitor.watch, daemon=True)
            watcher.start()
            try:
                Worker(spec, placement, datasets).run()
            finally:
                monitor.stop.set()
                watcher.join()
        else:
            Worker(spec, placement).reconcile()  # once here, so the workers do not all queue the same reruns
            exit_codes = run_processes(spec, placement, monitor)
        final = monitor.poll()
    finally:
        monitor.close()
    return {"out": str(placement.out), "total": final.total, "done": final.done,
            "complete": final.done - len(final.failed), "failed": final.failed, "best": final.best,
            "worker_exit_codes": exit_codes, "seconds": time.time() - monitor.started}


def run_processes(spec: SweepSpec, placement: SweepPlacement, monitor: Monitor) -> list[int]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or open databases
    workers = [context.Process(target=worker_process, args=(spec.to_dict(), placement, os.getpid()),
                               name=f"kmnist-sweep-{index}") for index in range(placement.jobs)]
    for process in workers:
        process.start()
    try:
        while any(process.is_alive() for process in workers):
            try:
                monitor.poll()
            except Exception:
                pass
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        # Ctrl-C in a terminal reaches the workers too and they stop at once; `kill -INT <sweep>` does not, so
        # the ones still running after a moment get their own SIGINT (a second one would cut their cleanup).
        deadline = time.time() + 5
        for process in workers:
            process.join(timeout=max(0.0, deadline - time.time()))
        for process in workers:
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in workers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()  # the trial it ran is recovered by the next run, as after kill -9
        raise
    return [process.exitcode for process in workers]
