"""Flow: split, tokenize and shard a corpus with the trained tokenizer, one Prefect task per partition.

The cached ``shard`` stage plans the corpus's partitions (``gpt.sharding.plan_shards``), maps
``shard-partition`` over them on a task runner (a local process pool sized to the cores, or a Dask
cluster given by ``dask_address``), then ``shard-manifest`` writes the manifest. A rerun after a
crash keeps the partitions that finished (their files are in the plan's work directory).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import mlflow
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.caching import is_complete, pin_corpus
from flows.common import quiet_defaults, run_stage, stage_task
from flows.tracking import configure, flat_params, numeric, stage_run
from gpt.corpora import Partition, plan_partitions
from gpt.data import ShardConfig
from gpt.io import MANIFEST, read_manifest
from gpt.sharding import ShardPlan, finish_shards, plan_shards, shard_partition
from gpt.tokenizer import MODEL_FILE


def task_runner(dask_address: str | None = None, workers: int = 0):
    """Where partition tasks run: the Dask scheduler at ``dask_address`` (``tcp://host:8786``), else a
    process pool of ``workers`` processes (0: one per core)."""
    if dask_address:
        if not dask_address.startswith(("tcp://", "tls://", "inproc://", "ws://", "wss://")):
            raise ValueError(
                f"dask_address={dask_address!r} is not a Dask scheduler address; use tcp://HOST:PORT "
                "(what `dask scheduler` prints)"
            )
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=workers or os.cpu_count() or 1)


@contextlib.contextmanager
def shared_api() -> Iterator[None]:
    """Let worker processes report to this process's Prefect API.

    Without a server (``PREFECT_API_URL`` unset) each process would start its own temporary server
    (~10 s and ~200 MB each); pointing the workers at the one this process runs avoids that.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


# No Prefect result cache: resume is the partition's own done-marker in the work directory.
@task(
    name="shard-partition",
    task_run_name="shard-partition-{part.index}",
    retries=1,
    retry_delay_seconds=1,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def shard_partition_task(part: Partition, tokenizer: str, work_dir: str, config: dict) -> dict:
    return shard_partition(part, tokenizer, work_dir, ShardConfig.from_dict(config))


@task(name="shard-manifest", cache_policy=NO_CACHE, persist_result=False)
def shard_manifest_task(plan: ShardPlan, summaries: list[dict], out_dir: str) -> dict:
    return finish_shards(plan, summaries, out_dir)


def shard_partitions(corpus: str, tokenizer: str, out_dir: str, config: dict) -> dict:
    """Tokenize every partition of ``corpus`` (one task each, on this flow's task runner), then
    write the manifest. Partitions finished by an earlier, interrupted run are kept."""
    cfg = ShardConfig.from_dict(config)
    plan = plan_shards(corpus, tokenizer, out_dir, cfg)
    summaries = shard_partition_task.map(
        plan.partitions, unmapped(plan.tokenizer), unmapped(str(plan.work_dir)), unmapped(config)
    )
    return shard_manifest_task(plan, summaries.result(), out_dir)


def shard_on_runner(
    corpus: str, tokenizer: str, out_dir: str | Path, config: ShardConfig, dask_address: str | None = None
) -> dict[str, Any]:
    """``shard_partitions`` on a process pool (``config.num_proc``) or the Dask cluster at ``dask_address``."""
    if dask_address:
        runner = task_runner(dask_address)
    else:  # no more processes than partitions; one partition runs here, with no pool to start
        n = len(plan_partitions(corpus, int(config.partition_mb * 1e6)))
        workers = min(config.workers, n)
        runner = task_runner(workers=workers) if workers > 1 else ThreadPoolTaskRunner(max_workers=1)
    with shared_api():
        # A subflow of the calling stage, made here: it is not a deployment of its own.
        subflow = flow(name="shard-partitions", log_prints=True, task_runner=runner)(shard_partitions)
        return subflow(corpus=corpus, tokenizer=str(tokenizer), out_dir=str(out_dir), config=config.to_dict())


@stage_task("shard", retries=1)
def shard_task(
    corpus: str,
    tokenizer: str,
    config: dict,
    out_dir: str,
    parent_run_id: str | None = None,
    dask_address: str | None = None,
) -> dict:
    cfg = ShardConfig.from_dict(config)
    out = Path(out_dir)
    with stage_run("shard", parent_run_id, {"corpus": corpus, **flat_params(shard=cfg)}):
        if not is_complete(out):
            shard_on_runner(corpus, tokenizer, out, cfg, dask_address)
        manifest = read_manifest(out)
        mlflow.log_metrics(numeric(manifest.get("splits", {})))
        mlflow.log_metrics(numeric(manifest.get("metrics", {}), "shard."))
        mlflow.log_artifact(str(out / MANIFEST), artifact_path="shards")
    return {"dir": str(out), "splits": manifest.get("splits", {})}


@flow(name="shard", log_prints=True)
def shard_flow(
    tokenizer: str,
    corpus: str = "bbc",
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05,
    test_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.05,
    dask_address: str | None = None,
    workdir: str = "artifacts",
    mlruns: str = "mlruns",
) -> dict:
    """Split a corpus into train/val/test documents and tokenize train/val into uint16/uint32 shards
    with a checksummed manifest, one task per corpus partition. The same cached task as the
    pipeline's shard stage.

    Args:
        tokenizer: tokenizer.model file, or the directory holding it (the tokenizer flow's output).
        corpus: built-in corpus, a local file or directory, or hf:NAME (the one the tokenizer saw).
        val_fraction: fraction of documents in the val split (assigned by a hash of each document).
        test_fraction: fraction of documents held out for testing (not sharded).
        dask_address: run the partitions on this Dask scheduler (tcp://HOST:PORT); default: a local
            process pool with one worker per core. The shards are the same either way.
        workdir: output root; the shards go to WORKDIR/shard/FINGERPRINT.
        mlruns: local MLflow store (ignored when MLFLOW_TRACKING_URI is set).
    """
    quiet_defaults()
    configure(mlruns)
    cfg = ShardConfig(val_fraction=val_fraction, test_fraction=test_fraction)
    model = Path(tokenizer).resolve()
    model = model / MODEL_FILE if model.is_dir() else model  # the pipeline's input: the same fingerprint
    return run_stage(
        shard_task,
        workdir,
        corpus=pin_corpus(corpus),
        tokenizer=str(model),
        config=cfg.to_dict(),
        dask_address=dask_address,
    )
