"""Contrastive gradient accumulation in train_ds.py (contrastive_step): with --grad_accum K every
pair of the K micro-batches of every rank is a negative of every other, as in one batch of
K x micro x ranks, at ZeRO 0-3; BatchNorm normalises each micro-batch with its own statistics and
its running statistics move once per micro-batch; --plain_grad_accum keeps DeepSpeed's plain
accumulation (negatives within each micro-batch); a stop and resume fall between optimizer steps.

Two launches (tests/_train_runs.py): one process (the 1-rank runs and every plain-PyTorch reference)
and one 2-rank DeepSpeed launch. Results are compared with other trainings and with the reference,
never with stored numbers. bf16 with accumulation: tests/test_precision.py.
"""
import pytest
import torch

from conftest import EQUAL, assert_same_weights, launch, reference_spec, setting_argv, state_dict

import train_ds

# CLIP tiny (separate towers, no BatchNorm): K = 4 micro-batches of 8 pairs per rank against one
# micro-batch of 32. Groups of 4 shapes x 2 colours keep the same pairs in each optimizer step:
# one group per 8-pair micro-batch, four per step either way.
CLIP = dict(preset="clip-tiny", layers=2, steps=3, global_micro=8, accum=4, lr=1e-3, lr_shared=1e-3, wd=0.05,
            wd_shared=0.2, warmup=1, warmup_start=0.01, min_lr_ratio=0.1, grad_clip=1.0, logit_scale_init=2.659,
            hard_negatives="4x2", samples=256, seed=4)
# MS-CLIP-S tiny with 7 layers (BatchNorm in the conv stem, the parallel branch and the adapters),
# K = 4 micro-batches of 4 pairs per rank. Random batches and a moderate learning rate: with micro-
# batches of near-identical images (--hard_negatives) BatchNorm's tiny variances amplify rounding,
# and Adam turns gradient noise of 1e-7 into weight differences of up to 1e-4 between two orders of
# the same sums (measured); here the two orders differ by 3e-7.
S = dict(preset="msclip-s-tiny", layers=7, fusion_layers=(2, 3, 4, 5, 6), steps=3, global_micro=4, accum=4, lr=5e-4,
         lr_shared=3e-4, wd=0.05, wd_shared=0.2, warmup=1, warmup_start=0.01, min_lr_ratio=0.1, grad_clip=1.0,
         logit_scale_init=2.659, hard_negatives="none", samples=128, seed=6)
S2 = {**S, "global_micro": 8}  # the same micro-batch of 4 on each of 2 ranks
TOLERANCE = 1e-5


def one_batch(setting):
    """The same pairs per optimizer step in one micro-batch per rank, without accumulation."""
    return {**setting, "global_micro": setting["global_micro"] * setting["accum"], "accum": 1}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accumulation_one_rank")
    runs = [{"name": "clip_k4", "argv": setting_argv(CLIP, str(tmp / "clip_k4"), 1, 2)},
            {"name": "clip_k1", "argv": setting_argv(one_batch(CLIP), str(tmp / "clip_k1"), 1, 2)},
            {"name": "clip_k4_plain", "argv": setting_argv(CLIP, str(tmp / "clip_k4_plain"), 1, 2) +
             ["--plain_grad_accum"]},
            {"name": "clip_k4_part1", "argv": setting_argv(CLIP, str(tmp / "clip_k4_part"), 1, 2) + ["--stop_at", "2"]},
            {"name": "clip_k4_part2", "argv": setting_argv(CLIP, str(tmp / "clip_k4_part"), 1, 2) + ["--resume"]}]
    runs += [{"name": f"s_zero{s}", "argv": setting_argv(S, str(tmp / f"s_zero{s}"), 1, s)} for s in (0, 1, 3)]
    runs += [{"name": "s_reference", "reference": reference_spec(S, save=str(tmp / "s_reference.pt"))},
             {"name": "s_pass1_moves_statistics",
              "reference": reference_spec(S, pass1_moves_statistics=True, save=str(tmp / "s_pass1_moves.pt"))},
             {"name": "s2_reference", "reference": reference_spec(S2, ranks=2, save=str(tmp / "s2_reference.pt"))},
             {"name": "equal_plain_reference", "reference": reference_spec(EQUAL, accumulation="plain")},
             {"name": "equal_reference", "reference": reference_spec(EQUAL)}]
    results, log, _ = launch(tmp, "accumulation_one_rank", runs, 1)
    return tmp, results, log


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accumulation_two_ranks")
    runs = [{"name": "clip_k4", "argv": setting_argv(CLIP, str(tmp / "clip_k4"), 2, 3)},
            {"name": "clip_k1", "argv": setting_argv(one_batch(CLIP), str(tmp / "clip_k1"), 2, 3)},
            {"name": "s2_zero3", "argv": setting_argv(S2, str(tmp / "s2_zero3"), 2, 3)},
            {"name": "equal_plain", "argv": setting_argv(EQUAL, str(tmp / "equal_plain"), 2, 2) +
             ["--plain_grad_accum"]}]
    results, log, _ = launch(tmp, "accumulation_two_ranks", runs, 2)
    return tmp, results, log


def launched(request, ranks):
    """The launch of `ranks` ranks (only that one starts when a test of the other is not selected)."""
    return request.getfixturevalue(("one_rank", "two_ranks")[ranks - 1])


def differences(a, b):
    """Largest absolute difference per tensor of two msclip.save_checkpoint files (same keys)."""
    a, b = state_dict(a), state_dict(b)
    assert a.keys() == b.keys()
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}


