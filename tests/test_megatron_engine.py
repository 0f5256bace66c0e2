"""The megatron engine against transformers, with real megatron-core over gloo on CPU (no mocks).

One launch of two processes (this file run as a script, one process per rank) does all the distributed work
and writes its measurements to JSON; the tests below assert on them:
  * HF -> megatron logits vs transformers at TP=1 and TP=2: the tiny default model (tied, GQA), an untied Qwen2
    with a padded vocabulary, a Llama with one key/value head; the weights exported from the live TP=2 model
    equal the original tensors exactly;
  * two GRPO updates (PPO-clip + KL + entropy, temperature 0.7, 3 micro-batches) with TP=2 vs ``TorchEngine``:
    log-probs, loss, metrics, gradient norm, exported weights;
  * save -> a new engine from the checkpoint + ``load_training_state`` -> the next update is the same;
  * packed rows (per-sample positions and mask) and frozen parameters.
"""

import json
import os
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(find_spec("megatron") is None or find_spec("megatron.core") is None,
                                reason="megatron-core is not installed (pip install -e '.[megatron]')")

LR = 1e-3


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lingshu_rl.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("megatron")
    model = build_tiny_model(root / "cache")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(model), str(root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}:\n{out[-6000:]}"
    return json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("variant", ["tiny", "qwen2_untied", "llama_mqa"])
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(measured: dict, variant: str, tp: int) -> None:
    assert measured["logits"][f"{variant}/tp{tp}"] < 1e-5


@pytest.mark.parametrize("variant", ["tiny", "qwen2_untied", "llama_mqa"])
def test_export_from_live_tp2_model_is_exact(measured: dict, variant: str) -> None:
    assert measured["export_exact"][variant] is True


def test_logprobs_match_torch_engine(measured: dict) -> None:
    assert measured["logprobs_diff"] < 1e-5
    assert measured["packed_logprobs_diff"] < 1e-5


def test_grpo_update_matches_torch_engine(measured: dict) -> None:
    for step in ("update1", "update2"):
        mega, ref = measured[f"megatron/{step}"], measured[f"torch/{step}"]
        assert set(mega) == set(ref)
        for key in ("actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/logprob_mean"):
            assert mega[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (step, key)
        assert mega["actor/grad_norm"] == pytest.approx(ref["actor/grad_norm"], rel=1e-5), step
    # AdamW's first steps move each weight by about lr * sign(grad); float noise in near-zero gradients is all
    # that separates the engines, so the difference is a small fraction of one step
    assert measured["weights_keys_equal"]
    assert measured["weights_max_diff"] < 0.05 * LR
    assert measured["weights_rel_diff"] < 1e-3  # |w_megatron - w_torch| / |w_torch - w_initial|


def test_resume_from_checkpoint_continues_identically(measured: dict) -> None:
    assert measured["checkpoint_files"] == ["megatron/optimizer_tp0.pt", "megatron/optimizer_tp1.pt",
                                            "model/model.safetensors"]
    assert measured["saved_model_equals_export"]
    assert measured["resumed_update2"] == measured["megatron/update2"]
    assert measured["resume_weights_max_diff"] == 0.0


def test_freeze_by_hf_globs(measured: dict) -> None:
    assert measured["frozen_layer0_changed"] is False
    assert measured["unfrozen_layer1_changed"] is True
    assert "freeze all of them or none" in measured["partial_freeze_error"]


# --- the two ranks ----------------------------------------------------------------------------------------------

def _grpo_batch(vocab: int):
    import torch

    from lingshu_rl.train.batch import collate

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (8, 2), generator=gen).tolist()
    prompts = [torch.randint(0, vocab, (p,), generator=gen).tolist() for p, _ in lengths]
    responses = [torch.randint(0, vocab, (r,), generator=gen).tolist() for _, r in lengths]
    batch = collate(prompts, responses, pad_id=0)
    ref = torch.randn(batch.input_ids.shape, generator=gen) * 0.1 - 6.5
    return batch.with_(advantages=torch.randn(8, generator=gen), ref_logprobs=ref * batch.response_mask)


def _variants(tiny: str):
    from transformers import AutoModelForCausalLM

    from test_megatron_convert import llama_mqa, qwen2_untied

    return {"tiny": AutoModelForCausalLM.from_pretrained(tiny).eval(), "qwen2_untied": qwen2_untied(),
            "llama_mqa": llama_mqa()}


