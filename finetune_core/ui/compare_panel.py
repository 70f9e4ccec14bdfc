"""The Train tab's "Compare strategies": full, frozen and LoRA on the form's data and settings.

The same engine as `python -m finetune_core compare`: compare.plan_runs turns the form's config into
one config per strategy (the learning rate of one strategy is not carried to the others; frozen on a
language model keeps its last two blocks trainable), compare.strategy_row makes each finished run's
table row and compare.render_markdown its reading. What differs from the CLI is who runs them: the
app's job queue, as one group of this session's jobs, so they run one after the other (each run's
time and peak memory are its own), they survive a closed browser tab, and one Stop stops the group
(the running strategy is evaluated as it is, the queued ones never start).
"""

from __future__ import annotations

import time

import gradio as gr

from .. import compare, plots, rundir
from ..config import config_from_dict, config_to_dict, load_config
from ..errors import FinetuneError
from ..jobs import ACTIVE, JobError, OwnerBusy
from . import form
from .common import AppContext, bind, owner_of, user_errors
from .data_source import resolve_data
from .train_tab import active_job, check_before_submit, follow_busy, watch

ORDER = ("frozen", "lora", "full")       # quickest first: the table has a row to read within seconds
HEADERS = ["strategy", "status", "score before → after", "train s", "run s", "trainable params",
           "peak memory MB", "learning rate"]
SCORE_NAMES = {"classification": "weighted F1", "instruction": "validation loss", "preference": "DPO loss"}


def table(rows: list[dict], pending: dict[str, str]) -> list[list]:
    """One row per strategy: finished ones from compare.strategy_row, the others with their status."""
    out = []
    for s in ORDER:
        r = next((r for r in rows if r["strategy"] == s), None)
        if r is None:
            if s in pending:
                out.append([compare.NAMES[s], pending[s], "", "", "", "", "", ""])
            continue
        if r.get("main_metric_value") is None:
            said = r["error"] if r["status"] == "skipped" else f"{r['status']}: {r.get('error') or 'no metrics'}"
            out.append([r["name"], said, "", "", "", "", "", ""])
            continue
        share = compare.fmt_pct(r.get("trainable_percent"))
        name = r["name"] + compare.variant(r)
        score = f"{compare.fmt_num(r.get('main_metric_before'))} → {compare.fmt_num(r['main_metric_value'])}"
        out.append([name, r["status"], score, compare.fmt_num(r.get("train_seconds"), "{:.1f}"),
                    compare.fmt_num(r.get("total_seconds"), "{:.1f}"),
                    f"{compare.fmt_params(r.get('trainable_params'))} ({share})",
                    compare.fmt_num(r.get("peak_rss_mb"), "{:,.0f}"),
                    compare.fmt_num(r.get("learning_rate"), "{:.0e}")])
    return out


def _row(job, plan: dict, task: str, st: dict) -> dict:
    """compare.strategy_row for a job of the group that has ended."""
    status = st["status"]
    if status == "cancelled":
        return compare.strategy_row(plan, task, None, 0.0, "skipped: stop requested", True) | {"status": "skipped"}
    metrics = rundir.read_metrics(job.run_dir) or None
    wall = (metrics or {}).get("total_seconds") or 0.0
    if metrics is None:
        error = st.get("error") or f"the run {status}"
        return compare.strategy_row(plan, task, None, wall, error, status == "stopped")
    stopped = status == "stopped" or bool(metrics.get("stopped_by_user"))
    return compare.strategy_row(plan, task, metrics, wall, None, stopped)


def _submit_group(ctx: AppContext, cfg, owner: str) -> tuple[str, list, list[dict], list[str]]:
    """Queue one job per strategy as a group; (group, jobs, plans, notes). Nothing stays queued when
    one of them cannot be submitted."""
    _base, plans, notes = compare.plan_runs(config_to_dict(cfg), list(ORDER))
    group = f"cmp-{time.strftime('%m%d-%H%M%S')}"
    short = cfg.model.split("/")[-1].replace("bundled:", "")
    jobs = []
    try:
        for i, plan in enumerate(plans):
            job = ctx.manager.submit(config_from_dict(plan["values"]), owner, one_active_per_owner=i == 0,
                                     name=f"compare-{plan['strategy']}-{short}-{group[4:]}", group=group)
            plan["values"]["output_dir"] = str(job.run_dir)
            jobs.append(job)
    except JobError:
        if jobs:
            ctx.manager.stop_group(group, owner)
        raise
    return group, jobs, plans, notes


@user_errors
def compare_strategies(ctx: AppContext, values: dict, owner_state=None, request: gr.Request = None):
    """Queue full, frozen and LoRA on the form's data and settings as one group, follow each run as the
    Start button does, and fill the comparison table and chart as the runs end.

    Yields (run_id, status_html, loss_plot, metric_plot, log, result, compare_group, table, chart, reading).
    """
    skip = (gr.skip(),) * 4
    owner = owner_of(owner_state, request)
    busy = active_job(ctx, owner)
    if busy is not None:
        for out in follow_busy(ctx, busy, owner):
            yield out + skip
        return
    path = resolve_data(ctx, **form.source(values))
    cfg = form.form_to_config(values, path)
    check_before_submit(ctx, cfg, path, owner)
    try:
        _group, jobs, plans, notes = _submit_group(ctx, cfg, owner)
    except OwnerBusy as exc:            # a Start that raced this click past the check above
        for out in follow_busy(ctx, exc.job, owner):
            yield out + skip
        return
    gr.Info(f"Comparing {', '.join(compare.NAMES[p['strategy']] for p in plans)} one after the other. "
            "Stop stops the whole comparison.")
    yield from follow_group(ctx, owner, jobs, plans, notes, config_to_dict(cfg))