def statistics(path):
    """The BatchNorm buffers of a checkpoint file."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in state_dict(path).items() if k.endswith(buffers)}


@pytest.mark.parametrize("ranks", [1, 2])
def test_accumulation_equals_one_large_batch(request, ranks):
    """CLIP tiny, 3 steps: 4 micro-batches of 8 pairs per rank == one micro-batch of 32 (ZeRO 2 on
    1 rank, ZeRO 3 on 2): weights and losses."""
    tmp, results, _ = launched(request, ranks)
    accumulated, whole = results["clip_k4"], results["clip_k1"]
    assert accumulated["steps"] == whole["steps"] == [1, 2, 3]
    assert accumulated["losses"] == pytest.approx(whole["losses"], abs=TOLERANCE)
    worst = differences(tmp / "clip_k4" / "msclip.pt", tmp / "clip_k1" / "msclip.pt")
    assert max(worst.values()) < TOLERANCE, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert whole["losses"][-1] != pytest.approx(whole["losses"][0], abs=1e-3), "the model did not move"


def test_large_batch_check_is_not_blind(one_rank):
    """Plain accumulation of the same 4 micro-batches (negatives within each) ends elsewhere: the
    check above tells the two apart."""
    tmp, results, _ = one_rank
    worst = differences(tmp / "clip_k4_plain" / "msclip.pt", tmp / "clip_k1" / "msclip.pt")
    assert max(worst.values()) > 100 * TOLERANCE
    assert results["clip_k4_plain"]["losses"][0] != pytest.approx(results["clip_k1"]["losses"][0], abs=0.1)


def test_resume_continues_bit_for_bit(one_rank):
    """Stopped after step 2 of 3 and resumed: the checkpoint lies between optimizer steps, never inside
    the accumulation, and the run continues exactly."""
    tmp, results, _ = one_rank
    assert results["clip_k4_part1"]["steps"] == [1, 2] and results["clip_k4_part2"]["steps"] == [1, 2, 3]
    assert results["clip_k4_part2"]["losses"][2:] == results["clip_k4"]["losses"][2:]
    assert_same_weights(tmp / "clip_k4" / "msclip.pt", tmp / "clip_k4_part" / "msclip.pt")


@pytest.mark.parametrize("ranks, stage", [(1, 0), (1, 1), (1, 3), (2, 3)])
def test_msclip_s_matches_reference(request, one_rank, ranks, stage):
    """MS-CLIP-S tiny, K = 4: the weights, the BatchNorm running statistics (rank 0's) and the losses of
    plain PyTorch normalising each micro-batch on its own and taking one loss over all of them."""
    tmp, results, _ = launched(request, ranks)
    name = f"s_zero{stage}" if ranks == 1 else "s2_zero3"
    reference = one_rank[0] / ("s_reference.pt" if ranks == 1 else "s2_reference.pt")
    worst = differences(tmp / name / "msclip.pt", reference)
    assert max(worst.values()) < TOLERANCE, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert statistics(reference)  # compared with the weights
    expected = one_rank[1]["s_reference" if ranks == 1 else "s2_reference"]
    assert results[name]["losses"] == pytest.approx(expected["losses"], abs=TOLERANCE)


def test_batchnorm_check_is_not_blind(one_rank):
    """Had pass 1 moved the running statistics, they would differ (the weights would not: BatchNorm
    normalises with the batch's statistics in training) and the check above would fail; they moved."""
    tmp = one_rank[0]
    right, wrong = statistics(tmp / "s_reference.pt"), statistics(tmp / "s_pass1_moves.pt")
    worst = differences(tmp / "s_reference.pt", tmp / "s_pass1_moves.pt")
    assert max(v for k, v in worst.items() if k not in right) < TOLERANCE
    assert max(v for k, v in worst.items() if "running_" in k) > 100 * TOLERANCE
    counts = [k for k in right if k.endswith("num_batches_tracked")]
    assert {int(right[k]) for k in counts} == {S["steps"] * S["accum"]}  # once per micro-batch
    assert {int(wrong[k]) for k in counts} == {2 * S["steps"] * S["accum"]}


def test_plain_grad_accum_is_deepspeeds_accumulation(one_rank, two_ranks):
    """--plain_grad_accum on 2 ranks (ZeRO 2): each micro-batch of 8 + 8 pairs is its own contrastive
    batch and the 2 gradients are averaged, as plain PyTorch doing that; which differs from one loss
    over the 32 pairs (the default, tests/test_train_ds.py)."""
    run = two_ranks[1]["equal_plain"]
    plain, whole = one_rank[1]["equal_plain_reference"], one_rank[1]["equal_reference"]
    assert run["losses"] == pytest.approx(plain["losses"], abs=TOLERANCE)
    assert run["logit_scales"] == pytest.approx(plain["logit_scales"], abs=TOLERANCE)
    assert plain["losses"][0] != pytest.approx(whole["losses"][0], abs=0.1)
    assert "plain: negatives within each micro-batch" in two_ranks[2]


def test_batchnorm_statistics_frozen():
    """In train mode: the batch's own statistics normalise, the running ones and the count stay,
    and the module tracks again afterwards."""
    torch.manual_seed(0)
    norm, x = torch.nn.BatchNorm2d(3).train(), torch.randn(4, 3, 5, 5) * 3 + 1
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    with train_ds.batchnorm_statistics_frozen(torch.nn.Sequential(norm)):
        frozen = norm(x)
    assert all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())
    assert torch.allclose(frozen, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-6)
    assert torch.equal(norm(x), frozen) and norm.num_batches_tracked == 1
