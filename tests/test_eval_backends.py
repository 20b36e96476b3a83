"""Generation back ends (``umm.eval.backends``): the seam, the errors and the ``auto`` fallback on
CPU; the vLLM engine wrapper and the search's in-memory weight pushes through a stand-in ``vllm``
module that runs umm's own decoding on CPU; and, on a CUDA machine with vLLM installed, the same
contracts against the real engine (skipped elsewhere)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
from evolve_probe import make_references, register_probe
from typer.testing import CliRunner

from umm.cli import app
from umm.eval import backends

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# A stand-in for the vllm package: its LLM runs umm's decoding loop on CPU, one prompt at a time
# ---------------------------------------------------------------------------------------------


class FakeModel:
    """The engine-side model: ``load_weights`` takes checkpoint names, as vLLM's models do."""

    def __init__(self, hf_model) -> None:
        self.hf = hf_model

    def load_weights(self, weights):
        params = dict(self.hf.named_parameters())
        loaded = set()
        for name, tensor in weights:
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded


class FakeLLM:
    instances: list[FakeLLM] = []
    refuse: str | None = None  # set to make the constructor fail as vLLM does for an unknown architecture

    def __init__(self, *, model: str, tokenizer: str, dtype: str, **options) -> None:
        from umm.checkpoints.loading import load_causal_lm, load_tokenizer

        if FakeLLM.refuse:
            raise ValueError(FakeLLM.refuse)
        self.options = dict(options, model=model, dtype=dtype)
        self.model = FakeModel(load_causal_lm(model, device="cpu", dtype=dtype))
        self.tokenizer = load_tokenizer(tokenizer)
        self.resets = 0
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        import torch

        from umm.eval.generate import _generate_loop

        out = []
        with torch.inference_mode():
            for prompt, p in zip(prompts, params):
                assert p.kwargs["temperature"] == 0.0 and p.kwargs["n"] == 1
                (text,) = _generate_loop(self.model.hf, self.tokenizer, [prompt["prompt_token_ids"]],
                                         p.kwargs["max_tokens"], p.kwargs["stop"] or (), 0,
                                         set(p.kwargs["stop_token_ids"] or ()), torch.device("cpu"))
                out.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
        return out

    def apply_model(self, fn):
        return [fn(self.model)]

    def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True


class FakeSamplingParams:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    """``import vllm`` gets the stand-in, and the back end believes a GPU is there."""
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.LLM, mod.SamplingParams, mod.__version__ = FakeLLM, FakeSamplingParams, "fake"
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(backends, "vllm_unavailable", lambda device: None)
    FakeLLM.instances, FakeLLM.refuse = [], None
    yield FakeLLM
    FakeLLM.instances, FakeLLM.refuse = [], None


