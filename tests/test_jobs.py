"""Training jobs in worker processes: run to end, graceful stop, kill -9, queue, owners, restart.

Real workers (`python -m finetune_core train`, bundled MiniLM, a few steps) check the outcomes that
matter: a finished run, a stopped run with a saved and evaluable model, a crashed worker reported
fast. A fake worker (a tiny script speaking the events.jsonl protocol) checks the queue mechanics
in well under a second each.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from finetune_core.jobs import JobError, JobManager, owner_key
from finetune_core.rundir import run_status_from_disk

REPO = Path(__file__).resolve().parents[1]
DOMAINS = str(REPO / "examples" / "data" / "domains.csv")


def cls_config(max_steps: int, **training) -> dict:
    return {"task": "classification", "model": "bundled:minilm-l6",
            "data": {"train": DOMAINS, "max_length": 64},
            "strategy": {"name": "lora"},
            "training": {"max_steps": max_steps, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no",
                         **training}}


def wait_for(predicate, timeout: float, step: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def events_of(job) -> list[dict]:
    path = job.run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def no_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def manager(tmp_path):
    mgr = JobManager(tmp_path / "runs", max_concurrent=1, stop_timeout=60, poll_interval=0.2, cwd=REPO)
    yield mgr
    mgr.shutdown(kill=True)


# ---------------------------------------------------------------------------------------------
# a fake worker: same command line and files as the real one, no model


FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    import yaml
    cfg = yaml.safe_load(open(sys.argv[-1]))
    out = cfg["output_dir"]
    behaviour = cfg["training"].get("run_name", "normal")   # tests pick the behaviour through run_name
    def emit(t, **kw):
        kw.update(type=t, time=time.time())
        with open(os.path.join(out, "events.jsonl"), "a") as f:
            f.write(json.dumps(kw) + "\\n")
    emit("info", message="Loading model fake ...")
    emit("start", step=0, max_steps=1000)
    for step in range(1, 1000):
        time.sleep(0.05)
        if behaviour != "ignore_stop" and os.path.exists(os.path.join(out, "STOP")):
            emit("end", step=step, max_steps=1000, message="stopped")
            sys.exit(0)
        emit("log", step=step, max_steps=1000, loss=1.0 / step)
    emit("end", step=1000, max_steps=1000, message="done")
""")


@pytest.fixture
def fake_manager(tmp_path):
    from conftest import worker_python

    mgr = JobManager(tmp_path / "runs", max_concurrent=1, stop_timeout=1.5, poll_interval=0.1,
                     python=worker_python(tmp_path, FAKE_WORKER), cwd=REPO)
    yield mgr
    mgr.shutdown(kill=True)


def fake_config(behaviour: str = "normal") -> dict:
    cfg = cls_config(10)
    cfg["training"]["run_name"] = behaviour
    return cfg


# ---------------------------------------------------------------------------------------------
# real workers


@pytest.mark.slow
def test_job_runs_to_end(manager):
    job = manager.submit(cls_config(3), owner="alice")
    assert len(job.run_id) == 16 and job.run_dir.parent == manager.runs_dir
    assert manager.wait(job.run_id, timeout=240) == "finished", (job.error, job.error_lines)
    for name in ("run.yaml", "events.jsonl", "metrics.json", "predictions.csv", "model", "worker.log",
                 "data/train_domains.csv"):
        assert (job.run_dir / name).exists(), name
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and 0 <= metrics["f1_weighted"] <= 1
    assert events_of(job)[-1]["type"] == "end"
    assert no_zombie(job.pid)
    info = json.loads((job.run_dir / "job.json").read_text())
    assert info["status"] == "finished" and info["owner"] == owner_key("alice") and "alice" not in json.dumps(info)


