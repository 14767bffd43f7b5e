"""Shared fixtures: tiny random models built from configs (no hub), and the real-data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from optimum_lowrank.data import shared_data_dir

#: The shared real data: ``$OPTIMUM_LOWRANK_DATA``, else ``shared/data`` beside the checkout (as the package finds it).
DATA_DIR = shared_data_dir() or Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"real data folder {DATA_DIR} is missing (shared/data must sit beside the checkout, or set OPTIMUM_LOWRANK_DATA)")
    return DATA_DIR


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread avoids OpenMP oversubscription on a shared CPU (10x slower with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama_ids() -> torch.Tensor:
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))
