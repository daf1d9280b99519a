"""The task declaration: metrics judged case by case, verdicts combined from shards, rewards,
and the user's functions failing every way they can without failing the service."""

import json
import textwrap

import pytest

from tuneloop.config import ConfigError, load_config
from tuneloop.events import RewardRequest
from tuneloop.evaluator.suite import Case, combine, score, tally
from tuneloop.rl_reward.__main__ import score_batch
from tuneloop.rl_reward.rewards import Rewards
from tuneloop.task import Judge, TaskError, TaskSection, check_task

from helpers import REPO

PROTOCOL = load_config(REPO / "examples" / "protocol.yaml").task


def protocol_judge() -> Judge:
    return Judge(PROTOCOL, REPO / "examples")


USER_MODULE = '''
import time

def equation_holds(completion, reference, **fields):
    """A metric: (score, reason)."""
    return (1.0, "") if completion.strip().endswith(str(reference)) else (0.0, "no " + str(reference) + " at the end")

def half(completion):
    return 0.5

def raises(completion):
    raise RuntimeError("boom")

def not_a_number(completion):
    return "yes"

def too_big(completion):
    return 3

def sleeps(completion):
    time.sleep(5)
    return 1.0

def wrong_signature(text):
    return 1.0

def trl_reward(prompts, completions, reference, **kwargs):
    return [float(c.strip() == r) for c, r in zip(completions, reference)]

def trl_conversational(prompts, completions, **kwargs):
    return [float(isinstance(c, list) and c[0]["role"] == "assistant") for c in completions]

def trl_short(prompts, completions, **kwargs):
    return [1.0]

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_task(tmp_path):
    # a fresh module name per test: sys.modules keeps the first import
    name = f"my_checks_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))

    def task(**metrics) -> Judge:
        spec = TaskSection.model_validate({"metrics": {k: ({"function": f"{name}:{v}"} if isinstance(v, str) else v)
                                                       for k, v in metrics.items()},
                                           "function_timeout_s": 0.5})
        return Judge(spec, tmp_path)
    task.module = name
    return task


def test_the_protocol_is_a_declaration_like_any_other():
    j = protocol_judge()
    ok = j.judge('{"task": "math", "answer": "26"}', reference="26", fields={"category": "math"})
    assert ok.scores == {"protocol": 1.0, "correctness": 1.0, "exact": 1.0} and ok.reasons == {}
    wrong = j.judge('{"task": "math", "answer": "25"}', reference="26", fields={"category": "math"})
    assert wrong.scores["protocol"] == 1.0 and wrong.scores["correctness"] == 0.0 and "'25' != '26'" in wrong.reasons["correctness"]
    other_task = j.judge('{"task": "upper", "answer": "26"}', reference="26", fields={"category": "math"})
    assert other_task.scores["protocol"] == 0.0 and other_task.reasons["correctness"] == "fails protocol"
    prose = j.judge("18 + 8 = 26", reference="26", fields={"category": "math"})
    assert prose.scores == {"protocol": 0.0, "correctness": 0.0, "exact": 0.0} and "not JSON" in prose.reasons["protocol"]
    extra = j.judge('{"task": "math", "answer": "26", "why": "x"}', reference="26", fields={"category": "math"})
    assert "Additional properties" in extra.reasons["protocol"]


def test_verdicts_report_every_metric_overall_per_category_with_failing_reasons():
    cases = [Case("p1", "math", "4"), Case("p2", "math", "5"), Case("p3", "upper", "AB")]
    outs = ['{"task": "math", "answer": "4"}', "nonsense", '{"task": "upper", "answer": "Ab"}']
    r = score(cases, outs, judge=protocol_judge())
    assert r.scores == {"protocol": 2 / 3, "correctness": 1 / 3, "exact": 1 / 3}
    assert r.by_category["math"] == {"cases": 2, "protocol": 0.5, "correctness": 0.5, "exact": 0.5}
    assert [f.output for f in r.failures] == ["nonsense", '{"task": "upper", "answer": "Ab"}']
    assert r.failures[1].reason.startswith("correctness: exact: 'Ab' != 'AB'") and r.failures[1].scores["protocol"] == 1.0


def test_shards_combine_to_the_same_result_in_any_order_loss_included():
    cases = [Case(f"p{i}", "math" if i % 2 else "upper", str(i), completion="x") for i in range(7)]
    outs = [f'{{"task": "{c.category}", "answer": "{c.reference}"}}' if i % 3 else "no" for i, c in enumerate(cases)]
    losses = [(0.5 * (i + 1), 2) for i in range(7)]
    j = protocol_judge()
    whole = score(cases, outs, [5] * 7, j, losses)
    parts = [tally(i, cases[a:b], outs[a:b], [5] * (b - a), j, losses[a:b]) for i, (a, b) in enumerate([(0, 3), (3, 6), (6, 7)])]
    merged = combine(list(reversed(parts)))
    assert (merged.cases, merged.scores, merged.by_category) == (7, whole.scores, whole.by_category)
    assert merged.failures == whole.failures and merged.mean_new_tokens == 5.0
    assert whole.scores["eval_loss"] == pytest.approx(sum(x for x, _ in losses) / 14)
    assert whole.scores["perplexity"] == pytest.approx(2.718281828 ** whole.scores["eval_loss"])


def test_a_dataset_without_categories_or_declarations_gets_exact_and_one_category():
    j = Judge(TaskSection(), ".")
    r = score([Case("q", "default", "Paris"), Case("q2", "default", "Rome")], ["Paris", "Milan"], judge=j)
    assert r.scores == {"exact": 0.5} and list(r.by_category) == ["default"]
    assert TaskSection().default_metric() == "exact"


def test_a_metric_function_scores_with_its_reason(user_task):
    j = user_task(ends="equation_holds", half="half")
    v = j.judge("3 + 5 = 8", reference="8")
    assert v.scores["ends"] == 1.0 and v.scores["half"] == 0.5
    v = j.judge("3 + 5 = 9", reference="8")
    assert v.scores["ends"] == 0.0 and v.reasons["ends"] == "no 8 at the end"


@pytest.mark.parametrize("fn, why", [
    ("raises", "raised RuntimeError: boom"),
    ("not_a_number", "returned 'yes', not a bool or a score in [0, 1]"),
    ("too_big", "returned 3, not a bool or a score in [0, 1]"),
    ("sleeps", "timed out after 0.5 s"),
])
def test_a_function_that_fails_scores_that_case_0_with_why_and_the_rest_go_on(user_task, fn, why):
    j = user_task(bad=fn, half="half")
    r = score([Case("q", "default", "8"), Case("q2", "default", "9")], ["8", "9"], judge=j)
    assert r.scores["bad"] == 0.0 and r.scores["half"] == 0.5 and r.scores["exact"] == 1.0
    assert why in r.failures[0].reason and f"{user_task.module}:{fn}" in r.failures[0].reason


def test_functions_that_cannot_be_used_are_refused_at_load_naming_the_path(user_task, tmp_path):
    with pytest.raises(TaskError, match=r"nowhere_module:f: cannot import 'nowhere_module': ModuleNotFoundError"):
        user_task(m={"function": "nowhere_module:f"})
    with pytest.raises(TaskError, match=r"has no 'missing'"):
        user_task(m="missing")
    with pytest.raises(TaskError, match=r"'NOT_CALLABLE' is a int, not a function"):
        user_task(m="NOT_CALLABLE")
    with pytest.raises(TaskError, match=r"takes the keyword argument 'completion'.*\(text\)"):
        user_task(m="wrong_signature")
    with pytest.raises(TaskError, match=r"TRL's signature"):
        check_task(TaskSection(), tmp_path, [f"{user_task.module}:half"])
    # and through a config file, before any training: the file and the path are named
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: {metrics: {m: {function: 'broken_mod:f'}}}\ndata: {sources: [{path: d.jsonl}]}\n")
    (tmp_path / "broken_mod.py").write_text("import nonexistent_dependency\n")
    with pytest.raises(ConfigError, match=r"c.yaml: task: broken_mod:f: cannot import 'broken_mod': ModuleNotFoundError: "
                                          r"No module named 'nonexistent_dependency'"):
        load_config(cfg, functions=True)
    load_config(cfg)  # services read a run's config without importing: the evaluator and rl-reward import


def test_task_declarations_are_checked_at_load():
    with pytest.raises(ValueError, match="no metric fmt"):
        TaskSection.model_validate({"metrics": {"a": {"requires": ["fmt"]}}})
    with pytest.raises(ValueError, match="a cycle"):
        TaskSection.model_validate({"metrics": {"a": {"requires": ["b"]}, "b": {"requires": ["a"]}}})
    with pytest.raises(ValueError, match="tuneloop's own"):
        TaskSection.model_validate({"metrics": {"exact": {"checks": [{"type": "json"}]}}})
    with pytest.raises(ValueError, match="at most one format metric"):
        TaskSection.model_validate({"metrics": {"a": {"format": True, "checks": [{"type": "json"}]},
                                                "b": {"format": True, "checks": [{"type": "json"}]}}})
    with pytest.raises(ValueError, match="needs checks, a function, or requires"):
        TaskSection.model_validate({"metrics": {"a": {}}})


def reward(weights, completions, references, categories=None, **kw):
    req = RewardRequest(run_id="r", completions=completions, references=references,
                        categories=categories or ["math"] * len(completions), weights=weights, **kw)
    return score_batch(req, Rewards(PROTOCOL, str(REPO / "examples")))


def test_reward_batch_gives_per_item_errors_not_a_failure():
    reply = reward({"protocol": 1.0, "exact": 1.0}, ['{"task": "math", "answer": "1"}', "{broken"], [None, "x"])
    assert reply.rewards == [None, 0.0]
    assert "exact needs a reference" in reply.errors[0] and reply.errors[1] is None


def test_any_declared_metric_is_a_reward_with_weights_and_unknown_rewards_are_named():
    good, wrong = '{"task": "math", "answer": "7"}', '{"task": "math", "answer": "8"}'
    assert reward({"correctness": 3.0, "protocol": 1.0}, [good, wrong], ["7", "7"]).rewards == [1.0, 0.25]
    with pytest.raises(ValueError, match="unknown reward function.*'speed'"):
        reward({"speed": 1.0}, [good], ["7"])


def test_similarity_gives_partial_credit_that_ranks_near_misses_above_far_ones():
    def sim(answer, task="math"):
        return reward({"similarity": 1.0}, [json.dumps({"task": task, "answer": answer})], ["36"]).rewards[0]

    assert sim("36") == 1.0 and sim("12") < sim("37") < 1.0 and sim("37") > 0
    assert sim("36", task="upper") == 0.0  # fails the format metric (wrong task): no credit


def test_a_trl_reward_function_by_import_path_plugs_in_unchanged(user_task, tmp_path):
    m = user_task.module
    rewards = Rewards(TaskSection(python_path=[str(tmp_path)]), "/")
    ask = lambda weights, **kw: score_batch(RewardRequest(run_id="r", completions=["8", "9"], references=["8", "8"],
                                                         weights=weights, **kw), rewards)
    assert ask({f"{m}:trl_reward": 1.0}).rewards == [1.0, 0.0]
    assert ask({f"{m}:trl_conversational": 1.0}, conversational=True).rewards == [1.0, 1.0]
    assert ask({f"{m}:trl_reward": 1.0, "exact": 1.0}).rewards == [1.0, 0.0]
    short = ask({f"{m}:trl_short": 1.0})
    assert short.rewards == [None, None] and "returned 1 rewards for 2 completions" in short.errors[0]
    with pytest.raises(TaskError, match="TRL's signature"):
        ask({f"{m}:half": 1.0})


def test_a_case_without_a_reference_is_not_scored_on_what_compares_with_one():
    task = TaskSection.model_validate({"answer": {"regex": r"Answer: (\d+)"}, "metrics": {
        "answer_line": {"checks": [{"type": "regex", "pattern": r"Answer: \d+"}]},
        "correct": {"requires": ["answer_line"], "checks": [{"type": "regex", "pattern": r"Answer: (\d+)", "capture": 1}]},
        "tidy": {"requires": ["correct"], "checks": [{"type": "length", "max_chars": 40}]}}})
    # a held-out demonstration in prose: the task's rule finds no reference in it
    r = score([Case("q1", "default", "8"), Case("q2", "default", task.reference_of("He has 8.", {}))],
              ["Answer: 8", "Answer: 9"], judge=Judge(task, "."))
    assert r.scores == {"answer_line": 1.0, "correct": 1.0, "tidy": 1.0, "exact": 1.0}  # q2 counts for answer_line only


def test_a_reward_on_a_metric_that_needs_the_missing_reference_is_that_items_error():
    reply = reward({"correctness": 1.0}, ['{"task": "math", "answer": "7"}', '{"task": "math", "answer": "7"}'], ["7", None])
    assert reply.rewards == [1.0, None] and reply.errors[1] == "item 1: correctness needs a reference answer"
