"""The megatron-core adapters of r1fast.megatron_compat: installed once, only without CUDA; the
version table (and that pyproject.toml pins the same range); the torch proxy of bridged megatron
modules; the CPU RNG tracker; megatron's CUDA type-name checks answered without touching
``torch.Tensor`` (also while megatron's optimizer runs, and at PP2 with tied embeddings); the
one WARNING line; the warning filters; sequence parallelism with torch norms; and the gloo
collectives (2 processes)."""
from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

from r1fast import megatron_compat
from r1fast.megatron_compat import cpu, quiet, versions
from r1fast.megatron_compat.torch_proxy import TorchOnCPU
from tests.helpers import dist as _dist

ROOT = pathlib.Path(__file__).resolve().parents[2]

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU bridges are off on GPU")
# torch.Tensor defines neither method itself: both are the C base class's.
ORIGINAL_TYPE, ORIGINAL_CUDA = torch._C.TensorBase.type, torch._C.TensorBase.cuda


def assert_tensor_methods_untouched() -> None:
    assert torch.Tensor.type is ORIGINAL_TYPE and torch.Tensor.cuda is ORIGINAL_CUDA
    assert "type" not in vars(torch.Tensor) and "cuda" not in vars(torch.Tensor)
    assert "type" not in vars(torch.nn.Parameter) and "cuda" not in vars(torch.nn.Parameter)
    assert torch.zeros(2).type() == "torch.FloatTensor"


# ------------------------------------------------------------------------------------------
# install, versions
# ------------------------------------------------------------------------------------------

def test_installed_only_without_cuda_and_idempotent():
    first = megatron_compat.install()
    assert megatron_compat.install() == first == megatron_compat.applied_bridges()
    assert ("torch_names" in first) == (not torch.cuda.is_available())
    if megatron_compat.te_absent():
        assert "te_general_gemm" in first
    assert_tensor_methods_untouched()


def test_version_table_warns_outside_the_supported_range(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.warns(RuntimeWarning, match=r"megatron-core 0.17.0 is outside the range") as rec:
        versions.check_megatron_version()
    text = str(rec[0].message)
    assert "Python >= 3.12" in text and versions.pip_requirement() in text
    assert all(v in text for v in versions.TESTED)
    for inside in ("0.16.0", "0.16.1", "0.16.2rc1"):
        monkeypatch.setattr(package_info, "__version__", inside)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert versions.check_megatron_version() == inside


def test_version_table_is_consistent():
    assert versions.pip_requirement() == "megatron-core>=0.16,<0.17"
    assert all(versions.is_supported(v) for v in versions.TESTED)
    assert not any(versions.is_supported(v) for v in versions.NOT_SUPPORTED)
    assert versions.version_tuple("0.16.1rc2") == (0, 16, 1)
    assert versions.version_tuple("0.17") == (0, 17, 0)


def test_pyproject_pins_the_supported_range():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    pins = [d.replace(" ", "") for d in deps if d.startswith("megatron-core")]
    assert pins == [versions.pip_requirement()]


def test_missing_megatron_name_is_reported():
    with pytest.raises(RuntimeError, match=r"has no 'nope'; this megatron-core version is not "
                                           r"supported \(supported: megatron-core>=0.16,<0.17"):
        versions.require(versions, "nope")


# ------------------------------------------------------------------------------------------
# torch proxy, RNG tracker
# ------------------------------------------------------------------------------------------

def test_torch_proxy():
    proxy = TorchOnCPU()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert proxy.ones(1, device=0).device.type == "cpu"  # an int device is a CUDA ordinal
    assert proxy.float32 is torch.float32 and proxy.Tensor is torch.Tensor
    assert proxy.cuda.current_device() == torch.device("cpu")
    s = proxy.cuda.Stream()
    s.wait_stream(proxy.cuda.current_stream())
    with proxy.cuda.stream(s):
        pass
    s.record_event().synchronize()
    assert proxy.cuda.is_available() == torch.cuda.is_available()


@CPU_ONLY
def test_bridged_megatron_module_runs_on_cpu():
    megatron_compat.install()
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(3)  # torch.ones(device="cuda") inside
    assert mask.device.type == "cpu" and mask.tolist()[0] == [False, True, True]


@CPU_ONLY
def test_cpu_rng_tracker_forks_and_restores():
    megatron_compat.install()
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("stream", 123)
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("stream"):
        a = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)  # the default stream is untouched
    with tracker.fork("stream"):
        b = torch.rand(3)
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(a, b)  # the named stream advanced
    with pytest.raises(Exception, match="rng state nope is not added"):
        with tracker.fork("nope"):
            pass


# ------------------------------------------------------------------------------------------
# CUDA type names without touching torch.Tensor
# ------------------------------------------------------------------------------------------

