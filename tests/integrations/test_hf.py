"""r1fast ops on a tiny Hugging Face causal LM equal the model's own logits path."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1fast import ops  # noqa: E402
from r1fast.integrations import hf_grpo_loss, hf_logprobs  # noqa: E402


def tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.Qwen3ForCausalLM(cfg).float().eval()


def reference_logp(model, ids, mask, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_logprobs_equal_model_logits_path():
    model = tiny_qwen3()
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    ours, ent = hf_logprobs(model, ids, mask, temperature=0.8, return_entropy=True)
    ref = reference_logp(model, ids, mask, 0.8)
    assert ours.shape == (3, 10)
    assert (ours.double() - ref).abs().max() < 1e-5
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / 0.8
    p = logits.softmax(-1)
    ref_ent = -(p * logits.log_softmax(-1)).sum(-1)
    assert (ent.double() - ref_ent).abs().max() < 1e-5


def test_grpo_loss_and_grads_equal_model_logits_path():
    model = tiny_qwen3(1)
    B, L = 4, 9
    ids = torch.randint(0, 97, (B, L))
    comp = torch.zeros(B, L - 1)
    comp[:, 3:] = 1
    comp[1, 6:] = 0
    with torch.no_grad():
        old = reference_logp(model, ids, None).float() + 0.05 * torch.randn(B, L - 1)
        ref = old - 0.1 * torch.randn(B, L - 1)
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
    cfg = ops.PolicyLossConfig(loss="ppo", clip_low=0.2, clip_high=0.28, kl="k3", kl_coef=0.01,
                               agg="seq-mean-token-mean")
    loss, metrics = hf_grpo_loss(model, ids, None, comp, old, adv, ref, cfg)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp = reference_logp(model, ids, None).float()
    ref_loss, _ = ops.policy_loss(logp, old, adv, comp, cfg, ref_logp=ref, impl="torch")
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_dr_grpo_divides_by_the_given_completion_length():
    """Dr.GRPO's normaliser is B * max completion length (TRL's dr_grpo), a constant: the
    default L-1 counts the prompt too. max_len is handed to the loss."""
    model = tiny_qwen3(2)
    B, L = 2, 11
    ids = torch.randint(0, 97, (B, L))
    comp = torch.zeros(B, L - 1)
    comp[:, 6:] = 1  # 4 completion tokens after a 6-token prompt
    with torch.no_grad():
        old = reference_logp(model, ids, None).float()
    adv = torch.tensor([1.0, -0.5])
    cfg = ops.PolicyLossConfig(agg="seq-mean-token-sum-norm")
    whole, _ = hf_grpo_loss(model, ids, None, comp, old, adv, None, cfg)
    mine, _ = hf_grpo_loss(model, ids, None, comp, old, adv, None, cfg, max_len=4)
    # ratio 1 at old = current: the loss is -sum(A * tokens) / (B * L_max)
    assert whole.item() == pytest.approx(-(1.0 - 0.5) * 4 / (B * (L - 1)), rel=1e-5)
    assert mine.item() == pytest.approx(-(1.0 - 0.5) * 4 / (B * 4), rel=1e-5)


def test_per_sample_temperatures():
    """A [B] temperature: each sample's log-probs (and its GRPO loss gradients) are those of
    the model's logits divided by its own temperature."""
    model = tiny_qwen3(2)
    B, L = 3, 8
    ids = torch.randint(0, 97, (B, L))
    tau = torch.tensor([0.6, 1.0, 1.4])
    per_sample = hf_logprobs(model, ids, temperature=tau)
    ref = reference_logp(model, ids, None, tau.double()[:, None, None])
    assert (per_sample.double() - ref).abs().max() < 1e-5

    comp = torch.ones(B, L - 1)
    old = ref.float().detach() + 0.05 * torch.randn(B, L - 1)
    adv = torch.tensor([1.0, -0.5, 0.3])
    cfg = ops.PolicyLossConfig(loss="ppo", agg="seq-mean-token-mean")
    loss, _ = hf_grpo_loss(model, ids, None, comp, old, adv, None, cfg, temperature=tau)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp = reference_logp(model, ids, None, tau.double()[:, None, None]).float()
    ref_loss, _ = ops.policy_loss(logp, old, adv, comp, cfg, impl="torch")
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    per_token = hf_logprobs(model, ids, temperature=tau[:, None].expand(B, L - 1))
    assert torch.equal(per_token, per_sample)
    with pytest.raises(ValueError, match=r"temperature must have shape \[3\], got \[2\]"):
        hf_logprobs(model, ids, temperature=tau[:2])
    with pytest.raises(ValueError, match=r"temperature must have shape \[3, 7\], got \[3, 8\]"):
        hf_logprobs(model, ids, temperature=torch.ones(B, L))


