"""lm-eval through the `picojax` model: the same numbers as lm-eval's own `hf` model on the same checkpoint (its
Llama folder), on small local tasks (multiple choice, perplexity, generation) defined in YAML over jsonl files
written here; the command's results file; unknown task names."""
import json
import os

import numpy as np
import pytest

import train

os.environ["HF_DATASETS_OFFLINE"] = "1"  # the tasks' jsonl files are local: `datasets` must not look online
lm_eval = pytest.importorskip("lm_eval")
import lmeval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

CONTEXTS = ["The history of", "In 1900, the", "Anarchism is a political", "A"]
CHOICES = [" the world", " science and art", " philosophy", " the city of Paris and its long river"]


def write_tasks(root):
    docs = [dict(question=c, choices=CHOICES, answer=i % 4) for i, c in enumerate(CONTEXTS * 3)]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    texts = ["The quick brown fox jumps over the lazy dog. " * k for k in (1, 5, 20)]  # 20: longer than seq_len
    (root / "ppl.jsonl").write_text("".join(json.dumps(dict(text=t)) + "\n" for t in texts))
    (root / "gen.jsonl").write_text("".join(json.dumps(dict(question=c, answer=" the")) + "\n" for c in CONTEXTS))
    common = lambda f: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / f}\ntest_split: test\n"
    (root / "pj_mc.yaml").write_text(
        "task: pj_mc\n" + common("mc.jsonl") + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "pj_ppl.yaml").write_text(
        "task: pj_ppl\n" + common("ppl.jsonl") + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    (root / "pj_gen.yaml").write_text(
        "task: pj_gen\n" + common("gen.jsonl") + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_cache):
    """A tiny trained run (float32), with every checkpoint also a Llama folder."""
    from conftest import TINY, make_cfg
    root = tmp_path_factory.mktemp("lmeval")
    write_tasks(root)
    valid = corpus_cache / "wiki-bpe4096" / "valid.bin"
    cfg = make_cfg(*TINY, f"data.cache_dir={corpus_cache}", f"run_dir={root / 'run'}", "train.steps=6",
                   "checkpoint.every_steps=0", "opt.peak_lr=0.01", "eval.every_steps=3", f"+eval.sets.again={valid}",
                   "eval.tasks=[pj_mc]", f"eval.task_include_path={root}")
    assert lmeval.run_tasks(cfg) == ["pj_mc"]  # main.py's order: the names checked, train.run, then the tasks
    lmeval.after_training(cfg, train.Trainer(cfg).run())
    return root


def test_training_ends_with_every_eval_set_and_the_task_list_in_metrics_and_report(run):
    """eval.sets: each set's loss and perplexity, at eval.every_steps and at the end (here the same data as val,
    so the same numbers); eval.tasks: lm-eval's scores in metrics.json, eval_results/ and report.py's table."""
    import report
    metrics = json.loads((run / "run" / "metrics.json").read_text())
    at3 = next(h for h in metrics["history"] if h["step"] == 3)
    final = metrics["final"]
    for point in (at3, final):
        assert point["again_loss"] == pytest.approx(point["val_loss"]) and "again_ppl" in point
    assert 0 <= final["tasks"]["pj_mc"]["acc,none"] <= 1
    assert json.loads((run / "run" / "eval_results" / "step_6.json").read_text())["results"]["pj_mc"]
    report.main([str(run / "run")])
    table = (run / "run" / "report.md").read_text()
    assert "again_ppl" in table and "pj_mc acc" in table


def test_scores_equal_lm_evals_hf_model_on_the_exported_checkpoint(run):
    from lm_eval.models.huggingface import HFLM
    ours = lmeval.PicojaxLM(run / "run", batch_size=4)
    theirs = HFLM(pretrained=str(run / "run" / "checkpoints" / "step_6"), batch_size=4, device="cpu",
                  dtype="float32")
    reqs = lambda kind, args: [Instance(kind, {}, a, i) for i, a in enumerate(args)]
    pairs = [(c, x) for c in CONTEXTS + [""] for x in CHOICES]
    a, b = ours.loglikelihood(reqs("loglikelihood", pairs)), theirs.loglikelihood(reqs("loglikelihood", pairs))
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-4, atol=1e-4)
    assert [g for _, g in a] == [g for _, g in b]
    texts = [("The quick brown fox jumps over the lazy dog. " * k,) for k in (1, 20)]  # 20: several windows
    np.testing.assert_allclose(ours.loglikelihood_rolling(reqs("loglikelihood_rolling", texts)),
                               theirs.loglikelihood_rolling(reqs("loglikelihood_rolling", texts)), rtol=1e-4)
    gen = reqs("generate_until", [(c, dict(until=["."], max_gen_toks=6, do_sample=False)) for c in CONTEXTS])
    assert ours.generate_until(gen) == theirs.generate_until(gen)

    # whole tasks through lm_eval.simple_evaluate, both models by their registered names in one process, ours
    # first (registering `picojax` once hid lm-eval's own models): the same metrics
    manager = TaskManager(include_path=str(run))
    tasks = ["pj_mc", "pj_ppl", "pj_gen"]
    r_ours = lm_eval.simple_evaluate(model="picojax", model_args=f"run_dir={run / 'run'},batch_size=4", tasks=tasks,
                                     task_manager=manager)["results"]
    r_theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={run / 'run' / 'checkpoints' / 'step_6'},"
                                       "batch_size=4,device=cpu,dtype=float32", tasks=tasks,
                                       task_manager=manager)["results"]
    for task in tasks:
        for metric, value in r_theirs[task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert r_ours[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)


def test_the_command_writes_results_beside_the_run_and_names_unknown_tasks(run, monkeypatch):
    lmeval.main([str(run / "run"), "--tasks", "pj_mc,pj_ppl", "--include-path", str(run), "--limit", "3"])
    out = json.loads((run / "run" / "eval_results" / "step_6.json").read_text())
    assert out["step"] == 6 and {"pj_mc", "pj_ppl"} <= set(out["results"]) and out["limit"] == 3
    assert "acc,none" in out["results"]["pj_mc"]
    index = type("Index", (), {"all_tasks": ["pj_mc", "pj_ppl", "hellaswag", "arc_easy"]})()  # lm-eval's, in small
    with pytest.raises(lmeval.ConfigError, match=r"unknown lm-eval task\(s\): 'pj_mcq' \(close: \['pj_mc'.*; "
                                                 r"'arc_eazy' \(close: \['arc_easy'\]\).*--include-path DIR"):
        lmeval.check_tasks(["pj_mc", "pj_mcq", "arc_eazy"], index)
    monkeypatch.setattr(lmeval, "lm_eval", None)  # lm-eval absent: a clear error naming the install
    with pytest.raises(lmeval.ConfigError, match=r"lm-eval is not installed: pip install lm-eval==0.4.13"):
        lmeval.task_manager("/nowhere", ("x",))