def test_params_report_cuda_type_per_object_and_scoped():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    other = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    with cpu.params_report_cuda_type(opt):
        assert p.type() == "torch.cuda.BFloat16Tensor"
        assert p.type(torch.float32).dtype == torch.float32  # conversions are torch's own
        assert other.type() == "torch.FloatTensor"  # only the optimizer's params
        assert p.detach().type() == "torch.BFloat16Tensor"  # a derived tensor is plain
        assert_tensor_methods_untouched()
    assert p.type() == "torch.BFloat16Tensor" and "type" not in vars(p)
    with pytest.raises(ValueError):
        with cpu.params_report_cuda_type(opt):
            raise ValueError
    assert "type" not in vars(p)  # removed on errors too


@CPU_ONLY
def test_float16_optimizer_groups_cpu_params_by_dtype():
    megatron_compat.install()
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params, OptimizerConfig

    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.randn(3))
    opt = Float16OptimizerWithFloat16Params(torch.optim.AdamW([p, q], lr=0.1),
                                            OptimizerConfig(bf16=True, lr=0.1), None,
                                            lambda *a: None)
    assert opt.float16_groups[0] == [p] and opt.fp32_from_fp32_groups[0] == [q]
    assert torch.equal(p.main_param, p.detach().float())
    assert "type" not in vars(p) and "type" not in vars(q)
    assert_tensor_methods_untouched()


@pytest.fixture(scope="module")
def single_rank():
    from r1fast.policy.parallel import destroy_parallel

    yield
    destroy_parallel()


