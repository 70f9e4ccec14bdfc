"""Shared UI plumbing: the app context (job manager, sessions), error handling, run pickers.

Only finetune_core/ui/ imports gradio. torch / transformers are imported inside handlers, never at
import time, so `python app.py` answers HTTP within seconds.

Handlers are module-level functions whose first parameter is the AppContext; `bind(ctx, fn)` turns
one into the gradio handler of its other parameters (tests call the function itself with a context).
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from .. import rundir, settings
from ..errors import FinetuneError
from ..jobs import JobManager, owner_key
from ..limits import max_upload_mb, summary
from ..models import model_cache_dir

log = logging.getLogger("finetune_lab.ui")
REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "domains.csv": ("Domains: 160 short texts in 4 classes (classification)", "classification"),
    "bank_support.csv": ("Bank support: 424 messages in 8 intents, the strategy race (classification)",
                         "classification"),
    "support_replies.jsonl": ("Support replies: 80 notes rewritten as polite replies (instruction)", "instruction"),
    "preference_pairs.jsonl": ("Preference pairs: 103 direct vs rambling answers (preference, DPO)", "preference"),
}
TASK_CHOICES = [("Classification (text → label)", "classification"),
                ("Instruction tuning (prompt → answer)", "instruction"),
                ("Preference tuning, DPO (prompt → better / worse answer)", "preference")]
STATUS_ICONS = {"queued": "⏳", "running": "🏃", "stopping": "✋", "finished": "✅", "stopped": "⏹️",
                "failed": "❌", "interrupted": "⚠️", "cancelled": "🚫"}


def example_path(name: str) -> Path:
    return REPO_ROOT / "examples" / "data" / name


def upload_limit_mb() -> float:
    """finetune_core.limits.max_upload_mb() (FINETUNE_MAX_UPLOAD_MB, demo mode), 50 MB by default."""
    return max_upload_mb()


def limits_line() -> str:
    """One sentence on the limits in force on this deployment, or '' when there are none."""
    try:
        s = summary()
    except FinetuneError as exc:
        return f"⚠️ {exc.message}"
    bits = []
    if s.get("max_steps"):
        bits.append(f"at most {s['max_steps']} training steps")
    if s.get("max_minutes"):
        bits.append(f"{s['max_minutes']:g} minutes per run")
    if s.get("max_rows"):
        bits.append(f"{s['max_rows']:,} rows per file")
    if s.get("demo_mode") or bits:
        bits.append(f"files up to {s['max_upload_mb']:g} MB")
        bits.append(f"{s['max_concurrent_jobs']} training job(s) at a time, the rest wait in a queue")
    return ("This shared deployment limits runs: " + ", ".join(bits) + ".") if bits else ""


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------
# errors: FinetuneError -> gr.Error with its paragraph; anything else -> a short message, no traceback


def _to_gr_error(exc: Exception) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, FinetuneError):
        return gr.Error(html.escape(exc.message, quote=False), print_exception=False)
    log.exception("unexpected error in a UI handler")
    return gr.Error(html.escape(f"Unexpected {type(exc).__name__}: {exc}. The app keeps running; if the input "
                                "looks right, report this with the server log.", quote=False), print_exception=False)


_ML_LOCK = threading.Lock()
_ML_READY = threading.Event()


def warm_ml_imports() -> None:
    """Import torch / transformers / peft once, under a lock.

    transformers resolves names lazily and two handler threads importing it at the same moment can
    fail with "cannot import name 'AutoTokenizer'"; handlers call this first (a no-op once done), and
    `launch()` starts it in the background so the first click does not wait for it.
    """
    if _ML_READY.is_set():
        return
    with _ML_LOCK:
        if _ML_READY.is_set():
            return
        try:
            import torch  # noqa: F401
            import transformers
            from transformers import (AutoConfig, AutoModelForCausalLM,  # noqa: F401
                                      AutoModelForSequenceClassification, AutoTokenizer, TextIteratorStreamer,
                                      TrainerCallback)

            import peft  # noqa: F401
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification  # noqa: F401

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except Exception:  # noqa: BLE001 - the handler that needs them reports the problem
            log.exception("warming up torch / transformers failed")
        finally:
            _ML_READY.set()


def user_errors(fn):
    """Wrap a handler (plain or generator) so users see readable messages, never a traceback."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                warm_ml_imports()
                yield from fn(*args, **kwargs)
            except GeneratorExit:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _to_gr_error(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            warm_ml_imports()
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _to_gr_error(exc) from None
    return wrapper


def bind(ctx, fn):
    """`fn(ctx, *inputs)` as the gradio handler of its inputs.

    The handler keeps fn's name (gradio derives a private event's api_name from it), docstring and
    parameters without `ctx` (gradio_client's parameter names and defaults); a generator stays a
    generator (gradio streams it), and `gr.Request` parameters keep their resolved annotation so
    gradio fills them in.
    """
    params = list(inspect.signature(fn).parameters.values())[1:]
    return as_handler(fn, inspect.Signature(params), lambda *args, **kwargs: fn(ctx, *args, **kwargs))


def as_handler(fn, signature: inspect.Signature, call):
    """A plain function with `signature` that runs call(*args, **kwargs); named and documented like fn.

    gradio reads a handler's signature, type hints and generator-ness itself, so a functools.partial
    will not do: its type hints are lost (no gr.Request) and its name is 'partial'.
    """
    if inspect.isgeneratorfunction(fn):
        def handler(*args, **kwargs):
            yield from call(*args, **kwargs)
    else:
        def handler(*args, **kwargs):
            return call(*args, **kwargs)
    hints = typing.get_type_hints(fn)
    handler.__name__ = handler.__qualname__ = fn.__name__
    handler.__module__, handler.__doc__ = fn.__module__, fn.__doc__
    handler.__signature__ = signature
    handler.__annotations__ = {name: hints[name] for name in signature.parameters if name in hints}
    return handler


# ---------------------------------------------------------------------------------------------
# context


def _session_secret(home: Path) -> str:
    """A fixed secret for gr.BrowserState, so a session id survives an app restart."""
    secret = settings.session_secret()
    if secret:
        return secret
    path = home / ".session_secret"
    try:
        if path.exists():
            return path.read_text().strip()
        home.mkdir(parents=True, exist_ok=True)
        value = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        return value
    except OSError:
        return secrets.token_hex(16)


@dataclass
class AppContext:
    manager: JobManager
    home: Path = field(default_factory=settings.home)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="finetune_lab_")))

    def __post_init__(self):
        self.session_secret = _session_secret(self.home)

    @property
    def runs_dir(self) -> Path:
        return self.manager.runs_dir

    def run_dir(self, run_id: str, owner: str | None) -> Path:
        run_id = (run_id or "").strip()
        if not run_id:
            raise FinetuneError("No run is selected.", "Pick a run from the list (train one in the Train tab).")
        path = self.manager.run_dir(run_id)
        if not path.is_dir() or not self.manager.can_view(run_id, owner):
            raise FinetuneError(f"Run '{run_id}' was not found.", "Refresh the run list and pick a run from it.")
        return path

    def model_roots(self, owner: str | None) -> list[Path]:
        """Folders a model field may point into: the model cache, and the runs folder on a laptop.

        With private runs only this session's own run folders: another session's model (and the
        data it learned) stays out of reach even when its run id is known.
        """
        if not self.manager.private_runs:
            return [self.runs_dir, model_cache_dir()]
        okey = owner_key(owner)
        own = [self.runs_dir / r["run_id"] for r in self.manager.list_runs(owner)
               if okey and r.get("owner") == okey]
        # folders the operator put next to the runs (e.g. runs/_models/), which no run id can name
        shared = [p for p in self.runs_dir.iterdir() if p.is_dir() and not rundir.RUN_ID_PATTERN.match(p.name)] \
            if self.runs_dir.is_dir() else []
        return own + shared + [model_cache_dir()]

    def temp_copy(self, src: Path, name: str | None = None) -> str:
        """Copy a file into the app's temp folder (gradio serves files from there) and return its path."""
        self.clean_temp()
        folder = Path(tempfile.mkdtemp(dir=self.tmp))
        dst = folder / (name or src.name)
        shutil.copyfile(src, dst)
        return str(dst)

    def temp_dir(self) -> Path:
        self.clean_temp()
        return Path(tempfile.mkdtemp(dir=self.tmp))

    def clean_temp(self, max_age: float = 3600.0) -> None:
        now = time.time()
        for child in self.tmp.iterdir() if self.tmp.is_dir() else []:
            try:
                if now - child.stat().st_mtime > max_age:
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:
                pass


