"""Typed training configuration: YAML -> dataclasses, ``a.b=c`` overrides.

Parsing has no side effects: no process group, no file writes.  Unknown keys
are rejected naming the key; every field is checked on construction.  The sizes
that follow from a config and a world size are its layout (:mod:`.layout`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..backends import BACKENDS
from ..patterns import Pattern

#: Keys of the DeepSpeed section that the trainer fills from ``train`` (set them there instead).
DS_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
#: DeepSpeed schedulers whose length is ``params.total_num_steps``; unset, it follows ``train.steps``.
SCHEDULES_WITH_LENGTH = ("WarmupCosineLR", "WarmupDecayLR")

#: Top-level keys DeepSpeed reads (its config reference and ``deepspeed/runtime/config.py``).  DeepSpeed
#: ignores any other key, so a misspelt section (``zero_optimisation``) would silently be off.
DS_KEYS = frozenset((
    "optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast", "dtype", "data_types",
    "communication_data_type", "seq_parallel_communication_data_type", "gradient_clipping",
    "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print",
    "wall_clock_breakdown", "dump_state", "memory_breakdown", "flops_profiler", "activation_checkpointing",
    "sparse_attention", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "monitor_config",
    "elasticity", "aio", "autotuning", "compression_training", "data_efficiency", "curriculum_learning",
    "checkpoint", "pipeline", "disable_allgather", "eigenvalue", "progressive_layer_drop", "quantize_training",
    "dataloader_drop_last", "nebula", "hybrid_engine", "compile", "timers", "weight_quantization",
    "graph_harvesting", "disable_python_gc", "log_level", "legacy_fusion", "lower_precision_safe_modules",
    "managed_gradient_accumulation", "expert_parallel", "use_data_before_expert_parallelism",
    "vocabulary_size", "zero_quantized_weights", "zero_quantized_gradients", "zero_hpz_partition_size"))


def _fail(name: str, allowed: str, value) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, f"an integer >= {low}", value)


def _pos_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        _fail(name, "a number > 0", value)


#: Field metadata of model settings that change how a step runs but not the model or its weights.
RUNTIME = {"runtime": True}


#: the string values of ``ModelConfig.activation_checkpointing`` (besides false and true)
CHECKPOINTING_MODES = ("keep_attention", "selective")


@dataclass
class ModelConfig:
    """Decoder-only LM shape and the attention pattern of every layer."""

    vocab_size: int = 512           #: must equal the tokenizer's vocabulary size
    dim: int = 64                   #: model width
    n_layers: int = 2
    n_heads: int = 4                #: query heads
    n_kv_heads: int = 2             #: key/value heads (GQA); divides n_heads
    mlp_hidden: int = 0             #: SwiGLU hidden width; 0 -> 8/3 * dim rounded up to 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    #: fields marked ``RUNTIME`` change how a step runs, not the model: a checkpoint resumes across them
    #: what backward recomputes: false (nothing: every activation is kept), true (each whole layer
    #: from its input: the least memory, the attention forward runs twice per step), "keep_attention"
    #: (each whole layer, but the attention op's output and log-sum-exp stay from the forward: N x dim
    #: more per layer than true, and with the Triton kernels on one GPU the attention forward runs once)
    #: or "selective" (everything but the attention op, whose q, k, v, output and log-sum-exp are kept:
    #: about (2 + 2 x n_kv_heads / n_heads) x N x dim more per layer than true, the attention forward
    #: once, nothing recomputed for the attention's backward)
    activation_checkpointing: bool | str = field(default=False, metadata=RUNTIME)
    #: how many layers, from the first, activation_checkpointing applies to (unset: all); the later
    #: ones keep every activation (no recompute), for memory a run has to spare
    checkpoint_layers: int | None = field(default=None, metadata=RUNTIME)
    #: tokens per cross-entropy chunk (bounds the logits held at once)
    loss_chunk: int = field(default=4096, metadata=RUNTIME)
    #: tokens per checkpointed MLP chunk under activation checkpointing (bounds the MLP's hidden
    #: activations held at once; 0 = the whole shard at once)
    mlp_chunk: int = field(default=65536, metadata=RUNTIME)
    #: with activation checkpointing, keep each layer's saved input in pinned host memory
    #: (N x dim x 2 bytes per layer moved each way per step) for contexts whose layer inputs
    #: do not fit on the GPU; needs activation_checkpointing true or "keep_attention", not "selective"
    offload_activations: bool = field(default=False, metadata=RUNTIME)
    #: run RMSNorm, rotary and SwiGLU's silu(gate) * up as one compiled kernel each (torch.compile,
    #: forward and backward) on CUDA; the same float32 arithmetic, eager on other devices
    fused_elementwise: bool = field(default=True, metadata=RUNTIME)
    #: one of sparse_parallel.backends.BACKENDS: "auto", "reference", "triton"
    attention_backend: str = field(default="auto", metadata=RUNTIME)
    #: default pattern of every layer (a pattern dict, see sparse_parallel.patterns)
    pattern: dict = field(default_factory=lambda: {"components": [{"type": "window", "left": 64}]})
    #: per-layer overrides: {layer index: pattern dict}
    layer_patterns: dict = field(default_factory=dict)
    #: a Hugging Face Llama-style folder (config.json + *.safetensors, e.g. from `sparse-parallel export`)
    #: whose weights start training; its shape must equal the fields above, the patterns stay these
    init_from: str | None = field(default=None, metadata=RUNTIME)

    @classmethod
    def runtime_fields(cls) -> frozenset[str]:
        """Names of the fields a checkpoint may be resumed across (marked ``RUNTIME``)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))

    def validate(self) -> None:
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            _fail("model.init_from", "a Hugging Face model folder path (or unset)", self.init_from)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "loss_chunk"):
            _int(f"model.{name}", getattr(self, name), 1)
        _int("model.mlp_hidden", self.mlp_hidden, 0)
        _int("model.mlp_chunk", self.mlp_chunk, 0)
        if self.checkpoint_layers is not None and (isinstance(self.checkpoint_layers, bool)
                                                   or not isinstance(self.checkpoint_layers, int)
                                                   or not 0 <= self.checkpoint_layers <= self.n_layers):
            _fail("model.checkpoint_layers", f"unset or an integer in [0, {self.n_layers}] (model.n_layers)",
                  self.checkpoint_layers)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                             f"({self.n_kv_heads})")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"model.dim ({self.dim}) must be n_heads ({self.n_heads}) x an even head dim")
        _pos_float("model.rope_theta", self.rope_theta)
        _pos_float("model.norm_eps", self.norm_eps)
        for name in ("tie_embeddings", "offload_activations", "fused_elementwise"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"model.{name}", "true or false", getattr(self, name))
        if (not isinstance(self.activation_checkpointing, bool)
                and self.activation_checkpointing not in CHECKPOINTING_MODES):
            _fail("model.activation_checkpointing", "one of [false, true, "
                  + ", ".join(repr(m) for m in CHECKPOINTING_MODES) + "]", self.activation_checkpointing)
        if self.offload_activations and self.activation_checkpointing == "selective":
            from ..model.transformer import OFFLOAD_NEEDS_FULL

            raise ValueError(OFFLOAD_NEEDS_FULL)
        if self.attention_backend not in BACKENDS:
            _fail("model.attention_backend", f"one of {list(BACKENDS)}", self.attention_backend)
        for key in self.layer_patterns:
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < self.n_layers:
                _fail("model.layer_patterns key", f"a layer index in [0, {self.n_layers})", key)
        self.patterns()

    def patterns(self) -> list[Pattern]:
        """The attention pattern of each layer."""
        out = []
        for layer in range(self.n_layers):
            spec = self.layer_patterns.get(layer, self.pattern)
            try:
                out.append(Pattern.from_dict(spec))
            except ValueError as e:
                where = f"model.layer_patterns[{layer}]" if layer in self.layer_patterns else "model.pattern"
                raise ValueError(f"{where}: {e}") from None
        return out


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenised."""

    #: "stdlib" (this Python's standard library source, no download) or a file/folder path
    path: str = "stdlib"
    #: "auto" (from the suffixes), "text", "jsonl", "parquet", "arrow" or "saved" (a save_to_disk folder)
    format: str = "auto"
    #: globs of files to leave out of a data.path folder or glob (matched on relative path and name)
    exclude: list = field(default_factory=list)
    num_proc: int = 1               #: tokenisation processes (datasets.map); the tokens do not depend on it
    #: a mixture instead of data.path: [{path, weight, format?, text_field?, exclude?}, ...]; each sequence
    #: comes from one source, chosen with the weights from (data.seed, sample index): deterministic, resumable
    sources: list = field(default_factory=list)
    text_field: str = "text"        #: column of jsonl/parquet records holding the text
    #: sentencepiece .model file (sparse-parallel tokenizer train) or Hugging Face tokenizer.json
    tokenizer: str = ""
    cache_dir: str = ".cache/tokens"  #: tokenised corpus cache, relative to the working directory
    max_bytes: int = 8_000_000      #: stdlib corpus: take a deterministic subset of about this size
    eval_sequences: int = 4         #: held-out sequences (the end of the stream) for evaluation
    seed: int = 0                   #: order of training sequences
    #: attend only within documents: a document starts at each sequence's first token and after every
    #: EOS, and every layer's pattern is restricted to them (``Pattern.within``); RoPE positions stay
    #: those of the sequence.  Held-out loss is then also reported by position within a document
    document_mask: bool = False

    def validate(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            _fail("data.path", "'stdlib' or a file/folder path", self.path)
        from .data import FORMATS

        if self.format not in FORMATS:
            _fail("data.format", f"one of {list(FORMATS)}", self.format)
        if not isinstance(self.exclude, list) or not all(isinstance(x, str) and x for x in self.exclude):
            _fail("data.exclude", "a list of glob patterns, e.g. ['README*', '*.md']", self.exclude)
        _int("data.num_proc", self.num_proc, 1)
        if not isinstance(self.sources, list):
            _fail("data.sources", "a list of {path, weight, ...} mappings", self.sources)
        for i, src in enumerate(self.sources):
            from .data import SOURCE_KEYS

            if not isinstance(src, dict) or "path" not in src:
                _fail(f"data.sources[{i}]", f"a mapping with a 'path' (keys: {list(SOURCE_KEYS)})", src)
            unknown = sorted(set(src) - set(SOURCE_KEYS))
            if unknown:
                raise ValueError(f"unknown key(s) {unknown} in data.sources[{i}]; allowed: {list(SOURCE_KEYS)}")
            _pos_float(f"data.sources[{i}].weight", src.get("weight", 1.0))
            sub = dataclasses.replace(self, sources=[], **{k: v for k, v in src.items() if k != "weight"})
            try:
                sub.validate()
            except ValueError as e:
                raise ValueError(f"data.sources[{i}]: {e}") from None
        if self.sources and self.path != "stdlib":
            raise ValueError(f"data.path={self.path!r} and data.sources are both set; put the path in a source")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            _fail("data.tokenizer", "a sentencepiece .model path (make one with `sparse-parallel tokenizer "
                  "train`) or a Hugging Face tokenizer.json", self.tokenizer)
        _int("data.max_bytes", self.max_bytes, 1)
        _int("data.eval_sequences", self.eval_sequences, 0)
        _int("data.seed", self.seed, 0)
        if not isinstance(self.document_mask, bool):
            _fail("data.document_mask", "true or false", self.document_mask)


@dataclass
class ParallelConfig:
    #: ranks sharing one sequence (the world size must be a multiple), or "all": every rank holds a
    #: shard of one sequence, so adding GPUs lengthens the context (tokens_per_gpu x world size)
    sequence_parallel: int | str = 1

    def validate(self) -> None:
        sp = self.sequence_parallel
        if sp != "all" and (isinstance(sp, bool) or not isinstance(sp, int) or sp < 1):
            _fail("parallel.sequence_parallel", "an integer >= 1 or 'all'", sp)

    def size(self, world_size: int) -> int:
        return world_size if self.sequence_parallel == "all" else self.sequence_parallel


@dataclass
class TrainSection:
    """Batch geometry and the loop."""

    tokens_per_gpu: int = 256       #: sequence tokens on each rank; context = this x sequence_parallel
    micro_batch: int = 1            #: sequences per rank per micro step
    grad_accum: int = 1
    steps: int = 20
    seed: int = 0                   #: parameter initialisation
    log_every: int = 1
    eval_every: int = 0             #: 0 -> evaluate only at the end
    progress: bool = True           #: tqdm bar on rank 0
    peak_tflops: float = 0.0        #: per-device peak for the MFU estimate; 0 -> known GPUs only
    #: a collective that does not complete in this time (a hung, stopped or dead rank) ends the run
    #: with CollectiveTimeout.  Generous by default: the first one waits for local rank 0 to tokenise
    #: the corpus, and checkpoint saves wait for the slowest writer.
    collective_timeout_s: int = 1800

    def validate(self) -> None:
        for name in ("tokens_per_gpu", "micro_batch", "grad_accum", "steps", "log_every", "collective_timeout_s"):
            _int(f"train.{name}", getattr(self, name), 1)
        _int("train.seed", self.seed, 0)
        _int("train.eval_every", self.eval_every, 0)
        if not isinstance(self.progress, bool):
            _fail("train.progress", "true or false", self.progress)
        if isinstance(self.peak_tflops, bool) or not isinstance(self.peak_tflops, (int, float)) \
                or self.peak_tflops < 0:
            _fail("train.peak_tflops", "a number >= 0", self.peak_tflops)


@dataclass
class CheckpointSection:
    every: int = 0                  #: save every N steps (0 -> by time, at the end and on preemption)
    #: also save when this many minutes passed since the last save (0 -> never by time)
    every_minutes: float = 30.0
    keep: int = 2                   #: complete checkpoints kept (by step; the one just written always)

    def validate(self) -> None:
        _int("checkpoint.every", self.every, 0)
        _int("checkpoint.keep", self.keep, 1)
        if isinstance(self.every_minutes, bool) or not isinstance(self.every_minutes, (int, float)) \
                or self.every_minutes < 0:
            _fail("checkpoint.every_minutes", "a number >= 0", self.every_minutes)


@dataclass
class EvalSection:
    buckets: int = 8                #: position buckets along the context for loss-by-position

    def validate(self) -> None:
        _int("eval.buckets", self.buckets, 1)


@dataclass
class RunSection:
    dir: str = "runs/tiny"          #: run directory: checkpoints, metrics.jsonl, config, plots
    tensorboard: bool = True

    def validate(self) -> None:
        if not isinstance(self.dir, str) or not self.dir:
            _fail("run.dir", "a directory path", self.dir)
        if not isinstance(self.tensorboard, bool):
            _fail("run.tensorboard", "true or false", self.tensorboard)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)
    #: passed to deepspeed.initialize (ZeRO stage, bf16, gradient_clipping, optimizer, scheduler)
    deepspeed: dict = field(default_factory=lambda: {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if not isinstance(self.deepspeed, dict):
            _fail("deepspeed", "a mapping (DeepSpeed config)", self.deepspeed)
        for key in DS_OWNED_KEYS:
            if key in self.deepspeed:
                raise ValueError(f"deepspeed.{key} is set by the trainer from train.micro_batch, "
                                 "train.grad_accum and the world size; remove it")
        for key in self.deepspeed:
            if key not in DS_KEYS:
                near = difflib.get_close_matches(str(key), sorted(DS_KEYS), n=1)
                raise ValueError(f"unknown DeepSpeed key deepspeed.{key}"
                                 + (f" (did you mean deepspeed.{near[0]}?)" if near else "")
                                 + f"; DeepSpeed would ignore it.  Allowed: {sorted(DS_KEYS)}")
        self.scheduler()

    def scheduler(self) -> dict | None:
        """The DeepSpeed scheduler section as the trainer passes it: a schedule's length
        (``params.total_num_steps``) follows ``train.steps`` unless set."""
        sched = self.deepspeed.get("scheduler")
        if sched is None:
            return None
        if not isinstance(sched, dict) or not isinstance(sched.get("params", {}), dict):
            _fail("deepspeed.scheduler", "a mapping {type: ..., params: {...}}", sched)
        sched = copy.deepcopy(sched)
        if sched.get("type") not in SCHEDULES_WITH_LENGTH:
            return sched
        params = sched.setdefault("params", {})
        _int("deepspeed.scheduler.params.total_num_steps", params.setdefault("total_num_steps", self.train.steps), 1)
        _int("deepspeed.scheduler.params.warmup_num_steps", params.get("warmup_num_steps", 1000), 0)
        return sched

    def schedule_warnings(self) -> list[str]:
        """What the trainer prints about a schedule that cannot be what was meant (a shorter stated
        length is kept: stopping a longer run early with train.steps is legitimate)."""
        sched = self.scheduler()
        if sched is None or sched.get("type") not in SCHEDULES_WITH_LENGTH:
            return []
        total, warmup = sched["params"]["total_num_steps"], sched["params"].get("warmup_num_steps", 1000)
        out = []
        if total < self.train.steps:
            out.append(f"deepspeed.scheduler.params.total_num_steps={total} is less than train.steps="
                       f"{self.train.steps}: the learning rate stays at its floor after step {total}; remove it "
                       "to have the schedule follow train.steps")
        if warmup > total:
            out.append(f"deepspeed.scheduler.params.warmup_num_steps={warmup} (DeepSpeed's default is 1000) exceeds "
                       f"the schedule's {total} steps: the learning rate never reaches its peak")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: Any, where: str):
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(f"unknown config key {where + '.' if where else ''}{key}; "
                             f"allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = f"{where}.{key}" if where else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, sub)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            kwargs[key] = float(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"override {dotted!r}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _int_keys(d: dict) -> dict:
    """YAML and overrides give layer indices as ints or strings; store them as ints."""
    out = {}
    for k, v in d.items():
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k)
        out[k] = v
    return out


def _check_top_level(data, where: str) -> None:
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{where}: the top level must be a mapping of sections "
                         f"{[f.name for f in dataclasses.fields(TrainConfig)]}, got a {type(data).__name__}")


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    _check_top_level(data, "config")
    data = copy.deepcopy(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set(data, key, value)
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("layer_patterns"), dict):
        model["layer_patterns"] = _int_keys(model["layer_patterns"])
    cfg = _build(TrainConfig, data, "")
    cfg.validate()
    return cfg


def load_config(path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config, apply ``a.b=c`` overrides, validate.  No side effects."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {e}") from None
    _check_top_level(data, f"config {path}")
    return config_from_dict(data, overrides)
