"""What `tests/serve.rs` asks of the official `openai` client (PyPI) against `retro serve`:
a whole and a streamed completion at the same seed, the model list, and the exceptions it
raises for a wrong key and a bad request. Prints one JSON object.

usage: python openai_client_check.py BASE_URL API_KEY PROMPT
"""

import json
import sys

import openai

base_url, key, prompt = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
settings = dict(model="run", prompt=prompt, max_tokens=30, temperature=0.9, seed=11)

whole = client.completions.create(**settings)
streamed = "".join(
    event.choices[0].text
    for event in client.completions.create(stream=True, **settings)
    if event.choices
)


def raised(call):
    try:
        call()
    except openai.OpenAIError as e:
        return type(e).__name__
    return None


out = {
    "whole": whole.choices[0].text,
    "streamed": streamed,
    "completion_tokens": whole.usage.completion_tokens,
    "models": [m.id for m in client.models.list()],
    "wrong_key": raised(
        lambda: openai.OpenAI(base_url=base_url, api_key="nope", max_retries=0).completions.create(**settings)
    ),
    "bad_request": raised(lambda: client.completions.create(**{**settings, "temperature": 5})),
}
print(json.dumps(out))
