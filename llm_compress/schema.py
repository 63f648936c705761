"""The recipe's building blocks: the strict base model every section derives from, and the frame's own sections
(``models``, ``data``, ``runtime``) that every stage reads. Torch-free and import-light: stage and algorithm modules
import their base from here, and :mod:`llm_compress.config` assembles the whole :class:`~llm_compress.config.Recipe`
from these and the sections each registered stage declares (:mod:`llm_compress.pipeline`)."""

from __future__ import annotations

import importlib
import re
from typing import Annotated, Any, Literal, NamedTuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method(NamedTuple):
    """One method of a stage (a KV cache, an unlearning method): the pydantic model of its parameters, their one
    definition (names, defaults, ranges, descriptions), and what runs it as ``'module:attribute'``, imported on first
    use so that validating a recipe imports no torch (None: nothing is built from it, e.g. a search)."""

    model: type[BaseModel]
    runs: str | None

    def load(self) -> Any:
        """The class or function ``runs`` names, imported now."""
        module, name = self.runs.split(":")
        return getattr(importlib.import_module(module), name)


def registry(key: str, *methods: tuple[type[BaseModel], str | None]) -> dict[str, Method]:
    """A method registry, name -> :class:`Method`, in the order given; each method is named by its model's literal
    ``key`` field (``method``), so the name is written once, in the model."""
    return {model.model_fields[key].default: Method(model, runs) for model, runs in methods}


def union(models: Any, key: str) -> Any:
    """The discriminated union of ``models`` keyed on ``key``: the type of a section's field that holds one method."""
    return Annotated[Union[tuple(models)], Field(discriminator=key)]


def with_default_method(data: Any, field: str, default: str) -> Any:
    """A section's raw ``data`` with ``default`` as the method of its ``field`` union when a mapping names none:
    the before-validator of the quantize and kv sections (``scheme: {group_size: 128}`` means RTN's)."""
    if isinstance(data, dict) and isinstance(data.get(field), dict):
        data = {**data, field: {"method": default, **data[field]}}
    return data


class ModelsConfig(Strict):
    teacher: str = Field(
        "embedded",
        description="'embedded' (the demo teacher the bootstrap step trains), a local directory "
        "holding a transformers checkpoint, or a hub id such as 'Qwen/Qwen2.5-1.5B'.")
    student: str = Field(
        "derive",
        description="'derive' to build the student from the teacher (see distill.student), or a "
        "local directory / hub id of a checkpoint that shares the teacher's tokenizer.")
    tokenizer: str | None = Field(None, description="Tokenizer path or hub id; the teacher's if unset.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype while training and evaluating.")


class HFDataset(Strict):
    name: str = Field(description="A `datasets` dataset: hub id or local path (e.g. a folder of JSONL).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); the run is keyed by the "
                                 "commit it resolves to.")
    config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"


class DataConfig(Strict):
    source: Literal["embedded", "files", "hf"] = Field(
        "embedded", description="'embedded': the corpus the bootstrap step builds from Python's own "
        "text; 'files': JSONL (one object per line) or .txt (one document per line) files; "
        "'hf': a `datasets` dataset.")
    train: list[str] = Field(default_factory=list, description="Training files (source: files).")
    eval: list[str] = Field(default_factory=list, description="Held-out files (source: files).")
    hf: HFDataset | None = None
    text_field: str = Field("text", description="Field holding the text in JSONL / datasets rows.")
    domains: list[str] | None = Field(
        None, description="Embedded corpus: the domains to train and evaluate on (all if unset).")
    seq_len: int = Field(128, ge=8, le=32768, description="Tokens per training/eval sequence.")
    max_train_docs: int | None = Field(None, ge=1, description="Read at most this many training documents.")

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source == "files" and not (self.train and self.eval):
            raise ValueError("source 'files' needs both data.train and data.eval file lists")
        if self.source == "hf" and self.hf is None:
            raise ValueError("source 'hf' needs data.hf (name, config, splits)")
        return self