@pytest.mark.slow
def test_graceful_stop_leaves_saved_evaluable_model(manager):
    job = manager.submit(cls_config(400), owner="alice")
    assert wait_for(lambda: any(e["type"] == "log" for e in events_of(job)), 240), job.error_lines
    with pytest.raises(JobError, match="Only the browser session"):
        manager.stop(job.run_id, owner="bob")
    assert "Stop requested" in manager.stop(job.run_id, owner="alice")
    assert manager.get(job.run_id).status == "stopping"
    assert manager.wait(job.run_id, timeout=180) == "stopped", (job.error, job.error_lines)
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["stopped_by_user"] is True and metrics["global_step"] < 400
    assert not (job.run_dir / "STOP").exists()

    from finetune_core.generate import load_for_inference, predict_proba

    model, tok, info = load_for_inference(str(job.run_dir / "model"))
    probs = predict_proba(model, tok, "The court ruled in favour of the plaintiff.")
    assert set(probs) == {"finance", "legal", "medical", "technology"}
    assert abs(sum(probs.values()) - 1) < 1e-4


@pytest.mark.slow
def test_killed_worker_reported_within_5s_without_zombie(manager):
    job = manager.submit(cls_config(400), owner="alice")
    assert wait_for(lambda: events_of(job), 60), "worker never started"
    pid = job.pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    status = wait_for(lambda: manager.get(job.run_id).status == "failed", 5.0, step=0.05)
    elapsed = time.time() - t0
    assert status, f"not reported after {elapsed:.1f}s"
    assert elapsed < 5.0
    assert "SIGKILL" in job.error
    assert no_zombie(pid)
    st = manager.status(job.run_id)
    assert st["status"] == "failed" and st["error"] == job.error
    # ... with the worker's last log lines (the Train tab shows them under the error)
    log = [line for line in (job.run_dir / "worker.log").read_text().splitlines() if line.strip()]
    assert st["error_lines"] and st["error_lines"][-1] == log[-1]

    # the next job runs to the end
    nxt = manager.submit(cls_config(2), owner="alice")
    assert manager.wait(nxt.run_id, timeout=240) == "finished", (nxt.error, nxt.error_lines)
    assert (nxt.run_dir / "model").is_dir() and no_zombie(nxt.pid)
    assert manager.status(job.run_id)["status"] == "failed"      # the killed run stays reported as such


# ---------------------------------------------------------------------------------------------
# fake workers: queue, owners, hard kill, restart


def test_queue_position_and_owner(fake_manager):
    mgr = fake_manager
    a = mgr.submit(fake_config(), owner="alice")
    b = mgr.submit(fake_config(), owner="bob")
    c = mgr.submit(fake_config(), owner="alice")
    assert wait_for(lambda: mgr.get(a.run_id).status == "running", 5)
    assert mgr.position(a.run_id) == 0
    assert (mgr.position(b.run_id), mgr.position(c.run_id)) == (1, 2)
    assert mgr.status(c.run_id)["status"] == "queued"
    assert mgr.is_owner(b.run_id, "bob") and not mgr.is_owner(b.run_id, "alice")
    with pytest.raises(JobError):
        mgr.stop(b.run_id, owner="alice")
    with pytest.raises(JobError):
        mgr.stop(a.run_id, owner=None)
    assert "queue" in mgr.stop(b.run_id, owner="bob")          # a queued job is simply cancelled
    assert mgr.get(b.run_id).status == "cancelled"
    assert mgr.position(c.run_id) == 1
    mgr.stop(a.run_id, owner="alice")
    assert mgr.wait(a.run_id, timeout=10) == "stopped"
    assert wait_for(lambda: mgr.get(c.run_id).status == "running", 5)   # the next one starts by itself
    mgr.stop(c.run_id, owner="alice")
    assert mgr.wait(c.run_id, timeout=10) == "stopped"
    assert no_zombie(a.pid) and no_zombie(c.pid)


def test_queue_limit_per_session(fake_manager):
    mgr = fake_manager
    mgr.max_queued_per_owner = 2
    mgr.submit(fake_config(), owner="alice")
    mgr.submit(fake_config(), owner="alice")
    mgr.submit(fake_config(), owner="alice")
    with pytest.raises(JobError, match="waiting in the queue"):
        mgr.submit(fake_config(), owner="alice")