def _check_conversion(tiny: str, tp: int, results: dict) -> None:
    """Logits of every variant at ``tp`` vs transformers; at TP>1 also the export from the live model."""
    import torch
    from megatron.core import parallel_state

    from lingshu_rl.train.megatron import cpu_compat
    from lingshu_rl.train.megatron.convert import GPTSpec, hf_to_megatron, merge_to_hf, partition_dim
    from lingshu_rl.train.megatron.model import attention_mask, build_model, load_shards, mrope_positions

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank, group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    cpu_compat.seed_rng_tracker(0, rank)
    for name, hf in _variants(tiny).items():
        spec = GPTSpec.from_hf(hf.config, tp)
        model = build_model(spec, torch.float32, torch.device("cpu")).eval()
        load_shards(model, hf_to_megatron(hf.state_dict(), spec, rank))
        ids = torch.randint(0, spec.vocab_size, (3, 19), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
            local = model(ids, mrope_positions(torch.arange(19).expand(3, -1)), attention_mask(ids, None))
            parts = [torch.empty_like(local) for _ in range(tp)]
            torch.distributed.all_gather(parts, local, group=group)
        logits = torch.cat(parts, dim=-1)[..., :spec.vocab_size]
        results["logits"][f"{name}/tp{tp}"] = (logits - expected).abs().max().item()
        if tp > 1:
            exported = {}
            for pname, param in model.named_parameters():
                shards = [param.detach()]
                if partition_dim(pname) is not None:
                    shards = [torch.empty_like(param) for _ in range(tp)]
                    torch.distributed.all_gather(shards, param.detach(), group=group)
                exported.update(merge_to_hf(pname, shards, spec))
            original = hf.state_dict()
            results["export_exact"][name] = set(exported) == set(original) and all(
                torch.equal(exported[k], v) for k, v in original.items())
    parallel_state.destroy_model_parallel()


def _check_engine(tiny: str, root: Path, results: dict) -> None:
    from dataclasses import replace

    import torch
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from lingshu_rl.config import ModelConfig, TrainConfig
    from lingshu_rl.grpo.loss import GRPOLoss
    from lingshu_rl.train.batch import pack
    from lingshu_rl.train.megatron.engine import MegatronEngine

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    from transformers import AutoConfig

    batch = _grpo_batch(AutoConfig.from_pretrained(tiny).vocab_size)
    loss = GRPOLoss(kl_coef=0.05, entropy_coef=0.01, temperature=0.7)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids[:5], batch.attention_mask[:5])]
    packed = pack([(ids, [1] * len(ids)) for ids in rows], 40, pad_id=0)
    cfg = TrainConfig(engine="megatron", tensor_parallel_size=2, lr=LR, micro_batch_size=3, device="cpu")
    engine = MegatronEngine(tiny, ModelConfig(), cfg, total_steps=4)
    results["megatron/logprobs"] = engine.logprobs(batch, 0.7).tolist()
    results["megatron/packed"] = engine.logprobs(packed, 1.0).tolist()
    results["megatron/update1"] = engine.update(batch, loss)
    after_one = engine.weights()
    engine.save(root / "ckpt")
    results["megatron/update2"] = engine.update(batch, loss)
    final = engine.weights()

    resumed = MegatronEngine(str(root / "ckpt" / "model"), ModelConfig(), cfg, total_steps=4)
    resumed.load_training_state(root / "ckpt")
    results["resumed_update2"] = resumed.update(batch, loss)
    resumed_final = resumed.weights()

    frozen = MegatronEngine(tiny, ModelConfig(), replace(cfg, freeze=["model.layers.0.*"]))
    frozen.update(batch, loss)
    frozen_final = frozen.weights()
    try:
        MegatronEngine(tiny, ModelConfig(), replace(cfg, freeze=["model.layers.0.self_attn.q_proj.*"]))
        results["partial_freeze_error"] = ""
    except ValueError as err:
        results["partial_freeze_error"] = str(err)
    if rank != 0:
        return

    from lingshu_rl.train.torch_engine import TorchEngine

    reference = TorchEngine(tiny, ModelConfig(), TrainConfig(lr=LR, micro_batch_size=3, device="cpu"), total_steps=4)
    initial = {k: v.clone() for k, v in reference.weights().items()}  # weights() shares the live storage
    ref_lp = reference.logprobs(batch, 0.7)
    results["logprobs_diff"] = (torch.tensor(results.pop("megatron/logprobs")) - ref_lp).abs().max().item()
    ref_packed = reference.logprobs(packed, 1.0)
    results["packed_logprobs_diff"] = (torch.tensor(results.pop("megatron/packed")) - ref_packed).abs().max().item()
    results["torch/update1"] = reference.update(batch, loss)
    results["torch/update2"] = reference.update(batch, loss)
    expected = reference.weights()
    results["weights_keys_equal"] = set(final) == set(expected)
    diff = {k: (final[k] - expected[k]).abs().max().item() for k in expected}
    results["weights_max_diff"] = max(diff.values())
    moved = sum(float((expected[k] - initial[k]).square().sum()) for k in expected) ** 0.5
    results["weights_rel_diff"] = sum(float((final[k] - expected[k]).square().sum()) for k in expected) ** 0.5 / moved
    results["resume_weights_max_diff"] = max((resumed_final[k] - final[k]).abs().max().item() for k in final)
    results["checkpoint_files"] = sorted(str(p.relative_to(root / "ckpt")) for p in (root / "ckpt").rglob("*")
                                         if p.suffix in (".pt", ".safetensors"))
    saved = load_file(root / "ckpt" / "model" / "model.safetensors")
    results["saved_model_equals_export"] = set(saved) | {"lm_head.weight"} == set(after_one) and all(
        torch.equal(saved[k], after_one[k]) for k in saved)
    results["frozen_layer0_changed"] = any(not torch.equal(frozen_final[k], initial[k]) for k in initial
                                           if k.startswith("model.layers.0."))
    results["unfrozen_layer1_changed"] = any(not torch.equal(frozen_final[k], initial[k]) for k in initial
                                             if k.startswith("model.layers.1."))


def _rank_main(rank: int, port: int, tiny: str, root: Path) -> None:
    import torch

    from lingshu_rl.train.megatron import cpu_compat

    torch.set_num_threads(1)
    cpu_compat.apply()
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    results: dict = {"logits": {}, "export_exact": {}}
    _check_conversion(tiny, 1, results)
    _check_conversion(tiny, 2, results)
    _check_engine(tiny, root, results)
    if rank == 0:
        (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # test_megatron_convert's model builders
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
