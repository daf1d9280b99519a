import json
import pytest
from tuneloop.checks import check
from tuneloop.evaluator.suite import Case, combine, score, tally
from tuneloop.rl_reward.__main__ import score_batch
from tuneloop.events import RewardRequest


def test_protocol_check_explains_each_way_to_fail():
    assert check('{"task": "math", "answer": "4"}', "4", "math") == check(' {"task":"math","answer":"4"} ', "4", "math")
    assert check('{"task": "math", "answer": "4"}', "4", "math").correct
    cases = {
        "4": "expected an object", '{"task": "math"': "not JSON", '{"task": "math"}': "missing keys: answer",
        '{"task": "math", "answer": "4", "x": 1}': "unexpected keys: x",
        '{"task": "math", "answer": 4}': "must be strings", '{"task": "upper", "answer": "4"}': "expected 'math'",
    }
    for text, reason in cases.items():
        r = check(text, "4", "math")
        assert not r.protocol and reason in r.reason, (text, r)
    wrong = check('{"task": "math", "answer": "5"}', "4", "math")
    assert wrong.protocol and not wrong.correct


def test_suite_scores_per_category_and_keeps_failures():
    cases = [Case("p1", "math", "4"), Case("p2", "math", "5"), Case("p3", "upper", "AB")]
    outs = ['{"task": "math", "answer": "4"}', "nonsense", '{"task": "upper", "answer": "Ab"}']
    r = score(cases, outs)
    assert r.scores == {"protocol": 2 / 3, "correctness": 1 / 3}
    assert r.by_category["math"] == {"cases": 2, "protocol": 0.5, "correctness": 0.5}
    assert [f.output for f in r.failures] == ["nonsense"]


def test_shards_combine_to_the_same_result_in_any_order():
    cases = [Case(f"p{i}", "math" if i % 2 else "upper", str(i)) for i in range(7)]
    outs = [f'{{"task": "{c.category}", "answer": "{c.reference}"}}' if i % 3 else "no" for i, c in enumerate(cases)]
    whole = score(cases, outs, [5] * 7)
    parts = [tally(i, cases[a:b], outs[a:b], [5] * (b - a)) for i, (a, b) in enumerate([(0, 3), (3, 6), (6, 7)])]
    merged = combine(list(reversed(parts)))
    assert (merged.cases, merged.scores, merged.by_category) == (7, whole.scores, whole.by_category)
    assert merged.failures == whole.failures and merged.mean_new_tokens == 5.0


def test_reward_batch_gives_per_item_errors_not_a_failure():
    req = RewardRequest(run_id="r", completions=['{"task": "math", "answer": "1"}', "{broken"], references=[None, "x"],
                        categories=["math"], weights={"protocol": 1.0, "correctness": 1.0})
    reply = score_batch(req)
    assert reply.rewards == [None, 0.0]
    assert "correctness needs a reference" in reply.errors[0] and reply.errors[1] is None


def test_reward_weights_compose_and_unknown_rewards_are_named():
    answer = '{"task": "math", "answer": "7"}'
    padded = '{"task":   "math",     "answer":      "7"}'
    req = RewardRequest(run_id="r", completions=[answer, padded], references=["7", "7"],
                        categories=["math", "math"], weights={"correctness": 3.0, "brevity": 1.0})
    exact, wordy = score_batch(req).rewards
    assert exact == 1.0 and 0.75 < wordy < 1.0   # correct both times; the padded one loses on brevity only
    with pytest.raises(ValueError, match="unknown reward function.*'speed'"):
        score_batch(RewardRequest(run_id="r", completions=[answer], weights={"speed": 1.0}))


def test_similarity_gives_partial_credit_that_ranks_near_misses_above_far_ones():
    def sim(answer, task="math"):
        completion = json.dumps({"task": task, "answer": answer})
        return score_batch(RewardRequest(run_id="r", completions=[completion], references=["36"], categories=["math"],
                                         weights={"similarity": 1.0})).rewards[0]

    assert sim("36") == 1.0 and sim("12") < sim("37") < 1.0 and sim("37") > 0
    assert sim("36", task="upper") == 0.0  # off protocol (wrong task): no credit