def test_one_active_run_per_owner_even_when_two_starts_race(fake_manager):
    """The Train tab's Start asks for one active run per session; the check sits under the lock that
    queues the job, so two Start clicks submitting at the same moment get one run and one OwnerBusy."""
    from finetune_core.jobs import OwnerBusy

    mgr = fake_manager
    outcomes, barrier = [], threading.Barrier(2)

    def start():
        barrier.wait()
        try:
            outcomes.append(mgr.submit(fake_config(), owner="alice", one_active_per_owner=True))
        except OwnerBusy as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    jobs = [o for o in outcomes if not isinstance(o, Exception)]
    busy = [o for o in outcomes if isinstance(o, OwnerBusy)]
    assert len(jobs) == 1 and len(busy) == 1 and busy[0].job.run_id == jobs[0].run_id
    assert [p.name for p in mgr.runs_dir.iterdir()] == [jobs[0].run_id]     # the refused run left no folder
    other = mgr.submit(fake_config(), owner="bob", one_active_per_owner=True)   # other sessions unaffected
    mgr.stop(jobs[0].run_id, owner="alice")
    mgr.stop(other.run_id, owner="bob")


def test_hard_kill_after_stop_timeout(fake_manager):
    mgr = fake_manager
    job = mgr.submit(fake_config("ignore_stop"), owner="alice")
    assert wait_for(lambda: events_of(job), 5)
    mgr.stop(job.run_id, owner="alice")
    assert mgr.wait(job.run_id, timeout=10) == "failed"
    assert job.killed and "did not stop" in job.error
    assert no_zombie(job.pid)


def test_restart_lists_runs_requeues_and_adopts(tmp_path, fake_manager):
    mgr = fake_manager
    done = mgr.submit(fake_config(), owner="alice")
    assert wait_for(lambda: events_of(done), 5)
    mgr.stop(done.run_id, owner="alice")
    assert mgr.wait(done.run_id, timeout=10) == "stopped"
    running = mgr.submit(fake_config(), owner="alice")
    queued = mgr.submit(fake_config(), owner="bob")
    assert wait_for(lambda: events_of(running), 5)
    mgr.shutdown(kill=False)                        # the app goes away; its worker keeps running

    again = JobManager(mgr.runs_dir, max_concurrent=1, stop_timeout=1.5, poll_interval=0.1, python=mgr.python,
                       cwd=REPO)
    try:
        rows = {r["run_id"]: r for r in again.list_runs("alice")}
        assert rows[done.run_id]["status"] == "stopped" and rows[done.run_id]["mine"]
        assert rows[running.run_id]["status"] == "running"           # reconnected through its pid
        assert rows[queued.run_id]["status"] == "queued" and not rows[queued.run_id]["mine"]
        assert again.position(queued.run_id) == 1
        again.stop(running.run_id, owner="alice")      # owner still recognised after the restart
        assert again.wait(running.run_id, timeout=10) == "stopped"
        assert wait_for(lambda: again.get(queued.run_id).status == "running", 5)
        again.stop(queued.run_id, owner="bob")
        assert again.wait(queued.run_id, timeout=10) == "stopped"
    finally:
        again.shutdown(kill=True)
        if running.proc is not None:
            running.proc.wait(timeout=10)              # reap the first app's child in this test process


def test_interrupted_run_detected(tmp_path):
    runs = tmp_path / "runs"
    cli_run = runs / "cli-run"                          # written by the CLI, no job.json, no end event
    cli_run.mkdir(parents=True)
    (cli_run / "events.jsonl").write_text(
        json.dumps({"type": "info", "time": 1.0, "message": "Loading model x"}) + "\n"
        + json.dumps({"type": "start", "time": 2.0, "step": 0, "max_steps": 10}) + "\n")
    app_run = runs / "0123456789abcdef"                # the app died with it running
    app_run.mkdir()
    (app_run / "events.jsonl").write_text(json.dumps({"type": "start", "time": 2.0}) + "\n")
    (app_run / "job.json").write_text(json.dumps({"run_id": app_run.name, "status": "running", "pid": 999999999,
                                                  "created": 3.0, "owner": owner_key("alice")}))
    finished = runs / "finished-run"
    finished.mkdir()
    (finished / "events.jsonl").write_text(json.dumps({"type": "start", "time": 1.0}) + "\n"
                                           + json.dumps({"type": "end", "time": 2.0}) + "\n")
    assert run_status_from_disk(cli_run)["status"] == "interrupted"
    mgr = JobManager(runs, poll_interval=0.2)
    try:
        rows = {r["run_id"]: r for r in mgr.list_runs()}
        assert rows["cli-run"]["status"] == "interrupted"
        assert rows[app_run.name]["status"] == "interrupted"
        assert rows["finished-run"]["status"] == "finished"
        assert json.loads((app_run / "job.json").read_text())["status"] == "interrupted"
        with pytest.raises(JobError):
            mgr.run_dir("../etc")
    finally:
        mgr.shutdown()


