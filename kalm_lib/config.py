"""Run configuration: typed dataclasses filled from a profile YAML plus dotted overrides.

This file is the one config surface of the study: every knob is a field below, with its default
and a comment saying what it does. A profile (``kalm_lib/profiles/<name>.yaml``) sets some of them
per section (``data``, ``model``, ``pretrain``, ``finetune``, ``soup``, ``evaluation``). Notebooks
receive the profile name and a dict of dotted overrides (``{"finetune.focal_gamma": 0.0}``) from
papermill; unknown profiles, sections or fields stop with an error that names them, and values out
of range are rejected when the profile loads, before any work.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .layout import PROFILES_DIR

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")  # transformers attention kernels
POOLING_MODES = ("mean", "last", "cls")  # kalm_lib.pooling
SOUP_METHODS = ("uniform", "greedy")  # kalm_lib.soup / pipeline.run_soup
QUANTIZATIONS = ("int8", "binary")  # kalm_lib.evaluation compressed embeddings
DEDUP_ENGINES = ("datatrove", "datasketch")  # near-duplicate removal inside a training set (kalm_lib.curation)


class ConfigError(ValueError):
    """A profile, override or parameter is unknown, has the wrong type or is out of range."""


class FieldError(ConfigError):
    """One field of a config dataclass is invalid. ``field`` is its name inside the dataclass;
    :func:`load_profile` reports it as ``<profile path>: <section>.<field> <problem>``."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.field = name
        self.problem = problem


def _require(name: str, value: Any, ok: bool, rule: str) -> None:
    """Raise :class:`FieldError` for ``name`` unless ``ok``; ``rule`` says what is allowed."""
    if not ok:
        raise FieldError(name, f"must be {rule}, got {value!r}")


def _at_least(cfg: object, low: int, *names: str) -> None:
    """Every named field of ``cfg`` is >= ``low``."""
    for name in names:
        value = getattr(cfg, name)
        _require(name, value, value >= low, f">= {low}")


def _positive(cfg: object, *names: str) -> None:
    """Every named field of ``cfg`` is > 0."""
    for name in names:
        value = getattr(cfg, name)
        _require(name, value, value > 0, "> 0")


def _fraction(cfg: object, name: str, interval: str) -> None:
    """Field ``name`` of ``cfg`` lies in ``interval``: ``"(0, 1)"``, ``"(0, 1]"`` or ``"[0, 1]"``."""
    value = getattr(cfg, name)
    low_ok = value > 0 if interval[0] == "(" else value >= 0
    high_ok = value < 1 if interval[-1] == ")" else value <= 1
    _require(name, value, low_ok and high_ok, f"in {interval}")


