"""The built-in task of ``lorakit train``: turn a free-text café order into a fixed JSON structure.

The data is generated from a seed, so every run sees the same examples and nothing is downloaded. A request
like ``"Hi, it's Maya. Could I get three large green teas for Friday?"`` must become exactly
``{"name": "Maya", "item": "green tea", "size": "large", "quantity": 3, "day": "friday"}``: the keys in this
order, the quantity as a number (requests spell it as a word half of the time), the item in the singular, the
day in lower case. The system prompt states the keys, so the base model knows what is asked; it still gets the
exact form wrong almost always, which is what a small adapter fixes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

SYSTEM = "Convert the customer's order to JSON with the keys name, item, size, quantity, day."

NAMES = ["Maya", "Omar", "Lena", "Kenji", "Sofia", "Arjun", "Chloe", "Mateo", "Amara", "Felix", "Nadia", "Tom",
         "Ines", "Yusuf", "Hana", "Leo", "Zoe", "Ravi", "Elsa", "Diego", "Mira", "Jonas", "Ada", "Kofi"]
ITEMS = ["coffee", "green tea", "latte", "espresso", "hot chocolate", "bagel", "croissant", "muffin",
         "orange juice", "smoothie", "cheesecake", "sandwich", "cookie", "chai latte", "cappuccino", "scone"]
PLURALS = {"hot chocolate": "hot chocolates", "sandwich": "sandwiches", "espresso": "espressos"}
SIZES = ["small", "medium", "large"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
TEMPLATES = [
    "Hi, it's {name}. Could I get {qty} {size} {items} for {day}?",
    "{name} here: {qty} {items}, {size}, on {day} please.",
    "Please put me down for {qty} {size} {items} on {day}. Thanks, {name}",
    "Order for {name}: {qty} x {item} ({size}), {day}.",
    "Can you have {qty} {size} {items} ready on {day}? Name's {name}.",
    "{day} works for me. {qty} {items}, size {size}. - {name}",
    "Hello! {name} would like {qty} {size} {items} on {day}.",
    "I need {qty} {items} in {size} for {day}, under the name {name}.",
]


@dataclass(frozen=True)
class Order:
    name: str
    item: str
    size: str
    quantity: int
    day: str

    def request(self, rng: random.Random) -> str:
        """A free-text request for this order, phrased by one of the templates."""
        qty = WORDS[self.quantity - 1] if rng.random() < 0.5 else str(self.quantity)
        items = self.item if self.quantity == 1 else PLURALS.get(self.item, self.item + "s")
        day = self.day.capitalize() if rng.random() < 0.7 else self.day
        text = rng.choice(TEMPLATES).format(name=self.name, qty=qty, size=self.size, items=items, item=self.item,
                                            day=day)
        return text[0].upper() + text[1:]

    def answer(self) -> str:
        """The exact JSON the model must produce."""
        return json.dumps({"name": self.name, "item": self.item, "size": self.size, "quantity": self.quantity,
                           "day": self.day})


def _random_order(rng: random.Random) -> Order:
    return Order(rng.choice(NAMES), rng.choice(ITEMS), rng.choice(SIZES), rng.randint(1, 12), rng.choice(DAYS))


def messages(request: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat of one example: system prompt, the request and (for training) the answer."""
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}]
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat


def _split_orders(n_train: int, n_eval: int, seed: int) -> tuple[list[tuple[Order, str]], list[tuple[Order, str]]]:
    """The train and held-out (order, request) pairs generated from ``seed``; no request is in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: tuple[list[tuple[Order, str]], list[tuple[Order, str]]] = ([], [])
    for split, n in zip(splits, (n_train, n_eval)):
        while len(split) < n:
            order = _random_order(rng)
            request = order.request(rng)
            if request in seen:
                continue
            seen.add(request)
            split.append((order, request))
    return splits


def builtin_orders(n_train: int = 2000, n_eval: int = 100, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """The train and held-out splits as chat records (``{"messages": [...]}``), generated from ``seed``.

    No held-out request appears in the training split.
    """
    train, held_out = _split_orders(n_train, n_eval, seed)
    return tuple([{"messages": messages(request, order.answer())} for order, request in split]  # type: ignore
                 for split in (train, held_out))


def near_miss(order: Order, rng: random.Random) -> str:
    """An answer that is almost the exact JSON: one of the mistakes a base model makes (the quantity as a string,
    the day capitalised, the item in the plural, the keys in another order, a wrong size)."""
    fields = {"name": order.name, "item": order.item, "size": order.size, "quantity": order.quantity,
              "day": order.day}
    mistake = rng.randrange(5)
    if mistake == 0:
        fields["quantity"] = str(order.quantity) if rng.random() < 0.5 else WORDS[order.quantity - 1]
    elif mistake == 1:
        fields["day"] = order.day.capitalize()
    elif mistake == 2:
        fields["item"] = PLURALS.get(order.item, order.item + "s")
    elif mistake == 3:
        keys = list(fields)
        while keys == list(fields):
            rng.shuffle(keys)
        fields = {k: fields[k] for k in keys}
    else:
        fields["size"] = rng.choice([s for s in SIZES if s != order.size])
    return json.dumps(fields)


def builtin_pairs(n_train: int = 2000, n_eval: int = 100, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """The built-in task as preference pairs (TRL's conversational ``prompt`` / ``chosen`` / ``rejected``): the
    requests of :func:`builtin_orders`, the exact JSON chosen and a near miss (:func:`near_miss`) rejected. The
    preference tasks put the model's own answer in place of the near miss where it differs from the exact JSON."""
    rng = random.Random(seed + 1)
    return tuple([{"prompt": messages(request),  # type: ignore[return-value]
                   "chosen": [{"role": "assistant", "content": order.answer()}],
                   "rejected": [{"role": "assistant", "content": near_miss(order, rng)}]}
                  for order, request in split] for split in _split_orders(n_train, n_eval, seed))
