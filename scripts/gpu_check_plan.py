"""What ``scripts/gpu_check.py`` runs, as data: its stages in order, the benchmarks and their
arguments, the test files, the compiler-report workloads, and each stage's time limit, on a GPU
and in the dry mode of a CPU machine (docs/GPU.md has the same table in prose). The runner
itself (subprocesses, limits, result files) is gpu_check.py."""

# Order: correct first (the smoke tests: the CUDA router's first execution, the kernels at the
# benchmarks' real shapes against fp64), then the numbers #18 needs (a stage the budget cuts is
# recorded as skipped, and ``--only`` runs it in a second call), then the other tests, the
# sanitizer and the compiler's report.
STAGES = ("env", "install", "build", "smoke", "bench", "tests", "sanitizer", "resources")
# the benchmarks of #18's targets, then the experts rows that set the experts defaults; the
# LATE ones (no target reads them) run after the tests, so a budget cut takes them first
BENCHES = ("linear_logprob", "grpo_loss", "moe_route", "moe_permute", "step", "moe_experts",
           "rollout", "mla_prefill")
LATE_BENCHES = ("rollout", "mla_prefill")

# Per-stage limits in seconds (GPU). The sum may exceed the budget: later stages get what is left.
LIMITS = {"env": 30, "install": 60, "build": 150, "smoke": 120, "tests": 240, "bench_linear_logprob": 150,
          "bench_grpo_loss": 120, "bench_moe_route": 120, "bench_moe_permute": 60, "bench_step": 90,
          "bench_rollout": 120, "bench_mla_prefill": 45, "bench_moe_experts": 75, "sanitizer": 150,
          "resources": 90}
DRY_LIMITS = {"env": 30, "install": 60, "build": 60, "smoke": 60, "tests": 120, "bench_linear_logprob": 60,
              "bench_grpo_loss": 60, "bench_moe_route": 90, "bench_moe_permute": 90,
              "bench_step": 120, "bench_rollout": 90, "bench_mla_prefill": 60,
              "bench_moe_experts": 60, "sanitizer": 90, "resources": 90}

# the smoke stage: run with -x before the benchmarks, left out of the tests stage
SMOKE_TESTS = ["tests/ops/test_moe_cuda.py", "tests/ops/test_advantages.py",
               "tests/ops/test_real_shapes.py"]
DRY_SMOKE_TESTS = ["tests/ops/test_moe_cuda.py",
                   "tests/ops/test_advantages.py::test_binary_rewards_and_large_offset"]
GPU_TESTS = ["tests/ops/test_moe_route_triton.py",
             "tests/ops/test_moe_permute.py", "tests/ops/test_grpo_loss_triton.py",
             "tests/ops/test_linear_logprob_triton.py",
             "tests/ops/test_linear_logprob_vocab_parallel.py",
             "tests/ops/test_fused_linear_policy_loss.py",
             "tests/ops/test_host_sync.py",
             "tests/bench/test_harness.py", "tests/rollout/test_attention.py",
             "tests/policy/test_dispatcher.py", "tests/ops/test_moe_experts.py",
             "tests/policy/test_local_experts.py",
             "tests/policy/test_transfer.py",
             "tests/policy/test_packed_attention.py::test_packed_plans_reach_the_gpu_without_a_wait",
             "tests/ops/test_linear_logprob.py::test_fp64_with_auto_takes_the_torch_path_on_a_gpu"]
# Dry: the CUDA file (collected, skipped without a device) and a few interpreter cases.
DRY_TESTS = ["tests/ops/test_moe_cuda.py", "tests/ops/test_grpo_loss_triton.py",
             "-k", "cuda or ticket or poison"]

BENCH_ARGS = {
    "linear_logprob": ["--T", "16384", "--H", "4096", "--V", "151936", "--dtype", "bf16",
                       "--modes", "full", "--reps", "3"],
    "grpo_loss": ["--tokens", "16384", "262144"],
    "moe_route": ["--T", "16384", "--E", "256", "--k", "8", "--reps", "10"],
    "moe_permute": ["--T", "16384", "--H", "4096", "7168", "--k", "8", "--E", "256",
                    "--reps", "10"],
    # a small bf16 MoE (H=1024, 4 layers, 32 experts top-2, V=32000; 16 prompts x 8 samples of
    # up to 128 tokens): the tiny recipe's model (H=64, V=256) would time launches, not kernels
    "step": ["--steps", "3", "--model.hidden_size=1024", "--model.num_layers=4",
             "--model.num_attention_heads=16", "--model.num_query_groups=4",
             "--model.num_experts=32", "--model.moe_ffn_hidden_size=512",
             "--model.ffn_hidden_size=2048", "--model.vocab_size=32000",
             "--model.params_dtype=bfloat16", "--data.prompts_per_step=16",
             "--algo.group_size=8", "--rollout.max_new_tokens=128",
             # the tiny recipe's 512-token micro-batches would cut the update into ~30 pieces
             # and time launches: one micro-batch of up to 8192 tokens per forward/backward
             "--parallel.max_tokens_per_microbatch=8192"],
    # 64 rows of the length mix on a small bf16 MoE (H=1024, 4 layers, 32 experts, V=32000)
    "rollout": ["--rows", "64", "--hidden", "1024", "--layers", "4", "--experts", "32",
                "--vocab", "32000", "--dtype", "bfloat16", "--reps", "2"],
    # the routed experts at Qwen3-30B-A3B's sizes: a decoding step of 32 and 256 tokens x top-8
    # (forward), a training micro-batch of 2048 tokens x top-8 (forward + backward)
    "moe_experts": ["--rows", "256", "2048", "--train-rows", "16384", "--E", "128", "--H",
                    "2048", "--F", "768"],
    # DeepSeek-V3's MLA attention over a latent cache, 16 heads (TP8): prefill and decode step
    "mla_prefill": ["--B", "4", "--P", "1024", "4096", "--heads", "16", "--queries", "0", "1",
                    "--reps", "5"],
}
DRY_BENCH_ARGS = {
    # every mode and the bare-GEMM floor rows, as on a GPU (the targets table reads them)
    "linear_logprob": ["--T", "32", "--H", "32", "--V", "256", "--modes", "forward", "backward",
                       "full", "--gemm", "--reps", "1"],
    "grpo_loss": ["--tokens", "256", "--fused-shape", "32", "32", "256"],
    "moe_route": ["--T", "32", "--E", "16", "--k", "2", "--modes", "full", "--reps", "1"],
    "moe_permute": ["--T", "32", "--H", "64", "--k", "2", "--E", "16", "--modes", "full",
                    "--reps", "1"],
    "step": ["--steps", "1"],
    "rollout": ["--rows", "4", "--max-new", "8", "--prompt-range", "4", "12", "--hidden", "32",
                "--vocab", "256", "--reps", "1"],
    "mla_prefill": ["--B", "1", "--P", "32", "--heads", "2", "--queries", "0", "1", "--reps", "1"],
    "moe_experts": ["--rows", "24", "--train-rows", "40", "--E", "4", "--H", "32", "--F", "16",
                    "--reps", "1"],
}

# bench/kernel_resources.py compiles for sm_90 without running anything (no GPU needed): the
# kernels at their real shapes on a GPU machine, one small kernel in dry mode (the same code
# path; the full report takes about 90 s on two CPU cores).
RESOURCE_WORKLOADS = ["linear_logprob_bf16", "linear_logprob_gemm_bf16", "grpo_loss",
                      "moe_route", "moe_permute", "moe_experts"]
DRY_RESOURCE_WORKLOADS = ["group_advantages"]
