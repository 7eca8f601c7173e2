"""Evenly spaced weight samples (fingerprints of text encoders and VAEs) at real table sizes."""

from __future__ import annotations

import torch

from library.utils.sampling import sample_elements, sample_positions


def test_positions_stay_in_range_for_real_token_tables():
    # CLIP ViT-L (SD1, SDXL TE1) and OpenCLIP bigG (SDXL TE2) token embeddings: n - 1 is not a float32 value
    for n in (49408 * 768, 49408 * 1024, 49408 * 1280, 2**24 + 1, 2**31 + 7):
        idx = sample_positions(n)
        assert idx.dtype == torch.int64 and len(idx) == 64
        assert idx[0] == 0 and idx[-1] == n - 1
        assert bool((idx[1:] > idx[:-1]).all())


def test_positions_small_and_degenerate_sizes():
    assert sample_positions(0).tolist() == []
    assert sample_positions(1).tolist() == [0]
    assert sample_positions(5).tolist() == [0, 1, 2, 3, 4]
    assert sample_positions(127, 3).tolist() == [0, 63, 126]


def test_sample_of_a_real_width_embedding_table_reads_its_last_element():
    t = torch.zeros(49408, 768, dtype=torch.float16)
    t[-1, -1] = 7.0
    s = sample_elements(t)
    assert s.dtype == torch.float16 and float(s[-1]) == 7.0


def test_text_encoder_fingerprint_on_the_real_vocabulary_and_width():
    """The crash of issue #11: a CLIP ViT-L token table (49,408 x 768) in the TE-output cache fingerprint."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.data.te_cache import encoder_fingerprint
    from library.models.tokenizers import build_clip_tokenizer

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=12, max_position_embeddings=77)
    with torch.device("meta"):
        te = CLIPTextModel(cfg)
    te = te.to_empty(device="cpu").to(torch.float16)
    for p in te.parameters():
        p.data.fill_(0.5)
    tok = build_clip_tokenizer()
    a = encoder_fingerprint([te], [tok], None)
    te.get_input_embeddings().weight.data[-1, -1] = 1.0  # the very last element is sampled
    assert encoder_fingerprint([te], [tok], None) != a