@pytest.fixture
def no_vllm(monkeypatch):
    """vllm is not installed, whatever this machine has."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)


def _outputs(result, task: str) -> list[str]:
    return [r.output for r in result.samples[task]]


# ---------------------------------------------------------------------------------------------
# The seam and its errors, on CPU
# ---------------------------------------------------------------------------------------------


def test_unknown_backend_is_named_with_the_valid_ones(tiny_models) -> None:
    with pytest.raises(backends.BackendError, match="loop, hf, vllm, auto"):
        backends.check_backend("gpu")
    r = runner.invoke(app, ["eval", str(tiny_models["base"]), "--task", "synth-math", "--backend", "gpu"])
    assert r.exit_code != 0 and "unknown generation back end 'gpu'" in r.output


def test_vllm_by_name_fails_with_the_reason(tiny_models, no_vllm) -> None:
    from umm.eval import evaluate_folder

    with pytest.raises(backends.BackendError, match="vllm is not installed.*umm\\[vllm\\]"):
        evaluate_folder(tiny_models["base"], ["synth-math"], limit=2, backend="vllm")
    r = runner.invoke(app, ["eval", str(tiny_models["base"]), "--task", "synth-math", "--limit", "2",
                            "--backend", "vllm", "--device", "cpu"])
    assert r.exit_code != 0 and "vLLM runs on CUDA GPUs" in r.output and "'cpu'" in r.output
    # a PyTorch model handed to the vllm back end is a usage error, not a silent fallback
    with pytest.raises(backends.BackendError, match="vLLM engine"):
        backends.complete(object(), None, ["x"], backend="vllm", max_new_tokens=2)


def test_auto_falls_back_to_pytorch_with_identical_scores(tiny_models, no_vllm, caplog) -> None:
    from umm.eval import evaluate_folder
    from umm.eval.generate import DEFAULT_BACKEND

    kw = dict(split="search", limit=6, device="cpu", batch_size=4)
    plain = evaluate_folder(tiny_models["math"], ["synth-math", "synth-list"], backend=DEFAULT_BACKEND, **kw)
    with caplog.at_level(logging.WARNING, logger="umm.eval.backends"):
        auto = evaluate_folder(tiny_models["math"], ["synth-math", "synth-list"], backend="auto", **kw)
    assert "backend auto: using" in caplog.text and "vLLM runs on CUDA GPUs" in caplog.text
    assert auto.meta["backend"] == plain.meta["backend"] == DEFAULT_BACKEND
    for task in ("synth-math", "synth-list"):
        assert auto.scores[task].score == plain.scores[task].score
        assert _outputs(auto, task) == _outputs(plain, task)


def test_hf_and_loop_are_both_reachable_by_name(tiny_models) -> None:
    from umm.eval import evaluate_folder

    kw = dict(split="search", limit=4, device="cpu", batch_size=4, max_new_tokens=4)
    loop = evaluate_folder(tiny_models["code"], ["synth-math"], backend="loop", **kw)
    hf = evaluate_folder(tiny_models["code"], ["synth-math"], backend="hf", **kw)
    assert (loop.meta["backend"], hf.meta["backend"]) == ("loop", "hf")
    assert _outputs(loop, "synth-math") == _outputs(hf, "synth-math")  # same greedy text either way


def test_evolve_config_and_flag_take_the_backend(tmp_path, tiny_models) -> None:
    import yaml

    from umm.evolve.config import EvolveConfigError, load_config, parse_config
    from umm.evolve.run import RESUMABLE_CHANGES

    base = {"models": [str(tiny_models["math"])], "tasks": ["synth-math"]}
    assert parse_config(base).backend == "loop"
    assert parse_config({**base, "backend": "auto"}).backend == "auto"
    with pytest.raises(EvolveConfigError, match="backend"):
        parse_config({**base, "backend": "tpu"})
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump(base))
    assert load_config(path, backend="vllm").backend == "vllm"  # what --backend passes
    assert "backend" in RESUMABLE_CHANGES  # a run started on a GPU can be resumed elsewhere


def test_evolve_with_vllm_by_name_fails_before_the_search(tmp_path, tiny_models, no_vllm) -> None:
    import yaml

    cfg = tmp_path / "evolve.yaml"
    cfg.write_text(yaml.safe_dump({"models": [str(tiny_models["math"]), str(tiny_models["code"])],
                                   "base_model": str(tiny_models["base"]), "tasks": ["synth-math"]}))
    r = runner.invoke(app, ["evolve", str(cfg), "--run-dir", str(tmp_path / "run"), "--backend", "vllm",
                            "--device", "cpu"])
    assert r.exit_code != 0 and "--backend vllm cannot run" in r.output and "CUDA" in r.output
    assert not (tmp_path / "run" / "search_state.json").exists()


def test_coordinator_passes_its_eval_backend_to_the_evaluation(tmp_path) -> None:
    from coordinator.config import CoordinatorConfig, parse_config
    from coordinator.round import evaluate_spec

    assert evaluate_spec(CoordinatorConfig(), tmp_path, "search").backend == "loop"
    cfg = parse_config({"eval_backend": "auto", "evolve": {"backend": "vllm"}})
    assert evaluate_spec(cfg, tmp_path, "test").backend == "auto"
    from coordinator.jobspec import CombineJob

    job = CombineJob(models=[tmp_path / "a", tmp_path / "b"], pivot=tmp_path / "a", tasks=["synth-math"], search_size=8,
                     test_size=8, device="cuda", seed=0, run_dir=tmp_path / "run", settings=cfg.combine_settings())
    assert job.combine_config().evolve.backend == "vllm"  # the round's search runs on the evolve section's back end


# ---------------------------------------------------------------------------------------------
# The engine wrapper and the search's weight pushes, against the stand-in vllm module (CPU)
# ---------------------------------------------------------------------------------------------


def test_vllm_engine_gives_the_pytorch_answers(tiny_models, fake_vllm) -> None:
    from umm.eval import evaluate_folder

    kw = dict(split="search", limit=6, device="cpu", batch_size=1, dtype="float32")
    loop = evaluate_folder(tiny_models["math"], ["synth-math", "synth-list"], backend="loop", **kw)
    eng = evaluate_folder(tiny_models["math"], ["synth-math", "synth-list"], backend="vllm", **kw)
    assert eng.meta["backend"] == "vllm" and loop.meta["backend"] == "loop"
    for task in ("synth-math", "synth-list"):
        assert _outputs(eng, task) == _outputs(loop, task)
        assert eng.scores[task].score == loop.scores[task].score
    (llm,) = fake_vllm.instances
    assert llm.options["dtype"] == "float32" and llm.options["trust_remote_code"] is False
    assert llm.options["load_format"] == "safetensors"


def test_auto_falls_back_when_vllm_cannot_load_the_model(tiny_models, fake_vllm, caplog) -> None:
    from umm.eval import evaluate_folder

    fake_vllm.refuse = "Model architectures ['LlamaForCausalLM'] are not supported for now"
    with caplog.at_level(logging.WARNING, logger="umm.eval.backends"):
        res = evaluate_folder(tiny_models["base"], ["synth-math"], split="search", limit=2, device="cpu", backend="auto")
    assert res.meta["backend"] == "loop" and "are not supported" in caplog.text
    with pytest.raises(backends.BackendError, match="cannot load .*are not supported"):
        evaluate_folder(tiny_models["base"], ["synth-math"], split="search", limit=2, device="cpu", backend="vllm")


def test_loading_weights_changes_answers_as_a_reload_does(tiny_models, fake_vllm) -> None:
    from umm.checkpoints.reader import Checkpoint
    from umm.eval.backends.vllm import VllmEngine
    from umm.eval.task import get_task

    prompts = [s.prompt for s in get_task("synth-math").samples("search", limit=6, seed=0)]

    def answers(engine):
        return engine.complete(prompts, max_new_tokens=12, stop=["\n"])

    engine = VllmEngine(tiny_models["base"], dtype="float32")
    before = answers(engine)
    with Checkpoint.open(tiny_models["math"]) as ckpt:
        names = ckpt.tensor_names
        n = engine.load_weights((name, ckpt.get_tensor(name)) for name in names)
    assert n == len(names) and fake_vllm.instances[0].resets == 1  # stale prefix KV blocks dropped
    after = answers(engine)
    reloaded = answers(VllmEngine(tiny_models["math"], dtype="float32"))
    assert after == reloaded and after != before


def test_search_pushes_each_candidate_into_the_engine(tiny_models, fake_vllm, tmp_path) -> None:
    from umm.evolve.config import parse_config
    from umm.evolve.run import Worker, check_tasks, start_genome

    refs = make_references(tiny_models["math"], tmp_path / "refs.json", name="mimic-vllm")
    register_probe(refs)
    cfg = {"models": [str(tiny_models["math"]), str(tiny_models["code"])], "base_model": str(tiny_models["base"]),
           "method": "task_arithmetic", "tasks": [{"name": "mimic-vllm", "search_size": 12}], "device": "cpu",
           "batch_size": 1, "seed": 3}
    torch_cfg, vllm_cfg = parse_config(cfg), parse_config({**cfg, "backend": "vllm"})
    genome = start_genome(torch_cfg, 2)
    tasks = check_tasks(torch_cfg)
    plain, engine = Worker(torch_cfg, genome, tasks, "cpu"), Worker(vllm_cfg, genome, tasks, "cpu")
    assert plain.engine is None and engine.engine is not None
    assert {p.device.type for p in engine.model.parameters()} == {"meta"}  # no second copy of the weights
    rng = np.random.default_rng(0)
    fitness = []
    for _ in range(3):
        x = rng.uniform(0.0, 1.0, size=len(genome.to_vector()))
        a, b = plain.score(x), engine.score(x)
        assert a.scores == b.scores and a.fitness == b.fitness
        fitness.append(a.fitness)
        assert plain.evaluate("search")["mimic-vllm"].correct == engine.evaluate("search")["mimic-vllm"].correct
    assert len(set(fitness)) > 1  # the candidates really differ, so equal scores are not a coincidence
    (llm,) = fake_vllm.instances
    assert llm.resets == 3  # one in-memory load per candidate, one engine for the whole search


def test_a_whole_search_on_the_engine_matches_pytorch(tiny_models, fake_vllm, tmp_path) -> None:
    from umm.evolve.config import parse_config
    from umm.evolve.run import run_evolve

    register_probe(make_references(tiny_models["math"], tmp_path / "refs.json", name="mimic-run"))
    cfg = {"models": [str(tiny_models["math"]), str(tiny_models["code"])], "base_model": str(tiny_models["base"]),
           "tasks": [{"name": "mimic-run", "search_size": 8, "test_size": 8}], "population": 4,
           "budget": {"evaluations": 5}, "device": "cpu", "batch_size": 1, "seed": 2, "baselines": ["task_arithmetic"]}
    plain = run_evolve(parse_config(cfg), tmp_path / "torch")
    engine = run_evolve(parse_config({**cfg, "backend": "vllm"}), tmp_path / "vllm")
    fit = [[c.fitness for g in r.state.generations for c in g.candidates] for r in (plain, engine)]
    assert fit[0] == fit[1] and len(fit[0]) == 5
    rows = [[(row.name, row.scores) for row in r.comparison.rows] for r in (plain, engine)]
    assert rows[0] == rows[1]  # the evolved row read back from merged/ into the engine included
    assert all("--backend vllm" in c for c in engine.comparison.eval_commands)
    assert not any("--backend" in c for c in plain.comparison.eval_commands)
    assert len(fake_vllm.instances) == 1  # one engine for the search, the references and the table


# ---------------------------------------------------------------------------------------------
# The real engine: a CUDA GPU and vLLM installed (bench/gpu_check.sh runs these)
# ---------------------------------------------------------------------------------------------


def _real_vllm_ready() -> bool:
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


gpu = pytest.mark.skipif(not _real_vllm_ready(), reason="needs vLLM and a CUDA GPU")


@pytest.fixture(scope="module")
def full_suite():
    """The ``full`` tiny expert suite (head size 32, which vLLM's attention kernels take), built on
    the GPU if the cache lacks it."""
    from umm.experts.build import ensure_suite

    return ensure_suite("full", device="cuda")


@gpu
def test_real_vllm_agrees_with_pytorch(full_suite) -> None:
    from umm.eval import evaluate_folder

    kw = dict(split="test", limit=64, device="cuda", dtype="bfloat16", batch_size=16)
    tasks = ["synth-math", "synth-list"]
    torch_res = evaluate_folder(full_suite.path("math"), tasks, backend="loop", **kw)
    vllm_res = evaluate_folder(full_suite.path("math"), tasks, backend="vllm", **kw)
    assert vllm_res.meta["backend"] == "vllm"
    for task in tasks:
        same = sum(a.extracted == b.extracted for a, b in zip(torch_res.samples[task], vllm_res.samples[task]))
        assert same >= 0.9 * len(torch_res.samples[task]), (task, same)  # bf16 kernels differ on near-ties only
        assert abs(vllm_res.scores[task].score - torch_res.scores[task].score) <= 0.05, task


@gpu
def test_real_vllm_weight_load_equals_a_reload(full_suite) -> None:
    from umm.checkpoints.reader import Checkpoint
    from umm.eval.backends.vllm import VllmEngine
    from umm.eval.task import get_task

    task = get_task("synth-math")
    prompts = [s.prompt for s in task.samples("test", limit=48, seed=0)]

    def answers(engine):
        return engine.complete(prompts, max_new_tokens=task.max_new_tokens, stop=task.stop)

    engine = VllmEngine(full_suite.path("base"), dtype="bfloat16", gpu_memory_utilization=0.3)
    try:
        before = answers(engine)
        with Checkpoint.open(full_suite.path("math")) as ckpt:
            engine.load_weights((n, ckpt.get_tensor(n)) for n in ckpt.tensor_names)
        after = answers(engine)
    finally:
        engine.close()
    fresh = VllmEngine(full_suite.path("math"), dtype="bfloat16", gpu_memory_utilization=0.3)
    try:
        reloaded = answers(fresh)
    finally:
        fresh.close()
    assert after != before
    assert after == reloaded