@dataclass(frozen=True)
class DataConfig:
    """Curation: which data cards to read and how much of each derived set to keep."""

    cards_dir: str = "data_cards/offline"  # folder of source + derived cards, relative to the repo root
    hub_files_dir: str = ""  # "" = the hub; else a folder of <source card name>.parquet read in place of each hub source (rehearsal)
    eval_word_fraction: float = 0.1  # share of words held out (stable hash) for the test split; as many again for validation
    max_stage1_pairs_per_source: int = 20000  # cap per stage-1 derived set, after filtering
    max_stage2_per_source: int = 4000  # cap per stage-2 derived set, after filtering
    min_chars: int = 2  # length filter on query and positive, in characters
    max_chars: int = 400
    near_dup_threshold: float = 0.85  # MinHash Jaccard above which a row is a near-duplicate of an earlier one
    eval_near_dup_threshold: float = 0.8  # MinHash Jaccard (char 5-grams) at which a training text copies an eval text
    sample_seed: int | None = None  # seed of training-row sampling and mining draws (None = the profile seed); never of the split
    eval_retrieval_queries: int = 500  # size of the held-out definition-retrieval task (queries)
    eval_pairs: int = 600  # size of the held-out synonym/antonym pair task (pairs)
    eval_clusters: int = 40  # size of the held-out synset clustering task (clusters)
    hard_negatives: int = 3  # M: hard negatives per stage-2 row (given ones first, then mined)
    hard_negative_rank_min: int = 10  # mining window [rank_min, rank_max) of the ranked candidate pool
    hard_negative_rank_max: int = 50
    mining_score_decimals: int = 4  # mining ranks scores rounded to this many decimals (stable across CPUs)
    mining_consistency_filter: bool = True  # drop rows whose positive ranks below the mining window's start
    mining_pool_max: int = 0  # candidate words to mine from (a seeded sample); 0 = every word not held out

    # --- scale path (issue #14): de-duplication engine and streamed curation to Parquet shards ---
    dedup_engine: str = "datatrove"  # near-dup removal: datatrove (MinHash pipeline, local executor) or datasketch (pre-#14, in memory)
    curation_workers: int = 1  # processes of datatrove's local executor (tasks run one after another with 1)
    shard_rows: int = 100_000  # rows per Parquet shard of a streamed source (memory per curation task follows it)
    stream_hub_sets: bool = False  # stage-1 hub_pairs sets: streamed to Parquet shards (kalm_lib.scale), trained from them

    def __post_init__(self) -> None:
        _fraction(self, "eval_word_fraction", "(0, 1)")
        _at_least(self, 1, "max_stage1_pairs_per_source", "max_stage2_per_source", "min_chars")
        _require("max_chars", self.max_chars, self.max_chars >= self.min_chars, f">= min_chars ({self.min_chars})")
        _fraction(self, "near_dup_threshold", "(0, 1]")
        _fraction(self, "eval_near_dup_threshold", "(0, 1]")
        if self.sample_seed is not None:
            _at_least(self, 0, "sample_seed")
        _at_least(self, 1, "eval_retrieval_queries", "eval_pairs", "eval_clusters")
        _at_least(self, 0, "hard_negatives", "hard_negative_rank_min", "mining_score_decimals", "mining_pool_max")
        low, high = self.hard_negative_rank_min, self.hard_negative_rank_max
        _require("hard_negative_rank_max", high, high > low, f"> hard_negative_rank_min ({low})")
        _require("dedup_engine", self.dedup_engine, self.dedup_engine in DEDUP_ENGINES, f"one of {DEDUP_ENGINES}")
        _at_least(self, 1, "curation_workers", "shard_rows")


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: name or path, pooling, attention switch and numerics."""

    name_or_path: str = PACKAGED_MINILM  # packaged alias, a local folder, or a hub id (e.g. Qwen/Qwen2-0.5B)
    pooling: str = "mean"  # mean (the paper's), last (last real token) or cls
    bidirectional: bool = True  # drop a decoder's causal mask (an encoder is bidirectional already)
    attn_implementation: str = "sdpa"  # sdpa, eager or flash_attention_2 (transformers attention kernels; GPU hosts)
    max_length: int = 64  # tokens per text; longer texts are truncated
    bf16: bool = False  # bf16 autocast of training forward passes (CUDA or CPU)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% more time)
    random_init: dict[str, Any] = field(default_factory=dict)  # {model_type, sizes...}: a random model from a config (tests)

    def __post_init__(self) -> None:
        attn = self.attn_implementation
        _require("attn_implementation", attn, attn in ATTN_IMPLEMENTATIONS, f"one of {ATTN_IMPLEMENTATIONS}")
        _at_least(self, 1, "max_length")
        _require("pooling", self.pooling, self.pooling in POOLING_MODES, f"one of {POOLING_MODES}")


@dataclass(frozen=True)
class TrainConfig:
    """One contrastive stage (pre-training or fine-tuning)."""

    enabled: bool = True  # false: skip the stage (stage 1 off saves the base model as its output)
    steps: int = 100  # optimizer steps
    batch_size: int = 32  # global batch (queries), split evenly over processes; one derived set per batch
    mini_batch_size: int = 0  # > 0: GradCache, chunks of at most mini_batch_size x max_length padded tokens
    chunk_tokens: int = 2048  # padded tokens per length-sorted forward chunk without GradCache
    learning_rate: float = 2e-5  # AdamW peak learning rate (linear warm-up, then linear decay to 0)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_ratio: float = 0.1  # share of steps spent warming up
    temperature: float = 0.05  # tau in exp(cos / tau)
    focal_gamma: float = 0.0  # gamma of the focal weight (1 - p)^gamma on -log p; 0 = plain InfoNCE
    hard_negative_mixing: bool = False  # synthesise extra hard negatives per query inside the batch
    mixing_top_k: int = 4  # mix from each query's k hardest negatives
    mixing_pairs: int = 2  # synthetic negatives mixing two hard negatives, per query
    mixing_query: int = 1  # synthetic negatives mixing the query into a hard negative, per query
    mixing_query_beta_max: float = 0.5  # query share beta ~ U(0, beta_max) in those, <= 0.5
    matryoshka_dims: list[int] = field(default_factory=list)  # [] = off; else loss summed over these embedding prefixes
    matryoshka_weights: list[float] = field(default_factory=list)  # one weight per matryoshka dim
    grad_clip: float = 1.0  # max global gradient norm (clipped before every optimizer step)
    checkpoint_every: int = 0  # > 0: save a resumable state every this many steps
    keep_checkpoints: int = 2  # newest resumable state_<step> folders a stage keeps while it runs
    log_every: int = 10  # steps between progress callbacks
    seeds: list[int] = field(default_factory=lambda: [0])  # stage 2: one run per seed (the soup's ingredients)

    def __post_init__(self) -> None:
        _at_least(self, 0, "steps", "mini_batch_size", "checkpoint_every")
        _at_least(self, 1, "batch_size", "chunk_tokens", "keep_checkpoints")
        _positive(self, "learning_rate", "temperature", "grad_clip")
        _at_least(self, 0, "weight_decay", "focal_gamma")
        _fraction(self, "warmup_ratio", "[0, 1]")
        self._check_mixing()
        self._check_matryoshka()
        _require("seeds", self.seeds, all(seed >= 0 for seed in self.seeds), "a list of seeds >= 0")

    def _check_mixing(self) -> None:
        """Hard-negative mixing (:class:`~kalm_lib.hard_negative_mixing.MixingConfig`): mix from
        at least one hardest negative, non-negative counts, query share ``beta_max`` in [0, 0.5]."""
        _at_least(self, 1, "mixing_top_k")
        _at_least(self, 0, "mixing_pairs", "mixing_query")
        beta = self.mixing_query_beta_max
        _require("mixing_query_beta_max", beta, 0.0 <= beta <= 0.5, "in [0, 0.5]")

    def _check_matryoshka(self) -> None:
        """One weight > 0 per dim; dims positive and strictly decreasing."""
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        _require("matryoshka_weights", weights, len(weights) == len(dims), f"one weight per matryoshka_dims entry {dims}")
        ordered = all(d >= 1 for d in dims) and all(a > b for a, b in zip(dims, dims[1:]))
        _require("matryoshka_dims", dims, ordered, "positive and strictly decreasing")
        _require("matryoshka_weights", weights, all(w > 0 for w in weights), "> 0")


@dataclass(frozen=True)
class SoupConfig:
    """Stage 3: which soups to build from the stage-2 checkpoints."""

    methods: list[str] = field(default_factory=lambda: ["uniform", "greedy"])  # uniform: mean of all; greedy: best-first
    selection_task: str = "KalmDefinitionRetrieval"  # validation-split task that ranks checkpoints for greedy

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in SOUP_METHODS]
        _require("methods", self.methods, not unknown, f"a list of {SOUP_METHODS}")


@dataclass(frozen=True)
class EvalConfig:
    """MTEB evaluation: local offline tasks and, on hub-connected hosts, standard ones."""

    local_tasks: list[str] = field(  # held-out offline tasks built from the curated eval payloads
        default_factory=lambda: [
            "KalmDefinitionRetrieval",
            "KalmSynonymAntonymPairClassification",
            "KalmSynsetClustering",
        ]
    )
    standard_tasks: list[str] = field(default_factory=list)  # mteb task names (hub hosts)
    task_data_dir: str = ""  # "" = the hub; else a folder of hub-layout copies (<org>__<name>/) of the standard tasks' datasets (rehearsal)
    benchmarks: list[str] = field(default_factory=list)  # mteb benchmarks, e.g. ["MTEB(eng, v1)"] (hub hosts): their tasks
    # join standard_tasks, and each gets Mean(Task) / Mean(TaskType) as the leaderboard computes them
    batch_size: int = 128  # encode batch size
    matryoshka_dims: list[int] = field(default_factory=list)  # final model and each stage-2 checkpoint also scored truncated to these dims
    quantizations: list[str] = field(default_factory=list)  # final model also scored as int8 / binary codes
    skip_upstream_models: bool = False  # do not evaluate base and stage 1 (grid variants that reuse them)
    reference_card: str = "data_cards/reference/mteb_eng_v2_published.yaml"  # published scores beside the run; "" hides

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size")
        dims = self.matryoshka_dims
        _require("matryoshka_dims", dims, all(d >= 1 for d in dims), "positive")
        unknown = [q for q in self.quantizations if q not in QUANTIZATIONS]
        _require("quantizations", self.quantizations, not unknown, f"a list of {QUANTIZATIONS}")


@dataclass(frozen=True)
class Profile:
    """Everything one run of the notebook series needs."""

    name: str  # the profile's file name unless set
    seed: int = 42  # curation, held-out split, stage 1 and base-model initialisation
    threads: int = 0  # torch CPU threads (0 = torch's default)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    soup: SoupConfig = field(default_factory=SoupConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _at_least(self, 0, "seed", "threads")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, for manifests and YAML."""
        return dataclasses.asdict(self)