@pytest.mark.slow
def test_resume_button_path_continues_a_stopped_run_to_the_same_step(manager):
    from finetune_core.jobs import JobError

    config = cls_config(24, eval_strategy="steps", save_strategy="steps", eval_steps=4, save_steps=4)
    job = manager.submit(config, owner="alice")
    assert wait_for(lambda: (job.run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists(), 240)
    manager.stop(job.run_id, owner="alice")
    assert manager.wait(job.run_id, timeout=180) == "stopped", (job.error, job.error_lines)
    stopped_at = json.loads((job.run_dir / "metrics.json").read_text())["global_step"]
    assert stopped_at < 24
    with pytest.raises(JobError, match="Only the browser session"):
        manager.resume(job.run_id, owner="bob")
    resumed = manager.resume(job.run_id, owner="alice")
    assert manager.wait(resumed.run_id, timeout=240) == "finished", (resumed.error, resumed.error_lines)
    metrics = json.loads((job.run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 24                   # same end step as an uninterrupted run
    starts = [e for e in events_of(job) if e["type"] == "start"]
    assert len(starts) == 2 and starts[1]["step"] > 0     # the second attempt began at a checkpoint
    with pytest.raises(JobError, match="no complete checkpoint"):
        manager.resume(job.run_id, owner="alice")          # a finished run's checkpoints are cleaned up


def test_run_list_rereads_only_changed_runs(tmp_path, monkeypatch):
    """list_runs runs on every tab select: unchanged run folders are not parsed again, a changed
    events.jsonl, metrics.json or job.json is."""
    import finetune_core.rundir as rundir

    runs = tmp_path / "runs"
    for i in range(3):
        run = runs / f"run-{i}"
        run.mkdir(parents=True)
        (run / "events.jsonl").write_text("".join(json.dumps({"type": "log", "time": 1.0 + k, "step": k}) + "\n"
                                                  for k in range(200)))
        (run / "metrics.json").write_text(json.dumps({"task": "classification", "f1_weighted": 0.5}))
    mgr = JobManager(runs, poll_interval=60)
    reads = []
    real_events, real_json = rundir.read_events, rundir.read_json
    monkeypatch.setattr(rundir, "read_events", lambda path, offset=0: reads.append(Path(path).parent.name)
                        or real_events(path, offset))
    monkeypatch.setattr(rundir, "read_json", lambda path: reads.append(Path(path).parent.name) or real_json(path))
    try:
        first = {r["run_id"]: r for r in mgr.list_runs()}
        assert first["run-1"]["status"] == "interrupted" and first["run-1"]["f1_weighted"] == 0.5
        assert set(reads) == {"run-0", "run-1", "run-2"}
        reads.clear()
        assert mgr.list_runs() == sorted(first.values(), key=lambda r: -r["created"])
        assert reads == []                                           # nothing re-read

        run1 = runs / "run-1"
        with open(run1 / "events.jsonl", "a") as f:                  # run-1 ends, with a new metric
            f.write(json.dumps({"type": "end", "time": 500.0}) + "\n")
        (run1 / "metrics.json").write_text(json.dumps({"task": "classification", "f1_weighted": 0.75}))
        rows = {r["run_id"]: r for r in mgr.list_runs()}
        assert set(reads) == {"run-1"}
        assert rows["run-1"]["status"] == "finished" and rows["run-1"]["f1_weighted"] == 0.75
        assert rows["run-0"] == first["run-0"]

        reads.clear()
        (runs / "run-2" / "job.json").write_text(json.dumps({"run_id": "run-2", "name": "renamed"}))
        assert {r["run_id"]: r for r in mgr.list_runs()}["run-2"]["name"] == "renamed"
        assert set(reads) == {"run-2"}
    finally:
        mgr.shutdown()


def test_a_job_group_runs_one_at_a_time_even_with_free_slots(tmp_path):
    """A comparison's runs must not share the machine with each other (each one's time and peak memory
    are what the table reports), yet a run outside the group may use the free slot."""
    from conftest import worker_python

    mgr = JobManager(tmp_path / "runs", max_concurrent=2, stop_timeout=1.5, poll_interval=0.1,
                     python=worker_python(tmp_path, FAKE_WORKER), cwd=REPO)
    try:
        group = [mgr.submit(fake_config(), owner="alice", group="cmp-2") for _ in range(2)]
        other = mgr.submit(fake_config(), owner="bob")
        assert wait_for(lambda: mgr.get(other.run_id).status == "running", 5)
        assert [mgr.get(j.run_id).status for j in group] == ["running", "queued"]
        assert mgr.position(group[1].run_id) == 1
        mgr.stop(group[0].run_id, owner="alice")
        assert mgr.wait(group[0].run_id, timeout=10) == "stopped"
        assert wait_for(lambda: mgr.get(group[1].run_id).status == "running", 5)
    finally:
        mgr.shutdown(kill=True)


def test_a_job_group_stops_as_one(fake_manager):
    """Runs submitted as one group (the app's strategy comparison): one stop_group ends the running
    one gracefully and takes the queued ones out of the queue; only their owner may stop them."""
    mgr = fake_manager
    jobs = [mgr.submit(fake_config(), owner="alice", group="cmp-1") for _ in range(3)]
    other = mgr.submit(fake_config(), owner="alice")                 # not in the group: keeps its place
    assert wait_for(lambda: events_of(jobs[0]), 5)
    assert [j.run_id for j in mgr.jobs(group="cmp-1")] == [j.run_id for j in jobs]
    assert json.loads((jobs[1].run_dir / "job.json").read_text())["group"] == "cmp-1"
    assert "group" not in json.loads((other.run_dir / "job.json").read_text())
    with pytest.raises(JobError, match="Only the browser session"):
        mgr.stop_group("cmp-1", owner="bob")
    with pytest.raises(JobError, match="No job group"):
        mgr.stop_group("nope", owner="alice")
    assert "1 running and 2 queued" in mgr.stop_group("cmp-1", owner="alice")
    assert mgr.wait(jobs[0].run_id, timeout=10) == "stopped"
    assert [mgr.get(j.run_id).status for j in jobs[1:]] == ["cancelled", "cancelled"]
    assert wait_for(lambda: mgr.get(other.run_id).status == "running", 5)
    assert "already ended" in mgr.stop_group("cmp-1", owner="alice")
    mgr.stop(other.run_id, owner="alice")
    assert mgr.wait(other.run_id, timeout=10) == "stopped"


def test_a_worker_reports_its_own_peak_memory_not_the_apps():
    """Linux carries a parent's peak RSS (ru_maxrss) across fork and exec: a run started by the app
    (~1.4 GB resident) reported at least the app's peak. runtime.peak_rss_mb is the child's own."""
    import subprocess
    import sys

    ballast = b"\x01" * (1500 * 2**20)                  # written pages: this process now holds 1.5 GB more
    parent_mb = psutil.Process().memory_info().rss / 2**20
    code = "from finetune_core.runtime import peak_rss_mb; print(peak_rss_mb())"    # imports torch too
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    del ballast
    child_mb = float(out.stdout.strip().splitlines()[-1])
    assert 20 < child_mb < parent_mb - 1000, (child_mb, parent_mb)
