"""The README's API snippet runs as written (issue 17's check), so the front page cannot drift from the API."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_api_snippet_runs_as_written():
    text = README.read_text()
    section = text[text.index("## The API in ten lines"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (the API in ten lines)", "exec"), scope)
    assert scope["nfe"] == 40 and tuple(scope["x"].shape) == (4096, 2)
