"""The main job: tokenizer → shard → pretrain → export LM → per task (finetune → evaluate → export).

Only chaining lives here; each stage is a cached task in its own module, beside the flow that runs it
alone. One MLflow parent run per pipeline run, a nested run per stage that actually ran; a markdown
report artifact in Prefect.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from flows.caching import data_fingerprint, pin_corpus
from flows.common import call_stage, quiet_defaults
from flows.evaluate import evaluate_task
from flows.export import export_task
from flows.finetune import finetune_task
from flows.pretrain import pretrain_task
from flows.promotion import DEFAULT_MIN_IMPROVEMENT, lm_eval_set, task_eval_set
from flows.registry import (
    SCRATCH,
    TAG_CKPT,
    TAG_CKPT_SHA,
    TAG_DATA,
    TAG_PARENT,
    TAG_PARENT_SHA,
    Parent,
    register_candidate,
    resolve_init,
)
from flows.shard import shard_task
from flows.tokenizer import tokenizer_task
from flows.tracking import LM_MODEL_NAME, configure, flat_params, numeric
from gpt.bundle import TOKENIZER_FILE
from gpt.checkpoint import WEIGHTS, read_model_meta
from gpt.config import ModelConfig, Preset
from gpt.data import ShardConfig
from gpt.export import ExportConfig, Quantize
from gpt.finetune_config import FinetuneConfig
from gpt.io import sha256_file
from gpt.tasks import get_task
from gpt.tokenizer import TokenizerConfig
from gpt.train_config import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_TASKS = ["bbc-topic", "bbc-headline", "qa"]
REPORT_KEY = "gptflow-report"


@flow(name="pipeline", log_prints=True)
def pipeline(
    preset: Preset = "cpu",
    corpus: str = "bbc",
    tasks: list[str] = DEFAULT_TASKS,  # noqa: B006 (Prefect needs a literal default to render the form)
    vocab_size: Annotated[int, Field(ge=261, le=1_000_000)] | None = None,
    pretrain_steps: Annotated[int, Field(gt=0)] | None = None,
    pretrain_max_time: Annotated[float, Field(ge=0)] | None = None,
    finetune_epochs: Annotated[int, Field(gt=0)] | None = None,
    quantize: Quantize = "none",
    init_from: str = SCRATCH,
    fresh_tokenizer: bool = False,
    min_improvement: Annotated[float, Field(ge=0)] = DEFAULT_MIN_IMPROVEMENT,
    dask_address: str | None = None,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict[str, Any]:
    """Train, finetune, evaluate and export a GPT on ``corpus``; register the ONNX models in MLflow.

    ``init_from``: ``scratch``, a model directory, or ``models:/NAME@ALIAS`` (a warm start keeps the
    parent's tokenizer unless ``fresh_tokenizer``). A new version becomes ``champion`` only if it
    beats the champion by ``min_improvement`` on the same held-out data, scored in this run.
    ``dask_address`` (``tcp://HOST:PORT``) runs the shard stage's partition tasks on that Dask cluster.
    """
    quiet_defaults()
    configure(mlruns)
    t0 = time.perf_counter()
    workdir = str(Path(workdir).resolve())  # results name absolute paths, valid from any directory
    corpus = pin_corpus(corpus)
    data_fp = data_fingerprint(corpus)
    model_cfg = ModelConfig.preset(preset)
    tok_cfg = TokenizerConfig(vocab_size=vocab_size or model_cfg.vocab_size)
    shard_cfg = ShardConfig()
    train_overrides = {"max_steps": pretrain_steps, "max_time": pretrain_max_time}
    train_cfg = TrainConfig.preset(preset, **{k: v for k, v in train_overrides.items() if v is not None})
    export_cfg = ExportConfig(quantize=quantize)
    task_objs = [get_task(t) for t in tasks]  # fail now, before hours of training, on an unknown task
    states: dict[str, str] = {}
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"tasks": {}, "registry": {}}

    with mlflow.start_run(run_name=f"pipeline-{preset}") as run:
        parent_id = run.info.run_id

        def stage(label: str, fn, **params):
            """Run one cached stage under this pipeline's MLflow run; record its state and time."""
            t = time.perf_counter()
            result, state = call_stage(fn, **params, workdir=workdir, parent_run_id=parent_id)
            states[label], timings[label] = state, round(time.perf_counter() - t, 2)
            return result

        def register(name: str, export: dict, make_eval_set, tags: dict) -> None:
            """Register an exported bundle (unless it already is), promoted only on a fair win."""
            results["registry"][name] = register_candidate(
                export["bundle"], name, export["build"], make_eval_set, min_improvement, parent_id, tags
            )

        parent = warm_start(init_from, fresh_tokenizer, data_fp, workdir)
        lineage = parent.lineage() if parent else {"init_from": SCRATCH}
        if parent:
            model_cfg = parent_architecture(parent.model_dir, model_cfg)
        results["parent"] = lineage
        mlflow.set_tag("gptflow.stage", "pipeline")
        mlflow.log_params(
            {"preset": preset, "corpus": corpus, "tasks": ",".join(tasks), "data_fingerprint": data_fp}
            | flat_params(
                model=model_cfg, tokenizer=tok_cfg, shard=shard_cfg, train=train_cfg, export=export_cfg
            )
            | flat_params(parent=lineage)
        )
        tok = stage(
            "tokenizer",
            tokenizer_task,
            corpus=None if parent else corpus,
            config=tok_cfg.to_dict(),
            inherit=str(parent.model_dir / TOKENIZER_FILE) if parent else None,
        )
        shards = stage(
            "shard",
            shard_task,
            corpus=corpus,
            tokenizer=tok["model"],
            config=shard_cfg.to_dict(),
            dask_address=dask_address,
        )
        pre = stage(
            "pretrain",
            pretrain_task,
            model=model_cfg.to_dict(),
            train_config=train_cfg.to_dict(),
            data=shards["dir"],
            init_from=str(parent.model_dir) if parent else None,
            lineage=lineage,
        )
        results["pretrain"] = pre
        results["export_lm"] = stage(
            "export:lm",
            export_task,
            checkpoint=pre["best"],
            config=export_cfg.to_dict(),
            eval_corpus=corpus if quantize != "none" else None,
        )
        lm_tags = {
            TAG_DATA: data_fp,
            TAG_PARENT: lineage["init_from"],
            TAG_PARENT_SHA: lineage.get("sha256"),
            TAG_CKPT: pre["checkpoint_uri"],
            TAG_CKPT_SHA: sha256_file(Path(pre["best"]) / WEIGHTS),
        }
        register(LM_MODEL_NAME, results["export_lm"], functools.partial(lm_eval_set, corpus), lm_tags)
        for spec, task in zip(tasks, task_objs, strict=True):
            ft_cfg = FinetuneConfig.for_task(task, **({"epochs": finetune_epochs} if finetune_epochs else {}))
            ft = stage(
                f"finetune:{task.name}",
                finetune_task,
                task=spec,
                config=ft_cfg.to_dict(),
                pretrained=pre["dir"],
            )
            ev = stage(
                f"evaluate:{task.name}",
                evaluate_task,
                task=spec,
                checkpoint=ft["best"],
                pretrained=pre["best"],
            )
            entry: dict[str, Any] = {"finetune": ft, "evaluate": ev}
            if task.kind == "classification":
                name = f"gptflow-{task.name}"
                entry["export"] = stage(
                    f"export:{task.name}", export_task, checkpoint=ft["best"], config=export_cfg.to_dict()
                )
                tags = {TAG_DATA: data_fingerprint(spec), TAG_PARENT: lineage["init_from"]}
                register(name, entry["export"], functools.partial(task_eval_set, spec), tags)
            results["tasks"][task.name] = entry
        mlflow.log_metrics(_summary_metrics(results))
        mlflow.log_dict({"states": states, "timings_s": timings}, "pipeline_states.json")
        total = round(time.perf_counter() - t0, 2)
        report = render_report(preset, corpus, results, states, timings, total, parent_id, workdir)
        mlflow.log_text(report, "report.md")
    create_markdown_artifact(key=REPORT_KEY, markdown=report, description=f"gptflow pipeline ({preset})")
    return {
        "run_id": parent_id,
        "states": states,
        "timings_s": timings,
        "total_s": total,
        "results": results,
        "workdir": str(Path(workdir).resolve()),
        "tracking_uri": mlflow.get_tracking_uri(),
    }


def warm_start(init_from: str, fresh_tokenizer: bool, data_fp: str, workdir: str) -> Parent | None:
    """The parent to start from. A registry parent that was itself trained on exactly this data is
    not trained again: its own run is replayed (same parent, same data), so every stage is cached and
    nothing new is registered, whether or not that run's candidate was promoted."""
    if fresh_tokenizer:
        if init_from != SCRATCH:
            log.warning("--fresh-tokenizer: new vocabulary, new weights; ignoring init_from=%s", init_from)
        return None
    parent = resolve_init(init_from, workdir)
    if parent is not None and parent.version is not None and parent.data_fingerprint == data_fp:
        log.info(
            "%s was trained on this very data (fingerprint %s): nothing new to learn; replaying its run "
            "(from %s)",
            parent.ref,
            data_fp,
            parent.parent_ref or SCRATCH,
        )
        return resolve_init(parent.parent_ref or SCRATCH, workdir)
    return parent


def parent_architecture(model_dir: Path, preset_cfg: ModelConfig) -> ModelConfig:
    """A warm start keeps its parent's architecture, whatever the preset says now: a champion trained
    before a preset changed (say, to rotary positions) still retrains on schedule."""
    saved = ModelConfig.from_dict(read_model_meta(model_dir)["model"])
    changed = {k: (v, getattr(saved, k)) for k, v in preset_cfg.to_dict().items() if getattr(saved, k) != v}
    if changed:
        log.warning(
            "warm start from %s: keeping its architecture (%s); start from scratch for the preset's",
            model_dir,
            ", ".join(f"{k} {b!r}, preset {a!r}" for k, (a, b) in sorted(changed.items())),
        )
    return saved


def _summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    if results["pretrain"].get("val_bpb") is not None:
        out["lm.val_bpb"] = results["pretrain"]["val_bpb"]
    for name, entry in results["tasks"].items():
        report = entry["evaluate"]["metrics"]
        out.update(numeric(report.get("metrics", {}), f"{name}.model."))
        out.update(numeric(report.get("baselines", {}), f"{name}.baseline."))
    return out


def render_report(preset, corpus, results, states, timings, total, run_id, workdir) -> str:
    lines = [
        f"# gptflow pipeline — preset `{preset}` on `{corpus}`",
        "",
        f"MLflow parent run: `{run_id}` · workdir: `{Path(workdir).resolve()}` · total {total:.1f} s",
        f"Started from: `{results['parent']['init_from']}`",
        "",
        "## Language model",
        "",
        f"- val bits per byte: **{_fmt(results['pretrain'].get('val_bpb'))}**",
        f"- checkpoint: `{results['pretrain']['best']}`",
        f"- ONNX bundle: `{results['export_lm']['bundle']}`",
        "",
        "## Tasks: model vs baselines (test split)",
        "",
        "| task | metric | model | baselines |",
        "|---|---|---|---|",
    ]
    for row in task_rows(results):
        baselines = ", ".join(f"{b} {_fmt(v)}" for b, v in row["baselines"].items())
        lines.append(f"| {row['task']} | {row['metric']} | {_fmt(row['model'])} | {baselines} |")
    lines += ["", "## Registry: candidate vs champion on the same data", ""]
    lines += [
        "| model | version | decision | metric | candidate | champion | eval set |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in results["registry"].items():
        if not d.get("registered"):
            lines.append(f"| {name} | v{d['version']} | already registered | | | | |")
            continue
        lines.append(
            f"| {name} | v{d['version']} | {d['decision']} → **{d['alias']}** | {d['metric']} | "
            f"{_fmt(d['candidate'])} | {_fmt(d['champion_before'])} | `{d['eval_set_sha256'][:12]}` |"
        )
    lines += ["", "## Stages", "", "| stage | state | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {states[k]} | {timings[k]:.1f} |" for k in states]
    return "\n".join(lines) + "\n"


def task_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each task's primary test metric beside its baselines, as in its evaluation's metrics.json."""
    rows = []
    for name, entry in results["tasks"].items():
        report = entry["evaluate"]["metrics"]
        metric = report.get("primary_metric")
        rows.append(
            {
                "task": name,
                "metric": metric,
                "model": report.get("metrics", {}).get(metric),
                "baselines": {b: v.get(metric) for b, v in report.get("baselines", {}).items()},
                "bundle": entry.get("export", {}).get("bundle"),
            }
        )
    return rows


def render_summary(result: dict[str, Any]) -> str:
    """What the main job achieved, for the terminal: metrics beside baselines, bundles, next commands."""
    results = result["results"]
    lm_bundle = results["export_lm"]["bundle"]
    lm = results["registry"].get(LM_MODEL_NAME, {})
    lines = ["", "What this run produced", ""]
    lines.append(
        f"  language model: val bits per byte {_fmt(results['pretrain'].get('val_bpb'))}"
        f" ({LM_MODEL_NAME} v{lm.get('version')}{', ' + lm['alias'] if lm.get('alias') else ''})"
    )
    lines.append(f"  bundle: {lm_bundle}")
    rows = task_rows(results)
    if rows:
        width = max(len(r["task"]) for r in rows) + 2
        lines += ["", f"  {'task':{width}}{'metric':12}{'model':>8}   baselines (same test split)"]
        for r in rows:
            baselines = ", ".join(f"{b} {_fmt(v)}" for b, v in r["baselines"].items())
            lines.append(f"  {r['task']:{width}}{r['metric']:12}{_fmt(r['model']):>8}   {baselines}")
        lines += [f"  bundle ({r['task']}): {r['bundle']}" for r in rows if r["bundle"]]
    lines += ["", "Next:", f'  gptflow generate --bundle {lm_bundle} "The market" -n 60']
    classifier = next((r for r in rows if r["bundle"]), None)
    if classifier:
        lines.append(f'  gptflow classify --bundle {classifier["bundle"]} "Arsenal won the cup final"')
    lines.append(f"  gptflow serve --bundle {lm_bundle}")
    lines.append(f"  mlflow ui --backend-store-uri {result['tracking_uri']}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "—"