def available_profiles() -> list[str]:
    """Names of the profiles shipped in ``kalm_lib/profiles``."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    """Resolve a profile name (``cpu``) or a YAML path to a file, or fail naming the choices."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"}:
        if not candidate.is_file():
            raise ConfigError(f"profile file not found: {candidate}")
        return candidate
    path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown profile {name_or_path!r}; available: {', '.join(available_profiles())}"
        )
    return path


def load_profile(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Profile:
    """Read a profile YAML, apply dotted overrides and return a validated :class:`Profile`.

    Every problem (unknown key, wrong type, value out of range) is a :class:`ConfigError` reading
    ``<profile path>: <section>.<field> <problem>``, raised here, before any work starts.
    """
    path = profile_path(name_or_path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, path)
    return _build(Profile, raw, path)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any, path: Path) -> None:
    """Set ``raw[a][b] = value`` for the key ``"a.b"``."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Mapping[str, Any], path: Path, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` (the section ``prefix``, e.g. ``"finetune."``) from ``raw``,
    rejecting unknown keys, wrong types and values its ``__post_init__`` finds out of range."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{path}: unknown parameter(s) {[prefix + key for key in unknown]}; allowed: {sorted(names)}"
        )
    try:
        kwargs = {}
        for key, value in raw.items():
            hint = hints[key]
            if dataclasses.is_dataclass(hint):
                _require(key, value, isinstance(value, Mapping), "a mapping of parameters")
                kwargs[key] = _build(hint, value, path, f"{prefix}{key}.")
            else:
                kwargs[key] = _coerce(value, hint, key)
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(f"{path}: {prefix}{exc.field} {exc.problem}") from None


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a type hint (``T``, ``T | None`` or ``list[T]``, items checked),
    allowing an int where a float is expected; a mismatch is a :class:`FieldError` for ``name``."""
    arguments = typing.get_args(hint)
    if type(None) in arguments:
        if value is None:
            return None
        (hint,) = [argument for argument in arguments if argument is not type(None)]
    origin = typing.get_origin(hint) or hint
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    is_number = origin in (int, float) and isinstance(value, bool)  # YAML true is an int to Python
    _require(name, value, isinstance(value, origin) and not is_number, _TYPE_WORDS.get(origin, str(origin)))
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_coerce(element, item, f"{name}[{index}]") for index, element in enumerate(value)]
    return value