@pytest.mark.parametrize("attr, value", [
    ("final_logit_softcapping", 30.0),
    ("final_logit_softcapping", 1.0),  # tanh(z): a softcap is never the identity
    ("logits_scaling", 8.0),           # Granite divides its logits (0.33 off before)
    ("lm_head_multiplier", 0.5),       # Falcon-H1
    ("logit_scale", 0.25),             # Cohere
])
def test_rejects_heads_that_are_not_a_plain_linear_map(attr, value):
    model = tiny_qwen3()
    setattr(model.config, attr, value)
    with pytest.raises(ValueError, match=f"model config sets {attr}={value}"):
        hf_logprobs(model, torch.randint(0, 97, (1, 4)))
    setattr(model.config, attr, None)
    hf_logprobs(model, torch.randint(0, 97, (1, 4)))


def test_grpo_loss_takes_integer_masks_and_needs_two_positions():
    """TRL and verl hand integer completion masks; they were an error."""
    model = tiny_qwen3(2)
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    old, adv = torch.zeros(2, 5), torch.tensor([1.0, -1.0])
    a, _ = hf_grpo_loss(model, ids, None, mask, old, adv)
    b, _ = hf_grpo_loss(model, ids, None, mask.float(), old, adv)
    c, _ = hf_grpo_loss(model, ids, None, mask.bool(), old, adv)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\] with L >= 2, got \(2, 1\)"):
        hf_grpo_loss(model, ids[:, :1], None, mask[:, :0], old[:, :0], adv)


def test_completion_only_tensors_as_trl_passes_them():
    """``logits_to_keep=C``: [B, C] tensors of the last C targets (TRL's completion tensors)
    give the log-probs, loss and gradients of the full [B, L-1] form with the prompt masked."""
    model = tiny_qwen3(4)
    B, L, C = 3, 10, 6
    ids = torch.randint(0, 97, (B, L))
    tau = torch.tensor([0.7, 1.0, 1.3])
    full = hf_logprobs(model, ids, None, temperature=tau)
    cut = hf_logprobs(model, ids, None, temperature=tau, logits_to_keep=C)
    assert cut.shape == (B, C) and torch.equal(cut, full[:, -C:])
    comp = torch.ones(B, C)
    comp[2, 4:] = 0
    old = cut.detach() + 0.1 * torch.randn(B, C)
    adv = torch.tensor([1.0, -0.6, 0.4])
    cfg = ops.PolicyLossConfig(agg="seq-mean-token-mean")
    grads = []
    for keep, mask, old_logp in ((C, comp, old),
                                 (None, torch.cat([torch.zeros(B, L - 1 - C), comp], 1),
                                  torch.cat([torch.zeros(B, L - 1 - C), old], 1))):
        model.zero_grad()
        loss, _ = hf_grpo_loss(model, ids, None, mask, old_logp, adv, config=cfg,
                               temperature=tau, logits_to_keep=keep)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    for bad in (0, L, True, 2.0):
        with pytest.raises(ValueError, match=rf"logits_to_keep must be an int in \[1, {L - 1}\]"):
            hf_logprobs(model, ids, logits_to_keep=bad)


def test_decoder_arguments_reach_the_decoder():
    """``position_ids`` (a padding-free batch's) are the decoder's, as in the model's own call;
    they were dropped, so every row was read at positions 0 .. L-1."""
    model = tiny_qwen3(5)
    ids = torch.randint(0, 97, (2, 8))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]])
    logits = model(input_ids=ids, position_ids=positions).logits[:, :-1].double()
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    ours = hf_logprobs(model, ids, position_ids=positions)
    assert (ours.double() - want).abs().max() < 1e-5
    assert (hf_logprobs(model, ids).double() - want).abs().max() > 1e-3  # positions matter
    with pytest.raises(ValueError, match="position_id: not an argument of the model's decoder"):
        hf_logprobs(model, ids, position_id=positions)  # the decoder's **kwargs took it unread


