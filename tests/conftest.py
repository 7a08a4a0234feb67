"""Shared fixtures: tiny random models saved as real transformers folders (no network)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # on a GPU: the first launch shape per layer shape (timing every candidate of every
    # parametrized shape took the kernels' tests past 10 minutes on an H200); the chooser's own
    # test times (tests/kernels/test_choices.py). Never read or write the user's choice cache.
    os.environ.setdefault("MEMFIT_TRITON_CHOICE", "first")
os.environ.setdefault("MEMFIT_KERNEL_CHOICES", "0")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the workers share the cores (N
    # workers each on all of them made the suite 35% slower on 2 cores: their threads contend)
    torch.set_num_threads(max(1, torch.get_num_threads()
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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


def tiny_encoder(model_type="bert", seed=0, **kw):
    """A tiny random encoder (AutoModel). Initialised 5x wider than transformers' default (0.1):
    at 0.02 its embeddings hardly depend on the blocks (int8 and 2:4 both give cosine 1.0000),
    at 0.1 compression shows (int8 0.99996, 4-bit RTN 0.990, Wanda 2:4 0.905)."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    kw = {"initializer_range": 0.1, **kw}
    return AutoModel.from_config(tiny_config(model_type, num_key_value_heads=None, **kw)).eval()


def save_tiny_encoder(path, model_type="bert", seed=0, tokenizer=True, **kw):
    """A tiny random encoder folder with the embedded encoder's tokenizer (or none)."""
    from transformers import AutoTokenizer

    model = tiny_encoder(model_type, seed, **kw)
    model.save_pretrained(path)
    if tokenizer:
        AutoTokenizer.from_pretrained(encoder_tokenizer_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(name="tiny_encoder")
def _tiny_encoder_fixture():
    return tiny_encoder


@pytest.fixture(scope="session")
def encoder_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(encoder_tokenizer_dir())
