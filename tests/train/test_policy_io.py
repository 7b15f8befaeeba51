"""save_model's folder: what a serving engine reads beside the weights."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from r1fast.data.hf_tokenizer import HFTokenizer  # noqa: E402
from r1fast.data.tiny_hf import build_tokenizer  # noqa: E402
from r1fast.policy import build_policy  # noqa: E402
from r1fast.policy.config import ModelConfig, ParallelConfig  # noqa: E402
from r1fast.policy.parallel import destroy_parallel  # noqa: E402
from r1fast.train.policy_io import save_model  # noqa: E402


@pytest.fixture(autouse=True)
def _single_rank():
    yield
    destroy_parallel()


def test_the_models_sampling_defaults_survive_the_save(tmp_path):
    """Qwen3's and R1's generation_config.json ask for temperature 0.6 and top_p 0.95; the saved
    folder held only the stop and pad ids, so vLLM sampled at temperature 1 and transformers'
    generate decoded greedily. The stop ids stay r1fast's (the sampler stopped there)."""
    src = tmp_path / "src"
    build_tokenizer(src, ["What is 2 + 3? First add the ones, then the tens."] * 20)
    defaults = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                "bos_token_id": 0, "eos_token_id": 0}
    (src / "generation_config.json").write_text(json.dumps(defaults))
    tok = HFTokenizer.load(src)
    assert tok.generation_config == defaults
    tok.save(tmp_path / "run_tokenizer")  # a run keeps it for `r1fast export`
    assert HFTokenizer.load(tmp_path / "run_tokenizer").generation_config == defaults
    model = ModelConfig.preset("tiny-dense").replace(vocab_size=-(-tok.vocab_size // 8) * 8)
    out = save_model(build_policy(model, ParallelConfig(), trainable=False), tok,
                     tmp_path / "model")
    saved = json.loads((out / "generation_config.json").read_text())
    stops = list(tok.stop_ids)
    assert saved == {**defaults, "eos_token_id": stops if len(stops) > 1 else stops[0],
                     "pad_token_id": tok.pad_id}
    read = transformers.GenerationConfig.from_pretrained(str(out))
    assert (read.do_sample, read.temperature, read.top_p, read.top_k) == (True, 0.6, 0.95, 20)
    # config.json carries the tokenizer's ids too (helper-76: they were absent, None to a tool
    # reading them there); transformers reads them
    config = transformers.AutoConfig.from_pretrained(str(out))
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (tok.bos_id, tok.eos_id, tok.pad_id)
