"""The main job: tokenizer → shard → pretrain → export LM → per task (finetune → evaluate → export).

Only chaining lives here; each stage is a cached task in its own module. One MLflow parent run per
pipeline run, a nested run per stage that actually ran; a markdown report artifact in Prefect.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from flows.common import call_stage, quiet_defaults
from flows.evaluate import evaluate_task
from flows.export import export_task
from flows.finetune import finetune_task
from flows.pretrain import pretrain_task
from flows.shard import shard_task
from flows.tokenizer import tokenizer_task
from flows.tracking import LM_MODEL_NAME, configure, flat_params, numeric
from gpt.config import ModelConfig
from gpt.data import ShardConfig
from gpt.export import ExportConfig
from gpt.finetune import FinetuneConfig
from gpt.tasks import get_task
from gpt.tokenizer import TokenizerConfig
from gpt.train_config import TrainConfig

DEFAULT_TASKS = ["bbc-topic", "bbc-headline", "qa"]
REPORT_KEY = "gptflow-report"


@flow(name="pipeline", log_prints=True)
def pipeline(
    preset: Literal["tiny", "cpu", "gpt2-124m"] = "cpu",
    corpus: str = "bbc",
    tasks: list[str] = DEFAULT_TASKS,  # noqa: B006 (Prefect needs a literal default to render the form)
    vocab_size: Annotated[int, Field(ge=261, le=1_000_000)] | None = None,
    pretrain_steps: Annotated[int, Field(gt=0)] | None = None,
    pretrain_max_time: Annotated[float, Field(ge=0)] | None = None,
    finetune_epochs: Annotated[int, Field(gt=0)] | None = None,
    quantize: bool = False,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict[str, Any]:
    """Train, finetune, evaluate and export a GPT on ``corpus``; register the ONNX models in MLflow."""
    quiet_defaults()
    configure(mlruns)
    t0 = time.perf_counter()
    model_cfg = ModelConfig.preset(preset)
    tok_cfg = TokenizerConfig(vocab_size=vocab_size or model_cfg.vocab_size)
    shard_cfg = ShardConfig()
    train_overrides = {"max_steps": pretrain_steps, "max_time": pretrain_max_time}
    train_cfg = TrainConfig.preset(preset, **{k: v for k, v in train_overrides.items() if v is not None})
    export_cfg = ExportConfig(quantize="int8" if quantize else "none")
    task_objs = [get_task(t) for t in tasks]  # fail now, before hours of training, on an unknown task
    states: dict[str, str] = {}
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"tasks": {}}

    with mlflow.start_run(run_name=f"pipeline-{preset}") as run:
        parent_id = run.info.run_id

        def stage(label: str, fn, **params):
            """Run one cached stage under this pipeline's MLflow run; record its state and time."""
            t = time.perf_counter()
            result, state = call_stage(fn, **params, workdir=workdir, parent_run_id=parent_id)
            states[label], timings[label] = state, round(time.perf_counter() - t, 2)
            return result

        mlflow.set_tag("gptflow.stage", "pipeline")
        mlflow.log_params(
            {"preset": preset, "corpus": corpus, "tasks": ",".join(tasks)}
            | flat_params(
                model=model_cfg, tokenizer=tok_cfg, shard=shard_cfg, train=train_cfg, export=export_cfg
            )
        )
        tok = stage("tokenizer", tokenizer_task, corpus=corpus, config=tok_cfg.to_dict())
        shards = stage("shard", shard_task, corpus=corpus, tokenizer=tok["model"], config=shard_cfg.to_dict())
        pre = stage(
            "pretrain",
            pretrain_task,
            model=model_cfg.to_dict(),
            train_config=train_cfg.to_dict(),
            data=shards["dir"],
        )
        results["pretrain"] = pre
        results["export_lm"] = stage(
            "export:lm",
            export_task,
            checkpoint=pre["best"],
            config=export_cfg.to_dict(),
            registered_name=LM_MODEL_NAME,
            metric="val_bpb",
            value=pre["val_bpb"],
            lower_is_better=True,
            eval_corpus=corpus if quantize else None,
        )
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
            metric = task.primary_metric
            value = _metric_value(ev["metrics"], metric)
            if task.kind == "classification" and value is not None:
                entry["export"] = stage(
                    f"export:{task.name}",
                    export_task,
                    checkpoint=ft["best"],
                    config=export_cfg.to_dict(),
                    registered_name=f"gptflow-{task.name}",
                    metric=metric,
                    value=value,
                    lower_is_better=False,
                )
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
    }


def _metric_value(report: dict[str, Any], name: str) -> float | None:
    value = report.get("metrics", {}).get(name)
    return float(value) if isinstance(value, int | float) else None


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
        "",
        "## Language model",
        "",
        f"- val bits per byte: **{_fmt(results['pretrain'].get('val_bpb'))}**",
        f"- checkpoint: `{results['pretrain']['best']}`",
        f"- ONNX bundle: `{results['export_lm']['bundle']}`",
    ]
    promo = results["export_lm"].get("promotion")
    if promo:
        lines.append(
            f"- registered `{promo['model']}` v{promo['version']} as **{promo['alias']}** "
            f"(val_bpb {_fmt(promo['candidate'])} vs champion {_fmt(promo['champion_before'])})"
        )
    lines += [
        "",
        "## Tasks: model vs baseline",
        "",
        "| task | metric | model | baseline |",
        "|---|---|---|---|",
    ]
    for name, entry in results["tasks"].items():
        metrics = entry["evaluate"]["metrics"]
        model = metrics.get("model", {})
        baseline = metrics.get("baseline", {})
        for key, value in model.items():
            if isinstance(value, int | float):
                lines.append(f"| {name} | {key} | {_fmt(value)} | {_fmt(baseline.get(key))} |")
    lines += ["", "## Stages", "", "| stage | state | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {states[k]} | {timings[k]:.1f} |" for k in states]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "—"
