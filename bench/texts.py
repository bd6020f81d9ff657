"""The texts of the grounded and long-prompt workloads, and the measure that shows a
grounded answer really repeats its prompt.

Why grounded prompts: much real completion work copies its input (quoting,
extraction, code edits), and that is where n-gram speculation pays. The model is
a 270M *base* model fed raw `\\n\\nHuman: ...\\n\\nAssistant:` text, so the shapes
here were chosen by trying them: each ends in an assistant prefill after which
its greedy output copies long runs of the prompt (bench/README.md, "Workloads",
has the measured copy share). Every prompt ends in a non-space character: tcserve
strips trailing whitespace from a prompt (Anthropic's rule) and the OpenAI
servers do not, so a trailing space or newline would give them different prompts.

Index i always gives the same text and different indexes give different texts
(no whole-prompt cache hits), as load.load_prompts does for the free-text rows.
"""

from __future__ import annotations

from collections.abc import Callable

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

# ----------------------------------------------------------------------------
# Passages: generated from small pools, distinct per index (year and place).
# ----------------------------------------------------------------------------

PLACES = (
    "lighthouse",
    "harbour wall",
    "fish market",
    "shipyard",
    "stone bridge",
    "windmill",
    "town hall",
    "railway station",
    "abbey",
    "covered market",
    "clock tower",
)
SITES = (
    "on the rocks at the northern end of the harbour",
    "at the top of the hill above the old quarter",
    "beside the river where the ferry used to land",
    "in the middle of the market square",
    "at the edge of the marshes south of the town",
    "on the headland facing the open sea",
    "behind the church at the end of the high street",
)
MATERIALS = (
    "granite quarried a few miles inland",
    "red brick fired in the kilns by the river",
    "oak timber shipped from the northern forests",
    "limestone carried down from the hills by cart",
    "iron cast in a foundry in the next valley",
)
EVENTS = (
    "it was opened on a stormy night in November",
    "the whole town came out to watch the first day of work",
    "a great fire damaged it only ten years later",
    "its builders were paid in bread and salted fish",
    "the mayor laid the first stone during a long drought",
    "a flood carried away half of its scaffolding",
)
KEEPERS = (
    "a keeper and his family lived in a cottage beside it, climbing the steps every evening to trim the wick",
    "the same family looked after it, oiling the machinery every morning and writing the weather in a book",
    "a small committee of volunteers cared for it, repainting the doors each spring and sweeping the floors",
    "the town council paid a caretaker to open it at dawn, ring the bell at noon and lock it at dusk",
)


def passage(i: int) -> str:
    """About 90 tokens of plain prose; the year and the place differ for i < 2,750."""
    place, site = PLACES[i % len(PLACES)], SITES[i % len(SITES)]
    material, event, keeper = MATERIALS[i % len(MATERIALS)], EVENTS[i % len(EVENTS)], KEEPERS[i % len(KEEPERS)]
    year = 1600 + i % 250
    return (
        f"The old {place} stands {site}. It was built in {year} from {material}, and {event}. "
        f"For more than a century {keeper}. Today visitors come to see it on summer afternoons, "
        f"and the {place} appears on the postcards sold in the shops near the harbour."
    )


# ----------------------------------------------------------------------------
# Code blocks with one misspelt name, and records of fields.
# ----------------------------------------------------------------------------

NOUNS = ("order", "invoice", "basket", "parcel", "booking", "ticket", "payment", "delivery", "rental", "refund")
FUNCTIONS = (
    (
        "def total_{n}_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n"
        "        subtotal += item.price * item.quantity\n    tax = subtotal * tax_rate\n"
        "    return {bad} + tax",
        "subtotal",
    ),
    (
        "def count_{n}_lines(path, marker):\n    matches = 0\n    with open(path) as handle:\n"
        "        for line in handle:\n            if marker in line:\n                matches += 1\n"
        "    return {bad}",
        "matches",
    ),
    (
        "def average_{n}_weight(records):\n    weights = [record.weight for record in records]\n"
        "    if not weights:\n        return 0.0\n    return sum({bad}) / len(weights)",
        "weights",
    ),
)


def misspell(word: str) -> str:
    """`word` with its second-to-last letter dropped (subtotal -> subtotl)."""
    return word[:-2] + word[-1]


def code_block(i: int) -> tuple[str, str, str]:
    """A short Python function with one misspelt name: (code, wrong name, right name)."""
    template, good = FUNCTIONS[i % len(FUNCTIONS)]
    noun = f"{NOUNS[i % len(NOUNS)]}{i // len(NOUNS) or ''}"
    bad = misspell(good)
    return template.format(n=noun, bad=bad), bad, good


