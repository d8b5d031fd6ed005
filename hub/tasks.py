"""A small built-in task suite: generated, deterministic, with disjoint train/test splits.

Each task is a string transformation with a terse prompt, so the base model cannot guess the output format
zero-shot (SmolLM2-135M-Instruct scores 0 exact match on each) while a rank-8 LoRA learns it in a dozen steps of 8
examples (>= 0.94; bench/bench_train_tasks.py); the prompts differ, so a router can tell tasks apart.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from hub.data import Example
from hub.errors import NotFound

FIRST_NAMES = ["Ada", "Alan", "Grace", "Linus", "Barbara", "Edsger", "Donald", "Frances", "John", "Margaret",
               "Ken", "Dennis", "Radia", "Tim", "Hedy", "Claude", "Niklaus", "Sophie", "Guido", "Bjarne",
               "Katherine", "Dorothy", "Marvin", "Leslie", "Robin", "Shafi", "Tony", "Yukihiro", "Anita", "Brian"]
LAST_NAMES = ["Lovelace", "Turing", "Hopper", "Torvalds", "Liskov", "Dijkstra", "Knuth", "Allen", "McCarthy",
              "Hamilton", "Thompson", "Ritchie", "Perlman", "Berners", "Lamarr", "Shannon", "Wirth", "Wilson",
              "Rossum", "Stroustrup", "Johnson", "Vaughan", "Minsky", "Lamport", "Milner", "Goldwasser", "Hoare",
              "Matsumoto", "Borg", "Kernighan"]
TRAIN_POOL = 1000
CITIES = ["Oslo", "Lima", "Kyiv", "Quito", "Hanoi", "Dakar", "Riga", "Sofia", "Perth", "Cairo", "Turin", "Bern"]


def _date(rng: random.Random) -> Example:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return Example(prompt=f"date {year:04d}-{month:02d}-{day:02d} ->", completion=f" {day:02d}/{month:02d}/{year:04d}")


def _name(rng: random.Random) -> Example:
    first, initial, last = rng.choice(FIRST_NAMES), chr(rng.randint(65, 90)), rng.choice(LAST_NAMES)
    return Example(prompt=f"name {first} {initial}. {last} ->", completion=f" {last}, {first} {initial}.")


def _record(rng: random.Random) -> Example:
    first, city, age = rng.choice(FIRST_NAMES), rng.choice(CITIES), rng.randint(18, 90)
    return Example(prompt=f"record {first};{age};{city} ->",
                   completion=f' {{"name": "{first}", "age": {age}, "city": "{city}"}}')


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random], Example]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("date", "ISO date to DD/MM/YYYY", _date),
        Task("name", "'First I. Last' to 'Last, First I.'", _name),
        Task("record", "semicolon record to JSON", _record),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise NotFound(f"unknown task {name!r} (built-in tasks: {', '.join(TASKS)})") from None


def examples(name: str, split: str, count: int) -> list[Example]:
    """``count`` distinct examples of task ``name``; the "test" split never repeats a "train" prompt."""
    if split not in ("train", "test"):
        raise NotFound(f"unknown split {split!r} (train or test)")
    if split == "train" and count > TRAIN_POOL:
        raise NotFound(f"the train split of {name!r} has {TRAIN_POOL} examples, not {count}")
    task = get_task(name)
    # One fixed stream of distinct prompts per task: train is its first TRAIN_POOL, test what follows.
    stream = random.Random(int(hashlib.sha256(name.encode()).hexdigest()[:16], 16))
    needed = count if split == "train" else TRAIN_POOL + count
    seen: set[str] = set()
    unique: list[Example] = []
    while len(unique) < needed:
        example = task.make(stream)
        if example.prompt not in seen:
            seen.add(example.prompt)
            unique.append(example)
    return unique if split == "train" else unique[TRAIN_POOL:]


def mixed(split: str, count_per_task: int) -> list[tuple[str, Example]]:
    """Every task's examples, interleaved, labelled with their task."""
    per_task = {name: examples(name, split, count_per_task) for name in TASKS}
    return [(name, per_task[name][i]) for i in range(count_per_task) for name in TASKS]
