"""Shared fixtures: tiny random models saved as real transformers folders (no network)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")


def encoder_tokenizer_dir():
    from memfit.models import resolve
    return resolve("default-encoder")[1]


def tiny_config(model_type: str = "llama", **kw):
    """A small config of a supported family; vocab matches the embedded encoder's tokenizer."""
    from transformers import AutoConfig

    base = dict(vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def save_tiny(path, model_type="llama", seed=0, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw)).eval()
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(encoder_tokenizer_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from memfit.models import load_model
    return load_model(str(tiny_llama_dir))


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture():
    return tiny_config


@pytest.fixture(name="save_tiny")
def _save_tiny_fixture():
    return save_tiny