class ExecutorConfig(Strict):
    """Where sharded work (DSIR's shards) runs: this machine's processes, or a Dask or Ray cluster."""

    kind: Literal["local", "dask", "ray"] = Field(
        "local", description="local: a process pool here (select.dsir.processes); dask / ray: a cluster (the "
        "project's dask / ray extra), given by address or started here with `workers` processes.")
    address: str | None = Field(None, description="dask: the scheduler (tcp://host:8786); ray: the cluster "
                                "(ray://host:10001, or auto). Unset: a local cluster of `workers`.")
    workers: int = Field(2, ge=1, description="Worker processes of a local Dask / Ray cluster.")
    retries: int = Field(1, ge=0, le=10, description="Times a failed shard is retried on the cluster.")


class DistributedConfig(Strict):
    """Data-parallel distillation: processes on this node (and more nodes), launched with torchrun by the stage."""

    processes: int = Field(1, ge=1, description="Processes per node that distill together (DDP): one per GPU on "
                           "CUDA, or CPU processes (gloo). Each takes distill.batch_size / (processes x nodes) rows "
                           "of every batch; 1: one process, no torch.distributed.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every process holds the whole student (DistributedDataParallel); fsdp: the "
        "student's weights, gradients and optimiser state (and an online teacher's weights) are sharded over the "
        "processes (FSDP2 fully_shard, per decoder layer), for a student that does not fit one device.")
    nodes: int = Field(1, ge=1, description="Nodes taking part; this one is node 0. The others join with torchrun "
                       "(docs/scaling-out.md) and must see the artifacts folder at the same path.")
    master_addr: str | None = Field(None, description="With nodes > 1: this node's address as the others reach it.")
    master_port: int = Field(29500, ge=1, le=65535, description="With nodes > 1: the port the others join on.")

    @model_validator(mode="after")
    def _master(self) -> "DistributedConfig":
        if self.nodes > 1 and not self.master_addr:
            raise ValueError("nodes > 1 needs master_addr: this node's address as the other nodes reach it")
        return self


# Fields that change how a stage runs, never what it makes, so no stage key holds them: threads, progress bars,
# retries, timeouts and GPU slots of the orchestration, and where the work runs (a DSIR shard or a data-parallel
# rank computes the same result: tests/test_distributed.py, tests/test_dsir.py). tests/test_keys.py lets a stage read
# them and nothing else outside its key.
OPERATIONAL = ("runtime.threads", "runtime.progress", "runtime.retries", "runtime.retry_delay_s", "runtime.gpu_slot",
               "runtime.executor", "runtime.distributed", "runtime.timeouts")


class RuntimeConfig(Strict):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (all cores if unset).")
    progress: bool = Field(True, description="Show progress bars.")
    retries: int = Field(1, ge=0, le=10, description="Prefect flow runs: times a stage is retried after a transient "
                         "error (I/O or network: OSError, e.g. a hub download); never after bad input, a missed gate, "
                         "a NaN loss, a failed export check, a missing file or a timeout.")
    retry_delay_s: float = Field(30.0, ge=0, description="Seconds before a retry.")
    gpu_slot: str | None = Field(None, description="Prefect flow runs: the global concurrency limit (e.g. "
                                 "'gpu:node-a') of which every stage running on CUDA holds one slot, so two runs never "
                                 "share a GPU by accident; create it first (prefect gcl create gpu:node-a --limit 1). "
                                 "Unset: no limit.")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig,
                                     description="Where sharded work runs (data selection's shards).")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="Data-parallel distillation over processes and nodes.")
    timeouts: dict[str, float] = Field(default_factory=dict, description="Prefect flow runs: wall-clock limit in "
                                       "seconds per stage name, e.g. {distill: 36000}; a stage not named has none.")

    @field_validator("timeouts")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if not t > 0}
        if bad:
            raise ValueError(f"timeouts must be positive seconds, got {bad}")
        return v


def check_run_name(name: str) -> str:
    if not RUN_NAME_RE.match(name) or ".." in name:
        raise ValueError(f"'{name}' is not a safe name: use letters, digits, '.', '_' and '-' "
                         "(no '/', no '..', at most 100 characters)")
    return name