FIRST = ("Maria", "John", "Aiko", "Pedro", "Fatima", "Lars", "Chen", "Amara", "Ivan", "Sofia", "Omar", "Grace")
LAST = ("Lopez", "Smith", "Tanaka", "Silva", "Haddad", "Berg", "Wang", "Okafor", "Petrov", "Rossi", "Khan")
CITIES = ("Valencia", "Leeds", "Osaka", "Porto", "Beirut", "Bergen", "Xi'an", "Lagos", "Kazan", "Turin", "Lahore")
JOBS = ("civil engineer", "nurse", "librarian", "chef", "pilot", "teacher", "electrician", "architect", "baker")
EMPLOYERS = ("Harbour Works Ltd", "City Hospital", "Northside School", "Blue Ferry Company", "Green Valley Farms")
LANGUAGES = ("Spanish", "English", "Japanese", "Portuguese", "Arabic", "Norwegian", "Chinese", "Yoruba", "Russian")


def record(i: int) -> str:
    """A customer record as `key = value` lines; the phone number is unique per index."""
    first, last = FIRST[i % len(FIRST)], LAST[i % len(LAST)]
    fields = {
        "name": f"{first} {last}",
        "born": f"{1 + i % 28} {('March', 'July', 'October', 'January')[i % 4]} {1950 + i % 50}",
        "city": CITIES[i % len(CITIES)],
        "job": JOBS[i % len(JOBS)],
        "employer": EMPLOYERS[i % len(EMPLOYERS)],
        "email": f"{first.lower()}.{last.lower()}@example.com",
        "phone": f"555-{i:04d}",
        "member_since": str(2000 + i % 25),
        "language": LANGUAGES[i % len(LANGUAGES)],
    }
    return "\n".join(f"{k} = {v}" for k, v in fields.items())


# ----------------------------------------------------------------------------
# The grounded prompts: quote back, fix one word and give the block again,
# extract fields. Kind = index % 3, so every 3 consecutive requests cover all.
# ----------------------------------------------------------------------------

GROUNDED_KINDS = ("quote", "code fix", "extract")


def quote_prompt(i: int) -> str:
    return (
        f"{HUMAN} Repeat the following passage exactly, word for word.\n\n{passage(i)}"
        f"{ASSISTANT} Here is the passage, word for word:"
    )


def code_fix_prompt(i: int) -> str:
    code, bad, good = code_block(i)
    return (
        f"{HUMAN} There is a typo in this function: `{bad}` should be `{good}`. Fix it and give the whole "
        f"function again.\n\n```python\n{code}\n```{ASSISTANT} ```python"
    )


def extract_prompt(i: int) -> str:
    return f"{HUMAN} Rewrite this record as a list of key: value lines.\n\n{record(i)}{ASSISTANT} name:"


_BUILDERS: tuple[Callable[[int], str], ...] = (quote_prompt, code_fix_prompt, extract_prompt)


def grounded_prompts(count: int, offset: int) -> list[str]:
    """`count` grounded transcripts from global index `offset`, kinds in turn."""
    return [_BUILDERS[i % len(_BUILDERS)](i) for i in range(offset, offset + count)]


# ----------------------------------------------------------------------------
# Long prompts: a report of many passages and one question, cut to a token budget.
# ----------------------------------------------------------------------------

LONG_QUESTION = "In which year was the first building of the report built, and from what?"


def long_prompt(i: int, target_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """A distinct report of passages, sentence by sentence as many as fit in
    `target_tokens` tokens (BOS included); `count_tokens` is the model's tokenizer (no BOS)."""
    head = f"{HUMAN} Read report number {i} below and answer the question after it.\n\n"
    tail = f"\n\nQuestion: {LONG_QUESTION}{ASSISTANT}"
    paragraphs: list[list[str]] = []

    def text() -> str:
        return head + "\n\n".join(" ".join(p) for p in paragraphs) + tail

    # Sentence counts add up to about the whole text's count (a join can merge or split
    # a token); the estimate fills the budget, the exact count then trims it.
    estimate, k = count_tokens(text()) + 1, i * 7919  # a different run of passages per prompt
    while estimate <= target_tokens:
        paragraphs.append([])
        for sentence in passage(k + len(paragraphs)).split(". "):
            sentence = sentence if sentence.endswith(".") else sentence + "."
            paragraphs[-1].append(sentence)
            estimate += count_tokens(" " + sentence)
    while count_tokens(text()) + 1 > target_tokens:
        paragraphs[-1].pop() if paragraphs[-1] else paragraphs.pop()
    return text()


def long_prompts(count: int, offset: int, target_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    return [long_prompt(i, target_tokens, count_tokens) for i in range(offset, offset + count)]


# ----------------------------------------------------------------------------
# How grounded an answer is
# ----------------------------------------------------------------------------


def copied_tokens(prompt_ids: list[int], output_ids: list[int], n: int = 3) -> int:
    """Output tokens that complete an n-gram already seen earlier in prompt + output:
    the tokens an n-gram lookup in the text so far could have drafted."""
    seq = [*prompt_ids, *output_ids]
    seen = {tuple(seq[j : j + n]) for j in range(len(prompt_ids) - n + 1)}
    hits = 0
    for j in range(len(prompt_ids), len(seq)):
        if j < n - 1:
            continue
        gram = tuple(seq[j - n + 1 : j + 1])
        hits += gram in seen
        seen.add(gram)
    return hits
