"""The built-in order-to-JSON task: generated from a seed, the same every time, training and held-out requests
disjoint, answers in the documented JSON shape."""

from __future__ import annotations

import json

from lorakit.training.builtin_task import SYSTEM, builtin_orders


def test_builtin_task_is_deterministic_and_disjoint():
    train, held_out = builtin_orders(300, 50, seed=7)
    again, _ = builtin_orders(300, 50, seed=7)
    assert train == again
    requests = {r["messages"][1]["content"] for r in train}
    assert not requests & {r["messages"][1]["content"] for r in held_out}
    record = held_out[0]["messages"]
    assert record[0] == {"role": "system", "content": SYSTEM}
    answer = json.loads(record[2]["content"])
    assert list(answer) == ["name", "item", "size", "quantity", "day"]
    assert isinstance(answer["quantity"], int) and answer["day"].islower()


def test_the_seed_and_sizes_choose_the_data():
    train, held_out = builtin_orders(40, 10, seed=7)
    assert (len(train), len(held_out)) == (40, 10)
    assert builtin_orders(40, 10, seed=8)[0] != train
    for record in train + held_out:
        system, user, assistant = record["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert json.loads(assistant["content"])["name"] in user["content"]  # the answer comes from the request