def can_modify(ctx: AppContext, run_id: str, owner: str | None) -> bool:
    """May this session change a run's files (merge, ratings)? Checked whether runs are private or not.

    The session that started the run may. A run with no recorded owner (trained with the CLI on this
    machine) may be changed by anyone only when runs are not private (a laptop).
    """
    if ctx.manager.is_owner(run_id, owner):
        return True
    try:
        recorded = ctx.manager.status(run_id).get("owner")
    except FinetuneError:
        return False
    return not recorded and not ctx.manager.private_runs


def check_owner(ctx: AppContext, run_id: str, owner: str | None, action: str = "change this run") -> None:
    """Raise a FinetuneError unless this session may change the run (see can_modify)."""
    if not can_modify(ctx, run_id, owner):
        raise FinetuneError(f"Only the browser session that trained this run can {action}.",
                            "Open the app in the browser that started the run, or train your own run.")


def owner_of(owner_state: str | None, request: gr.Request | None) -> str:
    """The browser session id (gr.BrowserState, survives reloads) or, for API clients, the client session."""
    if owner_state and re.fullmatch(r"[0-9a-f]{32}", str(owner_state)):
        return str(owner_state)
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"client:{session}" if session else "anonymous"


# ---------------------------------------------------------------------------------------------
# run pickers


