"""The encoder: model resolution, pooling contract, encode order, sentence-transformers round trip."""

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from kalm_lib.config import PACKAGED_MINILM, ConfigError, ModelConfig
from kalm_lib.encoder import encoder_from_checkpoint, load_encoder, resolve_model_path

TEXTS = ["a bank lends money", "the river bank", "x", "an exceptionally long sentence " * 6]
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
    with pytest.raises(ConfigError, match="model.pooling"):
        load_encoder(ModelConfig(random_init=TINY_QWEN2, pooling="max"))


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