def test_a_vision_language_models_images_reach_the_model():
    """The images of a VLM reach the model's forward (its text model alone ignored them) and
    the log-probs equal the model's own logits path with them."""
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=97, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=1, temporal_patch_size=1, in_channels=3),
        image_token_id=96, vision_start_token_id=95, video_token_id=94)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1, 2, 95, 96, 96, 96, 96, 3, 4, 5]])  # one 2x2 image: 4 tokens
    image = dict(pixel_values=torch.randn(4, 12), image_grid_thw=torch.tensor([[1, 2, 2]]),
                 mm_token_type_ids=(ids == 96).long())
    logits = model(input_ids=ids, **image).logits[:, :-1].double()
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert (hf_logprobs(model, ids, **image).double() - want).abs().max() < 1e-5
    assert (hf_logprobs(model, ids).double() - want).abs().max() > 1e-3  # the image matters
    with pytest.raises(ValueError, match="pixel_value: not an argument"):
        hf_logprobs(model, ids, pixel_value=image["pixel_values"])


def _fsdp2_worker(rank):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1,))
    model = tiny_qwen3(3)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root unit holds the embedding and the head
    ids = torch.randint(0, 97, (2, 6))
    ours = hf_logprobs(model, ids, impl="torch")  # the model's forward gathers the root unit
    want = reference_logp(model, ids, None)
    assert (ours.double() - want).abs().max() < 1e-5
    apart = tiny_qwen3(3)
    fully_shard(apart.lm_head, mesh=mesh)  # a head sharded on its own: its forward gathers it
    fully_shard(apart, mesh=mesh)
    with pytest.raises(ValueError, match="output head weight is sharded"):
        hf_logprobs(apart, ids, impl="torch")
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # FSDP1: flat params

    flat = FSDP(tiny_qwen3(3), device_id=torch.device("cpu"), use_orig_params=False)
    ours = hf_logprobs(flat, ids, impl="torch")  # it failed inside the embedding
    with FSDP.summon_full_params(flat):
        want = reference_logp(flat.module, ids, None)
    assert (ours.double() - want).abs().max() < 1e-5


def test_fsdp_models_run_through_their_forward():
    """The helpers called the decoder and read the head directly, past the root forward that
    gathers FSDP2's root parameters (and FSDP1 failed inside the embedding); they now call the
    model itself. A head sharded as its own unit (whose forward the stand-in never calls) is
    named, not misread."""
    from tests.helpers.spawn import run_ranks

    run_ranks(1, _fsdp2_worker)


def _ddp_worker(rank):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model = tiny_qwen3(6).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(10)
    ids = torch.randint(0, 97, (4, 7), generator=g)  # every rank: the whole batch, then its half
    old = -torch.rand(4, 6, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mine = slice(2 * rank, 2 * rank + 2)
    loss, _ = hf_grpo_loss(ddp, ids[mine], None, torch.ones(2, 6), old[mine], adv[mine],
                           config=ops.PolicyLossConfig(agg="token-mean"), impl="torch")
    loss.backward()
    synced = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):  # DDP averages the ranks' gradients
        loss, _ = hf_grpo_loss(model, ids[half], None, torch.ones(2, 6), old[half], adv[half],
                               config=ops.PolicyLossConfig(agg="token-mean"), impl="torch")
        (loss / 2).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(synced[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    dist.barrier()


@pytest.mark.multiproc
def test_a_ddp_model_gets_its_gradients_synchronised():
    """hf_grpo_loss(ddp_model) failed (no get_output_embeddings) and hf_grpo_loss(ddp.module)
    ran past DDP's forward, so no gradient was synchronised, silently (helper-68): the call
    now goes through the wrapper, and each rank's gradient is the mean over the ranks."""
    from tests.helpers.spawn import run_ranks

    run_ranks(2, _ddp_worker)