def follow_group(ctx: AppContext, owner: str, jobs: list, plans: list[dict], notes: list[str], base: dict):
    """Follow a comparison's jobs in order: a run that has ended gets its row at once, the others are
    watched as Start watches a run, and the table, chart and reading are redrawn as each one ends."""
    skip = (gr.skip(),) * 4
    task = base["task"]
    rows: list[dict] = []
    pending = {p["strategy"]: "queued" for p in plans}
    headers = HEADERS[:2] + [f"{SCORE_NAMES[task]} before → after"] + HEADERS[3:]

    def drawn():
        reading = compare.render_markdown(rows, task, base, notes, with_table=False) if \
            any(r.get("main_metric_value") is not None for r in rows) else ""
        return table(rows, pending), plots.strategy_race_figure(rows, task), reading

    for job, plan in zip(jobs, plans):          # after a reload: the runs that have ended already
        st = ctx.manager.status(job.run_id)
        if st["status"] not in ACTIVE:
            rows.append(_row(job, plan, task, st))
            pending.pop(plan["strategy"], None)
    current, chart, reading = drawn()
    yield (gr.skip(),) * 6 + (gr.update(visible=True), gr.update(value=current, headers=headers), chart, reading)
    for job, plan in zip(jobs, plans):
        if plan["strategy"] not in pending:
            continue
        pending[plan["strategy"]] = "running"
        shown = False
        for out in watch(ctx, job.run_id, owner):
            # the table says which strategy runs once it starts; the watch outputs follow it
            yield out + ((gr.skip(), table(rows, pending), gr.skip(), gr.skip()) if not shown else skip)
            shown = True
        rows.append(_row(job, plan, task, ctx.manager.status(job.run_id)))
        pending.pop(plan["strategy"], None)
        yield (gr.skip(),) * 6 + (gr.skip(), *drawn())
    if not any(r["status"] in ("ok", "stopped") for r in rows):
        raise FinetuneError("Every strategy of the comparison failed: " +
                            "; ".join(f"{r['strategy']}: {r.get('error')}" for r in rows),
                            "Press Start with one strategy to see its log.")


@user_errors
def reconnect_comparison(ctx: AppContext, owner_state, request: gr.Request):
    """After a page reload: a comparison of this session still running is shown again, its table
    redrawn from the runs that ended and its running strategy followed (Train's own reconnect leaves
    a group's run to this one)."""
    owner = owner_of(owner_state, request)
    active = [j for j in ctx.manager.jobs(owner, active_only=True) if j.group]
    if not active:
        return
    members = sorted(ctx.manager.jobs(owner, group=active[-1].group), key=lambda j: j.created)
    plans = []
    for job in members:
        values = config_to_dict(load_config(job.request_path))
        values["output_dir"] = str(job.run_dir)
        plans.append({"strategy": job.strategy, "values": values})
    yield from follow_group(ctx, owner, members, plans, [], plans[0]["values"])


def build(ui) -> None:
    """The comparison's table, chart and reading, in the slot the Train tab keeps under its status
    line (ui.compare_slot), shown once the button is pressed."""
    with ui.compare_slot, gr.Column(visible=False, elem_id="compare-panel") as ui.compare_group:
        gr.Markdown("### Strategy comparison\nThe same data, split and seed for each strategy, one run after "
                    "the other; rows fill in as runs end. Each run also appears in the Evaluate tab.")
        ui.compare_table = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, elem_id="compare-table",
                                        label="Strategies compared")
        with gr.Row():
            ui.compare_plot = gr.Plot(plots.strategy_race_figure([], "classification"), show_label=False,
                                      elem_id="compare-plot", scale=1)
            ui.compare_md = gr.Markdown("", elem_id="compare-md")


def wire(ctx: AppContext, ui) -> None:
    """After train_tab.wire: the button streams into the run panel like Start, so each stream cancels
    the others (cancelling a stream never stops a job)."""
    watch_outputs = [ui.run_id, ui.status, ui.loss_plot, ui.metric_plot, ui.log, ui.result]
    outputs = watch_outputs + [ui.compare_group, ui.compare_table, ui.compare_plot, ui.compare_md]
    ui.compare_event = ui.compare_btn.click(
        form.bind_form(ctx, compare_strategies), form.components(ui) + [ui.owner_state], outputs,
        api_visibility="private", concurrency_limit=None, trigger_mode="once",
        cancels=[ui.reconnect_event, ui.watch_event, ui.resume_event, ui.train_event])
    reconnect_event = ui.session_load.then(bind(ctx, reconnect_comparison), [ui.owner_state], outputs,
                                           api_visibility="private", concurrency_limit=None)
    for trigger in (ui.start_btn.click, ui.run_id.submit, ui.resume_btn.click, ui.compare_btn.click):
        trigger(None, None, None, cancels=[ui.compare_event, reconnect_event], api_visibility="private",
                queue=False)
