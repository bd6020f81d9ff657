"""Render chat templates with `transformers` (runs under .venv-vllm's python).

stdin: a JSON list of {"template", "messages", "bos_token", "eos_token", "prefill"};
stdout: a JSON list of {"generation": str | null, "continued": str | null}, the output of
`transformers`' renderer (what `apply_chat_template(tokenize=False)` returns) with
`add_generation_prompt=True`, and with the prefill as a final assistant message under
`continue_final_message=True` (null without a prefill). An error is returned as text.
"""

from __future__ import annotations

import json
import sys

from transformers.utils.chat_template_utils import render_jinja_template


def render(case: dict[str, object], **options: object) -> str:
    messages = case["messages"]
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=case["template"],
        bos_token=case["bos_token"],
        eos_token=case["eos_token"],
        **options,
    )
    return str(rendered[0])


def main() -> None:
    results = []
    for case in json.load(sys.stdin):
        generation = render(case, add_generation_prompt=True)
        continued = None
        if case["prefill"]:
            final = {"role": "assistant", "content": case["prefill"]}
            continued = render({**case, "messages": [*case["messages"], final]}, continue_final_message=True)
        results.append({"generation": generation, "continued": continued})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