def test_policy_optimizer_step_leaves_torch_tensor_alone(single_rank, monkeypatch):
    """Build a policy and megatron's distributed optimizer, take a clipped step, and look at
    torch.Tensor from inside megatron's own calls (param grouping and grad clipping)."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from r1fast.ops.linear_logprob import linear_logprob
    from r1fast.policy.config import ModelConfig, ParallelConfig
    from r1fast.policy.model import build_policy
    from r1fast.policy.optim import OptimConfig, build_optimizer

    seen = {}
    build_groups = DistributedOptimizer._build_model_and_main_param_groups
    applier = clip_grads.multi_tensor_applier

    def spy_build_groups(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        param = opt_group_ranges[0]["params"][0]  # a model parameter megatron sorts by type()
        seen["grouping"] = (torch.Tensor.type is ORIGINAL_TYPE, torch.zeros(1).type(),
                            param.type())
        return build_groups(gbuf_ranges, param_gbuf_map, opt_group_ranges, config)

    def spy_applier(*args, **kwargs):
        seen["clipping"] = (torch.Tensor.type is ORIGINAL_TYPE and
                            torch.Tensor.cuda is ORIGINAL_CUDA, torch.zeros(1).type())
        return applier(*args, **kwargs)

    monkeypatch.setattr(DistributedOptimizer, "_build_model_and_main_param_groups",
                        classmethod(spy_build_groups))  # a classmethod in megatron
    monkeypatch.setattr(clip_grads, "multi_tensor_applier", spy_applier)
    policy = build_policy(ModelConfig.preset("tiny-moe"), ParallelConfig(), seed=0)
    opt, _ = build_optimizer(policy, OptimConfig(lr=1e-2, clip_grad=1e-3))
    assert_tensor_methods_untouched()
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))

    def loss_fn(hidden, weight, mb):
        lp = linear_logprob(hidden.reshape(-1, hidden.shape[-1]), weight,
                            mb["targets"].reshape(-1), tp_group=policy.tp_group)
        return -lp.mean(), {}

    policy.forward_backward([{"tokens": tokens, "targets": torch.roll(tokens, -1, 1)}], loss_fn)
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 1e-3  # clipped, so the applier ran
    assert_tensor_methods_untouched()
    on_gpu = "torch.cuda.FloatTensor"  # what megatron checks (a real one on a GPU)
    assert seen["grouping"] == (True, "torch.FloatTensor", on_gpu)
    assert seen["clipping"] == (True, "torch.FloatTensor")
    assert not any("type" in vars(p) for p in policy.gpt.parameters())


@CPU_ONLY
@pytest.mark.multiproc
def test_pp2_with_tied_embeddings_equals_one_rank(tmp_path):
    """LanguageModule.setup_embeddings_and_output_layer at PP2 with tied embeddings (the
    ``weight.data.cuda()`` + all-reduce of the last stage's copy): same log-probs, gradients
    and weights after one step as one process."""
    from r1fast.policy.config import ModelConfig

    cfg = ModelConfig.preset("tiny-dense").replace(tie_embeddings=True)
    base = dict(ckpt=str(tmp_path / "ckpt"), lr=1e-3, adam_eps=1e-3, batch=2, length=5,
                model=cfg.to_dict())
    ref = _dist.launch(1, "parity", dict(base, tp=1, pp=1, ep=1, create=True), timeout=240)[0]
    pp2 = _dist.launch(2, "parity", dict(base, tp=1, pp=2, ep=1), timeout=240)
    for rank in pp2:
        assert (rank["logprobs"] - ref["logprobs"]).abs().max().item() < 1e-5
        assert abs(rank["grad_norm"].item() - ref["grad_norm"].item()) < 1e-5
    for key in ("grads", "state"):
        assert set(pp2[0][key]) == set(ref[key])
        assert max((pp2[0][key][k] - ref[key][k]).abs().max().item() for k in ref[key]) < 1e-6


# ------------------------------------------------------------------------------------------
# The WARNING line and the warning filters
# ------------------------------------------------------------------------------------------

def test_reason_names_the_environment():
    assert cpu.reason(env={}, cuda_build=None) == "no CUDA device is visible"
    text = cpu.reason(env={"CUDA_VISIBLE_DEVICES": ""}, cuda_build="12.8")
    assert "CUDA_VISIBLE_DEVICES='' is set" in text
    assert "CUDA 12.8 build" in text and "devices hidden" in text


def test_announce_logs_once_and_on_rank_zero_only(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_ANNOUNCED", False)
    with caplog.at_level(logging.WARNING, logger="r1fast.megatron_compat"):
        assert cpu.announce() and not cpu.announce()
    lines = [r for r in caplog.records if "CPU bridges ON" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    monkeypatch.setattr(cpu, "_ANNOUNCED", False)
    monkeypatch.setattr(cpu.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(cpu.dist, "get_rank", lambda *a: 1)
    assert not cpu.announce()


def test_filters_match_exact_message_and_module_only():
    message, category, module, _ = quiet.FILTERS[0]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        quiet.install_filters()
        warnings.warn_explicit(message, category, "x.py", 1, module=module)
        warnings.warn_explicit(message + " (and more)", category, "x.py", 1, module=module)
        warnings.warn_explicit("something else", category, "x.py", 1, module=module)
        warnings.warn_explicit(message, category, "x.py", 1, module="someone.else")
        warnings.warn_explicit(message, RuntimeWarning, "x.py", 1, module=module)
    assert len(rec) == 4  # only the exact (message, category, module) is silenced
    assert all(why for *_, why in quiet.FILTERS)


def test_log_filter_drops_the_exact_line_of_its_logger_only(caplog):
    name, line, why = quiet.LOG_LINES[0]
    quiet.install_filters()
    quiet.install_filters()  # twice: still one filter
    logger = logging.getLogger(name)
    assert sum(isinstance(f, quiet._DropLogLine) for f in logger.filters) == 1
    with caplog.at_level(logging.DEBUG):
        logger.warning(line, "/usr/local")
        logger.warning(line + " (and more)", "/usr/local")
        logger.warning("something else")
        logging.getLogger("someone.else").warning(line, "/usr/local")
    assert [r.name for r in caplog.records] == [name, name, "someone.else"]
    assert why


_FIRST_RUN = """
import logging
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # as `r1fast train`
import torch, torch.distributed as dist
from r1fast.megatron_compat import install
install()
from megatron.core.optimizer import clip_grads  # noqa: F401 (the Apex notices)
from megatron.core.models.gpt import gpt_layer_specs  # noqa: F401
from megatron.core.transformer import TransformerConfig
TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)  # cuda_graph_scope
from r1fast.policy.parallel import init_distributed
init_distributed()
out = torch.zeros(2)
dist.all_gather_into_tensor(out, torch.ones(2))  # torch 2.13 renamed it; megatron calls it
dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2))
install()
dist.destroy_process_group()
print("done")
"""


@CPU_ONLY
def test_first_run_prints_one_warning_line():
    """A fresh process with hidden devices: exactly one line, which names the reason, and none
    of the third-party notices."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _FIRST_RUN], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "CPU bridges ON" in lines[0] and "CUDA_VISIBLE_DEVICES=''" in lines[0]


def test_torch_norm_under_sequence_parallel():
    megatron_compat.install()
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                            normalization="RMSNorm", tensor_model_parallel_size=2,
                            sequence_parallel=True)
    norm = WrappedTorchNorm(cfg, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and cfg.sequence_parallel
    assert getattr(norm.weight, "sequence_parallel", False)


@CPU_ONLY
@pytest.mark.multiproc
def test_gloo_uneven_collectives_and_tensor_splits():
    res = _dist.launch(2, "uneven", {}, timeout=180)
    want = torch.cat([torch.full((r + 1, 3), float(r + 1)) + torch.arange(3.0) for r in range(2)])
    total = res[0]["full"] + res[1]["full"]  # [3, 3]: rank r keeps rows of size r+1
    for r, out in enumerate(res):
        assert torch.equal(out["gathered"], want)
        assert torch.allclose(out["scattered"], total[[0]] if r == 0 else total[1:])
        assert torch.equal(out["a2a"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
