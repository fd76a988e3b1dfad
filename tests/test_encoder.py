"""The encoder: model resolution, pooling contract, encode order, sentence-transformers round trip
(prompts in the training format, a bidirectional decoder staying bidirectional)."""

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from kalm_lib.bidirectional import first_token_sensitivity
from kalm_lib.config import PACKAGED_MINILM, ConfigError, ModelConfig
from kalm_lib.distributed import local_device
from kalm_lib.encoder import Encoder, encoder_from_checkpoint, load_encoder, resolve_model_path, saved_prompts
from kalm_lib.instructions import format_instructed, instruction_prompt

TEXTS = ["a bank lends money", "the river bank", "x", "an exceptionally long sentence " * 6]
INSTRUCTIONS = {"Definitions-query": "Given a dictionary definition, retrieve the word it defines",
                "Synonyms": "Retrieve words with the same meaning as the given word"}
PROMPTS = {name: instruction_prompt(instruction) for name, instruction in INSTRUCTIONS.items()}
TINY_QWEN2 = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(ModelConfig(name_or_path=PACKAGED_MINILM, max_length=64))


def test_packaged_model_resolves_offline():
    path = resolve_model_path(PACKAGED_MINILM)
    assert path.endswith("model")
    with pytest.raises(ConfigError, match="folder not found: ./missing-model"):
        resolve_model_path("./missing-model")
    assert resolve_model_path("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"  # hub ids pass through


def test_encode_is_normalised_and_order_preserving(minilm):
    batched = minilm.encode(TEXTS, batch_size=2)
    single = np.stack([minilm.encode([t])[0] for t in TEXTS])
    assert batched.dtype == np.float32 and batched.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_saved_folder_loads_in_sentence_transformers(minilm, tmp_path):
    minilm.save(tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, batch_size=2), minilm.encode(TEXTS), atol=1e-5)


def test_matches_the_reference_all_minilm_embeddings(minilm):
    reference = SentenceTransformer(resolve_model_path(PACKAGED_MINILM), device="cpu")
    np.testing.assert_allclose(reference.encode(TEXTS), minilm.encode(TEXTS), atol=1e-5)


def test_encoder_cannot_be_made_causal():
    with pytest.raises(ConfigError, match="already bidirectional"):
        load_encoder(ModelConfig(bidirectional=False))


def test_unknown_pooling_is_rejected():
    with pytest.raises(ConfigError, match="pooling must be one of"):  # when the profile loads
        ModelConfig(random_init=TINY_QWEN2, pooling="max")
    encoder = load_encoder(ModelConfig(random_init=TINY_QWEN2))
    with pytest.raises(ConfigError, match="model.pooling"):  # and by the encoder itself
        Encoder(encoder.backbone, encoder.tokenizer, pooling="max")


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_tiny_decoder_checkpoint_round_trip(tmp_path, pooling):
    torch.manual_seed(0)
    cfg = ModelConfig(random_init=TINY_QWEN2, pooling=pooling)
    encoder = load_encoder(cfg)
    encoder.save(tmp_path / "ckpt")
    reloaded = encoder_from_checkpoint(tmp_path / "ckpt", cfg)
    assert reloaded.backbone.config.is_causal is False
    features = encoder.features(TEXTS)
    with torch.no_grad():
        encoder.eval(), reloaded.eval()
        torch.testing.assert_close(encoder(features), reloaded(features), atol=1e-6, rtol=0)


def tiny_decoder(bidirectional: bool = True, attn: str = "sdpa") -> Encoder:
    """The tiny random Qwen2 encoder (MiniLM's tokenizer), the same weights whatever the switches."""
    torch.manual_seed(0)
    cfg = ModelConfig(random_init=TINY_QWEN2, bidirectional=bidirectional, attn_implementation=attn)
    return load_encoder(cfg, PROMPTS).eval()


def reload(encoder: Encoder, path, **kwargs) -> SentenceTransformer:
    """Save ``encoder`` and load the folder with sentence-transformers."""
    encoder.save(path)
    return SentenceTransformer(str(path), device="cpu", **kwargs)


@pytest.mark.parametrize("model", ["minilm", "tiny_qwen2"])
def test_saved_prompts_reproduce_the_training_format(model, minilm, tmp_path):
    encoder = Encoder(minilm.backbone, minilm.tokenizer, max_length=64, prompts=PROMPTS) if model == "minilm" else tiny_decoder()
    st = reload(encoder, tmp_path / "st")
    assert st.prompts | PROMPTS == st.prompts and st.default_prompt_name is None
    assert type(st[0].tokenizer) is type(encoder.tokenizer)
    texts = [*TEXTS, "a bank " * 100]  # the last one is truncated at max_length, prompt included
    for name, instruction in INSTRUCTIONS.items():
        formatted = [format_instructed(instruction, text) for text in texts]
        np.testing.assert_allclose(st.encode(texts, prompt_name=name, batch_size=2), encoder.encode(formatted), atol=1e-5)
    np.testing.assert_allclose(st.encode(texts, batch_size=2), encoder.encode(texts), atol=1e-5)  # documents: bare
    assert saved_prompts(tmp_path / "st") == PROMPTS
    assert encoder_from_checkpoint(tmp_path / "st", ModelConfig(max_length=64)).prompts == PROMPTS


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reloaded_decoder_stays_bidirectional(attn, batch_size, tmp_path):
    """Equal to the bidirectional encoder and far from its causal twin (the same weights with the
    causal mask): a reload that fell back to causal attention fails the second assertion. Batch
    size 1 has no padding, so no mask is built and SDPA's own causal switch is what is tested."""
    bidirectional, causal = tiny_decoder(True, attn), tiny_decoder(False, attn)
    for key, value in causal.backbone.state_dict().items():
        torch.testing.assert_close(bidirectional.backbone.state_dict()[key], value, atol=0, rtol=0)
    st = reload(bidirectional, tmp_path / "st", model_kwargs={"attn_implementation": attn})
    reloaded = st.encode(TEXTS, batch_size=batch_size)
    np.testing.assert_allclose(reloaded, bidirectional.encode(TEXTS, batch_size=batch_size), atol=1e-5)
    assert np.abs(reloaded - causal.encode(TEXTS, batch_size=batch_size)).max(axis=1).min() > 1e-2
    batch = bidirectional.tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert first_token_sensitivity(st[0].auto_model, batch["input_ids"], batch["attention_mask"]) > 1e-3


def test_encoders_are_built_on_the_processes_device(monkeypatch):
    """Mining, soup selection and evaluation load encoders with load_encoder: on a GPU host they must
    land on the process's GPU, not stay on the CPU (``meta`` stands in for a GPU here)."""
    monkeypatch.setattr("kalm_lib.encoder.local_device", lambda: torch.device("meta"))
    assert load_encoder(ModelConfig(random_init=TINY_QWEN2)).device == torch.device("meta")


def test_local_device_is_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device() == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert local_device() == torch.device("cuda", 0)