def fmt_metric(row: dict) -> str:
    v = row.get("main_metric")
    if not isinstance(v, (int, float)):
        return ""
    return f"F1 {v:.3f}" if row.get("main_metric_name") == "f1_weighted" else f"loss {v:.3f}"


def run_label(row: dict) -> str:
    icon = STATUS_ICONS.get(row["status"], "")
    parts = [f"{icon} {row['name']}", row["status"]]
    metric = fmt_metric(row)
    if metric:
        parts.append(metric)
    if row.get("mine"):
        parts.append("yours")
    return " · ".join(parts)


def run_choices(ctx: AppContext, owner: str | None, task: str | None = None, with_model: bool = False) -> list:
    rows = ctx.manager.list_runs(owner)
    out = []
    for r in rows:
        if task and r.get("task") != task:
            continue
        if with_model and not r.get("has_model"):
            continue
        out.append((run_label(r), r["run_id"]))
    return out


def dropdown_update(choices: list, current: str | None, prefer: str | None = None):
    values = [v for _, v in choices]
    value = prefer if prefer in values else current if current in values else (values[0] if values else None)
    return gr.update(choices=choices, value=value)


def badge(text: str, kind: str = "info") -> str:
    return f'<span class="ft-badge ft-{kind}">{html.escape(text)}</span>'


def warning_box(lines: list[str], title: str = "Warnings") -> str:
    if not lines:
        return '<div class="ft-ok">✅ No problems found.</div>'
    items = "".join(f"<li>{html.escape(str(w))}</li>" for w in lines)
    return f'<div class="ft-warn"><b>⚠️ {html.escape(title)}</b><ul>{items}</ul></div>'


def error_box(message: str, lines: list[str] | None = None) -> str:
    detail = ""
    if lines:
        detail = "<pre>" + html.escape("\n".join(lines)) + "</pre>"
    return f'<div class="ft-error"><b>❌ {html.escape(message or "Failed.")}</b>{detail}</div>'


CSS = """
.ft-warn {background:#fff7e6;border:1px solid #f0b429;border-radius:8px;padding:8px 12px;color:#5c3c00}
.ft-warn ul {margin:4px 0 0 18px}
.ft-ok {background:#ecfdf3;border:1px solid #6ce9a6;border-radius:8px;padding:8px 12px;color:#05603a}
.ft-error {background:#fef3f2;border:1px solid #f97066;border-radius:8px;padding:8px 12px;color:#7a271a}
.ft-error pre {white-space:pre-wrap;font-size:12px;margin:6px 0 0 0;max-height:220px;overflow:auto}
.ft-progress {height:14px;background:#eef2f6;border-radius:7px;overflow:hidden;margin:4px 0}
.ft-progress > div {height:100%;background:linear-gradient(90deg,#4C78A8,#72B7B2);transition:width .5s}
.ft-status {font-size:14px;line-height:1.6}
.ft-badge {display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600}
.ft-info {background:#eef4ff;color:#1d4ed8} .ft-good {background:#ecfdf3;color:#05603a}
.ft-bad {background:#fef3f2;color:#b42318} .ft-wait {background:#fff7e6;color:#93370d}
"""
